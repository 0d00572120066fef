"""Every figure the project writes is readable: no overlapping text, no empty axes.

Each task runs on a tiny configuration with `Run.save_figure` wrapped so that every
figure is checked (tests/figure_check.py) just before it is saved.
"""

import contextlib

import pytest

import train
from experiment.figures import plain_log_label, plain_log_labels, png_bytes, pyplot
from experiment.run import Run
from tests.conftest import TINY_ARGS
from tests.figure_check import problems

TASKS = {
    "running_average": [*TINY_ARGS["running_average"], "--steps=20", "--eval_every=10"],
    "running_average_seeds": [
        *TINY_ARGS["running_average"], "--steps=20", "--eval_every=10", "--num_seeds=3"
    ],
    "scalar_rnn": [],
    "grad_flow": ["--seq_len=20", "--probe_batch=8"],
    "grad_flow_compare": ["--seq_len=20", "--probe_batch=8"],
    "autoencoder": [*TINY_ARGS["autoencoder"], "--steps=20"],
    "autoencoder_masked": [*TINY_ARGS["autoencoder"], "--steps=20", "--kind=masked"],
    "latent_study": [*TINY_ARGS["autoencoder"], "--steps=20", "--latent_sizes=2,4"],
    "linear_ae": ["--steps=200", "--num_train=500", "--lambda_grid=0.01,0.1"],
}  # fmt: skip


def checked_figures(monkeypatch) -> list[str]:
    """Wrap Run.save_figure: every figure's problems are collected, then it is saved.
    Saving draws and measures the figure the cheaper way (each axis's ticks computed
    once, figures.ticks_computed_once; the draw's renderer, figures.drawn_extent): a box
    other than matplotlib's own measure of it, or a PNG other than the one drawn with
    ticks computed wherever matplotlib asks and cropped by its measure, is a problem too."""
    from experiment import figures

    found: list[str] = []
    original = Run.save_figure
    cheaper = figures.drawn_extent

    def compared(fig, renderer):
        box = cheaper(fig, renderer)
        with _ticks_anew(fig):
            theirs = fig.get_tightbbox(fig.canvas.get_renderer())
        if box.bounds != theirs.bounds:
            found.append(f"measured {box.bounds}, matplotlib measures {theirs.bounds}")
        return box

    monkeypatch.setattr(figures, "drawn_extent", compared)

    def save_figure(self, fig, name, step=None):
        plain_log_labels(fig)  # what save_figure draws: the labels' final text
        found.extend(f"{name}.png: {p}" for p in problems(fig))
        with monkeypatch.context() as plain:
            plain.setattr(figures, "ticks_computed_once", lambda _: contextlib.nullcontext())
            plain.setattr(figures, "drawn_extent", _measured_anew)
            theirs = png_bytes(fig, dpi=110)  # Run.save_figure's dpi
        path = original(self, fig, name, step)
        if path.exists() and path.read_bytes() != theirs:
            found.append(f"{name}.png: not the PNG of matplotlib's own draw and crop")
        return path

    monkeypatch.setattr(Run, "save_figure", save_figure)
    return found


@contextlib.contextmanager
def _ticks_anew(fig):
    """Each axis's `_update_ticks` as matplotlib has it (a memo set on the instance by
    png_bytes is set aside for the block)."""
    from experiment.figures import _axes_of

    axes = [axis for ax in fig.axes for axis in _axes_of(ax)]
    set_aside = [vars(axis).pop("_update_ticks", None) for axis in axes]
    try:
        yield
    finally:
        for axis, method in zip(axes, set_aside, strict=True):
            if method is not None:
                axis._update_ticks = method


@pytest.mark.parametrize("case", list(TASKS))
def test_every_figure_of_a_task_is_readable(case, tmp_path, monkeypatch):
    found = checked_figures(monkeypatch)
    task = case.replace("_seeds", "").replace("_masked", "")
    args = [f"--task={task}", *TASKS[case], f"--workdir={tmp_path}", "--wandb=disabled"]
    assert train.main(args) == 0
    assert list(tmp_path.glob("*.png")), "the task wrote no figure"
    assert found == []


