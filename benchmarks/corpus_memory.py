"""Peak memory of `corpus build` as the input grows: streaming keeps it flat.

Builds the same recipe over N and 10×N documents (variations of the embedded sample) in a fresh
process each, and prints the peak resident memory of each run and their ratio. The issue's target:
10× the input, the same peak within 20%.

    .venv/bin/python benchmarks/corpus_memory.py [--docs 20000] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_input(path: Path, n: int, seed: int = 0) -> None:
    sample = [
        json.loads(line)["text"] for line in (ROOT / "examples/sample/web.jsonl").read_text().splitlines()
    ]
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            words = rng.choice(sample).split()
            rng.shuffle(words)  # unique documents, so dedup keeps (and remembers) every one
            f.write(
                json.dumps({"text": " ".join(words) + f" {i}", "url": f"https://bench.example/{i}"}) + "\n"
            )


def peak_rss_of_build(
    data: Path, store: Path, workers: int, dedup: bool, minhash: bool
) -> tuple[float, float]:
    recipe = store.parent / f"{data.stem}.yaml"
    near = ", minhash: {threshold: 0.8}" if minhash else ""
    recipe.write_text(
        f"stage: corpus.build\nname: {data.stem}\nworkers: {workers}\ninputs: [{{path: {data}}}]\n"
        f"dedup: {{exact: {str(dedup).lower()}{near}}}\n"
        "steps: [{type: min_words, min_words: 20}, {type: language, keep: [en]}]\n"
    )
    started = time.perf_counter()
    # A wrapper process per run, so that RUSAGE_CHILDREN holds this build's peak alone.
    probe = (
        "import resource, subprocess, sys;"
        f"subprocess.run([sys.executable, '-m', 'manifests.cli', '--store', {str(store)!r}, 'corpus', 'build', {str(recipe)!r}],"
        " check=True, stdout=subprocess.DEVNULL);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--no-dedup",
        action="store_true",
        help="leave out the global exact dedup (its keys grow with the corpus)",
    )
    parser.add_argument(
        "--minhash", action="store_true", help="add MinHash near-duplicate dedup (threshold 0.8)"
    )
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for n in (args.docs, args.docs * 10):
            data = Path(tmp) / f"docs-{n}.jsonl"
            make_input(data, n)
            peak, seconds = peak_rss_of_build(
                data, Path(tmp) / "store", args.workers, not args.no_dedup, args.minhash
            )
            rows.append((n, data.stat().st_size / 2**20, peak, seconds))
            print(
                f"{n:>9} docs  {rows[-1][1]:8.1f} MiB input  peak RSS {peak:8.1f} MiB  {seconds:6.1f} s  {n / seconds:8.0f} docs/s"
            )
        print(f"peak ratio (10x input / 1x input): {rows[1][2] / rows[0][2]:.3f}  (target <= 1.20)")


if __name__ == "__main__":
    main()
