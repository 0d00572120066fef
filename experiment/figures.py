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
