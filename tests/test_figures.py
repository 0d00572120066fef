"""Every figure the project writes is readable: no overlapping text, no empty axes.

Each task runs on a tiny configuration with `Run.save_figure` wrapped so that every
figure is checked (tests/figure_check.py) just before it is saved.
"""

import pytest

import train
from experiment.figures import plain_log_label, plain_log_labels, pyplot
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
    """Wrap Run.save_figure: every figure's problems are collected, then it is saved."""
    found: list[str] = []
    original = Run.save_figure

    def save_figure(self, fig, name, step=None):
        plain_log_labels(fig)  # what save_figure draws: the labels' final text
        found.extend(f"{name}.png: {p}" for p in problems(fig))
        return original(self, fig, name, step)

    monkeypatch.setattr(Run, "save_figure", save_figure)
    return found


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
