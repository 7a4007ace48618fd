"""The whole `corpus build` at growing sizes: time per document, peak memory and disk should stay flat.

For each N of ``--docs``, N short documents are generated on this machine (words drawn with the
embedded sample's own word frequencies, a Zipf-like law; sentences of about 12 words; 20-180 words a
document; 3% exact and 3% near copies of a recent document, a few words changed) and streamed to
one JSONL file. Then the default build recipe (``examples/recipes/demo-corpus.yaml``: its filter
steps ``min_words`` 20 and ``language`` en at 0.65, exact dedup) with MinHash near-duplicate dedup
added (threshold 0.8) runs through the CLI in a fresh process tree, and the benchmark reports:

- wall seconds, microseconds per document and their ratio to the smallest N (target: within ±15%,
  i.e. linear), CPU seconds of the whole tree;
- the peak RSS of any one process of the tree (``RUSAGE_CHILDREN`` of a small wrapper: the largest
  of the build and its reaped workers) and its ratio to the smallest N (target: within ×1.2), with
  the largest ``VmHWM`` sampled from the build process and from its workers apart;
- disk: the largest size of the build's work folders (``.work-*``) and of the whole store while it
  ran, and the published dataset, in bytes per document;
- the funnel (filters, exact and near duplicates removed) and the workers used.

Inputs and stores are deleted after each size. Then the time the largest size took is extrapolated
to 1M and 5M documents.

    .venv/bin/python benchmarks/corpus_scale.py --docs 1000000 5000000 [--workers 2] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "examples" / "recipes" / "demo-corpus.yaml"
CHUNK = 20_000
COPIES, NEAR_COPIES = 0.03, 0.03


# ---------------------------------------------------------------------------------- the input


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The ranges ``[starts[i], starts[i] + lengths[i])`` concatenated (lengths > 0), as one cumsum."""
    step = np.ones(int(lengths.sum()), np.int64)
    step[0] = starts[0]
    step[np.cumsum(lengths)[:-1]] = starts[1:] - starts[:-1] - lengths[:-1] + 1
    return np.cumsum(step)


class DocumentGenerator:
    """Plausible short English documents, made with NumPy a chunk at a time and written as JSONL bytes.

    Every output byte is gathered from one table of word forms (lower or capitalised, followed by
    " ", ". ", or the closing '."}' of a record, with or without the opening '{"text": "'), so a
    chunk of 20,000 documents is a handful of array operations, not a Python loop over words.
    """

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        sample = [json.loads(line)["text"] for line in (ROOT / "examples/sample/web.jsonl").open()]
        counts = Counter(w for text in sample for w in re.findall(r"[a-z]+", text.lower()))
        words = [w for w, _ in counts.most_common()]
        self.cdf = np.cumsum([counts[w] for w in words]) / sum(counts.values())
        forms = []  # index: ((word * 2 + capital) * 3 + ending) * 2 + opens
        for word in words:
            for form in (word, word.capitalize()):
                for ending in (" ", ". ", '."}\n'):
                    for opening in ("", '{"text": "'):
                        forms.append(f"{opening}{form}{ending}".encode())
        self.lengths = np.array([len(f) for f in forms], np.int64)
        self.starts = np.r_[0, np.cumsum(self.lengths)[:-1]]
        self.blob = np.frombuffer(b"".join(forms), np.uint8)
        self.vocabulary = len(words)

    def words(self, n: int) -> np.ndarray:
        return np.searchsorted(self.cdf, self.rng.random(n), side="right").clip(0, self.vocabulary - 1)

    def chunk(self, docs: int) -> bytes:
        rng = self.rng
        lengths = rng.integers(20, 181, docs)
        ids, ends = self.words(int(lengths.sum())), rng.random(int(lengths.sum())) < 1 / 12
        # Copies: a document replaced by an earlier one of the chunk (exact), or by that one with
        # 1-3 words changed (near: 5-gram Jaccard mostly 0.8-0.95 at these lengths).
        source = np.arange(docs)
        kind = rng.random(docs)
        copied = (kind < COPIES + NEAR_COPIES) & (source > 0)
        source[copied] = (rng.random(copied.sum()) * source[copied]).astype(np.int64)
        starts = np.r_[0, np.cumsum(lengths)[:-1]]
        lengths = lengths[source]
        gather = ranges(starts[source], lengths)
        ids, ends = ids[gather], ends[gather]
        out_starts = np.r_[0, np.cumsum(lengths)[:-1]]
        for doc in np.flatnonzero(copied & (kind >= COPIES)):
            at = out_starts[doc] + rng.integers(0, lengths[doc], rng.integers(1, 4))
            ids[at] = self.words(len(at))
        first = np.zeros(len(ids), bool)
        first[out_starts] = True
        last = np.roll(first, -1)
        capital = first | np.roll(ends, 1)
        ending = np.where(last, 2, ends.astype(np.int64))
        form = ((ids * 2 + capital) * 3 + ending) * 2 + first
        return self.blob[ranges(self.starts[form], self.lengths[form])].tobytes()

    def write(self, path: Path, n: int) -> None:
        with open(path, "wb") as f:
            for start in range(0, n, CHUNK):
                f.write(self.chunk(min(CHUNK, n - start)))


