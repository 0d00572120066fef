"""A run's workdir: its layout, atomic writes, the lock that keeps it to one process,
and the identity check that keeps a resumed run under the config it started with.

Layout (every module takes these names from here):

    WORKDIR/config.json        {"task": ..., "config": {...}}
    WORKDIR/summary.json       final metrics of a successful run
    WORKDIR/failure.json       {"error", "exit_code"} of a failed or interrupted run
    WORKDIR/.lock              held (flock) by the process running in the workdir
    WORKDIR/wandb_run_id       the id of the workdir's W&B run (files in WORKDIR/wandb/)
    WORKDIR/checkpoints/<step> orbax checkpoints (tasks with several models use
                               checkpoints/<model>/<step>)
    WORKDIR/best/<step>        the selected (early-stopped) parameters
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import math
import os
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from experiment.errors import UsageError

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
FAILURE_FILE = "failure.json"
LOCK_FILE = ".lock"
WANDB_ID_FILE = "wandb_run_id"  # the W&B run of this workdir, resumed by every rerun
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"


def checkpoints_dir(workdir: Path, model: str | None = None) -> Path:
    """WORKDIR/checkpoints, or WORKDIR/checkpoints/<model> for one of several models."""
    root = workdir / CHECKPOINTS_DIR
    return root if model is None else root / model


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Files are created through mkstemp (mode 0600) and renamed into place; they get the
# mode any file the user writes would get (0666 less the umask), read once at start-up.
FILE_MODE = 0o666 & ~_current_umask()


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
            f.flush()
            os.fchmod(f.fileno(), FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json_object(path: Path, what: str) -> dict:
    """A JSON object from `path`, or a UsageError naming the file and what is wrong with it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{what} {path} is unreadable ({err}); restore or remove it") from None
    if not isinstance(data, dict):
        raise UsageError(
            f"{what} {path} holds a JSON {type(data).__name__}, not an object; restore or remove it"
        )
    return data


def resolve(path: str | Path) -> Path:
    """A user-given path with `~` expanded, made absolute against the current directory."""
    return Path(os.path.abspath(os.path.expanduser(str(path))))


def default_workdir(task: str, root: Path = Path("runs")) -> Path:
    """A new runs/<task>/<timestamp>[-n], created here so two runs never share one."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    root = resolve(root) / task
    for n in range(1000):
        path = root / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            root.mkdir(parents=True, exist_ok=True)
            path.mkdir()
            return path
        except FileExistsError:
            continue
        except OSError as err:
            raise UsageError(f"cannot create a workdir under {root} ({_reason(err)})") from None
    raise UsageError(f"cannot find a free workdir name under {root}")


def _reason(err: OSError) -> str:
    return err.strerror or str(err)


def prepare_workdir(path: Path) -> Path:
    """Create the workdir (and parents) or raise a UsageError saying why it cannot be used."""
    try:
        if path.exists() and not path.is_dir():
            raise UsageError(f"--workdir={path}: exists and is not a directory")
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UsageError(f"--workdir={path}: not writable ({_reason(err)})") from None
    return path


class WorkdirLock:
    """An exclusive lock on WORKDIR/.lock, held while a process runs in the workdir.

    `fcntl.flock` locks die with their process (also under kill -9), so a lock left by
    a dead process is simply free again; its file still names that process, and taking
    it over prints a note. The file is never removed: removing it would let two
    processes lock two different files of the same name.
    """

    def __init__(self, workdir: Path):
        self.path = workdir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as err:
            raise UsageError(f"cannot create the lock {self.path} ({_reason(err)})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_holder(fd)
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise UsageError(f"cannot lock {self.path} ({_reason(err)})") from None
            raise UsageError(
                f"--workdir={self.path.parent} is in use by another run ({holder}); wait for it "
                "to finish or choose another --workdir"
            ) from None
        previous = _read_holder(fd)
        if previous:
            print(f"note: took over the lock of a run that is gone ({previous})", flush=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):  # empty: released cleanly, nothing to take over
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing releases the flock
        self._fd = None


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""


def read_saved_run(path: Path) -> tuple[str, dict] | None:
    """(task, config) recorded in WORKDIR/config.json, None when there is none."""
    saved_file = path / CONFIG_FILE
    if not saved_file.exists():
        return None
    saved = read_json_object(saved_file, "the saved config")
    task, config = saved.get("task"), saved.get("config")
    if not isinstance(task, str) or not isinstance(config, dict):
        raise UsageError(
            f"the saved config {saved_file} lacks a task name or config object; "
            "restore or remove it"
        )
    return task, config


def check_same_run(
    path: Path, task: str, config: Mapping[str, Any], saved: tuple[Any, Any], source: Path
) -> None:
    """Refuse (UsageError) unless `saved` = (task, config) equals the requested run.

    `source` names the file the saved run came from, for the message.
    """
    saved_task, saved_config = saved
    if saved_task != task:
        raise UsageError(
            f"--workdir={path} holds a run of task {saved_task!r}, not {task!r} (recorded in "
            f"{source}); choose another --workdir"
        )
    current = json_ready(dict(config))
    saved_config = dict(saved_config)
    differing = sorted(
        k for k in set(saved_config) | set(current) if saved_config.get(k) != current.get(k)
    )
    if differing:
        changes = ", ".join(
            f"{k}: {saved_config.get(k, '(unset)')!r} -> {current.get(k, '(unset)')!r}"
            for k in differing
        )
        raise UsageError(
            f"--workdir={path} holds a run with a different config ({changes}), recorded in "
            f"{source}; "
            "resume with the same options or choose another --workdir"
        )
