"""experiments/table1.py + sentcomp.programs.table1: the CLI end to end on the smoke config (real rotten_tomatoes data,
real GPT-2 tokenizer, tiny random GPT-2), resume without recomputation, the pooled-task path (repeated 90/10
splits, mean ± std), and the pieces the table is built from checked against direct computations."""

import json
import shutil
import subprocess

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.linear_model import LogisticRegression

from sentcomp import features, models, probe, zeroshot
from sentcomp.data import Split, get_task, register_task, text
from sentcomp.data import tasks as tasks_module
from sentcomp.errors import SentcompError
from sentcomp.evaluators import cells as cells_log
from sentcomp.evaluators import columns, probes, task_data
from sentcomp.evaluators import zeroshot as zeroshot_column
from sentcomp.evaluators.base import Evaluator
from sentcomp.launcher import runner
from sentcomp.launcher.config_files import EXPERIMENTS_DIR, load_config, override
from sentcomp.programs import table1
from sentcomp.results import layout, table1_markdown

TABLE1 = EXPERIMENTS_DIR / "table1.py"


def smoke_config(**overrides):
    return override(load_config(f"{TABLE1}:smoke"), overrides)


@pytest.fixture(scope="module")
def smoke_run(smoke_workdir):
    return smoke_config(), smoke_workdir("table1")


@pytest.mark.slow
def test_cli_end_to_end_on_smoke(cli, tmp_path):
    workdir = tmp_path / "run"
    completed = cli(f"--config={TABLE1}:smoke", f"--workdir={workdir}", "--config.n_train=24", "--config.n_test=12",
                    "--config.columns=('f','subset_logits')")
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    markdown = (workdir / "results.md").read_text()
    assert markdown.splitlines()[0] in completed.stdout  # the table is printed
    header = "| task | f(s) | subset logits | zero-shot |"
    assert header in markdown
    lines = markdown.splitlines()
    body = lines[lines.index(header) + 2: lines.index(header) + 4]
    assert [line.split(" | ")[0] for line in body] == ["| rotten_tomatoes", "| rotten_tomatoes*"]
    assert lines[lines.index(header) + 4] == ""
    assert results["tasks"][0]["n_train"] == 24 and results["tasks"][0]["n_test"] == 12
    done = runner.read_done(workdir)
    assert done["rotten_tomatoes*/zeroshot"] == results["table"]["rotten_tomatoes*"]["zeroshot"]["mean"]
    assert "rotten_tomatoes/zeroshot" not in done  # zero-shot is a prompt-row column only


def test_results_layout_and_words(smoke_run):
    config, workdir = smoke_run
    results = json.loads((workdir / "results.json").read_text())
    lines = (workdir / "results.md").read_text().splitlines()
    table_start = lines.index("| task | f(s) | Φp_f(s) | subset logits | subset log-probs | subset probs | "
                              "class-word logits | pos/neg logits | zero-shot |")
    no_prompt, prompt = lines[table_start + 2], lines[table_start + 3]
    assert no_prompt.startswith("| rotten_tomatoes |") and no_prompt.endswith("| — |")
    assert prompt.startswith("| rotten_tomatoes* |")
    cells = {cell["key"]: cell for cell in results["cells"]}
    accuracy, n_test = cells["rotten_tomatoes*/f/0"]["test_accuracy"], results["tasks"][0]["n_test"]
    interval = binomtest(round(accuracy * n_test), n_test).proportion_ci(method="wilson")  # scipy's Wilson
    assert prompt.split(" | ")[1] == f"{100 * accuracy:.1f} [{100 * interval.low:.1f}, {100 * interval.high:.1f}]"
    f1_table = lines[lines.index("## Macro-F1") + 2:]
    assert f1_table[2].split(" | ")[1] == f"{100 * cells['rotten_tomatoes/f/0']['test_macro_f1']:.1f}"
    assert len(cells) == 2 * 7 + 1
    tokenizer = models.from_config(config).tokenizer
    task = get_task("rotten_tomatoes")
    for group, words in (("subset", task.subset_words), ("class", task.class_words), ("posneg", task.posneg_words)):
        expected = text.word_set(tokenizer, words)
        assert results["tasks"][0]["word_sets"][group] == {"forms": list(expected.forms),
                                                           "dropped": list(expected.dropped)}
        assert " ".join(repr(form) for form in expected.forms) in "\n".join(lines)


