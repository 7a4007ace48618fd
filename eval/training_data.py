"""What a model was trained on, read through the lineage: the datasets its run pins, and theirs.

A run's manifest names the datasets it trained on (parents of kind ``dataset``) and the run it
started from (an adapter's base, a student's teacher): following both gives every dataset behind
a model; ``ancestors=True`` also follows each dataset's own parents (a synth dataset back to its
corpus), which is how a failure is explained "transitively to the corpus".

A record's text, whatever the dataset's kind: ``text``; else the contents of ``messages``; else
``prompt`` with ``completion``/``chosen``/``answer``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.data import shard_batches
from manifests.errors import DistilleryError
from manifests.schema import Manifest
from manifests.store import Store

TEXT_COLUMNS = ("text", "messages", "prompt", "question", "completion", "chosen", "answer", "reference")


def training_datasets(run: Manifest, store: Store, ancestors: bool = False) -> list[Manifest]:
    """Every dataset behind ``run`` (through base and teacher runs), oldest last; unique."""
    found: dict[str, Manifest] = {}
    seen: set[str] = set()
    todo = [run]
    while todo:
        m = todo.pop()
        if m.id in seen:
            continue
        seen.add(m.id)
        for ref in m.parents:
            if ref.kind == "dataset" and (m.kind == "run" or ancestors):
                try:
                    parent = store.get(ref.id)
                except DistilleryError:
                    continue  # a parent removed from this store: lineage ends there
                found.setdefault(parent.id, parent)
                if ancestors:
                    todo.append(parent)
            elif ref.kind == "run" and m.kind == "run":
                try:
                    todo.append(store.get(ref.id))
                except DistilleryError:
                    continue
    return list(found.values())


def record_text(row: dict[str, Any]) -> str:
    if row.get("text"):
        return str(row["text"])
    parts = []
    messages = row.get("messages")
    if isinstance(messages, list):
        parts += [str(m.get("content") or "") for m in messages if isinstance(m, dict)]
    for column in ("prompt", "question", "completion", "chosen", "answer", "reference"):
        value = row.get(column)
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):  # a chat prompt
            parts += [str(m.get("content") or "") for m in value if isinstance(m, dict)]
    return "\n".join(p for p in parts if p)


def dataset_batches(
    dataset: Manifest, extra: tuple[str, ...] = ()
) -> Iterator[tuple[list[dict[str, Any]], list[str]]]:
    """(rows with ``id`` and the ``extra`` columns present, their texts) per record batch of every shard."""
    for f in dataset.data_files():
        path = dataset.location / f.path
        names = pq.read_schema(path).names
        columns = [c for c in ("id", *extra, *TEXT_COLUMNS) if c in names]
        if "id" not in columns or not any(c in names for c in TEXT_COLUMNS):
            continue
        for batch in shard_batches(path, columns=list(dict.fromkeys(columns)), ref=dataset.ref):
            rows = pa.Table.from_batches([batch]).to_pylist()
            yield rows, [record_text(r) for r in rows]
