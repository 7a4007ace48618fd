"""Content addressing: file hashes and the manifest id."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal values hash equally."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)


def manifest_id(
    *,
    kind: str,
    files: Iterable[tuple[str, str]],
    arrow_schema: str | None,
    parent_ids: Iterable[str],
    recipe: dict[str, Any],
    schema_version: int,
) -> str:
    """The id of a manifest: a hash over what it *is*, not when or where it was made.

    Timings, hostnames and the git commit are left out on purpose: the same inputs and the same
    resolved recipe give the same id on any machine, and one changed byte in any file gives a new
    one.
    """
    payload = {
        "schema_version": schema_version,
        "kind": kind,
        "files": sorted(files),
        "arrow_schema": arrow_schema,
        "parents": sorted(parent_ids),
        "recipe": recipe,
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def record_id(*parts: object) -> str:
    """A stable record id (80 bits, hex) from the parts that identify a record."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode())
    return h.hexdigest()[:20]


RACY_SECONDS = 2.0
"""A file changed this recently is hashed but not remembered: a write within the same tick of a
coarse file clock (whole seconds on some filesystems) could leave its size and times as they were."""


class FileHashes:
    """sha256 of input files, remembered between runs in ``folder`` (a store's cache): a rerun over
    unchanged inputs reads none of them again.

    A hash is reused only while the file's resolved path, size, mtime, ctime and inode are those it was
    hashed with. (Verification's cache trusts size and mtime; an input also needs ctime and inode,
    which no tool can set back: a file replaced by a copy that kept the old size and mtime, as
    ``cp -p`` or an archive with fixed times does, is hashed again.) One JSON file per folder of
    inputs, written atomically when ``save`` is called; a cache that cannot be written or read is a
    cache miss, never an error.

        {"folder": "/data/web", "files": {"part-0.jsonl": [size, mtime_ns, ctime_ns, inode, "sha256…"]}}
    """

    def __init__(self, folder: Path | None):
        self.folder = folder
        self._known: dict[Path, dict[str, list]] = {}
        self._fresh: dict[Path, dict[str, list]] = {}
        self._this_run: dict[Path, list] = {}

    def sha256(self, path: Path) -> str:
        """The file's sha256: remembered while its stamp is unchanged, else read and hashed."""
        path = Path(path).resolve()
        stamp = _stamp(path)
        for known in (self._this_run.get(path), self._entries(path.parent).get(path.name)):
            if known is not None and known[:-1] == stamp:
                return known[-1]
        started = time.time_ns()
        digest = sha256_file(path)
        if _stamp(path) == stamp:  # else it changed while being read, and is remembered by no one
            self._this_run[path] = [*stamp, digest]
            if max(stamp[1], stamp[2]) < started - RACY_SECONDS * 1e9:
                self._fresh.setdefault(path.parent, {})[path.name] = [*stamp, digest]
        return digest

    def save(self) -> None:
        """Write the hashes computed since the last save, merged with what the cache holds now (another
        run may have written it meanwhile)."""
        if self.folder is None:
            return
        for parent, fresh in self._fresh.items():
            file = self._file(parent)
            entries = {**_read_entries(file, parent), **fresh}
            try:
                file.parent.mkdir(parents=True, exist_ok=True)
                tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps({"folder": str(parent), "files": entries}))
                os.replace(tmp, file)
            except OSError:
                pass  # a read-only store still builds; it just hashes again next time
            self._known[parent] = entries
        self._fresh = {}

    def _entries(self, parent: Path) -> dict[str, list]:
        if parent not in self._known:
            self._known[parent] = _read_entries(self._file(parent), parent) if self.folder is not None else {}
        return self._known[parent]

    def _file(self, parent: Path) -> Path:
        assert self.folder is not None
        return self.folder / f"{hashlib.sha256(str(parent).encode()).hexdigest()[:32]}.json"


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _read_entries(file: Path, parent: Path) -> dict[str, list]:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    if (
        not isinstance(data, dict)
        or data.get("folder") != str(parent)
        or not isinstance(data.get("files"), dict)
    ):
        return {}
    return data["files"]
