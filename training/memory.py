"""Will it fit? Sizes are checked against the memory available before they are allocated.

A size that cannot fit (`--hidden_size=1e9`) would otherwise make the machine swap
for minutes or kill the process with no message. The loop checks the abstract
training state (shapes only, nothing allocated) before initialising it, and the
first compiled step's buffers (XLA's own accounting) before running it.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from experiment.errors import UsageError

# What a train step holds besides the state: the gradients, the updates and the new
# state before the old one is freed (donation aliases some of it; this is the bound).
STEP_STATE_COPIES = 3


def tree_bytes(tree) -> int:
    """Bytes of every array (or ShapeDtypeStruct) in `tree`."""
    return int(
        sum(
            int(np.prod(x.shape, dtype=np.float64)) * np.dtype(x.dtype).itemsize
            for x in jax.tree.leaves(tree)
            if hasattr(x, "shape") and hasattr(x, "dtype")
        )
    )


def available_bytes() -> int | None:
    """Memory a new allocation may use on the default device: the accelerator's free
    memory, or the host's MemAvailable on CPU; None when unknown."""
    device = jax.local_devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(nbytes) < 1024 or unit == "PiB":
            return f"{nbytes:.3g} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


SIZE_OPTIONS = "the sizes (e.g. --hidden_size, --latent_dim, --batch_size, --num_seeds)"


def require(nbytes: int, what: str, reduce: str = SIZE_OPTIONS) -> None:
    """UsageError when `nbytes` (described by `what`) exceeds the memory available;
    `reduce` names the options that set the size."""
    available = available_bytes()
    if available is not None and nbytes > available:
        raise UsageError(
            f"{what} needs about {human(nbytes)} but {human(available)} of memory is "
            f"available; reduce {reduce}"
        )


def compiled_bytes(compiled) -> int | None:
    """What running a compiled executable allocates beyond its (already allocated)
    arguments: outputs not aliased to donated inputs, plus temporaries (XLA's accounting)."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # not every backend reports it
        return None
    if stats is None:
        return None
    return int(stats.output_size_in_bytes + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def require_model(make_model, what: str = "the model") -> None:
    """UsageError when the parameters `make_model()` would create cannot fit; checked on
    shapes alone (nnx.eval_shape), before anything is allocated. For models built
    outside the training loop, which checks its own state."""
    from flax import nnx

    require(tree_bytes(nnx.state(nnx.eval_shape(make_model))), what)
