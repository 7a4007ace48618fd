"""MinHash near-duplicate removal, side by side: this project, datatrove, a plain datasketch loop.

All three read the same JSONL file (``make_data.py``'s labelled benchmark), remove near-duplicates
at the same settings (word 5-gram shingles, 128 permutations, the bands x rows this project
chooses for the threshold, seed 1) and write the kept documents, each in its own process on one
core:

- **ours**: ``band_keys`` over batches of ``--batch`` documents, then ``find_duplicates`` with
  exact verification of candidate pairs (the default), keep first; kept rows to Parquet;
- **ours-phased**: the same as a build runs it at scale (``corpus/minhash_phases.py``): task files
  of ``--batch`` documents with their band keys in Parquet, then the map, reduce (``--buckets``),
  verify and clusters phases, every intermediate on disk, run one task after another here;
- **datatrove**: its four MinHash stages (signatures, buckets, clusters, filter) with
  ``LocalPipelineExecutor(workers=1)``, JSONL in and out; one task per stage except the buckets
  stage, which datatrove requires to run as one task per band (``tasks=bands``, still one worker);
- **datasketch**: for each document, ``MinHash.update_batch`` over its shingles, ``MinHashLSH.query``,
  then drop it if anything was found, else ``insert`` it (``run_real.py`` shingles ``\\w+`` words).

Reported: pairwise precision/recall/F1 of the clusters (pairs of documents put together vs the
true duplicate pairs), precision/recall/F1 of the removed set (whichever member a method keeps),
recall of copies by their true Jaccard with the original, documents/s per core (CPU seconds of
the process) and peak RSS. Then ours on the worst case for LSH, a bucket blow-up (``--blow-up``
identical documents: every band puts them all in one bucket), in seconds: linking each bucket
to its first row keeps it to ``n - 1`` candidate pairs instead of ``n * (n - 1) / 2``.

    .venv/bin/python benchmarks/dedup/run.py [--originals 10000] [--threshold 0.8]

The default, 10,000 originals (28,599 documents), takes about 2.5 minutes on the project's 2-core
machine, datatrove two minutes of it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]

import make_data  # noqa: E402

from corpus.minhash import MinHashConfig  # noqa: E402
from corpus.minhash_clusters import connected_components  # noqa: E402

BUCKETS = [(0.0, 0.5), (0.5, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 1.01)]

# ------------------------------------------------------------------------------------ workers
# Each runs in a fresh interpreter: argv = data.jsonl, out folder, settings as JSON. Each
# writes out/pairs.json: [[row, row it is a duplicate of], ...] and out/removed.json.

OURS = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import numpy as np, pyarrow as pa, pyarrow.compute as pc, pyarrow.json as pj, pyarrow.parquet as pq
    from corpus.minhash import MinHashConfig, band_keys, find_duplicates

    data, out, settings = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    batch = settings.pop("batch")
    cfg = MinHashConfig(**settings)
    table = pj.read_json(data)
    texts = table.column("text")
    keys = pa.concat_arrays([band_keys(texts.slice(i, batch), cfg) for i in range(0, len(texts), batch)])
    lengths = np.asarray(pc.utf8_length(texts))
    removed, kept, similarity = find_duplicates(keys, lengths, cfg, lambda rows: texts.take(pa.array(rows)))
    mask = np.ones(len(texts), bool)
    mask[removed] = False
    pq.write_table(table.filter(pa.array(mask)), out / "kept.parquet")
    (out / "pairs.json").write_text(json.dumps(np.c_[removed, kept].tolist()))
    (out / "removed.json").write_text(json.dumps(removed.tolist()))
    """
)

