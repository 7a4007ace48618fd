"""Reading WARC and WET files: HTTP responses (HTML extracted) or extracted-text records, one row each.

A record's id hashes the file's path as given, its byte offset and its URL; a crawl dataset's WARC
file also gets each record's index row as its parent. What cannot become a document is a ledger
entry, not a crash: a response of another content type or HTTP status, a payload too large, an
extraction that fails or times out, a body that cannot be decoded, and a record the file ends inside
(``truncated_record``, e.g. a crawl killed mid-write or a download cut short)::

    {"id": "…", "step": "corpus.build.read", "action": "drop", "reason": "truncated_record",
     "detail": "{\"offset\": 18344, \"url\": \"https://example.com/b\", \"warc_type\": \"response\"}"}

Bytes after the last whole record that are no WARC record at all are one error line instead: the
file is not a WARC file, or it is damaged at that byte.
"""

from __future__ import annotations

import contextlib
import io
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
from warcio.exceptions import ArchiveLoadFailed
from warcio.statusandheaders import StatusAndHeadersParserException

from corpus.extract import ExtractLimits, extract_html
from corpus.records import Batcher, ReadLog, Task, display_path, source_pointer
from manifests.data import read_shard
from manifests.errors import DistilleryError
from manifests.hashing import record_id


def _crawl_index(task: Task) -> dict[int, list[str]]:
    """WARC offset → [index row id] for a crawl dataset's WARC file (empty for plain files)."""
    found: dict[int, list[str]] = {}
    for path in task.index_files:
        table = read_shard(path, ["id", "warc_file", "warc_offset"], task.dataset)
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


def read_warc(
    task: Task, batcher: Batcher, log: ReadLog, limits: ExtractLimits, content_types: list[str]
) -> Iterator[pa.RecordBatch]:
    """Stream the documents of one WARC or WET file (``task.format``) into ``batcher``; skips go to ``log``.

    ``content_types`` are the response types kept (prefixes of ``Content-Type``); ``limits`` bound
    each payload's size and extraction time.
    """
    from warcio.archiveiterator import ArchiveIterator

    path = Path(task.files[0])
    uri, sha = display_path(path), task.sha256[0]
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
            elif not any((content_type or "").lower().startswith(t) for t in content_types):
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
                   "source": source_pointer(uri, sha, offset=offset, url=url, fetch_date=date, http_status=status,
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
