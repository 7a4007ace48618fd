"""Verification: does an artefact on disk still match its manifest?

``verify`` re-hashes every file. ``ensure_verified`` is what stages call before reading an
input: it may skip re-hashing a file whose size and mtime are unchanged since the last full
verification (a cache kept in ``<store>/.cache/verified``), and otherwise re-hashes.

Both also check the manifest itself, every time: its id against the fields it hashes, its
``digest`` against all of its fields, its folder against its id, name and kind, and the row
counts it claims against the Parquet footers. A manifest published before the digest existed
("unsealed") still loads and verifies its files, but its stats and producer cannot be checked:
``verify`` warns, and re-running the stage that made it (same id) seals it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.errors import VerificationError
from manifests.hashing import manifest_id, sha256_file
from manifests.schema import Manifest


@dataclass
class VerifyReport:
    manifest: Manifest
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    altered: list[str] = field(default_factory=list)
    checked: int = 0
    unsealed: bool = False
    """The manifest has no integrity digest (published before it existed): its files were checked,
    its stats and producer could not be."""

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.altered)

    def problem_line(self) -> str:
        parts = []
        for label, paths in (("altered", self.altered), ("missing", self.missing), ("extra", self.extra)):
            if paths:
                parts.append(f"{label}: " + ", ".join(paths))
        where = self.manifest.location
        return (
            f"{self.manifest.ref} at {where} does not match its manifest ({'; '.join(parts)}); "
            "re-run the stage that made it or restore the files"
        )


def _cache_file(manifest: Manifest) -> Path | None:
    """``<store>/.cache/verified/<id>.json`` for a manifest inside a store, else None."""
    folder = manifest.location
    if folder.name != manifest.id or folder.parent.parent.name != f"{manifest.kind}s":
        return None  # read by path from outside a store: always re-hash
    return folder.parent.parent.parent / ".cache" / "verified" / f"{manifest.id}.json"


def content_id(manifest: Manifest) -> str:
    """The id that ``manifest``'s own fields hash to (equal to ``manifest.id`` unless edited)."""
    return manifest_id(
        kind=manifest.kind,
        files=[(f.path, f.sha256) for f in manifest.files + manifest.ledger],
        arrow_schema=manifest.arrow_schema,
        parent_ids=[p.id for p in manifest.parents],
        recipe=manifest.producer.recipe,
        schema_version=manifest.schema_version,
    )


def manifest_edited(manifest: Manifest) -> bool:
    """Whether ``manifest``'s own fields were changed after publishing (no file is read).

    Its id must still be the hash of what it describes, its digest the hash of all its fields, and
    a manifest in a store must sit in ``<kind>s/<name>/<id>/``.
    """
    try:
        folder: Path | None = manifest.location
    except ValueError:  # built in memory, not read from a folder
        folder = None
    if content_id(manifest) != manifest.id:
        return True
    if manifest.digest is not None and manifest.digest != manifest.integrity_digest():
        return True
    if folder is not None:
        if folder.name != manifest.id:
            return True
        if _cache_file(manifest) is not None and folder.parent.name != manifest.name:
            return True  # in a store: the name folder is the name it was published under
    return False


def _rows_differ(path: Path, entry) -> bool:
    """The Parquet footer of an intact file disagrees with the row count the manifest claims."""
    if entry.rows is None or not entry.path.endswith(".parquet"):
        return False
    try:
        return pq.ParquetFile(path).metadata.num_rows != entry.rows
    except (OSError, pa.ArrowException):
        return True  # not Parquet, yet listed with rows: the manifest says what the file is not


def verify(manifest: Manifest, *, use_cache: bool = False) -> VerifyReport:
    """Check every file of ``manifest`` (missing, extra, altered); re-hash unless cached."""
    root = manifest.location
    report = VerifyReport(manifest)
    cache_path = _cache_file(manifest)
    cache: dict[str, list] = {}
    if use_cache and cache_path is not None and cache_path.is_file():
        try:
            cache = json.loads(cache_path.read_text())
        except (OSError, ValueError):
            cache = {}
    fresh: dict[str, list] = {}
    # The manifest itself edited: a hash rewritten to match an altered shard, rows or stats changed…
    edited = manifest_edited(manifest)
    report.unsealed = manifest.digest is None
    expected = {f.path: f for f in manifest.files + manifest.ledger}
    for rel, entry in sorted(expected.items()):
        path = root / rel
        if not path.is_file():
            report.missing.append(rel)
            continue
        st = path.stat()
        # What the manifest claims is part of the stamp: an edited claim is checked again.
        stamp = [st.st_size, st.st_mtime_ns, entry.sha256, entry.bytes, entry.rows]
        report.checked += 1
        if use_cache and cache.get(rel) == stamp:
            fresh[rel] = stamp
            continue
        if sha256_file(path) != entry.sha256:
            report.altered.append(rel)
        elif st.st_size != entry.bytes or _rows_differ(path, entry):
            edited = True  # the file is the one published; the manifest's numbers about it are not
        else:
            fresh[rel] = stamp
    if edited:
        report.altered.insert(0, "manifest.json")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel != "manifest.json" and rel not in expected:
            report.extra.append(rel)
    if report.ok and cache_path is not None:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(fresh))
            os.replace(tmp, cache_path)
        except OSError:
            pass  # a read-only store still verifies; it just re-hashes next time
    return report


def ensure_verified(manifest: Manifest) -> None:
    """Raise a one-line ``VerificationError`` unless ``manifest``'s files are intact."""
    report = verify(manifest, use_cache=True)
    if not report.ok:
        raise VerificationError(report.problem_line())
