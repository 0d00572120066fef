"""Reproduce the whole study with one command: every experiment, figure and number.

    python report.py [--quick] [--out DIR] [--mnist_dir DIR] [--names_dir DIR] [--set KEY=VALUE ...]
                     [--workers W] [--no_pack]

Runs each experiment of the project as a `train.py` run under DIR/runs/ (through
the study executor: `--workers` long-lived processes, compatible experiments
packed into one program, experiment.study) and writes DIR/README.md: one
section per question, with the figures, a table of the measured numbers, the
exact command, and an explanation generated from those numbers (a number that
contradicts the expected finding is flagged as a mismatch, not hidden). DIR/report.json holds
the same numbers.

- A run whose workdir already holds a summary for the same config is reused; an
  unfinished one of the same config (an interrupted report) resumes from its
  checkpoints.
- A failed experiment is reported as failed in its section; the rest goes on.
- Missing optional data (MNIST, surnames) is reported with how to provide it.
- --quick shrinks every experiment (said so in the report); under 10 minutes
  on 2 CPU cores. --set KEY=VALUE overrides an option in every experiment whose
  task has it (e.g. --set steps=20 for a smoke test).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import itertools
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from experiment.config import build_config, to_dict, tokenize
from experiment.errors import UsageError, command_exit_code
from experiment.study import Result, Trial, failure_message, run_trials
from experiment.workdir import (
    SUMMARY_FILE,
    json_ready,
    read_json_object,
    write_bytes_atomic,
    write_json_atomic,
)

REPO = Path(__file__).resolve().parent
SHARED = REPO.parent / "shared" / "data"


@dataclasses.dataclass
class Experiment:
    name: str
    task: str
    args: list[str]
    quick: list[str] = dataclasses.field(default_factory=list)  # replaces args' keys in --quick
    needs: str | None = None  # "mnist" or "names"
    # About how many seconds the experiment takes in --quick beside another worker on
    # the 2-core CPU (BENCHMARKS.md). It only sets the order the runs start in:
    # costliest first (`run_order`; the full settings keep about the same order).
    # Without an estimate an experiment starts among the last, the short ones.
    seconds: float = 1.0


@dataclasses.dataclass
class Outcome:
    experiment: Experiment
    command: str
    summary: dict | None = None
    error: str | None = None
    reused: bool = False

    @property
    def ok(self) -> bool:
        return self.summary is not None


@dataclasses.dataclass
class Section:
    title: str
    experiments: list[Experiment]
    figures: list[tuple[str, str]]  # (experiment name, png name)
    table: Callable[[dict[str, Outcome]], tuple[list[str], list[list]]]
    explain: Callable[[dict[str, Outcome]], list[str]]


# ---------------------------------------------------------------- formatting


def fmt(value) -> str:
    """How every number appears in the report (and in report.json's 'shown')."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def get(outcomes: dict[str, Outcome], name: str, key: str):
    outcome = outcomes.get(name)
    return None if outcome is None or not outcome.ok else outcome.summary.get(key)


# How the claims of this report came out, for its header; `main` resets it and sets
# whether the settings are the quick ones.
TALLY: collections.Counter = collections.Counter()
QUICK = {"on": False}


def check(condition: bool | None, claim: str, contrary: str, full_only: bool = False) -> str:
    """A generated sentence: the claim when the numbers support it, else a flagged mismatch.

    full_only: the claim is a target stated for the documented (full) settings; at quick
    settings it is reported as not checked instead of judged.
    """
    if full_only and QUICK["on"]:
        TALLY["not checked"] += 1
        return f"*Not checked at quick settings (a target of the full settings):* {claim}"
    if condition is None:
        TALLY["not checked"] += 1
        return f"(not measured: {claim})"
    TALLY["confirmed" if condition else "mismatch"] += 1
    return claim if condition else f"**Mismatch:** {contrary}"


# -------------------------------------------------------------- the sections


# Seconds per running-average experiment: half of its packed pair's job (the program's
# compilation and training, then both runs' evaluations and figures).
RA_SECONDS = {("rnn", 1): 3.5, ("rnn", 2): 4.5, ("lstm", 1): 4.5, ("lstm", 2): 7.0}


def _ra(name, cell, layers, last):
    args = [f"--cell={cell}", f"--num_layers={layers}", f"--last_step_only={str(last).lower()}"]
    seconds = RA_SECONDS[cell, layers]
    return Experiment(name, "running_average", args, quick=["--steps=800"], seconds=seconds)


RA = [
    _ra(f"ra_{c}{layers}_{'last' if last else 'all'}", c, layers, last)
    for c in ("rnn", "lstm")
    for layers in (1, 2)
    for last in (False, True)
]


def ra_table(o):
    header = ["run", "train MSE", "held-out MSE (all steps)", "held-out MSE (last step)", "train s"]
    rows = [
        [
            e.name,
            get(o, e.name, "train_loss"),
            get(o, e.name, "eval_mse_all_steps"),
            get(o, e.name, "eval_mse_last_step"),
            get(o, e.name, "train_seconds"),
        ]
        for e in RA
    ]
    return header, rows


def ra_explain(o):
    one, two = get(o, "ra_rnn1_all", "train_loss"), get(o, "ra_rnn2_all", "train_loss")
    last_all = get(o, "ra_rnn1_last", "eval_mse_all_steps")
    last_last = get(o, "ra_rnn1_last", "eval_mse_last_step")
    return [
        check(
            None if one is None else one < 0.01,
            f"The 1-layer RNN reaches a training MSE of {fmt(one)}, below the 0.01 target.",
            f"the 1-layer RNN's training MSE {fmt(one)} is not below 0.01.",
        ),
        check(
            None if two is None else two < 0.001,
            f"The 2-layer RNN reaches {fmt(two)}, below the 0.001 target.",
            f"the 2-layer RNN's training MSE {fmt(two)} is not below 0.001.",
            full_only=True,  # 3000 steps; --quick trains 800 (about 0.004 there)
        ),
        check(
            None if last_all is None or last_last is None else last_all > 10 * last_last,
            f"Trained on the last step only, the RNN predicts the final mean well "
            f"({fmt(last_last)}) but not the intermediate ones ({fmt(last_all)} over all "
            "steps): the loss says nothing about them.",
            f"the last-step model's all-steps error ({fmt(last_all)}) is not far above its "
            "last-step "
            f"error ({fmt(last_last)}).",
        ),
    ]


SCALAR = [
    Experiment("scalar_t3", "scalar_rnn", ["--w=0.5", "--inputs=1,2,3"], seconds=0.7),
    Experiment(
        "scalar_t7", "scalar_rnn", ["--w=-1.3", "--inputs=0.5,-1,2,0.25,1,-2,3"], seconds=0.7
    ),
]


def scalar_table(o):
    header = ["run", "dy/dw (jax.grad)", "closed form", "sum of edges", "|autodiff - closed form|"]
    rows = [
        [
            e.name,
            get(o, e.name, "dy_dw_autodiff"),
            get(o, e.name, "dy_dw_closed_form"),
            get(o, e.name, "dy_dw_edge_sum"),
            get(o, e.name, "abs_error_autodiff_vs_closed_form"),
        ]
        for e in SCALAR
    ]
    return header, rows


def scalar_explain(o):
    out = []
    for e in SCALAR:
        a, c, s = (
            get(o, e.name, k) for k in ("dy_dw_autodiff", "dy_dw_closed_form", "dy_dw_edge_sum")
        )
        agree = (
            None
            if None in (a, c, s)
            else abs(a - c) <= 1e-9 * max(1, abs(c)) and abs(s - c) <= 1e-9 * max(1, abs(c))
        )
        out.append(
            check(
                agree,
                f"{e.name}: autodiff, closed form and edge sum agree ({fmt(a)}).",
                f"{e.name}: {fmt(a)} / {fmt(c)} / {fmt(s)} disagree.",
            )
        )
    return out


FLOW = [
    Experiment("flow_compare", "grad_flow_compare", [], quick=["--seq_len=60"], seconds=11),
    Experiment(
        "flow_identity_095",
        "grad_flow",
        ["--activation=identity", "--spectral_radius=0.95"],
        seconds=3,
    ),
    Experiment(
        "flow_identity_105",
        "grad_flow",
        ["--activation=identity", "--spectral_radius=1.05"],
        seconds=0.5,  # its programs are flow_identity_095's: compiled or cached by then
    ),
]
VARIANTS = ("tanh", "relu", "identity", "residual", "lstm")


def flow_table(o):
    header = [
        "variant",
        "slope (last target)",
        "first/last (last target)",
        "first/last (every step)",
    ]
    rows = [
        [
            v,
            get(o, "flow_compare", f"{v}_last_log_grad_slope"),
            get(o, "flow_compare", f"{v}_last_grad_ratio_first_last"),
            get(o, "flow_compare", f"{v}_all_grad_ratio_first_last"),
        ]
        for v in VARIANTS
    ]
    for name, rho in (("flow_identity_095", 0.95), ("flow_identity_105", 1.05)):
        rows.append(
            [
                f"identity, rho={rho}",
                get(o, name, "log_grad_slope"),
                get(o, name, "grad_ratio_first_last"),
                None,
            ]
        )
    return header, rows


def flow_explain(o):
    import math

    out = []
    for name, rho in (("flow_identity_095", 0.95), ("flow_identity_105", 1.05)):
        slope = get(o, name, "log_grad_slope")
        out.append(
            check(
                None if slope is None else abs(slope + math.log(rho)) < 1e-3,
                f"With the identity activation and spectral radius {rho}, log||dL/dh_t|| "
                "changes by "
                f"{fmt(slope)} per step, matching -log(rho) = {fmt(-math.log(rho))}.",
                f"the slope {fmt(slope)} differs from -log({rho}) = {fmt(-math.log(rho))}.",
            )
        )
    tanh = get(o, "flow_compare", "tanh_last_grad_ratio_first_last")
    every = get(o, "flow_compare", "tanh_all_grad_ratio_first_last")
    out.append(
        check(
            None if tanh is None else tanh < 1e-3,
            f"A tanh RNN's gradient from the last target shrinks to {fmt(tanh)} of its size "
            "over the sequence (vanishing).",
            f"the tanh RNN's last-target gradient ratio {fmt(tanh)} does not show vanishing.",
        )
    )
    out.append(
        check(
            None if every is None or tanh is None else every > 100 * tanh,
            f"With a loss on every step the ratio is {fmt(every)}: local targets keep the "
            "gradient alive, "
            "but the long-range part is the vanishing one above.",
            f"the every-step ratio {fmt(every)} is not far above the last-target ratio "
            f"{fmt(tanh)}.",
        )
    )
    return out


SURNAMES = [
    Experiment("surnames", "surnames", [], quick=["--steps=1800"], needs="names", seconds=57)
]


def surnames_table(o):
    keys = [
        "test_accuracy",
        "test_macro_accuracy",
        "val_accuracy",
        "test_accuracy_ceiling",
        "names_in_several_languages",
        "train_seconds",
    ]
    return ["metric", "value"], [[k, get(o, "surnames", k)] for k in keys]


def surnames_explain(o):
    acc, ceiling = get(o, "surnames", "test_accuracy"), get(o, "surnames", "test_accuracy_ceiling")
    macro = get(o, "surnames", "test_macro_accuracy")
    return [
        check(
            None if acc is None else acc >= 0.84,
            f"Test accuracy {fmt(acc)} reaches the 0.84 goal (3,000 steps, the defaults).",
            f"test accuracy {fmt(acc)} is below the 0.84 goal "
            f"(ceiling of this split: {fmt(ceiling)}).",
            full_only=True,
        ),
        check(
            None if acc is None or macro is None else macro < acc,
            f"Macro accuracy ({fmt(macro)}) is far below accuracy: the small languages are "
            "the hard ones.",
            f"macro accuracy {fmt(macro)} is not below accuracy {fmt(acc)}.",
        ),
    ]


LATENT = [Experiment("latent_synthetic", "latent_study", [], quick=["--epochs=15"], seconds=72)]


def latent_table(o):
    header = [
        "latent size",
        "probe (trained)",
        "probe (untrained)",
        "probe (PCA)",
        "recon (trained)",
        "recon (PCA)",
    ]
    sizes = (
        sorted(
            {
                int(k.split("_")[1])
                for k in (o["latent_synthetic"].summary or {})
                if k.startswith("latent_")
            }
        )
        if o["latent_synthetic"].ok
        else []
    )
    rows = [
        [k]
        + [
            get(o, "latent_synthetic", f"latent_{k}_{m}")
            for m in (
                "probe_accuracy",
                "probe_accuracy_untrained",
                "probe_accuracy_pca",
                "recon_mse",
                "recon_mse_pca",
            )
        ]
        for k in sizes
    ]
    return header, rows


def latent_explain(o):
    p20, p5 = (
        get(o, "latent_synthetic", "latent_20_probe_accuracy"),
        get(o, "latent_synthetic", "latent_5_probe_accuracy"),
    )
    u = [
        get(o, "latent_synthetic", f"latent_{k}_probe_accuracy_untrained")
        for k in (5, 20, 100, 200)
    ]
    rising = None if None in u else all(a < b for a, b in itertools.pairwise(u))
    return [
        check(
            None if p20 is None else p20 >= 0.96,
            f"At latent size 20 the trained encoder's probe reaches {fmt(p20)} (target 0.96).",
            f"the latent-20 probe accuracy {fmt(p20)} is below 0.96.",
        ),
        check(
            None if p5 is None else p5 < 0.5,
            f"Five dimensions cannot hold the 20 informative ones: probe {fmt(p5)}.",
            f"the latent-5 probe {fmt(p5)} is unexpectedly high.",
        ),
        check(
            rising,
            "Untrained encoders improve steadily with latent size ("
            + ", ".join(fmt(x) for x in u)
            + ").",
            "untrained probe accuracies do not rise with latent size ("
            + ", ".join(fmt(x) for x in u)
            + ").",
        ),
    ]


MNIST = [
    Experiment(
        f"mnist_{k}",
        "autoencoder",
        ["--dataset=mnist", "--latent_dim=32", f"--kind={k}", "--num_seeds=3"],
        quick=["--epochs=8", "--num_seeds=1"],
        needs="mnist",
        seconds=17,
    )
    for k in ("vanilla", "denoising", "masked")
]


def mnist_table(o):
    seeds = max(len(get(o, e.name, "probe_accuracy_per_seed") or [1]) for e in MNIST)
    spread = seeds > 1  # one seed has no spread: no std column, and no "mean" in the header
    header = [
        "kind",
        f"probe accuracy (mean over {seeds} seeds)" if spread else "probe accuracy (1 seed)",
        *(["probe std"] if spread else []),
        "probe (untrained)",
        "recon MSE (clean)",
        "PCA-32 recon",
        "s / epoch (all seeds in one program)" if spread else "s / epoch",
    ]
    keys = [
        "probe_accuracy",
        *(["probe_accuracy_std"] if spread else []),
        "probe_accuracy_untrained",
        "recon_mse",
        "pca_recon_mse",
        "seconds_per_epoch",
    ]
    rows = [[e.name[6:]] + [get(o, e.name, k) for k in keys] for e in MNIST]
    return header, rows


def mnist_explain(o):
    v = get(o, "mnist_vanilla", "probe_accuracy")
    out = []
    for kind in ("denoising", "masked"):
        p = get(o, f"mnist_{kind}", "probe_accuracy")
        gain = None if None in (p, v) else 100 * (p - v)
        out.append(
            check(
                None if gain is None else gain >= 1.0,
                f"The {kind} autoencoder's probe ({fmt(p)}) is {fmt(gain)} points above "
                f"vanilla ({fmt(v)}).",
                f"the {kind} autoencoder's probe ({fmt(p)}) is only {fmt(gain)} points above "
                f"vanilla ({fmt(v)}).",
                full_only=True,  # the +1 point target is stated for 3 seeds at 50 epochs
            )
        )
    return out


LINEAR = [
    Experiment(
        "linear_ae",
        "linear_ae",
        ["--lambda_grid=0.001,0.01,0.1"],
        quick=["--steps=6000"],
        seconds=13,
    )
]


def linear_table(o):
    header = [
        "lambda",
        "subspace distance",
        "recon gap to PCA",
        "singular-value gap",
        "orthonormality error",
    ]
    rows = [
        [
            0,
            get(o, "linear_ae", "subspace_distance"),
            get(o, "linear_ae", "recon_relative_gap"),
            None,
            get(o, "linear_ae", "orthonormality_error"),
        ]
    ]
    for lam in ("0.001", "0.01", "0.1"):
        p = f"lambda_{lam}_"
        rows.append(
            [
                float(lam),
                get(o, "linear_ae", p + "subspace_distance"),
                get(o, "linear_ae", p + "recon_relative_gap"),
                get(o, "linear_ae", p + "singular_value_gap"),
                get(o, "linear_ae", p + "orthonormality_error"),
            ]
        )
    return header, rows


def linear_explain(o):
    d = get(o, "linear_ae", "subspace_distance")
    gaps = [get(o, "linear_ae", f"lambda_{lam}_singular_value_gap") for lam in ("0.01", "0.1")]
    ortho = get(o, "linear_ae", "orthonormality_error")
    return [
        check(
            None if d is None else d < 0.002,
            f"Without weight decay the decoder spans the PCA subspace (sin of the largest "
            f"angle {fmt(d)}).",
            f"the subspace distance {fmt(d)} is not below 0.002.",
        ),
        check(
            None if None in gaps else max(gaps) < 0.005,
            "With lambda = 0.01 and 0.1 the decoder's singular values match "
            "sqrt(1 - lambda / s_i^2) to " + fmt(None if None in gaps else max(gaps)) + ".",
            "singular-value gaps " + ", ".join(fmt(g) for g in gaps) + " exceed 0.005.",
        ),
        check(
            None if ortho is None else ortho > 0.1,
            f"Without weight decay W2 is not orthonormal (error {fmt(ortho)}): only the "
            "product W2 W1 is determined.",
            f"without weight decay W2 is already orthonormal (error {fmt(ortho)}).",
        ),
    ]


SECTIONS = [
    Section(
        "Does backpropagation through a scalar RNN match the closed form?",
        SCALAR,
        [("scalar_t3", "edge_contributions")],
        scalar_table,
        scalar_explain,
    ),
    Section(
        "How well do RNNs, LSTMs and stacked RNNs learn a running average?",
        RA,
        [("ra_rnn1_all", "predictions"), ("ra_rnn1_last", "predictions")],
        ra_table,
        ra_explain,
    ),
    Section(
        "When do gradients vanish or explode, and what helps?",
        FLOW,
        [("flow_compare", "grad_flow_compare")],
        flow_table,
        flow_explain,
    ),
    Section(
        "Which language does a surname come from?",
        SURNAMES,
        [("surnames", "confusion_matrix")],
        surnames_table,
        surnames_explain,
    ),
    Section(
        "What does an autoencoder's code know about the labels? (synthetic)",
        LATENT,
        [("latent_synthetic", "latent_study")],
        latent_table,
        latent_explain,
    ),
    Section(
        "Vanilla vs denoising vs masked autoencoders on MNIST",
        MNIST,
        [("mnist_masked", "reconstructions")],
        mnist_table,
        mnist_explain,
    ),
    Section(
        "Is a linear autoencoder PCA, and what does weight decay add?",
        LINEAR,
        [("linear_ae", "singular_values"), ("linear_ae", "training")],
        linear_table,
        linear_explain,
    ),
]


# ------------------------------------------------------------------- running


def experiment_args(e: Experiment, opts: argparse.Namespace) -> list[str]:
    """The experiment's options: its own, quick replacements, data paths, then --set overrides."""
    values = dict(arg[2:].split("=", 1) for arg in e.args)
    if opts.quick:
        values.update(dict(arg[2:].split("=", 1) for arg in e.quick))
    if e.needs == "mnist":
        values["mnist_dir"] = str(opts.mnist_dir)
    if e.needs == "names" and opts.names_dir:
        values["data_dir"] = str(opts.names_dir)
    import tasks

    fields = tasks.load(e.task).Config.__dataclass_fields__
    values.update({k: v for k, v in opts.overrides.items() if k in fields})
    return [f"--{k}={v}" for k, v in values.items()]


def missing_data(e: Experiment, opts) -> str | None:
    if e.needs == "mnist" and not any(Path(opts.mnist_dir).glob("t10k-images-idx3-ubyte*")):
        return (
            f"MNIST not found in {opts.mnist_dir}: rerun with --mnist_dir=DIR holding the "
            "IDX files "
            "(t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz; train-* optional)"
        )
    return None


def plan_experiment(e: Experiment, opts, runs_dir: Path) -> Outcome | Trial:
    """The experiment's outcome when there is nothing to run (a reusable result, missing
    data), else the trial that produces it."""
    import tasks

    args = experiment_args(e, opts)
    workdir = runs_dir / e.name
    command = " ".join(["python train.py", f"--task={e.task}", *args])
    missing = missing_data(e, opts)
    if missing:
        return Outcome(e, command, error=missing)
    wanted = to_dict(build_config(tasks.load(e.task).Config, tokenize(args)))
    summary_file, config_file = workdir / SUMMARY_FILE, workdir / "config.json"
    same = False
    if config_file.exists():
        try:  # a damaged earlier record is not trusted: the experiment starts afresh
            saved = read_json_object(config_file, "the saved config")
        except UsageError:
            saved = {}
        same = saved.get("task") == e.task and saved.get("config") == json_ready(wanted)
    if same and summary_file.exists():
        try:
            summary = read_json_object(summary_file, "the summary")
            return Outcome(e, command, summary=summary, reused=True)
        except UsageError:
            pass  # rerun: it resumes from its checkpoints
    if workdir.exists() and not same:
        shutil.rmtree(workdir)  # another config's run: start afresh
    # the same config unfinished (e.g. an interrupted report): its run resumes
    options = dict(arg[2:].split("=", 1) for arg in args)
    return Trial(e.name, e.task, options, workdir, wandb="disabled")


def trial_outcome(e: Experiment, result: Result) -> Outcome:
    """What a finished trial gives the report: its summary, or why it failed."""
    trial, workdir = result.trial, result.trial.workdir
    command = " ".join(["python train.py", f"--task={e.task}",
                        *[f"--{k}={v}" for k, v in trial.options.items()]])  # fmt: skip
    if result.exit_code == 0 and result.cause is None and (workdir / SUMMARY_FILE).exists():
        try:
            summary = read_json_object(workdir / SUMMARY_FILE, "the summary")
            return Outcome(e, command, summary=summary)
        except UsageError as err:
            return Outcome(e, command, error=str(err))
    return Outcome(e, command, error=failure_message(result))


def run_order(trials: list[Trial], experiments: dict[str, Experiment]) -> list[Trial]:
    """The trials, costliest experiment first (ties keep the sections' order). Workers
    take them in turn, so the last to start are short ones: in the sections' order
    one worker ran the linear autoencoder alone for its last 11 to 13 s while the
    other had nothing left (BENCHMARKS.md)."""
    return sorted(trials, key=lambda t: -experiments[t.id].seconds)


def run_experiments(opts, runs_dir: Path) -> dict[str, Outcome]:
    """Every experiment's outcome: reused, or run through the study executor (workers
    reuse one process per worker; compatible experiments train packed)."""
    experiments = {e.name: e for section in SECTIONS for e in section.experiments}
    outcomes: dict[str, Outcome] = {}

    def plan_all() -> list[Trial]:
        """The trials to run, costliest first; the other experiments' outcomes go
        straight to `outcomes`."""
        trials = []
        for e in experiments.values():
            try:
                planned = plan_experiment(e, opts, runs_dir)
            except UsageError as err:
                planned = Outcome(e, f"python train.py --task={e.task}", error=str(err))
            if isinstance(planned, Outcome):
                outcomes[e.name] = planned
            else:
                trials.append(planned)
        return run_order(trials, experiments)

    planned = False

    def more(idle: int) -> list[Trial]:
        # First asked after the workers for `expected` started: planning loads the
        # tasks (about 2 s of CPU) while they start, instead of before.
        nonlocal planned
        if planned:
            return []
        planned = True
        return plan_all()

    def on_start(job: list[Trial]) -> None:
        packed = f" (packed: {len(job)} in one program)" if len(job) > 1 else ""
        print(f"[report] {', '.join(t.id for t in job)}{packed}", flush=True)

    def on_result(result: Result) -> None:
        outcome = trial_outcome(experiments[result.trial.id], result)
        outcomes[result.trial.id] = outcome
        print(f"[report] {result.trial.id}: {'ok' if outcome.ok else outcome.error}", flush=True)

    # Experiments without a summary will most likely run: their workers start first.
    # A finished one is reused unless its config changed (then its worker starts
    # once planning has found it).
    unfinished = [e for e in experiments if not (runs_dir / e / SUMMARY_FILE).exists()]
    runs_dir.mkdir(parents=True, exist_ok=True)
    run_trials(more, workers=opts.workers, pack=not opts.no_pack, on_start=on_start,
               on_result=on_result, worker_log=runs_dir / "workers.log",
               expected=len(unfinished))  # fmt: skip
    return {name: outcomes[name] for name in experiments if name in outcomes}


# ------------------------------------------------------------------- writing


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += [
        "| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |" for row in rows
    ]
    return "\n".join(lines)


def write_section(section: Section, outcomes: dict[str, Outcome], out: Path) -> tuple[str, dict]:
    lines = [f"## {section.title}", ""]
    for e in section.experiments:
        o = outcomes[e.name]
        state = "reused" if o.reused else ("ran" if o.ok else "FAILED")
        lines.append(f"- `{e.name}` ({state}): `{o.command}`")
        if not o.ok:
            lines.append(f"  - failed: {o.error}")
    lines.append("")
    header, rows = section.table(outcomes)
    lines += [markdown_table(header, rows), ""]
    for name, png in section.figures:
        source = out / "runs" / name / f"{png}.png"
        if source.exists():
            target = out / "figures" / f"{name}_{png}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            lines += [f"![{name}: {png}](figures/{target.name})", ""]
        else:
            lines += [f"(figure `{png}.png` of `{name}` is missing: the run did not finish)", ""]
    lines += [" ".join(section.explain(outcomes)), ""]
    shown = {
        "header": header,
        "rows": [[c if isinstance(c, str) else json_ready(c) for c in row] for row in rows],
    }
    return "\n".join(lines), shown


def device_description() -> str:
    import jax

    device = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    return f"{jax.default_backend()} ({device.device_kind}), {len(jax.devices())} device(s); {cpu}"


def main(argv: list[str] | None = None) -> int:
    """The report command; returns its exit code (130 on Ctrl-C: rerunning it reuses the
    finished experiments and resumes the interrupted ones from their checkpoints)."""
    return command_exit_code(
        lambda: _main(argv), "interrupted; rerun the same command to continue the report"
    )


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smaller settings, under 10 minutes on 2 cores"
    )
    parser.add_argument("--out", type=Path, default=Path("report"))
    parser.add_argument("--mnist_dir", type=Path, default=SHARED / "mnist")
    parser.add_argument(
        "--names_dir", type=Path, default=SHARED / "names" if (SHARED / "names").is_dir() else None
    )
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument(
        "--no_pack", action="store_true", help="train every experiment alone (no packing)"
    )
    opts = parser.parse_args(argv)
    if opts.workers < 1:
        print(f"error: --workers={opts.workers}: must be >= 1", file=sys.stderr)
        return 2
    try:
        opts.overrides = dict(s.split("=", 1) for s in opts.sets)
    except ValueError:
        print("error: --set takes KEY=VALUE", file=sys.stderr)
        return 2
    opts.mnist_dir, opts.names_dir = (
        opts.mnist_dir.absolute(),
        opts.names_dir and opts.names_dir.absolute(),
    )
    out = opts.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    TALLY.clear()
    QUICK["on"] = opts.quick
    outcomes = run_experiments(opts, out / "runs")
    elapsed = time.perf_counter() - t0
    body, numbers = [], {}
    for section in SECTIONS:
        text, shown = write_section(section, outcomes, out)
        body.append(text)
        numbers[section.title] = shown
    mode = (
        "quick (smaller settings than the documented ones)"
        if opts.quick
        else "full (documented settings)"
    )
    failed = [name for name, o in outcomes.items() if not o.ok]
    head = [
        "# Study report",
        "",
        f"Generated {datetime.datetime.now():%Y-%m-%d %H:%M} by "
        f"`python report.py{' --quick' if opts.quick else ''}` "
        f"in {elapsed / 60:.1f} minutes on {device_description()}. Mode: {mode}."
        + (f" Overrides: {opts.overrides}." if opts.overrides else ""),
        "",
        f"{len(outcomes) - len(failed)} of {len(outcomes)} experiments succeeded"
        + (f"; failed or skipped: {', '.join(failed)}." if failed else "."),
        f"Claims: {TALLY['confirmed']} confirmed, {TALLY['mismatch']} mismatch, "
        f"{TALLY['not checked']} not checked"
        + (" (targets of the full settings are not judged at quick settings)" if opts.quick else "")
        + ".",
        "Every number below is read from the run's `summary.json` under `runs/`; sentences "
        "marked **Mismatch** are findings the numbers did not support.",
        "",
    ]
    write_bytes_atomic(out / "README.md", ("\n".join(head + body)).encode())
    write_json_atomic(
        out / "report.json",
        {
            "mode": "quick" if opts.quick else "full",
            "minutes": elapsed / 60,
            "device": device_description(),
            "sections": numbers,
            "runs": {
                n: {"ok": o.ok, "reused": o.reused, "command": o.command, "error": o.error}
                for n, o in outcomes.items()
            },
        },
    )
    print(f"report: {out / 'README.md'} ({elapsed / 60:.1f} min; {len(failed)} failed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
