"""The request cache: every answer a teacher gave, keyed by everything that determined it.

A request's key is the SHA-256 of the canonical JSON of its endpoint, model, messages (system
prompt included), sampling parameters, seed and sample index (``request_key``). An answer is
written the moment it arrives (SQLite in WAL mode, one small transaction each), so a run that is
killed and started again re-sends nothing that was answered, and a changed prompt re-sends only
itself. Failures are never cached: a rerun tries them again.

The same file holds the Batch API jobs of ``synth/batch.py`` (``BatchJobs``): this module is the
one owner of its SQLite connection, and every error it raises is one line (``RunFailed``).

The cache lives in the store (``<store>/cache/synth.sqlite``) and is shared by every synth run
of that store: two recipes asking the same question pay for it once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from manifests.errors import RunFailed
from manifests.hashing import canonical_json


def request_key(
    endpoint: str, model: str, messages: list[dict], sampling: dict[str, Any], sample_index: int
) -> str:
    """The key of one request: everything that determines its answer."""
    payload = {
        "endpoint": endpoint,
        "model": model,
        "messages": messages,
        "sampling": sampling,
        "n": sample_index,
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


class RequestCache:
    """Answers by request key, in one SQLite file; safe to share between threads of one process."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._failed: RunFailed | None = None
        """The first write that failed: a locked file makes every write wait out SQLite's timeout (with
        the event loop blocked), so once one failed the next ones fail at once."""
        with self._sqlite():
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives a killed process (not a power cut), at no fsync per answer.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, answer TEXT NOT NULL, created REAL NOT NULL)"
            )

    @contextlib.contextmanager
    def _sqlite(self) -> Iterator[None]:
        """SQLite's errors (a damaged or locked file, a store that cannot be written) as one clear line."""
        try:
            yield
        except sqlite3.Error as e:
            what = str(e)
            if "locked" in what or "busy" in what:
                fix = "another process holds it; let that one finish, then run again"
            elif isinstance(e, sqlite3.OperationalError):
                fix = "check that the store is writable and has free space"
            else:  # "file is not a database", "database disk image is malformed"
                fix = "it is damaged: move it away (its answers are then asked again) and run again"
            raise RunFailed(f"request cache {self.path}: {what}; {fix}") from None

    def get_many(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        with self._lock, self._sqlite():
            for lo in range(0, len(keys), 500):
                chunk = keys[lo : lo + 500]
                marks = ",".join("?" * len(chunk))
                for key, answer in self._db.execute(
                    f"SELECT key, answer FROM answers WHERE key IN ({marks})", chunk
                ):
                    found[key] = json.loads(answer)
        return found

    def put(self, key: str, answer: dict[str, Any]) -> None:
        if self._failed is not None:
            raise self._failed
        try:
            with self._lock, self._sqlite():
                self._db.execute(
                    "INSERT OR REPLACE INTO answers (key, answer, created) VALUES (?, ?, ?)",
                    (key, json.dumps(answer, sort_keys=True), time.time()),
                )
        except RunFailed as e:
            self._failed = e
            raise

    def execute(self, sql: str, parameters: tuple = ()) -> list[tuple]:
        """One statement on the cache's file (its other tables: ``BatchJobs``), errors as one line."""
        with self._lock, self._sqlite():
            return self._db.execute(sql, parameters).fetchall()

    def __len__(self) -> int:
        with self._lock, self._sqlite():
            return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class BatchJobs:
    """The ``batches`` table beside ``answers``, in the request cache's file and through its connection
    (``synth/batch.py`` records its Batch API jobs here): one owner of the file, so that a locked or
    damaged one is the same one line whichever path meets it first."""

    def __init__(self, cache: RequestCache):
        self._cache = cache
        cache.execute(
            "CREATE TABLE IF NOT EXISTS batches (batch_id TEXT PRIMARY KEY, teacher TEXT NOT NULL, "
            "endpoint TEXT NOT NULL, keys TEXT NOT NULL, status TEXT NOT NULL, created REAL NOT NULL)"
        )

    def open_jobs(self, endpoints: set[str]) -> list[tuple[str, str, dict[str, dict[str, Any]], float]]:
        """(batch id, endpoint, entries by key, created) of the jobs not yet collected, oldest first."""
        rows = self._cache.execute(
            "SELECT batch_id, endpoint, keys, created FROM batches "
            "WHERE status NOT IN ('collected', 'lost') ORDER BY created"
        )
        return [(b, e, json.loads(k), c) for b, e, k, c in rows if e in endpoints]

    def add(self, batch_id: str, teacher: str, endpoint: str, entries: dict[str, Any], status: str) -> None:
        self._cache.execute(
            "INSERT OR REPLACE INTO batches VALUES (?, ?, ?, ?, ?, ?)",
            (batch_id, teacher, endpoint, json.dumps(entries, sort_keys=True), status, time.time()),
        )

    def rename(self, old: str, new: str, status: str) -> None:
        self._cache.execute(
            "UPDATE batches SET batch_id = ?, status = ? WHERE batch_id = ?", (new, status, old)
        )

    def set_status(self, batch_id: str, status: str) -> None:
        self._cache.execute("UPDATE batches SET status = ? WHERE batch_id = ?", (status, batch_id))
