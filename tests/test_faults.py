"""Fault injection: every user mistake ends in one ``error:`` line (exit code 2), every fault either recovers
exactly or stops with a message saying what happened and what to do, and nothing is silently wrong (issue 25).

The cases are grouped by class of failure (the table in docs/faults.md lists them with their outcome):

1. a failed run must not claim its workdir (validation before the workdir is written, also by ``--dry_run``);
2. user mistakes give one error line, never a traceback;
3. corrupt or partial files are detected, named, and recomputed or skipped;
4. faults during long runs (checkpoint writes) surface at once and keep the last good checkpoint;
5. quiet data damage (CSV quotes, file modes) is refused or prevented.

The CLI runs in this process (conftest's ``cli`` fixture, :func:`sentcomp.main.run_cli`), so a case costs
milliseconds, not a JAX import.
A toy program (written per test) stands for any program: the launcher's guarantees hold for every program, and
``test_every_program_has_check_config`` makes each new program module bring its own checks.
"""

from __future__ import annotations

import ast
import errno
import json
import logging
import os
import pkgutil
import re
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from cli_testing import error_line, ok

import sentcomp.programs
from sentcomp import features
from sentcomp.data import corpora, loaders
from sentcomp.errors import SentcompError
from sentcomp.launcher import runner
from sentcomp.launcher.config_files import EXPERIMENTS_DIR
from sentcomp.results import layout, storage
from sentcomp.training import checkpoints, tracking

TABLE1 = f"{EXPERIMENTS_DIR}/table1.py:smoke"
PRETRAIN = f"{EXPERIMENTS_DIR}/pretrain.py:smoke"
QUAD_VS_XENT = f"{EXPERIMENTS_DIR}/quad_vs_xent.py:smoke"

TOY_PROGRAM = '''
"""A toy program: writes results.json with twice config.size; fails late when config.fail is set."""
from pathlib import Path

from sentcomp.results import storage
from sentcomp.errors import SentcompError


def check_config(config):
    if config.size < 1:
        raise SentcompError(f"config.size must be ≥ 1, got {config.size}.")


def run(config, workdir):
    if config.fail:
        raise RuntimeError("a late failure inside the program")
    storage.write_json(Path(workdir) / "results.json", {"value": 2 * config.size})
'''

