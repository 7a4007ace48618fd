"""A build's document keys in hash buckets, scattered once: each global decision reads one bucket.

Unique ids, URL dedup, exact dedup, dedup against indexes and line dedup's frequent units all
compare hashed keys (``corpus/document_keys.py``, ``corpus/lines.py``): equal keys must meet in one
process, but the whole build's keys need not. So, as tasks on the build's executor, with their
outputs under ``<work>/keys-<bucket_rows>/``, each written last and atomically::

    scatter   one task per run of consecutive task files of about ``bucket_rows`` keys (one file at
              least; a small build's all in one task, which the local executor runs in the main
              process, sparing a pool of workers): each file's key columns read once; per kind of
              key, its entries ordered by bucket (key mod buckets), with the global row of each
                  -> scatter-00003.url.npy, scatter-00003.text.npy, ... scatter-00003.counts.npz
    decide    one task per bucket and decision: that bucket's slice of every scatter output
              (memory-mapped), rows ascending, so the first of equal keys is the first seen
                  -> ids-00007.npy  url-00007.npy  exact-00007.npy  seen-00007.npy  units-00007.npy

A decision's output is a file per bucket, skipped when present: a killed build resumes. The number
of buckets grows with the build so that a bucket stays near ``bucket_rows`` keys; the decisions
never depend on it, nor on the number of workers (rows are numbered globally, in task order).

    kind    column        entry                   bucket by
    id      _id_key       key                     key
    url     _url_key      key, row (no URL: none) key
    text    _dedup_key    hi, lo, row             hi
    units   _unit_keys    key (one per document)  key, over its own bucket count
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from corpus.document_keys import DEDUP_KEY, ID_KEY, KEY128, URL_KEY, key_values
from corpus.lines import UNIT_KEYS
from corpus.minhash_phases import Runner
from corpus.task_markers import save_array, write_atomically

KEY64 = np.dtype("<u8")
ROW64 = np.dtype([("key", "<u8"), ("row", "<i8")])
ROW128 = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("row", "<i8")])
COLUMNS = {"id": ID_KEY, "url": URL_KEY, "text": DEDUP_KEY, "units": UNIT_KEYS}
ENTRIES = {"id": KEY64, "url": ROW64, "text": ROW128, "units": KEY64}

Slice = tuple[str, int, int]
"""``(path of a bucket-ordered .npy, first entry, end)``: one bucket's entries from one file."""


def read_key_columns(path: str, columns: list[str]) -> pa.Table:
    """The key columns of one task file: the global decisions read each file's keys here, once."""
    return pq.read_table(path, columns=columns)


def _entries(kind: str, column: pa.ChunkedArray, first_row: int) -> tuple[np.ndarray, np.ndarray]:
    """(entries of one kind of key, the value each is bucketed by)."""
    if kind == "units":
        keys = pc.list_flatten(column).to_numpy().astype(KEY64)
        return keys, keys
    if kind == "id":
        keys = key_values(column, np.dtype(">u8")).astype(KEY64)
        return keys, keys
    rows = np.arange(first_row, first_row + len(column), dtype=np.int64)
    if kind == "url":
        keys = key_values(column, np.dtype(">u8"))
        real = keys != 0  # no URL: nothing to compare
        entries = np.empty(int(real.sum()), ROW64)
        entries["key"], entries["row"] = keys[real], rows[real]
        return entries, entries["key"]
    keys = key_values(column, KEY128)
    entries = np.empty(len(keys), ROW128)
    entries["hi"], entries["lo"], entries["row"] = keys["hi"], keys["lo"], rows
    return entries, entries["hi"]


