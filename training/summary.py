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


def without_undefined(values: Mapping[str, float]) -> dict[str, float]:
    """`values` less the entries that are NaN because the quantity is undefined (a slope
    through fewer than two points, a ratio to zero). summary.json records only numbers:
    a missing key means "not defined for this run", while a NaN left in a summary makes
    the run fail (experiment.run.Run.finish)."""
    return {k: v for k, v in values.items() if not (isinstance(v, float) and np.isnan(v))}