TOY_CONFIG = '''
"""The toy program's config.

    python -m sentcomp.main --config=toy.py --workdir=DIR
"""
import ml_collections

from sentcomp.launcher import sweep


def get_config(arg=None):
    config = ml_collections.ConfigDict()
    config.program = "sentcomp_faults_toy"
    config.size = 3
    config.fail = False
    config.note = ""
    return config


def get_sweep(arg=None):
    return sweep.axis("size", [1, 2])
'''


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The path of the toy config file (its program importable as ``sentcomp_faults_toy``)."""
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "sentcomp_faults_toy.py").write_text(TOY_PROGRAM)
    (folder / "toy.py").write_text(TOY_CONFIG)
    monkeypatch.syspath_prepend(str(folder))
    return folder / "toy.py"


# ------------------------------------------------------------------------ 1. a failed run claims its workdir

# (config, override, what the error names): caught by the program's check_config before the workdir is written
PROGRAM_MISTAKES = [
    (TABLE1, "--config.batch_size=0", "config.batch_size must be ≥ 1"),
    (TABLE1, "--config.max_length=0", "config.max_length must be ≥ 1"),
    (TABLE1, "--config.tasks=('no_such_task',)", "no_such_task"),
    (TABLE1, "--config.data_dir=/nonexistent/data", "config.data_dir='/nonexistent/data' is not a directory"),
    (TABLE1, "--config.model=/nonexistent/model", "Model directory '/nonexistent/model' does not exist"),
    (TABLE1, "--config.columns=('f','nope')", "Unknown feature columns ['nope']"),
    (TABLE1, "--config.zeroshot.templates=('{text} It was',)", "holds the placeholder {text}"),
    (TABLE1, "--config.probe.protocol=papr", "unknown probe protocol 'papr'"),
    (TABLE1, "--config.probe.n_folds=1", "probe n_folds must be a whole number ≥ 2, got 1"),
    (PRETRAIN, "--config.data.seq_len=0", "config.data.seq_len must be ≥ 1"),
    (PRETRAIN, "--config.data.seq_len=65", "data.seq_len=65 exceeds the model's context of 64"),
    (QUAD_VS_XENT, "--config.stages.pretrain_quad.data.seq_len=65", "data.seq_len=65 exceeds the model's context"),
    (QUAD_VS_XENT, "--config.stages.table1_xent.batch_size=0", "config.batch_size must be ≥ 1"),
    (PRETRAIN, "--config.eval_batch_size=0", "config.eval_batch_size must be ≥ 1"),
    (PRETRAIN, "--config.optimizer.learning_rate=-0.001", "learning_rate must be > 0"),
    (f"{EXPERIMENTS_DIR}/device_check.py:smoke,only=identities", "--config.identities.dim=0",
     "config.identities.dim must be ≥ 1"),
    (f"{EXPERIMENTS_DIR}/logpartition.py:smoke", "--config.train_fraction=1.5", "train_fraction must be in (0, 1)"),
]


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry_run"])
@pytest.mark.parametrize(("spec", "override", "message"), PROGRAM_MISTAKES,
                         ids=[f"{Path(s.split(':')[0]).stem}:{o.split('=')[0][9:]}" for s, o, _ in PROGRAM_MISTAKES])
def test_program_checks_run_before_the_workdir_is_claimed(cli, tmp_path, spec, override, message, dry_run):
    workdir = tmp_path / "run"
    line = error_line(cli(f"--config={spec}", f"--workdir={workdir}", override, *(["--dry_run"] * dry_run)))
    assert message in line
    assert not workdir.exists()


def test_more_shots_than_a_class_holds_fail_before_the_model_loads(cli, tmp_path, monkeypatch):
    from sentcomp import models

    def no_model(config):
        raise AssertionError("the model was loaded before the shots were checked")

    monkeypatch.setattr(models, "from_config", no_model)
    line = error_line(cli(f"--config={TABLE1}", f"--workdir={tmp_path / 'run'}", "--config.zeroshot.shots=(0, 100000)"))
    assert "demonstrations of label" in line and "lower k" in line


def test_every_program_has_check_config():
    """The launcher calls ``check_config(config)`` before it claims the workdir: every program module defines one
    taking the config alone (read from the source: importing every program costs seconds)."""
    for module_info in pkgutil.iter_modules(sentcomp.programs.__path__):
        tree = ast.parse((Path(sentcomp.programs.__path__[0]) / f"{module_info.name}.py").read_text())
        checks = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "check_config"]
        assert len(checks) == 1, module_info.name
        arguments = checks[0].args
        assert len(arguments.args) - len(arguments.defaults) == 1, module_info.name


def test_the_toy_program_check_fails_before_claiming_and_dry_run_runs_it(cli, toy, tmp_path):
    workdir = tmp_path / "run"
    for extra in ([], ["--dry_run"]):
        assert "config.size must be ≥ 1, got 0" in error_line(
            cli(f"--config={toy}", f"--workdir={workdir}", "--config.size=0", *extra))
        assert not workdir.exists()
    ok(cli(f"--config={toy}", f"--workdir={workdir}", "--config.size=2"))
    assert runner.read_done(workdir) == {"value": 4}


def test_a_run_that_produced_nothing_is_replaced_by_the_corrected_config(cli, toy, tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="late failure"):  # a bug, not a user mistake: its traceback stays
        cli(f"--config={toy}", f"--workdir={workdir}", "--config.fail=True")
    assert (workdir / "config.json").exists() and not runner.holds_results(workdir)
    (workdir / "features").mkdir()  # a content-keyed cache does not count as a result
    with pytest.warns(UserWarning, match="produced no results .*fail: True -> False"):
        ok(cli(f"--config={toy}", f"--workdir={workdir}", "--config.note=fixed"))
    assert json.loads((workdir / "config.json").read_text())["note"] == "fixed"
    assert runner.read_done(workdir) == {"value": 6}


def test_a_run_with_results_is_kept_and_resume_may_change_is_a_flag(cli, toy, tmp_path):
    workdir = tmp_path / "run"
    ok(cli(f"--config={toy}", f"--workdir={workdir}"))
    assert "different config (note: '' -> 'x')" in error_line(
        cli(f"--config={toy}", f"--workdir={workdir}", "--config.note=x"))
    assert "--resume_may_change=key1,key2" in error_line(
        cli(f"--config={toy}", f"--workdir={workdir}", "--config.note=x", "--config.resume_may_change=('note',)"))
    assert "no field 'nope'" in error_line(
        cli(f"--config={toy}", f"--workdir={workdir}", "--config.note=x", "--resume_may_change=nope"))
    ok(cli(f"--config={toy}", f"--workdir={workdir}", "--config.note=x", "--resume_may_change=note"))
    assert json.loads((workdir / "config.json").read_text())["resume_may_change"] == ["note"]


def test_done_json_is_removed_when_a_run_starts(cli, toy, tmp_path):
    workdir = tmp_path / "run"
    ok(cli(f"--config={toy}", f"--workdir={workdir}"))
    assert runner.read_done(workdir) is not None
    with pytest.raises(RuntimeError):
        cli(f"--config={toy}", f"--workdir={workdir}", "--config.fail=True", "--resume_may_change=fail")
    assert not (workdir / "done.json").exists()


def test_a_busy_workdir_is_refused(cli, toy, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    with runner.exclusive(workdir):  # flock: a second open file description conflicts, even in one process
        line = error_line(cli(f"--config={toy}", f"--workdir={workdir}"))
    assert "is being written by another run (pid" in line
    assert not (workdir / "config.json").exists()


@pytest.mark.parametrize("parallel_points", [1, 2], ids=["in_process", "subprocesses"])
def test_a_sweep_point_another_run_is_writing_is_left_untouched(toy, tmp_path, parallel_points):
    """A second sweep on the same folder: the point the first is writing gets no error.txt and no log.txt."""
    from sentcomp.launcher import sweep_runner

    config = runner.config_files.load_config(str(toy))
    point_dir = tmp_path / "sweep" / "size=1"
    point_dir.mkdir(parents=True)
    with runner.exclusive(point_dir):
        before = sorted(path.name for path in point_dir.iterdir())
        status, reason = (sweep_runner.run_point if parallel_points == 1 else sweep_runner._run_point_in_subprocess)(
            runner.config_files.override(config, {"size": 1}), point_dir)
        assert status == "failed" and "is being written by another run" in reason
        assert sorted(path.name for path in point_dir.iterdir()) == before == [".lock"]


def test_a_run_clears_its_own_stale_error_txt(cli, toy, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "error.txt").write_text("Traceback ...\nRuntimeError: an earlier attempt\n")
    ok(cli(f"--config={toy}", f"--workdir={workdir}"))
    assert not (workdir / "error.txt").exists()


def test_the_report_trusts_a_later_done_json_over_an_older_error_txt(tmp_path):
    from sentcomp import report

    (tmp_path / "error.txt").write_text("RuntimeError: an earlier attempt\n")
    os.utime(tmp_path / "error.txt", (1_000_000, 1_000_000))
    (tmp_path / "done.json").write_text("{}")
    assert report.run_status(tmp_path) == ("done", None)
    os.utime(tmp_path / "error.txt")  # an error after the done.json: the point failed since
    os.utime(tmp_path / "done.json", (1_000_000, 1_000_000))
    assert report.run_status(tmp_path) == ("failed", "RuntimeError: an earlier attempt")


# ------------------------------------------------------------------------ 2. user mistakes: one error line

BAD_CONFIG_FILES = {
    "syntax": ("def get_config(arg=None)\n    return 1\n", "line 1: expected ':'"),
    "name_at_import": ("import ml_collections\nundefined_name\n", "line 2"),
    "name_in_get_config": ("def get_config(arg=None):\n    return undefined_name\n",
                           "NameError: name 'undefined_name' is not defined"),
    "no_get_config": ("X = 1\n", "has no get_config(arg) function"),
}


@pytest.mark.parametrize("case", BAD_CONFIG_FILES)
def test_a_broken_config_file_is_one_line(cli, tmp_path, case):
    text, message = BAD_CONFIG_FILES[case]
    (tmp_path / "bad.py").write_text(text)
    line = error_line(cli(f"--config={tmp_path / 'bad.py'}", f"--workdir={tmp_path / 'run'}"))
    assert message in line and "bad.py" in line


def test_smoke_and_sweep_never_drop_an_explicit_value(cli, toy, tmp_path):
    line = error_line(cli(f"--config={TABLE1},model=gpt2", f"--workdir={tmp_path / 'a'}", "--dry_run"))
    assert "model=gpt2 was replaced by config.model = 'random-gpt2'" in line
    line = error_line(cli(f"--config={toy}", f"--workdir={tmp_path / 'b'}", "--sweep", "--config.size=5"))
    assert "--config.size overrides a key the sweep sets" in line
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("sweep", [False, True], ids=["run", "sweep"])
def test_an_override_of_one_linked_stage_field_is_refused_naming_the_shared_key(cli, tmp_path, sweep):
    """quad_vs_xent links each stage's learning rate to config.learning_rate (get_ref): setting one stage's would
    write through the link into the other arm (and a sweep point would reset it)."""
    workdir = tmp_path / "run"
    line = error_line(cli(f"--config={QUAD_VS_XENT}", f"--workdir={workdir}", "--dry_run", *["--sweep"] * sweep,
                          "--config.stages.pretrain_xent.optimizer.learning_rate=0.05"))
    assert "linked to config.learning_rate" in line and "stages.pretrain_quad.optimizer.learning_rate" in line
    assert "--config.learning_rate=" in line and not workdir.exists()


@pytest.mark.parametrize(("spec", "message"), [
    (f"{PRETRAIN},loss=quad", "argument loss=quad sets loss, which the sweep sets"),
    (f"{TABLE1},task=sst2", "argument task=sst2 sets tasks, which the sweep sets"),
])
def test_a_sweep_refuses_a_config_argument_it_would_drop(cli, tmp_path, spec, message):
    line = error_line(cli(f"--config={spec}", f"--workdir={tmp_path / 'sweep'}", "--sweep", "--dry_run"))
    assert message in line and not (tmp_path / "sweep").exists()


def test_the_shared_key_sets_every_linked_field(cli, tmp_path):
    out = ok(cli(f"--config={QUAD_VS_XENT}", f"--workdir={tmp_path / 'run'}", "--dry_run",
                 "--config.learning_rate=0.05"))
    assert out.count("learning_rate: 0.05") == 3  # the shared key and both pretraining stages


@pytest.mark.parametrize(("spec", "message"), [
    ("pretrain.py:smoke,size=medium", "the argument size=medium has no effect here"),
    ("checkpoints.py:smoke,corpus=enwiki", "corpus=enwiki was replaced by corpus='lee'"),
    ("checkpoints.py:smoke,model=EleutherAI/pythia-160m", "the argument model=EleutherAI/pythia-160m has no effect"),
    ("table1.py:smoke,model=gpt2", "model=gpt2 was replaced by config.model = 'random-gpt2'"),
])
def test_a_config_argument_a_variant_overrides_is_refused(cli, tmp_path, spec, message):
    line = error_line(cli(f"--config={EXPERIMENTS_DIR}/{spec}", f"--workdir={tmp_path / 'run'}", "--dry_run"))
    assert message in line


def documented_specs() -> list[str]:
    """Every ``--config=experiments/X.py:ARGS`` the docs, the README and the config files show."""
    root = EXPERIMENTS_DIR.parent
    texts = [path.read_text() for path in (*EXPERIMENTS_DIR.glob("*.py"), *(root / "docs").glob("*.md"),
                                           root / "README.md")]
    found = {match for text in texts for match in re.findall(r"--config=experiments/(\w+\.py:[^\s`'\"]+)", text)}
    return sorted(spec for spec in found if (EXPERIMENTS_DIR / spec.split(":")[0]).is_file())


@pytest.mark.parametrize("spec", documented_specs())
def test_every_documented_config_argument_list_is_kept(spec):
    """The rule against dropped arguments (config_files.load_config) refuses none of the documented commands."""
    runner.config_files.load_config(f"{EXPERIMENTS_DIR}/{spec}")


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_a_workdir_that_is_or_is_under_a_file(cli, toy, tmp_path, where):
    (tmp_path / "f").write_text("")
    workdir = tmp_path / "f" if where == "file" else tmp_path / "f" / "run"
    for extra in ([], ["--dry_run"]):
        line = error_line(cli(f"--config={toy}", f"--workdir={workdir}", *extra))
        assert ("is a file" if where == "file" else f"is under {tmp_path / 'f'}, which is a file") in line


def read_only(monkeypatch, workdir: Path):
    """Opening files for writing in ``workdir`` fails as on a read-only mount (root ignores permission bits)."""
    real_open = open

    def fake_open(path, mode="r", *args, **kwargs):
        if Path(path).parent == workdir and set(mode) & set("wa+x"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(runner, "open", fake_open, raising=False)


def test_a_read_only_workdir(cli, toy, tmp_path, monkeypatch):
    done, fresh = tmp_path / "done", tmp_path / "fresh"
    ok(cli(f"--config={toy}", f"--workdir={done}"))
    fresh.mkdir()
    read_only(monkeypatch, done)
    out = ok(cli(f"--config={toy}", f"--workdir={done}"))  # complete: its results are printed
    assert "holds a complete run and cannot be written" in out and "'value': 6" in out
    read_only(monkeypatch, fresh)
    assert "Read-only file system" in error_line(cli(f"--config={toy}", f"--workdir={fresh}"))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A GPT-2 directory in HF format: its config.json and a model.safetensors (written without transformers,
    whose import costs seconds; the damage is found before any tensor is used)."""
    from safetensors.numpy import save_file

    from sentcomp.models import gpt2

    directory = tmp_path_factory.mktemp("tiny_gpt2")
    config = gpt2.gpt2_config(n_layer=1, n_embd=8, n_head=2, n_positions=16, vocab_size=257)
    (directory / "config.json").write_text(json.dumps(gpt2.hf_config_dict(config)))
    save_file({"transformer.wte.weight": np.zeros((257, 8), np.float32)}, str(directory / "model.safetensors"))
    return directory