def test_cells_match_direct_computation(smoke_run):
    """Word columns selected from the union extraction equal a direct extraction of the group's words; a probe
    cell equals sklearn's logistic regression at the chosen C on directly extracted features; the zero-shot
    cell equals sentcomp.zeroshot on the test split."""
    config, workdir = smoke_run
    data = task_data.prepare_task("rotten_tomatoes", config)
    (train, test), = data.pairs
    lm = models.from_config(config)
    prompt = data.task.prompt
    direct = features.extract_features(lm, data.texts, ("word_logits",), words=data.task.class_words, prompt=prompt,
                                       max_length=config.max_length, progress=False)
    zeroshot_words = zeroshot_column.prompt_zeroshot_words(data.task, config)
    union = text.word_set(lm.tokenizer, columns.extraction_words(data.task, zeroshot_words))
    extracted = features.extract_features(lm, data.texts, ("f", "word_logits"), words=union.words, prompt=prompt,
                                          max_length=config.max_length, cache_dir=workdir / "features", progress=False)
    assert extracted["metadata"]["computed_chunks"] == []  # the run's cache answers
    word_sets = {"class": text.word_set(lm.tokenizer, data.task.class_words)}
    np.testing.assert_allclose(columns.column_features(extracted, "class_logits", word_sets, union),
                               direct["word_logits"], rtol=1e-5, atol=1e-5)
    with pytest.raises(SentcompError, match="'class' words' columns of an extraction: pass the union word set"):
        columns.column_features(extracted, "class_logits", word_sets, None)
    # the probability column: p_f(s)(w) of the subset words, = softmax(Φᵀh)[w] computed here in float64
    word_sets["subset"] = text.word_set(lm.tokenizer, data.task.subset_words)
    with_probs = features.extract_features(lm, data.texts, ("f", "word_probs"), words=union.words, prompt=prompt,
                                           max_length=config.max_length, cache_dir=workdir / "features",
                                           progress=False)
    h = with_probs["f"].astype(np.float64)
    logits = h @ np.asarray(lm.phi, np.float64).T
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(columns.column_features(with_probs, "subset_probs", word_sets, union),
                               probs[:, list(word_sets["subset"].token_ids)], rtol=1e-4, atol=1e-9)

    results = json.loads((workdir / "results.json").read_text())
    cells = {cell["key"]: cell for cell in results["cells"]}
    x = extracted["f"]
    train_rows, test_rows = data.pair_rows[0]
    assert [data.texts[i] for i in test_rows] == test.texts
    cell = cells["rotten_tomatoes*/f/0"]
    reference = LogisticRegression(C=cell["regularisation"], max_iter=10_000, tol=1e-8).fit(x[train_rows], train.labels)
    assert abs(reference.score(x[test_rows], test.labels) - cell["test_accuracy"]) <= 1 / len(test) + 1e-9

    x_probs = columns.column_features(with_probs, "subset_probs", word_sets, union)
    cell = cells["rotten_tomatoes*/subset_probs/0"]
    reference = LogisticRegression(C=cell["regularisation"], max_iter=10_000, tol=1e-8).fit(
        x_probs[train_rows].astype(np.float64), train.labels)
    assert abs(reference.score(x_probs[test_rows].astype(np.float64), test.labels) - cell["test_accuracy"]) \
        <= 1 / len(test) + 1e-9

    expected = zeroshot.zero_shot_accuracy(lm, data.task, test, max_length=config.max_length, progress=False)
    assert cells["rotten_tomatoes*/zeroshot/0"]["test_accuracy"] == pytest.approx(expected)


