"""What a trial's figures cost to save: savefig's two-pass tight crop against the
one-pass render of `experiment.figures.png_bytes`, figures built anew for every
trial against figures a worker reuses (`experiment.figures.reusable_subplots`),
and TensorBoard's image logging.

    python benchmarks/figure_saving.py [--repeats 12]

The figures are the tasks' own (`tasks/running_average.plot_results`: three per
trial; `tasks/linear_ae.plot_training` and `plot_singular_values`: two), drawn
for every save from a small model's values, the ways interleaved so that the
shared machine's drift hits them alike: two-pass and one-pass on new figures (what
a process per trial draws), one-pass on reused figures (what a study's worker
draws from its second trial on), the same with each axis's ticks computed
wherever the draw and the measure ask for them (instead of once,
`experiment.figures.ticks_computed_once`), and the same also measured as
matplotlib measures a drawn figure (instead of `experiment.figures.drawn_extent`).
Printed:
milliseconds per trial's figures each way, and per image logged to TensorBoard
(the PNG as written, against
tensorboardX's add_image, which decodes, rescales and encodes it again). The
numbers go in BENCHMARKS.md ("Whole studies").
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiment.figures import plain_log_labels, png_bytes, pyplot


class Saver:
    """A Run stand-in whose save_figure saves one way and keeps the last PNG."""

    def __init__(self, one_pass: bool):
        self.one_pass, self.png = one_pass, b""

    def save_figure(self, fig, name, step=None):
        plain_log_labels(fig)
        if self.one_pass:
            self.png = png_bytes(fig, dpi=110)
        else:
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
            self.png = buffer.getvalue()
        pyplot().close(fig)


def running_average_figures():
    """plot_results(run) of a small untrained RNN with a 7-point evaluation history."""
    from tasks import running_average
    from training.loop import FitResult, init_train_state
    from training.optim import make_optimizer

    cfg = running_average.Config(num_eval=200)
    problem = running_average.make_problem(cfg)
    graphdef, state = init_train_state(problem, make_optimizer(cfg), cfg)
    history = [
        {"step": s, "mse_all_steps": 0.1 * 0.5**i, "mse_last_step": 0.2 * 0.6**i}
        for i, s in enumerate(range(0, 3001, 500))
    ]
    result = FitResult(graphdef, state.params, 1, history, {})
    return lambda run: running_average.plot_results(cfg, run, result, problem)


def linear_ae_figures():
    """plot_training and plot_singular_values of a decaying 5-point history."""
    from tasks import linear_ae

    cfg = linear_ae.Config(weight_decay=0.01)
    rng = np.random.default_rng(0)
    keys = ("subspace_distance", "orthonormality_error", "imbalance")
    history = [{"step": s, **{k: 10 ** -(s / 800) for k in keys}} for s in range(0, 2001, 500)]
    spec = types.SimpleNamespace(eigenvalues=np.sort(rng.uniform(0.1, 3, 100))[::-1])
    results = {0.01: {"singular_values_W2": rng.uniform(0, 1, cfg.latent_dim).tolist()}}

    def draw(run):
        linear_ae.plot_training(cfg, run, history)
        linear_ae.plot_singular_values(cfg, run, spec, results)

    return draw


# png_bytes with each axis's ticks computed wherever asked for (figures.ticks_computed_once
# off), and also with the figure measured as matplotlib measures it after a draw (a new
# renderer) instead of `figures.drawn_extent`
TICKS_ANEW = "one-pass, reused, ticks anew"
REMEASURED = "one-pass, reused, ticks and measure anew"


def _measured_anew(fig, renderer):
    return fig.get_tightbbox(fig.canvas.get_renderer())


def per_trial_ms(draw, repeats: int) -> dict[str, float]:
    """Milliseconds per trial's figures each way, interleaved."""
    from experiment import figures

    # the reused figures, kept from one draw to the next (each way its own)
    kept: dict[str, dict] = {"one-pass, reused": {}, TICKS_ANEW: {}, REMEASURED: {}}
    cheaper, once = figures.drawn_extent, figures.ticks_computed_once

    def draw_as(mode: str) -> None:
        figures._REUSABLE = kept.get(mode, {})  # else: new figures
        figures.drawn_extent = _measured_anew if mode == REMEASURED else cheaper
        if mode in (TICKS_ANEW, REMEASURED):
            figures.ticks_computed_once = lambda fig: contextlib.nullcontext()
        try:
            draw(Saver(one_pass=mode != "two-pass"))
        finally:
            figures.drawn_extent, figures.ticks_computed_once = cheaper, once

    modes = ["two-pass", "one-pass", "one-pass, reused", TICKS_ANEW, REMEASURED]
    totals = dict.fromkeys(modes, 0.0)
    for mode in totals:  # warm: imports, fonts, compiled predictions, the reused figures
        draw_as(mode)
    for _ in range(repeats):
        for mode in totals:
            start = time.perf_counter()
            draw_as(mode)
            totals[mode] += time.perf_counter() - start
    return {k: 1000 * v / repeats for k, v in totals.items()}


def tensorboard_image_ms(png: bytes, repeats: int) -> dict[str, float]:
    """Milliseconds per image logged: the PNG as it is against add_image."""
    import matplotlib.image
    from tensorboardX import SummaryWriter

    from experiment.writers import TensorBoardWriter

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "figure.png"
        path.write_bytes(png)
        ours = TensorBoardWriter(Path(directory) / "ours")
        theirs = SummaryWriter(logdir=str(Path(directory) / "theirs"))
        totals = {"PNG as written": 0.0, "add_image": 0.0}
        for step in range(repeats + 1):
            start = time.perf_counter()
            ours.image("figure", path, step)
            middle = time.perf_counter()
            pixels = matplotlib.image.imread(str(path))[..., :3]
            theirs.add_image("figure", pixels, step, dataformats="HWC")
            end = time.perf_counter()
            if step:  # the first is a warm-up
                totals["PNG as written"] += middle - start
                totals["add_image"] += end - middle
        ours.close()
        theirs.close()
    return {k: 1000 * v / repeats for k, v in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=12)
    args = parser.parse_args()
    for name, figures in (
        ("running_average (3 figures)", running_average_figures()),
        ("linear_ae (2 figures)", linear_ae_figures()),
    ):
        ms = per_trial_ms(figures, args.repeats)
        print(f"{name}, ms per trial (x two-pass): " + ", ".join(
            f"{mode} {v:.0f} ({v / ms['two-pass']:.2f}x)" for mode, v in ms.items()),
            flush=True)  # fmt: skip
    saver = Saver(one_pass=True)
    running_average_figures()(saver)
    ms = tensorboard_image_ms(saver.png, args.repeats)
    print("TensorBoard image: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items()))


if __name__ == "__main__":
    main()
