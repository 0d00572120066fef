"""Rebuild a trained encoder from its checkpoint alone and fit a linear probe on it.

    python train.py --task=linear_probe --checkpoint=WORKDIR [--step=N]

The checkpoint's saved config rebuilds the model; only the `params` item is
restored (frozen); the data are regenerated (synthetic) or reloaded (MNIST,
from the saved `--mnist_dir` / `--data_dir` unless overridden here).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from data.datasets import INPUT_DIM
from experiment.config import Config as BaseConfig
from experiment.config import option
from experiment.errors import UsageError
from experiment.run import Run
from experiment.workdir import checkpoints_dir
from tasks import autoencoder
from training.checkpoints import read_config, restore_model

PROBEABLE_TASKS = ("autoencoder",)


@dataclasses.dataclass(frozen=True)
class Config(BaseConfig):
    checkpoint: str = option("", "workdir of an autoencoder run (or its checkpoints/ directory)")
    step: int | None = option(None, "checkpoint step (default: the latest)", min=0)
    replica: int = option(0, "which replica, for runs trained with --num_seeds > 1", min=0)
    probe_l2: float | None = option(None, "L2 penalty (none: chosen on a validation split)", min=0)
    probe_standardize: bool = option(False, "standardise the features")
    probe_iterations: int = option(100, "most L-BFGS iterations (fewer once converged)", min=1)
    mnist_dir: str | None = option(None, "override the saved MNIST IDX directory")
    data_dir: str | None = option(None, "override the saved TFDS data directory")

    def check(self) -> None:
        if not self.checkpoint:
            raise UsageError("--checkpoint is required: the workdir of a trained autoencoder run")


def checkpoint_directory(path: Path) -> Path:
    """WORKDIR/checkpoints if `path` is a run's workdir, else `path` itself."""
    if not path.exists():
        raise UsageError(f"--checkpoint={path}: no such directory")
    run_checkpoints = checkpoints_dir(path)
    return run_checkpoints if run_checkpoints.is_dir() else path


def load_encoder(cfg: Config) -> tuple[autoencoder.Config, autoencoder.Autoencoder, int]:
    """(the run's config, the restored model, checkpoint step)."""
    directory = checkpoint_directory(Path(cfg.checkpoint))
    step, saved = read_config(directory, cfg.step)
    if saved.get("task") not in PROBEABLE_TASKS:
        raise UsageError(
            f"--checkpoint={cfg.checkpoint} holds a {saved.get('task')!r} run; "
            f"linear_probe needs one of {', '.join(PROBEABLE_TASKS)}"
        )
    ae_cfg = autoencoder.config_from_saved(saved["config"])
    ae_cfg = dataclasses.replace(
        ae_cfg,
        mnist_dir=cfg.mnist_dir or ae_cfg.mnist_dir,
        data_dir=cfg.data_dir or ae_cfg.data_dir,
    )
    if cfg.replica >= ae_cfg.num_seeds:
        raise UsageError(f"--replica={cfg.replica}: the run trained {ae_cfg.num_seeds} replica(s)")
    dim = INPUT_DIM[ae_cfg.dataset]
    model = restore_model(
        directory,
        step,
        lambda rngs: autoencoder.make_model(ae_cfg, dim, rngs),
        ae_cfg.num_seeds,
        cfg.replica,
    )
    return ae_cfg, model, step


def run(cfg: Config, run: Run) -> dict:
    ae_cfg, model, step = load_encoder(cfg)
    data = autoencoder.load_data(ae_cfg)
    probe_cfg = dataclasses.replace(
        ae_cfg,
        probe_l2=cfg.probe_l2,
        probe_standardize=cfg.probe_standardize,
        probe_iterations=cfg.probe_iterations,
    )
    result = autoencoder.probe_model(probe_cfg, model, data)
    print(
        f"checkpoint step {step}: probe accuracy {result['probe_accuracy']:.4f} "
        f"(train {result['probe_train_accuracy']:.4f}), recon_mse {result['recon_mse']:.5f}"
    )
    return {**result, "checkpoint_step": step, "probe_standardized": int(cfg.probe_standardize)}