MODEL_FAULTS = {
    "config_not_json": (lambda d: (d / "config.json").write_text("{not json"), "config.json is not valid JSON"),
    "config_not_object": (lambda d: (d / "config.json").write_text("[1, 2]"), "holds a list, expected a JSON object"),
    "truncated_weights": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100]),
                          "model.safetensors cannot be read"),
    "no_weights": (lambda d: (d / "model.safetensors").unlink(), "has neither model.safetensors"),
}


@pytest.mark.parametrize("fault", MODEL_FAULTS)
def test_a_damaged_model_directory(tiny_model_dir, tmp_path, fault):
    from sentcomp import models

    directory = tmp_path / "model"
    directory.mkdir()
    for file in tiny_model_dir.iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    damage, message = MODEL_FAULTS[fault]
    damage(directory)
    with pytest.raises(SentcompError, match=message):
        models.load(str(directory))


@pytest.mark.parametrize("source", ["/nonexistent/model", "./missing", "~/missing/model", "a/b/c", "not a name"])
def test_a_missing_local_model_is_named_as_a_path(source):
    from sentcomp import models

    with pytest.raises(SentcompError, match="does not exist"):
        models.load(source)


def test_a_run_workdir_whose_model_was_deleted_is_named_as_such(tmp_path):
    from sentcomp import models

    (tmp_path / "config.json").write_text('{"program": "sentcomp.programs.pretrain", "num_steps": 16}')
    with pytest.raises(SentcompError, match=r"workdir of a sentcomp.programs.pretrain run but holds no model/"):
        models.load(str(tmp_path))


