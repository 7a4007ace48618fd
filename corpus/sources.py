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
text is null) are ledger entries, not crashes. WARC and WET files are read by ``corpus.warc_reader``;
the record schema, a task and the read log live in ``corpus.records``.

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

import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from corpus.extract import ExtractLimits
from corpus.records import RECORD_SCHEMA, Batcher, Format, ReadLog, Task, display_path, source_pointer
from manifests.data import jsonl_objects, open_shard, unreadable_shard
from manifests.errors import DistilleryError
from manifests.hashing import FileHashes, record_id
from manifests.recipes import RecipeConfig

RESERVED_COLUMNS = tuple(RECORD_SCHEMA.names)
"""Columns every corpus row has; an input field of the same name would be overwritten."""
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


def _cached_jsonl_ranges(
    path: Path, sha256: str, split_bytes: int, cache: Path
) -> list[tuple[int, int | None, int]]:
    """``_jsonl_ranges``, kept in ``cache`` by the file's content hash: a file larger than ``split_bytes``
    is read once to find its line ends, not on every build."""
    if path.stat().st_size <= split_bytes:
        return [(0, None, 1)]
    file = cache / f"{sha256}-{split_bytes}.json"
    try:
        return [(start, end, first) for start, end, first in json.loads(file.read_text())]
    except (OSError, ValueError, TypeError):
        pass
    ranges = _jsonl_ranges(path, split_bytes)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(ranges))
        os.replace(tmp, file)
    except OSError:
        pass  # a read-only store: found again next time
    return ranges


def plan_tasks(
    inputs: list[SourceConfig], store, split_bytes: int = 64 << 20, files_per_task: int = 256
) -> list[Task]:
    """Cut the inputs into tasks, in input order (which decides which duplicate is kept).

    Each input file is hashed (its ``source.sha256``) once: the hash is kept in the store's cache and
    reused while the file is unchanged (``FileHashes``), as are the line ends a large JSONL file is cut
    at, so a rerun does not read its inputs to start.
    """
    hashes = FileHashes(store.cache_dir("input-hashes"))
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
                    Task(
                        len(tasks), i, "text", tuple(map(str, chunk)), tuple(hashes.sha256(p) for p in chunk)
                    )
                )
            continue
        for path in files:
            sha = hashes.sha256(path)
            if cfg.format == "jsonl":
                ranges = _cached_jsonl_ranges(path, sha, split_bytes, store.cache_dir("jsonl-ranges"))
                for start, end, first in ranges:
                    tasks.append(Task(len(tasks), i, "jsonl", (str(path),), (sha,), start, end, first))
            else:
                tasks.append(Task(len(tasks), i, cfg.format, (str(path),), (sha,)))
    hashes.save()
    return tasks


def text_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=10).hexdigest()


def _reserved(uri: str, name: str) -> DistilleryError:
    return DistilleryError(
        f"{uri}: field '{name}' has the name of a column the build sets ({', '.join(RESERVED_COLUMNS)}); "
        "rename it in the input, or list the fields to keep with 'keep_fields'"
    )


def _read_jsonl(task: Task, cfg: SourceConfig, batcher: Batcher, log: ReadLog) -> Iterator[pa.RecordBatch]:
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
               "source": source_pointer(uri, sha, line=line_no, url=url if isinstance(url, str) else None)}  # fmt: skip
        if (batch := batcher.add(row, extra)) is not None:
            yield batch


def _read_text(task: Task, cfg: SourceConfig, batcher: Batcher) -> Iterator[pa.RecordBatch]:
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
            "source": source_pointer(uri, sha, line=1),
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
                                 "source": source_pointer(uri, sha, row=row_no, url=url)})  # fmt: skip
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


def _read_table(task: Task, batch_size: int) -> Iterator[pa.RecordBatch]:
    """A published dataset's rows, as they are (ids, parents, sources and score columns kept)."""
    try:
        pf = open_shard(task.files[0])
        for group in range(pf.metadata.num_row_groups):
            yield from pf.read_row_group(group).to_batches(max_chunksize=batch_size)
    except (pa.ArrowException, OSError) as e:
        # Verification may trust a shard whose size and time are unchanged; its bytes can still rot.
        raise unreadable_shard(task.files[0], e, task.dataset) from None


def read_task(
    task: Task, cfg: SourceConfig, log: ReadLog, batch_size: int = 1000
) -> Iterator[pa.RecordBatch]:
    """Stream the records of one task as Arrow batches: ``RECORD_SCHEMA`` and the kept fields."""
    batcher = Batcher(batch_size)
    if task.format == "jsonl":
        yield from _read_jsonl(task, cfg, batcher, log)
    elif task.format == "text":
        yield from _read_text(task, cfg, batcher)
    elif task.format == "parquet":
        yield from _read_parquet(task, cfg, batch_size, log)
    elif task.format == "table":
        yield from _read_table(task, batch_size)
    else:
        from corpus.warc_reader import read_warc  # warcio and fsspec: only for WARC inputs

        limits = ExtractLimits(max_bytes=cfg.max_bytes, timeout_s=cfg.extract_timeout_s)
        yield from read_warc(task, batcher, log, limits, cfg.content_types)
    if (batch := batcher.flush()) is not None:
        yield batch
