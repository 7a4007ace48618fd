"""What a synth task reads: a dataset in the store, or a JSONL/Parquet file of records.

``input:`` is resolved as a store reference (``name``, ``name@id``, a manifest folder) unless it
is an existing ``.jsonl`` or ``.parquet`` file. A file lets a task read columns a corpus build does
not carry (a math problem's ``question`` and ``answer``, a code problem's ``tests``)::

    {"question": "A box holds 12 pens. How many pens are in 3 boxes?", "answer": "36"}

Each line (or Parquet row) becomes a record whose id is a hash of the path as given, the line
number and the record, with a ``source`` pointer (path, the file's sha256, line or row). No dataset
in the store holds such a record, so ``manifests trace`` could not follow its id: every output row
made from it names the file and line in its ``source`` column instead (``SynthInput.lineage``, applied
by the runner to every task), and the trace ends there as it does for a corpus build. The output
manifest then has no dataset parent; its recipe names the file and its sha256.
Values that are not text become text (JSON), as prompts are made of text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.data import jsonl_objects, read_table, require_columns
from manifests.errors import DistilleryError
from manifests.hashing import canonical_json, record_id, sha256_file
from manifests.records import SOURCE_TYPE
from manifests.schema import Manifest
from manifests.store import Store

FILE_SUFFIXES = (".jsonl", ".parquet")


@dataclass
class SynthInput:
    """The input rows and where they came from."""

    table: pa.Table
    """``id`` and the requested columns (plus ``source`` for a file)."""
    label: str
    """How messages name the input (``dataset name@id`` or ``file PATH``)."""
    parents: list[Manifest] = field(default_factory=list)
    """The input dataset; none for a file."""
    recipe: dict[str, Any] = field(default_factory=dict)
    """What the saved recipe records as the input: the dataset id, or the path and its sha256."""
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    """For a file: each record's ``source`` pointer, by record id."""

    def lineage(self, parents: list[str]) -> tuple[list[str], dict[str, Any] | None]:
        """An output row's ``parents`` and ``source`` from the input records it was made from.

        A record of a dataset stays a parent: the trace follows it into that dataset. A record read
        from a file is no record of any dataset, so it becomes the row's ``source`` (its file and line)
        instead; a row made from several (Self-Instruct's in-context examples) names the first here,
        and its own columns (``examples``) name them all."""
        from_file = [p for p in parents if p in self.sources]
        kept = [p for p in parents if p not in self.sources]
        return kept, (self.sources[from_file[0]] if from_file else None)

    def pointer(self, record_id: str) -> dict[str, Any] | None:
        """Where a file record came from, short enough for a ledger entry (file, line or row)."""
        source = self.sources.get(record_id)
        if source is None:
            return None
        return {k: source[k] for k in ("uri", "line", "row") if source.get(k) is not None}


def is_data_file(ref: str) -> bool:
    path = Path(ref)
    return path.suffix.lower() in FILE_SUFFIXES and path.is_file()


def read_input(ref: str, store: Store, columns: list[str], purpose: str) -> SynthInput:
    """The rows of ``ref`` with ``columns`` (``id`` among them), or one clear error."""
    if is_data_file(ref):
        return read_file(Path(ref), [c for c in columns if c != "id"], purpose)
    try:
        manifest = store.resolve(ref, kind="dataset")
    except DistilleryError:
        if Path(ref).suffix.lower() in FILE_SUFFIXES:  # meant as a file: say that, not "no dataset named"
            raise DistilleryError(
                f"input {ref}: no such file (relative paths start at {Path.cwd()}), nor a dataset of that name"
            ) from None
        raise
    require_columns(manifest, columns, purpose)
    return SynthInput(
        read_table(manifest, columns=columns), f"dataset {manifest.ref}", [manifest], {"input": manifest.id}
    )


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _records(path: Path) -> list[tuple[str, int, dict[str, Any]]]:
    """(pointer kind, line or row number, record) for each record of the file."""
    if path.suffix.lower() == ".parquet":
        try:
            rows = pq.read_table(path).to_pylist()
        except (OSError, pa.ArrowException) as e:
            raise DistilleryError(f"{path}: not a readable Parquet file ({e})") from None
        return [("row", i, r) for i, r in enumerate(rows)]
    records = []
    for number, obj in jsonl_objects(path, str(path)):
        if not isinstance(obj, dict):
            raise DistilleryError(f"{path} line {number}: expected a JSON object, got {type(obj).__name__}")
        records.append(("line", number, obj))
    return records


def read_file(path: Path, columns: list[str], purpose: str) -> SynthInput:
    """Records of a JSONL or Parquet file as an input table (see the module docstring)."""
    uri, sha = str(path), sha256_file(path)
    rows, sources = [], {}
    for pointer, number, record in _records(path):
        missing = [c for c in columns if c not in record]
        if missing:
            raise DistilleryError(
                f"{uri} {pointer} {number} lacks field(s) {', '.join(missing)} needed for {purpose}; "
                f"it has: {', '.join(record) or 'nothing'}"
            )
        source = dict.fromkeys(SOURCE_TYPE.names) | {"uri": uri, "sha256": sha, pointer: number}
        rid = record_id(uri, number, canonical_json(record))  # lone surrogates were repaired as read
        rows.append({"id": rid, **{c: _text(record[c]) for c in columns}, "source": source})
        sources[rid] = source
    schema = pa.schema([("id", pa.string()), *((c, pa.string()) for c in columns), ("source", SOURCE_TYPE)])
    recipe = {"input": uri, "input_sha256": sha}
    return SynthInput(pa.Table.from_pylist(rows, schema=schema), f"file {uri}", [], recipe, sources)
