"""Recognising a failure of the machine (a full disk, an I/O error) in whatever wrapping
a library gives it: orbax, tensorboardX and wandb re-raise OS errors as their own
exceptions, chained, grouped or as text from C++ (tensorstore)."""

from __future__ import annotations

import contextlib
import errno
import logging
import re
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import NamedTuple

# errno -> what the one-line message says
DISK_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EIO: "input/output error",
    errno.EROFS: "read-only file system",
}
# the same faults as they appear in messages of libraries that do not keep the errno
_DISK_TEXTS = {
    "No space left on device": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT,
    "Read-only file system": errno.EROFS,
}

# the first quoted absolute path in such a message (tensorstore quotes the file)
_QUOTED_PATH = re.compile(r'"(/[^"]+)"')


def _chain(err: BaseException) -> Iterator[BaseException]:
    """`err`, its causes and contexts, and the members of exception groups, each once."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        todo += list(getattr(e, "exceptions", ()))


def disk_error(err: BaseException, where: object = None) -> str | None:
    """'no space left on device writing PATH' when `err` comes from such a fault, else None.

    `where` (e.g. the workdir) is named when the error itself names no file."""
    kind = None
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            kind = DISK_ERRNOS[e.errno]
            if e.filename:
                return f"{kind} writing {e.filename}"
    for e in _chain(err):
        text = str(e)
        for needle, number in _DISK_TEXTS.items():
            if needle in text:
                path = _QUOTED_PATH.search(text)
                kind = kind or DISK_ERRNOS[number]
                if path:
                    return f"{kind} writing {path.group(1)}"
    if kind is not None and where is not None:
        return f"{kind} writing into {where}"
    return kind


_reported = False


def mark_reported() -> None:
    """The run's failure has been reported in its one line: from now on, what other
    threads, atexit handlers and garbage collection say about it is dropped."""
    global _reported
    _reported = True


def _is_library_noise(unraisable) -> bool:
    """What orbax's async readers leave behind when a restore fails (callbacks into an
    event loop that is already closed, coroutines that were never awaited), and a
    Ctrl-C that landed in a garbage-collection callback."""
    value = unraisable.exc_value
    if isinstance(value, KeyboardInterrupt):  # raised inside a gc callback: recorded by
        return True  # experiment.interrupt and raised again at the next boundary
    if isinstance(value, RuntimeError) and "Event loop is closed" in str(value):
        return True
    return type(unraisable.object).__name__ == "coroutine"


# loggers of libraries that report, from their own threads, a failure we report once
_NOISY_LOGGERS = ("absl", "asyncio")


class _Hooks(NamedTuple):
    """What `_quiet_hooks` replaced."""

    unraisable: Callable
    thread: Callable
    levels: dict[str, int]


def _quiet_hooks() -> _Hooks:
    """Install the filters; returns what they replaced (for `_restore`)."""
    global _reported
    _reported = False  # a new run (in-process callers run several) has reported nothing
    saved = _Hooks(
        sys.unraisablehook,
        threading.excepthook,
        {name: logging.getLogger(name).level for name in _NOISY_LOGGERS},
    )

    def unraisable_hook(unraisable) -> None:
        if not (_reported or _is_library_noise(unraisable)):
            saved.unraisable(unraisable)

    def thread_hook(args) -> None:
        # a writer thread (tensorboardX, orbax) hitting the full disk: the main thread
        # meets the same fault and reports it in one line
        if not (_reported or (args.exc_value is not None and disk_error(args.exc_value))):
            saved.thread(args)

    sys.unraisablehook = unraisable_hook
    threading.excepthook = thread_hook
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return saved


def _restore(saved: _Hooks) -> None:
    sys.unraisablehook = saved.unraisable
    threading.excepthook = saved.thread
    for name, level in saved.levels.items():
        logging.getLogger(name).setLevel(level)


def silence_library_noise() -> None:
    """`quiet_library_noise` for the rest of the process (a command-line entry point):
    leftovers of a failure also surface while the interpreter shuts down."""
    _quiet_hooks()
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited")


@contextlib.contextmanager
def quiet_library_noise() -> Iterator[None]:
    """Keep a one-line error one line: drop the leftovers above, writer threads' reports
    of a full disk and orbax's log lines (a failure that matters reaches the main thread
    as an exception and is reported once)."""
    saved = _quiet_hooks()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="coroutine .* was never awaited")
            yield
    finally:
        _restore(saved)
