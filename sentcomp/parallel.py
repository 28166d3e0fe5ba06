"""The device mesh and sharding helpers, in one place.

Data parallelism is ``jax.jit`` over one 1-D mesh whose axis ``"data"`` spans every device (of every host):
batches are sharded along their leading axis, parameters are replicated. Kernels never choose shardings;
the programs do, through these helpers.

Training can also shard its state (FSDP, fully sharded data parallelism): :func:`make_mesh` builds the 2-D mesh
``("data", "fsdp")`` a config names (e.g. ``{"data": -1, "fsdp": 4}``). Batches are split over *both* axes (every
device gets its own rows); each parameter and optimiser-state leaf is split over the ``"fsdp"`` axis along one
dimension chosen from its shape alone (:func:`leaf_sharding`) and replicated over ``"data"``, so a device holds
``1/fsdp`` of the large leaves. XLA inserts the all-gathers (forward/backward) and reduce-scatters (gradients).

Several hosts (a Cloud TPU pod slice, several GPU nodes, or several processes on one machine) use JAX's own
multi-controller runtime: every process runs the same program, :func:`initialize_distributed` joins them
before any JAX computation, :func:`data_mesh` then spans all processes' devices, and each process loads only
the rows :func:`host_row_indices` names and assembles the global batch with :func:`global_batch`. Results
are fetched to every host with :func:`fetch`; files are written by :func:`is_main_process` only. Orbax
checkpoints of globally sharded arrays are written by all processes together (every process calls save on
the same path, which must be on a filesystem all hosts share).
"""

from __future__ import annotations

