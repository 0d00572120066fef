"""How dL/dh_t behaves over time: vanishing and exploding gradients in recurrent nets.

For a batch of running-average sequences, the gradient of the loss with respect
to every hidden state h_t (and every LSTM cell state C_t) is read with the
perturbation trick: a zero perturbation e_t is added to each state inside the
scan, and dL/de_t = dL/dh_t, the total gradient reaching that state from all
later steps. Its norm against t shows whether gradients vanish or explode on the
way back; `log_grad_slope` is the least-squares slope of log ||dL/dh_t|| against
t (positive: the gradient shrinks going back in time).

The recurrent weight can be rescaled at initialisation to a chosen spectral
radius, and the model can first be trained on the running-average task.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data.running_average import make_running_average
from experiment.config import option
from experiment.errors import UsageError
from experiment.figures import pyplot
from experiment.run import Run
from models.recurrent import Activation, Cell, Init, SequenceRegressor
from tasks import running_average
from training import memory
from training.config import TrainConfig
from training.loop import Problem, fit
from training.summary import without_undefined

# |log-gradient change| over the sequence that counts as vanishing / exploding (10^3 = e^6.9)
REGIME_THRESHOLD = np.log(1e3)


@dataclasses.dataclass(frozen=True)
class FlowConfig(TrainConfig):
    """Options shared by `grad_flow` and `grad_flow_compare`."""

    num_layers: int = option(1, "stacked recurrent layers", min=1)
    hidden_size: int = option(32, "hidden units per layer", min=1)
    seq_len: int = option(100, "sequence length T", min=2)
    spectral_radius: float | None = option(
        None, "rescale each recurrent weight block at init so that max |eigenvalue| is this", gt=0
    )
    init: Init = option("orthogonal", "initialisation (see models)")
    forget_bias: float = option(0.0, "added to the LSTM forget-gate bias at initialisation")
    probe_batch: int = option(64, "sequences in the batch whose gradients are measured", min=1)
    data_seed: int = option(1234, "seed of the generated sequences", min=0)
    steps: int = option(0, "training steps on the running-average task before measuring", min=0)
    learning_rate: float = option(3e-3, "learning rate when steps > 0", gt=0)
    num_train: int = option(10_000, "training sequences when steps > 0", min=1)


@dataclasses.dataclass(frozen=True)
class Config(FlowConfig):
    # the same choice as running_average's --last_step_only, under one name
    ALIASES = {"last_target_only": "last_step_only"}  # noqa: RUF012 (read-only)

    cell: Cell = option("rnn", "recurrent cell")
    activation: Activation = option("tanh", "RNN activation")
    residual: bool = option(False, "RNN skip connection h_t = act(...) + h_{t-1}")
    last_step_only: bool = option(
        True,
        "loss on the last step only (else on every step); --last_target_only is another name",
    )

    def check(self) -> None:
        super().check()
        if self.residual and self.cell != "rnn":
            raise UsageError(f"--residual applies to --cell=rnn only, not --cell={self.cell}")


def spectral_radius(w_HxH: np.ndarray) -> np.ndarray:
    """max |eigenvalue| (NumPy: JAX's eig runs on CPU only)."""
    return np.max(np.abs(np.linalg.eigvals(np.asarray(w_HxH, np.float64)))).astype(w_HxH.dtype)


def rescale_spectral_radius(w_h: jax.Array, radius: float | jax.Array) -> jax.Array:
    """Scale each (H, H) gate block of w_h (H, G*H) to the given spectral radius (an
    array for packed trials, where 0 means none: the block is kept as it is)."""
    hidden = w_h.shape[0]
    blocks = jnp.split(w_h, w_h.shape[1] // hidden, axis=1)
    scaled = []
    for block in blocks:
        rho = jax.pure_callback(
            spectral_radius,
            jax.ShapeDtypeStruct((), block.dtype),
            block,
            vmap_method="sequential",
        )
        scaled.append(block * jnp.where(radius > 0, radius / rho, 1.0))
    return jnp.concatenate(scaled, axis=1)


def apply_spectral_radius(model: SequenceRegressor, radius: float | jax.Array) -> None:
    """Rescale every layer's recurrent weight blocks to `radius`, in place; a Python 0
    leaves them as initialised (an array of 0: a packed trial without a radius)."""
    if isinstance(radius, int | float) and radius == 0:
        return
    for layer in model.rnn.layers:
        layer.w_h[...] = rescale_spectral_radius(layer.w_h[...], radius)


def make_model(cfg: Config, rngs: nnx.Rngs) -> SequenceRegressor:
    """The network, its recurrent weights at cfg's spectral radius (when set)."""
    model = initial_network(cfg, rngs)
    apply_spectral_radius(model, cfg.spectral_radius or 0.0)
    return model


def initial_network(cfg: Config, rngs: nnx.Rngs) -> SequenceRegressor:
    """The network as the initialisation draws it, before any spectral radius."""
    return SequenceRegressor(
        1,
        cfg.hidden_size,
        1,
        cfg.num_layers,
        cell=cfg.cell,
        activation=cfg.activation,
        init=cfg.init,
        residual=cfg.residual,
        forget_bias=cfg.forget_bias if cfg.cell == "lstm" else 0.0,
        rngs=rngs,
    )


@dataclasses.dataclass
class GradFlow:
    """Per-layer norms over time, each an array of shape (T,)."""

    grad_h: list[np.ndarray]  # ||dL/dh_t||, Frobenius over batch and units
    grad_c: list[np.ndarray] | None  # ||dL/dC_t|| (LSTM)
    state_h: list[np.ndarray]  # mean over the batch of ||h_t||


def measure(model: SequenceRegressor, x, y, last_step_only: bool) -> GradFlow:
    """dL/dh_t (and dL/dC_t) for every layer and step, by the perturbation trick."""
    layers = model.rnn.layers
    steps, batch = x.shape[1], x.shape[0]
    # perturbations, their gradients, states and cell states (and autodiff's copies):
    # about 8 arrays of (T, B, H) per layer
    per_step = sum(layer.hidden_size for layer in layers) * np.dtype(x.dtype).itemsize
    memory.require(
        8 * steps * batch * per_step,
        "the gradient-flow probe",
        reduce="--probe_batch, --seq_len or --hidden_size",
    )
    zeros = [jnp.zeros((steps, batch, layer.hidden_size), x.dtype) for layer in layers]
    is_lstm = layers[0].cell == "lstm"

    def loss(perturb_h, perturb_c):
        y_hat, outputs = model.predict_with_states(
            x, perturb_h=perturb_h, perturb_c=perturb_c if is_lstm else None
        )
        errors = jnp.square(y_hat - y)[..., 0]
        value = errors[:, -1].mean() if last_step_only else errors.mean()
        return value, outputs

    (g_h, g_c), outputs = jax.grad(loss, argnums=(0, 1), has_aux=True)(zeros, zeros)

    def per_step_norm(g_TxBxH):
        return np.sqrt(np.sum(np.square(np.asarray(g_TxBxH, np.float64)), axis=(1, 2)))

    return GradFlow(
        grad_h=[per_step_norm(g) for g in g_h],
        grad_c=[per_step_norm(g) for g in g_c] if is_lstm else None,
        state_h=[
            np.linalg.norm(np.asarray(o.hs, np.float64), axis=-1).mean(axis=1) for o in outputs
        ],
    )


def log_slope(norms_T: np.ndarray) -> float:
    """Least-squares slope of log ||g_t|| against t over the steps with a positive norm."""
    t = np.arange(1, len(norms_T) + 1, dtype=np.float64)
    keep = np.isfinite(norms_T) & (norms_T > 0)
    if keep.sum() < 2:
        return float("nan")
    return float(np.polyfit(t[keep], np.log(norms_T[keep]), 1)[0])


def regime(norms_T: np.ndarray) -> str:
    """'vanishing', 'exploding' or 'stable', from log(||g_1|| / ||g_T||)."""
    change = np.log(norms_T[0]) - np.log(norms_T[-1]) if norms_T[0] > 0 else -np.inf
    if not np.isfinite(change):
        return "vanishing" if change < 0 else "exploding"
    if change < -REGIME_THRESHOLD:
        return "vanishing"
    if change > REGIME_THRESHOLD:
        return "exploding"
    return "stable"


def flow_summary(flow: GradFlow, prefix: str = "") -> dict:
    """Summary numbers for the top layer (and per layer when stacked); a slope or ratio
    that is undefined (gradients that vanished to exactly 0) is left out."""
    top = flow.grad_h[-1]
    out = {
        f"{prefix}log_grad_slope": log_slope(top),
        f"{prefix}grad_norm_first": float(top[0]),
        f"{prefix}grad_norm_last": float(top[-1]),
        f"{prefix}grad_ratio_first_last": float(top[0] / top[-1]) if top[-1] > 0 else float("nan"),
        f"{prefix}vanishing": int(regime(top) == "vanishing"),
        f"{prefix}exploding": int(regime(top) == "exploding"),
        f"{prefix}state_norm_first": float(flow.state_h[-1][0]),
        f"{prefix}state_norm_last": float(flow.state_h[-1][-1]),
    }
    if len(flow.grad_h) > 1:
        out.update(
            {
                f"{prefix}log_grad_slope_layer{i + 1}": log_slope(g)
                for i, g in enumerate(flow.grad_h)
            }
        )
    if flow.grad_c is not None:
        out[f"{prefix}log_cell_grad_slope"] = log_slope(flow.grad_c[-1])
        out[f"{prefix}cell_grad_norm_first"] = float(flow.grad_c[-1][0])
        out[f"{prefix}cell_grad_norm_last"] = float(flow.grad_c[-1][-1])
    return without_undefined(out)


def running_average_config(cfg: Config) -> running_average.Config:
    """The running-average training config matching a grad-flow config."""
    shared = {f.name for f in dataclasses.fields(running_average.Config)} & {
        f.name for f in dataclasses.fields(Config)
    }
    values = {name: getattr(cfg, name) for name in shared}  # last_step_only included
    return running_average.Config(**values)


def trained_or_initial_model(
    cfg: Config, run: Run, model: str | None = None
) -> tuple[SequenceRegressor, dict[str, float], dict]:
    """(the model, its held-out `eval_loss`, the training's stats: steps, seconds, ...)
    after `steps` of running-average training; at initialisation (steps = 0) the
    two dicts are empty."""
    if cfg.steps == 0:
        memory.require_model(lambda: make_model(cfg, nnx.Rngs(cfg.seed)))
        return make_model(cfg, nnx.Rngs(cfg.seed)), {}, {}
    train_cfg, problem = training_problem(cfg)
    result = fit(train_cfg, problem, run, model=model)
    held_out = {"eval_loss": float(result.evaluate(problem.eval_data)["loss"])}
    return result.model(), held_out, result.stats


# Options that enter the training as values (Problem.hparams): those of
# running_average's loss, and the spectral radius of the initialisation. Trials that
# differ only in them (and in seed, learning rate, weight decay) train packed.
PACKABLE = (*running_average.PACKABLE, "spectral_radius")


def packs(cfg: Config) -> bool:
    """Whether the run trains (steps > 0): only then is there a training to pack."""
    return cfg.steps > 0


def hparams(cfg: Config) -> dict[str, float]:
    """Problem.hparams: running_average's, and the spectral radius (0: none)."""
    own = running_average.hparams(running_average_config(cfg))
    return {**own, "spectral_radius": cfg.spectral_radius or 0.0}


def ignored_options(cfg: Config) -> set[str]:
    """Options the training does not use: running_average's (an LSTM's activation),
    and the probe's batch (it is measured after training)."""
    return running_average.ignored_options(running_average_config(cfg)) | {"probe_batch"}


def training_problem(cfg: Config) -> tuple[running_average.Config, Problem]:
    """The running-average training (steps > 0) of this network (for training.packing):
    its initialisation applies the spectral radius from the problem's hparams."""
    train_cfg = running_average_config(cfg)
    problem = dataclasses.replace(
        running_average.make_problem(train_cfg),
        make_model=lambda rngs: initial_network(cfg, rngs),
        init_fn=lambda model, hp: apply_spectral_radius(model, hp["spectral_radius"]),
        hparams=hparams(cfg),
    )
    return train_cfg, problem


def probe_batch(cfg: Config) -> tuple[jax.Array, jax.Array]:
    # a seed of its own (+7): the probe must not reuse the training (+0) or held-out
    # (+1) sequences of running_average.make_problem
    data = make_running_average(cfg.probe_batch, cfg.seq_len, seed=cfg.data_seed + 7)
    return jnp.asarray(data["x"]), jnp.asarray(data["y"])


def run(cfg: Config, run: Run) -> dict:
    model, trained, stats = trained_or_initial_model(cfg, run)
    flow = measure(model, *probe_batch(cfg), cfg.last_step_only)
    summary = {**flow_summary(flow), **trained, **stats}
    print(
        f"log ||dL/dh_t|| slope {summary.get('log_grad_slope', float('nan')):+.4f} per step; "
        f"||dL/dh_1|| / ||dL/dh_T|| = {summary.get('grad_ratio_first_last', float('nan')):.3g} "
        f"({regime(flow.grad_h[-1])})"
    )
    plot_flow(run, {describe(cfg): flow}, "grad_flow", title=describe(cfg))
    return summary


def describe(cfg: Config) -> str:
    cell = f"{cfg.cell.upper()}" + (f" {cfg.activation}" if cfg.cell == "rnn" else "")
    extras = [f"rho={cfg.spectral_radius:g}"] if cfg.spectral_radius is not None else []
    extras += ["residual"] if cfg.residual else []
    extras += [f"forget bias {cfg.forget_bias:g}"] if cfg.cell == "lstm" and cfg.forget_bias else []
    extras += [f"trained {cfg.steps} steps"] if cfg.steps else []
    return cell + (f" ({', '.join(extras)})" if extras else "")


def plot_flow(run: Run, flows: dict[str, GradFlow], name: str, title: str) -> None:
    """Left: log10 ||dL/dh_t|| (and dL/dC_t) against t; right: ||h_t|| against t."""
    plt = pyplot()

    fig, (ax_g, ax_h) = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, (label, flow) in enumerate(flows.items()):
        color = f"C{i}"
        draw_flow(ax_g, ax_h, flow, label, color)
    ax_g.set_xlabel("timestep t")
    ax_g.set_ylabel("||dL/dh_t||  (log scale)")
    ax_g.set_yscale("log")
    ax_h.set_xlabel("timestep t")
    ax_h.set_ylabel("mean ||h_t||")
    ax_g.legend(fontsize=7)
    fig.suptitle(title)
    run.save_figure(fig, name)


def draw_flow(ax_g, ax_h, flow: GradFlow, label: str, color: str) -> None:
    t = np.arange(1, len(flow.grad_h[-1]) + 1)
    # norms that vanished to exactly 0 become gaps: log axes have no place for 0
    for layer, g in enumerate(flow.grad_h):
        suffix = f" layer {layer + 1}" if len(flow.grad_h) > 1 else ""
        style = "-" if layer == len(flow.grad_h) - 1 else ":"
        ax_g.plot(t, np.where(g > 0, g, np.nan), style, color=color, label=f"{label}{suffix}")
    if flow.grad_c is not None:
        g = flow.grad_c[-1]
        ax_g.plot(t, np.where(g > 0, g, np.nan), "--", color=color, label=f"{label}: dL/dC_t")
    ax_h.plot(t, flow.state_h[-1], color=color, label=label)