PHASED = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import numpy as np, pyarrow as pa, pyarrow.json as pj, pyarrow.parquet as pq
    import corpus.minhash_phases as phases
    from corpus.document_keys import MINHASH_KEYS
    from corpus.minhash import MinHashConfig, band_keys

    data, out, settings = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    batch, buckets = settings.pop("batch"), settings.pop("buckets")
    cfg = MinHashConfig(**settings)
    table = pj.read_json(data)
    parts = []
    # As phase 1 of a build leaves them: task files of text + band keys, then the phases in one process.
    for k, lo in enumerate(range(0, table.num_rows, batch)):
        chunk = table.slice(lo, batch)
        chunk = chunk.append_column(MINHASH_KEYS, band_keys(chunk.column("text"), cfg))
        pq.write_table(chunk, out / f"task-{k:05d}.parquet")
        parts.append(phases.Part(lo, chunk.num_rows, str(out / f"task-{k:05d}.parquet"), MINHASH_KEYS))
    phases.BUCKET_ENTRIES = -(-table.num_rows * cfg.banding()[0] // buckets)
    run = lambda label, fn, jobs: [fn(*job) for job in jobs]
    removed, kept, similarity = phases.near_duplicates(parts, np.zeros(0, np.int64), cfg, out / "work", run)
    mask = np.ones(table.num_rows, bool)
    mask[removed] = False
    pq.write_table(table.filter(pa.array(mask)), out / "kept.parquet")
    (out / "pairs.json").write_text(json.dumps(np.c_[removed, kept].tolist()))
    (out / "removed.json").write_text(json.dumps(removed.tolist()))
    """
)

DATASKETCH = textwrap.dedent(
    r"""
    import json, re, sys
    from pathlib import Path
    from datasketch import MinHash, MinHashLSH

    data, out, settings = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    n, num_perm = settings["ngram"], settings["num_perm"]
    # "word": lower-cased \w+ words (punctuation dropped); default: lower-cased whitespace words.
    split = re.compile(r"\w+").findall if settings.get("tokens") == "word" else str.split
    lsh = MinHashLSH(num_perm=num_perm, params=(settings["bands"], settings["rows"]))
    pairs = []
    with open(data, encoding="utf-8") as lines, open(out / "kept.jsonl", "w", encoding="utf-8") as kept:
        for row, line in enumerate(lines):
            words = split(json.loads(line)["text"].lower())
            grams = {" ".join(words[i : i + n]).encode() for i in range(max(1, len(words) - n + 1))}
            m = MinHash(num_perm=num_perm, seed=settings["seed"])
            m.update_batch(list(grams))
            found = lsh.query(m)
            if found:
                pairs.append([row, min(found)])
            else:
                lsh.insert(row, m)
                kept.write(line)
    (out / "pairs.json").write_text(json.dumps(pairs))
    (out / "removed.json").write_text(json.dumps([p[0] for p in pairs]))
    """
)

DATATROVE = textwrap.dedent(
    """
    import json, struct, sys
    from pathlib import Path
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    import datatrove.utils.hashes.xxhash as dt_xxhash
    import xxhash
    from datatrove.utils.hashing import HashConfig

    # datatrove's default shingle hash passes str to xxhash, which xxhash 4 refuses; encode first.
    dt_xxhash.xxhash64 = lambda data: xxhash.xxh64_intdigest(data.encode() if isinstance(data, str) else data)

    data, out, settings = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    cfg = MinhashConfig(n_grams=settings["ngram"], num_buckets=settings["bands"],
                        hashes_per_bucket=settings["rows"], seed=settings["seed"], hash_config=HashConfig(precision=64, hash_fc="xxhash"))
    folder, logs = str(data.parent), out / "logs"
    stages = [
        ([JsonlReader(folder), MinhashDedupSignature(output_folder=str(out / "sigs"), config=cfg)], 1),
        ([MinhashDedupBuckets(input_folder=str(out / "sigs"), output_folder=str(out / "buckets"), config=cfg)],
         cfg.num_buckets),
        ([MinhashDedupCluster(input_folder=str(out / "buckets"), output_folder=str(out / "remove"), config=cfg,
                              save_cluster_id=True)], 1),
        ([JsonlReader(folder), MinhashDedupFilter(input_folder=str(out / "remove")), JsonlWriter(str(out / "kept"))], 1),
    ]
    for i, (pipeline, tasks) in enumerate(stages):
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=1, logging_dir=str(logs / str(i))).run()

    def uints(path):
        raw = path.read_bytes() if path.exists() else b""
        return list(struct.unpack(f"<{len(raw) // 4}I", raw))

    removed = uints(out / "remove" / "000000.remove")
    flat = uints(out / "remove" / "000000.clusters")
    first = {}
    pairs = []
    for doc, cluster in zip(flat[::2], flat[1::2]):
        first.setdefault(cluster, doc)
        pairs.append([doc, first[cluster]])
    (out / "pairs.json").write_text(json.dumps(pairs))
    (out / "removed.json").write_text(json.dumps(removed))
    """
)

# Peak RSS as the kernel keeps it for the worker's own address space (VmHWM): wait4's ru_maxrss
# would also count the benchmark parent's pages, which a forked child starts out sharing.
PEAK = textwrap.dedent(
    """
    import re as _re
    _status = Path("/proc/self/status").read_text()
    (out / "peak_rss_kib").write_text(_re.search(r"VmHWM:\\s+(\\d+)", _status).group(1))
    """
)
WORKERS = {
    name: code + PEAK
    for name, code in {
        "ours": OURS,
        "ours-phased": PHASED,
        "datatrove": DATATROVE,
        "datasketch": DATASKETCH,
    }.items()
}


def run_worker(code: str, data: Path, out: Path, settings: dict) -> dict:
    """Run one side in a fresh process; its CPU seconds (children included) come from wait4."""
    out.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(data), str(out), json.dumps(settings)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(out / "stderr.txt", "w"),  # noqa: SIM115 -- closed with the process
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed ({out}):\n{(out / 'stderr.txt').read_text()[-3000:]}")
    return {
        "cpu": usage.ru_utime + usage.ru_stime,
        "wall": wall,
        "rss_mib": int((out / "peak_rss_kib").read_text()) / 1024,
        "pairs": json.loads((out / "pairs.json").read_text()),
        "removed": json.loads((out / "removed.json").read_text()),
    }


# ------------------------------------------------------------------------------------ scoring


def labels_from_pairs(n: int, pairs) -> np.ndarray:
    """Cluster label of every row (its lowest row): the connected components of ``pairs``."""
    label = np.arange(n)
    if len(pairs):
        pairs = np.asarray(pairs, dtype=np.int64)
        members, root = connected_components(pairs[:, 0], pairs[:, 1])
        label[members] = root
    return label


def _same_cluster_pairs(*labels: np.ndarray) -> int:
    """Pairs of rows that share a label in every given labelling."""
    _, counts = np.unique(np.stack(labels), axis=1, return_counts=True)
    return int((counts * (counts - 1) // 2).sum())


def prf(tp: int, predicted: int, true: int) -> tuple[float, float, float]:
    p = tp / predicted if predicted else 1.0
    r = tp / true if true else 1.0
    return p, r, 2 * p * r / (p + r) if p + r else 0.0


def score(bench: make_data.Benchmark, threshold: float, result: dict) -> dict:
    n = len(bench.texts)
    truth = labels_from_pairs(n, sorted(bench.true_pairs(threshold)))
    predicted = labels_from_pairs(n, result["pairs"])
    pair = prf(
        _same_cluster_pairs(truth, predicted), _same_cluster_pairs(predicted), _same_cluster_pairs(truth)
    )
    # Removed set, whichever member a method keeps: a true cluster C should lose |C| - 1 rows.
    removed = np.zeros(n, bool)
    removed[np.asarray(result["removed"], dtype=np.int64)] = True
    _, inverse, sizes = np.unique(truth, return_inverse=True, return_counts=True)
    removed_per_cluster = np.bincount(inverse, weights=removed, minlength=len(sizes))
    tp = int(np.minimum(removed_per_cluster, sizes - 1).sum())
    removal = prf(tp, int(removed.sum()), int((sizes - 1).sum()))
    copies = np.flatnonzero(np.asarray(bench.original) >= 0)
    j = np.asarray(bench.jaccard)[copies]
    found = predicted[copies] == predicted[np.asarray(bench.original)[copies]]
    by_bucket = {
        lo: (found[(j >= lo) & (j < hi)].mean(), int(((j >= lo) & (j < hi)).sum())) for lo, hi in BUCKETS
    }
    negatives = [p for p, v in bench.family_pairs.items() if v < threshold and bench.kind[p[0]] == "negative"]
    merged = sum(predicted[a] == predicted[b] for a, b in negatives)
    return {
        "pair": pair,
        "removal": removal,
        "recall_at_threshold": float(found[j >= threshold].mean()),
        "by_bucket": by_bucket,
        "negatives_merged": (merged, len(negatives)),
    }


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}, NumPy {np.__version__}"


def bucket_blow_up(text: str, n: int, cfg: MinHashConfig) -> str:
    """Ours on ``n`` copies of one document: band keys, then ``find_duplicates`` with verification."""
    import pyarrow as pa

    from corpus.minhash import band_keys, find_duplicates

    texts = pa.array([text] * n)
    start = time.perf_counter()
    keys = band_keys(texts, cfg)
    keyed = time.perf_counter()
    removed, _, _ = find_duplicates(keys, None, cfg, lambda rows: texts.take(pa.array(rows)).to_pylist())
    found = time.perf_counter()
    assert len(removed) == n - 1, f"{len(removed)} of {n - 1} copies removed"
    return (
        f"bucket blow-up, {n:,} identical documents: band keys {keyed - start:.2f} s, "
        f"find_duplicates (verified) {found - keyed:.2f} s, {len(removed):,} removed"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--originals", type=int, default=10000, help="originals (copies and negatives scale with it)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--bands", type=int, help="with --rows: explicit banding for all three sides")
    parser.add_argument("--rows", type=int)
    parser.add_argument("--batch", type=int, default=2000, help="documents per band_keys call (ours)")
    parser.add_argument(
        "--buckets", type=int, default=8, help="reduce buckets of the phased run (ours-phased)"
    )
    parser.add_argument("--only", nargs="*", choices=list(WORKERS), default=list(WORKERS))
    parser.add_argument(
        "--blow-up", type=int, default=1000, help="identical documents of the bucket blow-up timing (0: skip)"
    )
    args = parser.parse_args()

    cfg = MinHashConfig(threshold=args.threshold, bands=args.bands, rows=args.rows)
    bands, rows = cfg.banding()
    settings = {"threshold": args.threshold, "num_perm": cfg.num_perm, "ngram": cfg.ngram, "seed": cfg.seed}
    # This set's truth is lower-cased whitespace words, punctuation attached: ours shingles the same
    # way (``normalize: none``); run_real.py measures what the default simplification buys.
    settings |= {"bands": bands, "rows": rows, "normalize": "none"}
    bench = make_data.build(args.originals, args.seed)
    n = len(bench.texts)
    copies = sum(j >= 0 for j in bench.jaccard)
    print(f"machine: {machine()}")
    print(
        f"data: {n} documents ({args.originals} originals, {copies} copies, {bench.kind.count('negative')} hard "
        f"negatives), {sum(map(len, bench.texts)) / n:.0f} characters each on average; "
        f"{len(bench.true_pairs(args.threshold))} true pairs at Jaccard >= {args.threshold}"
    )
    print(
        f"settings: word {cfg.ngram}-grams, {cfg.num_perm} permutations, {bands} bands x {rows} rows, seed {cfg.seed}; "
        "one process, one core each\n"
    )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "in" / "docs.jsonl"
        data.parent.mkdir()
        with open(data, "w", encoding="utf-8") as f:
            for row, text in enumerate(bench.texts):
                f.write(json.dumps({"id": str(row), "text": text}) + "\n")
        for name in args.only:
            extra = {"batch": args.batch} if name == "ours" else {}
            extra = {"batch": args.batch, "buckets": args.buckets} if name == "ours-phased" else extra
            results[name] = run_worker(WORKERS[name], data, Path(tmp) / name, settings | extra)
            results[name] |= score(bench, args.threshold, results[name])
            print(f"  {name}: {results[name]['wall']:.1f} s wall", flush=True)

    print()
    header = ["", *results]
    table = [
        ("docs/s per core", lambda r: f"{n / r['cpu']:,.0f}"),
        ("CPU seconds", lambda r: f"{r['cpu']:.1f}"),
        ("peak RSS (MiB)", lambda r: f"{r['rss_mib']:.0f}"),
        ("pair precision", lambda r: f"{r['pair'][0]:.4f}"),
        ("pair recall", lambda r: f"{r['pair'][1]:.4f}"),
        ("pair F1", lambda r: f"{r['pair'][2]:.4f}"),
        ("removed precision", lambda r: f"{r['removal'][0]:.4f}"),
        ("removed recall", lambda r: f"{r['removal'][1]:.4f}"),
        ("removed F1", lambda r: f"{r['removal'][2]:.4f}"),
        (f"recall, copies J >= {args.threshold}", lambda r: f"{r['recall_at_threshold']:.4f}"),
    ]
    for lo, hi in BUCKETS:
        count = next(iter(results.values()))["by_bucket"][lo][1] if results else 0
        table.append(
            (
                f"  copies J in [{lo:.1f}, {min(hi, 1.0):.1f}{']' if hi > 1 else ')'} (n={count})",
                lambda r, lo=lo: f"{r['by_bucket'][lo][0]:.3f}",
            )
        )
    table.append(("hard-negative pairs merged", lambda r: "{} / {}".format(*r["negatives_merged"])))
    rows_out = [header] + [[label, *(fmt(r) for r in results.values())] for label, fmt in table]
    widths = [max(len(row[i]) for row in rows_out) for i in range(len(header))]
    lines = [
        "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |"
        for row in rows_out
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print("\n".join(lines))
    if "ours" in results:
        ours = n / results["ours"]["cpu"]
        for other in ("datatrove", "datasketch"):
            if other in results:
                print(f"ours / {other} docs/s per core: {ours / (n / results[other]['cpu']):.1f}x")
    if args.blow_up:
        print(bucket_blow_up(bench.texts[0], args.blow_up, cfg))


if __name__ == "__main__":
    main()
