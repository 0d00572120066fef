"""Recognising a failure of the machine (a full disk, an I/O error) in whatever wrapping
a library gives it: orbax, tensorboardX and wandb re-raise OS errors as their own
exceptions, chained, grouped or as text from C++ (tensorstore)."""

from __future__ import annotations

import errno
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
                return DISK_ERRNOS[number]
    return None
