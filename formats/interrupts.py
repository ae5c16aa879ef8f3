"""SIGINT and SIGTERM as an exception, so that a run stopped either way cleans up and says so."""
from __future__ import annotations

import signal
import threading
from contextlib import AbstractContextManager, contextmanager
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


def interruption(e: BaseException) -> Interrupted | None:
    """The stop signal behind `e`: `e` itself, or an exception it was raised from or while handling.

    A signal that lands while a C extension initializes comes out of the import as
    ImportError("initialization failed") raised from our Interrupted. A KeyboardInterrupt that is
    not ours (SIGINT before the handler was set) counts as SIGINT.
    """
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, KeyboardInterrupt):
            return cur if isinstance(cur, Interrupted) else Interrupted(signal.SIGINT)
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _raise(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


def interrupts() -> AbstractContextManager[None]:
    """`with interrupts():` SIGINT and SIGTERM raise Interrupted (in the main thread)."""
    return on_stop_signals(_raise)
