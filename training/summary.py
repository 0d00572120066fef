"""Flat summary values from per-replica metrics."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def replica_summary(metrics: Mapping[str, np.ndarray], prefix: str = "") -> dict[str, float | list]:
    """{prefix+name: value} for scalars; with replicas (shape (S,)): the mean, plus
    `_std` (spread over seeds) and `_per_seed` (the S values)."""
    out: dict[str, float | list] = {}
    for name, value in metrics.items():
        value = np.asarray(value, dtype=np.float64)
        key = f"{prefix}{name}"
        if value.ndim == 0:
            out[key] = float(value)
        else:
            out[key] = float(value.mean())
            out[f"{key}_std"] = float(value.std(ddof=1)) if value.size > 1 else 0.0
            out[f"{key}_per_seed"] = value.tolist()
    return out
