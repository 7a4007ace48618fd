"""Lineage and audit: the manifest DAG, one record's path back to its source, and dataset diffs.

``trace_record`` answers "where did this training example come from?"::

    demo-sft@1a2b… (synth.generate)  row 7f3c…  parents: [c0ffee…]  teacher: smollm2-135m…
      ← demo-corpus@9d8e… (corpus.build)  row c0ffee…  source: examples/sample/web.jsonl line 42
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from manifests.errors import DistilleryError
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
        schema = pq.read_schema(path)
        if "id" not in schema.names:
            return []
        ids = pq.read_table(path, columns=["id"]).column("id")
        mask = pc.equal(ids, record_id)
        if pc.any(mask).as_py():
            table = pq.read_table(path).filter(mask)
            for row in table.to_pylist():
                row["_split"] = f.split
                rows.append(row)
    return rows


def _ledger_entries(manifest: Manifest, record_id: str) -> list[dict[str, Any]]:
    ensure_verified(manifest)
    entries: list[dict[str, Any]] = []
    for f in manifest.ledger:
        table = pq.read_table(manifest.location / f.path)
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

    Searches ``ref`` when given, else every dataset in the store (newest first) for the record.
    """
    candidates = [store.resolve(ref, kind="dataset")] if ref else list(reversed(store.list(kind="dataset")))
    for manifest in candidates:
        found = _trace_in(store, manifest, record_id, 0)
        if found.row is not None:
            return found
    for manifest in candidates:
        found = _trace_in(store, manifest, record_id, 0)
        if found.ledger:
            return found
    raise DistilleryError(f"no record with id '{record_id}' in any dataset of {store.root}")


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
    old: Manifest
    new: Manifest
    added: int
    removed: int
    kept: int
    recipe_changes: list[tuple[str, Any, Any]]
    stats_changes: list[tuple[str, Any, Any]]


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


def _ids(manifest: Manifest) -> pa.Array:
    ensure_verified(manifest)
    tables = [pq.read_table(manifest.location / f.path, columns=["id"]) for f in manifest.data_files()]
    return pa.concat_tables(tables).column("id").combine_chunks() if tables else pa.array([], pa.string())


def diff(old: Manifest, new: Manifest) -> DatasetDiff:
    """Rows added and removed (by record id) and recipe/stat differences between two datasets."""
    for m in (old, new):
        if m.kind != "dataset":
            raise DistilleryError(f"diff compares datasets; {m.ref} is a {m.kind}")
    old_ids, new_ids = _ids(old), _ids(new)
    kept = pc.sum(pc.is_in(new_ids, value_set=old_ids)).as_py() or 0
    return DatasetDiff(
        old=old,
        new=new,
        added=len(new_ids) - kept,
        removed=len(old_ids) - (pc.sum(pc.is_in(old_ids, value_set=new_ids)).as_py() or 0),
        kept=kept,
        recipe_changes=_changes(old.producer.recipe, new.producer.recipe),
        stats_changes=_changes(old.stats, new.stats),
    )


def short(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"
