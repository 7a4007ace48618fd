"""Phase 2 of a corpus build: combine the task outputs, in task order, into the published shards.

What needs the whole build is decided here from compact NumPy key arrays (24 bytes a document),
never from Python objects per document: every record id is unique (a 64-bit key, confirmed on
the strings when two keys meet), exact duplicates are dropped with the first seen kept (a 128-bit
key of the normalised text), and global cuts (keep the top fraction by a score) find their cutoff.
The rows then stream from the task files into the shards, one batch at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from corpus.steps import normalise
from manifests.errors import DistilleryError
from manifests.publish import LEDGER_SCHEMA, Publisher

ID_KEY = "_id_key"
DEDUP_KEY = "_dedup_key"
KEY_COLUMNS = (ID_KEY, DEDUP_KEY)
"""Hidden columns phase 1 adds to its task files; they never reach the published shards."""
_KEY128 = np.dtype([("hi", ">u8"), ("lo", ">u8")])


def add_keys(batch: pa.RecordBatch, case_fold: bool) -> pa.RecordBatch:
    """Append the id and dedup keys (computed in the worker, where the text already is)."""
    ids = batch.column("id").to_pylist()
    texts = normalise(batch.column("text"), case_fold).to_pylist()
    id_keys = b"".join(hashlib.blake2b(i.encode(), digest_size=8).digest() for i in ids)
    text_keys = b"".join(
        hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=16).digest() for t in texts
    )
    n = batch.num_rows
    batch = batch.append_column(
        ID_KEY, pa.FixedSizeBinaryArray.from_buffers(pa.binary(8), n, [None, pa.py_buffer(id_keys)])
    )
    return batch.append_column(
        DEDUP_KEY, pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), n, [None, pa.py_buffer(text_keys)])
    )


def _keys(column: pa.ChunkedArray, dtype: np.dtype) -> np.ndarray:
    array = column.combine_chunks()
    width = array.type.byte_width
    return np.frombuffer(
        array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * width
    ).copy()


def _row_groups(path: Path):
    """The rows of a file one row group at a time, without read-ahead (iter_batches buffers
    several row groups ahead, which showed as peak memory growing with the file)."""
    pf = pq.ParquetFile(path)
    for i in range(pf.metadata.num_row_groups):
        yield from pf.read_row_group(i, use_threads=False).to_batches()


def use_returning_memory_pool() -> None:
    """Make Arrow hand freed memory back to the system.

    Arrow's default mimalloc pool keeps freed pages for reuse; streaming a corpus batch by batch
    then shows a peak that grows with the corpus (seen: +180 MB over 200k documents). jemalloc
    (or the system allocator) keeps it flat.
    """
    try:
        pa.set_memory_pool(pa.jemalloc_memory_pool())
    except (NotImplementedError, pa.ArrowNotImplementedError):
        pa.set_memory_pool(pa.system_memory_pool())


class Combiner:
    """Decides, then streams. Built from the task outputs listed in task order.

    Global cuts come first (each over the documents that reached it), then exact dedup among the
    documents still kept — so a duplicate never points at a document that was cut.
    """

    def __init__(
        self, files: list[Path], task_inputs: list[str], dedup: bool, cuts: list[tuple[str, float, str]]
    ):
        self.files = files
        self.task_inputs = task_inputs
        columns = list(KEY_COLUMNS) + [c for c, _, _ in cuts]
        counts, id_keys, text_keys, scores = [], [], [], {c: [] for c, _, _ in cuts}
        for f in files:
            table = pq.read_table(f, columns=columns)
            counts.append(table.num_rows)
            id_keys.append(_keys(table.column(ID_KEY), np.dtype(">u8")))
            text_keys.append(_keys(table.column(DEDUP_KEY), _KEY128))
            for c in scores:
                scores[c].append(table.column(c).to_numpy())
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.n = n = int(self.offsets[-1])
        self._check_unique_ids(np.concatenate(id_keys) if id_keys else np.zeros(0, ">u8"))
        alive = np.ones(n, dtype=bool)
        self.cuts: list[tuple[str, float, str, np.ndarray]] = []
        for column, fraction, reason in cuts:
            values = np.concatenate(scores[column]) if n else np.zeros(0)
            candidates = values[alive]
            if not len(candidates):
                continue
            keep_n = max(1, math.ceil(fraction * len(candidates)))
            cutoff = float(np.sort(candidates)[::-1][keep_n - 1])  # ties at the cutoff are all kept
            below = alive & (values < cutoff)
            self.cuts.append((column, cutoff, reason, below))
            alive &= ~below
        self.first_of = np.arange(n)
        if dedup and alive.any():
            idx = np.flatnonzero(alive)
            _, first, inverse = np.unique(
                np.concatenate(text_keys)[idx], return_index=True, return_inverse=True
            )
            self.first_of[idx] = idx[first[inverse.reshape(-1)]]
        self.duplicate = alive & (self.first_of != np.arange(n))
        self.keep = alive & ~self.duplicate
        # Ids of the rows that others duplicate, for the ledger's duplicate_of (few, kept as strings).
        self._wanted = set(np.unique(self.first_of[self.duplicate]).tolist())
        self._first_ids: dict[int, str] = {}

    def _check_unique_ids(self, keys: np.ndarray) -> None:
        if len(keys) == len(np.unique(keys)):
            return
        values, counts = np.unique(keys, return_counts=True)
        clash = set(values[counts > 1].tolist())
        seen: set[str] = set()
        for task, f in enumerate(self.files):
            table = pq.read_table(f, columns=["id", ID_KEY])
            for rid, key in zip(
                table.column("id").to_pylist(),
                _keys(table.column(ID_KEY), np.dtype(">u8")).tolist(),
                strict=True,
            ):
                if key in clash:
                    if rid in seen:
                        raise DistilleryError(
                            f"input {self.task_inputs[task]}: record {rid} was already read (is this input listed twice?)"
                        )
                    seen.add(rid)

    def stream(self, pub: Publisher, shard_rows: int) -> tuple[int, list[dict]]:
        """Write the kept rows to shards; return (rows written, ledger rows of the global decisions)."""
        ledger: list[dict] = []
        with pub.shard_writer(shard_rows=shard_rows) as writer:
            for index, f in enumerate(self.files):
                start = int(self.offsets[index])
                for batch in _row_groups(f):
                    n = batch.num_rows
                    ids = batch.column("id").to_pylist()
                    for row in range(n):
                        if start + row in self._wanted:
                            self._first_ids[start + row] = ids[row]
                    for column, cutoff, reason, below in self.cuts:
                        values = batch.column(column).to_numpy(zero_copy_only=False)
                        for row in np.flatnonzero(below[start : start + n]):
                            ledger.append({"id": ids[row], "step": f"corpus.build.{column}", "action": "drop", "reason": reason,
                                           "score": float(values[row]), "detail": json.dumps({"cutoff": cutoff})})  # fmt: skip
                    for row in np.flatnonzero(self.duplicate[start : start + n]):
                        first = self._first_ids[int(self.first_of[start + row])]
                        ledger.append({"id": ids[row], "step": "corpus.build.exact_dedup", "action": "drop",
                                       "reason": "exact_duplicate", "score": None, "detail": json.dumps({"duplicate_of": first})})  # fmt: skip
                    kept = batch.filter(pa.array(self.keep[start : start + n])).drop_columns(
                        list(KEY_COLUMNS)
                    )
                    if kept.num_rows:
                        writer.write(kept)
                    start += n
        return writer.rows, ledger


def write_ledgers(pub: Publisher, task_ledgers: list[Path], extra: list[dict]) -> None:
    """One ledger file per step: task ledgers in task order, then the global decisions."""
    by_step: dict[str, list[pa.Table]] = {}
    for path in task_ledgers:
        table = pq.read_table(path)
        for step in sorted(set(table.column("step").to_pylist())):
            by_step.setdefault(step, []).append(table.filter(pc.equal(table.column("step"), step)))
    for step in sorted({e["step"] for e in extra}, key=lambda s: (s.endswith("exact_dedup"), s)):
        by_step.setdefault(step, []).append(
            pa.Table.from_pylist([e for e in extra if e["step"] == step], schema=LEDGER_SCHEMA)
        )
    for step, tables in by_step.items():
        pub.write_ledger(pa.concat_tables(tables), step=step)


def global_counts(ledger: list[dict]) -> Counter:
    """Documents removed by each global decision (``quality_score``, ``exact_dedup``)."""
    return Counter(entry["step"].removeprefix("corpus.build.") for entry in ledger)