def _by_bucket(entries: np.ndarray, keys: np.ndarray, buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """``entries`` ordered by bucket, rows ascending within each, and the count of every bucket."""
    # Bucket numbers as 16-bit integers where they fit: NumPy's stable sort is then a radix sort.
    bucket = (keys % np.uint64(buckets)).astype(np.uint16 if buckets <= 1 << 16 else np.int64)
    return entries[np.argsort(bucket, kind="stable")], np.bincount(bucket, minlength=buckets)


def scatter_task(files: list[tuple[str, int]], kinds: dict[str, int], stem: str) -> dict[str, Any]:
    """The keys of consecutive task files (``(path, first global row)``) into bucket-ordered files,
    one per kind of key (``kinds``: kind -> bucket count)."""
    found: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {kind: [] for kind in kinds}
    rows = 0
    for path, first_row in files:
        table = read_key_columns(path, [COLUMNS[k] for k in kinds])
        rows += table.num_rows
        for kind in kinds:
            found[kind].append(_entries(kind, table.column(COLUMNS[kind]), first_row))
        del table
    counts = {}
    for kind, buckets in kinds.items():
        entries = np.concatenate([e for e, _ in found[kind]])
        entries, counts[kind] = _by_bucket(entries, np.concatenate([b for _, b in found[kind]]), buckets)
        save_array(Path(f"{stem}.{kind}.npy"), entries)
        del found[kind]
    write_atomically(Path(f"{stem}.counts.npz"), lambda f: np.savez(f, **counts))  # last: the marker
    return {"rows": rows}


def _load(slices: list[Slice], dtype: np.dtype) -> np.ndarray:
    """One bucket's entries from every file, in file order (so in row order)."""
    parts = [np.load(path, mmap_mode="r")[lo:hi] for path, lo, hi in slices]
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def _alive(rows: np.ndarray, removed: str) -> np.ndarray:
    """Which ``rows`` are not among the ascending rows saved at ``removed``."""
    gone = np.load(removed, mmap_mode="r")
    if not len(gone):
        return np.ones(len(rows), bool)
    at = np.minimum(np.searchsorted(gone, rows), len(gone) - 1)
    return np.asarray(gone[at]) != rows


def first_equal(entries: np.ndarray) -> np.ndarray:
    """For each entry, the position of the first entry with an equal key (every field but ``row``)."""
    keys = [entries[name] for name in entries.dtype.names or () if name != "row"] or [entries]
    # Stable sorts: among equal keys the earlier position comes first.
    order = np.lexsort(keys[::-1]) if len(keys) > 1 else np.argsort(keys[0], kind="stable")
    same = np.ones(max(len(order) - 1, 0), bool)  # each sorted entry's key equals the one before
    for key in keys:
        ordered = key[order]
        same &= ordered[1:] == ordered[:-1]
    starts = np.concatenate([[True], ~same]) if len(order) else np.zeros(0, bool)
    first = np.empty(len(order), np.int64)
    first[order] = order[starts][np.cumsum(starts) - 1]
    return first


def unique_ids_task(slices: list[Slice], out: str) -> dict[str, Any]:
    """The id keys found more than once in one bucket."""
    values, counts = np.unique(_load(slices, KEY64), return_counts=True)
    save_array(Path(out), values[counts > 1])
    return {}


def first_seen_task(slices: list[Slice], kind: str, removed: str, out: str) -> dict[str, Any]:
    """One bucket's rows that repeat the key of an earlier row still kept: ``[rows, first rows]``."""
    entries = _load(slices, ENTRIES[kind])
    entries = entries[_alive(entries["row"], removed)]
    first = first_equal(entries)
    dup = first != np.arange(len(entries))
    save_array(Path(out), np.stack([entries["row"][dup], entries["row"][first[dup]]]))
    return {}


def seen_task(slices: list[Slice], indexed: Slice, removed: str, out: str) -> dict[str, Any]:
    """One bucket's rows still kept whose text key is in a dedup index: ``[rows, -(k + 1)]`` for the
    ``k``-th indexed document (the first with that key)."""
    new = _load(slices, ROW128)
    new = new[_alive(new["row"], removed)]
    old = _load([indexed], ROW128)
    first = first_equal(np.concatenate([old, new]))[len(old) :]
    hit = first < len(old)
    save_array(Path(out), np.stack([new["row"][hit], -(old["row"][first[hit]] + 1)]))
    return {}


def frequent_units_task(slices: list[Slice], max_documents: int, out: str) -> dict[str, Any]:
    """One bucket's unit keys found in more than ``max_documents`` documents."""
    values, counts = np.unique(_load(slices, KEY64), return_counts=True)
    save_array(Path(out), values[counts > max_documents])
    return {}


def _unit_values(path: Path) -> int:
    """Unit keys in a task file, from its footer alone (an empty list counts one: a bound)."""
    meta = pq.ParquetFile(path).metadata
    return sum(
        meta.row_group(g).column(c).num_values
        for g in range(meta.num_row_groups)
        for c in range(meta.num_columns)
        if meta.row_group(g).column(c).path_in_schema.startswith(UNIT_KEYS + ".")
    )


@dataclass
class KeyBuckets:
    """The keys of a build's task files, scattered into buckets (``scatter``), and the global
    decisions over them, one task per bucket."""

    files: list[Path]
    offsets: np.ndarray
    """The global row of each file's first row, and the total last."""
    folder: Path
    run: Runner
    kinds: dict[str, int]
    """Kind of key -> bucket count."""
    groups: list[list[int]]
    """The task files each scatter task reads (consecutive)."""
    _stems: list[str] = field(default_factory=list)
    _starts: dict[str, np.ndarray] = field(default_factory=dict)
    """Per kind, where each bucket starts in each scatter task's file (tasks x buckets + 1)."""

    @classmethod
    def plan(
        cls,
        files: list[Path],
        offsets: np.ndarray,
        kinds: list[str],
        bucket_rows: int,
        work: Path,
        run: Runner,
    ) -> KeyBuckets:
        rows = np.diff(offsets)
        units = np.array([_unit_values(f) if "units" in kinds else 0 for f in files], np.int64)
        buckets = max(1, math.ceil(int(rows.sum()) / bucket_rows))
        unit_buckets = max(1, math.ceil(int(units.sum()) / bucket_rows))
        kinds_buckets = {k: unit_buckets if k == "units" else buckets for k in kinds}
        groups = consecutive_groups(np.maximum(rows, units), bucket_rows)
        folder = work / f"keys-{bucket_rows}"  # the same buckets and groups on every run of this plan
        return cls(files, offsets, folder, run, kinds_buckets, groups)

    def scatter(self) -> None:
        """Scatter every task file's keys (resumable: a scatter task's counts are its marker)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        stems = [str(self.folder / f"scatter-{k:05d}") for k in range(len(self.groups))]
        jobs = [
            ([(str(self.files[i]), int(self.offsets[i])) for i in group], self.kinds, stem)
            for group, stem in zip(self.groups, stems, strict=True)
            if not Path(stem + ".counts.npz").is_file()
        ]
        list(self.run("global keys", scatter_task, jobs))
        self._stems = stems
        self._starts = {kind: np.zeros((len(stems), n + 1), np.int64) for kind, n in self.kinds.items()}
        for k, stem in enumerate(stems):
            with np.load(stem + ".counts.npz") as counts:
                for kind in self.kinds:
                    self._starts[kind][k, 1:] = np.cumsum(counts[kind])

    def _slices(self, kind: str, bucket: int) -> list[Slice]:
        starts = self._starts[kind]
        return [(f"{stem}.{kind}.npy", int(starts[k, bucket]), int(starts[k, bucket + 1]))
                for k, stem in enumerate(self._stems) if starts[k, bucket + 1] > starts[k, bucket]]  # fmt: skip

    def _decide(self, label: str, name: str, kind: str, task, *args) -> list[np.ndarray]:
        """Run ``task(slices, *args, out)`` for every bucket without its output; the outputs, in order."""
        outs = [self.folder / f"{name}-{b:05d}.npy" for b in range(self.kinds[kind])]
        jobs = [(self._slices(kind, b), *args, str(out)) for b, out in enumerate(outs) if not out.is_file()]
        list(self.run(label, task, jobs))
        return [np.load(out) for out in outs]

    def _removed(self, name: str, removed: np.ndarray) -> str:
        path = self.folder / f"removed-{name}.npy"
        save_array(path, np.asarray(removed, np.int64))  # the same on every run of this plan
        return str(path)

    def duplicate_ids(self) -> np.ndarray:
        """Id keys found more than once in the build."""
        return np.concatenate(self._decide("unique ids", "ids", "id", unique_ids_task))

    def first_seen(self, kind: str, name: str, removed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows whose key an earlier row still kept has, that first row), by row; rows in ``removed``
        (ascending) take no part."""
        found = self._decide(f"{name} dedup", name, kind, first_seen_task, kind, self._removed(name, removed))
        return _by_row(found)

    def seen_in(self, indexed: np.ndarray, removed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows still kept whose text key is among ``indexed`` (``KEY128``), ``-(k + 1)`` for the
        first such ``k``-th indexed key), by row."""
        path, counts = self.folder / "indexed.npy", self.folder / "indexed.counts.npy"
        if not counts.is_file():
            entries = np.empty(len(indexed), ROW128)
            entries["hi"], entries["lo"] = indexed["hi"], indexed["lo"]
            entries["row"] = np.arange(len(indexed))
            entries, per_bucket = _by_bucket(entries, entries["hi"], self.kinds["text"])
            save_array(path, entries)
            save_array(counts, per_bucket)  # last: the marker
        starts = np.concatenate([[0], np.cumsum(np.load(counts))])
        outs = [self.folder / f"seen-{b:05d}.npy" for b in range(self.kinds["text"])]
        gone = self._removed("seen", removed)
        jobs = [(self._slices("text", b), (str(path), int(starts[b]), int(starts[b + 1])), gone, str(out))
                for b, out in enumerate(outs) if not out.is_file()]  # fmt: skip
        list(self.run("seen in index", seen_task, jobs))
        return _by_row([np.load(out) for out in outs])

    def frequent_units(self, max_documents: int) -> np.ndarray:
        """Unit keys found in more than ``max_documents`` documents, ascending."""
        found = self._decide("frequent units", "units", "units", frequent_units_task, max_documents)
        return np.sort(np.concatenate(found))


def consecutive_groups(weights: np.ndarray, limit: int) -> list[list[int]]:
    """Consecutive indexes whose weights add up to at most ``limit`` together (one at least each)."""
    groups: list[list[int]] = []
    total = limit
    for index, weight in enumerate(weights.tolist()):
        if total + weight > limit:
            groups.append([])
            total = 0
        groups[-1].append(index)
        total += weight
    return groups


def _by_row(found: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    pairs = np.concatenate([np.zeros((2, 0), np.int64), *found], axis=1)
    order = np.argsort(pairs[0], kind="stable")
    return pairs[0][order], pairs[1][order]
