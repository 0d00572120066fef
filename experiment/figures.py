"""Matplotlib for files, not windows: the one place that picks the backend."""

from __future__ import annotations

import functools


@functools.cache
def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend (figures are saved as PNG;
    no display is needed, and none is touched). Imported lazily: plotting is the last
    thing a run does, and the import costs about half a second."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_over_seeds(ax, steps, values, label: str, color: str, first_seed: int = 0) -> None:
    """A curve of one run, or of several replicas (values (len(steps), S)): then the mean
    (labelled with the seed count), a band of +-1 std, and thin per-seed lines labelled
    once with the seeds they are. Points are marked: one evaluation still shows.
    Uses a log y axis (held-out losses span decades)."""
    import numpy as np

    values = np.asarray(values, dtype=float).reshape(len(steps), -1)
    seeds = values.shape[1]
    marker = dict(marker="o", markersize=3)
    if seeds == 1:
        ax.semilogy(steps, values[:, 0], color=color, label=label, **marker)
        return
    mean, std = values.mean(axis=1), values.std(axis=1, ddof=1)
    ax.semilogy(
        steps, mean, color=color, lw=2, label=f"{label}: mean of {seeds} seeds ±1 std", **marker
    )
    # a band on a log axis: clip at a fraction of the mean so it stays positive
    ax.fill_between(steps, np.maximum(mean - std, mean * 1e-3), mean + std, color=color, alpha=0.2)
    last = first_seed + seeds - 1
    for i in range(seeds):
        ax.semilogy(steps, values[:, i], color=color, lw=0.6, alpha=0.6,
                    label=f"{label}: seeds {first_seed}..{last}" if i == 0 else None)  # fmt: skip
