"""Running-average regression with a vanilla RNN, LSTM or stacked RNN.

x ~ N(0, 1) of shape (N, T, 1); the target at every step is the mean of the
inputs so far, y_t = mean(x_1..x_t). Task 1 (`last_step_only=false`) averages
the squared error over all steps; Task 2 (`last_step_only=true`) uses only the
final step, so the model gets no signal about the intermediate means.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data.running_average import make_running_average
from experiment.config import option, with_defaults
from experiment.figures import plot_over_seeds, reusable_subplots
from experiment.run import Run
from models.recurrent import Activation, Cell, Impl, Init, SequenceRegressor
from models.recurrent_ops import ACTIVATION_NAMES
from training.config import TrainConfig
from training.loop import FitResult, Problem, eval_graphdef, fit
from training.summary import replica_summary


@dataclasses.dataclass(frozen=True)
# training defaults chosen so the targets are met (see BENCHMARKS.md / README)
@with_defaults(steps=3000, lr_schedule="cosine")
class Config(TrainConfig):
    cell: Cell = option("rnn", "recurrent cell")
    num_layers: int = option(1, "stacked recurrent layers", min=1)
    hidden_size: int = option(32, "hidden units per layer", min=1)
    activation: Activation = option("tanh", "RNN activation")
    last_step_only: bool = option(False, "loss on the final step only (else mean over all steps)")
    seq_len: int = option(16, "sequence length T", min=1)
    num_train: int = option(10_000, "training sequences", min=1)
    num_eval: int = option(2_000, "held-out sequences", min=1)
    data_seed: int = option(1234, "seed of the generated train/eval sequences", min=0)
    init: Init = option(
        "uniform", "uniform: PyTorch-style U(+-1/sqrt(H)); orthogonal: Flax's default"
    )
    impl: Impl = option(
        "fused", "fused: scan with a hand-written backward pass; scan: JAX autodiff"
    )
    hoist_input: bool = option(False, "project all inputs in one matmul before the scan")


def make_model(cfg: Config, rngs: nnx.Rngs) -> SequenceRegressor:
    return SequenceRegressor(
        1,
        cfg.hidden_size,
        1,
        cfg.num_layers,
        cell=cfg.cell,
        activation=cfg.activation,
        init=cfg.init,
        impl=cfg.impl,
        hoist_input=cfg.hoist_input,
        rngs=rngs,
    )


def squared_errors(model, batch, activation: str | jax.Array | None = None) -> jax.Array:
    """(B, T) squared error of every step's prediction (with `activation` instead of the
    model's own, when given: see `activation_of`)."""
    return jnp.square(model(batch["x"], activation=activation) - batch["y"])[..., 0]


def activation_of(hp) -> str | jax.Array:
    """The RNN activation a loss or evaluation uses: its name in a plain run (the model's
    own code path), or a traced index into ACTIVATION_NAMES when trials with different
    activations train packed in one program (or share one compiled evaluation)."""
    value = hp["activation"]
    return ACTIVATION_NAMES[value] if isinstance(value, int) else value


def objective(errors_BxT: jax.Array, last_step_only) -> jax.Array:
    """The training loss. last_step_only: a bool, or a 0/1 weight array when trials with
    both losses are packed into one program (both terms are computed, one is kept)."""
    if isinstance(last_step_only, bool):
        return errors_BxT[:, -1].mean() if last_step_only else errors_BxT.mean()
    return jnp.where(last_step_only > 0.5, errors_BxT[:, -1].mean(), errors_BxT.mean())


# Options that enter the loss as values (Problem.hparams): trials differing only in
# them (and in seed, learning rate, weight decay) train packed in one program.
# The RNN's activation packs as an index (every candidate is computed, one kept): one
# program for the three activations compiled in 1.35 s against 3.61 s for three, and
# trained no slower (benchmarks/packed_activation.py, BENCHMARKS.md "Whole studies").
PACKABLE = ("last_step_only", "activation")


def hparams(cfg: Config) -> dict[str, float]:
    """Problem.hparams: the loss choice (a bool) and the activation's index (an int)."""
    return {
        "last_step_only": cfg.last_step_only,
        "activation": ACTIVATION_NAMES.index(cfg.activation),
    }


def ignored_options(cfg: Config) -> set[str]:
    """Options this configuration does not use (the activation of an LSTM or GRU):
    trials differing only in them run the same program."""
    return set() if cfg.cell == "rnn" else {"activation"}


# A recurrent layer's gate products per step: each (input + hidden) x hidden.
_GATES = {"rnn": 1, "gru": 3, "lstm": 4}


def training_cost(cfg: Config) -> float:
    """About how much computation the run's training is, in units comparable between
    this task's configs (steps x sequences per step x their length x the recurrent
    layers' multiply-adds per element): a study starts its costliest trials first
    (experiment.study)."""
    inputs = [1] + [cfg.hidden_size] * (cfg.num_layers - 1)  # each layer's input size
    per_step = sum(_GATES[cfg.cell] * (n + cfg.hidden_size) * cfg.hidden_size for n in inputs)
    return float(cfg.steps * cfg.batch_size * cfg.num_seeds * cfg.seq_len * per_step)


def training_problem(cfg: Config) -> tuple[Config, Problem]:
    """The training config and problem of the run's one `fit` (for training.packing)."""
    return cfg, make_problem(cfg)


