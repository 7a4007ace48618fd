"""Running corpus tasks: in this process, in a pool of local worker processes, or on Ray.

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
"""Fault injection for tests: the build process exits abruptly after this many tasks finish
(``3``), or after this many tasks of one phase (``minhash reduce:2``)."""


def _fault_after(label: str) -> int:
    value = os.environ.get(FAULT_ENV, "")
    phase, _, count = value.rpartition(":")
    return int(count or 0) if phase in ("", label) else 0


def run_tasks(
    fn: Callable[..., dict[str, Any]], jobs: Iterable[tuple], workers: int = 1, label: str = "tasks"
) -> Iterator[dict[str, Any]]:
    """Run ``fn(*job)`` for every job; yield results as they finish (any order)."""
    fault_after = _fault_after(label)
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


def run_tasks_ray(
    fn: Callable[..., dict[str, Any]], jobs: Iterable[tuple], workers: int, address: str | None = None,
    label: str = "tasks",
) -> Iterator[dict[str, Any]]:  # fmt: skip
    """The same on a Ray cluster (``address``) or a local one of ``workers`` CPUs.

    The work folder must be on storage every node sees (a shared filesystem), as task outputs are
    written there by whichever node runs the task.
    """
    try:
        import ray
    except ImportError:
        from manifests.errors import DistilleryError

        raise DistilleryError("executor 'ray' needs Ray: pip install 'distillery[ray]'") from None
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"address": address} if address else {"num_cpus": workers}
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kwargs)
    remote = ray.remote(num_cpus=1)(fn)
    jobs = list(jobs)
    in_flight = max(1, workers) * 2
    pending = [remote.remote(*job) for job in jobs[:in_flight]]
    queued = iter(jobs[in_flight:])
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])
        nxt = next(queued, None)
        if nxt is not None:
            pending.append(remote.remote(*nxt))
