"""Running corpus tasks: in this process, or in a pool of local worker processes.

Tasks are independent and their results are combined in task order, so the output never depends
on the number of workers. A task whose result marker exists is not run again: a killed build
resumes where it stopped.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

FAULT_ENV = "DISTILLERY_FAULT_EXIT_AFTER_TASKS"
"""Fault injection for tests: the build process exits abruptly after this many tasks finish."""


def run_tasks(
    fn: Callable[..., dict[str, Any]], jobs: Iterable[tuple], workers: int = 1
) -> Iterator[dict[str, Any]]:
    """Run ``fn(*job)`` for every job; yield results as they finish (any order)."""
    fault_after = int(os.environ.get(FAULT_ENV, "0") or 0)
    finished = 0

    def check_fault() -> None:
        nonlocal finished
        finished += 1
        if fault_after and finished >= fault_after:
            os._exit(137)  # as if killed: no cleanup, no publish

    jobs = list(jobs)
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            result = fn(*job)
            yield result
            check_fault()
        return
    # spawn, not fork: the parent runs progress threads, and forking a threaded process can deadlock.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending = {pool.submit(fn, *job) for job in jobs[: workers * 2]}
        queued = iter(jobs[workers * 2 :])
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
                check_fault()
                nxt = next(queued, None)
                if nxt is not None:
                    pending.add(pool.submit(fn, *nxt))
