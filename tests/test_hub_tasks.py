"""Tasks from Hugging Face Hub datasets, read offline from a Hub cache the tests write (the Hub's own layout:
``datasets--OWNER--NAME/refs/main`` naming a snapshot folder). No test reaches the network (HF_HUB_OFFLINE=1)."""

import json
import time

import huggingface_hub
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sentcomp.data import evaluation_splits, get_task, load_task, register_task
from sentcomp.errors import SentcompError


def write_snapshot(cache, repo_id: str, files: dict, revision: str = "0123abcd") -> None:
    """A cached snapshot of dataset ``repo_id``: ``files`` maps paths to lists of records (``.jsonl`` or
    ``.parquet`` by suffix)."""
    repo = cache / f"datasets--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    for name, records in files.items():
        path = repo / "snapshots" / revision / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".parquet"):
            pq.write_table(pa.Table.from_pylist(records), path)
        else:
            path.write_text("".join(json.dumps(record) + "\n" for record in records))


def records(texts, labels, label_column="label"):
    return [{"text": text, label_column: label, "label_text": "ignored"} for text, label in zip(texts, labels)]


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
    write_snapshot(tmp_path, "CogComp/trec", {
        "data/train-00001-of-00002.parquet": records(["Who is it ?"], [3], "coarse_label"),
        "data/train-00000-of-00002.parquet": records(["What is NASA ?", "Where is Rome ?"], [0, 4], "coarse_label"),
        "data/test-00000-of-00001.parquet": records(["How many ?"], [5], "coarse_label"),
        "README.md.json": [],  # not a split file
    })
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
        "train.parquet": records(["What ?"], [0]), "test.parquet": records(["Why ?"], [2])})
    with pytest.raises(SentcompError, match=r"train.parquet: missing column\(s\) \['coarse_label'\]"):
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