def loss_fn(model, batch, key, hp):
    del key
    return objective(squared_errors(model, batch, activation_of(hp)), hp["last_step_only"]), {}


def eval_fn(model, data, hp):
    """Held-out metrics. Module-level (not a closure of the config), so runs of one model
    structure in one process share its compiled program (training.loop.jitted_eval)."""
    errors = squared_errors(model, data, activation_of(hp))
    return {
        "loss": objective(errors, hp["last_step_only"]),
        "mse_all_steps": errors.mean(),
        "mse_last_step": errors[:, -1].mean(),
    }


def make_problem(cfg: Config) -> Problem:
    train = make_running_average(cfg.num_train, cfg.seq_len, seed=cfg.data_seed)
    held_out = make_running_average(cfg.num_eval, cfg.seq_len, seed=cfg.data_seed + 1)

    return Problem(
        make_model=lambda rngs: make_model(cfg, rngs),
        shared_model=lambda rngs: make_model(shared_structure(cfg), rngs),
        loss_fn=loss_fn,
        train_data=train,
        eval_data=held_out,
        eval_fn=eval_fn,
        hparams=hparams(cfg),
        divergence_hint=(
            "An unbounded activation can explode: --activation=tanh keeps states bounded."
            if cfg.cell == "rnn" and cfg.activation != "tanh"
            else ""
        ),
    )


def shared_structure(cfg: Config) -> Config:
    """`cfg` with the model options that enter as hparams set to one fixed value: the
    model code that runs of every activation share (eval_fn and `predict` apply hp's)."""
    return dataclasses.replace(cfg, activation=ACTIVATION_NAMES[0])


def run(cfg: Config, run: Run) -> dict:
    problem = make_problem(cfg)
    result = fit(cfg, problem, run)
    # held-out set first: the training set is then evaluated in chunks of its size,
    # one compiled shape for both
    eval_metrics = result.evaluate(problem.eval_data)
    train_metrics = result.evaluate(problem.train_data)
    summary = {
        **replica_summary({"loss": train_metrics["loss"]}, "train_"),
        **replica_summary(eval_metrics, "eval_"),
        **{k: v for k, v in result.stats.items()},
        "num_params": count_params(result),
    }
    plot_results(cfg, run, result, problem)
    return summary


def count_params(result: FitResult) -> int:
    sizes = [leaf.size for leaf in jax.tree.leaves(result.params)]
    return int(sum(sizes) // result.num_seeds)  # replicas stack along a leading axis


@functools.partial(jax.jit, static_argnums=0)
def predict(graphdef, params, x, hp):
    """The model's outputs for `x` with hp's activation: compiled once per shared model
    structure (training.loop.eval_graphdef) and input shape, for every activation."""
    return nnx.merge(graphdef, params)(x, activation=activation_of(hp))


def plot_results(cfg: Config, run: Run, result: FitResult, problem: Problem) -> None:
    """predictions.png (three held-out sequences), error_by_step.png, eval_curve.png
    (figures reused from trial to trial in a study's worker: reusable_subplots)."""
    # every held-out prediction in one compiled call (shared by runs of one structure)
    held_out = problem.eval_data
    graphdef = eval_graphdef(problem, result.graphdef)
    x = jnp.asarray(held_out["x"])
    predictions = np.asarray(predict(graphdef, result.replica_params(0), x, problem.hparams))
    x, y, pred = held_out["x"][:3], held_out["y"][:3], predictions[:3]
    t = np.arange(1, cfg.seq_len + 1)
    fig, axes = reusable_subplots("ra.predictions", 1, 3, figsize=(12, 3.2), sharey=True)
    for i, ax in enumerate(axes):
        ax.plot(t, x[i, :, 0], ".", color="0.7", label="input x_t")
        ax.plot(t, y[i, :, 0], "-", color="k", label="running mean")
        ax.plot(t, pred[i, :, 0], "--", color="C1", label="prediction")
        ax.set_xlabel("t")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{describe(cfg)}: held-out sequences")
    run.save_figure(fig, "predictions")

    with np.errstate(over="ignore", invalid="ignore"):  # a diverged run fails on its summary
        errors = np.square(predictions - held_out["y"])[..., 0]
    fig, ax = reusable_subplots("ra.error_by_step", figsize=(5, 3.2))
    ax.semilogy(t, errors.mean(axis=0), "o-")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("held-out MSE")
    ax.set_title(describe(cfg))
    run.save_figure(fig, "error_by_step")

    if result.history:
        steps = [h["step"] for h in result.history]
        fig, ax = reusable_subplots("ra.eval_curve", figsize=(5, 3.2))
        for key, color in (("mse_all_steps", "C0"), ("mse_last_step", "C1")):
            values = [h[key] for h in result.history]
            plot_over_seeds(ax, steps, values, key, color, first_seed=cfg.seed)
        ax.set_xlabel("step")
        ax.set_ylabel("held-out MSE")
        ax.legend(fontsize=8)
        run.save_figure(fig, "eval_curve")


def describe(cfg: Config) -> str:
    loss = "last-step loss" if cfg.last_step_only else "all-steps loss"
    act = f" {cfg.activation}" if cfg.cell == "rnn" else ""
    return f"{cfg.num_layers}-layer {cfg.cell.upper()}{act}, {loss}"
