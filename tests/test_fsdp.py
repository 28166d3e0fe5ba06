"""FSDP: the mesh a config names, the shape-only sharding rule, and training on it.

Pretraining steps on 1 device, 8 devices data-parallel, data × fsdp = 2 × 4 and 1 × 8 give the same parameters
(float32, within ``ATOL``: only the order of float sums differs), with the large leaves really split over the fsdp
axis; an Orbax checkpoint written under fsdp = 8 restores onto fsdp = 2 and onto a data-only mesh and training
continues to the parameters of an uninterrupted run (2 processes × 4 devices with fsdp = 4 pretraining to one
process's parameters: tests/test_multihost.py). Fine-tuning: grad_accum = 2 equals grad_accum = 1 on the same
global batch (also under FSDP), and bfloat16 compute really runs the LM's matmuls in bf16 and stays close to float32.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P
from test_bf16 import dot_operand_dtypes

from sentcomp import parallel
from sentcomp.errors import SentcompError
from sentcomp.launcher import config_files
from sentcomp.models import gpt2
from sentcomp.models.tokenizers import byte_tokenizer
from sentcomp.programs import pretrain
from sentcomp.results import layout, storage, timings
from sentcomp.training import checkpoints, finetune
from sentcomp.training import steps as training_steps

# float32 parameters after a few AdamW steps on different meshes: the sums run in another order, nothing else
# (observed differences ~1e-6; AdamW's normalised updates keep them at the learning rate's scale or below)
ATOL, RTOL = 2e-5, 1e-4
OPTIMIZER = ml_collections.ConfigDict(dict(learning_rate=3e-3, warmup_steps=1, decay="cosine", end_lr_fraction=0.1,
                                           weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0))
MESHES = {"one device": None, "data 8": {"data": 8}, "data 2 x fsdp 4": {"data": 2, "fsdp": 4},
          "fsdp 8": {"data": 1, "fsdp": 8}}


@pytest.fixture(scope="module")
def tiny_lm():
    """2 layers, d = 64, bytes (V = 257): wte [257, 64] and the MLP kernels [64, 256], [256, 64] reach 2**14
    elements (sharded), the attention kernels [64, 192], biases and norms do not (replicated)."""
    config = gpt2.gpt2_config(n_layer=2, n_embd=64, n_head=2, vocab_size=257, n_positions=32)
    return gpt2.init(config, rng=0, tokenizer=byte_tokenizer())


def mesh_of(name):
    return parallel.make_mesh(devices=jax.devices()[:1]) if MESHES[name] is None else parallel.make_mesh(MESHES[name])


def flat(tree):
    return {"/".join(map(str, key)): value for key, value in traverse_util.flatten_dict(tree).items()}


def assert_close(actual, expected):
    for name, value in flat(expected).items():
        np.testing.assert_allclose(flat(actual)[name], value, rtol=RTOL, atol=ATOL, err_msg=name)


# -------------------------------------------------------------------------------------------- the rule


def test_a_leaf_is_split_along_its_largest_divisible_dimension():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    spec = {shape: parallel.leaf_sharding(mesh, shape).spec for shape in [
        (1024, 64), (64, 1024), (257, 64), (12, 768, 3072), (128, 128), (4098, 8), (100, 100), (16385,), (), (3,)]}
    assert spec == {
        (1024, 64): P("fsdp", None), (64, 1024): P(None, "fsdp"),
        (257, 64): P(None, "fsdp"),  # 257 is not divisible by 4
        (12, 768, 3072): P(None, None, "fsdp"),  # a stacked layer axis is just another dimension
        (128, 128): P("fsdp", None),  # ties: the first
        (4098, 8): P(None, "fsdp"),  # the largest dimension that divides
        (100, 100): P(), (16385,): P(),  # under 2**14 elements; no dimension divisible by 4
        (): P(), (3,): P(),  # scalars (step counts) and small vectors
    }
    assert parallel.leaf_sharding(mesh, (100, 100), min_size=1).spec == P("fsdp", None)
    for mesh in (parallel.make_mesh({"data": 8, "fsdp": 1}), parallel.data_mesh()):  # no fsdp: all replicated
        assert parallel.leaf_sharding(mesh, (1024, 64)).spec == P()


def test_mesh_from_the_config():
    assert parallel.mesh_shape(None, 8) == {"data": 8, "fsdp": 1}
    assert parallel.mesh_shape({"fsdp": -1}, 8) == {"data": 1, "fsdp": 8}
    assert parallel.mesh_shape(ml_collections.ConfigDict({"data": 2, "fsdp": -1}), 8) == {"data": 2, "fsdp": 4}
    mesh = parallel.make_mesh({"data": -1, "fsdp": 4})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    assert parallel.batch_sharding(mesh).spec == P(("data", "fsdp"))  # every device gets its own rows
    for axes, message in [({"data": 3, "fsdp": -1}, "does not fit 8 devices"), ({"data": 2, "fsdp": 2}, "multiply"),
                          ({"data": -1, "fsdp": -1}, "at most one -1"), ({"data": 0}, "≥ 1"),
                          ({"model": 2}, "Unknown mesh axes")]:
        with pytest.raises(SentcompError, match=message):
            parallel.mesh_shape(axes, 8)
    config = config_files.load_config(f"{config_files.EXPERIMENTS_DIR}/pretrain.py:smoke")
    assert config.mesh.to_dict() == {"data": -1, "fsdp": 1}
    with pytest.raises(SentcompError, match="does not fit 8 devices"):
        pretrain.check_config(config_files.override(config, {"mesh.fsdp": 3}))


def test_the_launcher_resumes_a_run_on_another_mesh_but_not_under_other_settings(tmp_path):
    from sentcomp.launcher import runner

    config = config_files.load_config(f"{config_files.EXPERIMENTS_DIR}/pretrain.py:smoke")
    storage.write_json(tmp_path / layout.CONFIG_FILE, config_files.to_plain(config))
    (tmp_path / "checkpoints").mkdir()  # the workdir holds results: its config must match
    runner.check_resume(config_files.override(config, {"mesh.fsdp": 8, "model.remat": "dots"}), tmp_path)
    with pytest.raises(SentcompError, match=r"loss: 'xent' -> 'quad'"):
        runner.check_resume(config_files.override(config, {"mesh.fsdp": 8, "loss": "quad"}), tmp_path)


# ---------------------------------------------------------------------------------------------- pretraining


def pretrain_steps(lm, mesh, steps, state=None, first=0):
    """``steps`` xent steps of a [8, 33]-token batch per step (step ``t``'s batch from seed ``t``), from ``state``
    (default: the initial state on ``mesh``); returns the state."""
    optimizer = training_steps.make_optimizer(OPTIMIZER, 10, lm.params)
    state = training_steps.initial_state(lm.params, optimizer, mesh) if state is None else state
    step_fn = training_steps.make_train_step("xent", lm.hidden_fn, lm.phi_fn, optimizer, jnp.float32, mesh)
    for t in range(first, first + steps):
        tokens = np.random.default_rng(t).integers(0, 257, (8, 1, 33)).astype(np.int32)
        state, _ = step_fn(state, parallel.shard_batch(tokens, mesh))
    return state


@pytest.fixture(scope="module")
def trained(tiny_lm):
    """The state after 2 steps on each mesh of MESHES."""
    return {name: pretrain_steps(tiny_lm, mesh_of(name), 2) for name in MESHES}


@pytest.mark.slow
def test_every_mesh_trains_to_the_same_parameters(trained):
    reference = parallel.fetch(trained["one device"]["params"])
    assert not np.allclose(reference["wte"]["embedding"], 0)
    for name in MESHES:
        assert_close(parallel.fetch(trained[name]["params"]), reference)


def test_parameters_and_optimiser_state_are_sharded(trained):
    state = trained["data 2 x fsdp 4"]
    for leaf in jax.tree.leaves(state):  # parameters, Adam's moments and step counts alike
        shard = leaf.addressable_shards[0].data
        sharded = leaf.size >= 2**14 and any(size % 4 == 0 for size in leaf.shape)
        assert shard.size == (leaf.size // 4 if sharded else leaf.size), (leaf.shape, shard.shape)
        assert {s.data.shape for s in leaf.addressable_shards} == {shard.shape}
    adam = state["opt_state"][1][0]  # clip, then AdamW's scale_by_adam (count, mu, nu)
    for tree in (state["params"], adam.mu, adam.nu):
        embedding = tree["wte"]["embedding"]  # [257, 64]: 257 does not divide by 4, 64 does
        assert embedding.sharding.spec == P(None, "fsdp") and embedding.addressable_shards[0].data.shape == (257, 16)
    assert state["step"].sharding.spec == P() and int(state["step"]) == 2
    per_device = sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(state))
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    assert per_device < 0.5 * total  # most of this tiny model's bytes are in the sharded leaves


@pytest.mark.slow
def test_a_checkpoint_restores_onto_other_meshes_and_training_continues(tiny_lm, trained, tmp_path):
    uninterrupted = parallel.fetch(pretrain_steps(tiny_lm, mesh_of("fsdp 8"), 4)["params"])
    manager, _, _ = checkpoints.resume(tmp_path, trained["fsdp 8"], every=1, keep=1)
    checkpoints.save_checkpoint(manager, trained["fsdp 8"], {"step": 2})
    manager.wait_until_finished()
    manager.close()
    optimizer = training_steps.make_optimizer(OPTIMIZER, 10, tiny_lm.params)
    for axes in ({"data": 4, "fsdp": 2}, {"data": 8}):
        mesh = parallel.make_mesh(axes)
        manager, restored, meta = checkpoints.resume(
            tmp_path, training_steps.initial_state(tiny_lm.params, optimizer, mesh), every=1, keep=1)
        manager.close()
        assert meta["step"] == 2 and int(restored["step"]) == 2
        expected = parallel.state_shardings(mesh, restored)
        assert jax.tree.all(jax.tree.map(lambda leaf, sharding: leaf.sharding.is_equivalent_to(sharding, leaf.ndim),
                                         restored, expected))
        np.testing.assert_array_equal(flat(parallel.fetch(restored["params"]))["wte/embedding"],
                                      flat(parallel.fetch(trained["fsdp 8"]["params"]))["wte/embedding"])
        assert_close(parallel.fetch(pretrain_steps(tiny_lm, mesh, 2, restored, first=2)["params"]), uninterrupted)


@pytest.mark.slow
def test_the_mesh_change_resume_survives_a_warm_compilation_cache(tiny_lm, trained, tmp_path):
    """Regression: with the state donated on CPU, the test above passed with an empty persistent compilation cache
    and aborted the process ("Fatal Python error: Aborted") when its programs were loaded from the cache, as in a
    second run, or a later test module of the same suite (:func:`sentcomp.training.steps.state_donation`). Here
    the test runs again in this process after JAX's in-memory caches are dropped, so its programs come from the
    persistent cache (the suite's, ``tests/conftest.py``)."""
    test_a_checkpoint_restores_onto_other_meshes_and_training_continues(tiny_lm, trained, tmp_path / "first")
    jax.clear_caches()
    before = timings.compile_counts()
    test_a_checkpoint_restores_onto_other_meshes_and_training_continues(tiny_lm, trained, tmp_path / "again")
    assert (timings.compile_counts() - before).cache_hits > 0

# ---------------------------------------------------------------------------------------------- fine-tuning


def finetune_steps(lm, steps, **config):
    """``steps`` fine-tuning steps (2 classes, dropout 0.1, aux LM loss) on a fixed [16, 16] batch, on the mesh
    ``config.mesh`` names: the losses, the final state and the step's jaxpr."""
    config = finetune.FinetuneOptions.from_mapping(dict(dropout=0.1, aux_lm_weight=0.5,
                                                        optimizer=dict(learning_rate=3e-3, warmup_steps=1), **config))
    mesh = parallel.make_mesh(config.mesh)
    params = {"lm": lm.params, "head": finetune.init_head(jax.random.key(1), 64, 2, 0.02)}
    optimizer = training_steps.make_optimizer(config.optimizer, 10, params)
    state = training_steps.initial_state(params, optimizer, mesh)
    step_fn = finetune.make_train_step(lm, optimizer, config, mesh)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 257, (16, 16)).astype(np.int32)
    mask = (np.arange(16) < rng.integers(4, 17, (16, 1))).astype(np.int32)
    batch = (ids * mask, mask, rng.integers(0, 2, 16).astype(np.int32), np.ones(16, np.float32))
    losses = []
    for _ in range(steps):
        state, metrics = step_fn(state, *parallel.shard_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    return np.array(losses), state, jax.make_jaxpr(step_fn)(state, *parallel.shard_batch(batch, mesh)).jaxpr


@pytest.fixture(scope="module")
def finetuned(tiny_lm):
    return finetune_steps(tiny_lm, 2)


@pytest.mark.slow
def test_finetuning_gradient_accumulation_equals_the_whole_batch(tiny_lm, finetuned):
    """Two micro-batches of 8 rows, under data 2 × fsdp 4, against the whole batch of 16 data-parallel."""
    whole_losses, whole, _ = finetuned
    losses, accumulated, _ = finetune_steps(tiny_lm, 2, grad_accum=2, mesh={"data": 2, "fsdp": 4})
    np.testing.assert_allclose(losses, whole_losses, rtol=1e-5)
    assert_close(parallel.fetch(accumulated["params"]), parallel.fetch(whole["params"]))
    assert flat(accumulated["params"])["lm/wte/embedding"].sharding.spec == P(None, "fsdp")


@pytest.mark.slow
def test_finetuning_in_bf16_computes_in_bf16_close_to_float32(tiny_lm, finetuned):
    losses, state, jaxpr = finetune_steps(tiny_lm, 2, compute_dtype="bfloat16")
    np.testing.assert_allclose(losses, finetuned[0], rtol=3e-2)
    assert not np.array_equal(losses, finetuned[0])
    dots = dot_operand_dtypes(jaxpr)
    bf16 = [operands for operands in dots if set(operands) == {"bfloat16"}]
    assert len(bf16) >= 12, dots  # the blocks' projections, attention and MLP, forward and backward
    assert all(set(operands) <= {"bfloat16", "float32"} for operands in dots)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state["params"]))  # float32 master weights


def test_finetuning_config_is_checked():
    assert finetune.FinetuneOptions.from_mapping({"mesh": {"fsdp": 4}}).mesh == {"data": -1, "fsdp": 4}
    for config, message in [({"grad_accum": 0}, "grad_accum"), ({"compute_dtype": "float16"}, "compute_dtype"),
                            ({"mesh": {"fsdp": 3}}, "does not fit")]:
        with pytest.raises(SentcompError, match=message):
            finetune.FinetuneOptions.from_mapping(config)
