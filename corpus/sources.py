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
failed or timed out) are ledger entries, not crashes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from corpus.extract import ExtractLimits, extract_html
from manifests.data import jsonl_objects
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


class SourceConfig(RecipeConfig):
    """One input of a corpus build: a path, or a dataset in the store (e.g. a crawl)."""

    path: str | None = None
    """A file, or a folder of files of ``format`` (matching ``glob``)."""
    dataset: str | None = None
    """A dataset reference whose WARC files to read (the output of ``corpus crawl``)."""
    format: Format = "jsonl"
    """``jsonl``: one JSON object a line; ``text``: one document a file; ``parquet``: one a row;
    ``warc``: HTTP responses, HTML extracted with trafilatura; ``wet``: extracted-text records;
    ``table`` (a ``dataset`` input's default): the dataset's own rows, every column kept."""
    text_field: str = "text"
    """The field (JSONL) or column (Parquet) holding the document text."""
    url_field: str | None = "url"
    """The field holding the document's URL, if any."""
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

    def key(self) -> dict:
        """What identifies the task's input, cheaply (for resuming)."""
        return {"input": self.input_index, "format": self.format, "files": list(self.files),
                "sha256": list(self.sha256), "start": self.start, "end": self.end}  # fmt: skip


@dataclass
class ReadLog:
    """Skipped input records (ledger rows, without text) and counts by reason."""

    ledger: list[dict] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

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
                    tasks.append(
                        Task(len(tasks), i, "table", (str(manifest.location / f.path),), (f.sha256,))
                    )
                continue
            warcs = [f for f in manifest.files if f.path.endswith((".warc", ".warc.gz"))]
            if not warcs:
                raise DistilleryError(
                    f"input dataset {manifest.ref} has no WARC files; give 'path' for a table"
                )
            index = tuple(str(manifest.location / f.path) for f in manifest.data_files())
            for f in warcs:
                tasks.append(Task(len(tasks), i, "warc", (str(manifest.location / f.path),), (f.sha256,),
                                  index_files=index, warc_name=f.path))  # fmt: skip
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


class _Batcher:
    def __init__(self, size: int):
        self.size, self.rows = size, []

    def add(self, row: dict) -> pa.RecordBatch | None:
        self.rows.append(row)
        return self.flush() if len(self.rows) >= self.size else None

    def flush(self) -> pa.RecordBatch | None:
        if not self.rows:
            return None
        batch, self.rows = pa.RecordBatch.from_pylist(self.rows, schema=RECORD_SCHEMA), []
        return batch


def _read_jsonl(task: Task, cfg: SourceConfig, batcher: _Batcher) -> Iterator[pa.RecordBatch]:
    path = Path(task.files[0])
    uri, sha = display_path(path), task.sha256[0]
    for line_no, obj in jsonl_objects(path, uri, task.start, task.end, task.first_line):
        text = obj.get(cfg.text_field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise DistilleryError(
                f"{uri} line {line_no}: no string field '{cfg.text_field}'; set 'text_field'"
            )
        url = obj.get(cfg.url_field) if cfg.url_field else None
        row = {"id": record_id(uri, line_no, text_hash(text)), "parents": [], "text": text,
               "source": _source(uri, sha, line=line_no, url=url if isinstance(url, str) else None)}  # fmt: skip
        if (batch := batcher.add(row)) is not None:
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


def _read_parquet(task: Task, cfg: SourceConfig, batcher: _Batcher) -> Iterator[pa.RecordBatch]:
    path = Path(task.files[0])
    uri, sha = display_path(path), task.sha256[0]
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
    for part in pf.iter_batches(batch_size=batcher.size, columns=columns):
        texts = part.column(cfg.text_field).to_pylist()
        urls = part.column(cfg.url_field).to_pylist() if len(columns) > 1 else [None] * len(texts)
        for text, url in zip(texts, urls, strict=True):
            text = text or ""
            row = {"id": record_id(uri, row_no, text_hash(text)), "parents": [], "text": text,
                   "source": _source(uri, sha, row=row_no, url=url)}  # fmt: skip
            row_no += 1
            if (batch := batcher.add(row)) is not None:
                yield batch


def _crawl_index(task: Task) -> dict[int, list[str]]:
    """WARC offset → [index row id] for a crawl dataset's WARC file (empty for plain files)."""
    found: dict[int, list[str]] = {}
    for path in task.index_files:
        table = pq.read_table(path, columns=["id", "warc_file", "warc_offset"])
        for rid, name, offset in zip(
            *(table.column(c).to_pylist() for c in ("id", "warc_file", "warc_offset")), strict=True
        ):
            if name == task.warc_name:
                found[offset] = [rid]
    return found


def _read_warc(task: Task, cfg: SourceConfig, batcher: _Batcher, log: ReadLog) -> Iterator[pa.RecordBatch]:
    from warcio.archiveiterator import ArchiveIterator
    from warcio.exceptions import ArchiveLoadFailed

    path = Path(task.files[0])
    uri, sha = display_path(path), task.sha256[0]
    limits = ExtractLimits(max_bytes=cfg.max_bytes, timeout_s=cfg.extract_timeout_s)
    parents = _crawl_index(task)
    wanted = "conversion" if task.format == "wet" else "response"
    with open(path, "rb") as f:
        records = ArchiveIterator(f)
        try:
            for record in records:
                if record.rec_type != wanted:
                    continue
                # The payload first: asking warcio for the offset reads the record to its end.
                payload = record.content_stream().read(limits.max_bytes + 1)
                offset = records.get_record_offset()
                url = record.rec_headers.get_header("WARC-Target-URI")
                date = record.rec_headers.get_header("WARC-Date")
                rid = record_id(uri, offset, url)
                status = content_type = None
                if record.http_headers is not None:
                    status = int(record.http_headers.get_statuscode() or 0) or None
                    content_type = record.http_headers.get_header("Content-Type")
                if task.format == "wet":
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
        except ArchiveLoadFailed as e:
            raise DistilleryError(f"{uri}: not a readable WARC file ({str(e).splitlines()[0]})") from None


def read_task(
    task: Task, cfg: SourceConfig, log: ReadLog, batch_size: int = 1000
) -> Iterator[pa.RecordBatch]:
    """Stream the records of one task as Arrow batches of ``RECORD_SCHEMA``."""
    batcher = _Batcher(batch_size)
    if task.format == "jsonl":
        yield from _read_jsonl(task, cfg, batcher)
    elif task.format == "text":
        yield from _read_text(task, cfg, batcher)
    elif task.format == "parquet":
        yield from _read_parquet(task, cfg, batcher)
    elif task.format == "table":
        # A published dataset's rows, as they are (ids, parents, sources and score columns kept).
        pf = pq.ParquetFile(task.files[0])
        for group in range(pf.metadata.num_row_groups):
            yield from pf.read_row_group(group).to_batches(max_chunksize=batch_size)
    else:
        yield from _read_warc(task, cfg, batcher, log)
    if (batch := batcher.flush()) is not None:
        yield batch
