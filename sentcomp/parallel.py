"""The device mesh and sharding helpers, in one place.

Data parallelism is ``jax.jit`` over one 1-D mesh whose axis ``"data"`` spans every device (of every host):
batches are sharded along their leading axis, parameters are replicated. Kernels never choose shardings;
the programs do, through these helpers.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all processes) with the axis ``"data"``."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the mesh, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


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
