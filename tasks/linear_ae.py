"""Linear autoencoders: PCA equivalence and the inductive bias of weight decay.

Model: encoder W1 (k x m), decoder W2 (m x k), no biases, centred data. With the
points as the columns of X (m x n) and C = X X^T / n, the objective is

    L(W1, W2) = (1/n) ||X - W2 W1 X||_F^2 + lambda ||W1||_F^2 + lambda ||W2||_F^2

i.e. the squared error SUMMED over the m coordinates and AVERAGED over points,
plus the exact L2 penalty. The data term is the minibatch loss; the penalty is
optax's `add_decayed_weights(2 lambda)` chained before the optimizer, so every
step adds exactly 2 lambda W to each gradient (see training/optim.py). (A loss
averaged over coordinates instead would scale the data term by 1/m and make
the effective lambda m times larger; optax's l2_loss would add another 1/2.)

Closed forms used in the report:
  dL/dW1 = 2 W2^T (W2 W1 - I) C,   dL/dW2 = 2 (W2 W1 - I) C W1^T   (unregularised)
  lambda = 0:  W1 = U_k^T, W2 = U_k (the top-k principal directions) is optimal;
  lambda > 0:  W1 = W2^T = U_k diag(sigma) with sigma_i = sqrt(1 - lambda / s_i^2),
               s_i^2 the top eigenvalues of C, and recon = PCA's + sum_i lambda^2 / s_i^2.
Without weight decay only the product W2 W1 is determined: the "imbalance"
W1 W1^T - W2^T W2 is conserved by gradient flow, so W2 need not be orthonormal.
With it (plain SGD) the imbalance decays by (1 - 2 lr lambda)^2 per step, about
exp(-4 lambda lr t).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Literal

import jax.numpy as jnp
import numpy as np

from data import datasets
from experiment.config import option, with_defaults
from experiment.errors import UsageError
from experiment.figures import reusable_subplots
from experiment.run import Run
from models.autoencoders import LinearAutoencoder
from training.config import TrainConfig
from training.loop import Problem, fit
from training.packing import fit_models_packed
from training.probe import covariance, principal_axes


@dataclasses.dataclass(frozen=True)
@with_defaults(steps=20_000, learning_rate=3e-3, lr_schedule="cosine")
class Config(TrainConfig):
    dataset: Literal["synthetic", "mnist"] = option("synthetic", "which data")
    mnist_dir: str | None = option(None, "directory of MNIST IDX files (else TFDS)")
    data_dir: str | None = option(None, "TFDS data directory with a prepared MNIST")
    num_train: int = option(10_000, "synthetic: points", min=1)
    data_seed: int = option(0, "synthetic: seed of the data", min=0)
    latent_dim: int = option(20, "k, the code size", min=1)
    init_scale: float = option(0.1, "std of the Gaussian initial weights", gt=0)
    lambda_grid: tuple[float, ...] = option(
        (), "also train these weight decays and plot W2's singular values against lambda"
    )
    balance_tolerance: float = option(
        1e-2, "imbalance ||W1 W1^T - W2^T W2||_F counted as balanced", gt=0
    )
    # defaults that reach the PCA subspace to ~0.1 degree (README / docs)
    batch_size: int = option(100, "points per step (1: one point at a time)", min=1)

    def check(self) -> None:
        super().check()
        dim = datasets.INPUT_DIM[self.dataset]
        if self.latent_dim >= dim:
            raise UsageError(
                f"--latent_dim={self.latent_dim}: must be smaller than the data dimension ({dim})"
            )
        if any(lam < 0 for lam in self.lambda_grid):
            raise UsageError("--lambda_grid: weight decays must be >= 0")


@dataclasses.dataclass
class Spectrum:
    """The centred training data's second moment and its eigen-decomposition."""

    mean: np.ndarray
    basis: np.ndarray  # principal directions as rows, (m, m)
    eigenvalues: np.ndarray  # of C = X X^T / n, descending
    covariance: np.ndarray  # C, (m, m)


def spectrum(x_train: np.ndarray) -> Spectrum:
    mean, cov = covariance(x_train)
    return Spectrum(mean, *principal_axes(cov), cov)


def closed_form_gradients(w1, w2, c):
    """(dL/dW1, dL/dW2) of the unregularised objective, from the closed forms."""
    residual = w2 @ w1 - np.eye(c.shape[0])
    return 2 * w2.T @ residual @ c, 2 * residual @ c @ w1.T


