"""Data parallelism over all local devices with JAX's own sharding.

With more than one device visible, a 1-d mesh ("data",) spans them: the
training and evaluation data, parameters and optimizer state are replicated,
and each step's batch is constrained to be split along the batch axis, so XLA
partitions the forward and backward passes and all-reduces the gradients. The
train step stays an ordinary `jax.jit` function (no pmap) and compiles once.
With several replicas (`--num_seeds`), the replica axis is split over the
devices instead when it divides evenly.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiment.errors import UsageError


def data_mesh(batch_size: int, num_seeds: int) -> jax.sharding.Mesh | None:
    """A ("data",) mesh over every device, or None on a single device."""
    count = jax.device_count()
    if count == 1:
        return None
    if num_seeds == 1 and batch_size % count:
        raise UsageError(
            f"--batch_size={batch_size} must be divisible by the number of devices ({count}) "
            "for data parallelism"
        )
    # Auto axes: XLA propagates the batch split from the sharding constraint
    return jax.make_mesh((count,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def replicate(tree, mesh):
    """Every array of `tree` on every device of the mesh (a global array on multi-host too)."""
    if mesh is None:
        return jax.device_put(tree)
    sharding = NamedSharding(mesh, P())

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def split_replicas(tree, mesh, num_seeds: int):
    """Replica axis (leading) over the devices when it divides evenly, else replicated."""
    if mesh is None or num_seeds % jax.device_count():
        return replicate(tree, mesh)
    sharding = NamedSharding(mesh, P("data"))
    return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)


def batch_constraint(mesh):
    """A function that splits a batch (every leaf's leading axis) over the mesh, or None."""
    if mesh is None:
        return None
    sharding = NamedSharding(mesh, P("data"))
    return lambda batch: jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(x, sharding), batch
    )
