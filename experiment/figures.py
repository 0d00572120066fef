"""Matplotlib for files, not windows: the one place that picks the backend."""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterator


@functools.cache
def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend (figures are saved as PNG;
    no display is needed, and none is touched). Imported lazily: plotting is the last
    thing a run does, and the import costs about half a second."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# Figures kept for the next run of this process: {key: (fig, axes)}.
_REUSABLE: dict = {}


def reusable_subplots(name: str, nrows: int = 1, ncols: int = 1, *, figsize, **subplot_kw):
    """`pyplot.subplots(nrows, ncols, figsize=figsize, **subplot_kw)` built once per
    process for each name and arguments: later calls return the same figure and axes,
    emptied of what a plot puts in them (`empty_figure`), to draw a run's values again.

    A study's worker draws the same figures for trial after trial. Building the axes
    and their tick objects is about 40% of a small figure's cost (BENCHMARKS.md), and
    a reused figure draws the same pixels as a new one (tests/test_figures.py). The
    figure is not pyplot's: closing it (Run.save_figure does) leaves it for reuse."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    key = (name, nrows, ncols, tuple(figsize), tuple(sorted(subplot_kw.items())))
    if key in _REUSABLE:
        fig, axes = _REUSABLE[key]
        empty_figure(fig)
        return fig, axes
    pyplot()  # the Agg backend and matplotlib's settings, as for every figure
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, **subplot_kw)
    _REUSABLE[key] = fig, axes
    return fig, axes


def empty_figure(fig) -> None:
    """Take back what plotting put in `fig`: every axes' data (lines, collections,
    patches, images, texts), legend, title and labels, log scales, data limits and
    colour cycle; the figure's texts (suptitle) and legends. Its axes, their layout
    and their tick objects stay."""
    import matplotlib

    for legend in list(fig.legends):
        legend.remove()
    for text in list(fig.texts):
        text.set_text("")  # the suptitle is kept for fig.suptitle to set again
    fig.set_dpi(matplotlib.rcParams["figure.dpi"])  # as built (png_bytes changes it)
    for ax in fig.axes:
        for artist in [*ax.lines, *ax.collections, *ax.patches, *ax.images, *ax.texts]:
            artist.remove()
        if ax.get_legend() is not None:
            ax.get_legend().remove()
        for title in (ax.title, ax._left_title, ax._right_title):
            title.set_text("")
        ax.set_xlabel("")
        ax.set_ylabel("")
        ax.set_xscale("linear")
        ax.set_yscale("linear")
        ax.set_prop_cycle(None)
        ax.set_autoscale_on(True)
        ax.relim()


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


# What matplotlib's LogFormatterSciNotation writes: [-][COEFF\\times]BASE[^{EXPONENT}]
_MATHTEXT_LOG_LABEL = re.compile(
    r"\$\\mathdefault\{(-?)(?:([0-9.]+)\\times)?([0-9.]+)(?:\^\{(-?\d+)\})?\}\$"
)
# Superscripts for exponents; "-" becomes the superscript minus.
_SUPERSCRIPT = str.maketrans("0123456789-", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻")


def plain_log_label(label: str) -> str:
    """A log axis's mathtext tick label as plain Unicode text: `$\\mathdefault{10^{-3}}$`
    -> `10⁻³`, `$\\mathdefault{2\\times10^{-3}}$` -> `2×10⁻³`. A label of another form
    is returned as it was."""
    match = _MATHTEXT_LOG_LABEL.fullmatch(label)
    if match is None:
        return label
    sign, coeff, base, exponent = match.groups()
    text = f"{coeff}×{base}" if coeff else base
    if exponent is not None:
        text += exponent.translate(_SUPERSCRIPT)
    return ("−" if sign else "") + text


@functools.cache
def _plain_log_formatter():
    from matplotlib.ticker import LogFormatterSciNotation

    class PlainLogFormatter(LogFormatterSciNotation):
        """matplotlib's log-axis labels (same ticks, same values), as plain text."""

        def __call__(self, x, pos=None):
            return plain_log_label(super().__call__(x, pos))

    return PlainLogFormatter


def plain_log_labels(fig) -> None:
    """Give every log axis of `fig` plain-text tick labels (10⁻³) instead of mathtext.

    They look the same, but matplotlib parses each mathtext label anew whenever its
    small cache misses: about half of the linear autoencoder's figure time
    (BENCHMARKS.md, "Whole studies"). Formatters a plot set itself are left alone."""
    from matplotlib.ticker import LogFormatterSciNotation

    plain = _plain_log_formatter()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            for formatter in (axis.get_major_formatter(), axis.get_minor_formatter()):
                if type(formatter) is LogFormatterSciNotation:  # matplotlib's default
                    # the same object and settings, only its labels' text changes
                    formatter.__class__ = plain


# Room drawn around the figure in the one pass of `png_bytes`, for texts that stick
# out of it (tick and axis labels left of the axes, a suptitle above): inches.
_MARGIN_INCHES = 1.0


