"""Phase 2 of a corpus build: global decisions over the task outputs, then the filter phase.

What needs the whole build is decided here from compact NumPy key arrays (24 bytes a document),
never from Python objects per document: every record id is unique (a 64-bit key, confirmed on
the strings when two keys meet), exact duplicates are dropped with the first seen kept (a 128-bit
key of the normalised text), global cuts (keep the top fraction by a score) find their cutoff, and
MinHash near-duplicates are found phase by phase on the executor (``corpus/minhash_phases.py``).
The keys are the hidden columns phase 1 appended (``corpus/document_keys.py``).
Then the filter phase: tasks in workers drop the removed rows from consecutive task files, strip
repeated lines, and write finished shards, which the publisher takes in task order.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from corpus.document_keys import (
    DEDUP_KEY,
    HIDDEN_COLUMNS,
    ID_KEY,
    KEY128,
    MINHASH_KEYS,
    URL_KEY,
    key_values,
)
from corpus.lines import UNIT_KEYS, LineDedupConfig, strip_repeated
from corpus.minhash import MinHashConfig
from corpus.minhash_phases import Part, Runner, near_duplicates
from corpus.sources import RECORD_SCHEMA
from corpus.task_markers import save_array, write_marker
from manifests.errors import DistilleryError
from manifests.publish import LEDGER_SCHEMA, Publisher, ShardWriter


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


PARTITION_ROWS = 1_000_000
"""Keys compared at once: memory for the global decisions stays near 24 MB however large the build."""


class Combiner:
    """Decides, then filters. Built from the task outputs listed in task order.

    Global cuts come first (each over the documents that reached it), then exact dedup among the
    documents still kept — so a duplicate never points at a document that was cut. Keys are
    compared one hash partition at a time (``PARTITION_ROWS`` keys each); what is kept between
    partitions grows only with the number of *removed* documents.
    """

    def __init__(
        self, files: list[Path], task_inputs: list[str], dedup: bool, cuts: list[tuple[str, float, str]],
        work: Path, run: Runner, partition_rows: int | None = None, url_dedup: bool = False,
        lines: LineDedupConfig | None = None, minhash: MinHashConfig | None = None, against: list | None = None,
    ):  # fmt: skip
        self.files = files
        self.work, self.run = work, run  # the work folder of the phases' outputs; the executor
        self.against = against or []
        self.task_inputs = task_inputs
        counts = [pq.ParquetFile(f).metadata.num_rows for f in files]
        # First, before any global work: inputs whose columns cannot share one schema fail fast.
        self.schema = unified_schema(files, task_inputs)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.n = int(self.offsets[-1])
        self.parts = max(1, math.ceil(self.n / (partition_rows or PARTITION_ROWS)))
        self._check_unique_ids()
        removed = np.zeros(0, np.int64)
        self.cuts: list[tuple[str, float, str, np.ndarray]] = []
        for column, fraction, reason in cuts:
            # A score per document (4-8 bytes): the cutoff needs the whole distribution.
            scores = np.concatenate(
                [pq.read_table(f, columns=[column]).column(column).to_numpy() for f in files]
            )
            scores[removed] = np.inf  # already gone: neither counted nor cut again
            alive = self.n - len(removed)
            if not alive:
                continue
            keep_n = max(1, math.ceil(fraction * alive))
            cutoff = float(
                np.sort(scores[np.isfinite(scores)])[::-1][keep_n - 1]
            )  # ties at the cutoff are all kept
            below = np.flatnonzero(scores < cutoff)
            self.cuts.append((column, cutoff, reason, below))
            removed = np.union1d(removed, below)
            del scores
        none = np.zeros(0, np.int64)
        self.url_duplicates, self.url_duplicate_of = (
            self._dedup(URL_KEY, np.dtype(">u8"), removed) if url_dedup else (none, none)
        )
        removed = np.union1d(removed, self.url_duplicates)
        self.duplicates, self.duplicate_of = (
            self._dedup(DEDUP_KEY, KEY128, removed) if dedup else (none, none)
        )
        removed = np.union1d(removed, self.duplicates)
        self.seen, self.seen_of = self._seen_before(removed) if self.against else (none, none)
        removed = np.union1d(removed, self.seen)
        self.near, self.near_of, self.near_similarity = (
            self._near_duplicates(minhash, removed) if minhash is not None else (none, none, np.zeros(0))
        )
        self.lines = lines
        self.frequent_units = self._frequent_units() if lines is not None else set()

    def _partition(self, column: str, dtype: np.dtype, part: int) -> tuple[np.ndarray, np.ndarray]:
        """(keys, global row indices, ascending) of one hash partition of a key column."""
        keys, rows = [], []
        for index, f in enumerate(self.files):
            values = key_values(pq.read_table(f, columns=[column]).column(column), dtype)
            first = values["hi"] if dtype.names else values
            mask = (first % np.uint64(self.parts)) == part if self.parts > 1 else np.ones(len(values), bool)
            keys.append(values[mask])
            rows.append(np.flatnonzero(mask) + self.offsets[index])
        return (
            (np.concatenate(keys), np.concatenate(rows))
            if keys
            else (np.zeros(0, dtype), np.zeros(0, np.int64))
        )

    def _check_unique_ids(self) -> None:
        for part in range(self.parts):
            keys, _ = self._partition(ID_KEY, np.dtype(">u8"), part)
            values, counts = np.unique(keys, return_counts=True)
            if (counts > 1).any():
                self._name_duplicate_id(set(values[counts > 1].tolist()))

    def _name_duplicate_id(self, clash: set[int]) -> None:
        seen: set[str] = set()
        for task, f in enumerate(self.files):
            table = pq.read_table(f, columns=["id", ID_KEY])
            for rid, key in zip(
                table.column("id").to_pylist(),
                key_values(table.column(ID_KEY), np.dtype(">u8")).tolist(),
                strict=True,
            ):
                if key in clash:
                    if rid in seen:
                        raise DistilleryError(
                            f"input {self.task_inputs[task]}: record {rid} was already read (is this input listed twice?)"
                        )
                    seen.add(rid)

    def _dedup(self, column: str, dtype: np.dtype, removed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows that duplicate an earlier kept row, the row each duplicates), both by global index."""
        duplicates, firsts = [], []
        for part in range(self.parts):
            keys, rows = self._partition(column, dtype, part)
            alive = ~np.isin(rows, removed)
            if column == URL_KEY:
                alive &= keys != 0  # no URL: nothing to compare
            keys, rows = keys[alive], rows[alive]
            if not len(rows):
                continue
            _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
            first_rows = rows[first[inverse.reshape(-1)]]  # rows are ascending: first = earliest
            dup = first_rows != rows
            duplicates.append(rows[dup])
            firsts.append(first_rows[dup])
        if not duplicates:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        rows, of = np.concatenate(duplicates), np.concatenate(firsts)
        order = np.argsort(rows)
        return rows[order], of[order]

    def _near_duplicates(
        self, cfg: MinHashConfig, removed: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """MinHash LSH over the documents still kept: (removed rows, kept row of each, similarity).

        Runs phase by phase on the executor (``corpus/minhash_phases.py``). Documents of earlier
        datasets (dedup indexes) come first, so that a cluster keeps them: a kept row ``-(k + 1)``
        is the ``k``-th document of the indexes that hold band keys.
        """
        parts, first = [], 0
        for index in self.against:
            if index.band_keys is not None:
                parts.append(
                    Part(first, len(index.band_keys), str(index.keys_path), "band_keys", index.texts)
                )
                first += len(index.band_keys)
        m = first
        for index, f in enumerate(self.files):
            count = int(self.offsets[index + 1] - self.offsets[index])
            parts.append(Part(m + int(self.offsets[index]), count, str(f), MINHASH_KEYS))
        dropped, kept, similarity = near_duplicates(parts, removed + m, cfg, self.work, self.run)
        new = dropped >= m  # near-duplicates among the indexed documents are not this build's to drop
        dropped, kept, similarity = dropped[new], kept[new], similarity[new]
        return dropped - m, np.where(kept >= m, kept - m, -(kept + 1)), similarity

    def _index_ref(self, row: int, near: bool) -> str:
        return self._indexed(row, near)[0].manifest.ref

    def _index_id(self, row: int, near: bool) -> str:
        index, k = self._indexed(row, near)
        return index.ids[k]

    def _indexed(self, row: int, near: bool):
        """(index, position in it) of the ``-(row + 1)``-th indexed document; with ``near``, counting
        only the indexes that hold band keys (the near-duplicate search sees only those)."""
        k = -row - 1
        for index in self.against:
            size = len(index.ids) if not near or index.band_keys is not None else 0
            if k < size:
                return index, k
            k -= size
        raise IndexError(row)

    def _seen_before(self, removed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows whose exact text is in a dedup index: (rows, -(k + 1) for the k-th indexed document)."""
        earlier = np.concatenate([key_values(i.text_keys, KEY128) for i in self.against])
        seen, of = [], []
        for part in range(self.parts):
            keys, rows = self._partition(DEDUP_KEY, KEY128, part)
            alive = ~np.isin(rows, removed)
            keys, rows = keys[alive], rows[alive]
            old = (
                np.flatnonzero((earlier["hi"] % np.uint64(self.parts)) == part)
                if self.parts > 1
                else np.arange(len(earlier))
            )
            if not len(rows) or not len(old):
                continue
            _, first, inverse = np.unique(
                np.concatenate([earlier[old], keys]), return_index=True, return_inverse=True
            )
            first_of_new = first[inverse.reshape(-1)[len(old) :]]
            hit = first_of_new < len(old)
            seen.append(rows[hit])
            of.append(-(old[first_of_new[hit]] + 1))
        if not seen:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        rows, of_rows = np.concatenate(seen), np.concatenate(of)
        order = np.argsort(rows)
        return rows[order], of_rows[order]

    def _frequent_units(self) -> set[int]:
        """Unit keys found in more documents than allowed, counted one hash partition at a time."""
        frequent: set[int] = set()
        for part in range(self.parts):
            keys = []
            for f in self.files:
                flat = pc.list_flatten(
                    pq.read_table(f, columns=[UNIT_KEYS]).column(UNIT_KEYS).combine_chunks()
                ).to_numpy()
                keys.append(flat[flat % np.uint64(self.parts) == part] if self.parts > 1 else flat)
            values, counts = np.unique(
                np.concatenate(keys) if keys else np.zeros(0, np.uint64), return_counts=True
            )
            frequent.update(values[counts > self.lines.max_documents].tolist())
        return frequent

    def _decisions(self) -> list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None, str, str]]:
        """(rows removed, the row each duplicates, similarity, step, reason) of every global decision."""
        out = [(below, None, None, column, reason) for column, _, reason, below in self.cuts]
        return out + [
            (self.url_duplicates, self.url_duplicate_of, None, "url_dedup", "duplicate_url"),
            (self.duplicates, self.duplicate_of, None, "exact_dedup", "exact_duplicate"),
            (self.seen, self.seen_of, None, "exact_dedup", "seen_in_index"),
            (self.near, self.near_of, self.near_similarity, "minhash_dedup", "near_duplicate"),
        ]

    def _column_at(self, column: str, rows: np.ndarray) -> dict[int, Any]:
        """Values of ``column`` at ascending global rows, one task file at a time."""
        found: dict[int, Any] = {}
        for index, f in enumerate(self.files):
            lo, hi = np.searchsorted(rows, self.offsets[index : index + 2])
            if hi > lo:
                local = pa.array(rows[lo:hi] - self.offsets[index])
                values = pq.read_table(f, columns=[column]).column(column).take(local).to_pylist()
                found.update(zip(rows[lo:hi].tolist(), values, strict=True))
        return found

    def decision_ledger(self) -> list[dict]:
        """Ledger rows of the global decisions, in row order; a duplicate names the kept document."""
        decisions = self._decisions()
        named = np.unique(np.concatenate([np.zeros(0, np.int64)] + [r for r, *_ in decisions] +
                                         [of[of >= 0] for _, of, *_ in decisions if of is not None]))  # fmt: skip
        ids = self._column_at("id", named)
        entries: list[tuple[int, dict]] = []
        for column, cutoff, reason, below in self.cuts:
            scores = self._column_at(column, below)
            entries += [(r, {"id": ids[r], "step": f"corpus.build.{column}", "action": "drop", "reason": reason,
                             "score": float(scores[r]), "detail": json.dumps({"cutoff": cutoff})})
                        for r in below.tolist()]  # fmt: skip
        for rows, of, similarity, step, reason in decisions[len(self.cuts) :]:
            near = similarity is not None
            for k, row in enumerate(rows.tolist()):
                first = int(of[k])
                detail = ({"duplicate_of": ids[first]} if first >= 0 else
                          {"duplicate_of": self._index_id(first, near), "index": self._index_ref(first, near)})  # fmt: skip
                score = round(float(similarity[k]), 4) if near else None
                if near:
                    detail["similarity"] = score
                entries.append((row, {"id": ids[row], "step": f"corpus.build.{step}", "action": "drop",
                                      "reason": reason, "score": score, "detail": json.dumps(detail)}))  # fmt: skip
        entries.sort(key=lambda e: e[0])  # stable: one row is removed by one decision only
        return [e for _, e in entries]

    def _filter_groups(self, shard_rows: int) -> list[list[int]]:
        """Consecutive task files of at most ``shard_rows`` rows together (one file at least):
        one filter task each, so that small tasks still make full shards."""
        groups: list[list[int]] = []
        rows = shard_rows
        for index in range(len(self.files)):
            count = int(self.offsets[index + 1] - self.offsets[index])
            if rows + count > shard_rows:
                groups.append([])
                rows = 0
            groups[-1].append(index)
            rows += count
        return groups

    def publish_rows(self, pub: Publisher, shard_rows: int) -> tuple[int, list[dict], list[Path]]:
        """The filter phase: consecutive task files' kept rows become shards, written by tasks in
        workers (resumable: a task's marker lists its shards), then taken into ``pub`` in order.

        Returns (rows written, ledger rows of the global decisions, line-dedup ledger files).
        """
        ledger = self.decision_ledger()
        folder = self.work / "filter"
        folder.mkdir(parents=True, exist_ok=True)
        removed = np.unique(np.concatenate([np.zeros(0, np.int64)] + [r for r, *_ in self._decisions()]))
        removed_path, units_path = folder / "removed.npy", folder / "units.npy"
        save_array(removed_path, removed)
        save_array(units_path, np.array(sorted(self.frequent_units), np.uint64))
        schema = (
            pa.schema([f for f in self.schema if f.name not in HIDDEN_COLUMNS])
            if self.files
            else RECORD_SCHEMA
        )
        lines = self.lines.model_dump_json() if self.frequent_units else None
        groups = self._filter_groups(shard_rows)
        markers = [folder / f"group-{k:05d}.json" for k in range(len(groups))]
        jobs = [([(str(self.files[i]), int(self.offsets[i])) for i in group], str(removed_path), str(units_path),
                 lines, schema.serialize().to_pybytes(), shard_rows, str(marker))
                for group, marker in zip(groups, markers, strict=True) if not marker.is_file()]  # fmt: skip
        list(self.run("filter", filter_task, jobs))
        rows, line_ledgers = 0, []
        for marker in markers:
            result = json.loads(marker.read_text())
            for shard in result["shards"]:
                pub.add_shard(Path(shard))
            rows += result["rows"]
            if result["ledger"]:
                line_ledgers.append(Path(result["ledger"]))
        return rows, ledger, line_ledgers


def _merged_type(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    """The type two task files' columns of one name share, or None when they cannot."""
    if a.equals(b) or pa.types.is_null(b):
        return a
    if pa.types.is_null(a):
        return b
    if (
        pa.types.is_integer(a)
        and pa.types.is_integer(b)
        and pa.types.is_signed_integer(a) == pa.types.is_signed_integer(b)
    ):
        return a if a.bit_width >= b.bit_width else b
    if (pa.types.is_integer(a) or pa.types.is_floating(a)) and (
        pa.types.is_integer(b) or pa.types.is_floating(b)
    ):
        return pa.float64()  # integers in one file, decimals in another: JSON does not tell them apart
    return None


def _describe(f: pa.Field) -> str:
    return (
        "JSON text (lists or objects)"
        if (f.metadata or {}).get(b"distillery.encoding") == b"json"
        else str(f.type)
    )


def unified_schema(files: list[Path], inputs: list[str]) -> pa.Schema:
    """The one schema of a build's rows: every column of every task file, in order of first
    appearance (task order, so it never depends on the number of workers), each with the type all
    files can be cast to; a column missing from some file is null there.

    Columns that cannot share a type (text in one input, numbers in another) are an error naming
    both inputs.
    """
    fields: dict[str, pa.Field] = {}
    first: dict[str, str] = {}
    present: dict[str, int] = {}
    for path, where in zip(files, inputs, strict=True):
        for f in pq.read_schema(path):
            present[f.name] = present.get(f.name, 0) + 1
            have = fields.get(f.name)
            if have is None:
                fields[f.name], first[f.name] = f, where
                continue
            merged = _merged_type(have.type, f.type) if have.metadata == f.metadata else None
            if merged is None:
                raise DistilleryError(
                    f"column '{f.name}' holds {_describe(have)} in input {first[f.name]} but {_describe(f)} in "
                    f"input {where}; give it one type everywhere, or leave it out with 'keep_fields'"
                )
            fields[f.name] = have.with_type(merged)
    out = [
        fields[name] if present[name] == len(files) else fields[name].with_nullable(True) for name in fields
    ]
    return pa.schema(out)


def conform(batch: pa.RecordBatch, target: pa.Schema) -> pa.RecordBatch:
    """``batch`` with ``target``'s columns, in its order: cast where a type widened, null where absent."""
    names = set(batch.schema.names)
    arrays = [
        batch.column(f.name).cast(f.type) if f.name in names else pa.nulls(batch.num_rows, f.type)
        for f in target
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=target)


def strip_units(
    batch: pa.RecordBatch, keep: np.ndarray, lines: LineDedupConfig, units: set[int], ledger: list[dict]
) -> pa.RecordBatch:
    """Cut the frequent units out of the kept documents; a document left empty is dropped."""
    texts = batch.column("text").to_pylist()
    ids = batch.column("id").to_pylist()
    for row in np.flatnonzero(keep):
        new, count, chars = strip_repeated(texts[row], lines, units)
        if not count:
            continue
        share = round(chars / max(len(texts[row]), 1), 4)
        if new.strip():
            texts[row] = new
            ledger.append({"id": ids[row], "step": "corpus.build.line_dedup", "action": "change", "reason": "repeated_units",
                           "score": share, "detail": json.dumps({"units_removed": count, "chars_removed": chars})})  # fmt: skip
        else:
            keep[row] = False
            ledger.append({"id": ids[row], "step": "corpus.build.line_dedup", "action": "drop", "reason": "all_units_repeated",
                           "score": share, "detail": json.dumps({"units_removed": count})})  # fmt: skip
    return batch.set_column(batch.schema.get_field_index("text"), "text", pa.array(texts, pa.string()))


def filter_task(
    files: list[tuple[str, int]], removed: str, units: str, lines_json: str | None, schema: bytes,
    shard_rows: int, marker: str,
) -> dict[str, Any]:  # fmt: skip
    """Filter task files (``(path, first global row)``, in a worker): drop the removed rows, strip
    repeated lines, write shards."""
    use_returning_memory_pool()
    target = pa.ipc.read_schema(pa.py_buffer(schema))
    lines = LineDedupConfig.model_validate_json(lines_json) if lines_json else None
    frequent = set(np.load(units).tolist()) if lines is not None else set()
    gone = np.load(removed, mmap_mode="r")
    stem = marker.removesuffix(".json")
    chunks = iter(range(1 << 30))
    ledger: list[dict] = []
    with ShardWriter(
        lambda: Path(f"{stem}-{next(chunks):04d}.parquet"), lambda b: conform(b, target), shard_rows
    ) as writer:
        for path, start in files:
            for batch in _row_groups(Path(path)):
                n = batch.num_rows
                keep = np.ones(n, bool)
                lo, hi = np.searchsorted(gone, [start, start + n])
                keep[np.asarray(gone[lo:hi]) - start] = False
                if frequent:
                    batch = strip_units(batch, keep, lines, frequent, ledger)
                kept = batch.filter(pa.array(keep)).drop_columns(
                    [c for c in HIDDEN_COLUMNS if c in batch.schema.names]
                )
                if kept.num_rows:
                    writer.write(kept)
                start += n
    ledger_path = None
    if ledger:
        ledger_path = f"{stem}.ledger.parquet"
        pq.write_table(pa.Table.from_pylist(ledger, schema=LEDGER_SCHEMA), ledger_path)
    result = {"shards": [str(p) for p in writer.paths], "rows": writer.rows, "ledger": ledger_path}
    write_marker(Path(marker), result)  # last: a task without its marker is redone
    return result


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


def global_counts(ledger: Iterable[dict]) -> tuple[Counter, Counter]:
    """Documents removed, and changed, by each global decision (``quality_score``, ``exact_dedup``…)."""
    removed: Counter = Counter()
    changed: Counter = Counter()
    for entry in ledger:
        (removed if entry["action"] == "drop" else changed)[entry["step"].removeprefix("corpus.build.")] += 1
    return removed, changed
