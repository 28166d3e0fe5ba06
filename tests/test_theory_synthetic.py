"""The theory experiment end to end (smoke-sized): record files, mathematical invariants, consistency."""

import json

import numpy as np
import pytest

from sentcomp.errors import SentcompError
from sentcomp.launcher import runner
from sentcomp.launcher.config_files import EXPERIMENTS_DIR, load_config, override
from sentcomp.programs import theory_synthetic

SMOKE = f"{EXPERIMENTS_DIR / 'theory_synthetic.py'}:smoke"


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(smoke_workdir):
    workdir = smoke_workdir("theory_synthetic")
    return workdir, runner.read_done(workdir)


def test_record_files_and_consistency(finished):
    workdir, headline = finished
    for name in ("config.json", "done.json", "results.json", "results.md", "loss_vs_sqrt_epsilon.png",
                 "epsilon_over_training.png"):
        assert (workdir / name).stat().st_size > 0, name
    results = json.loads((workdir / "results.json").read_text())
    config = load_config(SMOKE)
    steps = theory_synthetic.evaluation_steps(config.num_steps, config.evaluation.num_checkpoints)
    for loss in ("xent", "quad"):
        lines = read_lines(workdir / loss / "metrics.jsonl")
        assert [row["step"] for row in lines] == steps
        assert results["models"][loss] == lines
        recomputed = theory_synthetic.verdict(lines, loss)
        assert results["verdict"][loss] == pytest.approx(recomputed, nan_ok=True)
        kind = theory_synthetic.HEADLINE_KIND[loss]
        violations = sum(row["features"][kind]["plug_in"] > row["features"][kind]["bound"] + 1e-6 for row in lines)
        assert results["verdict"][loss]["violations"] == violations  # reported, whatever its value
        assert headline[f"{loss}_always_under_bound"] == (violations == 0)
        assert headline[f"{loss}_epsilon"] == pytest.approx(theory_synthetic.headline_epsilon(lines[-1], loss))
    table = (workdir / "results.md").read_text()
    assert table.count("\n| xent |") == 3 and table.count("\n| quad |") == 3
    assert all(line in table for line in results["verdict_lines"])
    assert results["probe_cv_metric"] == "loss" and "C picked by cross-validated logistic loss" in table
    assert "C picked by cross-validated accuracy" not in table  # what it said whatever the config chose


def test_mathematical_invariants(finished):
    workdir, _ = finished
    results = json.loads((workdir / "results.json").read_text())
    assert results["gamma"] == pytest.approx(1 / 5)
    for rows in results["models"].values():
        for row in rows:
            for name in ("epsilon", "excess_quad", "epsilon_task"):
                estimate = row[name]
                assert estimate["mean"] >= -1e-6 and estimate["low"] <= estimate["mean"] <= estimate["high"]
            for kind in theory_synthetic.FEATURE_KINDS:
                entry = row["features"][kind]
                assert entry["bound"] >= entry["tau"] - 1e-12  # τ + a non-negative term
                assert 0.0 <= entry["probe"]["accuracy"] <= 1.0
            # B = 0 is on the box grid: the constant classifier's log 2 is always an available bound
            assert row["features"]["p_f"]["bound"] <= np.log(2) + 1e-9
    curve = results["bound_curve_p_f"]
    assert curve["epsilon"][0] == 0.0 and curve["bound"][0] == pytest.approx(results["tau"]["box"])
    assert np.all(np.diff(curve["bound"]) >= -1e-12) and max(curve["bound"]) <= np.log(2) + 1e-9
    for row in results["models"]["xent"]:  # the curve is the same (monotone) bound as each checkpoint's p_f bound
        right = int(np.searchsorted(curve["epsilon"], row["epsilon"]["mean"]))
        assert curve["bound"][right - 1] - 1e-9 <= row["features"]["p_f"]["bound"] <= curve["bound"][right] + 1e-9
    xent = results["models"]["xent"]
    assert xent[-1]["epsilon"]["mean"] < xent[0]["epsilon"]["mean"]  # training lowers the KL to p*


def test_rerun_resumes_without_recomputing(finished):
    workdir, headline = finished
    before = {loss: (workdir / loss / "metrics.jsonl").read_text() for loss in ("xent", "quad")}
    assert runner.run_program(load_config(SMOKE), workdir) == pytest.approx(headline)
    assert {loss: (workdir / loss / "metrics.jsonl").read_text() for loss in ("xent", "quad")} == before


def test_bad_config(tmp_path):
    with pytest.raises(SentcompError, match="losses"):
        theory_synthetic.run(override(load_config(SMOKE), {"losses": ("mse",)}), tmp_path)
    steps = theory_synthetic.evaluation_steps(1500, 6)
    assert steps == sorted(set(steps)) and len(steps) == 6 and steps[-1] == 1500
    with pytest.raises(SentcompError, match="num_checkpoints"):
        theory_synthetic.evaluation_steps(3, 5)
