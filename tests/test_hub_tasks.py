"""Tasks from Hugging Face Hub datasets, read offline from a Hub cache the tests write (the Hub's own layout:
``datasets--OWNER--NAME/refs/<branch>`` naming a snapshot folder). No test reaches the network (HF_HUB_OFFLINE=1).

Every Hub task of the registry has a fixture in its repository's real layout (file names, columns, label
order), as docs/tasks.md lists them with where each fact was read."""

import json
import time

import huggingface_hub
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sentcomp.data import TASKS, evaluation_splits, get_task, load_task, register_task
from sentcomp.errors import SentcompError


def write_snapshot(cache, repo_id: str, files: dict, revision: str = "0123abcd", ref: str = "main") -> None:
    """A cached snapshot of dataset ``repo_id`` at branch ``ref``: ``files`` maps paths to lists of records
    (``.jsonl`` or ``.parquet`` by suffix)."""
    repo = cache / f"datasets--{repo_id.replace('/', '--')}"
    (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(revision)
    for name, records in files.items():
        path = repo / "snapshots" / revision / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".parquet"):
            pq.write_table(pa.Table.from_pylist(records), path)
        else:
            path.write_text("".join(json.dumps(record) + "\n" for record in records))


def records(texts, labels, label_column="label"):
    return [{"text": text, label_column: label, "label_text": "ignored"} for text, label in zip(texts, labels)]


def setfit(texts, labels, names):
    """SetFit's JSON lines records: ``text``, ``label`` (int) and ``label_text``."""
    return [{"text": text, "label": label, "label_text": names[label]} for text, label in zip(texts, labels)]


BINARY = ("negative", "positive")
SST5 = ("very negative", "negative", "neutral", "positive", "very positive")
TREC = ("ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM")
AGNEWS = ("World", "Sports", "Business", "Sci/Tech")

# task -> (repo, branch, {file: records}, the card's label names in index order, {split: expected texts}).
# File names and columns as each repository has them (docs/tasks.md: where each was read).
REAL_LAYOUTS = {
    "sst2": ("SetFit/sst2", "main", {
        "train.jsonl": setfit(["a gem", "a dud"], [1, 0], BINARY), "dev.jsonl": setfit(["meh"], [0], BINARY),
        "test.jsonl": setfit(["superb"], [1], BINARY)}, BINARY,
        {"train": ["a gem", "a dud"], "validation": ["meh"], "test": ["superb"]}),
    "sst5": ("SetFit/sst5", "main", {
        "train.jsonl": setfit(["awful", "fine"], [0, 2], SST5), "dev.jsonl": setfit(["good"], [3], SST5),
        "test.jsonl": setfit(["a triumph"], [4], SST5)}, SST5,
        {"train": ["awful", "fine"], "validation": ["good"], "test": ["a triumph"]}),
    "imdb": ("stanfordnlp/imdb", "main", {
        "plain_text/train-00000-of-00001.parquet": [{"text": "loved it", "label": 1}, {"text": "no", "label": 0}],
        "plain_text/test-00000-of-00001.parquet": [{"text": "dull", "label": 0}],
        "plain_text/unsupervised-00000-of-00001.parquet": [{"text": "unlabeled", "label": -1}]},
        ("neg", "pos"), {"train": ["loved it", "no"], "test": ["dull"]}),
    "agnews": ("fancyzhx/ag_news", "main", {
        "data/train-00000-of-00001.parquet": [{"text": "Stocks fall", "label": 2}, {"text": "Cup final", "label": 1}],
        "data/test-00000-of-00001.parquet": [{"text": "New chip", "label": 3}]},
        AGNEWS, {"train": ["Stocks fall", "Cup final"], "test": ["New chip"]}),
    "mpqa": ("jxm/mpqa", "main", {
        "data/train-00000-of-00001.parquet": [{"sentence": "fear", "label": 0}, {"sentence": "hope", "label": 1}],
        "data/test-00000-of-00001.parquet": [{"sentence": "support", "label": 1}],
        "data/dev-00000-of-00001.parquet": [{"sentence": "not read", "label": 0}]},
        None, {"train": ["fear", "hope"], "test": ["support"]}),
    "cr": ("SetFit/SentEval-CR", "main", {
        "train.jsonl": setfit(["works well", "broke"], [1, 0], BINARY), "test.jsonl": setfit(["ok"], [1], BINARY)},
        BINARY, {"train": ["works well", "broke"], "test": ["ok"]}),
    "mr": ("cornell-movie-review-data/rotten_tomatoes", "main", {
        "train.parquet": [{"text": "fun", "label": 1}], "validation.parquet": [{"text": "flat", "label": 0}],
        "test.parquet": [{"text": "sharp", "label": 1}]},
        ("neg", "pos"), {"train": ["fun"], "validation": ["flat"], "test": ["sharp"]}),
    "subj": ("SetFit/subj", "main", {
        "train.jsonl": setfit(["he walks in", "i adore it"], [0, 1], ("objective", "subjective")),
        "test.jsonl": setfit(["it rains"], [0], ("objective", "subjective"))},
        ("objective", "subjective"), {"train": ["he walks in", "i adore it"], "test": ["it rains"]}),
    "trec": ("CogComp/trec", "refs/convert/parquet", {
        "default/train/0000.parquet": [{"text": "What is NASA ?", "coarse_label": 0, "fine_label": 1},
                                       {"text": "Where is Rome ?", "coarse_label": 4, "fine_label": 33}],
        "default/test/0000.parquet": [{"text": "How many ?", "coarse_label": 5, "fine_label": 38}]},
        TREC, {"train": ["What is NASA ?", "Where is Rome ?"], "test": ["How many ?"]}),
}


