"""The one time limit on a call that may not return in time (an HTML parser, a sympy simplification).

    try:
        text = call_with_time_limit(lambda: trafilatura.extract(html), 5.0)
    except TimeLimitExceeded:
        ...  # the page is skipped

In a process's main thread a SIGALRM timer interrupts the call where it is, so nothing keeps running
after the limit. Signals reach only the main thread, so elsewhere (a worker thread, an event loop's
executor) the call runs in a daemon thread that is abandoned when the limit passes: the caller gets
its answer in time, while the abandoned computation finishes in the background -- which is why callers
bound their inputs' size as well.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class TimeLimitExceeded(Exception):
    """The call did not return within its time limit."""


def call_with_time_limit(fn: Callable[[], T], seconds: float | None) -> T:
    """``fn()``, or ``TimeLimitExceeded`` after ``seconds`` (None or <= 0: no limit)."""
    if seconds is None or seconds <= 0:
        return fn()
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        return _with_alarm(fn, seconds)
    return _in_a_thread(fn, seconds)


def _with_alarm(fn: Callable[[], T], seconds: float) -> T:
    def alarm(signum, frame):
        raise TimeLimitExceeded

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _in_a_thread(fn: Callable[[], T], seconds: float) -> T:
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller's thread, which raises it
            box["error"] = e

    worker = threading.Thread(target=target, name="distillery-time-limit", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise TimeLimitExceeded
    if "error" in box:
        raise box["error"]
    return box["value"]
