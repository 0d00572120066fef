"""The vmap axis of replicas that train in one program (`num_seeds`, packed trials).

Under `jax.vmap`, a `lax.cond` whose predicate differs between replicas becomes a
select: both branches run. Model code whose skip is only an optimisation (the
recurrent layers skip steps that are padding in every row) can instead skip a step
when it is skippable in every replica: `any_replica(pred)` is `pred` reduced over
the replicas' axis (a `lax.pmax`, unbatched, so the cond stays a cond) while the
trainer traces its vmapped step inside `replica_axis(name)`, and `pred` itself
anywhere else. The result is the same either way; only the work differs.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax
from jax import lax

_AXIS: contextvars.ContextVar[str | None] = contextvars.ContextVar("replica_axis", default=None)


@contextlib.contextmanager
def replica_axis(name: str) -> Iterator[None]:
    """Code traced in this block runs under `jax.vmap(..., axis_name=name)`."""
    token = _AXIS.set(name)
    try:
        yield
    finally:
        _AXIS.reset(token)


def any_replica(pred: jax.Array) -> jax.Array:
    """`pred` (a boolean scalar) or-ed over the replicas, when traced inside
    `replica_axis`; else `pred`."""
    axis = _AXIS.get()
    return pred if axis is None else lax.pmax(pred, axis)