def test_a_malformed_model_config_through_the_cli(cli, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{")
    line = error_line(cli(f"--config={TABLE1}", f"--workdir={tmp_path / 'run'}",
                          f"--config.model={tmp_path / 'model'}", "--dry_run"))
    assert "config.json is not valid JSON" in line


def test_a_missing_data_dir_is_not_a_tfds_error(tmp_path):
    for source in ("auto", "tfds", "files"):
        with pytest.raises(SentcompError, match="data_dir '.*nope' is not a directory") as error:
            loaders.load_task("sst2", tmp_path / "nope", source=source)
        assert "Cannot read TFDS" not in str(error.value)


def test_an_empty_data_dir_says_which_files_it_lacks_not_a_tfds_error(tmp_path):
    with pytest.raises(SentcompError, match=r"No data files for task 'sst2' in .*expected, for each split") as error:
        loaders.load_task("sst2", tmp_path)
    assert "TFDS" not in str(error.value)


def test_a_data_dir_holding_the_hub_dataset_is_read_as_a_hub_cache(tmp_path):
    snapshot = tmp_path / "datasets--SetFit--sst2" / "snapshots" / "0123abcd"  # the Hub cache's layout
    snapshot.mkdir(parents=True)
    (tmp_path / "datasets--SetFit--sst2" / "refs").mkdir()
    (tmp_path / "datasets--SetFit--sst2" / "refs" / "main").write_text("0123abcd")
    for split, texts in {"train": ["good", "bad"], "dev": ["meh"], "test": ["great"]}.items():
        (snapshot / f"{split}.jsonl").write_text("".join(json.dumps({"text": text, "label": index % 2}) + "\n"
                                                         for index, text in enumerate(texts)))
    assert loaders.load_task("sst2", tmp_path)["test"].texts == ["great"]  # auto: the Hub dataset it holds
    with pytest.raises(SentcompError, match=r"holds the task's Hugging Face Hub dataset: load it with source='hub'"):
        loaders.load_task("sst2", tmp_path, source="files")


@pytest.mark.parametrize("reader", ["jsonl", "tsv", "csv"])
def test_line_and_paragraph_separators_are_text_not_line_breaks(tmp_path, reader):
    """U+2028, U+2029 and U+0085 are valid inside a record: only \\n, \\r\\n and \\r end a line."""
    text = "one\u2028two\u2029three\x85four"
    path = tmp_path / "data.txt"
    path.write_text({"jsonl": json.dumps({"text": text, "label": 1}, ensure_ascii=False) + "\n",
                     "tsv": f"{text}\t1\n", "csv": f"text,label\n{text},1\n"}[reader], encoding="utf-8")
    read = {"jsonl": loaders.read_jsonl, "tsv": loaders.read_tsv, "csv": loaders.read_csv}[reader]
    split = read(path, ["neg", "pos"])
    assert split.texts == [text] and list(split.labels) == [1]


NOT_UTF8 = b"text,label\nfine,1\nab\xe9c,0\n"


@pytest.mark.parametrize("reader", ["csv", "tsv", "corpus_lines", "corpus_files"])
def test_non_utf8_input_is_reported_by_line(tmp_path, reader):
    path = tmp_path / "data.txt"
    path.write_bytes(NOT_UTF8.replace(b",", b"\t") if reader == "tsv" else NOT_UTF8)
    read = {"csv": lambda: loaders.read_csv(path, ["neg", "pos"]),
            "tsv": lambda: loaders.read_tsv(path, ["neg", "pos"]),
            "corpus_lines": lambda: corpora.read_text_files(str(path), "line"),
            "corpus_files": lambda: corpora.read_text_files(str(path), "file")}[reader]
    with pytest.raises(SentcompError, match=r"data.txt is not UTF-8 text at line 3, column 3 \(byte b'\\xe9'"):
        read()


def test_zero_shot_refuses_a_non_positive_batch_size():
    from sentcomp import zeroshot

    for batch_size in (0, -4):
        with pytest.raises(SentcompError, match="batch_size must be a positive number"):
            zeroshot.word_scores(None, ["a text"], " is", [" good"], batch_size=batch_size)


def test_probe_accuracy_is_a_count_over_the_test_size():
    from sentcomp import probe

    x = np.random.default_rng(0).standard_normal((49, 3)).astype(np.float32)
    labels = (x[:, 0] > 0).astype(np.int64)
    x[:, 0] *= 10  # separable: every prediction right
    assert probe.evaluate(x, labels, x, labels, protocol="ridge").test_accuracy == 1.0


def test_a_zero_vocabulary_chunk_is_refused():
    from sentcomp import kernels

    with pytest.raises(ValueError, match="chunk_size"):
        kernels.log_partition(jnp.ones((2, 4)), jnp.ones((10, 4)), chunk_size=0)


@pytest.mark.parametrize("kernel", ["log_partition", "xent_loss", "quad_loss"])
def test_an_empty_vocabulary_is_refused_by_name(kernel):
    from sentcomp import kernels

    h, phi, targets, mask = jnp.ones((1, 2, 4)), jnp.ones((0, 4)), jnp.zeros((1, 2), int), jnp.ones((1, 2), bool)
    call = {"log_partition": lambda: kernels.log_partition(h[0], phi),
            "xent_loss": lambda: kernels.xent_loss(h, phi, targets, mask),
            "quad_loss": lambda: kernels.quad_loss(h, phi, targets, mask)}[kernel]
    with pytest.raises(ValueError, match="vocabulary is empty"):
        call()


# ------------------------------------------------------------------------ 3. corrupt or partial files


@pytest.mark.parametrize("content", ["", "{", "[1]"], ids=["empty", "corrupt", "not_a_dict"])
def test_a_damaged_done_json_in_one_sweep_point_reruns_that_point(cli, toy, tmp_path, content):
    sweep_dir = tmp_path / "sweep"
    ok(cli(f"--config={toy}", f"--workdir={sweep_dir}", "--sweep"))
    (sweep_dir / "size=1" / "done.json").write_text(content)
    with pytest.warns(UserWarning, match="size=1/done.json is unreadable"):
        ok(cli(f"--config={toy}", f"--workdir={sweep_dir}", "--sweep"))
    rows = {row["name"]: row for row in json.loads((sweep_dir / "sweep.json").read_text())["rows"]}
    assert rows["size=1"]["status"] == "done" and rows["size=1"]["metrics"] == {"value": 2}
    assert rows["size=2"]["status"] == "reused" and rows["size=2"]["metrics"] == {"value": 4}


@pytest.mark.parametrize("content", ["", "{\"size\": 3", "\x00\x00"], ids=["empty", "torn", "zeros"])
def test_a_corrupt_config_json_is_replaced(cli, toy, tmp_path, content):
    workdir = tmp_path / "run"
    ok(cli(f"--config={toy}", f"--workdir={workdir}"))
    (workdir / "config.json").write_text(content)
    with pytest.warns(UserWarning, match="config.json is unreadable .* replaced by this run's config"):
        ok(cli(f"--config={toy}", f"--workdir={workdir}"))
    assert json.loads((workdir / "config.json").read_text())["size"] == 3


def test_a_torn_json_line_is_skipped_and_named(tmp_path):
    from sentcomp.evaluators.cells import read_cells

    path = tmp_path / "cells.jsonl"
    storage.append_json_line(path, {"key": "a", "value": 1})
    storage.append_json_line(path, {"key": "b", "value": 2})
    with open(path, "a") as file:
        file.write('{"key": "c", "val')  # a kill mid-append
    with pytest.warns(UserWarning, match="cells.jsonl, line 3: not valid JSON"):
        assert read_cells(path) == {"a": {"key": "a", "value": 1}, "b": {"key": "b", "value": 2}}
    with pytest.warns(UserWarning, match="cells.jsonl, line 3: not valid JSON"):
        assert storage.read_json_lines(path) == [{"key": "a", "value": 1}, {"key": "b", "value": 2}]
    storage.append_json_line(path, {"key": "d", "value": 4})  # the next cell starts a line of its own
    with pytest.warns(UserWarning, match="cells.jsonl, line 3: not valid JSON"):
        assert sorted(read_cells(path)) == ["a", "b", "d"]


def test_a_torn_metrics_line_is_skipped(tmp_path):
    storage.append_json_line(tmp_path / layout.METRICS_FILE, {"step": 1, "loss": 2.0})
    with open(tmp_path / layout.METRICS_FILE, "a") as file:
        file.write('{"step": 2, "lo')
    with pytest.warns(UserWarning, match="line 2: not valid JSON"):
        assert tracking.read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]


MANIFEST = {"model": "m", "texts": "t", "chunk_size": 4}


@pytest.mark.parametrize("content", [b"", b"{\"model\"", b"\x00" * 10], ids=["empty", "torn", "zeros"])
def test_a_damaged_feature_manifest_is_rewritten(tmp_path, content):
    (tmp_path / "manifest.json").write_bytes(content)
    features._ChunkStore(tmp_path, MANIFEST)
    assert json.loads((tmp_path / "manifest.json").read_text()) == MANIFEST


@pytest.mark.parametrize("damage", ["truncated", "same_shape_other_bytes", "empty", "no_checksum"])
def test_a_damaged_feature_chunk_is_recomputed(tmp_path, damage):
    store = features._ChunkStore(tmp_path, MANIFEST)
    store.put("f", 0, np.arange(12, dtype=np.float32).reshape(3, 4))
    path = tmp_path / "f.00000.npy"
    assert store.has("f", 0)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-8])
    elif damage == "same_shape_other_bytes":
        np.save(path, np.zeros((3, 4), np.float32))
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.with_suffix(".sha256").unlink()
    assert not store.has("f", 0)


