"""Readers for input files: JSONL, plain-text folders and Parquet, streamed as Arrow batches.

Each record gets a stable id (a hash of the file's path as given, the line or row, and the text:
appending to a file keeps the ids of the lines already there) and a source pointer, so that any derived row can be traced to the exact line it came from::

    {"id": "c0ffee0123456789abcd", "parents": [], "text": "…",
     "source": {"uri": "examples/sample/web.jsonl", "sha256": "…", "line": 42, "url": "https://…"}}
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.errors import DistilleryError
from manifests.hashing import record_id, sha256_file
from manifests.recipes import RecipeConfig
from manifests.records import SOURCE_TYPE

RECORD_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("parents", pa.list_(pa.string())),
        ("text", pa.string()),
        ("source", SOURCE_TYPE),
    ]
)


class SourceConfig(RecipeConfig):
    """One input of a corpus build."""

    path: str
    """A file (JSONL, Parquet) or a folder (text files, or files of the given format)."""
    format: Literal["jsonl", "text", "parquet"] = "jsonl"
    """``jsonl``: one JSON object a line; ``text``: one document a file; ``parquet``: one a row."""
    text_field: str = "text"
    """The field (JSONL) or column (Parquet) holding the document text."""
    url_field: str | None = "url"
    """The field holding the document's URL, if any."""
    glob: str = "*"
    """File pattern when ``path`` is a folder (e.g. ``*.txt``)."""


def _display_path(path: Path) -> str:
    """The path as users see it: relative to the working directory when inside it."""
    try:
        return (
            Path(os.path.relpath(path.resolve(), Path.cwd())).as_posix()
            if not path.is_absolute()
            else str(path)
        )
    except ValueError:
        return str(path)


def _files(cfg: SourceConfig) -> list[Path]:
    base = Path(cfg.path)
    if not base.exists():
        raise DistilleryError(
            f"input {cfg.path}: no such file or folder; check 'inputs[].path' in the recipe"
        )
    if base.is_file():
        return [base]
    files = sorted(p for p in base.glob(cfg.glob) if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DistilleryError(f"input {cfg.path}: folder has no files matching '{cfg.glob}'")
    return files


def _text_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=10).hexdigest()


def _batch(rows: list[dict]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist(rows, schema=RECORD_SCHEMA)


def _source(uri: str, sha: str, line=None, row=None, url=None) -> dict:
    return {"uri": uri, "sha256": sha, "line": line, "row": row, "offset": None, "url": url}


def _read_jsonl(path: Path, cfg: SourceConfig, batch_size: int) -> Iterator[pa.RecordBatch]:
    uri, sha = _display_path(path), sha256_file(path)
    rows: list[dict] = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DistilleryError(
                    f"{uri} line {line_no}: not UTF-8 text; convert the file to UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DistilleryError(
                    f"{uri} line {line_no}: not valid JSON ({e.msg}); fix or remove the line"
                ) from None
            text = obj.get(cfg.text_field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise DistilleryError(
                    f"{uri} line {line_no}: no string field '{cfg.text_field}'; set 'text_field' in the recipe"
                )
            url = obj.get(cfg.url_field) if cfg.url_field else None
            rows.append(
                {"id": record_id(uri, line_no, _text_hash(text)), "parents": [], "text": text,
                 "source": _source(uri, sha, line=line_no, url=url if isinstance(url, str) else None)}
            )  # fmt: skip
            if len(rows) >= batch_size:
                yield _batch(rows)
                rows = []
    if rows:
        yield _batch(rows)


def _read_text(path: Path, cfg: SourceConfig) -> Iterator[pa.RecordBatch]:
    uri, sha = _display_path(path), sha256_file(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DistilleryError(
            f"{uri}: not UTF-8 text; convert it or leave it out of the input glob"
        ) from None
    yield _batch(
        [
            {
                "id": record_id(uri, 1, _text_hash(text)),
                "parents": [],
                "text": text,
                "source": _source(uri, sha, line=1),
            }
        ]
    )


def _read_parquet(path: Path, cfg: SourceConfig, batch_size: int) -> Iterator[pa.RecordBatch]:
    uri, sha = _display_path(path), sha256_file(path)
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DistilleryError(f"{uri}: not a readable Parquet file ({e})") from None
    schema = pf.schema_arrow
    if cfg.text_field not in schema.names:
        raise DistilleryError(
            f"{uri}: no column '{cfg.text_field}' (has {', '.join(schema.names)}); set 'text_field'"
        )
    columns = [cfg.text_field] + ([cfg.url_field] if cfg.url_field and cfg.url_field in schema.names else [])
    for column in columns:
        kind = schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DistilleryError(
                f"{uri}: column '{column}' holds {kind}, not text; point the recipe at a string column"
            )
    row_no = 0
    for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
        texts = batch.column(cfg.text_field).to_pylist()
        urls = batch.column(cfg.url_field).to_pylist() if len(columns) > 1 else [None] * len(texts)
        rows = []
        for text, url in zip(texts, urls, strict=True):
            text = text or ""
            rows.append({"id": record_id(uri, row_no, _text_hash(text)), "parents": [], "text": text,
                         "source": _source(uri, sha, row=row_no, url=url)})  # fmt: skip
            row_no += 1
        yield _batch(rows)


def read_source(cfg: SourceConfig, batch_size: int = 1000) -> Iterator[pa.RecordBatch]:
    """Stream the records of one input as Arrow batches of ``RECORD_SCHEMA``."""
    for path in _files(cfg):
        if cfg.format == "jsonl":
            yield from _read_jsonl(path, cfg, batch_size)
        elif cfg.format == "text":
            yield from _read_text(path, cfg)
        else:
            yield from _read_parquet(path, cfg, batch_size)