# ---------------------------------------------------------------------------------- the build


def write_recipe(path: Path, data: Path, workers: int) -> dict:
    """The default recipe's steps and dedup, on ``data``, with MinHash added."""
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe |= {"name": "scale", "workers": workers, "inputs": [{"path": str(data), "format": "jsonl"}]}
    recipe["dedup"] = recipe.get("dedup", {}) | {"minhash": {"threshold": 0.8}}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return recipe


class TreeMonitor(threading.Thread):
    """Samples, every ``interval`` s, the VmHWM of the build process and of its descendants, and the
    bytes under the store and under its work folders (``.work-*``)."""

    def __init__(self, root_pid: int, store: Path, interval: float = 1.0):
        super().__init__(daemon=True)
        self.root_pid, self.store, self.interval = root_pid, store, interval
        self.peak = {"main_kib": 0, "worker_kib": 0, "work_bytes": 0, "store_bytes": 0}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                pid, ppid = int(stat.parent.name), int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(pid)
        todo, tree = [self.root_pid], []
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo += children.get(pid, [])
        for pid in tree:
            try:
                hwm = int(re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))
            except (OSError, AttributeError):
                continue
            # The wrapper's child is the build's main process; anything below it is a worker.
            key = "main_kib" if pid in children.get(self.root_pid, []) else "worker_kib"
            if pid != self.root_pid:
                self.peak[key] = max(self.peak[key], hwm)
        work = sum(folder_bytes(p) for p in self.store.glob("**/.work-*"))
        self.peak["work_bytes"] = max(self.peak["work_bytes"], work)
        self.peak["store_bytes"] = max(self.peak["store_bytes"], folder_bytes(self.store))


def folder_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):  # removed while walking
                total += os.stat(os.path.join(dirpath, name)).st_blocks * 512
    return total


