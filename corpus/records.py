"""Shared pieces of reading corpus inputs: the record schema, a task, the read log and the batcher.

A leaf module: ``corpus.sources`` (planning; JSONL, text and Parquet readers) and ``corpus.warc_reader``
(WARC/WET) both build rows with these, so neither imports the other's internals.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa

from manifests.errors import DistilleryError
from manifests.records import SOURCE_TYPE

RECORD_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("parents", pa.list_(pa.string())),
        ("text", pa.string()),
        ("source", SOURCE_TYPE),
    ]
)

Format = Literal["jsonl", "text", "parquet", "warc", "wet", "table"]

JSON_ENCODED = {b"distillery.encoding": b"json"}
"""Field metadata of a column holding JSONL lists or objects as their JSON text."""


@dataclass(frozen=True)
class Task:
    """One independently readable piece of the input."""

    index: int
    input_index: int
    format: Format
    files: tuple[str, ...]
    """One file, or (text format) a chunk of a folder's files."""
    sha256: tuple[str, ...]
    start: int = 0
    """Byte offset where this task starts reading (JSONL split into ranges)."""
    end: int | None = None
    first_line: int = 1
    index_files: tuple[str, ...] = ()
    """For a crawl dataset's WARC file: its index shards, whose rows become each record's parent."""
    warc_name: str | None = None
    """The WARC file's path inside its dataset, as the index names it."""
    dataset: str | None = None
    """The reference of the dataset the files belong to (a ``dataset`` input), for messages."""

    def key(self) -> dict:
        """What identifies the task's input, cheaply (for resuming)."""
        return {"input": self.input_index, "format": self.format, "files": list(self.files),
                "sha256": list(self.sha256), "start": self.start, "end": self.end}  # fmt: skip


@dataclass
class ReadLog:
    """Skipped input records (ledger rows, without text) and counts by reason."""

    ledger: list[dict] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    fields_seen: set[str] = field(default_factory=set)
    """Kept fields (``keep_fields``) that some record of the task has: a name no record has is a typo."""

    def skip(self, rid: str, reason: str, detail: dict | None = None) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.ledger.append({"id": rid, "step": "corpus.build.read", "action": "drop", "reason": reason,
                            "score": None, "detail": json.dumps(detail, sort_keys=True) if detail else None})  # fmt: skip


def display_path(path: Path) -> str:
    """The path as users see it: relative to the working directory when inside it."""
    if path.is_absolute():
        return str(path)
    try:
        return Path(os.path.relpath(path.resolve(), Path.cwd())).as_posix()
    except ValueError:
        return str(path)


def source_pointer(uri: str, sha: str, **pointer) -> dict:
    """A record's ``source`` struct: the file and its hash, and where in it (``line=``, ``offset=``…)."""
    base = {"uri": uri, "sha256": sha, "line": None, "row": None, "offset": None, "url": None,
            "fetch_date": None, "http_status": None, "content_type": None}  # fmt: skip
    return base | pointer


_KIND_WORDS = {"bool": "true/false", "int": "a number", "float": "a number", "str": "text",
               "json": "a list or object"}  # fmt: skip
_KIND_TYPES = {None: pa.null(), "bool": pa.bool_(), "int": pa.int64(), "float": pa.float64(), "str": pa.string(),
               "json": pa.string()}  # fmt: skip


def _json_kind(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    return "str" if isinstance(value, str) else "json"


class FieldKinds:
    """The kind of each kept JSONL field within one task, in order of first appearance.

    Kinds only widen (null → any, int → float); the Arrow type of a field follows its kind, and the
    build unifies the tasks' types (``corpus.combine.unified_schema``), so the dataset's schema never
    depends on how the input was cut into tasks or on the number of workers.
    """

    def __init__(self) -> None:
        self.kinds: dict[str, str | None] = {}
        self.first: dict[str, str] = {}
        """Where each field's kind was first seen (for the error on a conflicting record)."""

    def see(self, name: str, value, where: str) -> None:
        kind = _json_kind(value)
        if kind == "int" and not -(2**63) <= value < 2**63:
            raise DistilleryError(
                f"{where}: field '{name}' holds an integer too large for a 64-bit column; "
                "write it as a string, or leave the field out with 'keep_fields'"
            )
        have = self.kinds.get(name)
        if name not in self.kinds or (have is None and kind is not None):
            self.kinds[name] = kind
            self.first[name] = where
        elif kind is not None and kind != have:
            if {kind, have} != {"int", "float"}:
                raise DistilleryError(
                    f"{where}: field '{name}' holds {_KIND_WORDS[kind]}, but {_KIND_WORDS[have]} at "
                    f"{self.first[name]}; give it one type in every record, or leave it out with 'keep_fields'"
                )
            self.kinds[name] = "float"

    def columns(self, extras: list[dict]) -> list[tuple[pa.Field, pa.Array]]:
        out = []
        for name, kind in self.kinds.items():
            values = [extra.get(name) for extra in extras]
            if kind == "json":
                values = [None if v is None else json.dumps(v, ensure_ascii=False) for v in values]
            field_ = pa.field(name, _KIND_TYPES[kind], metadata=JSON_ENCODED if kind == "json" else None)
            out.append((field_, pa.array(values, field_.type)))
        return out


class Batcher:
    """Rows (and their kept fields) gathered into record batches of ``size``: ``RECORD_SCHEMA`` plus one
    column per kept field."""

    def __init__(self, size: int, fields: FieldKinds | None = None):
        self.size, self.rows, self.extras = size, [], []
        self.fields = fields or FieldKinds()

    def add(self, row: dict, extra: dict | None = None) -> pa.RecordBatch | None:
        self.rows.append(row)
        self.extras.append(extra or {})
        return self.flush() if len(self.rows) >= self.size else None

    def flush(self) -> pa.RecordBatch | None:
        if not self.rows:
            return None
        batch = pa.RecordBatch.from_pylist(self.rows, schema=RECORD_SCHEMA)
        for field_, values in self.fields.columns(self.extras):
            batch = batch.append_column(field_, values)
        self.rows, self.extras = [], []
        return batch
