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
    verify    one task per block of distinct candidate pairs: exact shingle Jaccard, the texts read
              back from the task files (a dedup index's through the reader its ``Part`` carries)
                  -> verify-00002.npy
    clusters  in the main process: union-find over the verified pairs, then the keep rule
                  -> clusters.npz

Memory: a map task holds one task file's keys, a reduce task one bucket (the number of buckets
grows with the build so that a bucket stays near ``BUCKET_ENTRIES`` entries), a verify task the
shingle sets of one block of pairs. Only the candidate pairs -- as many as the duplicates, not
the documents -- meet in one process. Rows are numbered globally (the documents of dedup indexes
first, then the build's in task order), so the clusters never depend on the number of workers.
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
    exact_jaccard,
    key_matrix,
    link_to_first,
    resolve_clusters,
)
from corpus.task_markers import save_array, write_atomically

BUCKET_ENTRIES = 1 << 20
"""Band-key entries per reduce bucket (16 bytes each: 16 MB, about 60 MB while sorted)."""
VERIFY_TASK_PAIRS = 1 << 15
"""Candidate pairs per verify task."""
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


class RowTexts:
    """Texts of global rows, read back from the task files (the last two files' texts stay cached,
    as verification asks block by block in row order)."""

    def __init__(self, parts: list[Part]):
        self.parts = parts
        self._cache: dict[str, pa.ChunkedArray] = {}

    def _read(self, part: Part, local: np.ndarray) -> list[str]:
        if part.index_texts is not None:
            return part.index_texts(local)
        if part.path not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))
            self._cache[part.path] = pq.read_table(part.path, columns=["text"]).column("text")
        return self._cache[part.path].take(pa.array(local)).to_pylist()

    def __call__(self, rows: np.ndarray) -> list[str]:
        return _gather(self.parts, np.asarray(rows, np.int64), self._read)


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
    """Exact shingle Jaccard of candidate pairs ``lo:hi``."""
    cfg = MinHashConfig.model_validate_json(cfg_json)
    codes = np.asarray(np.load(candidates, mmap_mode="r")[lo:hi])
    save_array(Path(out), exact_jaccard(codes // span, codes % span, RowTexts(parts), cfg))
    return {"pairs": hi - lo}


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
    parts: list[Part], removed: np.ndarray, cfg: MinHashConfig, work: Path, run: Runner
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(removed rows, the kept row of each one's cluster, similarity), all as global rows.

    ``removed`` are global rows already dropped by earlier decisions (ascending): they take no part.
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
    texts = RowTexts(parts)
    verified = None
    if cfg.verify:
        blocks = [
            (lo, min(lo + VERIFY_TASK_PAIRS, len(codes))) for lo in range(0, len(codes), VERIFY_TASK_PAIRS)
        ]
        outs = [folder / f"verify-{k:05d}.npy" for k in range(len(blocks))]
        jobs = [(parts, str(candidates), lo, hi, span, cfg.model_dump_json(), str(out))
                for (lo, hi), out in zip(blocks, outs, strict=True) if not out.is_file()]  # fmt: skip
        list(run("minhash verify", verify_task, jobs))
        verified = np.concatenate([np.load(f) for f in outs]) if outs else np.zeros(0)

    def similarity_of(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if cfg.verify:
            return exact_jaccard(a, b, texts, cfg)
        rows = np.unique(np.concatenate([a, b]))
        keys = np.zeros((len(rows), bands), U64)
        if len(rows):
            keys[:] = np.stack(_gather(parts, rows, lambda part, local: _keys(part, bands)[local]))
        return band_similarity(keys, np.searchsorted(rows, a), np.searchsorted(rows, b), rows_per_band)

    result = resolve_clusters(u, v, verified, cfg, _weights(parts, cfg), similarity_of)
    write_atomically(done, lambda f: np.savez(f, removed=result[0], kept=result[1], similarity=result[2]))
    return result