def test_a_feature_chunk_holding_nan_is_named_and_recomputed(tmp_path):
    store = features._ChunkStore(tmp_path, MANIFEST)
    store.put("f", 0, np.array([[1.0, np.nan], [0.0, 1.0]], np.float32))  # checksum intact: not a damaged file
    with pytest.warns(UserWarning, match=r"f.00000.npy holds NaN/inf values; it is recomputed"):
        assert not store.has("f", 0)


CORPUS_FILES = ["manifest.json", "train.npy", "validation.npy"]


@pytest.mark.parametrize("file", CORPUS_FILES)
@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_corpus_cache_is_rebuilt(tmp_path, file, damage):
    from sentcomp.models.tokenizers import byte_tokenizer

    (tmp_path / "text.txt").write_text("\n".join(f"line {i} of a small corpus for the cache" for i in range(40)))
    spec = corpora.CorpusSpec(kind="files", glob=str(tmp_path / "text.txt"), unit="line", validation_fraction=0.25)
    tokenizer, cache = byte_tokenizer(), tmp_path / "cache"
    blocks = corpora.load_blocks(spec, tokenizer, 16, cache, progress=False)
    [folder] = cache.iterdir()
    path = folder / file
    path.write_bytes(b"" if damage == "empty" else path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.warns(UserWarning, match="corpus cache .* is incomplete or damaged"):
        again = corpora.load_blocks(spec, tokenizer, 16, cache, progress=False)
    for split in blocks:
        np.testing.assert_array_equal(again[split], blocks[split])
    assert corpora.read_cached_blocks(folder) is not None  # rebuilt intact


@pytest.fixture(scope="module")
def byte_gpt2():
    """A tiny random GPT-2 with the byte-level tokenizer (257 tokens, EOS 256)."""
    from sentcomp.models import gpt2, tokenizers

    config = gpt2.gpt2_config(vocab_size=257, n_embd=16, n_head=2, n_layer=1, n_positions=16)
    return gpt2.init(config, rng=0, tokenizer=tokenizers.byte_tokenizer())


def test_table1_word_columns_on_a_byte_level_model_name_the_columns_to_drop(cli, byte_gpt2, tmp_path):
    from sentcomp import models

    models.save_hf(byte_gpt2, tmp_path / "byte_model")
    line = error_line(cli(f"--config={TABLE1}", f"--workdir={tmp_path / 'run'}",
                          f"--config.model={tmp_path / 'byte_model'}", "--config.columns=('f','subset_logits')",
                          "--config.zeroshot.enabled=False"))
    assert "columns ['subset_logits']" in line and "--config.columns=\"('f',)\"" in line


def test_save_hf_of_gpt2_writes_its_tokenizer_and_its_special_ids(byte_gpt2, tmp_path):
    from sentcomp import models

    models.save_hf(byte_gpt2, tmp_path / "exported")
    saved = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert saved["bos_token_id"] == saved["eos_token_id"] == 256 == byte_gpt2.tokenizer.eos_token_id
    loaded = models.load(str(tmp_path / "exported"))
    assert len(loaded.tokenizer) == 257
    assert loaded.tokenizer("ab é")["input_ids"] == byte_gpt2.tokenizer("ab é")["input_ids"]


@pytest.mark.parametrize("target", ["non_empty", "file", "under_file"])
def test_save_hf_refuses_a_target_that_is_not_new_or_empty(byte_gpt2, tmp_path, target):
    from sentcomp import models

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "vocab.json").write_text("{}")  # another model's tokenizer
    (tmp_path / "f").write_text("")
    directory = {"non_empty": tmp_path / "old", "file": tmp_path / "f", "under_file": tmp_path / "f" / "m"}[target]
    message = {"non_empty": "already holds vocab.json", "file": "it is a file", "under_file": "which is a file"}
    with pytest.raises(SentcompError, match=message[target]):
        models.save_hf(byte_gpt2, directory)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["f", "old"]


