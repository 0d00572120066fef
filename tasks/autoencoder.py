"""Vanilla, denoising and masked MLP autoencoders, evaluated by linear probing.

Data: `synthetic` (100-d, labels in a 20-d subspace; see data/synthetic.py) or
`mnist` (see data/mnist.py). The autoencoder trains on unlabelled inputs; then
a softmax-regression probe is fitted on the frozen encoder's features of the
training set and scored on the test set, for the trained encoder and for the
same network at initialisation.

Reported `recon_mse` is the per-coordinate squared error of reconstructing the
CLEAN test inputs (no noise, no mask), for every kind of autoencoder.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data import datasets
from data.datasets import Data
from experiment.config import from_dict, option, with_defaults
from experiment.errors import UsageError
from experiment.figures import plot_over_seeds, pyplot, reusable_subplots
from experiment.run import Run
from models.autoencoders import Autoencoder, add_noise, apply_mask, random_mask
from training.config import TrainConfig
from training.loop import FitResult, Problem, fit, initial_model
from training.probe import ProbeResult, linear_probe, pca_basis, pca_reconstruction_mse
from training.summary import replica_summary


@dataclasses.dataclass(frozen=True)
@with_defaults(eval_every=1000)
class Options(TrainConfig):
    """Every autoencoder option but the latent size (shared with `latent_study`)."""

    dataset: Literal["synthetic", "mnist"] = option("synthetic", "which data")
    mnist_dir: str | None = option(None, "directory of MNIST IDX files (else TFDS)")
    data_dir: str | None = option(None, "TFDS data directory with a prepared MNIST")
    hidden_sizes: tuple[int, ...] = option(
        (256,), "encoder hidden layers (decoder mirrors them)", min=1
    )
    activation: Literal["relu", "tanh", "gelu", "identity"] = option("relu", "hidden activation")
    init: Literal["pytorch", "lecun"] = option(
        "pytorch", "dense-layer init: PyTorch's U(+-1/sqrt(fan_in)) or Flax's LeCun-normal"
    )
    output: Literal["linear", "sigmoid"] = option(
        "linear",
        "decoder output: linear, or a sigmoid for data in [0, 1] (see docs/autoencoders.md)",
    )
    kind: Literal["vanilla", "denoising", "masked"] = option("vanilla", "autoencoder kind")
    noise_std: float = option(0.3, "denoising: std of the Gaussian input noise", min=0)
    clip_noisy: bool = option(False, "denoising: clip noisy mnist pixels back to [0, 1]")
    mask_ratio: float = option(0.75, "masked: fraction of input units hidden", min=0, lt=1)
    patch_size: int = option(0, "masked: hide p x p image patches instead of pixels (mnist)", min=0)
    mask_fill: Literal["zero", "scaled", "token"] = option(
        "scaled",
        "masked: hidden inputs become 0, 0 with visible ones scaled 1/(1-r), or a learned token",
    )
    masked_loss_only: bool = option(False, "masked: reconstruction loss on hidden units only")
    epochs: int = option(50, "passes over the training set (0: train --steps instead)", min=0)
    # explicitly optional: given or not, rather than compared with a default value
    steps: int | None = option(  # type: ignore[assignment]
        None, "optimizer steps, with --epochs=0 (default: --epochs passes)", min=1
    )
    batch_size: int = option(
        64, "examples per step (64 beats the reference's 128 at 50 epochs: see docs)", min=1
    )
    learning_rate: float = option(1e-3, "Adam learning rate", gt=0)
    num_train: int = option(10_000, "synthetic: training points", min=1)
    num_test: int = option(2_000, "synthetic: test points", min=1)
    data_seed: int = option(0, "synthetic: seed of Q, A and the samples", min=0)
    probe_l2: float | None = option(
        None, "probe L2 penalty (none: chosen on a 10% validation split)", min=0
    )
    probe_standardize: bool = option(False, "standardise probe features (can hurt on pixels)")
    probe_iterations: int = option(
        100, "most L-BFGS iterations of a probe fit (fewer once it has converged)", min=1
    )

    def check(self) -> None:
        super().check()
        if self.epochs and self.steps is not None:
            raise UsageError(
                f"--steps={self.steps} and --epochs={self.epochs}: give one "
                "(--epochs=0 to use --steps)"
            )
        if not self.epochs and self.steps is None:
            raise UsageError("--epochs=0 needs --steps=N (or give --epochs=N)")
        if self.patch_size and self.dataset != "mnist":
            raise UsageError("--patch_size needs image data (--dataset=mnist)")
        if self.patch_size and 28 % self.patch_size:
            raise UsageError(f"--patch_size={self.patch_size}: must divide 28 (1, 2, 4, 7, 14, 28)")


@dataclasses.dataclass(frozen=True)
class Config(Options):
    latent_dim: int = option(20, "size of the code z", min=1)


def load_data(cfg: Options) -> Data:
    return datasets.load(
        cfg.dataset,
        mnist_dir=cfg.mnist_dir,
        data_dir=cfg.data_dir,
        num_train=cfg.num_train,
        num_test=cfg.num_test,
        data_seed=cfg.data_seed,
    )


def make_model(cfg: Config, input_dim: int, rngs: nnx.Rngs) -> Autoencoder:
    return Autoencoder(
        input_dim,
        cfg.hidden_sizes,
        cfg.latent_dim,
        activation=cfg.activation,
        init=cfg.init,
        sigmoid_output=cfg.output == "sigmoid",
        mask_token=cfg.kind == "masked" and cfg.mask_fill == "token",
        rngs=rngs,
    )


def corrupt(cfg: Config, model: Autoencoder, x, key, image_shape, hp=None):
    """(corrupted input, hidden mask or None) for the configured kind.

    hp: noise_std and mask_ratio (cfg's by default; per-replica arrays when packed)."""
    hp = hp or hparams(cfg)
    if cfg.kind == "denoising":
        clip = (0.0, 1.0) if cfg.clip_noisy else None
        return add_noise(key, x, hp["noise_std"], clip), None
    if cfg.kind == "masked":
        hidden = random_mask(
            key, x.shape[0], x.shape[1], hp["mask_ratio"], cfg.patch_size, image_shape
        )
        token = None if model.mask_token is None else model.mask_token[...]
        return apply_mask(x, hidden, cfg.mask_fill, hp["mask_ratio"], token), hidden
    return x, None


# Options that enter the loss as values (Problem.hparams): trials differing only in
# them (and in seed, learning rate, weight decay) train packed in one program.
PACKABLE = ("noise_std", "mask_ratio")


def hparams(cfg: Config) -> dict[str, float]:
    return {"noise_std": cfg.noise_std, "mask_ratio": cfg.mask_ratio}


def ignored_options(cfg: Config) -> set[str]:
    """Options this configuration does not use: trials differing only in them run the
    same program."""
    unused = {"vanilla": {"clip_noisy", "mask_fill", "masked_loss_only", "patch_size"},
              "denoising": {"mask_fill", "masked_loss_only", "patch_size"},
              "masked": {"clip_noisy"}}  # fmt: skip
    return unused[cfg.kind]


def training_problem(cfg: Config) -> tuple[Config, Problem]:
    """The training config and problem of the run's one `fit` (for training.packing)."""
    data = load_data(cfg)
    return training_config(cfg, len(data.x_train)), make_problem(cfg, data)


def eval_fn(model, d, hp):
    """The clean reconstruction error (it does not depend on the corruption). Module-level,
    so runs of one model structure in one process share its compiled program."""
    del hp
    return {"recon_mse": jnp.mean(jnp.square(model(d["x"]) - d["x"]))}


def make_problem(cfg: Config, data: Data) -> Problem:
    dim = data.x_train.shape[1]

    def loss_fn(model, batch, key, hp):
        x = batch["x"]
        x_in, hidden = corrupt(cfg, model, x, key, data.image_shape, hp)
        errors = jnp.square(model(x_in) - x)
        if hidden is not None and cfg.masked_loss_only:
            loss = jnp.sum(errors * hidden) / jnp.maximum(jnp.sum(hidden), 1)
        else:
            loss = errors.mean()
        return loss, {}

    return Problem(
        make_model=lambda rngs: make_model(cfg, dim, rngs),
        loss_fn=loss_fn,
        train_data={"x": data.x_train},
        eval_data={"x": data.x_test},
        eval_fn=eval_fn,
        hparams=hparams(cfg),
    )


def training_config(cfg: Config, num_train: int) -> Config:
    """cfg with `steps` derived from `epochs` (when epochs > 0)."""
    if not cfg.epochs:
        return cfg
    steps = cfg.epochs * max(1, num_train // cfg.batch_size)
    return dataclasses.replace(cfg, steps=steps, epochs=0)


# Runs saved before `steps` became optional recorded TrainConfig's unused default with
# their epochs; read as "not given" so their configs still load (linear_probe).
_UNUSED_STEPS_OF_OLD_RUNS = 2000


def config_from_saved(saved: dict) -> Config:
    """The Config of a saved run's config.json / checkpoint (also of older versions)."""
    saved = dict(saved)
    if saved.get("epochs") and saved.get("steps") == _UNUSED_STEPS_OF_OLD_RUNS:
        saved["steps"] = None
    return from_dict(Config, saved)


@nnx.jit
def _encode(model: Autoencoder, x):
    return model.encode(x)


@nnx.jit
def _reconstruct(model: Autoencoder, x):
    return model(x)


def encode(model: Autoencoder, x: np.ndarray, rows: int = 4096) -> np.ndarray:
    """Encoder features in chunks (float32 numpy). Chunks of at most `rows` bound the
    device memory; the last, shorter chunk compiles once more (two shapes in all)."""
    return np.concatenate(
        [np.asarray(_encode(model, jnp.asarray(x[i : i + rows]))) for i in range(0, len(x), rows)]
    )


def reconstruction_mse(model: Autoencoder, x: np.ndarray) -> float:
    return float(np.mean((np.asarray(_reconstruct(model, jnp.asarray(x))) - x) ** 2))


def probe_features(cfg: Options, data: Data, train_features, test_features) -> ProbeResult:
    """The configured linear probe on given features of the train and test sets."""
    return linear_probe(
        train_features,
        data.y_train,
        test_features,
        data.y_test,
        num_classes=data.num_classes,
        l2=cfg.probe_l2,
        standardize_features=cfg.probe_standardize,
        iterations=cfg.probe_iterations,
    )


def probe_model(cfg: Options, model: Autoencoder, data: Data) -> dict[str, float]:
    """Probe accuracies and reconstruction error of one model."""
    result = probe_features(cfg, data, encode(model, data.x_train), encode(model, data.x_test))
    return {
        "recon_mse": reconstruction_mse(model, data.x_test),
        "probe_accuracy": result.test_accuracy,
        "probe_train_accuracy": result.train_accuracy,
        "probe_l2": result.l2,
    }


def evaluate_replicas(cfg: Config, result: FitResult, data: Data) -> dict[str, np.ndarray]:
    """probe_model for every trained replica: {metric: (S,) or scalar}."""
    rows = [probe_model(cfg, result.model(r), data) for r in range(result.num_seeds)]
    stacked = {k: np.asarray([row[k] for row in rows]) for k in rows[0]}
    return stacked if result.num_seeds > 1 else {k: v[0] for k, v in stacked.items()}


def run(cfg: Config, run: Run) -> dict:
    data = load_data(cfg)
    print(f"data: {data.source}; {len(data.x_train):,} train / {len(data.x_test):,} test")
    train_cfg = training_config(cfg, len(data.x_train))
    problem = make_problem(cfg, data)
    result = fit(train_cfg, problem, run)
    trained = evaluate_replicas(cfg, result, data)
    untrained = probe_model(cfg, initial_model(problem, train_cfg), data)
    mean, basis, _ = pca_basis(data.x_train)
    k = min(cfg.latent_dim, data.x_train.shape[1])
    summary = {
        **replica_summary(trained),
        "recon_mse_untrained": untrained["recon_mse"],
        "probe_accuracy_untrained": untrained["probe_accuracy"],
        "pca_recon_mse": pca_reconstruction_mse(data.x_test, mean, basis, k),
        "probe_standardized": int(cfg.probe_standardize),
        "mnist_split_from_test_set": int(data.split_from_test_set),
        **result.stats,
        "seconds_per_epoch": result.stats["train_seconds"]
        / max(1e-9, train_cfg.steps * cfg.batch_size / len(data.x_train)),
    }
    print(
        f"recon_mse {summary['recon_mse']:.5f} (PCA-{k} {summary['pca_recon_mse']:.5f}), "
        f"probe accuracy {summary['probe_accuracy']:.4f} "
        f"(untrained {untrained['probe_accuracy']:.4f})"
    )
    plot_curve(run, result, first_seed=cfg.seed)
    if data.image_shape is not None:
        plot_reconstructions(cfg, run, result.model(), data)
    return summary


def plot_curve(run: Run, result: FitResult, first_seed: int = 0) -> None:
    if not result.history:
        return
    steps = [h["step"] for h in result.history]
    values = [h["recon_mse"] for h in result.history]
    fig, ax = reusable_subplots("autoencoder.recon_curve", figsize=(5, 3.2))
    plot_over_seeds(ax, steps, values, "recon_mse", "C0", first_seed)
    ax.legend(fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("test reconstruction MSE (clean inputs)")
    run.save_figure(fig, "recon_curve")


def plot_reconstructions(
    cfg: Config, run: Run, model: Autoencoder, data: Data, count: int = 10
) -> None:
    """reconstructions.png: test inputs, their corrupted versions, the outputs from those,
    and (for denoising / masked) the outputs from the clean inputs, which recon_mse scores."""
    plt = pyplot()

    x = jnp.asarray(data.x_test[:count])
    corrupted, _ = corrupt(cfg, model, x, jax.random.key(cfg.seed + 99), data.image_shape)
    # two-line labels: one line is taller than a row of images and touches its neighbours
    rows = [("input", x)]
    if cfg.kind != "vanilla":
        rows += [(f"{cfg.kind}\ninput", corrupted), ("output\nfrom it", model(corrupted))]
    rows += [("output from\nclean input", model(x))]
    fig, axes = plt.subplots(len(rows), count, figsize=(1.2 * count, 1.3 * len(rows)))
    for r, (label, images) in enumerate(rows):
        for c in range(count):
            ax = axes[r, c]
            ax.imshow(np.clip(np.asarray(images[c]).reshape(data.image_shape), 0, 1), cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=8)
    fig.suptitle(f"{cfg.kind} autoencoder, latent {cfg.latent_dim}")
    run.save_figure(fig, "reconstructions")