def test_mnist_figures_are_readable(tmp_path, monkeypatch, mnist_dir):
    found = checked_figures(monkeypatch)
    args = ["--task=autoencoder", "--dataset=mnist", f"--mnist_dir={mnist_dir}", "--kind=masked",
            "--epochs=0", "--steps=20", "--probe_iterations=3", f"--workdir={tmp_path}",
            "--wandb=disabled"]  # fmt: skip
    assert train.main(args) == 0
    assert found == []


def test_surnames_figures_are_readable(tmp_path, monkeypatch, names_dir):
    found = checked_figures(monkeypatch)
    args = ["--task=surnames", f"--data_dir={names_dir}", "--steps=20", "--eval_every=10",
            f"--workdir={tmp_path}", "--wandb=disabled"]  # fmt: skip
    assert train.main(args) == 0
    assert found == []


@pytest.mark.parametrize(
    ("mathtext", "plain"),
    [
        (r"$\mathdefault{10^{-3}}$", "10⁻³"),
        (r"$\mathdefault{10^{12}}$", "10¹²"),
        (r"$\mathdefault{2\times10^{-3}}$", "2×10⁻³"),
        (r"$\mathdefault{-10^{2}}$", "−10²"),
        (r"$\mathdefault{0.1}$", "0.1"),
        (r"$\mathdefault{0}$", "0"),
        ("", ""),
        (r"$\mathdefault{10^{2.50}}$", r"$\mathdefault{10^{2.50}}$"),  # not ours: kept
        ("a label", "a label"),
    ],
)
def test_a_log_tick_label_becomes_plain_text(mathtext, plain):
    assert plain_log_label(mathtext) == plain


@pytest.mark.parametrize("low, high", [(1e-6, 1e3), (2e-3, 8e-3)])  # decades; minor labels
def test_log_axes_get_plain_labels_at_the_same_ticks(low, high):
    plt = pyplot()
    figures = []
    for plain in (False, True):
        fig, ax = plt.subplots()
        ax.loglog([1, 2, 3], [low, (low * high) ** 0.5, high])
        if plain:
            plain_log_labels(fig)
        fig.canvas.draw()
        figures.append(fig)

    def labels(fig):
        ax = fig.axes[0]
        ticks = ax.yaxis.get_major_ticks() + ax.yaxis.get_minor_ticks()
        return [(t.get_loc(), t.label1.get_text()) for t in ticks]

    default, plain = labels(figures[0]), labels(figures[1])
    for fig in figures:
        plt.close(fig)
    assert [loc for loc, _ in default] == [loc for loc, _ in plain]
    assert [plain_log_label(text) for _, text in default] == [text for _, text in plain]
    shown = [text for _, text in plain if text]
    assert shown and not any("$" in text for text in shown), shown


def _decoded(png: bytes):
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _two_pass(fig) -> bytes:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def test_one_pass_png_is_the_tight_png_up_to_a_few_pixels():
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3), sharey=True)
    for ax in axes:
        ax.semilogy([1, 2, 3], [1e-3, 1e-2, 1e-1], "o-", label="a curve")
        ax.set_xlabel("step")
    axes[0].set_ylabel("a long label on the left of the axes")
    axes[1].legend()
    fig.suptitle("a title above everything")
    plain_log_labels(fig)
    tight = _decoded(_two_pass(fig))
    one = _decoded(png_bytes(fig, dpi=110))
    plt.close(fig)
    # the same picture, up to rounding to whole pixels
    assert abs(one.shape[0] - tight.shape[0]) <= 1 and abs(one.shape[1] - tight.shape[1]) <= 1

    def ink(image):
        return int((image < 250).any(axis=2).sum())

    assert ink(one) == pytest.approx(ink(tight), rel=0.02)


def test_one_pass_png_keeps_a_figure_that_draws_beyond_its_margin():
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([0, 1], [0, 1])
    fig.text(-1.5, 0.5, "far left of the figure")  # 6 inches left of it: past the margin
    one = _decoded(png_bytes(fig, dpi=50))
    tight = _decoded(_two_pass_at(fig, 50))
    plt.close(fig)
    assert one.shape == tight.shape
    assert one.shape[1] > (4 + 2) * 50  # wider than figure and margins: the far text is in


def _two_pass_at(fig, dpi: int) -> bytes:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


