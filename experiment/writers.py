"""Where a run's metrics go: TensorBoard event files and Weights & Biases.

TensorBoard events are written with tensorboardX (no TensorFlow) straight into
the workdir, so `tensorboard --logdir runs/` shows every run by its path. The
run's config is written as HParams in the same event stream, so runs can be
filtered and sorted by configuration in the HParams dashboard.

W&B is imported lazily. Modes: `online`, `offline` (files under
WORKDIR/wandb for a later `wandb sync`), `disabled`. When the `--wandb` option
is not given, the mode is $WANDB_MODE if set, `online` under `wandb agent`
(which sets $WANDB_SWEEP_ID), else `offline`.
"""

from __future__ import annotations

import math
import os
import secrets
import string
import struct
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from experiment import interrupt
from experiment.errors import UsageError
from experiment.run_options import WANDB_MODES


def default_wandb_mode() -> str:
    """$WANDB_MODE, else online under a sweep agent, else offline."""
    mode = os.environ.get("WANDB_MODE")
    if mode in WANDB_MODES:
        return mode
    if mode == "dryrun":
        return "offline"
    return "online" if os.environ.get("WANDB_SWEEP_ID") else "offline"


def _hparam_value(value: Any) -> Any:
    """TensorBoard HParams accept numbers, strings and booleans only."""
    if isinstance(value, bool | int | float | str):
        return value
    return "none" if value is None else ",".join(str(v) for v in value)


RESULT_PREFIX = "result/"
# What training.loop.fit adds to every summary about how the run went, not what it
# found; kept out of the HParams metrics (tests/test_tracking.py checks the two agree).
RUN_STATS = frozenset(
    {"steps", "train_seconds", "compile_seconds", "steps_per_second", "steps_per_call",
     "compilations", "devices", "best_step", "stopped_early"}
)  # fmt: skip
# The options a sweep varies (set by sweep.py for its trials): always HParams columns.
SWEPT_ENV = "RNNAE_SWEPT_OPTIONS"
# '<name>-<id>' of the sweep a trial belongs to (set by sweep.py): its W&B group and tag.
SWEEP_ENV = "RNNAE_SWEEP"


def result_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """The summary's finite scalar results: no run statistics, no spreads over seeds."""
    return {
        k: v
        for k, v in _finite_scalars(summary).items()
        if k not in RUN_STATS and not k.endswith("_std")
    }


def varying_options(task: str, config: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict:
    """The HParams columns of a run: `task`, the options that differ from the task's
    defaults, and the options a sweep varies (the full config stays in config.json
    and the W&B config)."""
    swept = {n for n in os.environ.get(SWEPT_ENV, "").split(",") if n}
    return {
        "task": task,
        **{k: v for k, v in config.items() if k in swept or v != defaults.get(k, object())},
    }


def _finite_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


# PNG colour types (the IHDR chunk's byte 9) and their channels: grey, RGB, grey+alpha, RGBA
_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}


def png_shape(png: bytes) -> tuple[int, int, int]:
    """(width, height, channels) of a PNG image, from its header (IHDR, the first chunk)."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise ValueError("not a PNG image")
    width, height = struct.unpack(">II", png[16:24])
    return width, height, _PNG_CHANNELS.get(png[25], 3)


class TensorBoardWriter:
    """Scalars, images and hparams into WORKDIR/events.out.tfevents.*."""

    def __init__(self, logdir: Path):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(logdir=str(logdir), flush_secs=10)
        self._last_step = 0

    def scalars(self, step: int, metrics: Mapping[str, float]) -> None:
        self._last_step = max(self._last_step, step)
        for key, value in _finite_scalars(metrics).items():
            self._writer.add_scalar(key, value, step)

    def image(self, name: str, png: Path, step: int) -> None:
        """The PNG file as it is: TensorBoard's image summary holds an encoded image
        (add_image would decode, rescale and encode it again: 20 ms a figure)."""
        from tensorboardX.proto.summary_pb2 import Summary

        encoded = png.read_bytes()
        width, height, channels = png_shape(encoded)
        image = Summary.Image(
            height=height, width=width, colorspace=channels, encoded_image_string=encoded
        )
        summary = Summary(value=[Summary.Value(tag=name, image=image)])
        self._writer.file_writer.add_summary(summary, step)

    def hparams(self, config: Mapping[str, Any], summary: Mapping[str, Any]) -> None:
        """The HParams dashboard's row of this run: `config` (the options that vary, see
        `varying_options`) against its result metrics, each one point `result/<key>`."""
        from tensorboardX.summary import hparams

        metrics = {f"{RESULT_PREFIX}{k}": v for k, v in result_metrics(summary).items()}
        exp, ssi, sei = hparams({k: _hparam_value(v) for k, v in config.items()}, metrics)
        for proto in (exp, ssi, sei):
            self._writer.file_writer.add_summary(proto)
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, self._last_step)

    def fail(self, message: str, exit_code: int) -> None:
        """Nothing to record: failure.json says why (TensorBoard has no run status)."""

    def close(self) -> None:
        self._writer.close()


STEP_KEY = "train_step"


def _start_wandb(wandb, mode: str, **init_args):
    """wandb.init, with a user's problem (no login, no network) as a one-line UsageError."""
    from experiment.faults import disk_error

    try:
        return wandb.init(mode=mode, **init_args)
    except Exception as err:
        if mode != "online" or disk_error(err) is not None:
            raise
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UsageError(
            f"--wandb=online: W&B could not start ({first_line}); log in with `wandb login` "
            "or set WANDB_API_KEY, or run with --wandb=offline and `wandb sync` later"
        ) from None