@pytest.mark.parametrize("file", ["config.json", "done.json"])
def test_the_report_names_a_record_that_is_json_but_not_an_object(tmp_path, capsys, file):
    from sentcomp import report

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"program": "x"}')
    (run / "done.json").write_text("{}")
    (run / file).write_text("[1, 2]")
    assert report.main([str(run), f"--out={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert f"{run / file} holds a JSON list, expected an object" in err and "Traceback" not in err


@pytest.mark.parametrize("out", ["file", "read_only"])
def test_the_report_names_an_out_folder_it_cannot_write(tmp_path, capsys, monkeypatch, out):
    from sentcomp import report

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"program": "x"}')
    (run / "done.json").write_text('{"accuracy": 0.5}')
    target = tmp_path / "out"
    if out == "file":
        target.write_text("")
    else:
        real_mkdir = Path.mkdir

        def read_only_mkdir(self, *args, **kwargs):
            if self == target:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", read_only_mkdir)
    assert report.main([str(run), f"--out={target}"]) == 2
    err = capsys.readouterr().err
    assert f"Cannot write the report into --out={target}" in err and "Traceback" not in err


# ------------------------------------------------------------------------ 4. faults during long runs


def fail_metadata_writes(monkeypatch, code: int):
    """Orbax's metadata writes (etils paths) fail with ``code``, as a full disk or a revoked permission would."""
    import etils.epath.gpath as gpath

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(gpath._GPath, "write_text", fail)
    monkeypatch.setattr(gpath._GPath, "write_bytes", fail)


STATE = {"w": jnp.arange(4.0), "step": jnp.array(1)}


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES], ids=["no_space", "no_permission"])
def test_a_failed_checkpoint_write_surfaces_at_once_and_keeps_the_last_good_one(tmp_path, monkeypatch, asynchronous,
                                                                                 code):
    manager = checkpoints.checkpoint_manager(tmp_path, 1, 3, asynchronous)
    checkpoints.save_checkpoint(manager, STATE, {"step": 1})
    manager.wait_until_finished()
    with monkeypatch.context() as patch:
        fail_metadata_writes(patch, code)
        with pytest.raises(SentcompError) as error:  # from save itself, or from wait_until_finished when async
            checkpoints.save_checkpoint(manager, {**STATE, "w": STATE["w"] + 1}, {"step": 2})
            manager.wait_until_finished()
        manager.close()  # the disk stays full until every background write has given up; no second error
    cause = {errno.ENOSPC: "no space left on the device", errno.EACCES: "permission denied"}[code]
    assert f"checkpoint of step 2 to {tmp_path / 'checkpoints'} failed: {cause}" in str(error.value)
    assert "last complete checkpoint (step 1) is kept" in str(error.value)
    _, state, meta = checkpoints.resume(tmp_path, STATE, 1, 3)
    assert meta["step"] == 1 and np.array_equal(state["w"], STATE["w"])


