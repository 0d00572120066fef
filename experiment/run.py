"""A run in progress: its workdir's config.json, summary.json, plots and metric writers.

Files are written atomically (temporary file + rename), so an interrupted run
never leaves a half-written config, summary or plot behind. The layout and the
workdir lock live in experiment.workdir.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from experiment.config import Config, default_dict, to_dict
from experiment.errors import RunFailed
from experiment.workdir import (
    CONFIG_FILE,
    FAILURE_FILE,
    SUMMARY_FILE,
    WorkdirLock,
    json_ready,
    write_bytes_atomic,
    write_json_atomic,
)
from experiment.writers import MetricWriters, TensorBoardWriter, WandbWriter, varying_options

__all__ = ["Run", "json_ready", "write_bytes_atomic", "write_json_atomic"]


def is_primary_process() -> bool:
    """True on the process that logs and writes files (process 0 of a multi-host run)."""
    import jax

    return jax.process_index() == 0


class Run:
    """A run in progress: where it writes and how it logs."""

    def __init__(
        self,
        task: str,
        cfg: Config,
        workdir: Path,
        wandb_mode: str = "disabled",
        lock: WorkdirLock | None = None,
    ):
        """Start writing to `workdir`; the caller has checked that it may (train.start_run).

        `lock`: the held workdir lock, released by `close`.
        """
        self.task, self.cfg, self.workdir = task, cfg, workdir
        self.config_dict = to_dict(cfg)
        self.primary = is_primary_process()
        self._lock = lock
        writers: list[TensorBoardWriter | WandbWriter] = []
        if self.primary:  # in a multi-host run only process 0 writes files and logs
            # W&B first: it is what fails for a user's reasons (no login), and then
            # nothing else has been written
            if wandb_mode != "disabled":
                writers.append(WandbWriter(wandb_mode, workdir, task, self.config_dict))
            writers.append(TensorBoardWriter(workdir))
            write_json_atomic(workdir / CONFIG_FILE, {"task": task, "config": self.config_dict})
        self.writers = MetricWriters(writers)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Scalars to TensorBoard and W&B."""
        self.writers.scalars(step, metrics)

    def save_figure(self, fig, name: str, step: int | None = None) -> Path:
        """Save a matplotlib figure as WORKDIR/<name>.png (atomically) and log it as an image."""
        import matplotlib.pyplot as plt

        from experiment.figures import plain_log_labels, png_bytes

        path = self.workdir / f"{name}.png"
        if not self.primary:
            plt.close(fig)
            return path
        plain_log_labels(fig)
        png = png_bytes(fig, dpi=110)
        plt.close(fig)
        write_bytes_atomic(path, png)
        self.writers.image(name, path, step)
        return path

    def finish(self, summary: Mapping[str, Any]) -> None:
        """Write summary.json and the final hparams/summary to the writers.

        Raises RunFailed (nothing written) when a metric is not a finite number: a run
        never reports success with NaN, inf or a missing value.
        """
        bad = non_finite_keys(summary)
        if bad:
            raise RunFailed(
                f"the run ended with non-finite results ({', '.join(bad)}); the training "
                "diverged or overflowed. Try a lower --learning_rate or gradient clipping"
            )
        if not self.primary:
            return
        write_json_atomic(self.workdir / SUMMARY_FILE, summary)
        (self.workdir / FAILURE_FILE).unlink(missing_ok=True)
        defaults = default_dict(type(self.cfg))
        self.writers.hparams(varying_options(self.task, self.config_dict, defaults), summary)

    def fail(self, message: str, exit_code: int) -> None:
        """Record why the run failed (for sweeps and reports); checkpoints are left as they were."""
        if not self.primary:
            return
        self.writers.fail(message, exit_code)
        write_json_atomic(self.workdir / FAILURE_FILE, {"error": message, "exit_code": exit_code})

    def close(self) -> None:
        try:
            self.writers.close()
        finally:
            if self._lock is not None:
                self._lock.release()


def non_finite_keys(summary: Mapping[str, Any]) -> list[str]:
    """Keys of `summary` holding NaN, inf or None, alone or inside a list (per-seed values)."""

    def finite(value: Any) -> bool:
        value = json_ready(value) if hasattr(value, "tolist") else value
        if value is None:
            return False
        if isinstance(value, float):
            return math.isfinite(value)
        if isinstance(value, list | tuple):
            return all(finite(v) for v in value)
        if isinstance(value, Mapping):
            return all(finite(v) for v in value.values())
        return True

    return [str(k) for k, v in summary.items() if not finite(v)]
