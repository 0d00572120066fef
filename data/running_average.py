"""Running-average regression: x ~ N(0, 1) of shape (N, T, 1), target y_t = mean(x_1..x_t)."""

from __future__ import annotations

import numpy as np


def running_average_targets(x_NxTx1: np.ndarray) -> np.ndarray:
    """y_t = (x_1 + ... + x_t) / t along the time axis."""
    steps = np.arange(1, x_NxTx1.shape[1] + 1, dtype=x_NxTx1.dtype)
    return np.cumsum(x_NxTx1, axis=1) / steps[None, :, None]


def make_running_average(num: int, seq_len: int, seed: int) -> dict[str, np.ndarray]:
    """{'x': (num, seq_len, 1), 'y': same shape}, float32, reproducible from `seed`."""
    x = np.random.default_rng(seed).standard_normal((num, seq_len, 1)).astype(np.float32)
    return {"x": x, "y": running_average_targets(x)}
