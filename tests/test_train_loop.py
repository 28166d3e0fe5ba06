"""The one training loop (sentcomp.training.loop): hooks fire at their steps, rows carry the window's loss and
throughput, checkpoints are periodic, per row and final, a resumed loop continues from ``start``, early stopping
ends it with a checkpoint, a non-finite loss stops it keeping the last good checkpoint; and pretraining, the
synthetic-language runs and fine-tuning all react to the same injected NaN the same way and write rows with the
same throughput formula."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from sentcomp import parallel
from sentcomp.launcher import config_files
from sentcomp.training import checkpoints, loop, tracking

PEAK = loop.Throughput(peak=1e9, devices=2)


def toy_step(state, increment):
    """Adds ``increment`` to ``w``; the loss is the new ``w`` (NaN once ``w`` is NaN)."""
    w = state["w"] + increment
    return {"w": w, "step": state["step"] + 1}, {"loss": w}


def toy_batches(step):
    """Step ``t`` adds ``t + 1``, trains on ``10·(t + 1)`` tokens of 3 FLOPs each."""
    return loop.Batch((jnp.float32(step + 1),), tokens=10 * (step + 1), flops=30.0 * (step + 1))


def toy_state(w=0.0, step=0):
    return {"w": jnp.float32(w), "step": jnp.int32(step)}


def saved_steps(workdir):
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def run_toy(workdir, start=0, num_steps=10, hooks=(), every=0, with_rows=False, state=None, stop=None, batches=None):
    manager = checkpoints.checkpoint_manager(workdir, 1, 100, False)
    checkpointing = loop.Checkpointing(manager, lambda step: {"step": step}, every=every, with_rows=with_rows)
    return loop.train_loop(state or toy_state(), toy_step, batches or toy_batches, start, num_steps, hooks,
                           workdir=workdir, checkpointing=checkpointing, hardware=PEAK, name="toy",
                           hint="Lower the toy's increments.", progress=False, stop=stop)


def test_hooks_fire_at_their_steps_and_rows_hold_the_window(tmp_path):
    fired = {"every3": [], "at": [], "side": []}

    def record(name, entry=None):
        def hook(done):
            fired[name].append((done.step, float(done.state["w"]), float(done.metrics["loss"])))
            return entry
        return hook

    state, done = run_toy(tmp_path, hooks=[loop.every(3, record("every3", {"mark": 1})),
                                           loop.at_steps((2, 5), record("at", {"at": True})),
                                           loop.every(1, record("side"))])
    assert done == 10 and float(state["w"]) == sum(range(1, 11))
    assert [step for step, _, _ in fired["every3"]] == [3, 6, 9, 10]  # every 3rd step and the last
    assert [step for step, _, _ in fired["at"]] == [2, 5]
    assert [step for step, _, _ in fired["side"]] == list(range(1, 11))  # a hook returning None logs no row
    assert all(w == loss == sum(range(1, step + 1)) for step, w, loss in fired["side"])  # state and metrics after

    rows = tracking.read_metrics(tmp_path)
    assert [row["step"] for row in rows] == [2, 3, 5, 6, 9, 10]
    assert rows[1]["mark"] == 1 and rows[2]["at"] and "mark" not in rows[2]
    previous = 0
    for row in rows:  # the window: steps previous+1 .. row["step"]
        window = range(previous + 1, row["step"] + 1)
        assert row["train_loss"] == pytest.approx(np.mean([sum(range(1, t + 1)) for t in window]))
        tokens, flops = sum(10 * t for t in window), sum(30.0 * t for t in window)
        assert row["train_seconds"] > 0
        assert row["tokens_per_s"] * row["train_seconds"] == pytest.approx(tokens)
        assert row["mfu"] * PEAK.peak * PEAK.devices * row["train_seconds"] == pytest.approx(flops)
        previous = row["step"]
    assert saved_steps(tmp_path) == [10]  # no periodic checkpoints asked: only the final one


def test_checkpoints_are_periodic_per_row_and_final(tmp_path):
    run_toy(tmp_path / "periodic", num_steps=7, every=3)
    assert saved_steps(tmp_path / "periodic") == [3, 6, 7]
    run_toy(tmp_path / "rows", num_steps=7, hooks=[loop.at_steps((2, 5), lambda done: {})], with_rows=True)
    assert saved_steps(tmp_path / "rows") == [2, 5, 7]
    manager = checkpoints.checkpoint_manager(tmp_path / "rows", 1, 100, False)
    manager, state, meta = checkpoints.restore_latest(manager, toy_state(), tmp_path / "rows", lambda: manager)
    assert float(state["w"]) == sum(range(1, 8)) and meta == {"step": 7}
    manager.close()


def test_a_resumed_loop_continues_from_start(tmp_path):
    whole, _ = run_toy(tmp_path / "whole", num_steps=8, every=2, hooks=[loop.every(2, lambda done: {})])
    run_toy(tmp_path / "resumed", num_steps=4, every=2, hooks=[loop.every(2, lambda done: {})])
    fired = []
    manager, state, meta = checkpoints.resume(tmp_path / "resumed", toy_state(), 2, 100)
    manager.close()
    assert meta["step"] == 4
    resumed, done = run_toy(tmp_path / "resumed", start=4, num_steps=8, every=2, state=state,
                            hooks=[loop.every(2, lambda done: fired.append(done.step) or {})])
    assert done == 8 and fired == [6, 8]
    assert float(resumed["w"]) == float(whole["w"]) == sum(range(1, 9))
    assert [row["step"] for row in tracking.read_metrics(tmp_path / "resumed")] == [2, 4, 6, 8]
    assert saved_steps(tmp_path / "resumed") == saved_steps(tmp_path / "whole") == [2, 4, 6, 8]


def test_stop_ends_the_loop_with_a_checkpoint(tmp_path):
    seen = []
    state, done = run_toy(tmp_path, num_steps=10, hooks=[loop.every(1, lambda d: seen.append(d.step))],
                          stop=lambda: len(seen) >= 4)
    assert done == 4 and float(state["w"]) == 10.0
    assert saved_steps(tmp_path) == [4]
    _, again = run_toy(tmp_path / "stopped", num_steps=10, stop=lambda: True)  # stopped before any step
    assert again == 0 and not saved_steps(tmp_path / "stopped")


def test_a_non_finite_loss_stops_the_loop_and_keeps_the_last_good_checkpoint(tmp_path):
    def nan_at_step_4(step):
        return loop.Batch((jnp.float32(np.nan if step == 3 else 1.0),), tokens=1, flops=1.0)

    with pytest.raises(loop.TrainingDiverged, match=r"Training diverged at step 4: loss nan \(toy\); the last good "
                                                    r"checkpoint \(step 3\) is kept in .*Lower the toy's increments"):
        run_toy(tmp_path, num_steps=10, every=1, hooks=[loop.every(1, lambda done: {})], batches=nan_at_step_4)
    assert saved_steps(tmp_path) == [1, 2, 3]
    assert [row["step"] for row in tracking.read_metrics(tmp_path)] == [1, 2, 3]
    with pytest.raises(loop.TrainingDiverged, match="at step 1: .*no checkpoint was written yet"):
        run_toy(tmp_path / "first", num_steps=3, batches=lambda step: loop.Batch((jnp.float32(np.inf),), 1, 1.0))


def test_non_finite_parameters_stop_the_loop_too(tmp_path):
    def step_fn(state, increment):
        state, metrics = toy_step(state, increment)
        return state, {**metrics, "params_finite": jnp.array(False)}

    manager = checkpoints.checkpoint_manager(tmp_path, 1, 100, False)
    closes, close = [], manager.close

    def recorded_close():
        closes.append(True)
        close()

    manager.close = recorded_close
    with pytest.raises(loop.TrainingDiverged, match=r"at step 1: loss 1.0, non-finite parameters"):
        loop.train_loop(toy_state(), step_fn, toy_batches, 0, 3, (), workdir=tmp_path, name="toy", hint="",
                        checkpointing=loop.Checkpointing(manager, lambda step: {"step": step}), hardware=PEAK,
                        progress=False)
    assert closes == [True]  # the diverged loop closed its checkpoint manager


def test_a_hook_needs_a_positive_period():
    with pytest.raises(Exception, match="period must be ≥ 1"):
        loop.every(0, lambda done: None)


# ------------------------------------------------------------------- the three callers share the loop's reactions


DIVERGE_AT = 3  # the injected NaN: the loss of step 3 (steps 1 and 2 are good and checkpointed)


@pytest.fixture
def poisoned_loop(monkeypatch):
    """``loop.train_loop`` with the step's loss replaced by NaN from step :data:`DIVERGE_AT` on; records the
    tokens and FLOPs of every batch the caller declared and the hardware it passed."""
    original = loop.train_loop
    record = {"tokens": {}, "flops": {}}

    def train_loop(state, step_fn, batches, start, num_steps, hooks=(), **kwargs):
        def poisoned_step(state, *inputs):
            state, metrics = step_fn(state, *inputs)
            if int(parallel.fetch(state["step"])) >= DIVERGE_AT:
                metrics = {**metrics, "loss": jnp.float32(np.nan)}
            return state, metrics

        def recorded_batches(step):
            batch = batches(step)
            record["tokens"][step + 1], record["flops"][step + 1] = batch.tokens, batch.flops
            return batch

        record["hardware"] = kwargs["hardware"]
        return original(state, poisoned_step, recorded_batches, start, num_steps, hooks, **kwargs)

    monkeypatch.setattr(loop, "train_loop", train_loop)
    return record


def run_pretrain(workdir):
    from sentcomp.programs import pretrain

    config = config_files.override(config_files.load_config(f"{config_files.EXPERIMENTS_DIR}/pretrain.py:smoke"), {
        "model.n_embd": 32, "model.n_positions": 32, "data.seq_len": 32, "num_steps": 6, "batch_size": 8,
        "eval_every": 1, "eval_blocks": 8, "eval_batch_size": 8, "checkpoint.every": 1, "checkpoint.keep": 10,
        "probe.every": 0, "progress": False})
    pretrain.run(config, workdir)
    return workdir


def run_theory_synthetic(workdir):
    from sentcomp.programs import theory_synthetic

    config = config_files.override(config_files.load_config(
        f"{config_files.EXPERIMENTS_DIR}/theory_synthetic.py:smoke"), {
        "losses": ("xent",), "num_steps": 4, "batch_size": 16, "data.num_documents": 256,
        "evaluation.num_checkpoints": 2, "evaluation.num_documents": 100, "progress": False})
    assert theory_synthetic.evaluation_steps(4, 2) == [2, 4]  # step 2 is evaluated and checkpointed
    theory_synthetic.run(config, workdir)
    return workdir / "xent"


def run_finetune(workdir):
    from sentcomp.data.loaders import Split
    from sentcomp.models import gpt2
    from sentcomp.models.tokenizers import byte_tokenizer
    from sentcomp.training import finetune

    lm = gpt2.init(gpt2.gpt2_config(vocab_size=257, n_embd=32, n_layer=2, n_head=2, n_positions=32), rng=0,
                   tokenizer=byte_tokenizer())
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 48)
    split = Split([("fig kiwi " if label else "desk door ") * int(rng.integers(1, 3)) for label in labels], labels)
    options = finetune.FinetuneOptions(batch_size=8, eval_batch_size=16, max_steps=6, eval_every=1, patience=100,
                                       val_fraction=0.25, max_length=32, buckets=(32,), progress=False,
                                       checkpoint_keep=10)
    finetune.finetune_accuracy(lm, split, split, options, workdir)
    return workdir


CALLERS = {"pretrain": run_pretrain, "theory_synthetic": run_theory_synthetic, "finetune": run_finetune}
LOOP_KEYS = {"step", "train_loss", "tokens_per_s", "mfu", "train_seconds"}


@pytest.mark.slow
@pytest.mark.parametrize("caller", sorted(CALLERS))
def test_every_caller_reacts_to_a_nan_alike_and_logs_the_same_throughput(caller, poisoned_loop, tmp_path):
    with pytest.raises(loop.TrainingDiverged) as info:
        CALLERS[caller](tmp_path)
    message = str(info.value)
    assert message.startswith(f"Training diverged at step {DIVERGE_AT}: loss nan ")
    assert "the last good checkpoint (step 2) is kept in " in message
    rundir = tmp_path / "xent" if caller == "theory_synthetic" else tmp_path
    assert max(saved_steps(rundir)) == DIVERGE_AT - 1  # nothing saved from the diverged step on
    rows = [json.loads(line) for line in (rundir / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(row["step"] < DIVERGE_AT for row in rows)
    hardware, previous = poisoned_loop["hardware"], 0
    assert hardware.devices == 8  # the test session's 8 host devices
    if caller == "pretrain":  # every block counts: batch_size × seq_len tokens a step
        assert set(poisoned_loop["tokens"].values()) == {8 * 32}
    for row in rows:
        assert LOOP_KEYS <= set(row)
        window = range(previous + 1, row["step"] + 1)
        tokens = sum(poisoned_loop["tokens"][step] for step in window)
        flops = sum(poisoned_loop["flops"][step] for step in window)
        assert tokens > 0 and math.isfinite(row["train_loss"])
        assert row["tokens_per_s"] * row["train_seconds"] == pytest.approx(tokens)
        assert row["mfu"] * hardware.peak * hardware.devices * row["train_seconds"] == pytest.approx(flops)
        previous = row["step"]
