"""Is a figure readable at a glance? No two texts overlap, no text lies over another
panel's plot, and no axes is empty."""

from __future__ import annotations

import itertools


def texts_of(fig) -> list:
    """Every visible, non-empty text of a figure: titles, axis labels, tick labels, legend
    entries, annotations, the suptitle, figure legends."""
    texts = figure_texts(fig)
    for ax in fig.axes:
        texts += axes_texts(ax)
    return texts


def figure_texts(fig) -> list:
    """The figure's own visible texts: the suptitle, fig.text, figure legends."""
    texts = [t for t in fig.texts]
    for legend in fig.legends:
        texts += list(legend.get_texts())
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


def axes_texts(ax) -> list:
    """One axes' visible texts: titles, axis and tick labels, annotations, its legend."""
    texts = [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label]
    texts += shown_tick_labels(ax.xaxis, ax.get_xlim()) + shown_tick_labels(ax.yaxis, ax.get_ylim())
    texts += [ax.xaxis.get_offset_text(), ax.yaxis.get_offset_text()]
    texts += list(ax.texts)
    if ax.get_legend() is not None:
        texts += list(ax.get_legend().get_texts())
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


def shown_tick_labels(axis, limits) -> list:
    """The tick labels matplotlib draws: those of ticks inside the view limits (it also
    keeps labels of ticks just outside, which are never drawn)."""
    low, high = sorted(limits)
    span = (high - low) * 1e-9
    labels = []
    for tick in axis.get_major_ticks() + axis.get_minor_ticks():
        if low - span <= tick.get_loc() <= high + span:
            labels += [tick.label1, tick.label2]
    return labels


def overlaps(fig, gap: float = 2.0) -> list[tuple[str, str]]:
    """Pairs of texts whose drawn boxes overlap or come closer than `gap` pixels (texts
    that touch read as one: "inputoutput from it")."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts_of(fig)]
    found = []
    for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
        width = min(box_a.x1, box_b.x1) - max(box_a.x0, box_b.x0)
        height = min(box_a.y1, box_b.y1) - max(box_a.y0, box_b.y0)
        if width > -gap and height > -gap:
            found.append((a, b))
    return found


def intrusions(fig) -> list[tuple[str, str]]:
    """(text, axes) pairs where a text of the figure or of one axes is drawn over another
    axes' plotting area (e.g. a panel's y label reaching into its left neighbour)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    panels = [ax for ax in fig.axes if ax.get_visible()]
    owned = [(None, t) for t in figure_texts(fig)]
    owned += [(ax, t) for ax in panels for t in axes_texts(ax)]
    found = []
    for i, other in enumerate(panels):
        area = other.get_window_extent(renderer)
        for owner, text in owned:
            if owner is other:
                continue
            box = text.get_window_extent(renderer)
            if box.x1 > area.x0 and box.x0 < area.x1 and box.y1 > area.y0 and box.y0 < area.y1:
                found.append((text.get_text(), other.get_title() or f"axes {i}"))
    return found


def empty_axes(fig) -> list[str]:
    """Titles (or indices) of visible axes that show no data at all."""
    empty = []
    for i, ax in enumerate(fig.axes):
        if not ax.get_visible() or ax.get_label() == "<colorbar>":
            continue
        # a line needs two points, or a marker, to show anything
        drawn = [
            line
            for line in ax.lines
            if len(line.get_xdata()) > 1
            or (len(line.get_xdata()) == 1 and line.get_marker() not in (None, "None", "", " "))
        ]
        drawn += list(ax.collections) + list(ax.images) + list(ax.patches) + list(ax.texts)
        if not drawn:
            empty.append(ax.get_title() or f"axes {i}")
    return empty


def problems(fig) -> list[str]:
    """What makes `fig` hard to read, as sentences (empty when it is fine)."""
    out = [f"texts overlap: {a!r} and {b!r}" for a, b in overlaps(fig)]
    out += [f"text {a!r} is drawn over {b!r}" for a, b in intrusions(fig)]
    out += [f"empty axes: {name}" for name in empty_axes(fig)]
    return out