class WandbWriter:
    """A W&B run whose files live in WORKDIR/wandb."""

    def __init__(self, mode: str, workdir: Path, task: str, config: Mapping[str, Any]):
        try:
            import wandb
        except ImportError:
            if mode == "online":
                raise UsageError(
                    "--wandb=online needs the wandb package: pip install wandb"
                ) from None
            print("note: wandb is not installed; W&B logging is off", file=sys.stderr)
            self._run = None
            return
        self._wandb = wandb
        self._exit_code = 0
        sweep = os.environ.get(SWEEP_ENV)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._run = _start_wandb(
                wandb,
                mode,
                # one W&B run per workdir: a rerun (resume) continues it, not a new one
                id=workdir_run_id(workdir),
                resume="allow",
                # several runs at once in one process (trials packed by the study
                # executor): each its own run, never the previous one returned
                reinit="create_new",
                project=os.environ.get("WANDB_PROJECT", "rnnae"),
                dir=str(workdir),
                name=os.environ.get("WANDB_NAME") or f"{task}-{workdir.name}",
                # a sweep's trials are one group (and tag) of their own; other runs
                # group by task
                group=sweep or task,
                tags=[task, *([sweep] if sweep else [])],
                job_type=task,
                config=dict(config, task=task, **({"sweep": sweep} if sweep else {})),
                settings=wandb.Settings(silent=True, disable_git=True),
            )
            # Our step is a logged metric, not W&B's own monotonic step: tasks that
            # train several models in one run (latent_study, grad_flow_compare) log
            # from step 0 again, which W&B's step would drop.
            self._run.define_metric(STEP_KEY)
            self._run.define_metric("*", step_metric=STEP_KEY)

    def scalars(self, step: int, metrics: Mapping[str, float]) -> None:
        if self._run is not None:
            self._run.log({**_finite_scalars(metrics), STEP_KEY: step})

    def image(self, name: str, png: Path, step: int) -> None:
        if self._run is not None:
            self._run.log({name: self._wandb.Image(str(png)), STEP_KEY: step})

    def hparams(self, config: Mapping[str, Any], summary: Mapping[str, Any]) -> None:
        if self._run is not None:
            # a resumed run that had failed before is a success now: clear that record
            self._run.summary.update({**summary, "error": "", "exit_code": 0})

    def fail(self, message: str, exit_code: int) -> None:
        """Mark the run failed: the error in its summary, the exit code at `close`."""
        self._exit_code = exit_code
        if self._run is not None:
            self._run.summary.update({"error": message, "exit_code": exit_code})

    def close(self) -> None:
        if self._run is not None:
            # W&B shows a run finished with a non-zero exit code as failed
            self._run.finish(exit_code=self._exit_code)


def workdir_run_id(workdir: Path) -> str:
    """The workdir's W&B run id: read from WORKDIR/wandb_run_id, or made and saved there."""
    from experiment.workdir import WANDB_ID_FILE, write_bytes_atomic

    file = workdir / WANDB_ID_FILE
    try:
        run_id = file.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        run_id = ""
    if not run_id.isalnum():  # missing or damaged: a new id (the old run is not reachable)
        # W&B's own id format: 8 lowercase letters and digits
        alphabet = string.ascii_lowercase + string.digits
        run_id = "".join(secrets.choice(alphabet) for _ in range(8))
        write_bytes_atomic(file, (run_id + "\n").encode())
    return run_id


class MetricWriters:
    """Fans metrics out to every enabled writer, tracking the last step seen."""

    def __init__(self, writers: list):
        self._writers = writers
        self.last_step = 0

    # Every call is shielded from Ctrl-C (experiment.interrupt.deferred): tensorboardX
    # hands events to its writer thread through a multiprocessing queue, and a
    # KeyboardInterrupt inside a put leaves that thread unable to stop, so `close`
    # would wait forever. The signal is raised as soon as the call returns.

    def scalars(self, step: int, metrics: Mapping[str, float]) -> None:
        self.last_step = max(self.last_step, step)
        with interrupt.deferred():
            for w in self._writers:
                w.scalars(step, metrics)

    def image(self, name: str, png: Path, step: int | None = None) -> None:
        with interrupt.deferred():
            for w in self._writers:
                w.image(name, png, self.last_step if step is None else step)

    def hparams(self, config: Mapping[str, Any], summary: Mapping[str, Any]) -> None:
        with interrupt.deferred():
            for w in self._writers:
                w.hparams(config, summary)

    def fail(self, message: str, exit_code: int) -> None:
        with interrupt.deferred():
            for w in self._writers:
                w.fail(message, exit_code)

    def close(self) -> None:
        with interrupt.deferred():
            for w in self._writers:
                w.close()