# The wrapper runs the CLI as its only child: its RUSAGE_CHILDREN then holds the largest peak RSS of
# the build and of every worker the build reaped, and their CPU seconds.
WRAPPER = (
    "import json, resource, subprocess, sys\n"
    "done = subprocess.run([sys.executable, '-m', 'manifests.cli', '--store', sys.argv[1], 'corpus', 'build', "
    "sys.argv[2]], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)\n"
    "usage = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "print(json.dumps({'rc': done.returncode, 'stderr': done.stderr[-3000:], 'maxrss_kib': usage.ru_maxrss, "
    "'cpu': usage.ru_utime + usage.ru_stime}))\n"
)


def run_build(recipe: Path, store: Path) -> dict:
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", WRAPPER, str(store), str(recipe)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    monitor = TreeMonitor(proc.pid, store)
    monitor.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - started
    monitor.stop.set()
    monitor.join()
    result = json.loads(out.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise SystemExit(f"corpus build failed ({result['rc']}):\n{result['stderr']}")
    return result | monitor.peak | {"wall": wall}


# ---------------------------------------------------------------------------------- reporting


def machine() -> str:
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), platform.processor() or "unknown CPU",
    )  # fmt: skip
    import pyarrow

    return (
        f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}, NumPy {np.__version__}, "
        f"pyarrow {pyarrow.__version__}"
    )


def funnel(store: Path) -> tuple[str, int]:
    """The published dataset's funnel in one line, and its size on disk."""
    from manifests.store import Store

    manifest = Store(store).resolve("scale", kind="dataset")
    steps = [f"{row['step']} -{row['in'] - row['out']:,}" for row in manifest.stats["funnel"][1:]]
    return (
        f"{manifest.stats['rows_in']:,} in, {', '.join(steps)}, {manifest.stats['rows_out']:,} out",
        folder_bytes(manifest.location),
    )


def measure(n: int, folder: Path, workers: int) -> dict:
    data, store = folder / f"docs-{n}.jsonl", folder / f"store-{n}"
    started = time.perf_counter()
    DocumentGenerator(seed=0).write(data, n)
    generated = time.perf_counter() - started
    write_recipe(folder / f"scale-{n}.yaml", data, workers)
    try:
        result = run_build(folder / f"scale-{n}.yaml", store)
        result["funnel"], result["dataset_bytes"] = funnel(store)
    finally:
        input_bytes = data.stat().st_size
        data.unlink()
        shutil.rmtree(store, ignore_errors=True)
    return result | {"n": n, "generated_s": generated, "input_bytes": input_bytes, "workers": workers}


def print_table(rows: list[dict]) -> None:
    base = rows[0]
    columns = [
        ("documents", lambda r: f"{r['n']:,}"),
        ("wall s", lambda r: f"{r['wall']:.1f}"),
        ("µs/doc", lambda r: f"{r['wall'] / r['n'] * 1e6:.1f}"),
        ("× smallest", lambda r: f"{(r['wall'] / r['n']) / (base['wall'] / base['n']):.2f}"),
        ("CPU s", lambda r: f"{r['cpu']:.1f}"),
        ("CPU µs/doc", lambda r: f"{r['cpu'] / r['n'] * 1e6:.1f}"),
        ("peak RSS MiB", lambda r: f"{r['maxrss_kib'] / 1024:.0f}"),
        ("× smallest", lambda r: f"{r['maxrss_kib'] / base['maxrss_kib']:.2f}"),
        ("main/worker MiB", lambda r: f"{r['main_kib'] / 1024:.0f}/{r['worker_kib'] / 1024:.0f}"),
        ("input B/doc", lambda r: f"{r['input_bytes'] / r['n']:.0f}"),
        ("work peak B/doc", lambda r: f"{r['work_bytes'] / r['n']:.0f}"),
        ("store peak B/doc", lambda r: f"{r['store_bytes'] / r['n']:.0f}"),
        ("dataset B/doc", lambda r: f"{r['dataset_bytes'] / r['n']:.0f}"),
        ("workers", lambda r: str(r["workers"])),
    ]
    table = [[name for name, _ in columns]] + [[fmt(r) for _, fmt in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = ["| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in table]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--docs", type=int, nargs="+", default=[20_000, 100_000], help="sizes, smallest first"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--dir", type=Path, default=Path(tempfile.gettempdir()), help="where inputs and stores go"
    )
    args = parser.parse_args()
    sizes = sorted(args.docs)
    free = shutil.disk_usage(args.dir).free
    need = sizes[-1] * 600 * 4  # the input (~560 B/doc) and, at most, as much again three times over
    print(f"machine: {machine()}")
    print(
        f"disk: {free / 2**30:.1f} GiB free under {args.dir}; the largest size needs about {need / 2**30:.1f} GiB"
    )
    if free < need:
        raise SystemExit("not enough disk space: pass --dir on a larger filesystem")
    recipe = yaml.safe_load(RECIPE.read_text())
    print(f"recipe: {RECIPE.relative_to(ROOT)}: steps {json.dumps(recipe['steps'])}, "
          f"dedup {json.dumps(recipe['dedup'] | {'minhash': {'threshold': 0.8}})}, workers {args.workers}\n")  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="corpus-scale-") as tmp:
        for n in sizes:
            rows.append(measure(n, Path(tmp), args.workers))
            r = rows[-1]
            print(f"  {n:,} documents: generated in {r['generated_s']:.1f} s, built in {r['wall']:.1f} s; "
                  f"{r['funnel']}", flush=True)  # fmt: skip
    print()
    print_table(rows)
    first, last = rows[0], rows[-1]
    linear = all(abs(r["wall"] / r["n"] / (first["wall"] / first["n"]) - 1) <= 0.15 for r in rows)
    flat = all(r["maxrss_kib"] <= 1.2 * first["maxrss_kib"] for r in rows)
    print(f"\ntime per document within ±15% of the smallest size's: {'yes' if linear else 'NO'}; "
          f"peak RSS within ×1.2: {'yes' if flat else 'NO'}")  # fmt: skip
    per_doc, cpu_per_doc = last["wall"] / last["n"], last["cpu"] / last["n"]
    for n in (1_000_000, 5_000_000):
        # On a busy machine the wall-clock rate overstates; the CPU rate spread over the workers bounds it below.
        wall_min, cpu_min = per_doc * n / 60, cpu_per_doc * n / last["workers"] / 60
        print(
            f"{n:,} documents: about {wall_min:.0f} min at the {last['n']:,} run's wall-clock rate, at least "
            f"{cpu_min:.0f} min at its CPU rate over {last['workers']} workers, plus "
            f"{last['generated_s'] / last['n'] * n / 60:.1f} min to generate the input"
        )


if __name__ == "__main__":
    main()
