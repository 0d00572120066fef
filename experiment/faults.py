"""Recognising a failure of the machine (a full disk, an I/O error) in whatever wrapping
a library gives it: orbax, tensorboardX and wandb re-raise OS errors as their own
exceptions, chained, grouped or as text from C++ (tensorstore)."""

from __future__ import annotations

import contextlib
import errno
import logging
import re
import sys
import warnings
from collections.abc import Iterator

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
    todo = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        todo += list(getattr(e, "exceptions", ()))


def disk_error(err: BaseException) -> str | None:
    """'no space left on device writing PATH' when `err` comes from such a fault, else None."""
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            where = f" writing {e.filename}" if e.filename else ""
            return f"{DISK_ERRNOS[e.errno]}{where}"
    for e in _chain(err):
        text = str(e)
        for needle, number in _DISK_TEXTS.items():
            if needle in text:
                path = _QUOTED_PATH.search(text)
                return DISK_ERRNOS[number] + (f" writing {path.group(1)}" if path else "")
    return None


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


@contextlib.contextmanager
def quiet_library_noise() -> Iterator[None]:
    """Keep a one-line error one line: drop the leftovers above and orbax's absl log
    lines (a failure that matters reaches us as an exception, reported once)."""
    previous_hook = sys.unraisablehook

    def hook(unraisable) -> None:
        if not _is_library_noise(unraisable):
            previous_hook(unraisable)

    absl = logging.getLogger("absl")
    previous_level = absl.level
    sys.unraisablehook = hook
    absl.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="coroutine .* was never awaited")
            yield
    finally:
        sys.unraisablehook = previous_hook
        absl.setLevel(previous_level)