@pytest.mark.parametrize("face", ["white", "0.85"])
def test_one_pass_png_crops_on_the_figure_background(face):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4, 3), facecolor=face)
    ax.plot([0, 1], [0, 1])
    one = _decoded(png_bytes(fig, dpi=60))
    plt.close(fig)
    # cropped to the figure's content plus the pad, not the whole margin around it
    assert one.shape[0] < (3 + 1) * 60 and one.shape[1] < (4 + 1) * 60


def test_one_pass_png_drops_the_alpha_channel_only_of_an_opaque_figure():
    """An opaque figure is written as RGB (smaller, faster to compress), with the pixels
    of the RGBA one; a figure with transparent parts keeps its alpha channel."""
    import io

    from PIL import Image

    plt = pyplot()
    for face, mode in (("white", "RGB"), ("none", "RGBA")):
        fig, ax = plt.subplots(figsize=(3, 2), facecolor=face)
        ax.plot([0, 1], [1, 0], label="a line")
        ax.legend()
        image = Image.open(io.BytesIO(png_bytes(fig, dpi=60)))
        rgba = _decoded_rgba(_two_pass_at(fig, 60))
        plt.close(fig)
        assert image.mode == mode
        # the picture savefig writes (RGBA, opaque where the figure is), to a pixel
        assert abs(image.size[0] - rgba.shape[1]) <= 1 and abs(image.size[1] - rgba.shape[0]) <= 1
        assert (rgba[..., 3] == 255).all() == (mode == "RGB")


def _decoded_rgba(png: bytes):
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"))


def test_one_pass_png_of_an_empty_figure_and_of_a_laid_out_one():
    plt = pyplot()
    empty = plt.figure(figsize=(2, 2))
    assert _decoded(png_bytes(empty, dpi=50)).shape[0] > 0  # nothing drawn: still a PNG
    plt.close(empty)
    fig, axes = plt.subplots(1, 3, figsize=(9, 3), layout="tight")
    for ax in axes:
        ax.plot([1, 2], [3, 4])
        ax.set_ylabel("a y label beside its neighbour")
    png = png_bytes(fig, dpi=50)
    assert problems(fig) == []  # laid out once, and still readable
    plt.close(fig)
    assert _decoded(png).shape[1] <= 9 * 50 + 20


class _CheckingRun:
    """A Run stand-in whose save_figure records the figure's problems (figure_check)."""

    def __init__(self):
        self.found: list[str] = []

    def save_figure(self, fig, name, step=None):
        plain_log_labels(fig)
        self.found += [f"{name}.png: {p}" for p in problems(fig)]
        pyplot().close(fig)


@pytest.mark.parametrize(
    "last_step, high, low",
    [
        (2_000_000, 1e5, 1e-12),  # 17 decades, an offset "1e6" on the step axis
        (2000, 6.3e-3, 2.1e-3),  # under a decade: labels like 6×10⁻³, the widest
        (0, 0.5, 0.5),  # one evaluation
    ],
)
def test_the_linear_ae_training_figure_has_room_for_its_widest_labels(last_step, high, low):
    """Its three panels are spaced by fixed settings, not by a layout pass: each panel's
    tick and axis labels must still stay clear of its neighbour's plot."""
    from tasks import linear_ae

    points = 8 if last_step else 0
    history = [
        {
            "step": last_step * i // max(points, 1),
            **{k: high * (low / high) ** (i / max(points, 1)) for k in linear_ae.TRAINING_CURVES},
        }
        for i in range(points + 1)
    ]
    run = _CheckingRun()
    linear_ae.plot_training(linear_ae.Config(weight_decay=0.01), run, history)
    assert run.found == []


def test_a_label_reaching_into_the_next_panel_is_a_problem():
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(6, 3))
    axes[1].set_ylabel("a y label long enough to need room")
    axes[1].semilogy([0, 1], [1e-12, 1e5])
    axes[0].plot([0, 1])
    axes[1].yaxis.label.set_position((0, 0.5))
    fig.subplots_adjust(wspace=0.0)  # no room at all between the panels
    found = problems(fig)
    plt.close(fig)
    assert any("is drawn over 'axes 0'" in p for p in found), found


