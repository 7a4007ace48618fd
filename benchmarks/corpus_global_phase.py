"""CPU seconds of the global phase of `corpus build`: the global decisions and their ledger.

Builds a generated corpus of short documents (10% exact copies under a new URL, 10% new texts under
an earlier URL) with exact and URL dedup, in this process, and times the global phase apart from
phase 1 and the filter phase: ``Combiner(...)`` (keys, unique ids, cuts, URL/exact dedup, frequent
units), ``Combiner.decision_ledger()``, and ``write_ledgers`` and ``global_counts`` as the build
calls them (their task ledgers included). CPU seconds are this process's plus its finished worker
processes'; a small ``--partition-rows`` forces many hash buckets.

    .venv/bin/python benchmarks/corpus_global_phase.py [--docs 200000] [--partition-rows 20000]
        [--split-bytes 1048576] [--workers 1] [--lines]

The same script measures another checkout of the project when run with that checkout as the working
directory and first on ``PYTHONPATH`` (its ``Combiner`` is the one timed).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_input(path: Path, n: int, seed: int = 0) -> None:
    words = " ".join(
        json.loads(line)["text"] for line in (ROOT / "examples/sample/web.jsonl").read_text().splitlines()
    ).split()
    rng = random.Random(seed)
    texts: list[str] = []
    with open(path, "w") as f:
        for i in range(n):
            roll = rng.random()
            url = f"https://bench.example/{i}"
            if roll < 0.1 and texts:
                text = rng.choice(texts)  # an exact copy under a new URL
            else:
                text = " ".join(rng.choices(words, k=rng.randint(12, 24))) + f" {i}"
                if roll < 0.2 and i:
                    url = f"https://bench.example/{rng.randrange(i)}"  # an earlier URL, another text
            texts.append(text)
            f.write(json.dumps({"text": text, "url": url}) + "\n")


def cpu_seconds() -> float:
    """CPU time of this process and of its worker processes that have finished."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def timed(timings: dict[str, list[float]], name: str, fn):
    def wrapper(*args, **kwargs):
        cpu, wall = cpu_seconds(), time.perf_counter()
        result = fn(*args, **kwargs)
        total = timings.setdefault(name, [0.0, 0.0])  # summed over calls
        total[0] += cpu_seconds() - cpu
        total[1] += time.perf_counter() - wall
        return result

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", type=int, default=200_000)
    parser.add_argument(
        "--partition-rows", type=int, default=20_000, help="keys per hash bucket (PARTITION_ROWS)"
    )
    parser.add_argument("--split-bytes", type=int, default=1 << 20, help="JSONL bytes per phase-1 task")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--lines", action="store_true", help="add line dedup (frequent units)")
    args = parser.parse_args()

    import corpus.build as build
    import corpus.combine as combine
    from manifests.cli import main as cli

    combine.PARTITION_ROWS = args.partition_rows
    timings: dict[str, list[float]] = {}
    combine.Combiner.__init__ = timed(timings, "decisions", combine.Combiner.__init__)
    combine.Combiner.decision_ledger = timed(timings, "ledger", combine.Combiner.decision_ledger)
    build.write_ledgers = timed(timings, "write ledger", build.write_ledgers)
    build.global_counts = timed(timings, "counts", build.global_counts)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}; code: {Path(combine.__file__).parent.parent}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "docs.jsonl"
        make_input(data, args.docs)
        recipe = Path(tmp) / "bench.yaml"
        lines = ", lines: {unit: line}" if args.lines else ""
        recipe.write_text(
            f"stage: corpus.build\nname: bench\nworkers: {args.workers}\nsplit_bytes: {args.split_bytes}\n"
            f"inputs: [{{path: {data}}}]\ndedup: {{exact: true, url: true{lines}}}\n"
        )
        cpu, wall = cpu_seconds(), time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            code = cli(["--store", str(Path(tmp) / "store"), "corpus", "build", str(recipe)])
        if code:
            sys.exit(code)
        whole = [cpu_seconds() - cpu, time.perf_counter() - wall]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.docs} docs, {args.partition_rows} keys a bucket, {args.workers} worker(s)")
    for name, (c, w) in [*timings.items(), ("whole build", whole)]:
        print(f"  {name:12s} {c:7.2f} CPU s  {w:7.2f} wall s")
    print(f"  global phase {sum(t[0] for t in timings.values()):7.2f} CPU s   (peak RSS {peak:.0f} MiB)")


if __name__ == "__main__":
    main()