def test_rerun_reuses_everything_and_resumes_lost_cells(smoke_run, tmp_path, monkeypatch):
    config, original = smoke_run
    workdir = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(original), str(workdir)], check=True)
    before = json.loads((workdir / "results.json").read_text())

    def forbidden(*args, **kwargs):
        raise AssertionError("recomputed something that was done")

    monkeypatch.setattr(models, "from_config", forbidden)  # every cell done: not even the model is loaded
    monkeypatch.setattr(probe, "evaluate", forbidden)
    runner.run_program(config, workdir)
    assert json.loads((workdir / "results.json").read_text())["table"] == before["table"]

    # A run killed mid-way: some cells lost and a torn last line. Only those probes run again, from cached
    # features (no model forward pass), and give the same numbers.
    monkeypatch.undo()
    lines = (workdir / layout.CELLS_FILE).read_text().splitlines()
    lost = [json.loads(line)["key"] for line in lines if json.loads(line)["key"].endswith(("/f/0", "/phi_p_f/0"))]
    kept = [line for line in lines if json.loads(line)["key"] not in lost]
    (workdir / layout.CELLS_FILE).write_text("\n".join(kept) + '\n{"key": "torn')
    monkeypatch.setattr(features, "_compute_chunk", forbidden)
    monkeypatch.setattr(zeroshot, "word_scores", forbidden)
    calls = []
    real_evaluate = probe.evaluate
    monkeypatch.setattr(probe, "evaluate", lambda *a, **k: calls.append(1) or real_evaluate(*a, **k))
    runner.run_program(config, workdir)
    assert len(calls) == len(lost) == 4
    assert json.loads((workdir / "results.json").read_text())["table"] == before["table"]


def test_a_run_under_other_determinants_recomputes_instead_of_returning_old_cells(smoke_run, tmp_path, monkeypatch):
    """``run`` on a finished workdir with another probe protocol (no runner check in between): the old cells are
    ignored with a warning and every probe is refitted (from the cached features: no feature forward pass)."""
    config, original = smoke_run
    workdir = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(original), str(workdir)], check=True)
    monkeypatch.setattr(features, "_compute_chunk", lambda *a, **k: pytest.fail("features were recomputed"))
    with pytest.warns(UserWarning, match="cells computed under another model, data, protocol or code version"):
        table1.run(smoke_config(**{"probe.protocol": "ridge"}), workdir)
    cells = json.loads((workdir / "results.json").read_text())["cells"]
    probed = [cell for cell in cells if "regularisation" in cell]
    assert probed and all(cell["regularisation_name"] == "alpha" for cell in probed)  # ridge, not the old C
    old = {json.loads(line)["determinants"] for line in (original / layout.CELLS_FILE).read_text().splitlines()}
    assert {cell["determinants"] for cell in cells}.isdisjoint(old)


def test_results_fingerprint_follows_the_model_files(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "weights.bin").write_bytes(b"trained once")
    config = smoke_config(model=str(model_dir))
    first = cells_log.results_fingerprint(config)
    assert cells_log.results_fingerprint(smoke_config(model=str(model_dir), batch_size=8)) == first  # batch-invariant
    (model_dir / "weights.bin").write_bytes(b"trained again, longer")
    assert cells_log.results_fingerprint(config) != first
    assert cells_log.results_fingerprint(smoke_config(n_test=12)) != cells_log.results_fingerprint(smoke_config())


