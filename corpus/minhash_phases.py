"""MinHash near-duplicate search over a whole build: shard-parallel, resumable, memory-bounded.

Phase 1 workers already gave every document its band keys (``corpus.minhash.band_keys``). The
rest runs here as phases of independent tasks on the build's executor (local processes or Ray).
Each task leaves its output under ``<work>/minhash-<buckets>/`` and writes its last file atomically, so a
killed build resumes where it stopped::

    map       one task per task file (and per dedup index): its (band key, row) entries, without
              the rows already removed, ordered by bucket (key mod buckets)
                  -> map-00003.npy, map-00003.counts.npy
    reduce    one task per bucket: that bucket's slice of every map output (memory-mapped), sorted
              by key; each member of a run of equal keys is linked to the run's first row
                  -> pairs-00007.npy
    verify    the distinct candidate pairs, grouped by connected component, in about
              ``max(workers, pairs / VERIFY_TASK_PAIRS)`` tasks: exact shingle Jaccard, each task
              reading every task file it needs once (only the text column, only the row groups
              holding its rows; a dedup index's texts through the reader its ``Part`` carries) and
              shingling each of its documents once
                  -> verify-pairs.npy, verify-00002-of-00004.npy
    clusters  in the main process: union-find over the verified pairs, then the keep rule
                  -> clusters.npz

Memory: a map task holds one task file's keys, a reduce task one bucket (the number of buckets
grows with the build so that a bucket stays near ``BUCKET_ENTRIES`` entries), a verify task the
shingle sets of its documents (at most ``2 * VERIFY_TASK_PAIRS``) and one task file's texts at a
time. Only the candidate pairs -- as many as the duplicates, not the documents -- meet in one
process. Rows are numbered globally (the documents of dedup indexes first, then the build's in
task order), and a pair's Jaccard does not depend on which task computed it, so the clusters
never depend on the number of workers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from corpus.minhash import (
    EMPTY_KEY,
    U64,
    MinHashConfig,
    band_similarity,
    flat_shingle_sets,
    key_matrix,
    link_to_first,
    resolve_clusters,
)
from corpus.minhash_clusters import connected_components, pair_jaccard
from corpus.task_markers import save_array, write_atomically

BUCKET_ENTRIES = 1 << 20
"""Band-key entries per reduce bucket (16 bytes each: 16 MB, about 60 MB while sorted)."""
VERIFY_TASK_PAIRS = 1 << 14
"""Most candidate pairs per verify task. A task holds the shingle sets of its documents, at most twice
as many, at 8 bytes a shingle (about one per word): 32,768 documents of 1,000 words are 260 MB."""
VERIFY_MIN_TASK_PAIRS = 1 << 10
"""Fewer pairs than this per worker are verified in fewer tasks: starting a worker costs more."""
SHINGLE_DOCS = 1 << 12
"""Documents shingled at once (bounds the temporaries of ``flat_shingle_sets``)."""
PAIRS_AT_ONCE = 512
"""Pairs per ``pair_jaccard`` call: it sorts the shingles of all its pairs at once, and smaller sorts
were faster (128-512 alike, 2048 a fifth slower) and stay in cache; it takes at most 2**16."""
ENTRY = np.dtype([("key", "<u8"), ("row", "<i8")])

Runner = Callable[[str, Callable[..., dict[str, Any]], list[tuple]], Iterable[dict[str, Any]]]
"""``run(label, fn, jobs)`` runs ``fn(*job)`` for every job on the build's executor."""


@dataclass(frozen=True)
class Part:
    """Consecutive global rows and the Parquet file holding their band keys and texts."""

    first_row: int
    rows: int
    path: str
    keys_column: str
    index_texts: Callable[[np.ndarray], list[str]] | None = None
    """For the documents of a dedup index, which was published earlier and so always stays: the texts
    of its rows (by position in the index), which live in the indexed dataset, not in ``path``. Handed
    over by the caller; it travels to the verify tasks, so it must pickle (a module-level class)."""