def test_the_cli_shows_orbax_background_failures_in_one_line(cli, toy, tmp_path):
    """Orbax logs a failed background write with a traceback per thread; the CLI keeps their message lines (the
    failure itself is the SentcompError above)."""
    ok(cli(f"--config={toy}", f"--workdir={tmp_path / 'run'}"))  # the CLI installs its logging filter
    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:
        exc_info = sys.exc_info()
    records = [logging.LogRecord("absl", logging.ERROR, f"/site-packages/{package}/x.py", 1, "write failed", None,
                                 exc_info) for package in ("orbax", "other")]
    for record in records:
        assert logging.getLogger("absl").filter(record)
    assert records[0].exc_info is None and records[1].exc_info is not None


def test_a_damaged_checkpoint_falls_back_and_other_failures_stop(tmp_path):
    manager = checkpoints.checkpoint_manager(tmp_path, 1, 3, False)
    for step in (1, 2):
        checkpoints.save_checkpoint(manager, {**STATE, "w": STATE["w"] * step}, {"step": step})
    manager.close()
    for path in (tmp_path / "checkpoints" / "2" / "meta").rglob("*"):
        if path.is_file():
            path.write_text("{torn")
    with pytest.warns(UserWarning, match="step 2 .* is damaged"):
        _, state, meta = checkpoints.resume(tmp_path, STATE, 1, 3)
    assert meta["step"] == 1 and (tmp_path / "checkpoints_corrupt").is_dir()
    assert checkpoints.restore_failure(OSError("Permission denied")) == "other"
    assert checkpoints.restore_failure(ValueError("DATA_LOSS: bad bytes")) == "damaged"


def save_series(workdir: Path, steps=(1, 2, 3)) -> dict:
    """Checkpoints of a state with an incompressible 512×512 array (its data in a file of its own under
    ``state/d/``) at ``steps``; returns the state saved at each step."""
    import jax

    manager = checkpoints.checkpoint_manager(workdir, 1, len(steps), False)
    states = {}
    for step in steps:
        states[step] = {"w": jax.random.normal(jax.random.key(step), (512, 512)), "step": jnp.array(step)}
        checkpoints.save_checkpoint(manager, states[step], {"step": step})
    manager.close()
    return states


def damage_array_data(step_dir: Path, damage: str) -> Path:
    """Damages the largest array-data file of a checkpoint step as a full disk, a killed copy or a bad sector
    would; returns it."""
    data = max((path for path in step_dir.rglob("*") if path.is_file() and path.parent.name == "d"),
               key=lambda path: path.stat().st_size)
    content = data.read_bytes()
    middle = len(content) // 2
    data.write_bytes({"emptied": b"", "truncated": content[:middle],
                      "bit_flip": content[:middle] + bytes([content[middle] ^ 1]) + content[middle + 1:]}[damage])
    return data


@pytest.fixture
def unraisable(monkeypatch):
    """The exceptions Python reports as "Exception ignored in ..." (e.g. failed coroutines nobody awaited)."""
    reports = []
    monkeypatch.setattr(sys, "unraisablehook", reports.append)
    return reports


@pytest.mark.parametrize("damage", ["emptied", "truncated", "bit_flip"])
def test_damaged_array_data_falls_back_to_the_newest_good_checkpoint(tmp_path, damage, unraisable):
    states = save_series(tmp_path)
    damaged = damage_array_data(tmp_path / "checkpoints" / "3", damage)
    with pytest.warns(UserWarning, match="step 3 .* is damaged") as caught:
        _, state, meta = checkpoints.resume(tmp_path, states[1], 1, 3)
    assert meta["step"] == 2 and np.array_equal(np.asarray(state["w"]), np.asarray(states[2]["w"]))
    if damage == "bit_flip":  # Orbax reads these bytes without complaint: the checksum recorded at commit tells
        assert str(damaged.relative_to(tmp_path / "checkpoints" / "3")) in str(caught[0].message)
    assert sorted(path.name.split("-")[0] for path in (tmp_path / "checkpoints_corrupt").iterdir()) == ["3"]
    assert unraisable == []  # no "Exception ignored in <coroutine ...>" tracebacks


def test_with_no_good_checkpoint_training_restarts_from_step_0_with_a_warning(tmp_path, unraisable):
    states = save_series(tmp_path, steps=(1, 2))
    for step in (1, 2):
        damage_array_data(tmp_path / "checkpoints" / str(step), "truncated")
    with pytest.warns(UserWarning, match="No intact checkpoint is left .* restarts from step 0"):
        _, state, meta = checkpoints.resume(tmp_path, states[1], 1, 2)
    assert meta is None and state is states[1]
    assert unraisable == []