def test_every_hub_task_has_a_real_layout_fixture():
    assert sorted(name for name, task in TASKS.items() if task.hub is not None) == sorted(REAL_LAYOUTS)


@pytest.mark.parametrize("name", sorted(REAL_LAYOUTS))
def test_hub_task_reads_its_repository_layout(tmp_path, name):
    repo, ref, files, card_labels, expected = REAL_LAYOUTS[name]
    task = get_task(name)
    assert task.hub.repo_id == repo and (task.hub.revision or "main") == ref
    write_snapshot(tmp_path, repo, files, ref=ref)
    splits = load_task(name, tmp_path, source="hub")
    assert {split: splits[split].texts for split in splits} == expected
    label_of = {row[task.hub.text_columns[0]]: row[task.hub.label_column] for rows in files.values() for row in rows}
    for split, texts in expected.items():  # labels are the files' integers, meaning the card's names in order
        assert splits[split].labels.tolist() == [label_of[text] for text in texts]
    if card_labels is not None:
        short = {"neg": "negative", "pos": "positive"}
        assert task.label_names == tuple(short.get(label, label) for label in card_labels)


def test_mpqa_pools_train_and_test_but_not_dev(tmp_path):
    repo, ref, files, _, _ = REAL_LAYOUTS["mpqa"]
    write_snapshot(tmp_path, repo, files, ref=ref)
    pairs = evaluation_splits("mpqa", load_task("mpqa", tmp_path, source="hub"), n_repeats=2, test_fraction=0.34)
    assert all(sorted(train.texts + test.texts) == ["fear", "hope", "support"] for train, test in pairs)


def test_sst2_auto_source_refuses_the_glue_split_unless_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SentcompError) as error:
        load_task("sst2")
    message = str(error.value)
    assert "SetFit/sst2" in message and "glue/sst2" in message and "67,349" in message
    assert "hf download SetFit/sst2 --repo-type dataset" in message and "source='tfds'" in message
    repo, ref, files, _, _ = REAL_LAYOUTS["sst2"]
    write_snapshot(tmp_path, repo, files, ref=ref)
    assert load_task("sst2")["test"].texts == ["superb"]  # with the Hub copy cached, auto reads it


def test_sst2_from_setfit_jsonl_files(tmp_path):
    write_snapshot(tmp_path, "SetFit/sst2", {
        "train.jsonl": records(["good film", "bad film", "fine"], [1, 0, 1]),
        "dev.jsonl": records(["meh"], [0]),
        "test.jsonl": records(["great", "awful"], [1, 0]),
    })
    splits = load_task("sst2", tmp_path, source="hub")
    assert sorted(splits) == ["test", "train", "validation"]
    assert splits["train"].texts == ["good film", "bad film", "fine"]
    np.testing.assert_array_equal(splits["train"].labels, [1, 0, 1])
    assert splits["validation"].texts == ["meh"] and splits["test"].texts == ["great", "awful"]
    (train, test), = evaluation_splits("sst2", splits)
    assert len(train) == 3 and len(test) == 2  # validation is not test