def objective_data_term(w1, w2, c) -> float:
    """(1/n)||X - W2 W1 X||_F^2 = tr((I - P) C (I - P)^T) with P = W2 W1."""
    residual = np.eye(c.shape[0]) - w2 @ w1
    return float(np.trace(residual @ c @ residual.T))


def subspace_distance(w2: np.ndarray, top_k: np.ndarray) -> float:
    """sin of the largest principal angle between span(W2) and span(top_k columns)."""
    q, _ = np.linalg.qr(w2)
    return float(np.linalg.norm(q - top_k @ (top_k.T @ q), ord=2))


def predicted_singular_values(eigenvalues: np.ndarray, lam: float) -> np.ndarray:
    """sqrt(1 - lambda / s_i^2) (0 where lambda >= s_i^2: that direction is switched off)."""
    return np.sqrt(np.clip(1.0 - lam / eigenvalues, 0.0, None))


def make_problem(cfg: Config, x_centred: np.ndarray, spec: Spectrum) -> Problem:
    dim = x_centred.shape[1]
    top_k = jnp.asarray(spec.basis[: cfg.latent_dim].T, jnp.float32)
    c = jnp.asarray(spec.covariance, jnp.float32)

    def loss_fn(model, batch, key):
        del key
        return jnp.mean(jnp.sum(jnp.square(model(batch["x"]) - batch["x"]), axis=1)), {}

    def eval_fn(model, data):
        del data  # everything follows from C
        w1, w2 = model.w1[...], model.w2[...]
        # exact population quantities from the covariance c, not a minibatch estimate:
        # recon = tr((I - W2 W1) C (I - W2 W1)^T); the subspace distance is the sine of
        # the largest principal angle between span(W2) and the top-k eigenvectors
        residual = jnp.eye(dim) - w2 @ w1
        q, _ = jnp.linalg.qr(w2)
        return {
            "recon_mse": jnp.trace(residual @ c @ residual.T),
            "subspace_distance": jnp.linalg.norm(q - top_k @ (top_k.T @ q), ord=2),
            "orthonormality_error": jnp.linalg.norm(w2.T @ w2 - jnp.eye(cfg.latent_dim))
            / cfg.latent_dim**0.5,
            "imbalance": jnp.linalg.norm(w1 @ w1.T - w2.T @ w2),
        }

    return Problem(
        make_model=lambda rngs: LinearAutoencoder(dim, cfg.latent_dim, cfg.init_scale, rngs=rngs),
        loss_fn=loss_fn,
        train_data={"x": x_centred.astype(np.float32)},
        eval_data={"x": x_centred[:1].astype(np.float32)},
        eval_fn=eval_fn,
        divergence_hint=(
            "The objective sums the squared error over all coordinates, so it needs a smaller "
            "learning rate than a loss averaged over coordinates."
        ),
    )


def analyse(cfg: Config, w1: np.ndarray, w2: np.ndarray, spec: Spectrum, history: list) -> dict:
    """Every reported number for one trained (W1, W2)."""
    k, c = cfg.latent_dim, spec.covariance
    top_k = spec.basis[:k].T
    pca_mse = float(spec.eigenvalues[k:].sum())
    recon = objective_data_term(w1, w2, c)
    g1, g2 = closed_form_gradients(w1, w2, c)
    g1_opt, g2_opt = closed_form_gradients(top_k.T, top_k, c)
    out = {
        "subspace_distance": subspace_distance(w2, top_k),
        "subspace_angle_degrees": float(
            np.degrees(np.arcsin(min(1.0, subspace_distance(w2, top_k))))
        ),
        "recon_mse": recon,
        "pca_recon_mse": pca_mse,
        "recon_relative_gap": (recon - pca_mse) / pca_mse,
        "grad_norm_W1": float(np.linalg.norm(g1)),
        "grad_norm_W2": float(np.linalg.norm(g2)),
        "pca_grad_norm_W1": float(np.linalg.norm(g1_opt)),
        "pca_grad_norm_W2": float(np.linalg.norm(g2_opt)),
        "orthonormality_error": float(np.linalg.norm(w2.T @ w2 - np.eye(k)) / np.sqrt(k)),
        "imbalance": float(np.linalg.norm(w1 @ w1.T - w2.T @ w2)),
        "w1_w2T_distance": float(np.linalg.norm(w1 - w2.T) / np.linalg.norm(w2)),
        "singular_values_W1": np.linalg.svd(w1, compute_uv=False).tolist(),
        "singular_values_W2": np.linalg.svd(w2, compute_uv=False).tolist(),
    }
    balanced = [h["step"] for h in history if h["imbalance"] < cfg.balance_tolerance]
    out["steps_to_balance"] = balanced[0] if balanced else -1
    decay = imbalance_decay(history)
    if decay is not None:  # not measurable when the imbalance never left its noise floor
        out["imbalance_decay_per_step"] = decay
    if cfg.optimizer == "sgd" and cfg.lr_schedule == "constant" and cfg.warmup_steps == 0:
        # each step multiplies W1 W1^T - W2^T W2 by (1 - 2 lr lambda)^2 (heavy-ball: lr/(1-beta))
        effective_lr = cfg.learning_rate / (1.0 - cfg.momentum)
        out["predicted_imbalance_decay_per_step"] = float(
            2 * np.log1p(-2 * effective_lr * cfg.weight_decay)
        )
    if cfg.weight_decay > 0:
        predicted = predicted_singular_values(spec.eigenvalues[:k], cfg.weight_decay)
        trained = np.sort(np.asarray(out["singular_values_W2"]))[::-1]
        out["predicted_singular_values"] = predicted.tolist()
        out["singular_value_gap"] = float(np.max(np.abs(trained - predicted)))
        lam = cfg.weight_decay
        out["predicted_recon_mse"] = pca_mse + float(
            np.sum(
                np.where(
                    lam < spec.eigenvalues[:k], lam**2 / spec.eigenvalues[:k], spec.eigenvalues[:k]
                )
            )
        )
    return out


