"""CPU seconds of each phase of the phased MinHash (``corpus/minhash_phases.py``) on the build's executor.

The labelled data of ``make_data.py`` is written as task files the way phase 1 of a build leaves
them (``--batch`` documents each, text + band keys, row groups of 1,024 rows), then
``near_duplicates`` runs its map, reduce, verify and clusters phases through
``corpus.executor.run_tasks`` at each ``--workers`` count, in a fresh work folder each time. Per
phase: CPU seconds (user + sys of this process and its reaped worker processes, which includes
starting the workers) and wall seconds; then the clusters' quality against the truth and a digest
of the result (equal digests: equal removed rows, kept rows and similarities).

    .venv/bin/python benchmarks/dedup/phases.py [--originals 10000] [--workers 1 2] [--repeat 1]

``--module`` times another copy of the phases module (e.g. an older one on ``PYTHONPATH``) on the
same files.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]

import make_data  # noqa: E402
from run import machine, score  # noqa: E402

from corpus.document_keys import MINHASH_KEYS  # noqa: E402
from corpus.executor import run_tasks  # noqa: E402
from corpus.minhash import MinHashConfig, band_keys  # noqa: E402


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def task_files(texts: list[str], folder: Path, batch: int, cfg: MinHashConfig, part_type) -> list:
    table = pa.table({"text": texts})
    parts = []
    for k, lo in enumerate(range(0, table.num_rows, batch)):
        chunk = table.slice(lo, batch)
        chunk = chunk.append_column(MINHASH_KEYS, band_keys(chunk.column("text"), cfg))
        path = folder / f"task-{k:05d}.parquet"
        pq.write_table(chunk, path, row_group_size=1024, compression="zstd")
        parts.append(part_type(lo, chunk.num_rows, str(path), MINHASH_KEYS))
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--originals", type=int, default=10000)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--batch", type=int, default=2000, help="documents per task file")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=1, help="runs per worker count")
    parser.add_argument(
        "--lengthen", type=int, default=1,
        help="make each document this many times longer: its text again with every word tagged by the round, "
        "so shingle sets grow and the Jaccard of copies stays about the same (5: ~7,500 characters)",
    )  # fmt: skip
    parser.add_argument(
        "--minhash", default="{}", help='more MinHashConfig fields, as JSON: \'{"keep": "longest"}\''
    )
    parser.add_argument("--module", default="corpus.minhash_phases")
    args = parser.parse_args()

    phases = importlib.import_module(args.module)
    cfg = MinHashConfig(threshold=args.threshold, **json.loads(args.minhash))
    bench = make_data.build(args.originals, 0)
    if args.lengthen > 1:
        bench.texts = [
            "\n".join([text] + [re.sub(r"(\S+)", rf"\1~{k}", text) for k in range(1, args.lengthen)])
            for text in bench.texts
        ]
    n = len(bench.texts)
    print(f"machine: {machine()}")
    print(f"data: {n} documents, {sum(map(len, bench.texts)) / n:.0f} characters each; module {args.module}")
    print(f"settings: {cfg.model_dump_json(exclude_defaults=True)}")
    takes_workers = "workers" in inspect.signature(phases.near_duplicates).parameters
    with tempfile.TemporaryDirectory() as tmp:
        parts = task_files(bench.texts, Path(tmp), args.batch, cfg, phases.Part)
        for workers in args.workers:
            for repeat in range(args.repeat):
                times: dict[str, tuple[float, float, int]] = {}

                def run(label, fn, jobs, workers=workers, times=times):
                    cpu, wall = cpu_seconds(), time.perf_counter()
                    results = list(run_tasks(fn, jobs, workers, label=label))
                    times[label] = (cpu_seconds() - cpu, time.perf_counter() - wall, len(jobs))
                    return results

                work = Path(tmp) / f"work-{workers}-{repeat}"
                kwargs = {"workers": workers} if takes_workers else {}
                cpu, wall = cpu_seconds(), time.perf_counter()
                removed, kept, similarity = phases.near_duplicates(
                    parts, np.zeros(0, np.int64), cfg, work, run, **kwargs
                )
                total = (cpu_seconds() - cpu, time.perf_counter() - wall)
                rest = (
                    total[0] - sum(t[0] for t in times.values()),
                    total[1] - sum(t[1] for t in times.values()),
                )
                quality = score(
                    bench, args.threshold, {"pairs": np.c_[removed, kept].tolist(), "removed": removed}
                )
                digest = hashlib.sha256(
                    b"".join(a.tobytes() for a in (removed, kept, similarity))
                ).hexdigest()[:12]
                pairs = sum(len(np.load(f)) for f in work.glob("minhash-*/candidates.npy"))
                print(f"\nworkers {workers} (run {repeat + 1}): {pairs} candidate pairs, {len(removed)} removed, "
                      f"digest {digest}, "
                      f"pair precision {quality['pair'][0]:.4f}, recall {quality['pair'][1]:.4f}")  # fmt: skip
                for label, (c, w, jobs) in times.items():
                    print(f"  {label:<16} {jobs:>4} tasks  {c:6.2f} CPU s  {w:6.2f} s wall")
                print(f"  {'clusters':<16} {'':>10} {rest[0]:6.2f} CPU s  {rest[1]:6.2f} s wall")
                print(f"  {'total':<16} {'':>10} {total[0]:6.2f} CPU s  {total[1]:6.2f} s wall")


if __name__ == "__main__":
    main()
