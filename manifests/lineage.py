"""Lineage and audit: the manifest DAG, one record's path back to its source, and dataset diffs.

``trace_record`` answers "where did this training example come from?"::

    demo-sft@1a2b… (synth.generate)  row 7f3c…  parents: [c0ffee…]  teacher: smollm2-135m…
      ← demo-corpus@9d8e… (corpus.build)  row c0ffee…  source: examples/sample/web.jsonl line 42
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from manifests.data import read_shard, shard_batches, unreadable_shard
from manifests.errors import DistilleryError
from manifests.hashing import canonical_json
from manifests.schema import Manifest
from manifests.store import Store
from manifests.verify import ensure_verified


@dataclass
class LineageNode:
    manifest: Manifest | None
    """None when the parent named by id is missing from the store."""
    role: str
    parents: list[LineageNode] = field(default_factory=list)
    repeated: bool = False
    """Already shown elsewhere in the DAG (its parents are not listed again)."""
    missing: str | None = None
    """``name@id`` of a parent that is not in the store."""


def lineage(
    store: Store, manifest: Manifest, role: str = "output", _seen: set[str] | None = None
) -> LineageNode:
    """The manifest DAG from ``manifest`` back to its sources (parents resolved by id)."""
    seen = _seen if _seen is not None else set()
    node = LineageNode(manifest, role)
    if manifest.id in seen:
        node.repeated = True
        return node
    seen.add(manifest.id)
    for parent in manifest.parents:
        try:
            pm = store.get(parent.id)
        except DistilleryError:
            node.parents.append(
                LineageNode(None, parent.role, missing=f"{parent.kind} {parent.name}@{parent.id[:12]}")
            )
            continue
        node.parents.append(lineage(store, pm, parent.role, seen))
    return node


def _find_rows(manifest: Manifest, record_id: str) -> list[dict[str, Any]]:
    ensure_verified(manifest)
    rows: list[dict[str, Any]] = []
    for f in manifest.data_files():
        path = manifest.location / f.path
        try:
            schema = pq.read_schema(path)
        except (pa.ArrowException, OSError) as e:
            raise unreadable_shard(path, e, manifest.ref) from None
        if "id" not in schema.names:
            return []
        ids = read_shard(path, ["id"], manifest.ref).column("id")
        mask = pc.equal(ids, record_id)
        if pc.any(mask).as_py():
            table = read_shard(path, ref=manifest.ref).filter(mask)
            for row in table.to_pylist():
                row["_split"] = f.split
                rows.append(row)
    return rows


def _ledger_entries(manifest: Manifest, record_id: str) -> list[dict[str, Any]]:
    ensure_verified(manifest)
    entries: list[dict[str, Any]] = []
    for f in manifest.ledger:
        table = read_shard(manifest.location / f.path, ref=manifest.ref)
        entries += table.filter(pc.equal(table.column("id"), record_id)).to_pylist()
    return entries


@dataclass
class TraceStep:
    manifest: Manifest | None
    """None when no dataset in the store holds the parent record (a parent dataset is missing)."""
    record_id: str
    row: dict[str, Any] | None
    ledger: list[dict[str, Any]]
    parents: list[TraceStep] = field(default_factory=list)

    @property
    def source(self) -> dict[str, Any] | None:
        return (self.row or {}).get("source")


def _trace_in(store: Store, manifest: Manifest, record_id: str, depth: int) -> TraceStep:
    rows = _find_rows(manifest, record_id)
    step = TraceStep(manifest, record_id, rows[0] if rows else None, _ledger_entries(manifest, record_id))
    parent_ids = list((step.row or {}).get("parents") or [])
    if depth > 64 or not parent_ids:
        return step
    parent_manifests = []
    for ref in manifest.parents:
        if ref.kind == "dataset":
            try:
                parent_manifests.append(store.get(ref.id))
            except DistilleryError:
                continue
    for pid in parent_ids:
        for pm in parent_manifests:
            found = _trace_in(store, pm, pid, depth + 1)
            if found.row is not None or found.ledger:
                step.parents.append(found)
                break
        else:
            step.parents.append(TraceStep(None, pid, None, []))
    return step


def trace_record(store: Store, record_id: str, ref: str | None = None) -> TraceStep:
    """Follow one record through ``parents`` and ledgers back to its source.

    Searches ``ref`` when given, else every dataset, then every eval's per-sample records, in the
    store (newest first) for the record.
    """
    if ref:
        candidates = [store.resolve(ref)]
        if candidates[0].kind == "run":
            raise DistilleryError(f"--in {ref}: a run has no records; give a dataset or an eval")
    else:
        candidates = [*reversed(store.list(kind="dataset")), *reversed(store.list(kind="eval"))]
    for manifest in candidates:
        found = _trace_in(store, manifest, record_id, 0)
        if found.row is not None:
            return found
    for manifest in candidates:
        found = _trace_in(store, manifest, record_id, 0)
        if found.ledger:
            return found
    raise DistilleryError(f"no record with id '{record_id}' in any dataset or eval of {store.root}")


def describe_source(source: dict[str, Any] | None) -> str:
    if not source:
        return "(no source pointer)"
    parts = [str(source.get("uri"))]
    if source.get("line") is not None:
        parts.append(f"line {source['line']}")
    if source.get("row") is not None:
        parts.append(f"row {source['row']}")
    if source.get("offset") is not None:
        parts.append(f"offset {source['offset']}")
    if source.get("url"):
        parts.append(f"url {source['url']}")
    return " ".join(parts)


@dataclass
class DatasetDiff:
    """Two versions of a dataset compared row by row, by content rather than by record id (an id
    includes where a row came from, so a line moved in an input would otherwise be a new row).

    A row of ``new`` whose content (``CONTENT_COLUMNS``) a row of ``old`` has is *kept*: unchanged,
    *moved* (only its position in its source changed) or *changed* (any other column, or a field of
    ``source`` such as ``url``, differs; ``changed_fields`` counts which). Other rows are added or
    removed.
    """

    old: Manifest
    new: Manifest
    added: int
    removed: int
    kept: int
    recipe_changes: list[tuple[str, Any, Any]]
    stats_changes: list[tuple[str, Any, Any]]
    moved: int = 0
    changed: int = 0
    content: list[str] = field(default_factory=list)
    """The columns compared as content."""
    changed_fields: dict[str, int] = field(default_factory=dict)
    examples: list[tuple[str, str, list[str]]] = field(default_factory=list)
    """Up to ``_EXAMPLES`` changed rows: (old id, new id, the fields that differ)."""

    @property
    def unchanged(self) -> int:
        return self.kept - self.moved - self.changed


CONTENT_COLUMNS = ("text", "messages", "prompt", "input_ids")
"""What a row *is*, in order of preference; a dataset with none of them is compared on every column
but the record model's (``id``, ``parents``, ``source``)."""
_RECORD_MODEL = ("id", "parents")
_POSITION = ("line", "row", "offset")
"""Where in its source a row is. The source file's hash (``source.sha256``) is not compared at all:
any line added to a file changes it for every row."""
_EXAMPLES = 3


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _changes(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    a, b = _flatten(old), _flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _hash(value: Any, size: int = 8) -> bytes:
    data = value.encode() if isinstance(value, str) else canonical_json(value).encode()
    return hashlib.blake2b(data, digest_size=size).digest()


def _fields(schema: pa.Schema) -> list[str]:
    """Columns, with ``source`` as its fields (``source.url``…)."""
    names = []
    for f in schema:
        if f.name == "source" and pa.types.is_struct(f.type):
            names += [f"source.{sub.name}" for sub in f.type]
        else:
            names.append(f.name)
    return names


def _row_keys(manifest: Manifest, content: list[str], meta: list[str]):
    """(id, content hash, metadata hashes, position hash) per row, reading one batch at a time: only
    hashes are kept, never the texts."""
    for f in manifest.data_files():
        for batch in shard_batches(manifest.location / f.path, manifest.ref):
            for row in batch.to_pylist():
                source = row.get("source") if isinstance(row.get("source"), dict) else {}
                flat = {**row, **{f"source.{k}": v for k, v in source.items()}}
                yield (
                    row.get("id"),
                    _hash([row.get(c) for c in content], 16),
                    b"".join(_hash(flat.get(m), 4) for m in meta),
                    _hash([source.get(p) for p in _POSITION]),
                )


def diff(old: Manifest, new: Manifest) -> DatasetDiff:
    """Rows added, removed, moved and changed (by content, see ``DatasetDiff``), and the recipe and
    stats differences between two datasets."""
    for m in (old, new):
        if m.kind != "dataset":
            raise DistilleryError(f"diff compares datasets; {m.ref} is a {m.kind}")
        ensure_verified(m)
    schemas = [_schema(m) for m in (old, new)]
    names = [set(s.names) if s is not None else set() for s in schemas]
    both = names[0] & names[1]
    content = next(([c] for c in CONTENT_COLUMNS if c in both), None) or sorted(
        (names[0] | names[1]) - {*_RECORD_MODEL, "source"}
    )
    # Compared as metadata: every other column and source field but the record model's and the position.
    skip = {*_RECORD_MODEL, *content, "source", *(f"source.{p}" for p in (*_POSITION, "sha256"))}
    meta = [
        f for f in dict.fromkeys(f for s in schemas if s is not None for f in _fields(s)) if f not in skip
    ]
    # Old rows by content hash; each new row takes the closest of them: same metadata and position,
    # else same metadata (moved), else any (changed). Held in memory: hashes, ~60 bytes a row.
    pool: dict[bytes, list[tuple[str, bytes, bytes]]] = {}
    removed_total = 0
    for id_, c, m, p in _row_keys(old, content, meta):
        pool.setdefault(c, []).append((id_, m, p))
        removed_total += 1
    added = moved = changed = kept = 0
    changed_fields: dict[str, int] = {}
    examples: list[tuple[str, str, list[str]]] = []
    for id_, c, m, p in _row_keys(new, content, meta):
        candidates = pool.get(c)
        if not candidates:
            added += 1
            continue
        pick = next((i for i, (_, om, op) in enumerate(candidates) if om == m and op == p), None)
        if pick is None:
            pick = next((i for i, (_, om, _) in enumerate(candidates) if om == m), 0)
        old_id, om, op = candidates.pop(pick)
        if not candidates:
            del pool[c]
        kept += 1
        if om != m:
            changed += 1
            differ = [meta[i] for i in range(len(meta)) if om[4 * i : 4 * i + 4] != m[4 * i : 4 * i + 4]]
            for name in differ:
                changed_fields[name] = changed_fields.get(name, 0) + 1
            if len(examples) < _EXAMPLES:
                examples.append((old_id, id_, differ))
        elif op != p:
            moved += 1
    return DatasetDiff(
        old=old,
        new=new,
        added=added,
        removed=removed_total - kept,
        kept=kept,
        recipe_changes=_changes(old.producer.recipe, new.producer.recipe),
        stats_changes=_changes(old.stats, new.stats),
        moved=moved,
        changed=changed,
        content=content,
        changed_fields=changed_fields,
        examples=examples,
    )


def _schema(manifest: Manifest) -> pa.Schema | None:
    files = manifest.data_files()
    return pq.read_schema(manifest.location / files[0].path) if files else None


def short(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"
