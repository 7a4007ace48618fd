"""The teacher engine against a loopback server with a fixed latency: request rate and resume cost.

A ``distillery serve echo`` process (no model: answers after exactly ``--latency-ms``) stands in for
a teacher. For each concurrency, the engine sends ``--requests`` distinct chat requests and we
report the achieved requests/s against the ideal ``concurrency / latency`` (target >= 0.95 of it).
Then the resume cost: a run stopped after half its answers (as SIGINT/SIGTERM stop it: requests
in flight finish and are cached) and run again; the server's request log must show no request
answered twice (target: zero repeated requests).

    .venv/bin/python benchmarks/synth/run.py [--requests 2000] [--latency-ms 100] [--concurrency 16 64 128]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from synth.cache import RequestCache  # noqa: E402
from synth.engine import SamplingConfig, TeacherConfig, TeacherEngine  # noqa: E402


def start_server(latency_ms: float, log: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "manifests.cli", "serve", "echo", "--port", "0", "--latency-ms", str(latency_ms),
         "--request-log", str(log)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    line = proc.stdout.readline()
    if " at " not in line:
        raise SystemExit(f"server did not start: {line!r}")
    return proc, line.strip().rsplit(" at ", 1)[1]


async def run_engine(
    url: str, cache: Path, n: int, concurrency: int, stop_after: int | None = None
) -> tuple[float, int]:
    """(seconds, requests sent) for ``n`` distinct requests at ``concurrency``."""
    teacher = TeacherConfig(model="echo", base_url=url, max_concurrency=concurrency, timeout=60)
    async with TeacherEngine([teacher], RequestCache(cache)) as engine:
        sampling = SamplingConfig(max_tokens=8)
        requests = [engine.request("echo", [{"role": "user", "content": f"request number {i} of the run"}], sampling)
                    for i in range(n)]  # fmt: skip
        if stop_after is not None:
            engine.on_progress = lambda: engine.usage.answered >= stop_after and engine.stop()
        started = time.perf_counter()
        try:
            await engine.ask(requests)
        except Exception as e:  # the stopped run ends in RunStopped, as a stage would
            if type(e).__name__ != "RunStopped":
                raise
        return time.perf_counter() - started, engine.usage.sent


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[16, 64, 128])
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}"
    )
    print(f"server: distillery serve echo, fixed latency {args.latency_ms:g} ms, loopback, its own process\n")
    latency = args.latency_ms / 1000
    with tempfile.TemporaryDirectory() as tmp:
        print("| concurrency | requests | seconds | achieved req/s | ideal req/s | fraction of ideal |")
        print("|---|---|---|---|---|---|")
        for c in args.concurrency:
            log = Path(tmp) / f"log-{c}.jsonl"
            proc, url = start_server(args.latency_ms, log)
            try:
                seconds, sent = asyncio.run(
                    run_engine(url, Path(tmp) / f"cache-{c}.sqlite", args.requests, c)
                )
            finally:
                proc.terminate()
                proc.wait()
            ideal = c / latency
            achieved = args.requests / seconds
            print(f"| {c} | {sent} | {seconds:.2f} | {achieved:.1f} | {ideal:.1f} | {achieved / ideal:.3f} |")

        log = Path(tmp) / "resume.jsonl"
        proc, url = start_server(args.latency_ms, log)
        cache = Path(tmp) / "resume.sqlite"
        c = args.concurrency[0]
        try:
            _, first = asyncio.run(run_engine(url, cache, args.requests, c, stop_after=args.requests // 2))
            _, second = asyncio.run(run_engine(url, cache, args.requests, c))
            _, third = asyncio.run(run_engine(url, cache, args.requests, c))
        finally:
            proc.terminate()
            proc.wait()
        answered = Counter(json.loads(line)["key"] for line in log.read_text().splitlines()
                           if json.loads(line)["outcome"] == "answered")  # fmt: skip
        repeated = sum(k - 1 for k in answered.values() if k > 1)
        print(f"\nresume: stopped run sent {first}, resumed run sent {second} (of {args.requests}), "
              f"a third run sent {third}; distinct requests answered {len(answered)}, "
              f"answered more than once: {repeated} (target 0)")  # fmt: skip


if __name__ == "__main__":
    main()
