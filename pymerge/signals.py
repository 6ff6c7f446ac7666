"""SIGTERM handled like SIGINT: both raise `pymerge.errors.Interrupted` in the main thread, so `with` blocks and
`finally` clauses (the atomic output directory, temporary files) clean up on the way out; and critical sections
(a pair of renames, a cleanup) during which a signal waits until they end. Torch-free, so the CLI can use it.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import List

from pymerge.errors import Interrupted

HANDLED = (signal.SIGINT, signal.SIGTERM)
_pending: List[int] = []
_defer_depth = [0]
_active = [0]


def _on_signal(signum, frame):
    if _defer_depth[0]:
        _pending.append(signum)  # raised when the critical section ends
        return
    raise Interrupted(signum, signal.Signals(signum).name)


@contextlib.contextmanager
def signals_interrupt():
    """While inside: SIGINT and SIGTERM raise `Interrupted` in the main thread. Nests; a no-op off the main
    thread (where Python cannot install handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _on_signal) for s in HANDLED}
    _active[0] += 1
    try:
        yield
    finally:
        _active[0] -= 1
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


@contextlib.contextmanager
def signals_deferred():
    """A critical section: a signal arriving inside is raised only when the outermost one ends."""
    _defer_depth[0] += 1
    try:
        yield
    finally:
        _defer_depth[0] -= 1
    if not _defer_depth[0] and _pending:
        signum = _pending[0]
        _pending.clear()
        raise Interrupted(signum, signal.Signals(signum).name)
