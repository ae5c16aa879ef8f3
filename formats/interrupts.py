"""SIGINT and SIGTERM as an exception, so that a run stopped either way cleans up and says so."""
from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived. CLIs print `str(e)` and exit with `e.exit_code` (128 + signal).

    A KeyboardInterrupt, so that code which cleans up on Ctrl-C does so on SIGTERM too.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextmanager
def on_stop_signals(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """Call `handler(signum, frame)` on SIGINT and SIGTERM while inside, then restore the old handlers.

    Only the main thread can set handlers; elsewhere this does nothing. A signal the process
    ignores (SIGINT of a background job) stays ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s, h in old.items():
        if h != signal.SIG_IGN:
            signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)


_arrived: list[int] = []   # the stop signals raised as Interrupted since the outermost `interrupts()` began


def interruption(e: BaseException) -> Interrupted | None:
    """The stop signal behind `e`, or None if no stop signal ended the run.

    Where `e` was raised from or while handling a KeyboardInterrupt: a signal that lands while a C
    extension initializes comes out of the import as ImportError("initialization failed") raised
    from our Interrupted, and one that is not ours (SIGINT before the handler was set) counts as
    SIGINT. Else the first signal `interrupts()` recorded: one that lands in a finalizer is lost
    there (`__del__` cannot raise), and the run ends otherwise, e.g. with its ranks gone.
    """
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, KeyboardInterrupt):
            return cur if isinstance(cur, Interrupted) else Interrupted(signal.SIGINT)
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return Interrupted(_arrived[0]) if _arrived else None


def _raise(signum: int, frame: Any) -> None:
    _arrived.append(signum)
    raise Interrupted(signum)


def _unraisable(hook: Callable[[Any], Any], unraisable: Any) -> None:
    """sys.unraisablehook: an Interrupted lost in a finalizer is recorded, not printed."""
    if not isinstance(unraisable.exc_value, Interrupted):
        hook(unraisable)


@contextmanager
def interrupts() -> Iterator[None]:
    """`with interrupts():` SIGINT and SIGTERM raise Interrupted (in the main thread) and are
    recorded for `interruption`; the outermost block starts a fresh record."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _raise not in [signal.getsignal(s) for s in STOP_SIGNALS]:
        _arrived.clear()
    hook = sys.unraisablehook
    sys.unraisablehook = partial(_unraisable, hook)
    try:
        with on_stop_signals(_raise):
            yield
    finally:
        sys.unraisablehook = hook
