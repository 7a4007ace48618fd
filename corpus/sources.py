"""Inputs of a corpus build: JSONL, text folders, Parquet, WARC/WET and crawl datasets.

An input is planned into **tasks** (a byte range of a JSONL file, a file, a chunk of a folder) that
workers read independently; the plan depends only on the inputs, never on the number of workers.
Each record gets a stable id — a hash of the file's path as given, the line, row or WARC offset, and
the text, so appending to a file keeps the ids of what was there — and a source pointer::

    {"id": "c0ffee0123456789abcd", "parents": [], "text": "…",
     "source": {"uri": "examples/sample/web.jsonl", "sha256": "…", "line": 42, "row": None,
                "offset": None, "url": "https://…", "fetch_date": None, "http_status": None,
                "content_type": None}}

Records that cannot become documents (a WARC response that is not HTML, a page whose extraction
failed or timed out, a record cut off by the end of a truncated WARC file, a Parquet row whose
text is null) are ledger entries, not crashes.

**The input's own fields.** The other top-level fields of a JSONL object and the other columns of
a Parquet file (a document id, title, license, domain, score…) become columns of the dataset —
all of them, or those listed in ``keep_fields`` (``[]`` keeps none). A field named like a column
the build sets (``id``, ``parents``, ``text``, ``source``) is an error: rename it, or leave it out
with ``keep_fields``. A record without a field has null there, and inputs with different fields
give the union of the columns. JSON values get one Arrow type per field across the whole build:
``true``/``false`` → bool, integers → int64, numbers → float64 (integers and decimals together
→ float64), strings → string, lists and objects → their JSON text (a string column whose field
metadata says ``distillery.encoding: json``). Any other mix (text in one record, a number in
another) is an error naming the field and both places. Parquet columns keep their Arrow types.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, model_validator
from warcio.exceptions import ArchiveLoadFailed
from warcio.statusandheaders import StatusAndHeadersParserException

from corpus.extract import ExtractLimits, extract_html
from manifests.data import jsonl_objects, unreadable_shard
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

Format = Literal["jsonl", "text", "parquet", "warc", "wet", "table"]

RESERVED_COLUMNS = tuple(RECORD_SCHEMA.names)
"""Columns every corpus row has; an input field of the same name would be overwritten."""
JSON_ENCODED = {b"distillery.encoding": b"json"}
"""Field metadata of a column holding JSONL lists or objects as their JSON text."""
_GLOB_MAGIC = re.compile(r"[*?[]")


class SourceConfig(RecipeConfig):
    """One input of a corpus build: a path, or a dataset in the store (e.g. a crawl)."""

    path: str | None = None
    """A file, a folder of files of ``format`` (matching ``glob``), or a pattern such as
    ``data/*.jsonl`` or ``data/**/*.jsonl`` (files in sorted order)."""
    dataset: str | None = None
    """A dataset reference whose WARC files to read (the output of ``corpus crawl``)."""
    format: Format = "jsonl"
    """``jsonl``: one JSON object a line; ``text``: one document a file; ``parquet``: one a row;
    ``warc``: HTTP responses, HTML extracted with trafilatura; ``wet``: extracted-text records;
    ``table`` (a ``dataset`` input's default): the dataset's own rows, every column kept."""
    text_field: str = "text"
    """The field (JSONL) or column (Parquet) holding the document text."""
    url_field: str | None = "url"
    """The field holding the document's URL, if any (kept in ``source.url``)."""
    keep_fields: list[str] | None = None
    """JSONL fields or Parquet columns kept as columns of the dataset besides the text and URL:
    None keeps all of them, ``[]`` none, a list those (a record without one has null there)."""
    glob: str = "*"
    """File pattern when ``path`` is a folder (e.g. ``*.txt``, ``*.warc.gz``)."""
    content_types: list[str] = Field(
        default_factory=lambda: ["text/html", "application/xhtml+xml", "text/plain"]
    )
    """WARC responses of other content types are skipped (ledger reason ``content_type``)."""
    max_bytes: int = Field(default=2_000_000, ge=1)
    """WARC payloads larger than this are skipped (``too_large``)."""
    extract_timeout_s: float = Field(default=5.0, gt=0)
    """Time one page's extraction may take (``extract_timeout``)."""

    @model_validator(mode="after")
    def _one_location(self) -> SourceConfig:
        if (self.path is None) == (self.dataset is None):
            raise ValueError("give exactly one of 'path' or 'dataset'")
        if self.dataset is not None and self.format not in ("warc", "table"):
            # A dataset is read as its rows unless it is a crawl's WARC files.
            object.__setattr__(self, "format", "table")
        if self.dataset is None and self.format == "table":
            raise ValueError("format 'table' reads a dataset: give 'dataset', not 'path'")
        if self.path is not None and self.glob != "*" and _GLOB_MAGIC.search(self.path):
            raise ValueError("give the file pattern in 'path' or in 'glob', not in both")
        if self.keep_fields is not None:
            if self.format not in ("jsonl", "parquet"):
                raise ValueError(f"'keep_fields' applies to jsonl and parquet inputs, not {self.format}")
            for name in self.keep_fields:
                if name in RESERVED_COLUMNS:
                    raise ValueError(
                        f"keep_fields: '{name}' is a column the build sets ({', '.join(RESERVED_COLUMNS)}); "
                        "rename the field in the input"
                    )
                if name == self.text_field:
                    raise ValueError(f"keep_fields: '{name}' is the text_field; it becomes the 'text' column")
            if len(set(self.keep_fields)) != len(self.keep_fields):
                raise ValueError("keep_fields lists a field twice")
        return self


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


def _files(cfg: SourceConfig) -> list[Path]:
    base = Path(cfg.path or "")
    if not base.exists() and _GLOB_MAGIC.search(cfg.path or ""):
        return _pattern_files(cfg.path or "")
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


def _pattern_files(pattern: str) -> list[Path]:
    """The files matching a pattern in ``path`` (``data/*.jsonl``, ``data/**/*.jsonl``), sorted.

    The paths keep the form the user typed (``data/a.jsonl``), so a record's id is the same as when
    the file is named on its own.
    """
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if _GLOB_MAGIC.search(part))
    root = Path(*parts[:fixed]) if fixed else Path(".")
    rest = "/".join(parts[fixed:])
    files = sorted(
        p
        for p in (root.glob(rest) if root.is_dir() else [])
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise DistilleryError(f"input {pattern}: no files match this pattern; check 'inputs[].path'")
    return files


def _jsonl_ranges(path: Path, split_bytes: int) -> list[tuple[int, int | None, int]]:
    """(start, end, first line) ranges of about ``split_bytes``, cut at line ends."""
    size = path.stat().st_size
    if size <= split_bytes:
        return [(0, None, 1)]
    ranges: list[tuple[int, int | None, int]] = []
    start, line = 0, 1
    with open(path, "rb") as f:
        while start < size:
            f.seek(start + split_bytes)
            f.readline()  # finish the line the cut falls in
            end = min(f.tell(), size)
            f.seek(start)
            newlines = 0
            remaining = end - start
            while remaining:
                chunk = f.read(min(remaining, 1 << 22))
                newlines += chunk.count(b"\n")
                remaining -= len(chunk)
            ranges.append((start, end if end < size else None, line))
            start, line = end, line + newlines
    return ranges


def plan_tasks(
    inputs: list[SourceConfig], store, split_bytes: int = 64 << 20, files_per_task: int = 256
) -> list[Task]:
    """Cut the inputs into tasks, in input order (which decides which duplicate is kept)."""
    tasks: list[Task] = []
    for i, cfg in enumerate(inputs):
        if cfg.dataset is not None:
            manifest = store.resolve(cfg.dataset, kind="dataset")
            from manifests.verify import ensure_verified

            ensure_verified(manifest)
            if cfg.format == "table":
                from manifests.data import require_columns

                require_columns(manifest, ["id", "text"], "corpus.build")
                for f in manifest.data_files():
                    tasks.append(Task(len(tasks), i, "table", (str(manifest.location / f.path),), (f.sha256,),
                                      dataset=manifest.ref))  # fmt: skip
                continue
            warcs = [f for f in manifest.files if f.path.endswith((".warc", ".warc.gz"))]
            if not warcs:
                raise DistilleryError(
                    f"input dataset {manifest.ref} has no WARC files; give 'path' for a table"
                )
            index = tuple(str(manifest.location / f.path) for f in manifest.data_files())
            for f in warcs:
                tasks.append(Task(len(tasks), i, "warc", (str(manifest.location / f.path),), (f.sha256,),
                                  index_files=index, warc_name=f.path, dataset=manifest.ref))  # fmt: skip
            continue
        files = _files(cfg)
        if cfg.format == "text":
            for start in range(0, len(files), files_per_task):
                chunk = files[start : start + files_per_task]
                tasks.append(
                    Task(len(tasks), i, "text", tuple(map(str, chunk)), tuple(sha256_file(p) for p in chunk))
                )
            continue
        for path in files:
            sha = sha256_file(path)
            if cfg.format == "jsonl":
                for start, end, first in _jsonl_ranges(path, split_bytes):
                    tasks.append(Task(len(tasks), i, "jsonl", (str(path),), (sha,), start, end, first))
            else:
                tasks.append(Task(len(tasks), i, cfg.format, (str(path),), (sha,)))
    return tasks


def text_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=10).hexdigest()