def imbalance_decay(history: list) -> float | None:
    """Least-squares slope of log ||W1 W1^T - W2^T W2||_F against the step, fitted while the
    imbalance is above twice its final value (minibatch noise sets a floor under it)."""
    steps = np.asarray([h["step"] for h in history], np.float64)
    values = np.asarray([h["imbalance"] for h in history], np.float64)
    keep = (values > 0) & (values > 2 * values[-1])
    if keep.sum() < 2:
        return None
    return float(np.polyfit(steps[keep], np.log(values[keep]), 1)[0])


def train_one(
    cfg: Config, run: Run, problem: Problem, spec: Spectrum, model: str | None
) -> tuple[dict, list]:
    """(analysis of replica 0 plus the loop's timings, evaluation history)."""
    result = fit(cfg, problem, run, model=model)
    model = result.model()
    w1, w2 = (np.asarray(p[...], np.float64) for p in (model.w1, model.w2))
    history = [_replica0(h) for h in result.history]
    return {**analyse(cfg, w1, w2, spec, history), **result.stats}, history


def _replica0(record: dict) -> dict:
    return {k: v[0] if isinstance(v, list) else v for k, v in record.items()}


# No task option enters the loss as a value; trials differing in seed, learning rate
# or weight decay (lambda) train packed in one program (training.packing).
PACKABLE: tuple[str, ...] = ()


def load_centred(cfg: Config) -> tuple[np.ndarray, Spectrum]:
    """(centred training data, its spectrum), read-only: runs with the same data options
    in one process (a study's trials in a worker) share one load and decomposition,
    unless the files of --mnist_dir changed in between."""
    files = files_state(cfg.mnist_dir) if cfg.dataset == "mnist" else ()
    return _load_centred(
        cfg.dataset, cfg.mnist_dir, cfg.data_dir, cfg.num_train, cfg.data_seed, files
    )


def files_state(directory: str | None) -> tuple:
    """(name, size, mtime) of each file in `directory`; () when there is none to read
    (the load itself then says what is wrong)."""
    if directory is None:
        return ()
    try:
        entries = [e for e in os.scandir(directory) if e.is_file()]
        return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries))
    except OSError:
        return ()


@functools.lru_cache(maxsize=4)
def _load_centred(
    dataset: str,
    mnist_dir: str | None,
    data_dir: str | None,
    num_train: int,
    data_seed: int,
    files: tuple,  # files_state(mnist_dir): part of the cache key only
) -> tuple[np.ndarray, Spectrum]:
    data = datasets.load(
        dataset, mnist_dir=mnist_dir, data_dir=data_dir, num_train=num_train, data_seed=data_seed
    )
    spec = spectrum(data.x_train)
    x_centred = data.x_train - spec.mean
    for array in (x_centred, *vars(spec).values()):
        array.flags.writeable = False  # shared: nobody may change it in place
    return x_centred, spec


def training_problem(cfg: Config) -> tuple[Config, Problem]:
    """The training config and problem of the run's first `fit`, the model at
    --weight_decay (for training.packing; the --lambda_grid models train in the run)."""
    x_centred, spec = load_centred(cfg)
    return cfg, make_problem(cfg, x_centred, spec)


