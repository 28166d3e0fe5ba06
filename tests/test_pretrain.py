"""Pretraining: the step is device-count independent and gradient accumulation is exact; a run killed with
SIGKILL and resumed ends where an uninterrupted run does; a corrupt latest checkpoint falls back to the previous
one; divergence stops with a clear message and keeps the last good checkpoint; both losses decrease."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import matplotlib.image
import numpy as np
import pytest
from flax import traverse_util

from sentcomp import models, parallel
from sentcomp.errors import SentcompError
from sentcomp.launcher import config_files, runner
from sentcomp.main import with_resume_may_change
from sentcomp.models import gpt2
from sentcomp.models.base import COMPUTE_DTYPES
from sentcomp.programs import pretrain
from sentcomp.training import checkpoints, loop
from sentcomp.training import steps as training_steps

SPEC = f"{config_files.EXPERIMENTS_DIR}/pretrain.py:smoke"
TINY = {  # a 2-layer d=32 byte-level GPT-2, 16 steps of 8 × 32 tokens
    "model.n_embd": 32, "model.n_positions": 32, "data.seq_len": 32, "num_steps": 16, "batch_size": 8,
    "eval_every": 4, "eval_blocks": 8, "eval_batch_size": 8, "checkpoint.every": 4, "probe.every": 0,
    "progress": False,
}


def tiny_config(**changes):
    return config_files.override(config_files.load_config(SPEC), {**TINY, **changes})


def final_params(workdir):
    """The trained parameters as written to ``model/`` (HF layout), flat ``{name: array}``."""
    lm = gpt2.from_hf(workdir / "model", json.loads((workdir / "model" / "config.json").read_text()))
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(lm.params).items()}


def checkpoint_steps(workdir):
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


# ------------------------------------------------------------------------------------------ the train step


def _train(config, mesh, steps=3):
    lm = pretrain.build_model(config)
    initial = jax.tree.map(np.array, lm.params)  # the step donates its input state
    frozen = lm.phi_param if config.init.freeze_phi else None
    optimizer = training_steps.make_optimizer(config.optimizer, config.num_steps, lm.params, frozen)
    state = training_steps.initial_state(lm.params, optimizer, mesh)
    step_fn = training_steps.make_train_step(config.loss, lm.hidden_fn, lm.phi_fn, optimizer,
                                       COMPUTE_DTYPES[config.compute_dtype], mesh)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        tokens = rng.integers(0, lm.config.vocab_size, (config.batch_size, config.data.seq_len + 1)).astype(np.int32)
        micro = config.batch_size // config.grad_accum  # row r of micro-batch k is tokens[k·micro + r]
        local = tokens.reshape(config.grad_accum, micro, -1).swapaxes(0, 1)
        state, metrics = step_fn(state, parallel.shard_batch(local, mesh))
        losses.append(float(metrics["loss"]))
    return np.array(losses), parallel.fetch(state["params"]), initial


@pytest.fixture(scope="module")
def xent_on_every_device():
    """Three float32 cross-entropy steps of the tiny model on all 8 devices: the reference of several tests."""
    return _train(tiny_config(), parallel.data_mesh())


def _assert_close_trees(actual, expected):
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(actual)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss", ["xent", "quad"])
def test_same_losses_and_parameters_on_one_and_eight_devices(loss, xent_on_every_device):
    assert len(jax.devices()) == 8
    config = tiny_config(loss=loss)
    one_losses, one_params, _ = _train(config, parallel.data_mesh(jax.devices()[:1]))
    eight_losses, eight_params, _ = xent_on_every_device if loss == "xent" else _train(config, parallel.data_mesh())
    np.testing.assert_allclose(eight_losses, one_losses, rtol=1e-5)
    assert one_losses[-1] < one_losses[0]
    _assert_close_trees(eight_params, one_params)


def test_gradient_accumulation_equals_the_whole_batch(xent_on_every_device):
    whole_losses, whole_params, _ = xent_on_every_device
    accum_losses, accum_params, _ = _train(tiny_config(grad_accum=2), parallel.data_mesh(jax.devices()[:4]))
    np.testing.assert_allclose(accum_losses, whole_losses, rtol=1e-5)
    _assert_close_trees(accum_params, whole_params)


def test_bf16_compute_tracks_float32_with_float32_master_weights(xent_on_every_device):
    bf16_losses, bf16_params, _ = _train(tiny_config(compute_dtype="bfloat16"), parallel.data_mesh())
    np.testing.assert_allclose(bf16_losses, xent_on_every_device[0], rtol=2e-2)
    assert not np.array_equal(bf16_losses, xent_on_every_device[0])
    assert bf16_params["phi"].dtype == np.float32


def test_frozen_phi_stays_put():
    _, params, initial = _train(tiny_config(**{"init.freeze_phi": True}), parallel.data_mesh(), steps=2)
    np.testing.assert_array_equal(params["phi"], initial["phi"])
    assert not np.array_equal(params["wte"]["embedding"], initial["wte"]["embedding"])


# --------------------------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A complete tiny Quad run (16 steps, checkpoints every 4); the smoke test of experiments/ runs xent."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    runner.run_program(tiny_config(loss="quad"), workdir)
    return workdir


@pytest.mark.slow
def test_run_records_metrics_checkpoints_and_a_loadable_model(uninterrupted):
    rows = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [4, 8, 12, 16]
    assert rows[-1]["val_quad"] < rows[0]["val_quad"] and rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert all(row["tokens_per_s"] > 0 and np.isfinite(row["val_quad"]) for row in rows)
    assert all(0 < row["mfu"] < 10 for row in rows)  # on CPU relative to a matmul benchmark, so it may pass 1
    assert checkpoint_steps(uninterrupted) == [12, 16]  # keep = 2
    done = runner.read_done(uninterrupted)
    assert done["steps"] == 16 and done["loss"] == "quad" and done["val_loss"] == rows[-1]["val_quad"]
    assert final_params(uninterrupted)["phi"].shape == (257, 32)
    assert matplotlib.image.imread(uninterrupted / "curves.png").ndim == 3  # the curves of metrics.jsonl


@pytest.mark.slow
def test_sigkill_then_resume_ends_with_the_uninterrupted_parameters(uninterrupted, tmp_path):
    workdir = tmp_path / "killed"
    overrides = [f"--config.{key}={value}" for key, value in {**TINY, "loss": "quad"}.items()]
    command = [sys.executable, "-m", "sentcomp.main", f"--config={SPEC}", f"--workdir={workdir}", *overrides]
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while not [s for s in checkpoint_steps(workdir) if 4 <= s < 16] and child.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint appeared in time"
            time.sleep(0.02)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL, ("the run was not killed mid-way:\n"
                                                 f"{child.stderr.read().decode()[-2000:]}")
    assert runner.read_done(workdir) is None and 16 not in checkpoint_steps(workdir)

    runner.run_program(tiny_config(loss="quad"), workdir)  # resumes
    assert [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()] == [4, 8, 12, 16]
    expected = final_params(uninterrupted)
    for name, value in final_params(workdir).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(uninterrupted, tmp_path):

    workdir = tmp_path / "corrupt"
    shutil.copytree(uninterrupted, workdir)
    for path in (workdir / "checkpoints" / "16" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"\0garbage")
    (workdir / "done.json").unlink()
    with pytest.warns(UserWarning, match="Checkpoint at step 16 .* is damaged .*previous checkpoint"):
        runner.run_program(tiny_config(loss="quad"), workdir)
    assert any(p.name.startswith("16-") for p in (workdir / "checkpoints_corrupt").iterdir())
    assert checkpoint_steps(workdir) == [12, 16]
    expected = final_params(uninterrupted)
    for name, value in final_params(workdir).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_a_finished_run_with_truncated_array_data_recomputes_its_last_steps_bit_exactly(uninterrupted, tmp_path):
    """A finished run's latest checkpoint whose array data was cut short (a full disk, a killed copy): re-running
    the command falls back to the previous checkpoint, trains the last steps again and ends complete with the
    uninterrupted parameters."""
    workdir = tmp_path / "truncated"
    shutil.copytree(uninterrupted, workdir)
    assert all((workdir / "checkpoints" / str(step) / checkpoints.CHECKSUM_FILE).is_file() for step in (12, 16))
    data = max((path for path in (workdir / "checkpoints" / "16" / "state").rglob("*")
                if path.is_file() and path.parent.name == "d"), key=lambda path: path.stat().st_size)
    data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
    with pytest.warns(UserWarning, match="Checkpoint at step 16 .* is damaged"):
        runner.run_program(tiny_config(loss="quad"), workdir)
    assert runner.read_done(workdir)["steps"] == 16 and checkpoint_steps(workdir) == [12, 16]
    expected = final_params(uninterrupted)
    for name, value in final_params(workdir).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_resume_may_change_num_steps_trains_a_finished_run_longer(uninterrupted, tmp_path):
    """The documented way to train longer: the finished 16-step run continues from its step-16 checkpoint to 20
    (num_steps is not compared when listed); listing a key left unchanged changes nothing."""
    workdir = tmp_path / "longer"
    shutil.copytree(uninterrupted, workdir)
    runner.run_program(with_resume_may_change(tiny_config(loss="quad"), ["checkpoint.keep"]), workdir)
    assert runner.read_done(workdir)["steps"] == 16
    runner.run_program(with_resume_may_change(tiny_config(loss="quad", num_steps=20), ["num_steps"]), workdir)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [4, 8, 12, 16, 20] and runner.read_done(workdir)["steps"] == 20
    assert checkpoint_steps(workdir) == [16, 20]


def test_a_checkpoint_of_another_model_stops_the_run_and_moves_nothing(uninterrupted, tmp_path):
    """Only damage falls back: a valid checkpoint of another shape (the config changed under the runner's check,
    as a direct ``run`` call can) stops with a clear error; the checkpoints and metrics are left as they were."""
    workdir = tmp_path / "wider"
    shutil.copytree(uninterrupted, workdir)
    (workdir / "done.json").unlink()
    metrics_before = (workdir / "metrics.jsonl").read_text()
    with pytest.raises(SentcompError, match=r"Cannot restore the checkpoint at step 16 .*another structure or "
                                            r"shape.*new workdir"):
        pretrain.run(tiny_config(loss="quad", **{"model.n_embd": 48}), workdir)
    assert checkpoint_steps(workdir) == checkpoint_steps(uninterrupted)
    assert not (workdir / "checkpoints_corrupt").exists()
    assert (workdir / "metrics.jsonl").read_text() == metrics_before


@pytest.mark.parametrize("error, kind", [
    (json.JSONDecodeError("Expecting value", "", 0), "damaged"),
    (ValueError('DATA_LOSS: Error decoding local file "manifest.ocdbt"'), "damaged"),
    (ValueError('NOT_FOUND: Error reading "w/.zarray" in OCDBT database'), "damaged"),
    (ValueError("User-provided restore item and on-disk value metadata tree structures do not match"), "incompatible"),
    (PermissionError(13, "Permission denied"), "other"),
    (ValueError("PERMISSION_DENIED: Error reading local file"), "other"),
])
def test_restore_failures_are_classified(error, kind):
    assert checkpoints.restore_failure(error) == kind


@pytest.mark.slow
def test_divergence_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    config = tiny_config(**{"optimizer.learning_rate": 1e30, "optimizer.warmup_steps": 4, "checkpoint.every": 1,
                            "checkpoint.keep": 10})
    with pytest.raises(loop.TrainingDiverged, match=r"Training diverged at step (\d+).*last good checkpoint "
                                                        r"\(step \d+\) is kept.*Lower optimizer.learning_rate") as info:
        pretrain.run(config, tmp_path)
    diverged = int(info.value.args[0].split("step ")[1].split(":")[0])
    assert checkpoint_steps(tmp_path) == list(range(1, diverged))
    assert isinstance(info.value, SentcompError)


# --------------------------------------------------------------------- Φ / input embeddings from another model


def _flat(params):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def _save(lm, directory):
    """A model directory as a pretraining run writes its ``model/`` (weights + tokenizer)."""
    models.save_hf(lm, directory)
    lm.tokenizer.save_pretrained(str(directory))


@pytest.mark.slow
def test_phi_and_embeddings_start_from_another_model_and_the_rest_from_scratch(tmp_path):
    """init.phi_from / init.embeddings_from copy exactly Φ / the input embeddings of a saved model (any
    models.load source); every other parameter is the from-scratch initialisation; a short run with freeze_phi
    ends with the donor's Φ."""
    donor, other = pretrain.build_model(tiny_config(seed=7)), pretrain.build_model(tiny_config(seed=8))
    _save(donor, tmp_path / "donor")
    _save(other, tmp_path / "other")
    from_donor = {"init.phi_from": str(tmp_path / "donor")}
    scratch = _flat(pretrain.build_model(tiny_config()).params)
    lm = pretrain.build_model(tiny_config(**from_donor, **{"init.embeddings_from": str(tmp_path / "other")}))
    np.testing.assert_array_equal(np.asarray(lm.phi), np.asarray(donor.phi))
    np.testing.assert_array_equal(np.asarray(lm.params["wte"]["embedding"]),
                                  np.asarray(other.params["wte"]["embedding"]))
    params = _flat(lm.params)
    assert sorted(name for name in params if not np.array_equal(params[name], scratch[name])) == \
        ["phi", "wte/embedding"]

    tied = {"model.quad_head": False, "model.tie_word_embeddings": True}
    tied_scratch = _flat(pretrain.build_model(tiny_config(**tied)).params)
    tied_lm = pretrain.build_model(tiny_config(**tied, **from_donor))  # tied: Φ is the input embedding table
    np.testing.assert_array_equal(np.asarray(tied_lm.phi), np.asarray(donor.phi))
    assert [n for n, v in _flat(tied_lm.params).items() if not np.array_equal(v, tied_scratch[n])] == \
        ["wte/embedding"]
    with pytest.raises(SentcompError, match="ties Φ to its input embeddings"):
        pretrain.build_model(tiny_config(**tied, **from_donor, **{"init.embeddings_from": str(tmp_path / "other")}))
    _save(pretrain.build_model(tiny_config(**{"model.n_embd": 64})), tmp_path / "wider")
    with pytest.raises(SentcompError, match=r"phi matrix is \(\d+, 64\).*needs \(\d+, 32\)"):
        pretrain.build_model(tiny_config(**{"init.phi_from": str(tmp_path / "wider")}))

    pretrain.run(tiny_config(num_steps=4, **from_donor, **{"init.freeze_phi": True}), tmp_path / "run")
    np.testing.assert_array_equal(final_params(tmp_path / "run")["phi"], np.asarray(donor.phi))