class _PngRun:
    """A Run stand-in that keeps each saved figure's PNG, saved as Run.save_figure does."""

    def __init__(self):
        self.pngs: dict[str, bytes] = {}

    def save_figure(self, fig, name, step=None):
        plain_log_labels(fig)
        self.pngs[name] = png_bytes(fig, dpi=110)
        pyplot().close(fig)


def _running_average_plots():
    """Two running-average trials' plot_results that differ in every value they draw:
    title, predictions (other seeds), error range, and one seed against three."""
    from tasks import running_average
    from training.loop import FitResult, init_train_state
    from training.optim import make_optimizer

    def plots(last_step_only: bool, seeds: int, decay: float):
        cfg = running_average.Config(num_eval=64, last_step_only=last_step_only,
                                     num_seeds=seeds, seed=seeds)  # fmt: skip
        problem = running_average.make_problem(cfg)
        graphdef, state = init_train_state(problem, make_optimizer(cfg), cfg)
        history = [{"step": s, **{k: [0.1 * decay**i * (1 + r) for r in range(seeds)]
                                  for k in ("mse_all_steps", "mse_last_step")}}
                   for i, s in enumerate(range(0, 3001, 500))]  # fmt: skip
        result = FitResult(graphdef, state.params, seeds, history, {})
        return lambda run: running_average.plot_results(cfg, run, result, problem)

    return plots(False, 1, 0.5), plots(True, 3, 0.05)


def _linear_ae_plots():
    """Two linear-autoencoder trials' figures: 17 decades against one, one lambda
    trained against three."""
    import types

    import numpy as np

    from tasks import linear_ae

    def plots(weight_decay: float, high: float, low: float, lambdas: tuple):
        cfg = linear_ae.Config(weight_decay=weight_decay)
        history = [{"step": 250 * i, **{k: high * (low / high) ** (i / 8)
                                        for k in linear_ae.TRAINING_CURVES}}
                   for i in range(9)]  # fmt: skip
        rng = np.random.default_rng(len(lambdas))
        spec = types.SimpleNamespace(eigenvalues=np.sort(rng.uniform(0.1, 3, 100))[::-1])
        results = {lam: {"singular_values_W2": rng.uniform(0, 1, cfg.latent_dim).tolist()}
                   for lam in lambdas}  # fmt: skip

        def draw(run):
            linear_ae.plot_training(cfg, run, history)
            linear_ae.plot_singular_values(cfg, run, spec, results)

        return draw

    return plots(0.01, 1e5, 1e-12, (0.01,)), plots(0.3, 6e-3, 2e-3, (0.0, 0.003, 0.3))


def _autoencoder_plots():
    """Two autoencoders' reconstruction curves: one seed over a decade, three over four."""
    from tasks import autoencoder
    from training.loop import FitResult

    def plots(seeds: int, decay: float):
        history = [{"step": 100 * i, "recon_mse": [0.1 * decay**i * (1 + r) for r in range(seeds)]}
                   for i in range(6)]  # fmt: skip
        result = FitResult(None, None, seeds, history, {})
        return lambda run: autoencoder.plot_curve(run, result, first_seed=seeds)

    return plots(1, 0.6), plots(3, 0.15)


def _surnames_plots():
    """Two confusion matrices (an image with its aspect kept, a colorbar, rotated tick
    labels), of 18 and of 5 languages."""
    import numpy as np

    from tasks import surnames

    def plots(n: int, seed: int):
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, n, 400)
        predictions = np.where(rng.random(400) < 0.6, labels, rng.integers(0, n, 400))
        languages = [f"Language{i}" for i in range(n)]
        return lambda run: surnames.plot_confusion(run, predictions, labels, languages)

    return plots(18, 0), plots(5, 1)


def _drawn_new_and_reused(earlier, later, monkeypatch) -> tuple[dict, dict]:
    """The PNGs `later(run)` saves on new figures, and on the figures `earlier(run)` used."""
    from experiment import figures

    monkeypatch.setattr(figures, "_REUSABLE", {})
    new = _PngRun()
    later(new)
    reused = _PngRun()
    earlier(reused)
    later(reused)
    return new.pngs, reused.pngs


