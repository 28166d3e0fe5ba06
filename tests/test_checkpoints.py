"""The training checkpoints' Orbax handler (sentcomp.training.checkpoints.state_handler) on 8 simulated devices:
small replicated arrays are written without replica-parallel slicing (no compilation), large ones still with it;
its files are Orbax's StandardSave files both ways; typed PRNG keys come back as keys."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sentcomp.results import timings
from sentcomp.training import checkpoints


def _mesh() -> Mesh:
    return Mesh(np.array(jax.devices()), ("data",))


def _restored_state(manager, step, state):
    restored, error = checkpoints.try_restore(manager, step, checkpoints.abstract_state(state))
    assert error is None, error
    return restored["state"]


def _assert_same(restored, state):
    assert restored.keys() == state.keys()
    for name, value in state.items():
        np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(value), err_msg=name)
        assert restored[name].sharding == value.sharding, name


def _saved_programs(manager, state, step) -> int:
    """Programs compiled or read from the compilation cache while ``state`` is saved."""
    before = timings.compile_counts()
    checkpoints.save_checkpoint(manager, state, {"step": step})
    manager.wait_until_finished()
    counts = timings.compile_counts() - before
    return counts.compilations + counts.cache_hits


def test_small_replicated_arrays_are_saved_without_slicing_and_large_ones_replica_parallel(tmp_path):
    mesh = _mesh()
    assert mesh.size == 8
    replicated = NamedSharding(mesh, P())
    small = {"w": jax.device_put(jnp.arange(72 * 8, dtype=jnp.float32).reshape(72, 8), replicated),
             "sharded": jax.device_put(jnp.arange(24.0), NamedSharding(mesh, P("data"))),
             "step": jax.device_put(jnp.int32(3), replicated)}
    manager = checkpoints.checkpoint_manager(tmp_path / "small", 1, 3, False)
    assert _saved_programs(manager, small, 1) == 0
    _assert_same(_restored_state(manager, 1, small), small)

    # 1032 rows over 8 replicas: slices of 129 × 2040 float32, just above the threshold
    rows, columns = 1032, 2040
    assert rows // 8 * columns * 4 >= checkpoints.REPLICA_PARALLEL_MIN_SLICE_BYTES > 72 // 8 * 8 * 4
    large = {"w": jax.device_put(jnp.ones((rows, columns)), replicated)}
    manager = checkpoints.checkpoint_manager(tmp_path / "large", 1, 3, False)
    assert _saved_programs(manager, large, 1) > 0  # each replica's slice is cut by a compiled program
    _assert_same(_restored_state(manager, 1, large), large)


def test_files_are_those_of_orbax_standard_save_both_ways(tmp_path):
    replicated = NamedSharding(_mesh(), P())
    state = {"w": jax.device_put(jnp.arange(16.0).reshape(8, 2), replicated),
             "step": jax.device_put(jnp.int32(5), replicated)}
    standard = ocp.CheckpointManager(tmp_path / "standard" / "checkpoints",
                                     options=ocp.CheckpointManagerOptions(create=True))
    standard.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"step": 5})))
    standard.wait_until_finished()
    standard.close()
    _assert_same(_restored_state(checkpoints.checkpoint_manager(tmp_path / "standard", 1, 3, False), 5, state), state)

    ours = checkpoints.checkpoint_manager(tmp_path / "ours", 1, 3, False)
    checkpoints.save_checkpoint(ours, state, {"step": 5})
    ours.wait_until_finished()
    reader = ocp.CheckpointManager(tmp_path / "ours" / "checkpoints")
    standard_restore = ocp.args.StandardRestore(checkpoints.abstract_state(state))
    restored = reader.restore(5, args=ocp.args.Composite(state=standard_restore, meta=ocp.args.JsonRestore()))
    _assert_same(restored["state"], state)
    assert restored["meta"] == {"step": 5}


def test_a_typed_prng_key_is_restored_as_a_key(tmp_path):
    state = {"key": jax.random.key(7), "w": jnp.ones(3)}
    manager = checkpoints.checkpoint_manager(tmp_path, 1, 3, False)
    checkpoints.save_checkpoint(manager, state, {"step": 1})
    manager.wait_until_finished()
    restored = _restored_state(manager, 1, state)
    assert jnp.issubdtype(restored["key"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(restored["key"]), jax.random.key_data(state["key"]))
