"""Phase 2 of a corpus build: global decisions over the task outputs, then the filter phase.

What needs the whole build is decided here from compact NumPy key arrays (24 bytes a document),
never from Python objects per document: every record id is unique (a 64-bit key, confirmed on
the strings when two keys meet), global cuts (keep the top fraction by a score) find their cutoff,
URL and exact duplicates are dropped with the first seen kept (a 128-bit key of the normalised
text), and so are texts already in a dedup index. Those keys are the hidden columns phase 1
appended (``corpus/document_keys.py``), scattered into hash buckets once and decided one bucket per
task on the executor (``corpus/key_buckets.py``); MinHash near-duplicates are found phase by phase
the same way (``corpus/minhash_phases.py``). The ledger of these decisions is built as Arrow
columns, never as a Python object per removed document.
Then the filter phase: tasks in workers drop the removed rows from consecutive task files, strip
repeated lines, and write finished shards, which the publisher takes in task order.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from corpus.document_keys import HIDDEN_COLUMNS, ID_KEY, KEY128, MINHASH_KEYS, key_values
from corpus.key_buckets import KeyBuckets, consecutive_groups
from corpus.lines import LineDedupConfig, strip_repeated
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
"""Keys per hash bucket of the global decisions (about 24 MB of them): a decision task holds one bucket."""


class Combiner:
    """Decides, then filters. Built from the task outputs listed in task order.

    Global cuts come first (each over the documents that reached it), then URL dedup and exact dedup
    among the documents still kept — so a duplicate never points at a document that was cut. The
    keys are scattered into hash buckets once (``corpus/key_buckets.py``, ``PARTITION_ROWS`` keys
    a bucket) and each decision runs one task per bucket on the executor; what the main process
    keeps between decisions grows only with the number of *removed* documents.
    """

    def __init__(
        self, files: list[Path], task_inputs: list[str], dedup: bool, cuts: list[tuple[str, float, str]],
        work: Path, run: Runner, partition_rows: int | None = None, url_dedup: bool = False,
        lines: LineDedupConfig | None = None, minhash: MinHashConfig | None = None, against: list | None = None,
        workers: int = 1,
    ):  # fmt: skip
        self.files = files
        self.work, self.run = work, run  # the work folder of the phases' outputs; the executor
        self.workers = workers
        self.against = against or []
        self.task_inputs = task_inputs
        counts = [pq.ParquetFile(f).metadata.num_rows for f in files]
        # First, before any global work: inputs whose columns cannot share one schema fail fast.
        self.schema = unified_schema(files, task_inputs)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.n = int(self.offsets[-1])
        kinds = ["id"] + ["url"] * url_dedup + ["text"] * (dedup or bool(self.against)) + ["units"] * (lines is not None)  # fmt: skip
        self.keys = KeyBuckets.plan(files, self.offsets, kinds, partition_rows or PARTITION_ROWS, work, run)
        self.keys.scatter()
        clash = self.keys.duplicate_ids()
        if len(clash):
            self._name_duplicate_id(set(clash.tolist()))
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
            self.keys.first_seen("url", "url", removed) if url_dedup else (none, none)
        )
        removed = np.union1d(removed, self.url_duplicates)
        self.duplicates, self.duplicate_of = (
            self.keys.first_seen("text", "exact", removed) if dedup else (none, none)
        )
        removed = np.union1d(removed, self.duplicates)
        if self.against:
            indexed = np.concatenate([key_values(i.text_keys, KEY128) for i in self.against])
            self.seen, self.seen_of = self.keys.seen_in(indexed, removed)
        else:
            self.seen, self.seen_of = none, none
        removed = np.union1d(removed, self.seen)
        self.near, self.near_of, self.near_similarity = (
            self._near_duplicates(minhash, removed) if minhash is not None else (none, none, np.zeros(0))
        )
        self.lines = lines
        self.frequent_units = (
            self.keys.frequent_units(lines.max_documents) if lines is not None else np.zeros(0, np.uint64)
        )

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
        dropped, kept, similarity = near_duplicates(
            parts, removed + m, cfg, self.work, self.run, self.workers
        )
        new = dropped >= m  # near-duplicates among the indexed documents are not this build's to drop
        dropped, kept, similarity = dropped[new], kept[new], similarity[new]
        return dropped - m, np.where(kept >= m, kept - m, -(kept + 1)), similarity

    def _decisions(self) -> list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None, str, str]]:
        """(rows removed, the row each duplicates, similarity, step, reason) of every global decision."""
        out = [(below, None, None, column, reason) for column, _, reason, below in self.cuts]
        return out + [
            (self.url_duplicates, self.url_duplicate_of, None, "url_dedup", "duplicate_url"),
            (self.duplicates, self.duplicate_of, None, "exact_dedup", "exact_duplicate"),
            (self.seen, self.seen_of, None, "exact_dedup", "seen_in_index"),
            (self.near, self.near_of, self.near_similarity, "minhash_dedup", "near_duplicate"),
        ]

    def _take(self, column: str, rows: np.ndarray) -> pa.Array:
        """Values of ``column`` at ascending global rows, one task file at a time."""
        kind = self.schema.field(column).type
        chunks = [pa.array([], kind)]
        for index, f in enumerate(self.files):
            lo, hi = np.searchsorted(rows, self.offsets[index : index + 2])
            if hi > lo:
                local = pa.array(rows[lo:hi] - self.offsets[index])
                chunks.append(pq.read_table(f, columns=[column]).column(column).take(local).cast(kind))
        return pa.chunked_array(chunks, kind).combine_chunks()

    def _kept_details(self, of: np.ndarray, near: bool, ids_of) -> pa.Array:
        """The JSON ``detail`` of duplicates of the rows ``of``: ``{"duplicate_of": id}``, and for a
        document of a dedup index (``-(k + 1)``) also ``"index": ref``, without the closing brace."""
        own = of >= 0
        # The k-th indexed document; with ``near``, counting only the indexes that hold band keys.
        sizes = [len(i.ids) if not near or i.band_keys is not None else 0 for i in self.against]
        starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        k = -of[~own] - 1
        which = np.searchsorted(starts, k, side="right") - 1
        indexed = [(self.against[w].ids[p], self.against[w].manifest.ref)
                   for w, p in zip(which.tolist(), (k - starts[which]).tolist(), strict=True)]  # fmt: skip
        kept = _merge(own, ids_of(of[own]), pa.array([i for i, _ in indexed], pa.string()))
        refs = json_text(pa.array([r for _, r in indexed], pa.string()))
        index = _merge(
            own, pa.repeat("", int(own.sum())), pc.binary_join_element_wise(', "index": ', refs, "")
        )
        return pc.binary_join_element_wise('{"duplicate_of": ', json_text(kept), index, "")

    def decision_ledger(self) -> pa.Table:
        """Ledger rows of the global decisions (``LEDGER_SCHEMA``), in row order; a duplicate names
        the kept document. Columnar: ids taken from each task file, details joined as strings."""
        decisions = self._decisions()
        named = np.unique(np.concatenate([np.zeros(0, np.int64)] + [r for r, *_ in decisions] +
                                         [of[of >= 0] for _, of, *_ in decisions if of is not None]))  # fmt: skip
        ids = self._take("id", named)

        def ids_of(rows: np.ndarray) -> pa.Array:
            return ids.take(pa.array(np.searchsorted(named, rows)))

        parts: list[tuple[np.ndarray, str, str, pa.Array, pa.Array]] = []  # rows, step, reason, score, detail
        for column, cutoff, reason, below in self.cuts:
            scores = self._take(column, below).cast(pa.float64(), safe=False)
            parts.append(
                (below, column, reason, scores, pa.repeat(json.dumps({"cutoff": cutoff}), len(below)))
            )
        for rows, of, similarity, step, reason in decisions[len(self.cuts) :]:
            detail = self._kept_details(of, similarity is not None, ids_of)
            if similarity is None:
                score, closing = pa.nulls(len(rows), pa.float64()), pa.repeat("}", len(rows))
            else:
                rounded = [round(s, 4) for s in similarity.tolist()]  # Python's rounding, as before
                score = pa.array(rounded, pa.float64())
                closing = pa.array([f', "similarity": {json.dumps(s)}}}' for s in rounded], pa.string())
            parts.append((rows, step, reason, score, pc.binary_join_element_wise(detail, closing, "")))
        rows = np.concatenate([np.zeros(0, np.int64)] + [r for r, *_ in parts])
        order = pa.array(np.argsort(rows, kind="stable"))  # one row is removed by one decision only

        def column(arrays: list[pa.Array], kind: pa.DataType) -> pa.Array:
            return pa.concat_arrays([pa.array([], kind), *arrays]).take(order)

        return pa.Table.from_arrays([
            ids_of(rows).take(order),
            column([pa.repeat(f"corpus.build.{step}", len(r)) for r, step, *_ in parts], pa.string()),
            pa.repeat("drop", len(rows)),
            column([pa.repeat(reason, len(r)) for r, _, reason, *_ in parts], pa.string()),
            column([score for *_, score, _ in parts], pa.float64()),
            column([detail for *_, detail in parts], pa.string()),
        ], schema=LEDGER_SCHEMA)  # fmt: skip

    def publish_rows(self, pub: Publisher, shard_rows: int) -> tuple[int, pa.Table, list[Path]]:
        """The filter phase: consecutive task files' kept rows become shards, written by tasks in
        workers (resumable: a task's marker lists its shards), then taken into ``pub`` in order.

        Returns (rows written, the ledger of the global decisions, line-dedup ledger files).
        """
        ledger = self.decision_ledger()
        folder = self.work / "filter"
        folder.mkdir(parents=True, exist_ok=True)
        removed = np.unique(np.concatenate([np.zeros(0, np.int64)] + [r for r, *_ in self._decisions()]))
        removed_path, units_path = folder / "removed.npy", folder / "units.npy"
        save_array(removed_path, removed)
        save_array(units_path, self.frequent_units)
        schema = (
            pa.schema([f for f in self.schema if f.name not in HIDDEN_COLUMNS])
            if self.files
            else RECORD_SCHEMA
        )
        lines = self.lines.model_dump_json() if len(self.frequent_units) else None
        # consecutive task files of at most shard_rows rows (one file at least): one filter task each,
        # so that small tasks still make full shards
        groups = consecutive_groups(np.diff(self.offsets), shard_rows)
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


def _merge(mask: np.ndarray, where_true: pa.Array, where_false: pa.Array) -> pa.Array:
    """One array of ``len(mask)`` values: ``where_true`` in order where ``mask``, ``where_false`` elsewhere."""
    order = np.concatenate([np.flatnonzero(mask), np.flatnonzero(~mask)])
    return pa.concat_arrays([where_true, where_false]).take(pa.array(np.argsort(order)))


def json_text(values: pa.Array) -> pa.Array:
    """Each string as ``json.dumps`` writes it (quoted, escaped, ASCII only)."""
    # Printable ASCII needs only quotes and backslashes escaped; anything else goes through json.
    plain = pc.match_substring_regex(values, r"^[ -~]*$")
    escaped = pc.replace_substring(pc.replace_substring(values, "\\", "\\\\"), '"', '\\"')
    quoted = pc.binary_join_element_wise('"', escaped, '"', "")
    other = pc.invert(plain)
    if not pc.any(other).as_py():
        return quoted
    return pc.replace_with_mask(
        quoted, other, pa.array([json.dumps(v) for v in values.filter(other).to_pylist()], pa.string())
    )


def write_ledgers(pub: Publisher, task_ledgers: list[Path], extra: pa.Table) -> None:
    """One ledger file per step: task ledgers in task order, then the global decisions."""
    by_step: dict[str, list[pa.Table]] = {}
    for path in task_ledgers:
        table = pq.read_table(path)
        for step in sorted(set(table.column("step").to_pylist())):
            by_step.setdefault(step, []).append(table.filter(pc.equal(table.column("step"), step)))
    steps = pc.unique(extra.column("step")).to_pylist()
    for step in sorted(steps, key=lambda s: (s.endswith("exact_dedup"), s)):
        by_step.setdefault(step, []).append(extra.filter(pc.equal(extra.column("step"), step)))
    for step, tables in by_step.items():
        pub.write_ledger(pa.concat_tables(tables), step=step)


def global_counts(ledger: pa.Table) -> tuple[Counter, Counter]:
    """Documents removed, and changed, by each step of a ledger (``quality_score``, ``exact_dedup``…)."""
    removed: Counter = Counter()
    changed: Counter = Counter()
    drop = pc.equal(ledger.column("action"), "drop")
    for counter, rows in ((removed, drop), (changed, pc.invert(drop))):
        for item in pc.value_counts(ledger.column("step").filter(rows)).to_pylist():
            counter[item["values"].removeprefix("corpus.build.")] += item["counts"]
    return removed, changed
