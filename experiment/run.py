"""One run's workdir: config.json, summary.json, plots and metric writers.

Files are written atomically (temporary file + rename), so an interrupted run
never leaves a half-written config, summary or plot behind.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from experiment.config import Config, to_dict
from experiment.errors import UsageError
from experiment.writers import MetricWriters, TensorBoardWriter, WandbWriter

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
FAILURE_FILE = "failure.json"


def json_ready(value: Any) -> Any:
    """Plain JSON values: numpy/jax scalars to numbers, NaN/inf to None, tuples to lists."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if hasattr(value, "tolist"):  # numpy / jax arrays and scalars
        return json_ready(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see the old file or the complete new one, never a part."""
    text = json.dumps(json_ready(data), indent=2, sort_keys=False, allow_nan=False) + "\n"
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def default_workdir(task: str, root: Path = Path("runs")) -> Path:
    """runs/<task>/<timestamp>, made unique if two runs start within the same second."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = root / task / stamp
    n = 1
    while path.exists():
        path = root / task / f"{stamp}-{n}"
        n += 1
    return path


def prepare_workdir(path: Path) -> Path:
    """Create the workdir (and parents) or raise a UsageError saying why it cannot be used."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"--workdir={path}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UsageError(f"--workdir={path}: not writable ({err.strerror or err})") from None
    return path


def check_same_config(path: Path, task: str, config: Mapping[str, Any]) -> None:
    """A workdir may only be reused (resumed) by the same task with the same config."""
    saved_file = path / CONFIG_FILE
    if not saved_file.exists():
        return
    saved = json.loads(saved_file.read_text())
    saved_task, saved_config = saved.get("task"), saved.get("config", {})
    if saved_task != task:
        raise UsageError(
            f"--workdir={path} holds a run of task {saved_task!r}, not {task!r}; "
            "choose another --workdir"
        )
    current = json_ready(dict(config))
    differing = sorted(
        k for k in set(saved_config) | set(current) if saved_config.get(k) != current.get(k)
    )
    if differing:
        changes = ", ".join(
            f"{k}: {saved_config.get(k)!r} -> {current.get(k)!r}" for k in differing
        )
        raise UsageError(
            f"--workdir={path} holds a run with a different config ({changes}); "
            "resume with the same options or choose another --workdir"
        )


def is_primary_process() -> bool:
    """True on the process that logs and writes files (process 0 of a multi-host run)."""
    import jax

    return jax.process_index() == 0


class Run:
    """A run in progress: where it writes and how it logs."""

    def __init__(self, task: str, cfg: Config, workdir: Path, wandb_mode: str = "disabled"):
        self.task, self.cfg, self.workdir = task, cfg, workdir
        self.config_dict = to_dict(cfg)
        self.primary = is_primary_process()
        check_same_config(workdir, task, self.config_dict)
        writers = []
        if self.primary:  # in a multi-host run only process 0 writes files and logs
            write_json_atomic(workdir / CONFIG_FILE, {"task": task, "config": self.config_dict})
            writers.append(TensorBoardWriter(workdir))
            if wandb_mode != "disabled":
                writers.append(WandbWriter(wandb_mode, workdir, task, self.config_dict))
        self.writers = MetricWriters(writers)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Scalars to TensorBoard and W&B."""
        self.writers.scalars(step, metrics)

    def save_figure(self, fig, name: str, step: int | None = None) -> Path:
        """Save a matplotlib figure as WORKDIR/<name>.png (atomically) and log it as an image."""
        import io

        import matplotlib.pyplot as plt

        path = self.workdir / f"{name}.png"
        if not self.primary:
            plt.close(fig)
            return path
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        write_bytes_atomic(path, buffer.getvalue())
        self.writers.image(name, path, step)
        return path

    def finish(self, summary: Mapping[str, Any]) -> None:
        """Write summary.json and the final hparams/summary to the writers."""
        if not self.primary:
            return
        write_json_atomic(self.workdir / SUMMARY_FILE, summary)
        (self.workdir / FAILURE_FILE).unlink(missing_ok=True)
        self.writers.hparams(self.config_dict, summary)

    def fail(self, message: str, exit_code: int) -> None:
        """Record why the run failed (for sweeps and reports); checkpoints are left as they were."""
        if not self.primary:
            return
        write_json_atomic(self.workdir / FAILURE_FILE, {"error": message, "exit_code": exit_code})

    def close(self) -> None:
        self.writers.close()