@pytest.mark.slow
def test_pooled_task_repeated_splits_mean_and_std(tmp_path, monkeypatch):
    monkeypatch.setattr(tasks_module, "TASKS", dict(tasks_module.TASKS))  # the test's task stays in this test
    rng = np.random.default_rng(0)
    good, bad = ["a fine film", "great fun", "loved it", "superb acting"], ["dull", "a mess", "boring plot", "awful"]
    rows = [f"{rng.choice(good if label else bad)} number {i}\t{label}"
            for i, label in enumerate(rng.permutation([0, 1] * 20))]
    (tmp_path / "all.tsv").write_text("\n".join(rows) + "\n")
    register_task({"name": "table1_test_pooled", "label_names": ["negative", "positive"], "prompt": " It was ",
                   "label_words": {"negative": ["bad"], "positive": ["good"]},
                   "files": {"train": str(tmp_path / "all.tsv")}, "splits": ["train"], "official_split": False,
                   "subset_words": ["good", "bad", "fine"]}, overwrite=True)
    config = smoke_config(**{"tasks": ("table1_test_pooled",), "n_train": 0, "n_test": 0, "n_repeats": 3,
                             "columns": ("f", "subset_logits", "class_logits"),
                             "probe.multinomial_cells": ("table1_test_pooled:subset_logits",)})
    runner.run_program(config, tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    modes = {(c["column"], c["multi_class"]) for c in results["cells"] if "column" in c and c["column"] != "zeroshot"}
    assert modes == {("f", "ovr"), ("subset_logits", "multinomial")}  # no class words: no class_logits cells
    task = results["tasks"][0]
    assert (task["n_splits"], task["n_train"], task["n_test"]) == (3, 36, 4)
    entry = results["table"]["table1_test_pooled*"]["f"]
    accuracies = [c["test_accuracy"] for c in results["cells"]
                  if c["row"] == "table1_test_pooled*" and c["column"] == "f"]
    assert entry["n_splits"] == 3 and entry["std"] == pytest.approx(np.std(accuracies))
    markdown = (tmp_path / "run" / "results.md").read_text()
    pooled = binomtest(round(entry["mean"] * 3 * 4), 3 * 4).proportion_ci(method="wilson")  # 3 splits × 4 tests
    assert (f"| table1_test_pooled* | {100 * entry['mean']:.1f} ± {100 * entry['std']:.1f} "
            f"[{100 * pooled.low:.1f}, {100 * pooled.high:.1f}] |") in markdown
    assert "(ovr; multinomial for table1_test_pooled:subset_logits)" in markdown
    assert "class-word logits" not in markdown  # the task has no class words: no such column


def test_mteb_cells_are_sklearn_multinomial_logistic_regression():
    """Under protocol=mteb every cell (SST-5 is 5-class) is MTEB's LogisticRegression(max_iter=100): multinomial,
    C = 1, on MTEB's 10 subsets of 8 examples per label; checked against scikit-learn itself."""
    config = load_config(f"{TABLE1}:protocol=mteb")
    assert config.probe.multi_class == "ovr"  # the paper's default elsewhere; mteb must not use it
    multi_class = probes.cell_multi_class(config.probe, "sst5", "f")
    assert multi_class == "multinomial" and table1_markdown.probe_modes(config.probe.to_dict()) == "multinomial (MTEB)"
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 6)) * 1.5
    labels = np.arange(600) % 5
    x = (centers[labels] + rng.normal(size=(600, 6))).astype(np.float32)
    train, test = Split([""] * 300, labels[:300]), Split([""] * 300, labels[300:])
    cell = probes.probe_cell(x, (np.arange(300), np.arange(300, 600)), (train, test), config.probe, multi_class)
    accuracies = []
    for subset in probe.undersample(labels[:300], 8, 10, seed=config.probe.seed):
        reference = LogisticRegression(max_iter=100).fit(x[subset].astype(np.float64), labels[subset])
        accuracies.append(reference.score(x[300:].astype(np.float64), labels[300:]))
    assert cell["multi_class"] == "multinomial"
    assert abs(cell["test_accuracy"] - np.mean(accuracies)) <= 1 / 300 + 1e-9


def test_subsample_is_stratified_and_seeded():
    split = Split([f"t{i}" for i in range(100)], np.array([0] * 70 + [1] * 30))
    subset = task_data.subsample(split, 20, seed=3)
    assert len(subset) == 20 and np.sum(subset.labels == 1) == 6
    assert subset.texts == task_data.subsample(split, 20, seed=3).texts != task_data.subsample(split, 20, seed=4).texts
    assert task_data.subsample(split, 0, seed=3) is split