def test_parquet_shards_in_order_with_a_named_label_column(tmp_path):
    repo, ref, _, _, _ = REAL_LAYOUTS["trec"]
    write_snapshot(tmp_path, repo, {
        "default/train/0001.parquet": records(["Who is it ?"], [3], "coarse_label"),
        "default/train/0000.parquet": records(["What is NASA ?", "Where is Rome ?"], [0, 4], "coarse_label"),
        "default/test/0000.parquet": records(["How many ?"], [5], "coarse_label"),
        "README.md.json": [],  # not a split file
    }, ref=ref)
    splits = load_task("trec", tmp_path, source="hub")
    assert splits["train"].texts == ["What is NASA ?", "Where is Rome ?", "Who is it ?"]
    np.testing.assert_array_equal(splits["train"].labels, [0, 4, 3])
    assert [get_task("trec").label_names[i] for i in splits["test"].labels] == ["NUM"]


def test_pooled_task_takes_every_hub_split(tmp_path):
    write_snapshot(tmp_path, "SetFit/subj", {
        "train.jsonl": records([f"train {i}" for i in range(16)], [i % 2 for i in range(16)]),
        "test.jsonl": records([f"test {i}" for i in range(4)], [0, 1, 0, 1]),
    })
    pairs = evaluation_splits("subj", load_task("subj", tmp_path, source="hub"))
    assert len(pairs) == 10 and all(len(train) == 18 and len(test) == 2 for train, test in pairs)


def test_missing_dataset_offline_fails_fast_with_the_download_command(tmp_path):
    start = time.perf_counter()
    with pytest.raises(SentcompError) as error:
        load_task("sst5", tmp_path, source="hub")
    assert time.perf_counter() - start < 10
    assert "SetFit/sst5" in str(error.value)
    assert "hf download SetFit/sst5 --repo-type dataset" in str(error.value)


def test_missing_split_and_missing_column_are_named(tmp_path):
    write_snapshot(tmp_path, "SetFit/SentEval-CR", {"train.jsonl": records(["nice"], [1])})
    with pytest.raises(SentcompError, match=r"no data file named after split\(s\) \['test'\]"):
        load_task("cr", tmp_path, source="hub")
    write_snapshot(tmp_path / "other", "CogComp/trec", {
        "default/train/0000.parquet": records(["What ?"], [0]), "default/test/0000.parquet": records(["Why ?"], [2])},
        ref="refs/convert/parquet")
    with pytest.raises(SentcompError, match=r"0000.parquet: missing column\(s\) \['coarse_label'\]"):
        load_task("trec", tmp_path / "other", source="hub")


def test_auto_source_uses_the_hub_cache_when_it_holds_the_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SentcompError, match="hf download SetFit/subj"):  # no files, no TFDS: the Hub's error
        load_task("subj")
    write_snapshot(tmp_path, "SetFit/subj", {"train.jsonl": records(["a", "b"], [0, 1]),
                                             "test.jsonl": records(["c"], [1])})
    assert load_task("subj")["test"].texts == ["c"]



def test_registered_task_with_a_hub_source(registry, tmp_path):
    register_task({
        "name": "hub_reviews", "label_names": ["neg", "pos"], "prompt": " It is ",
        "label_words": {"neg": "bad", "pos": "good"},
        "hub": {"repo_id": "someone/reviews", "splits": {"train": "training", "test": "eval"},
                "text_columns": ["title", "body"], "label_column": "stars"},
    })
    write_snapshot(tmp_path, "someone/reviews", {
        "training.jsonl": [{"title": "Wow", "body": "loved it", "stars": "pos"}],
        "eval.jsonl": [{"title": "Hmm", "body": "no", "stars": 0}],
    })
    splits = load_task("hub_reviews", tmp_path, source="hub")
    assert splits["train"].texts == ["Wow loved it"] and splits["train"].labels.tolist() == [1]
    assert splits["test"].labels.tolist() == [0]
    with pytest.raises(SentcompError, match="'hub' needs keys repo_id, splits"):
        register_task({"name": "x", "label_names": ["a", "b"], "prompt": " ", "label_words": {"a": "a", "b": "b"},
                       "hub": {"repo_id": "a/b"}})
