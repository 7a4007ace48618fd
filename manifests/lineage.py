"""Lineage and audit: the manifest DAG, one record's path back to its source, and dataset diffs.

``trace_record`` answers "where did this training example come from?"::

    demo-sft@1a2b… (synth.generate)  row 7f3c…  parents: [c0ffee…]  teacher: smollm2-135m…
      ← demo-corpus@9d8e… (corpus.build)  row c0ffee…  source: examples/sample/web.jsonl line 42
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from manifests.data import read_shard, unreadable_shard
from manifests.errors import DistilleryError
from manifests.scan import data_schema, scan_rows
from manifests.schema import Manifest
from manifests.store import Store
from manifests.verify import ensure_verified

if TYPE_CHECKING:
    import polars as pl


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


def _fields(schema: pa.Schema) -> list[str]:
    """Columns, with ``source`` as its fields (``source.url``…)."""
    names = []
    for f in schema:
        if f.name == "source" and pa.types.is_struct(f.type):
            names += [f"source.{sub.name}" for sub in f.type]
        else:
            names.append(f.name)
    return names


def _value(schema: pa.Schema, name: str) -> pl.Expr | None:
    """A column, or a field of ``source`` (``source.url``), of rows of ``schema``; None if they have none.
    Integers are compared as int64, floats as float64 and dictionary-encoded columns as their values,
    so that a column whose encoding changed between versions still matches value for value."""
    import polars as pl

    if name in schema.names:
        kind, value = schema.field(name).type, pl.col(name)
    else:
        source = schema.field("source").type if "source" in schema.names else None
        sub = name.removeprefix("source.")
        if source is None or not pa.types.is_struct(source) or sub == name or source.get_field_index(sub) < 0:
            return None
        kind, value = source.field(sub).type, pl.col("source").struct.field(sub)
    if pa.types.is_dictionary(kind):  # a categorical's codes differ between files: compare its values
        kind, value = kind.value_type, value.cast(pl.from_arrow(pa.array([], kind.value_type)).dtype)
    if pa.types.is_integer(kind):
        return value.cast(pl.Int64)
    if pa.types.is_floating(kind):
        return value.cast(pl.Float64)
    return value


def _hash(schema: pa.Schema, names: list[str], seed: int) -> pl.Expr:
    """A 64-bit hash of the values of ``names`` in a row. A null and a column the rows lack hash alike:
    both are "no value" (a column that only the other version has is null in this one)."""
    import polars as pl

    parts = []
    for name in names:
        value, none = _value(schema, name), pl.lit(0, pl.UInt64)
        parts.append(
            none if value is None else pl.when(value.is_null()).then(none).otherwise(value.hash(seed))
        )
    return parts[0] if len(parts) == 1 else pl.struct(p.alias(str(i)) for i, p in enumerate(parts)).hash(seed)


def _row_keys(
    manifest: Manifest, schema: pa.Schema | None, content: list[str], meta: list[str]
) -> pl.DataFrame:
    """Per row: its position in the dataset (``i``), a 128-bit hash of its content (``c0``, ``c1``), a
    32-bit hash of each metadata field (``m0``…) and a hash of its position in its source (``p``).

    polars computes them over one streaming scan and keeps only the hashes (about 36 bytes a row and 4
    a metadata field): no text, nor any value as a Python object. They are polars' hashes, the same for
    equal values within one process, which hashes both versions.
    """
    import polars as pl

    schema = schema if schema is not None else pa.schema([])
    keys = [
        *(_hash(schema, content, seed).alias(f"c{seed - 1}") for seed in (1, 2)),
        *(
            _hash(schema, [name], 3).floordiv(1 << 32).cast(pl.UInt32).alias(f"m{i}")
            for i, name in enumerate(meta)
        ),
        _hash(schema, [f"source.{p}" for p in _POSITION], 4).alias("p"),
    ]
    used = [*content, *meta, "source"]
    rows = scan_rows(manifest, schema, used).select(keys)
    return rows.with_row_index("i").collect(engine="streaming")


def diff(old: Manifest, new: Manifest) -> DatasetDiff:
    """Rows added, removed, moved and changed (by content, see ``DatasetDiff``), and the recipe and
    stats differences between two datasets."""
    for m in (old, new):
        if m.kind != "dataset":
            raise DistilleryError(f"diff compares datasets; {m.ref} is a {m.kind}")
        ensure_verified(m)
    schemas = [data_schema(m) for m in (old, new)]
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
    before, after = (_row_keys(m, s, content, meta) for m, s in zip((old, new), schemas, strict=True))
    kept, matched = _match(before, after, meta)
    examples = matched.examples[:_EXAMPLES]
    old_ids = _ids(old, [i for _, i, _ in examples])
    new_ids = _ids(new, [j for j, _, _ in examples])
    return DatasetDiff(
        old=old,
        new=new,
        added=after.height - kept,
        removed=before.height - kept,
        kept=kept,
        recipe_changes=_changes(old.producer.recipe, new.producer.recipe),
        stats_changes=_changes(old.stats, new.stats),
        moved=matched.moved,
        changed=matched.changed,
        content=content,
        changed_fields=matched.changed_fields,
        examples=[(old_ids[i], new_ids[j], differ) for j, i, differ in examples],
    )


@dataclass
class _Matched:
    kept: int = 0
    changed: int = 0
    moved: int = 0
    changed_fields: dict[str, int] = field(default_factory=dict)
    examples: list[tuple[int, int, list[str]]] = field(default_factory=list)
    """The first changed rows: (new row's position, old row's position, the fields that differ)."""

    def add(self, more: _Matched) -> None:
        self.changed, self.moved = self.changed + more.changed, self.moved + more.moved
        for name, n in more.changed_fields.items():
            self.changed_fields[name] = self.changed_fields.get(name, 0) + n
        self.examples = sorted(self.examples + more.examples)[:_EXAMPLES]


def _match(before: pl.DataFrame, after: pl.DataFrame, meta: list[str]) -> tuple[int, _Matched]:
    """How many rows are kept (content both versions have), and which of them moved or changed."""
    import polars as pl

    old, new = before.lazy(), after.lazy()
    one, zero = pl.lit(1, pl.UInt32), pl.lit(0, pl.UInt32)
    sides = pl.concat([old.select("c0", "c1", old=one, new=zero), new.select("c0", "c1", old=zero, new=one)])
    # Grouped by the first half of the content hash alone (a single-column key is far lighter for
    # polars than two); a group whose second halves differ (two contents, one first half) is matched
    # with the repeated ones, on the whole hash.
    groups = sides.group_by("c0").agg(
        pl.col("old").sum(), pl.col("new").sum(), one_content=pl.col("c1").min() == pl.col("c1").max()
    )
    groups = groups.filter((pl.col("old") > 0) & (pl.col("new") > 0)).collect(engine="streaming")
    # Content one row of each version has (nearly all rows): those two are a pair. polars counts the
    # pairs as they stream by; only the first changed ones come back as rows.
    is_pair = (pl.col("old") == 1) & (pl.col("new") == 1) & pl.col("one_content")
    kept = groups.filter(is_pair).height
    fields = [f"m{i}" for i in range(len(meta))]
    differs = [(pl.col(f) != pl.col(f"{f}_new")).alias(f) for f in fields]
    pairs = old.join(groups.lazy().filter(is_pair).select("c0"), on="c0").join(new, on="c0", suffix="_new")
    pairs = pairs.with_columns(changed=pl.any_horizontal(differs) if differs else pl.lit(False))
    moved = ~pl.col("changed") & (pl.col("p") != pl.col("p_new"))
    totals = pairs.select(pl.col("changed").sum(), moved.sum().alias("moved"), *(d.sum() for d in differs))
    counts = totals.collect(engine="streaming").row(0, named=True)
    out = _Matched(changed=int(counts["changed"] or 0), moved=int(counts["moved"] or 0))
    out.changed_fields = {name: int(counts[f]) for name, f in zip(meta, fields, strict=True) if counts[f]}
    first = pairs.filter(pl.col("changed")).sort("i_new").head(_EXAMPLES).collect(engine="streaming")
    for row in first.iter_rows(named=True):
        differ = [name for name, f in zip(meta, fields, strict=True) if row[f] != row[f"{f}_new"]]
        out.examples.append((row["i_new"], row["i"], differ))
    # Content several rows share (in either version): matched in order, in Python, as few as they are.
    others = groups.lazy().filter(~is_pair).select("c0")
    rows = [side.join(others, on="c0").sort("i").collect(engine="streaming") for side in (old, new)]
    if rows[1].height:
        more = _match_repeated(rows[0], rows[1], meta)
        kept += more.kept
        out.add(more)
    return kept, out


def _match_repeated(before: pl.DataFrame, after: pl.DataFrame, meta: list[str]) -> _Matched:
    """Each new row, in order, takes the first old row of its content (the whole hash) with the same
    metadata and position, else the first with the same metadata (moved), else the first (changed)."""
    fields = [f"m{i}" for i in range(len(meta))]
    pool: dict[tuple, list[tuple[int, tuple, int]]] = {}
    for row in before.iter_rows(named=True):
        pool.setdefault((row["c0"], row["c1"]), []).append(
            (row["i"], tuple(row[f] for f in fields), row["p"])
        )
    out = _Matched()
    for row in after.iter_rows(named=True):
        candidates = pool.get((row["c0"], row["c1"]))
        if not candidates:
            continue  # added
        m, p = tuple(row[f] for f in fields), row["p"]
        pick = next((i for i, (_, om, op) in enumerate(candidates) if om == m and op == p), None)
        if pick is None:
            pick = next((i for i, (_, om, _) in enumerate(candidates) if om == m), 0)
        old_row, om, op = candidates.pop(pick)
        out.kept += 1
        if om != m:
            out.changed += 1
            differ = [meta[i] for i in range(len(meta)) if om[i] != m[i]]
            for name in differ:
                out.changed_fields[name] = out.changed_fields.get(name, 0) + 1
            if len(out.examples) < _EXAMPLES:
                out.examples.append((row["i"], old_row, differ))
        elif op != p:
            out.moved += 1
    return out


def _ids(manifest: Manifest, rows: list[int]) -> dict[int, str | None]:
    """The ``id`` of the rows at these positions of a dataset (one pass over its ``id`` column)."""
    import polars as pl

    schema = data_schema(manifest)
    if not rows or schema is None or "id" not in schema.names:
        return dict.fromkeys(rows)
    found = scan_rows(manifest, schema, ["id"]).select(pl.col("id").cast(pl.String)).with_row_index("i")
    return dict(found.filter(pl.col("i").is_in(rows)).collect(engine="streaming").iter_rows())


def short(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"