def test_unknown_column_is_a_clear_error():
    with pytest.raises(Exception, match="Unknown feature columns"):
        columns.columns_for(get_task("sst2"), ["f", "bert_cls"])
    with pytest.raises(Exception, match="multinomial_cells entries must be 'task:column'"):
        probes.check_multinomial_cells(("sst5:subset_logits", "sst5_subset_logits", "sst5:subset"))


def test_p_f_column_refuses_standardisation_and_an_oversized_kernel_up_front(tmp_path, monkeypatch):
    """p_f is probed through its N × N kernel: exact only unscaled, and its memory is checked before any model
    pass (the model loader must never be reached)."""
    with pytest.raises(SentcompError, match="standardize=True cannot be used with the p_f column"):
        table1.check_config(smoke_config(columns=("f", "p_f"), **{"probe.standardize": True}))
    table1.check_config(smoke_config(columns=("f", "projected_p_f"), **{"probe.standardize": True}))  # allowed

    def no_model(config):
        raise AssertionError("the model was loaded before the p_f memory check")

    monkeypatch.setattr(table1.models, "from_config", no_model)
    config = smoke_config(columns=("f", "p_f"), n_train=40, n_test=20, **{"probe.p_f_memory_gb": 1e-6})
    n = 40 + 20
    figure = f"{8 * (5 * n * n + n * 8192) / 1e9:.1f}"  # 5 N² float64 + one column block
    with pytest.raises(SentcompError, match=rf"p_f column of task 'rotten_tomatoes'.*{n:,} × {n:,} float64 "
                                                   rf"kernel.*about {figure} GB at peak.*0\.0 GB allowed"):
        table1.run(config, tmp_path / "run")
    assert not (tmp_path / "run" / "features").exists()


class MajorityColumn(Evaluator):
    """A column family defined here: the train split's majority label predicted for every test text."""

    def columns(self):
        return ["majority"]

    def cells(self, data, log, load_model):
        for with_prompt in (False, True):
            for repeat, (train, test) in enumerate(data.pairs):
                key = cells_log.cell_key(data.task.name, with_prompt, "majority", repeat)
                if key not in log:
                    majority = np.bincount(train.labels).argmax()
                    yield {"key": key, "row": data.task.name + "*" * with_prompt, "column": "majority",
                           "repeat": repeat, "test_accuracy": float(np.mean(test.labels == majority))}


def test_a_new_column_family_is_one_evaluator(smoke_run, tmp_path, monkeypatch):
    """An Evaluator added to the program's list fills its column in the table, results.md and cells.jsonl; on a
    finished workdir only its cells are computed (no probe refitted, no model loaded)."""
    config, original = smoke_run
    workdir = tmp_path / "copy"
    shutil.copytree(original, workdir)
    monkeypatch.setattr(probe, "evaluate", lambda *a, **k: pytest.fail("a probe was refitted"))
    monkeypatch.setattr(table1.models, "from_config", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(table1, "EVALUATORS", (*table1.EVALUATORS, MajorityColumn))
    headline = table1.run(config, workdir)
    (train, test), = task_data.prepare_task("rotten_tomatoes", config).pairs
    labels, counts = np.unique(train.labels, return_counts=True)
    expected = float(np.mean(test.labels == labels[counts.argmax()]))
    assert headline["rotten_tomatoes/majority"] == headline["rotten_tomatoes*/majority"] == expected
    results = json.loads((workdir / "results.json").read_text())
    assert results["columns"][-1] == "majority" and results["table"]["rotten_tomatoes"]["majority"]["mean"] == expected
    assert " majority |" in (workdir / "results.md").read_text().splitlines()[2]
    logged = cells_log.read_cells(workdir / layout.CELLS_FILE)
    assert logged["rotten_tomatoes*/majority/0"]["test_accuracy"] == expected