@pytest.mark.parametrize("plots", [_running_average_plots, _linear_ae_plots, _autoencoder_plots])
def test_a_reused_figure_draws_the_pixels_of_a_new_one(plots, monkeypatch):
    """Figures a worker reuses from trial to trial (reusable_subplots) must show nothing
    of the trial drawn before: each PNG equals the one drawn on a new figure."""

    first, second = plots()
    for earlier, later in ((first, second), (second, first)):
        new, reused = _drawn_new_and_reused(earlier, later, monkeypatch)
        assert new.keys() == reused.keys()
        for name in new:
            assert _decoded(reused[name]).shape == _decoded(new[name]).shape, name
            assert reused[name] == new[name], name


def _measured_anew(fig, renderer):
    """The extent as matplotlib measures it after a draw: a new renderer, ticks
    recomputed wherever they are asked for."""
    return fig.get_tightbbox(fig.canvas.get_renderer())


@pytest.mark.parametrize(
    "plots", [_running_average_plots, _linear_ae_plots, _autoencoder_plots, _surnames_plots]
)
def test_the_cheaper_draw_and_measure_give_matplotlibs_pixels_and_crop(plots, monkeypatch):
    """png_bytes draws and measures with each axis's ticks computed once
    (figures.ticks_computed_once) and measures with the draw's renderer
    (figures.drawn_extent): the PNGs equal those drawn with ticks computed wherever
    matplotlib asks for them and cropped by matplotlib's own measure, on new figures
    and on reused ones, whichever trial comes first (and on an image with a colorbar,
    whose axes' size is set while it is drawn)."""
    from experiment import figures

    first, second = plots()
    drawn = {}
    for measure in ("cheaper", "matplotlib's"):
        if measure != "cheaper":
            monkeypatch.setattr(figures, "drawn_extent", _measured_anew)
            monkeypatch.setattr(figures, "ticks_computed_once", lambda _: contextlib.nullcontext())
        monkeypatch.setattr(figures, "_REUSABLE", {})
        run = _PngRun()
        for plot in (first, second, first):  # new figures, then reused ones
            plot(run)
            drawn[measure, plot, len(drawn)] = dict(run.pngs)
    cheaper = [pngs for (m, *_), pngs in drawn.items() if m == "cheaper"]
    theirs = [pngs for (m, *_), pngs in drawn.items() if m != "cheaper"]
    assert cheaper == theirs


def test_the_cheaper_measure_leaves_the_axes_as_they_were():
    """png_bytes's per-axis tick memo is taken back: the next draw computes ticks anew
    (new limits give new ticks), and a method set on an axis before is kept."""
    from experiment import figures

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.semilogy([1, 2], [1e-3, 1e3])
    figures.png_bytes(fig, dpi=50)
    assert "_update_ticks" not in vars(ax.xaxis) and "_update_ticks" not in vars(ax.yaxis)
    ax.set_ylim(1e-9, 1e9)
    figures.png_bytes(fig, dpi=50)
    assert min(ax.get_yticks()) <= 1e-9
    own = ax.xaxis._update_ticks
    ax.xaxis._update_ticks = own  # an instance attribute of its own
    figures.png_bytes(fig, dpi=50)
    assert vars(ax.xaxis)["_update_ticks"] is own
    plt.close(fig)


def test_an_emptied_figure_keeps_nothing_of_a_different_plot(monkeypatch):
    """What the earlier plot set and the later does not (log scales, titles, a legend,
    texts, a band, a suptitle) is gone from the reused figure."""
    from experiment import figures

    def earlier(run):
        fig, axes = figures.reusable_subplots("any", 1, 2, figsize=(6, 3))
        for ax in axes:
            ax.loglog([1, 10, 100], [1e-3, 1e-1, 1e2], label="a curve")
            ax.fill_between([1, 100], [1e-4, 1e-2], [1, 1e3], alpha=0.3)
            ax.set_title("a title")
            ax.set_xlabel("x")
            ax.text(10, 1, "a note")
            ax.legend()
        fig.suptitle("a suptitle")
        run.save_figure(fig, "figure")

    def later(run):
        fig, axes = figures.reusable_subplots("any", 1, 2, figsize=(6, 3))
        for ax in axes:
            ax.plot([0, 1, 2], [3, 1, 2])
        run.save_figure(fig, "figure")

    new, reused = _drawn_new_and_reused(earlier, later, monkeypatch)
    assert reused["figure"] == new["figure"]