def _gather(parts: list[Part], rows: np.ndarray, read: Callable[[Part, np.ndarray], Any]) -> list:
    """``read(part, local rows)`` for the rows of each part, put back in the order of ``rows``."""
    out = np.empty(len(rows), object)
    starts = np.array([p.first_row for p in parts], np.int64)
    which = np.searchsorted(starts, rows, side="right") - 1
    for k in np.unique(which):
        mask = which == k
        values = read(parts[k], rows[mask] - parts[k].first_row)
        found = np.empty(int(mask.sum()), object)
        found[:] = list(values)
        out[mask] = found
    return out.tolist()


def part_texts(part: Part, local: np.ndarray) -> pa.Array | list[str]:
    """Texts of the rows ``local`` (ascending) of one part: from a task file only the text column of
    the row groups that hold them."""
    if part.index_texts is not None:
        return part.index_texts(local)
    file = pq.ParquetFile(part.path)
    sizes = np.array([file.metadata.row_group(g).num_rows for g in range(file.metadata.num_row_groups)])
    starts = np.r_[0, np.cumsum(sizes)]
    group_of = np.searchsorted(starts, local, side="right") - 1
    groups = np.unique(group_of)
    column = file.read_row_groups(groups.tolist(), columns=["text"]).column("text")
    start_in_read = np.r_[0, np.cumsum(sizes[groups])][np.searchsorted(groups, group_of)]
    return column.take(pa.array(local - starts[group_of] + start_in_read)).combine_chunks()


def shingle_sets_of_rows(
    parts: list[Part], rows: np.ndarray, cfg: MinHashConfig
) -> tuple[np.ndarray, np.ndarray]:
    """``flat_shingle_sets`` of the global ``rows`` (ascending, distinct): each part's texts read once."""
    starts = np.array([p.first_row for p in parts], np.int64)
    which = np.searchsorted(starts, rows, side="right") - 1
    values, sizes = [np.zeros(0, U64)], [np.zeros(0, np.int64)]
    for k in np.unique(which):  # rows ascend, so each part's rows are one run, in order
        texts = part_texts(parts[k], rows[which == k] - parts[k].first_row)
        for lo in range(0, len(texts), SHINGLE_DOCS):
            found, offsets = flat_shingle_sets(texts[lo : lo + SHINGLE_DOCS], cfg)
            values.append(found)
            sizes.append(np.diff(offsets))
        del texts
    offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(np.concatenate(sizes), out=offsets[1:])
    return np.concatenate(values), offsets


def rows_jaccard(parts: list[Part], u: np.ndarray, v: np.ndarray, cfg: MinHashConfig) -> np.ndarray:
    """Exact shingle Jaccard of the global row pairs ``(u, v)``, every document read and shingled once."""
    rows = np.unique(np.concatenate([u, v]))
    values, offsets = shingle_sets_of_rows(parts, rows, cfg)
    a, b = np.searchsorted(rows, u), np.searchsorted(rows, v)
    out = np.zeros(len(u))
    for lo in range(0, len(u), PAIRS_AT_ONCE):
        out[lo : lo + PAIRS_AT_ONCE] = pair_jaccard(
            values, offsets, a[lo : lo + PAIRS_AT_ONCE], b[lo : lo + PAIRS_AT_ONCE]
        )
    return out


def _keys(part: Part, bands: int) -> np.ndarray:
    column = pq.read_table(part.path, columns=[part.keys_column]).column(part.keys_column)
    return key_matrix(column, bands)