import functools
import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sentcomp.errors import SentcompError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MESH_AXES = (DATA_AXIS, FSDP_AXIS)
DEFAULT_MESH = {DATA_AXIS: -1, FSDP_AXIS: 1}  # every device on the data axis: parameters replicated
MIN_SHARDED_SIZE = 2**14  # leaves with fewer elements are replicated (biases, norms, scalars)
T = TypeVar("T")


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all processes) with the axis ``"data"``."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def mesh_shape(axes: Mapping[str, int] | None, num_devices: int) -> dict[str, int]:
    """``{"data": n_data, "fsdp": n_fsdp}`` from a config's mapping (axis name -> size; one size may be -1 for
    "the rest"; a missing axis has size 1), checked to use exactly ``num_devices`` devices."""
    axes = dict(DEFAULT_MESH if axes is None else axes)
    unknown = set(axes) - set(MESH_AXES)
    if unknown:
        raise SentcompError(f"Unknown mesh axes {sorted(unknown)}; config.mesh names sizes of {list(MESH_AXES)}, "
                            'e.g. {"data": -1, "fsdp": 4}.')
    sizes = {name: int(axes.get(name, 1)) for name in MESH_AXES}
    if list(sizes.values()).count(-1) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
        raise SentcompError(f"config.mesh sizes must be ≥ 1, with at most one -1 (the remaining devices); got {axes}.")
    fixed = int(np.prod([size for size in sizes.values() if size != -1]))
    if num_devices % fixed or (-1 not in sizes.values() and fixed != num_devices):
        raise SentcompError(f"config.mesh {axes} does not fit {num_devices} devices: the sizes must multiply to "
                            f"{num_devices} (set one axis to -1 to take the remaining devices).")
    return {name: num_devices // fixed if size == -1 else size for name, size in sizes.items()}


def make_mesh(axes: Mapping[str, int] | None = None, devices=None) -> Mesh:
    """The 2-D mesh ``("data", "fsdp")`` over ``devices`` (default: every device of every process) with the
    sizes of ``axes`` (:func:`mesh_shape`; None = :data:`DEFAULT_MESH`, data parallelism over every device).
    The fsdp axis is the inner one, so an fsdp group's devices are neighbours (on one host when it fits)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(axes, len(devices))
    return Mesh(np.asarray(devices).reshape(shape[DATA_AXIS], shape[FSDP_AXIS]), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over all the mesh's axes (each device its own rows), the rest replicated."""
    axes = mesh.axis_names
    return NamedSharding(mesh, PartitionSpec(axes[0] if len(axes) == 1 else tuple(axes)))


def leaf_sharding(mesh: Mesh, shape: Sequence[int], min_size: int = MIN_SHARDED_SIZE) -> NamedSharding:
    """How a parameter-shaped leaf of ``shape`` is laid out: its largest dimension that the fsdp axis size ``n``
    divides is split ``n`` ways over ``"fsdp"`` (the first such if several are as large); the leaf is replicated
    if the mesh has no fsdp axis or ``n = 1``, if it has fewer than ``min_size`` elements, or if no dimension is
    divisible by ``n``. A function of the shape alone (never of parameter names), so optimiser moments, which
    mirror the parameters' shapes, are laid out like their parameters, and scalars (step counts) replicate."""
    n = mesh.shape.get(FSDP_AXIS, 1)
    divisible = [axis for axis, size in enumerate(shape) if size % n == 0]
    if n == 1 or int(np.prod(shape)) < min_size or not divisible:
        return replicated(mesh)
    axis = max(divisible, key=lambda a: (shape[a], -a))
    return NamedSharding(mesh, PartitionSpec(*[FSDP_AXIS if a == axis else None for a in range(len(shape))]))


def state_shardings(mesh: Mesh, tree):
    """:func:`leaf_sharding` of every leaf of ``tree`` (arrays, tracers or ``jax.ShapeDtypeStruct``s)."""
    return jax.tree.map(lambda leaf: leaf_sharding(mesh, np.shape(leaf)), tree)


def shard_state(tree, mesh: Mesh):
    """A copy of every array of ``tree`` (parameters, optimiser state) placed by :func:`state_shardings` (never the
    caller's buffers, which a train step donating its state would delete); with several processes every process
    passes the same whole values and keeps its devices' shards."""
    shardings = state_shardings(mesh, tree)
    # device_put may hand back the caller's buffer as one shard (e.g. device 0's copy of a replicated array)
    return jax.jit(functools.partial(jax.tree.map, jnp.copy), out_shardings=shardings)(jax.device_put(tree, shardings))


def constrain_state(tree, mesh: Mesh):
    """Inside a jitted function: ``tree`` pinned to :func:`state_shardings` (e.g. gradients and the new state,
    so XLA reduce-scatters the gradients instead of all-reducing them)."""
    return jax.lax.with_sharding_constraint(tree, state_shardings(mesh, tree))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(tree, mesh: Mesh):
    """Places every array of ``tree`` with its leading axis split over the mesh (its size must divide evenly)."""
    return jax.device_put(tree, batch_sharding(mesh))


def replicate(tree, mesh: Mesh):
    """Places every array of ``tree`` whole on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))


def pad_to_multiple(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is ≥ ``n`` (batch sizes must divide over the devices)."""
    return -(-n // multiple) * multiple


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise SentcompError(f"Environment variable {name}={value!r} must be an integer.") from None


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    auto: bool = False,
) -> bool:
    """Joins JAX's multi-process runtime (``jax.distributed.initialize``); returns whether it did.

    Unset arguments come from the environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``. With no coordinator and ``auto`` False, or with a single process, this is a no-op.
    ``auto=True`` lets JAX detect the cluster itself (Cloud TPU VM slices, SLURM, Open MPI, Kubernetes).
    Must run before any JAX computation; calling it again once initialised does nothing.
    """
    if jax.distributed.is_initialized():
        return True
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if auto and coordinator_address is None:
        num_processes = process_id = None  # JAX detects the whole cluster
    elif coordinator_address is None or num_processes == 1:
        return False
    elif num_processes is None or process_id is None:
        raise SentcompError(
            f"Multi-process run with coordinator {coordinator_address} needs both the number of processes and "
            "this process's id: pass --num_processes and --process_id (or set JAX_NUM_PROCESSES, JAX_PROCESS_ID)."
        )
    elif not 0 <= process_id < num_processes:
        raise SentcompError(f"process_id must be in [0, {num_processes}), got {process_id}.")
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    except (RuntimeError, ValueError) as error:
        hint = "" if coordinator_address else (" JAX detected no cluster (Cloud TPU VM, SLURM, Open MPI): pass "
                                               "--coordinator_address, --num_processes and --process_id.")
        raise SentcompError(f"Could not join the multi-process JAX runtime: {str(error).rstrip('.')}.{hint}") from None
    return True


def is_main_process() -> bool:
    """True on process 0, the one that writes files (config, results) for all processes."""
    return jax.process_index() == 0


@functools.lru_cache(maxsize=64)
def host_row_indices(global_size: int, mesh: Mesh) -> np.ndarray:
    """The rows of a ``global_size``-row batch that this process must load, in the order :func:`global_batch`
    expects them (``global_size`` must divide evenly over the mesh's devices). Computed once per size and mesh
    (:func:`apply_to_batch` asks for every batch); the array is read-only."""
    if global_size % mesh.size:
        raise SentcompError(f"A global batch of {global_size} rows does not split over {mesh.size} devices.")
    sharding = batch_sharding(mesh)
    device_slices = sharding.devices_indices_map((global_size,))  # every device's; this process reads its own
    starts = sorted({device_slices[device][0].start or 0 for device in sharding.addressable_devices})
    rows_per_device = global_size // mesh.size
    rows = np.concatenate([np.arange(start, start + rows_per_device) for start in starts])
    rows.setflags(write=False)
    return rows


def global_batch(local_tree, mesh: Mesh):
    """Assembles each process's rows (from :func:`host_row_indices`) into arrays sharded over the whole mesh.

    With one process this equals :func:`shard_batch`; with several, each process passes only its own rows.
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda local: jax.make_array_from_process_local_data(sharding, np.asarray(local)), local_tree)


def apply_to_batch(fn, arrays, mesh: Mesh, *args):
    """``fn(*args, *arrays)`` as whole numpy arrays on every process, for a global batch ``arrays`` (a tuple of
    arrays with the same leading size) that every process holds whole.

    Each process feeds only its rows (:func:`host_row_indices`), :func:`global_batch` splits the batch over the
    mesh, and :func:`fetch` gathers the output: the one path of batched inference (features, BERT features,
    zero-shot scores, fine-tuning accuracy), the same on one host and on many.
    """
    rows = host_row_indices(len(arrays[0]), mesh)
    return fetch(fn(*args, *global_batch(tuple(np.asarray(array)[rows] for array in arrays), mesh)))


def fetch(tree):
    """Every array of ``tree`` as a whole numpy array on every process: gathered across hosts when it spans
    several, as it is when this process holds all of it (e.g. computed on a mesh of this host's devices)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return jax.tree.map(lambda x: np.asarray(x) if getattr(x, "is_fully_addressable", True)
                        else multihost_utils.process_allgather(x, tiled=True), tree)


def broadcast_from_main(tree):
    """Process 0's value of ``tree`` (numpy arrays/scalars) on every process, so all take the same decision."""
    if jax.process_count() == 1:
        return tree
    return multihost_utils.broadcast_one_to_all(tree)


def main_decides(decide: Callable[[], T]) -> T:
    """``decide()`` evaluated on process 0 alone, its value returned on every process.

    The one way a multi-host program reads what its workdir holds (finished cells, cached feature chunks, the
    checkpoint to restore, a cached corpus): hosts never read a shared filesystem independently, where one may
    see a file another does not yet, so they cannot diverge. The value travels pickled (any picklable object,
    numpy arrays included) through :func:`broadcast_from_main`; an exception raised by ``decide`` on process 0
    is raised on every process. With one process this is just ``decide()``.
    """
    if jax.process_count() == 1:
        return decide()
    payload = b""
    if is_main_process():
        try:
            payload = pickle.dumps((True, decide()))
        except Exception as error:  # every process must leave this call the same way
            payload = pickle.dumps((False, error))
    size = int(broadcast_from_main(np.int32(len(payload))))
    buffer = np.frombuffer(payload, np.uint8) if is_main_process() else np.zeros(size, np.uint8)
    succeeded, value = pickle.loads(np.asarray(broadcast_from_main(buffer)).tobytes())
    if not succeeded:
        raise value
    return value


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on at least one process (every process gets the same answer)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def sync(name: str) -> None:
    """Waits until every process reaches this point (a no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
