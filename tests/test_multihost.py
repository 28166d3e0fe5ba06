"""JAX's multi-process runtime for real on one machine: 2 processes × 4 CPU devices (gloo collectives on
localhost) run a program through the CLI and get the numbers 1 process × 8 devices gets.

``run_processes`` (on :func:`sentcomp.launcher.local_cluster.run_local_processes`) launches any config this way, so
other programs (e.g. pretraining) add a test in a few lines.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sentcomp import parallel
from sentcomp.errors import SentcompError
from sentcomp.launcher.config_files import EXPERIMENTS_DIR, load_config, override
from sentcomp.launcher.local_cluster import run_local_processes, with_device_count
from sentcomp.main import run_program

pytestmark = pytest.mark.multiprocess

TIMEOUT_SECONDS = 240


def run_processes(config_spec: str, workdir: Path, extra_flags=(), timeout: float = TIMEOUT_SECONDS) -> None:
    """Runs the config as 2 processes × 4 CPU devices; fails with their logs unless both succeed in time."""
    log_dir = workdir.parent / f"{workdir.name}.logs"
    main_args = [f"--config={config_spec}", f"--workdir={workdir}", *extra_flags]
    codes = run_local_processes(main_args, log_dir, processes=2, devices=4, timeout=timeout)
    if codes != [0, 0]:
        tails = "\n".join(f"--- process {i} (exit {code}):\n{(log_dir / f'process{i}.log').read_text()[-3000:]}"
                          for i, code in enumerate(codes))
        raise AssertionError(f"multi-process run failed (negative exit: killed at the {timeout}s timeout):\n"
                             f"{tails}")


MULTIHOST = f"{EXPERIMENTS_DIR}/device_check.py:smoke,only=multihost"  # device_check's multi-host group


def check_values(results: dict) -> dict[str, float]:
    """Each row's value by name, from a device check's results.json."""
    return {row["name"]: row["value"] for row in results["checks"]}


def test_two_processes_sweep_together_and_each_point_matches_one_process(tmp_path):
    """The check's sweep run by 2 processes × 4 devices together; then each point again by one process × 8
    devices (this pytest process), resuming from a copy of the point's 2-process workdir: it recomputes
    everything and restores the Orbax checkpoint the two processes wrote together, and gets their numbers. A
    second sweep reuses every complete point."""
    spec = MULTIHOST
    run_processes(spec, tmp_path, extra_flags=["--sweep"])
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert [(row["name"], row["status"], row["metrics"]["process_count"]) for row in rows] == [
        ("seed=0", "done", 2),
        ("seed=1", "done", 2),
    ]
    for row in rows:
        two = tmp_path / row["name"]
        two_results = json.loads((two / "results.json").read_text())
        assert (two_results["process_count"], two_results["device_count"]) == (2, 8)
        assert two_results["passed"] and check_values(two_results)["multihost checkpoint"] == 0.0
        with np.load(two / "multihost_arrays.npz") as arrays:
            two_arrays = dict(arrays)
        one = tmp_path / "one_process" / row["name"]
        shutil.copytree(two, one)
        one_results = run_program(override(load_config(spec), row["params"]), one)
        assert (one_results["process_count"], one_results["device_count"]) == (1, 8)
        with np.load(one / "multihost_arrays.npz") as arrays:
            for name, value in arrays.items():
                np.testing.assert_allclose(two_arrays[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
        assert one_results["multihost checkpoint"] < 1e-6  # restored 2-process values vs 1-process values
        loss = one_results["multihost loss"]
        assert abs(loss - row["metrics"]["multihost loss"]) < 1e-5 * loss
        assert two_arrays["grad_phi"].any() and two_arrays["features"].shape == (16, 16)
        assert two_arrays["extracted_f"].shape == (16, 32) and two_arrays["extracted_word_log_probs"].shape == (16, 3)
    run_processes(spec, tmp_path, extra_flags=["--sweep"])  # complete points: every process skips them
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert [row["status"] for row in rows] == ["reused", "reused"]


def test_processes_are_killed_at_the_timeout(tmp_path):
    main_args = [f"--config={MULTIHOST}", f"--workdir={tmp_path / 'run'}"]
    codes = run_local_processes(main_args, tmp_path / "logs", processes=2, devices=4, timeout=0.5)
    assert all(code is not None and code < 0 for code in codes)  # killed by a signal, not left running


def test_local_processes_keep_the_callers_other_xla_flags():
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    assert with_device_count(flags, 4) == "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=4"
    assert with_device_count("", 2) == "--xla_force_host_platform_device_count=2"


def test_single_process_helpers(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert parallel.initialize_distributed() is False  # nothing asked: a no-op
    assert parallel.initialize_distributed("localhost:1234", num_processes=1, process_id=0) is False
    with pytest.raises(SentcompError, match="--num_processes and --process_id"):
        parallel.initialize_distributed("localhost:1234", num_processes=2)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(SentcompError, match=r"process_id must be in \[0, 2\), got 2"):
        parallel.initialize_distributed("localhost:1234")

    mesh = parallel.data_mesh()
    rows = np.arange(32, dtype=np.float32).reshape(16, 2)
    assert (parallel.host_row_indices(16, mesh) == np.arange(16)).all()
    batch = parallel.global_batch({"x": rows[parallel.host_row_indices(16, mesh)]}, mesh)
    assert batch["x"].sharding == parallel.batch_sharding(mesh)
    np.testing.assert_array_equal(parallel.fetch(batch)["x"], rows)
    with pytest.raises(SentcompError, match="does not split over 8 devices"):
        parallel.host_row_indices(12, mesh)


def test_two_processes_pretrain_like_one_process(tmp_path):
    """Pretraining smoke (per-host data, Orbax checkpoints written by both processes) with FSDP: 2 processes × 4
    devices on a data 2 × fsdp 4 mesh (parameters and optimiser state sharded within each process) end with the
    parameters of 1 process × 8 devices on a data 1 × fsdp 8 mesh, which also runs the downstream probe on its
    sharded weights."""
    from safetensors.numpy import load_file

    spec = f"{EXPERIMENTS_DIR}/pretrain.py:smoke"
    short = {"num_steps": 4, "eval_every": 2, "checkpoint.every": 2, "probe.every": 0, "progress": False}
    two = tmp_path / "two_processes"
    run_processes(spec, two, extra_flags=[f"--config.{key}={value}" for key, value in short.items()]
                  + ["--config.mesh.fsdp=4"])
    assert json.loads((two / "config.json").read_text())["mesh"] == {"data": -1, "fsdp": 4}
    one = tmp_path / "one_process"
    probe = {"mesh.fsdp": 8, "probe.every": 4, "probe.num_train": 40, "probe.num_test": 20}
    one_results = run_program(override(load_config(spec), {**short, **probe}), one)
    assert 0 <= one_results["probe_f"] <= 1

    two_results = json.loads((two / "results.json").read_text())
    assert two_results["train_loss"] == pytest.approx(one_results["train_loss"], rel=1e-5)
    assert two_results["val_xent"] == pytest.approx(one_results["val_xent"], rel=1e-5)
    assert (sorted(p.name for p in (two / "checkpoints").iterdir())
            == sorted(p.name for p in (one / "checkpoints").iterdir()))
    two_params, one_params = (load_file(two / "model" / "model.safetensors"),
                              load_file(one / "model" / "model.safetensors"))
    assert two_params.keys() == one_params.keys()
    for name in one_params:
        np.testing.assert_allclose(two_params[name], one_params[name], rtol=1e-4, atol=1e-5, err_msg=name)


def _prompt_row_artifacts(workdir: Path) -> list[Path]:
    """The cached features (LM and BERT) and the fine-tuning run of the prompt row (``task*``) of a Table-1
    workdir."""
    features = workdir / "features"
    lm = [path.parent for path in features.glob("*/manifest.json") if json.loads(path.read_text())["prompt"]]
    bert = [key for key in features.glob("bert-*.json") if json.loads(key.read_text())["prompt"]]
    return [*lm, *bert, *(key.with_suffix(".npy") for key in bert), *(workdir / "finetune").glob("*[*]-*")]


def _feature_arrays(workdir: Path) -> dict[str, np.ndarray]:
    return {str(path.relative_to(workdir)): np.load(path) for path in (workdir / "features").rglob("*.npy")}


def test_table1_with_baselines_resumed_on_two_processes_matches_one_process(tmp_path):
    """``table1.py:smoke,bert,ft``: one process × 8 devices runs it all; a copy with the prompt row's cells, cached
    features (LM and BERT) and fine-tuning run removed is resumed by 2 processes × 4 devices. Process 0 alone
    decides what is done (the text-only row is reused, not recomputed) and alone writes; the recomputed features,
    fine-tuning curve and accuracies equal the single process's."""
    spec = f"{EXPERIMENTS_DIR}/table1.py:smoke,bert,ft"
    # the decisions, not the probes; of zero-shot, the headline variant (its cell's accuracy is compared)
    smaller = {"n_train": 24, "n_test": 12, "ft.num_epochs": 2, "columns": ("f",), "zeroshot.shots": (0,),
               "zeroshot.sensitivity_shots": ()}
    one = tmp_path / "one_process"
    run_program(override(load_config(spec), smaller), one)
    two = tmp_path / "two_processes"
    shutil.copytree(one, two)
    removed = _prompt_row_artifacts(two)
    assert len(removed) == 4  # the LM features, BERT features and their key file, and the fine-tuning run
    for path in removed:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    kept = [line for line in (two / "cells.jsonl").read_text().splitlines() if "rotten_tomatoes*" not in line]
    (two / "cells.jsonl").write_text("\n".join(kept) + "\n")
    (two / "done.json").unlink()

    run_processes(spec, two, extra_flags=[f"--config.{key}={value}" for key, value in smaller.items()], timeout=900)

    cells = [json.loads(line) for line in (two / "cells.jsonl").read_text().splitlines()]
    assert len(cells) == len({cell["key"] for cell in cells})  # appended once, by process 0 alone
    expected = {cell["key"]: cell for cell in map(json.loads, (one / "cells.jsonl").read_text().splitlines())}
    assert {cell["key"] for cell in cells} == set(expected)
    for cell in cells:
        assert cell.get("test_accuracy") == pytest.approx(expected[cell["key"]].get("test_accuracy")), cell["key"]
    assert expected["rotten_tomatoes*/zeroshot/0"]["test_accuracy"] is not None  # zero-shot recomputed and compared
    arrays_one, arrays_two = _feature_arrays(one), _feature_arrays(two)
    assert arrays_one.keys() == arrays_two.keys()
    for name, value in arrays_one.items():
        np.testing.assert_allclose(arrays_two[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    curve = "finetune/rotten_tomatoes*-0/metrics.jsonl"
    losses = [[row["train_loss"] for row in map(json.loads, (run / curve).read_text().splitlines())]
              for run in (one, two)]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4)
    starts = [json.loads(line) for line in (two / "runs.jsonl").read_text().splitlines()]
    assert [start["process_count"] for start in starts][-1] == 2