def map_task(part: Part, removed: str, buckets: int, bands: int, out: str) -> dict[str, Any]:
    """One part's (key, row) entries ordered by bucket, with the entry count of every bucket."""
    keys = _keys(part, bands)
    rows = np.arange(part.first_row, part.first_row + len(keys), dtype=np.int64)
    gone = np.load(removed, mmap_mode="r")
    lo, hi = np.searchsorted(gone, [part.first_row, part.first_row + len(keys)])
    if hi > lo:
        alive = ~np.isin(rows, gone[lo:hi])
        keys, rows = keys[alive], rows[alive]
    flat, row_of = keys.ravel(), np.repeat(rows, bands)  # row-major: rows stay ascending
    real = flat != U64(EMPTY_KEY)
    flat, row_of = flat[real], row_of[real]
    bucket = (flat % U64(buckets)).astype(np.int64)
    order = np.argsort(bucket, kind="stable")
    entries = np.empty(len(flat), ENTRY)
    entries["key"], entries["row"] = flat[order], row_of[order]
    save_array(Path(out + ".npy"), entries)
    save_array(Path(out + ".counts.npy"), np.bincount(bucket, minlength=buckets))  # last: the marker
    return {"entries": len(entries)}


def reduce_task(bucket: int, maps: list[str], span: int, out: str) -> dict[str, Any]:
    """The distinct candidate pairs of one bucket, as ``first * span + other`` codes."""
    slices = []
    for stem in maps:  # in row order: rows ascend across and within the slices
        counts = np.load(stem + ".counts.npy")
        start = int(counts[:bucket].sum())
        slices.append(np.load(stem + ".npy", mmap_mode="r")[start : start + int(counts[bucket])])
    entries = np.concatenate(slices) if slices else np.zeros(0, ENTRY)
    order = np.argsort(entries["key"], kind="stable")  # stable: each run's rows stay ascending
    first, other = link_to_first(entries["key"][order], entries["row"][order])
    codes = np.unique(first * span + other)
    save_array(Path(out), codes)
    return {"pairs": len(codes)}


