"""Ctrl-C and SIGTERM: one KeyboardInterrupt, remembered even when a library eats it.

Python turns SIGINT into a KeyboardInterrupt wherever the main thread happens to be,
and some libraries catch it (an import that re-raises ImportError, a background
helper that swallows it), so a run could go on and exit 0 or fail with an unrelated
traceback. While `trap()` is active, the first SIGINT or SIGTERM raises one
KeyboardInterrupt and is recorded; later signals are recorded only, so the clean-up
that follows (finishing an async checkpoint write) is not torn apart. Callers ask
`received()` at their own boundaries (the training loop after every chunk, the entry
point before declaring success) and turn it into exit code 128 + signal.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_received: int | None = None
_deferred = 0  # > 0 inside `deferred()`: record signals, raise later
_early = False  # installed by `install_early()`, not yet taken over by `trap()`


def received() -> int | None:
    """The first signal trapped so far (signal.SIGINT or SIGTERM), else None."""
    return _received


def exit_code() -> int:
    """128 + the trapped signal (130 for Ctrl-C, 143 for SIGTERM); 130 if none was trapped
    (a KeyboardInterrupt raised some other way)."""
    return 128 + (_received or signal.SIGINT)


def raise_if_received() -> None:
    """Re-raise a trapped signal whose KeyboardInterrupt was swallowed somewhere."""
    if _received is not None:
        raise KeyboardInterrupt


def _handle(signum: int, frame) -> None:
    global _received
    first = _received is None
    if first:
        _received = signum
        if not (_deferred or _early):
            raise KeyboardInterrupt


def install_early() -> None:
    """Record SIGINT and SIGTERM from now on without raising (for a command-line entry
    point, before its imports); `trap()` takes over and the entry point raises what
    was recorded with `raise_if_received()` once it can report it."""
    global _early
    if threading.current_thread() is threading.main_thread():
        _early = True
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, _handle)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Record signals without raising inside the block, then raise once it is left.

    For imports of C extensions (jax, orbax, wandb): a KeyboardInterrupt in the middle
    of one aborts the interpreter (exit 134 and a core dump) instead of unwinding. For
    orbax calls: one torn between starting its helper threads and signalling them
    leaves non-daemon threads waiting forever, and the process never exits.
    """
    global _deferred
    before = _received
    _deferred += 1
    try:
        yield
    finally:
        _deferred -= 1
    if before is None:  # raise only for a signal that arrived inside the block
        raise_if_received()


@contextlib.contextmanager
def trap() -> Iterator[None]:
    """Handle SIGINT and SIGTERM as above inside the block (main thread only)."""
    global _received, _early
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if not _early:  # a fresh trap; after install_early(), keep what start-up recorded
        _received = None
    _early = False
    previous = {s: signal.signal(s, _handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
