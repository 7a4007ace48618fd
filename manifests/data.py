"""Reading data: published datasets (verified first, as Arrow tables) and JSONL files line by line."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.errors import DistilleryError
from manifests.schema import Manifest
from manifests.verify import ensure_verified

RECORD_COLUMNS = ("id", "parents")
"""Every dataset row has a stable ``id``; derived rows list the ids they came from in ``parents``."""


def read_table(manifest: Manifest, split: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """All rows of a dataset or of an eval's records (or of one split), after verifying its files."""
    if manifest.kind == "run":
        raise DistilleryError(f"{manifest.ref} is a run, not a dataset")
    ensure_verified(manifest)
    require_split(manifest, split)
    tables = []
    for f in manifest.data_files(split):
        path = manifest.location / f.path
        try:
            missing = [c for c in columns or [] if c not in pq.read_schema(path).names]
            if missing:
                raise DistilleryError(
                    f"dataset {manifest.ref} lacks column(s) {', '.join(missing)} in {f.path}"
                )
            tables.append(pq.read_table(path, columns=columns, page_checksum_verification=True))
        except (pa.ArrowException, OSError) as e:
            raise unreadable_shard(path, e, manifest.ref) from None
    return pa.concat_tables(tables)


def read_shard(
    path: Path | str, columns: list[str] | None = None, ref: str | None = None, kind: str = "dataset"
) -> pa.Table:
    """One published Parquet file (of the ``kind`` named ``ref``), every page's checksum checked."""
    try:
        return pq.read_table(path, columns=columns, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as e:
        raise unreadable_shard(path, e, ref, kind) from None


def open_shard(path: Path | str) -> pq.ParquetFile:
    """A published Parquet file opened for streaming: each page's checksum is checked as it is read,
    so the caller turns the reader's errors into ``unreadable_shard``.

    Files are published with page checksums (``manifests.publish.write_parquet``); one written
    before that has none, and is read as before.
    """
    return pq.ParquetFile(path, page_checksum_verification=True)


def shard_batches(
    path: Path | str, ref: str | None = None, batch_size: int = 4096, columns: list[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """Stream a published Parquet file batch by batch, checksums checked; a damaged page is the one
    ``unreadable_shard`` line wherever the stream meets it."""
    try:
        yield from open_shard(path).iter_batches(batch_size=batch_size, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise unreadable_shard(path, e, ref) from None


def unreadable_shard(
    path: Path | str, error: Exception, ref: str | None = None, kind: str = "dataset"
) -> DistilleryError:
    """The one line for a published file that cannot be read.

    Verification may trust a file whose size and time are unchanged since it was last hashed, so
    bytes that rot in place surface here, as the reader's error (a page whose checksum does not
    match, a page that does not decompress): name the file and the way out.
    """
    reason = "".join(c if c.isprintable() and c.isascii() else "?" for c in str(error).split("\n")[0])
    of = f" of {kind} {ref}" if ref else ""
    return DistilleryError(
        f"{path}: cannot read this file{of} ({reason[:160]}); "
        f"run 'distillery manifests verify {ref or f'<{kind}>'}' and restore or rebuild it"
    )


def require_split(manifest: Manifest, split: str | None) -> None:
    """Fail when a dataset has no files of ``split`` (None: of any split), naming the splits it has."""
    if not manifest.data_files(split):
        have = ", ".join(manifest.splits()) or "none"
        raise DistilleryError(f"dataset {manifest.ref} has no split '{split}' (splits: {have})")


def column_names(manifest: Manifest) -> list[str]:
    """The columns of a dataset (from its first shard's footer), after verifying it."""
    ensure_verified(manifest)
    files = manifest.data_files()
    if not files:
        raise DistilleryError(f"{manifest.ref} has no data files")
    try:
        return pq.read_schema(manifest.location / files[0].path).names
    except (pa.ArrowException, OSError) as e:
        raise unreadable_shard(manifest.location / files[0].path, e, manifest.ref) from None


def require_columns(manifest: Manifest, needed: Iterable[str], purpose: str) -> None:
    """Fail before any model loads when a dataset is altered or lacks the columns a stage needs."""
    have = column_names(manifest)
    missing = [c for c in needed if c not in have]
    if missing:
        raise DistilleryError(
            f"dataset {manifest.ref} lacks column(s) {', '.join(missing)} needed for {purpose}; "
            f"it has: {', '.join(have)}"
        )


def jsonl_objects(path: Path, where: str, start: int = 0, end: int | None = None, first_line: int = 1):
    """(line number, parsed value) for each non-blank line of a JSONL file (or a byte range of it).

    Read as bytes and decoded line by line, so that an invalid byte or a malformed line is one
    error naming its line, not a traceback.
    """
    with open(path, "rb") as f:
        f.seek(start)
        line_no = first_line - 1
        while end is None or f.tell() < end:
            raw = f.readline()
            if not raw:
                break
            line_no += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DistilleryError(
                    f"{where} line {line_no}: not UTF-8 text; convert the file to UTF-8"
                ) from None
            if f.tell() == len(raw) and line.startswith("\ufeff"):
                line = line[1:]  # a byte-order mark some editors and exporters put before the first line
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise DistilleryError(
                    f"{where} line {line_no}: not valid JSON ({e.msg}); fix or remove the line"
                ) from None
            # JSON may escape a lone surrogate ("\ud800"): valid JSON but not text (web dumps have them);
            # it becomes U+FFFD, as an invalid byte does in a decoder with errors="replace".
            yield line_no, _repaired(value) if "\\ud" in line.lower() else value


_SURROGATE = re.compile("[\ud800-\udfff]")


def _repaired(value):
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_repaired(v) for v in value]
    if isinstance(value, dict):
        return {_repaired(k): _repaired(v) for k, v in value.items()}
    return value
