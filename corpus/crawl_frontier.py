"""The crawl's persisted state: the frontier (SQLite) and the WARC files it points into.

Both live in a work folder under the store (``<store>/datasets/<name>/.crawl-<key>/``)::

    frontier.sqlite        # every URL seen, its state and why; stored pages; robots.txt cache
    warc/crawl-00000.warc.gz

A page counts as stored once its records are flushed to the WARC file *and* its row (with the
links it yields) is committed, in that order. A killed crawl therefore leaves at worst some
bytes after the last committed record; ``WarcSink`` cuts them on resume, and pages whose bytes
went missing go back to pending. Nothing committed is fetched again.

URL states: ``pending`` → ``fetching`` → ``stored`` or ``dropped`` (with a reason code), and
``redirected`` for a redirect target claimed by the URL (``via``) whose chain reached it.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from corpus.crawl_policy import host_key
from manifests.errors import DistilleryError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS urls (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    url TEXT NOT NULL UNIQUE,
    host TEXT NOT NULL,
    depth INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    detail TEXT,
    via TEXT
);
CREATE INDEX IF NOT EXISTS urls_by_host ON urls (state, host, seq);
CREATE TABLE IF NOT EXISTS pages (
    url TEXT PRIMARY KEY,
    final_url TEXT NOT NULL,
    status INTEGER NOT NULL,
    content_type TEXT,
    fetch_date TEXT NOT NULL,
    depth INTEGER NOT NULL,
    warc_file TEXT NOT NULL,
    warc_offset INTEGER NOT NULL,
    warc_length INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS robots (
    origin TEXT PRIMARY KEY,
    status INTEGER NOT NULL,
    body BLOB NOT NULL,
    fetched_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

ROBOTS_MAX_AGE_S = 24 * 3600
"""RFC 9309 2.4: a cached robots.txt should not be used for more than 24 hours."""


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold the work folder for this process: two crawls of one recipe would corrupt each other."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DistilleryError(
                f"another crawl of this recipe is running in {folder}; wait for it or stop it"
            ) from None
        yield
    finally:
        os.close(fd)


@dataclass
class PageRow:
    """A stored page: where its response record is, and what it was."""

    url: str
    final_url: str
    status: int
    content_type: str | None
    fetch_date: str
    depth: int
    warc_file: str
    """The file's name in the work folder's ``warc/`` (and in the dataset's)."""
    warc_offset: int
    warc_length: int
    bytes: int


@dataclass
class LinkRow:
    """A link found on a stored page: ``pending``, or ``dropped`` with a reason (out of scope…)."""

    url: str
    depth: int
    state: str = "pending"
    reason: str | None = None
    detail: dict[str, Any] | None = None


class Frontier:
    """Every URL of one crawl and what became of it, in SQLite (one process at a time)."""

    def __init__(self, path: Path):
        self.db = sqlite3.connect(path)
        # WAL: a commit costs no fsync of the main file; a lost commit only means a refetch.
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        self.pending_hosts: dict[str, None] = {}
        """Hosts that may have pending URLs, in the order they were first seen (for fair dispatch)."""

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Frontier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def recover(self) -> None:
        """Undo what a killed run left half-done: fetches in flight and the redirects they claimed."""
        with self.db:
            self.db.execute(
                "DELETE FROM urls WHERE state = 'redirected' AND via IN "
                "(SELECT url FROM urls WHERE state IN ('pending', 'fetching'))"
            )
            self.db.execute("UPDATE urls SET state = 'pending' WHERE state = 'fetching'")
        rows = self.db.execute(
            "SELECT host FROM urls WHERE state = 'pending' GROUP BY host ORDER BY MIN(seq)"
        ).fetchall()
        self.pending_hosts = dict.fromkeys(r[0] for r in rows)

    # --- URLs ---------------------------------------------------------------------------------

    def _add(self, row: LinkRow) -> None:
        detail = json.dumps(row.detail, sort_keys=True) if row.detail else None
        cursor = self.db.execute(
            "INSERT OR IGNORE INTO urls (url, host, depth, state, reason, detail) VALUES (?, ?, ?, ?, ?, ?)",
            (row.url, host_key(row.url), row.depth, row.state, row.reason, detail),
        )
        if row.state != "pending":
            return
        if cursor.rowcount == 0:
            # Reached again by a shorter path: a URL first seen too deep becomes crawlable, and a
            # pending one passes the smaller depth on to its links.
            cursor = self.db.execute(
                "UPDATE urls SET state = 'pending', reason = NULL, detail = NULL, depth = ? "
                "WHERE url = ? AND state = 'dropped' AND reason = 'too_deep'",
                (row.depth, row.url),
            )
            self.db.execute(
                "UPDATE urls SET depth = ? WHERE url = ? AND state = 'pending' AND depth > ?",
                (row.depth, row.url, row.depth),
            )
        if cursor.rowcount:
            self.pending_hosts.setdefault(host_key(row.url), None)

    def add(self, rows: list[LinkRow]) -> None:
        with self.db:
            for row in rows:
                self._add(row)

    def take(self, host: str) -> tuple[str, int] | None:
        """The next pending URL of ``host`` (now ``fetching``) and its depth; None when it has none."""
        row = self.db.execute(
            "SELECT url, depth FROM urls WHERE state = 'pending' AND host = ? ORDER BY seq LIMIT 1", (host,)
        ).fetchone()
        if row is None:
            self.pending_hosts.pop(host, None)
            return None
        with self.db:
            self.db.execute("UPDATE urls SET state = 'fetching' WHERE url = ?", (row[0],))
        return row[0], row[1]

    def claim(self, url: str, via: str, depth: int) -> bool:
        """Reserve a redirect target for the chain started at ``via``; False if the URL is known."""
        with self.db:
            cursor = self.db.execute(
                "INSERT OR IGNORE INTO urls (url, host, depth, state, via) VALUES (?, ?, ?, 'redirected', ?)",
                (url, host_key(url), depth, via),
            )
        return cursor.rowcount == 1

    def drop(self, url: str, reason: str, detail: dict[str, Any] | None, requests: int) -> None:
        with self.db:
            self.db.execute(
                "UPDATE urls SET state = 'dropped', reason = ?, detail = ? WHERE url = ?",
                (reason, json.dumps(detail, sort_keys=True) if detail else None, url),
            )
            self._set_meta("requests", requests)

    def store_page(self, page: PageRow, links: list[LinkRow], requests: int) -> None:
        """Commit a page written to WARC together with its links: both or neither survive a kill."""
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO pages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (page.url, page.final_url, page.status, page.content_type, page.fetch_date, page.depth,
                 page.warc_file, page.warc_offset, page.warc_length, page.bytes),
            )  # fmt: skip
            self.db.execute("UPDATE urls SET state = 'stored' WHERE url = ?", (page.url,))
            for link in links:
                self._add(link)
            self._set_meta("requests", requests)

    def forget_pages(self, warc_file: str, valid_bytes: int) -> int:
        """Pages of ``warc_file`` whose records end past ``valid_bytes`` go back to pending."""
        lost = [
            r[0]
            for r in self.db.execute(
                "SELECT url FROM pages WHERE warc_file = ? AND warc_offset + warc_length > ?",
                (warc_file, valid_bytes),
            )
        ]
        with self.db:
            for url in lost:
                # 'fetching', like a fetch in flight at the kill: ``recover`` re-queues it.
                self.db.execute("DELETE FROM pages WHERE url = ?", (url,))
                self.db.execute("UPDATE urls SET state = 'fetching' WHERE url = ?", (url,))
        return len(lost)

    # --- reading ------------------------------------------------------------------------------

    def count(self, state: str) -> int:
        return self.db.execute("SELECT COUNT(*) FROM urls WHERE state = ?", (state,)).fetchone()[0]

    def warc_end(self, warc_file: str) -> int:
        row = self.db.execute(
            "SELECT MAX(warc_offset + warc_length) FROM pages WHERE warc_file = ?", (warc_file,)
        ).fetchone()
        return row[0] or 0

    def warc_files(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT warc_file FROM pages ORDER BY warc_file")]

    def pages(self) -> list[PageRow]:
        rows = self.db.execute("SELECT * FROM pages ORDER BY warc_file, warc_offset").fetchall()
        return [PageRow(*r) for r in rows]

    def unstored(self) -> list[tuple[str, str, str, dict[str, Any]]]:
        """``(url, state, reason, detail)`` of every URL that is neither stored nor a redirect target."""
        rows = self.db.execute(
            "SELECT url, state, reason, detail FROM urls WHERE state IN ('dropped', 'pending') ORDER BY seq"
        )
        return [(u, s, r, json.loads(d) if d else {}) for u, s, r, d in rows]

    # --- robots.txt and counters --------------------------------------------------------------

    def robots(self, origin: str) -> tuple[int, bytes] | None:
        row = self.db.execute(
            "SELECT status, body FROM robots WHERE origin = ? AND fetched_at > ?",
            (origin, time.time() - ROBOTS_MAX_AGE_S),
        ).fetchone()
        return (row[0], bytes(row[1])) if row else None

    def save_robots(self, origin: str, status: int, body: bytes) -> None:
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO robots VALUES (?, ?, ?, ?)", (origin, status, body, time.time())
            )

    def _set_meta(self, key: str, value: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def meta(self, key: str) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else 0


@dataclass
class FetchedPage:
    """What ``WarcSink`` needs to write one exchange."""

    url: str
    fetched_at: datetime
    request_line: str
    request_headers: list[tuple[str, str]]
    http_version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes


# The body is stored decoded (no gzip, no chunking), as Common Crawl does; the headers that
# described the encoding on the wire are kept under X-Crawler- names, so that a WARC reader
# does not try to decode the payload a second time.
_WIRE_HEADERS = {"content-encoding", "transfer-encoding", "content-length"}


class WarcSink:
    """The crawl's WARC files: a request and a response record per page, rotated by size."""

    def __init__(self, folder: Path, frontier: Frontier, max_file_bytes: int, warcinfo: dict[str, str]):
        self.folder = folder
        self.frontier = frontier
        self.max_file_bytes = max_file_bytes
        self.warcinfo = warcinfo
        self._file: BinaryIO | None = None
        self._writer: WARCWriter | None = None
        self._name = ""
        folder.mkdir(parents=True, exist_ok=True)

    def repair(self) -> None:
        """Cut what follows the last committed record of each file; pages whose bytes are gone are
        marked for refetching (``Frontier.recover`` re-queues them)."""
        on_disk = {p.name for p in self.folder.glob("crawl-*.warc.gz")}
        for name in self.frontier.warc_files():
            if name not in on_disk:
                self.frontier.forget_pages(name, 0)
        for name in sorted(on_disk):
            path = self.folder / name
            self.frontier.forget_pages(name, path.stat().st_size)
            end = self.frontier.warc_end(name)
            if end == 0:
                path.unlink()
            elif path.stat().st_size > end:
                with open(path, "r+b") as f:
                    f.truncate(end)

    def _open(self) -> None:
        existing = sorted(self.folder.glob("crawl-*.warc.gz"))
        if existing and existing[-1].stat().st_size < self.max_file_bytes:
            path = existing[-1]
        else:
            index = int(existing[-1].name.split("-")[1].split(".")[0]) + 1 if existing else 0
            path = self.folder / f"crawl-{index:05d}.warc.gz"
        self._name = path.name
        self._file = open(path, "ab")  # noqa: SIM115 - stays open across writes; close() closes it
        self._file.seek(0, 2)
        self._writer = WARCWriter(self._file, gzip=True)
        if self._file.tell() == 0:
            self._writer.write_record(self._writer.create_warcinfo_record(path.name, self.warcinfo))

    def write(self, page: FetchedPage) -> tuple[str, int, int]:
        """Append the exchange; returns ``(file name, response offset, response length)``."""
        if self._file is not None and self._file.tell() >= self.max_file_bytes:
            self.close()
        if self._file is None:
            self._open()
        assert self._file is not None and self._writer is not None
        date = page.fetched_at.strftime("%Y-%m-%dT%H:%M:%SZ")
        headers = [(f"X-Crawler-{k}" if k.lower() in _WIRE_HEADERS else k, v) for k, v in page.headers]
        headers.append(("Content-Length", str(len(page.body))))
        response = self._writer.create_warc_record(
            page.url, "response", payload=BytesIO(page.body), length=len(page.body),
            http_headers=StatusAndHeaders(f"{page.status} {page.reason}".strip(), headers, protocol=page.http_version),
            warc_headers_dict={"WARC-Date": date},
        )  # fmt: skip
        request = self._writer.create_warc_record(
            page.url, "request",
            http_headers=StatusAndHeaders(page.request_line, page.request_headers, is_http_request=True),
            warc_headers_dict={"WARC-Date": date, "WARC-Concurrent-To": response.rec_headers.get_header("WARC-Record-ID")},
        )  # fmt: skip
        self._writer.write_record(request)
        offset = self._file.tell()
        self._writer.write_record(response)
        self._file.flush()
        return self._name, offset, self._file.tell() - offset

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = self._writer = None