def verify_task(
    parts: list[Part], candidates: str, lo: int, hi: int, span: int, cfg_json: str, out: str
) -> dict:
    """Exact shingle Jaccard of the pairs ``lo:hi`` of the codes in ``candidates`` (``first * span + other``)."""
    cfg = MinHashConfig.model_validate_json(cfg_json)
    codes = np.asarray(np.load(candidates, mmap_mode="r")[lo:hi])
    save_array(Path(out), rows_jaccard(parts, codes // span, codes % span, cfg))
    return {"pairs": hi - lo}


def by_component(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Positions of the pairs ``(u, v)`` grouped by connected component of the candidate graph (ordered
    by its lowest row; pairs keep their order inside). Verify tasks take consecutive pairs in this
    order, so all the pairs of a document usually fall in one task, which reads and shingles it once
    (split in row order instead, on ``benchmarks/dedup`` data 2 tasks shingled 15% more documents
    than 1 task, 8 tasks 31% more; grouped, 0% and 0.04%)."""
    nodes, root = connected_components(u, v)
    return np.argsort(root[np.searchsorted(nodes, u)], kind="stable")


def verify_blocks(pairs: int, workers: int) -> list[tuple[int, int]]:
    """``(lo, hi)`` of each verify task: at most ``VERIFY_TASK_PAIRS`` pairs each, and enough tasks to
    keep ``workers`` busy unless that would leave fewer than ``VERIFY_MIN_TASK_PAIRS`` in each."""
    if pairs == 0:
        return []
    tasks = max(min(workers, math.ceil(pairs / VERIFY_MIN_TASK_PAIRS)), math.ceil(pairs / VERIFY_TASK_PAIRS))
    return [(k * pairs // tasks, (k + 1) * pairs // tasks) for k in range(tasks)]


def _weights(parts: list[Part], cfg: MinHashConfig) -> Callable[[np.ndarray], np.ndarray] | None:
    """The keep rule's weight of rows: text length or score; documents of an index always win."""
    if cfg.keep == "first":
        return None

    def read(part: Part, local: np.ndarray) -> np.ndarray:
        if part.index_texts is not None:
            return np.full(len(local), np.inf)  # already published: they stay
        column = "text" if cfg.keep == "longest" else cfg.score_column
        values = pq.read_table(part.path, columns=[column]).column(column).take(pa.array(local))
        if cfg.keep == "longest":
            values = pc.utf8_length(values)
        return values.to_numpy(zero_copy_only=False).astype(np.float64)

    return lambda rows: np.array(_gather(parts, rows, read), np.float64)


def near_duplicates(
    parts: list[Part], removed: np.ndarray, cfg: MinHashConfig, work: Path, run: Runner, workers: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(removed rows, the kept row of each one's cluster, similarity), all as global rows.

    ``removed`` are global rows already dropped by earlier decisions (ascending): they take no part.
    ``workers`` (of the executor ``run`` runs on) only sizes the verify tasks; the result is the same.
    """
    bands, rows_per_band = cfg.banding()
    span = max(1, sum(p.rows for p in parts))
    buckets = max(1, math.ceil(span * bands / BUCKET_ENTRIES))
    folder = work / f"minhash-{buckets}"  # map outputs are only comparable with equal bucket counts
    done = folder / "clusters.npz"
    if done.is_file():
        saved = np.load(done)
        return saved["removed"], saved["kept"], saved["similarity"]
    folder.mkdir(parents=True, exist_ok=True)
    gone = folder / "removed.npy"
    save_array(gone, np.asarray(removed, np.int64))  # the same on every run of this plan

    stems = [str(folder / f"map-{k:05d}") for k in range(len(parts))]
    jobs = [(p, str(gone), buckets, bands, s) for p, s in zip(parts, stems, strict=True)
            if not Path(s + ".counts.npy").is_file()]  # fmt: skip
    list(run("minhash map", map_task, jobs))

    pair_files = [folder / f"pairs-{b:05d}.npy" for b in range(buckets)]
    jobs = [(b, stems, span, str(f)) for b, f in enumerate(pair_files) if not f.is_file()]
    list(run("minhash reduce", reduce_task, jobs))

    candidates = folder / "candidates.npy"
    if not candidates.is_file():
        save_array(candidates, np.unique(np.concatenate([np.load(f) for f in pair_files])))
    codes = np.load(candidates)
    u, v = codes // span, codes % span
    verified = None
    if cfg.verify:
        grouped = folder / "verify-pairs.npy"
        if not grouped.is_file():
            save_array(grouped, codes[by_component(u, v)])
        blocks = verify_blocks(len(codes), workers)
        # The task count is in the names: a resume with other workers does not mix two splits.
        outs = [folder / f"verify-{k:05d}-of-{len(blocks):05d}.npy" for k in range(len(blocks))]
        jobs = [(parts, str(grouped), lo, hi, span, cfg.model_dump_json(), str(out))
                for (lo, hi), out in zip(blocks, outs, strict=True) if not out.is_file()]  # fmt: skip
        list(run("minhash verify", verify_task, jobs))
        verified = np.concatenate([np.zeros(0)] + [np.load(f) for f in outs])
        verified = verified[np.argsort(np.load(grouped))]  # back in the order of the (distinct) codes

    def similarity_of(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if cfg.verify:  # the chained pairs, a few at a time so that memory stays as in a verify task
            return np.concatenate([np.zeros(0)] + [
                rows_jaccard(parts, a[lo : lo + VERIFY_TASK_PAIRS], b[lo : lo + VERIFY_TASK_PAIRS], cfg)
                for lo in range(0, len(a), VERIFY_TASK_PAIRS)
            ])  # fmt: skip
        rows = np.unique(np.concatenate([a, b]))
        keys = np.zeros((len(rows), bands), U64)
        if len(rows):
            keys[:] = np.stack(_gather(parts, rows, lambda part, local: _keys(part, bands)[local]))
        return band_similarity(keys, np.searchsorted(rows, a), np.searchsorted(rows, b), rows_per_band)

    result = resolve_clusters(u, v, verified, cfg, _weights(parts, cfg), similarity_of)
    write_atomically(done, lambda f: np.savez(f, removed=result[0], kept=result[1], similarity=result[2]))
    return result