TOY_TRAINING_PROGRAM = '''
"""A toy training program: a state of config.size numbers, resumed when present; each run adds a checkpoint."""
import jax.numpy as jnp

from sentcomp.training import checkpoints


def check_config(config):
    pass


def run(config, workdir):
    state = {"w": jnp.zeros(config.size), "step": jnp.array(0)}
    settings = {"settings": checkpoints.resume_settings(config)}
    manager, state, meta = checkpoints.resume(workdir, state, 1, 2, expected=settings,
                                           may_change=config.get("resume_may_change", ()))
    step = 1 if meta is None else meta["step"] + 1  # every run trains one more step
    checkpoints.save_checkpoint(manager, state, {"step": step, **settings})
    manager.close()
    return {"size": config.size, "note": config.note}
'''


def test_a_refused_resume_leaves_a_finished_run_as_it_was(cli, toy, tmp_path):
    """A checkpoint the new config cannot continue (here: another state shape) stops the run before it changed
    anything: done.json, config.json and runs.jsonl stay as they were, and the original command still works."""
    (toy.parent / "sentcomp_faults_training.py").write_text(TOY_TRAINING_PROGRAM)
    workdir = tmp_path / "run"
    program = "--config.program=sentcomp_faults_training"
    ok(cli(f"--config={toy}", f"--workdir={workdir}", program))
    record = {name: (workdir / name).read_bytes() for name in ("done.json", "config.json", "runs.jsonl")}
    line = error_line(cli(f"--config={toy}", f"--workdir={workdir}", program, "--config.size=5",
                          "--resume_may_change=size"))
    assert "Cannot restore the checkpoint at step 1" in line
    assert {name: (workdir / name).read_bytes() for name in record} == record
    ok(cli(f"--config={toy}", f"--workdir={workdir}", program))


def test_resume_may_change_lets_a_finished_training_run_continue_under_the_changed_key(cli, toy, tmp_path):
    """Keys the user may change are compared only when not listed: a finished run continues with a changed key it
    lists, a listed key left unchanged is no change at all, and the command that wrote it still resumes it."""
    (toy.parent / "sentcomp_faults_training.py").write_text(TOY_TRAINING_PROGRAM)
    workdir = tmp_path / "run"
    program = "--config.program=sentcomp_faults_training"
    ok(cli(f"--config={toy}", f"--workdir={workdir}", program))
    ok(cli(f"--config={toy}", f"--workdir={workdir}", program, "--resume_may_change=fail"))
    ok(cli(f"--config={toy}", f"--workdir={workdir}", program, "--config.note=longer", "--resume_may_change=note"))
    assert runner.read_done(workdir) == {"size": 3, "note": "longer"}
    ok(cli(f"--config={toy}", f"--workdir={workdir}", program, "--config.note=longer"))


def test_checkpoint_settings_are_compared_key_by_key_except_the_listed_ones(toy):
    config = runner.config_files.load_config(str(toy))
    recorded = checkpoints.resume_settings(config)
    assert checkpoints.settings_differences(recorded, {**recorded, "size": 9}, ()) == ["size: 3 -> 9"]
    assert checkpoints.settings_differences(recorded, {**recorded, "size": 9}, ("size",)) == []
    # a checkpoint written before settings were recorded key by key holds their fingerprint
    fingerprint = storage.settings_fingerprint(config.to_dict(), ignore=("resume_may_change", *layout.EXECUTION_KEYS))
    assert checkpoints.settings_differences(fingerprint, recorded, ()) == []
    assert checkpoints.settings_differences(fingerprint, {**recorded, "size": 9}, ()) != []


# ------------------------------------------------------------------------ 5. quiet data damage

CSV_CASES = {
    "unbalanced_quote_merges_records": ('text,label\n"Great film,1\nBad film,0\nnext",1\nok,0\n',
                                        "line 2: one quoted field runs over 3 lines"),
    "quote_closed_on_the_next_line": ('text,label\n"Great film,1\nBad film",0\nok,0\n',
                                      "line 2: one quoted field runs over 2 lines"),
    "unclosed_quote_at_end": ('text,label\nok,0\n"unclosed,1\nmore,0\n', "line 3: malformed CSV"),
    "text_after_closing_quote": ('text,label\n"a"b,1\n', "line 2: malformed CSV"),
}


@pytest.mark.parametrize("case", CSV_CASES)
def test_a_malformed_csv_quote_names_its_line(tmp_path, case):
    text, message = CSV_CASES[case]
    (tmp_path / "data.csv").write_text(text)
    with pytest.raises(SentcompError, match=message):
        loaders.read_csv(tmp_path / "data.csv", ["neg", "pos"])


def test_a_quoted_multi_line_text_is_read_whole(tmp_path):
    (tmp_path / "data.csv").write_text('text,label\n"First.\nSecond, really.\nThird ""quoted""",1\nok,0\n')
    split = loaders.read_csv(tmp_path / "data.csv", ["neg", "pos"])
    assert split.texts == ['First.\nSecond, really.\nThird "quoted"', "ok"] and list(split.labels) == [1, 0]


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_written_files_get_mode_0644(tmp_path, umask_022):
    storage.write_json(tmp_path / "a.json", {"a": 1})
    storage.save_npy(tmp_path / "b.npy", np.zeros(2))
    storage.copy_file(tmp_path / "a.json", tmp_path / "c.json")
    store = features._ChunkStore(tmp_path / "features", MANIFEST)
    store.put("f", 0, np.zeros((2, 2), np.float32))
    written = [tmp_path / "a.json", tmp_path / "b.npy", tmp_path / "c.json", *(tmp_path / "features").iterdir()]
    assert {path.name: oct(path.stat().st_mode & 0o777) for path in written} == {
        path.name: "0o644" for path in written}


def test_the_tokenizer_cache_gets_mode_0644(tmp_path, umask_022):
    from sentcomp.models import tokenizers

    folder = tokenizers.gpt2_tokenizer_dir(tmp_path)
    assert {oct(path.stat().st_mode & 0o777) for path in folder.iterdir()} == {"0o644"}


def test_writes_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    storage.write_json(tmp_path / "a.json", {"a": 1})
    storage.save_npy(tmp_path / "b.npy", np.zeros(2))
    assert events == ["fsync", "replace", "fsync", "replace"]
