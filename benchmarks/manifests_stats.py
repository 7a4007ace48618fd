"""Peak memory and time of the whole-dataset readers of ``manifests``: ``diff`` and ``report``.

Publishes two versions of a corpus-like dataset of N rows (default a million, in shards of 100k:
text, source pointers, a language, a float score with nulls, an integer column and PII counts
(mostly null)) —
the second with rows removed, added, moved and re-pointed, and scores changed — then runs, each
in a fresh process, ``distillery manifests diff OLD NEW``, ``manifests report OLD --format json``
and the HTML report, and prints each one's peak RSS and wall time.

    .venv/bin/python benchmarks/manifests_stats.py [--rows 1000000] [--store /tmp/bench-store]

With ``--store`` the datasets are kept and reused by the next run (to compare two versions of the
code on the same data).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from manifests.errors import DistilleryError  # noqa: E402
from manifests.publish import Publisher  # noqa: E402
from manifests.records import SOURCE_TYPE  # noqa: E402
from manifests.store import Store  # noqa: E402

WORDS = [f"w{i}" for i in range(2000)] + ["the", "a", "of", "and", "to", "in", "is", "it"]
SHARD = 100_000


def _rows(n: int, seed: int, changed: bool):
    """Columns of ``n`` rows in batches; ``changed`` drops, adds, moves and re-points ~1% each."""
    rng = random.Random(seed)
    out = 0
    line = 0
    while out < n:
        ids, texts, sources, langs, scores, counts, pii = [], [], [], [], [], [], []
        for _ in range(min(SHARD, n - out)):
            i = out
            out += 1
            line += 1
            r = rng.random() if changed else 1.0
            if r < 0.01:
                continue  # removed in the new version
            words = [WORDS[(i * 7 + j * 13) % len(WORDS)] for j in range(10 + i % 40)]
            text = " ".join(words) + f" doc{i}"
            if r < 0.02:
                text += " added"  # new content: one row removed, one added
            url = f"https://bench.example/{i}" + ("/moved" if 0.02 <= r < 0.03 else "")
            at = line + (1 if 0.03 <= r < 0.04 else 0)  # moved: its line changed
            score = None if i % 17 == 0 else ((i * 2654435761) % 1000) / 1000
            if 0.04 <= r < 0.05 and score is not None:
                score = round(score / 2, 3)
            ids.append(f"{seed}-{i:012d}")
            texts.append(text)
            sources.append({"uri": "bench.jsonl", "sha256": "0" * 64, "line": at, "url": url})
            langs.append("en" if i % 10 else "fr")
            scores.append(score)
            counts.append(len(words) + 1)
            pii.append('{"EMAIL": 1}' if i % 50 == 0 else None)
        yield pa.table(
            {
                "id": ids,
                "parents": pa.array([[] for _ in ids], pa.list_(pa.string())),
                "text": texts,
                "source": pa.array(sources, SOURCE_TYPE),
                "language": langs,
                "language_score": pa.array(scores, pa.float64()),
                "word_count": pa.array(counts, pa.int64()),
                "pii_counts": pa.array(pii, pa.string()),
            }
        )


def publish(store: Store, name: str, n: int, changed: bool) -> str:
    try:
        return store.resolve(name).ref
    except DistilleryError:
        pass
    with Publisher(store, kind="dataset", name=name, stage="bench", recipe={"rows": n}, seed=0) as pub:
        for table in _rows(n, 0, changed):
            pub.write_table(table)
        return pub.publish(stats={"rows_out": n, "changed": changed}).ref


def measure(args: list[str]) -> tuple[float, float, float]:
    """Peak RSS (MiB), wall and CPU seconds of one ``distillery`` command in a fresh process."""
    # A wrapper process per run, so that RUSAGE_CHILDREN holds this command's peak alone.
    probe = (
        "import resource, subprocess, sys;"
        f"subprocess.run([sys.executable, '-m', 'manifests.cli', *{args!r}], check=True, stdout=subprocess.DEVNULL);"
        "r = resource.getrusage(resource.RUSAGE_CHILDREN); print(r.ru_maxrss, r.ru_utime + r.ru_stime)"
    )
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, check=True, capture_output=True, text=True)
    peak, cpu = out.stdout.split()[-2:]
    return int(peak) / 1024, time.perf_counter() - started, float(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--store", type=Path, help="keep the datasets here (and reuse them)")
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(args.store or Path(tmp) / "store")
        started = time.perf_counter()
        old = publish(store, f"bench-{args.rows}", args.rows, changed=False)
        new = publish(store, f"bench-{args.rows}-changed", args.rows, changed=True)
        print(f"datasets: {old}, {new} ({time.perf_counter() - started:.1f} s to make or find)")
        for ref in (old, new):  # verified once here, so that no measured run re-hashes the shards
            subprocess.run([sys.executable, "-m", "manifests.cli", "--store", str(store.root), "manifests",
                            "verify", ref], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        html = Path(tmp) / "report.html"
        runs = {
            "manifests diff": ["manifests", "diff", old, new],
            "manifests report --format json": ["manifests", "report", old, "--format", "json"],
            "manifests report (HTML)": ["manifests", "report", old, "--out", str(html)],
        }
        for label, command in runs.items():
            peak, seconds, cpu = measure(["--store", str(store.root), *command])
            print(f"{label:34} peak RSS {peak:8.1f} MiB  {seconds:6.1f} s wall  {cpu:6.1f} s CPU")


if __name__ == "__main__":
    main()