def run(cfg: Config, run: Run) -> dict:
    x_centred, spec = load_centred(cfg)
    # the run's models, each trained as a config without a grid: its own at
    # --weight_decay, then one per --lambda_grid value (a value given twice is one model)
    lambdas = list(dict.fromkeys(cfg.lambda_grid))
    configs = [dataclasses.replace(cfg, lambda_grid=())] + [
        dataclasses.replace(cfg, weight_decay=lam, lambda_grid=()) for lam in lambdas
    ]
    names = [None] + [f"lambda_{lam:g}" for lam in lambdas]
    problems = [make_problem(c, x_centred, spec) for c in configs]
    # trained as replicas of one program where their optimizers match; each train_one
    # below then resumes from its model's final checkpoint
    fit_models_packed(run, list(zip(configs, problems, names, strict=True)))
    summary, history = train_one(cfg, run, problems[0], spec, None)
    print(
        f"subspace distance {summary['subspace_distance']:.2e} "
        f"({summary['subspace_angle_degrees']:.3f} deg); recon {summary['recon_mse']:.6f} vs PCA "
        f"{summary['pca_recon_mse']:.6f} (gap {100 * summary['recon_relative_gap']:.4f}%)"
    )
    if cfg.weight_decay > 0:
        print(f"largest gap to sqrt(1 - lambda/s_i^2): {summary['singular_value_gap']:.2e}")
    grid = {}
    for lam, lam_cfg, problem, model in zip(lambdas, configs[1:], problems[1:], names[1:],
                                            strict=True):  # fmt: skip
        grid[lam], _ = train_one(lam_cfg, run, problem, spec, model)
        summary.update({f"{model}_{k}": v for k, v in grid[lam].items()})
    plot_training(cfg, run, history)
    plot_singular_values(cfg, run, spec, {cfg.weight_decay: summary, **grid})
    return summary


# The training figure's panels: history key -> y label.
TRAINING_CURVES = {
    "subspace_distance": "sin(largest angle to PCA subspace)",
    "orthonormality_error": "||W2^T W2 - I||_F / sqrt(k)",
    "imbalance": "||W1 W1^T - W2^T W2||_F",
}


def plot_training(cfg: Config, run: Run, history: list) -> None:
    steps = [h["step"] for h in history]
    fig, axes = reusable_subplots("linear_ae.training", 1, 3, figsize=(14, 3.5))
    # fixed spacing with room for each panel's log tick labels and y label beside its
    # neighbour (tests/test_figures.py checks the widest labels): matplotlib's tight
    # layout found as much in an extra pass over every text, about half the figure's cost
    fig.subplots_adjust(left=0.07, right=0.99, bottom=0.15, top=0.85, wspace=0.42)
    for ax, (key, label) in zip(axes, TRAINING_CURVES.items(), strict=True):
        # floor at 1e-12: an exact zero (e.g. a perfectly balanced start) has no log
        # markers: a run with one evaluation still shows its point
        ax.semilogy(steps, [max(h[key], 1e-12) for h in history], marker="o", markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
    fig.suptitle(f"linear AE, k={cfg.latent_dim}, {cfg.optimizer}, lambda={cfg.weight_decay:g}")
    run.save_figure(fig, "training")


def plot_singular_values(cfg: Config, run: Run, spec: Spectrum, results: dict) -> None:
    """W2's singular values against lambda: trained points, predicted curves."""
    eig = spec.eigenvalues[: cfg.latent_dim]
    positive = [lam for lam in results if lam > 0]
    # the predicted curves span the trained lambdas with a factor 2 of margin (and a
    # sensible range when only lambda = 0 was trained)
    hi = max([*positive, 0.1]) * 2
    grid = np.geomspace(min([*positive, 1e-3]) / 2, hi, 200)
    fig, ax = reusable_subplots("linear_ae.singular_values", figsize=(6, 4))
    for s2 in (eig.max(), eig.min()):
        ax.plot(grid, np.sqrt(np.clip(1 - grid / s2, 0, None)), "-", color="0.6", lw=1)
    for lam, res in results.items():
        x = lam if lam > 0 else grid[0]
        ax.plot(
            [x] * len(res["singular_values_W2"]), res["singular_values_W2"], "o", ms=3, color="C0"
        )
    ax.set_xscale("log")
    ax.set_xlabel("weight decay lambda (lambda = 0 drawn at the left edge)")
    ax.set_ylabel("singular values of W2")
    ax.set_title(
        "trained (dots) vs sqrt(1 - lambda/s_i^2)\nfor the largest / smallest s_i^2 (lines)",
        fontsize=10,
    )
    run.save_figure(fig, "singular_values")