def png_bytes(fig, dpi: int) -> bytes:
    """`fig` as PNG, cropped as `savefig(bbox_inches="tight")` crops it, in one draw.

    savefig draws a figure twice for a tight crop: once to measure its extent, once to
    render it. Here it is rendered once, with a margin around it, then measured
    (`drawn_extent`, with what the draw computed; each axis's ticks computed once for
    both, `ticks_computed_once`) and cropped: 15% less time for a
    running-average trial's figures (benchmarks/figure_saving.py). A figure that
    draws beyond the margin (e.g. a legend far outside the axes) is saved the
    two-pass way. The figure is left at `dpi`, laid out (it is closed next)."""
    import io

    import matplotlib
    import numpy as np
    from matplotlib.transforms import Bbox
    from PIL import Image

    fig.set_dpi(dpi)  # laid out and measured at the dpi it is drawn at (text sizes depend on it)
    engine = fig.get_layout_engine()
    if engine is not None:
        # lay the figure out once and keep it so: savefig would lay it out again
        engine.execute(fig)
        fig.set_layout_engine("none")
    width, height = fig.get_size_inches()
    margin = _MARGIN_INCHES
    region = Bbox.from_extents(-margin, -margin, width + margin, height + margin)
    raw = io.BytesIO()
    drawn_by = []  # the renderer of the draw: its text metrics are cached for the measure
    listener = fig.canvas.mpl_connect("draw_event", lambda event: drawn_by.append(event.renderer))
    try:
        with ticks_computed_once(fig):  # asked for 8 to 12 times per axis otherwise
            fig.savefig(raw, format="rgba", dpi=dpi, bbox_inches=region)
            renderer = drawn_by[-1] if drawn_by else fig.canvas.get_renderer()
            tight = drawn_extent(fig, renderer).padded(matplotlib.rcParams["savefig.pad_inches"])
    finally:
        fig.canvas.mpl_disconnect(listener)
    out = io.BytesIO()
    if not region.contains(tight.x0, tight.y0) or not region.contains(tight.x1, tight.y1):
        fig.savefig(out, format="png", dpi=dpi, bbox_inches="tight")
        return out.getvalue()
    image = np.frombuffer(raw.getbuffer(), np.uint8).reshape(-1, int(region.width * dpi), 4)
    # pixel rows count from the top of the drawn region
    left, right = (round((x + margin) * dpi) for x in (tight.x0, tight.x1))
    top, bottom = (round((height + margin - y) * dpi) for y in (tight.y1, tight.y0))
    pixels = image[top:bottom, left:right]
    if (pixels[..., 3] == 255).all():
        # opaque (a figure's usual background): RGB, a tenth smaller than RGBA and
        # faster to compress (benchmarks/figure_saving.py); the same picture
        pixels = np.ascontiguousarray(pixels[..., :3])
    Image.fromarray(pixels).save(out, format="png", dpi=(dpi, dpi))
    return out.getvalue()


def drawn_extent(fig, renderer):
    """`fig.get_tightbbox(renderer)` of a figure `renderer` has just drawn: the same box
    (tests/test_figures.py) with less work than matplotlib's own measure after a draw.

    The draw's own renderer holds the texts' metrics from the draw (matplotlib caches
    them per renderer). A new renderer, which `canvas.get_renderer()` makes for the
    figure's own size after a draw of a larger region, lays every text out again.
    Keeping the canvas on one renderer also lets a reused figure's next draw hit that
    cache."""
    return fig.get_tightbbox(renderer)


@contextlib.contextmanager
def ticks_computed_once(fig) -> Iterator[None]:
    """Each axis of `fig` computes its ticks once in the block: later requests get the
    first answer. A draw asks 3 to 5 times per axis (the axis itself, its label's
    position beside the tick labels, the title's position), the measure after it 5 to 7
    more times (the tasks' figures, counted); the figure does not change in between,
    so every answer is the same: the same pixels and box (tests/test_figures.py) for
    less time (benchmarks/figure_saving.py). `_update_ticks` is matplotlib's private
    method; where it does not exist, nothing changes. Taken back at the end: the next
    draw computes ticks anew."""
    axes = [axis for ax in fig.axes for axis in _axes_of(ax) if hasattr(axis, "_update_ticks")]
    own = [axis.__dict__.get("_update_ticks") for axis in axes]  # set on the instance: none
    for axis in axes:
        axis._update_ticks = _computed_once(axis._update_ticks)  # this instance only
    try:
        yield
    finally:
        for axis, method in zip(axes, own, strict=True):
            if method is None:
                del axis._update_ticks  # the class's method again
            else:
                axis._update_ticks = method


def _axes_of(ax) -> list:
    """The x, y (and a 3-d plot's z) axis of a matplotlib Axes."""
    return [getattr(ax, name) for name in ("xaxis", "yaxis", "zaxis") if hasattr(ax, name)]


def _computed_once(update_ticks: Callable[[], list]) -> Callable[[], list]:
    """`update_ticks`, called once: later calls return its first result."""
    result: list = []

    def once() -> list:
        if not result:
            result.append(update_ticks())
        return result[0]

    return once
