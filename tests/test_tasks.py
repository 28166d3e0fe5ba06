"""The task registry: built-in tasks follow the paper's protocol; users register tasks from configs."""

import json

import ml_collections
import pytest

from sentcomp.data import TASKS, Task, get_task, load_task, register_task, task_from_config
from sentcomp.errors import SentcompError


def test_builtin_tasks_follow_the_paper():
    expected_prompts = {"sst2": " This movie is ", "sst5": " This movie is ", "imdb": " This movie is ",
                        "mpqa": " The sentiment is ", "cr": " The sentiment is ", "agnews": " This article is about "}
    for name, prompt in expected_prompts.items():
        assert get_task(name).prompt == prompt
    for name in ("sst2", "sst5", "imdb", "mpqa", "cr", "rotten_tomatoes"):
        task = get_task(name)
        assert task.is_sentiment and set(task.posneg_words) == {"positive", "negative"}
        assert set(task.class_words) == {":)", ":("} and len(task.subset_words) == 14
    agnews = get_task("agnews")
    assert not agnews.is_sentiment and agnews.class_words == ("foreign", "sports", "financial", "scientific")
    assert get_task("sst5").num_classes == 5 and get_task("agnews").num_classes == 4
    assert [name for name, task in TASKS.items() if not task.official_split] == ["mpqa", "cr", "mr", "subj"]
    assert get_task("sst2").tfds.splits["test"] == "validation"  # GLUE's test split has no labels
    hub_repos = {name: task.hub.repo_id for name, task in TASKS.items() if task.hub}
    assert hub_repos["sst2"] == "SetFit/sst2" and hub_repos["sst5"] == "SetFit/sst5"  # sentence-level splits
    assert {"mr", "subj", "trec", "mpqa", "cr"} <= set(hub_repos)  # SentEval's classification tasks
    assert get_task("trec").label_names == ("ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM")


def test_unknown_task_lists_the_registered_ones():
    with pytest.raises(SentcompError, match="Unknown task 'sst3'.*sst2"):
        get_task("sst3")


def _config(tmp_path):
    (tmp_path / "train.tsv").write_text("a fine film\tgood\nawful\tbad\n")
    (tmp_path / "test.tsv").write_text("lovely\t1\n")
    return {
        "name": "toy",
        "label_names": ["bad", "good"],
        "prompt": " It was ",
        "label_words": {"bad": "awful", "good": ["fine", "lovely"]},
        "files": {"train": str(tmp_path / "train.tsv"), "test": str(tmp_path / "test.tsv")},
        "subset_words": ["fine", "awful"],
    }


@pytest.mark.parametrize("form", ["dict", "configdict", "json"])
def test_register_a_task_from_a_config_and_load_it(registry, tmp_path, form):
    config = _config(tmp_path)
    if form == "configdict":
        config = ml_collections.ConfigDict(config)
    elif form == "json":
        path = tmp_path / "toy.json"
        path.write_text(json.dumps(config))
        config = str(path)
    task = register_task(config)
    assert get_task("toy") is task
    assert task.label_words == {"bad": ("awful",), "good": ("fine", "lovely")}
    assert task.splits == ("train", "test") and task.subset_words == ("fine", "awful")
    splits = load_task("toy")
    assert splits["train"].texts == ["a fine film", "awful"]
    assert splits["train"].labels.tolist() == [1, 0] and splits["test"].labels.tolist() == [1]


def test_registering_twice_needs_overwrite(registry, tmp_path):
    register_task(_config(tmp_path))
    with pytest.raises(SentcompError, match="already registered"):
        register_task(_config(tmp_path))
    replaced = register_task({**_config(tmp_path), "prompt": " Overall: "}, overwrite=True)
    assert get_task("toy").prompt == " Overall: " and get_task("toy") is replaced


@pytest.mark.parametrize("change,message", [
    ({"colour": "red"}, "unknown keys \\['colour'\\]"),
    ({"label_words": {"bad": "awful"}}, "one entry per label"),
    ({"label_words": {"bad": "awful", "good": []}}, "no \\(or blank\\) label words"),
    ({"label_names": ["only"], "label_words": {"only": "x"}}, "at least two"),
    ({"files": {"train": "a.tsv"}, "splits": ["train", "test"]}, "files for splits"),
    ({"tfds": {"name": "x"}}, "'tfds' needs keys"),
])
def test_bad_task_configs_are_explained(tmp_path, change, message):
    with pytest.raises(SentcompError, match=message):
        task_from_config({**_config(tmp_path), **change})


def test_missing_required_keys(tmp_path):
    config = _config(tmp_path)
    del config["prompt"]
    with pytest.raises(SentcompError, match="missing keys \\['prompt'\\]"):
        task_from_config(config)
    with pytest.raises(SentcompError, match="does not exist"):
        task_from_config(str(tmp_path / "nope.json"))


def test_task_with_tfds_source_from_config():
    task = task_from_config({"name": "t", "label_names": ["a", "b"], "prompt": " ", "label_words": {"a": "x", "b": "y"},
                             "tfds": {"name": "imdb_reviews", "splits": {"train": "train"}, "text_keys": ["text"]}})
    assert isinstance(task, Task) and task.tfds.name == "imdb_reviews" and task.tfds.label_key == "label"