def _source(uri: str, sha: str, **pointer) -> dict:
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


class _FieldKinds:
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


class _Batcher:
    def __init__(self, size: int, fields: _FieldKinds | None = None):
        self.size, self.rows, self.extras = size, [], []
        self.fields = fields or _FieldKinds()

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


def _reserved(uri: str, name: str) -> DistilleryError:
    return DistilleryError(
        f"{uri}: field '{name}' has the name of a column the build sets ({', '.join(RESERVED_COLUMNS)}); "
        "rename it in the input, or list the fields to keep with 'keep_fields'"
    )


def _read_jsonl(task: Task, cfg: SourceConfig, batcher: _Batcher, log: ReadLog) -> Iterator[pa.RecordBatch]:
    path = Path(task.files[0])
    uri, sha = display_path(path), task.sha256[0]
    consumed = {cfg.text_field, cfg.url_field}
    for line_no, obj in jsonl_objects(path, uri, task.start, task.end, task.first_line):
        text = obj.get(cfg.text_field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise DistilleryError(
                f"{uri} line {line_no}: no string field '{cfg.text_field}'; set 'text_field'"
            )
        url = obj.get(cfg.url_field) if cfg.url_field else None
        if cfg.keep_fields is None:
            extra = {k: v for k, v in obj.items() if k not in consumed}
            for name in extra:
                if name in RESERVED_COLUMNS:
                    raise _reserved(f"{uri} line {line_no}", name)
        else:
            extra = {k: obj.get(k) for k in cfg.keep_fields}
            log.fields_seen.update(k for k in cfg.keep_fields if k in obj)
        for name, value in extra.items():
            batcher.fields.see(name, value, f"{uri} line {line_no}")
        row = {"id": record_id(uri, line_no, text_hash(text)), "parents": [], "text": text,
               "source": _source(uri, sha, line=line_no, url=url if isinstance(url, str) else None)}  # fmt: skip
        if (batch := batcher.add(row, extra)) is not None:
            yield batch


def _read_text(task: Task, cfg: SourceConfig, batcher: _Batcher) -> Iterator[pa.RecordBatch]:
    for name, sha in zip(task.files, task.sha256, strict=True):
        path = Path(name)
        uri = display_path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DistilleryError(
                f"{uri}: not UTF-8 text; convert it or leave it out of the input glob"
            ) from None
        row = {
            "id": record_id(uri, 1, text_hash(text)),
            "parents": [],
            "text": text,
            "source": _source(uri, sha, line=1),
        }
        if (batch := batcher.add(row)) is not None:
            yield batch


def _read_parquet(task: Task, cfg: SourceConfig, batch_size: int, log: ReadLog) -> Iterator[pa.RecordBatch]:
    path = Path(task.files[0])
    uri, sha = display_path(path), task.sha256[0]
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DistilleryError(f"{uri}: not a readable Parquet file ({_first_line(e)})") from None
    schema = pf.schema_arrow
    if cfg.text_field not in schema.names:
        raise DistilleryError(
            f"{uri}: no column '{cfg.text_field}' (has {', '.join(schema.names)}); set 'text_field'"
        )
    has_url = bool(cfg.url_field) and cfg.url_field in schema.names
    for column in [cfg.text_field] + ([cfg.url_field] if has_url else []):
        kind = schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DistilleryError(
                f"{uri}: column '{column}' holds {kind}, not text; point the recipe at a string column"
            )
    if cfg.keep_fields is None:
        keep = [c for c in schema.names if c not in (cfg.text_field, cfg.url_field)]
        for name in keep:
            if name in RESERVED_COLUMNS:
                raise _reserved(uri, name)
    else:
        keep = list(cfg.keep_fields)
        log.fields_seen.update(c for c in keep if c in schema.names)
    present = [c for c in keep if c in schema.names]
    columns = list(dict.fromkeys([cfg.text_field] + ([cfg.url_field] if has_url else []) + present))
    row_no = 0
    try:
        for part in pf.iter_batches(batch_size=batch_size, columns=columns):
            texts = part.column(cfg.text_field).to_pylist()
            urls = part.column(cfg.url_field).to_pylist() if has_url else [None] * len(texts)
            rows, kept = [], []
            for text, url in zip(texts, urls, strict=True):
                if text is None:
                    # A missing text is not an empty document: it is counted, not published.
                    log.skip(record_id(uri, row_no), "null_text", {"row": row_no})
                else:
                    rows.append({"id": record_id(uri, row_no, text_hash(text)), "parents": [], "text": text,
                                 "source": _source(uri, sha, row=row_no, url=url)})  # fmt: skip
                kept.append(text is not None)
                row_no += 1
            if not rows:
                continue
            batch = pa.RecordBatch.from_pylist(rows, schema=RECORD_SCHEMA)
            mask = pa.array(kept)
            for name in keep:
                values = part.column(name).filter(mask) if name in present else pa.nulls(len(rows))
                batch = batch.append_column(schema.field(name) if name in present else name, values)
            yield batch
    except (pa.ArrowException, OSError) as e:
        raise DistilleryError(f"{uri}: not a readable Parquet file ({_first_line(e)})") from None


def _first_line(error: Exception) -> str:
    """An exception's first line, printable characters only (a reader's message may quote raw bytes)."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return "".join(c if c.isprintable() and c.isascii() else "?" for c in text)[:160]


def _crawl_index(task: Task) -> dict[int, list[str]]:
    """WARC offset → [index row id] for a crawl dataset's WARC file (empty for plain files)."""
    found: dict[int, list[str]] = {}
    for path in task.index_files:
        try:
            table = pq.read_table(path, columns=["id", "warc_file", "warc_offset"])
        except (pa.ArrowException, OSError) as e:
            raise unreadable_shard(path, e, task.dataset) from None
        for rid, name, offset in zip(
            *(table.column(c).to_pylist() for c in ("id", "warc_file", "warc_offset")), strict=True
        ):
            if name == task.warc_name:
                found[offset] = [rid]
    return found


_WARC_ERRORS = (ArchiveLoadFailed, StatusAndHeadersParserException, EOFError, ValueError, zlib.error,
                AttributeError, TypeError)  # fmt: skip
"""What warcio raises on a damaged or cut-off record (1.8 fails on a header block cut short with
AttributeError and TypeError rather than a parse error); caught only around its own parsing."""


def _cut_headers(head: bytes) -> dict:
    """The URL and type of a cut-off record, from whatever of its header block is there."""
    found = {}
    for line in head.split(b"\n\r\n", 1)[0].split(b"\n")[1:]:
        name, _, value = line.partition(b":")
        key = {b"warc-target-uri": "url", b"warc-type": "warc_type"}.get(name.strip().lower())
        if key and value.strip():
            found[key] = value.strip().decode("utf-8", "replace")
    return found


def _tail(path: Path, start: int) -> tuple[str, dict]:
    """What follows the last whole record of a WARC file: ``clean`` (nothing, or blank lines),
    ``truncated`` (a record the file ends inside; with its offset, and its URL and type when readable) or
    ``damaged`` (bytes that are no WARC record)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(start)
        if f.read(2) == b"\x1f\x8b":
            f.seek(start)
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            head = b""
            try:
                while not d.eof and (chunk := f.read(1 << 20)):
                    head += d.decompress(chunk)[: max(0, (1 << 16) - len(head))]
            except zlib.error:
                return "damaged", {}
            if not d.eof:
                return "truncated", _cut_headers(head) | {"offset": start}
            return (
                ("clean", {}) if not head.strip() and not d.unused_data and not f.read(1) else ("damaged", {})
            )
        f.seek(start)
        head = f.read(1 << 16)
    body = head.lstrip(b"\r\n")
    start += len(head) - len(body)
    if not body:
        return "clean", {}
    if not (body.startswith(b"WARC/") or b"WARC/".startswith(body)):
        return "damaged", {}
    header_end = body.find(b"\r\n\r\n")
    if header_end < 0:
        return (
            ("truncated", _cut_headers(body) | {"offset": start})
            if start + len(body) >= size
            else ("damaged", {})
        )
    declared = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", body[:header_end])
    if declared and start + header_end + 4 + int(declared.group(1)) > size:
        return "truncated", _cut_headers(body) | {"offset": start}
    return "damaged", {}


def _quiet() -> contextlib.AbstractContextManager:
    """warcio prints a warning with the raw bytes that follow a record of wrong length to stderr;
    such a file is reported as damaged or truncated instead, in one line without binary."""
    return contextlib.redirect_stderr(io.StringIO())


def _read_warc(task: Task, cfg: SourceConfig, batcher: _Batcher, log: ReadLog) -> Iterator[pa.RecordBatch]:
    from warcio.archiveiterator import ArchiveIterator

    path = Path(task.files[0])
    uri, sha = display_path(path), task.sha256[0]
    limits = ExtractLimits(max_bytes=cfg.max_bytes, timeout_s=cfg.extract_timeout_s)
    parents = _crawl_index(task)
    wanted = "conversion" if task.format == "wet" else "response"
    end = 0  # where the last whole record ends
    with open(path, "rb") as f:
        records = ArchiveIterator(f)
        while True:
            try:
                with _quiet():
                    record = next(records)
            except StopIteration:
                break
            except _WARC_ERRORS:
                break  # what the bytes after the last whole record are is decided below
            if getattr(record.raw_stream, "limit", None) is None:
                # No Content-Length: a header block cut off by the end of the file (or a broken one);
                # warcio would read to the end of the file as its content. Decided below.
                break
            payload, unreadable = b"", False
            if record.rec_type == wanted:
                try:
                    # The payload first: asking warcio for the offset reads the record to its end.
                    payload = record.content_stream().read(limits.max_bytes + 1)
                except _WARC_ERRORS:
                    unreadable = True  # a broken chunked or compressed HTTP body
            try:
                while record.raw_stream.read(1 << 20):
                    pass
            except _WARC_ERRORS:
                unreadable = True
            # The file ended before the record's declared Content-Length: what was read is a fragment.
            truncated = getattr(record.raw_stream, "limit", 0) > 0
            with _quiet():
                offset = records.get_record_offset()
            url = record.rec_headers.get_header("WARC-Target-URI")
            rid = record_id(uri, offset, url)
            if truncated:
                log.skip(
                    rid, "truncated_record", {"url": url, "offset": offset, "warc_type": record.rec_type}
                )
                return
            end = offset + records.get_record_length()
            if record.rec_type != wanted:
                continue
            date = record.rec_headers.get_header("WARC-Date")
            status = content_type = None
            if record.http_headers is not None:
                status = int(record.http_headers.get_statuscode() or 0) or None
                content_type = record.http_headers.get_header("Content-Type")
            if unreadable:
                text, reason = None, "unreadable_payload"
            elif task.format == "wet":
                text, reason = payload.decode("utf-8", errors="replace"), None
            elif status is not None and not 200 <= status < 300:
                text, reason = None, "http_status"
            elif not any((content_type or "").lower().startswith(t) for t in cfg.content_types):
                text, reason = None, "content_type"
            elif (content_type or "").lower().startswith("text/plain"):
                text, reason = (
                    (None, "too_large")
                    if len(payload) > limits.max_bytes
                    else (payload.decode("utf-8", "replace"), None)
                )
            else:
                text, reason = extract_html(payload, content_type, limits)
            if text is None:
                log.skip(rid, reason or "extract_empty", {"url": url, "offset": offset, "status": status})
                continue
            row = {"id": rid, "parents": parents.get(offset, []), "text": text,
                   "source": _source(uri, sha, offset=offset, url=url, fetch_date=date, http_status=status,
                                     content_type=content_type)}  # fmt: skip
            if (batch := batcher.add(row)) is not None:
                yield batch
    state, cut = _tail(path, end)
    if state == "truncated":
        # Named by where the record starts, as it would have been had the file been whole.
        log.skip(record_id(uri, cut["offset"], cut.get("url")), "truncated_record", {"url": None} | cut)
    elif state == "damaged" and end == 0:
        raise DistilleryError(
            f"{uri}: not a WARC file (no WARC record at its start); check the input's 'format'"
        )
    elif state == "damaged":
        raise DistilleryError(
            f"{uri}: damaged WARC record at byte {end}; the file cannot be read past it (fetch it again)"
        )


def _read_table(task: Task, batch_size: int) -> Iterator[pa.RecordBatch]:
    """A published dataset's rows, as they are (ids, parents, sources and score columns kept)."""
    try:
        pf = pq.ParquetFile(task.files[0])
        for group in range(pf.metadata.num_row_groups):
            yield from pf.read_row_group(group).to_batches(max_chunksize=batch_size)
    except (pa.ArrowException, OSError) as e:
        # Verification may trust a shard whose size and time are unchanged; its bytes can still rot.
        raise unreadable_shard(task.files[0], e, task.dataset) from None


def read_task(
    task: Task, cfg: SourceConfig, log: ReadLog, batch_size: int = 1000
) -> Iterator[pa.RecordBatch]:
    """Stream the records of one task as Arrow batches: ``RECORD_SCHEMA`` and the kept fields."""
    batcher = _Batcher(batch_size)
    if task.format == "jsonl":
        yield from _read_jsonl(task, cfg, batcher, log)
    elif task.format == "text":
        yield from _read_text(task, cfg, batcher)
    elif task.format == "parquet":
        yield from _read_parquet(task, cfg, batch_size, log)
    elif task.format == "table":
        yield from _read_table(task, batch_size)
    else:
        yield from _read_warc(task, cfg, batcher, log)
    if (batch := batcher.flush()) is not None:
        yield batch
