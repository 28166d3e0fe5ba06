"""experiments/quad_vs_xent.py and the composed configs it is built on (sentcomp.launcher.stages).

The smoke experiment runs once (the session's ``smoke_workdir``); the launcher's own behaviour (order, resume,
failures, stage references, sweeps) is checked on a composed config of a toy program written here, which runs in
milliseconds.
"""

import hashlib
import json
import textwrap

import ml_collections
import numpy as np
import pytest

from sentcomp import models
from sentcomp.errors import SentcompError
from sentcomp.launcher import config_files, runner, stages, sweep_runner
from sentcomp.programs import compare_pretraining

LOSSES = ("xent", "quad")


@pytest.fixture(scope="module")
def smoke(smoke_workdir):
    return smoke_workdir("quad_vs_xent")


def read_json(path):
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------- the smoke run


def test_smoke_run_compares_both_losses(smoke):
    results = read_json(smoke / "compare" / "results.json")
    assert list(results["models"]) == list(LOSSES)
    done = read_json(smoke / "done.json")  # the composed run's headline is its last stage's
    assert done == read_json(smoke / "compare" / "done.json")
    markdown = (smoke / "compare" / "results.md").read_text()
    for loss in LOSSES:
        pretrain = read_json(smoke / f"pretrain_{loss}" / "results.json")
        table1 = read_json(smoke / f"table1_{loss}" / "results.json")
        assert pretrain["loss"] == loss
        assert table1["model"] == str((smoke / f"pretrain_{loss}").resolve())  # the reference, resolved
        for row in ("rotten_tomatoes", "rotten_tomatoes*"):
            for column in ("f", "phi_p_f"):
                assert done[f"{loss}/{row}/{column}"] == table1["table"][row][column]["mean"]
                assert 0.0 <= done[f"{loss}/{row}/{column}"] <= 1.0
        assert done[f"{loss}/val_loss"] == pretrain[f"val_{loss}"]
        assert done[f"{loss}/val_xent"] == pretrain["val_xent"] and done[f"{loss}/val_quad"] == pretrain["val_quad"]
        assert done[f"{loss}/tokens_per_s"] > 0
        for column, title in (("f", "f(s)"), ("phi_p_f", "Φp_f(s)")):
            mark = " †" if loss == "quad" and column != "f" else ""  # not the paper's feature for a Quad model
            cells = [f"{100 * table1['table'][row][column]['mean']:.1f}" for row in ("rotten_tomatoes",
                                                                                   "rotten_tomatoes*")]
            assert f"| {loss} | {title}{mark} | {' | '.join(cells)} | {pretrain['val_xent']:.3f} |" in markdown
    for figure in ("accuracy_vs_tokens.png", "accuracy_vs_val_xent.png"):
        assert (smoke / "compare" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def reference_stream_digest(blocks: np.ndarray, steps: int, batch: int, seed: int) -> str:
    """The documented data order, written out independently: stream position n reads block perm_e[n mod N],
    e = n // N, perm_e = default_rng((seed, e)).permutation(N); the digest hashes those blocks' int32 ids."""
    n = len(blocks)
    positions = np.arange(steps * batch)
    order = np.concatenate([np.random.default_rng((seed, epoch)).permutation(n)
                            for epoch in range(positions[-1] // n + 1)])[positions]
    return hashlib.sha256(np.ascontiguousarray(blocks[order], np.int32).tobytes()).hexdigest()


def test_both_losses_read_identical_token_streams(smoke):
    configs = {loss: read_json(smoke / f"pretrain_{loss}" / "config.json") for loss in LOSSES}
    assert config_files.config_diff(configs["xent"], configs["quad"]) == ["loss: 'xent' -> 'quad'"]
    corpora = {loss: np.load(next((smoke / f"pretrain_{loss}" / "corpus").glob("*/train.npy"))) for loss in LOSSES}
    np.testing.assert_array_equal(corpora["xent"], corpora["quad"])  # each stage tokenised the corpus itself
    digests = set()
    for loss in LOSSES:
        config, results = configs[loss], read_json(smoke / f"pretrain_{loss}" / "results.json")
        assert results["steps"] == config["num_steps"]
        expected = reference_stream_digest(corpora[loss], config["num_steps"], config["batch_size"],
                                           config["data"]["seed"])
        assert results["data_stream_sha256"] == expected
        digests.add(expected)
    assert len(digests) == 1
    done = read_json(smoke / "done.json")
    assert done["same_token_stream"] is True and done["same_pretraining_config"] is True


def test_comparison_flags_runs_that_differ_in_more_than_the_loss():
    records = [{"pretrain_config": {"loss": loss, "model": {"n_embd": width}}, "data_stream_sha256": digest}
               for loss, width, digest in (("xent", 64, "a"), ("quad", 128, "a"))]
    assert compare_pretraining.config_differences(records) == ["model.n_embd"]
    assert compare_pretraining.same_stream(records)
    records[1]["data_stream_sha256"] = None  # a run that recorded no digest proves nothing
    assert not compare_pretraining.same_stream(records)


def test_throughput_leaves_out_the_first_window_which_includes_compilation():
    rows = [{"step": 10, "tokens": 100, "tokens_per_s": 1.0}, {"step": 20, "tokens": 200, "tokens_per_s": 10.0},
            {"step": 30, "tokens": 400, "tokens_per_s": 40.0}]
    assert compare_pretraining.training_throughput(rows) == pytest.approx(300 / (100 / 10 + 200 / 40))
    assert compare_pretraining.training_throughput(rows[:1]) == 1.0


def test_table1_stage_loads_the_pretraining_run_quad_head_included(smoke):
    quad = models.load(str(smoke / "pretrain_quad"))
    assert quad.config.quad_head and not quad.config.tie_word_embeddings
    direct = models.load(str(smoke / "pretrain_quad" / "model"))
    for key in ("quad_head", "phi"):
        assert key in quad.params
    for ours, theirs in zip(jax_leaves(quad.params), jax_leaves(direct.params)):
        np.testing.assert_array_equal(ours, theirs)
    # the head is trained, not a fresh identity
    assert not np.allclose(np.asarray(quad.params["quad_head"]["kernel"]), np.eye(quad.config.n_embd))


def jax_leaves(tree):
    import jax

    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def test_killed_run_resumes_without_redoing_finished_stages(smoke):
    """A run stopped during table1_quad: the stages before it are not run again, the rest are."""
    config = config_files.load_config(f"{config_files.EXPERIMENTS_DIR / 'quad_vs_xent'}.py:smoke")
    finished = ("pretrain_xent", "pretrain_quad", "table1_xent")
    mtimes = {name: (smoke / name / "done.json").stat().st_mtime_ns for name in finished}
    starts = {name: len((smoke / name / "runs.jsonl").read_text().splitlines()) for name in (*finished, "table1_quad")}
    (smoke / "table1_quad" / "done.json").unlink()
    (smoke / "compare" / "done.json").unlink()
    (smoke / "done.json").unlink()
    assert runner.stages_complete(config, smoke) == [True, True, True, False, False]
    runner.run_program(config, smoke)
    for name in finished:
        assert (smoke / name / "done.json").stat().st_mtime_ns == mtimes[name]
        assert len((smoke / name / "runs.jsonl").read_text().splitlines()) == starts[name]
    assert len((smoke / "table1_quad" / "runs.jsonl").read_text().splitlines()) == starts["table1_quad"] + 1
    assert runner.stages_complete(config, smoke) == [True] * 5 and runner.read_done(smoke) is not None


# -------------------------------------------------------------------- composed configs on a toy program

TOY_PROGRAM = textwrap.dedent('''
    """A toy program: records its config's ``value`` and, when ``read`` names a file, that file's text."""
    import json
    from pathlib import Path

    def run(config, workdir):
        if config.fail_flag and Path(config.fail_flag).exists():
            raise RuntimeError("toy failure")
        read = Path(config.read).read_text() if config.read else ""
        (Path(workdir) / "out.txt").write_text(f"{config.value}")
        return {"value": config.value, "read": read, "read_path": config.read}
''')


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy program importable as ``toy_stage_program``; returns a composed config of three stages."""
    (tmp_path / "toy_stage_program.py").write_text(TOY_PROGRAM)
    monkeypatch.syspath_prepend(str(tmp_path))

    def composed(**references):
        config = ml_collections.ConfigDict()
        config.value = 1.0
        config.stages = ml_collections.ConfigDict()
        for name in ("first", "second", "third"):
            config.stages[name] = ml_collections.ConfigDict(dict(
                program="toy_stage_program", value=config.get_ref("value"), read=references.get(name, ""),
                fail_flag=str(tmp_path / f"fail_{name}")))
        config.stage_order = ("first", "second", "third")
        return config

    return composed


def test_stages_run_in_order_with_references_resolved(toy, tmp_path):
    workdir = tmp_path / "run"
    runner.run_program(toy(second="stage:first/out.txt", third="stage:second/out.txt"), workdir)
    second = read_json(workdir / "second" / "done.json")
    assert second["read_path"] == str(workdir.resolve() / "first" / "out.txt") and second["read"] == "1.0"
    assert read_json(workdir / "third" / "done.json")["read"] == "1.0"  # second had written its out.txt
    assert read_json(workdir / "done.json") == read_json(workdir / "third" / "done.json")


def test_failed_stage_resumes_from_where_it_stopped(toy, tmp_path):
    workdir = tmp_path / "run"
    (tmp_path / "fail_second").touch()
    with pytest.raises(RuntimeError, match="toy failure"):
        runner.run_program(toy(), workdir)
    assert runner.read_done(workdir / "first") is not None and runner.read_done(workdir / "second") is None
    assert not (workdir / "third").exists() and runner.read_done(workdir) is None
    first_done = (workdir / "first" / "done.json").stat().st_mtime_ns
    (tmp_path / "fail_second").unlink()
    runner.run_program(toy(), workdir)
    assert (workdir / "first" / "done.json").stat().st_mtime_ns == first_done
    assert len((workdir / "first" / "runs.jsonl").read_text().splitlines()) == 1
    assert len((workdir / "second" / "runs.jsonl").read_text().splitlines()) == 2
    assert runner.read_done(workdir / "third") == {"value": 1.0, "read": "", "read_path": ""}


@pytest.mark.parametrize("references, message", [
    (dict(second="stage:third"), "refers to stage 'third', which is this stage or runs after it"),
    (dict(second="stage:second/out.txt"), "refers to stage 'second', which is this stage or runs after it"),
    (dict(first="stage:second"), "none (this is the first stage)"),
    (dict(third="stage:fourth"), "refers to stage 'fourth', which is not a stage of this config"),
    (dict(third="stage:first/../second"), "must stay inside that stage's workdir"),
])
def test_bad_references_are_refused_before_any_stage_runs(toy, tmp_path, references, message):
    workdir = tmp_path / "run"
    with pytest.raises(SentcompError, match=message.replace("(", r"\(").replace(")", r"\)")):
        runner.run_program(toy(**references), workdir)
    assert not workdir.exists()


def test_reference_inside_a_tuple_is_resolved(tmp_path):
    stage = ml_collections.ConfigDict(dict(program="x", runs=("stage:a", "plain", "stage:a/model")))
    resolved = stages.resolve_references(stage, "stages.b", tmp_path, ["a"], ["b"])
    assert resolved.runs == (str(tmp_path / "a"), "plain", str(tmp_path / "a" / "model"))
    assert stage.runs[0] == "stage:a"  # the composed config itself is left as written


def test_stage_order_must_list_every_stage_once(toy, tmp_path):
    config = toy()
    config.stage_order = ("first", "third")
    with pytest.raises(SentcompError, match="must list every stage of config.stages exactly once"):
        runner.validate(config, tmp_path)
    config = toy()
    config.program = "toy_stage_program"
    with pytest.raises(SentcompError, match="must not also name a 'program'"):
        runner.validate(config, tmp_path)


@pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read_only"])
def test_a_moved_experiment_resumes_and_reprints(toy, tmp_path, monkeypatch, capsys, read_only):
    """Stage records keep their references as written ("stage:first/out.txt"), not the absolute paths they
    resolved to: a renamed (or copied, or archived read-only) experiment still matches them."""
    references = dict(second="stage:first/out.txt")
    runner.run_program(toy(**references), tmp_path / "run")
    assert read_json(tmp_path / "run" / "second" / "config.json")["read"] == "stage:first/out.txt"
    (tmp_path / "run").rename(tmp_path / "moved")
    moved = tmp_path / "moved"
    (moved / "third" / "done.json").unlink()  # the last stage is to run again, reading the moved first stage
    if read_only:
        monkeypatch.setattr(runner, "writable", lambda workdir: False)
        capsys.readouterr()
        assert runner.run_program(toy(**references), moved)["value"] == 1.0
        assert "holds a complete run and cannot be written" in capsys.readouterr().out
        return
    runner.run_program(toy(**references), moved)
    assert len((moved / "second" / "runs.jsonl").read_text().splitlines()) == 1  # complete: skipped
    assert runner.read_done(moved / "third") == {"value": 1.0, "read": "", "read_path": ""}


def test_a_stage_that_failed_at_start_is_replaced_by_the_corrected_config(toy, tmp_path):
    """The failed first stage left only its record (config.json, runs.jsonl, .lock): neither it nor the composed
    workdir holds results, so the corrected command takes both over."""
    workdir = tmp_path / "run"
    (tmp_path / "fail_first").touch()
    with pytest.raises(RuntimeError, match="toy failure"):
        runner.run_program(toy(), workdir)
    (tmp_path / "fail_first").unlink()
    corrected = toy()
    corrected.value = 2.0
    with pytest.warns(UserWarning, match="produced no results"):
        runner.run_program(corrected, workdir)
    assert runner.read_done(workdir)["value"] == 2.0


def test_changed_stage_config_is_refused_on_resume(toy, tmp_path):
    runner.run_program(toy(), tmp_path / "run")
    config = toy()
    config.stages.second.read = "stage:first/out.txt"
    with pytest.raises(SentcompError, match="already holds a run with a different config"):
        runner.run_program(config, tmp_path / "run")


def test_sweep_of_composed_configs_names_the_best_point_per_label(toy, tmp_path):
    config = toy()
    config.sweep_selection = ml_collections.ConfigDict({"lowest": "value"})
    points = [{"value": 3.0}, {"value": 2.0}, {"value": 5.0}]
    rows = sweep_runner.run_sweep(config, points, tmp_path / "sweep")
    assert [row["status"] for row in rows] == ["done"] * 3
    assert read_json(tmp_path / "sweep" / "value=2.0" / "third" / "done.json")["value"] == 2.0  # linked field
    selected = read_json(tmp_path / "sweep" / "sweep.json")["selected"]
    assert selected == {"lowest": {"metric": "value", "point": "value=2.0", "value": 2.0}}
    assert "| lowest | value | value=2.0 | 2 |" in (tmp_path / "sweep" / "sweep.md").read_text()


def test_dry_run_description_lists_stages_and_their_state(toy, tmp_path):
    config = toy()
    runner.run_program(toy(), tmp_path / "run")
    (tmp_path / "run" / "third" / "done.json").unlink()
    text = stages.describe(config, tmp_path / "run", runner.stages_complete(config, tmp_path / "run"))
    lines = text.splitlines()
    assert [line.split()[2] for line in lines] == ["first", "second", "third"]
    assert lines[0].endswith("complete (skipped)") and lines[2].endswith("to run")
