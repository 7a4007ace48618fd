"""Atomic publishing: a job writes into a hidden temporary folder; the manifest goes in last.

    with Publisher(store, kind="dataset", name="demo-corpus", stage="corpus.build",
                   recipe=resolved, seed=0) as pub:
        pub.write_table(table, split="train")
        pub.write_ledger(ledger_table, step="corpus.build")
        manifest = pub.publish(stats={"rows_out": table.num_rows})

If the block raises, the temporary folder is removed; if the process is killed, the folder stays
as ``.tmp-…`` (never listed, never resolved) and a later run of the same recipe publishes anew.
Publishing the same content twice yields the same id and keeps the first copy.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from manifests import __version__
from manifests.errors import DistilleryError
from manifests.hashing import manifest_id, sha256_file
from manifests.provenance import git_state, hardware, library_versions
from manifests.schema import SCHEMA_VERSION, FileEntry, Kind, Manifest, ParentRef, Producer
from manifests.store import OWNER_PREFIX, Store, claim_work_folder, folder_owner_running, load_manifest
from manifests.verify import verify

LEDGER_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("step", pa.string()),
        ("action", pa.string()),
        ("reason", pa.string()),
        ("score", pa.float64()),
        ("detail", pa.string()),
    ]
)
"""Ledger rows: which record, which step, ``drop``/``change``/``flag``, a reason code, an optional
score and a JSON ``detail`` (e.g. ``{"duplicate_of": "…"}``) — never the record's text."""


_SECRET_KEY = re.compile(
    r"(^|_)(api_key|apikey|secret|password|access_token|auth_token|bearer)$", re.IGNORECASE
)


def refuse_secrets(recipe: Any, path: str = "") -> None:
    """Fail if a recipe holds a secret value: manifests name secrets by environment variable only."""
    if isinstance(recipe, dict):
        for key, value in recipe.items():
            where = f"{path}.{key}" if path else str(key)
            if _SECRET_KEY.search(str(key)) and isinstance(value, str) and value:
                raise DistilleryError(
                    f"recipe key '{where}' holds a secret; name its environment variable instead "
                    f"('{key}_env: MY_API_KEY') so that it never enters a manifest"
                )
            refuse_secrets(value, where)
    elif isinstance(recipe, list):
        for i, value in enumerate(recipe):
            refuse_secrets(value, f"{path}[{i}]")


def now() -> datetime:
    return datetime.now(timezone.utc)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


PARQUET_OPTIONS = {"compression": "zstd", "write_page_checksum": True}
"""How every published Parquet file is written. The page checksums (CRC32) let readers catch bytes
that rot in place: verification trusts a file whose size and mtime are unchanged, and a damaged
compressed page can otherwise decode to garbage without an error."""


def write_parquet(table: pa.Table, path: Path | str) -> None:
    """Write one Parquet file of an artefact (``PARQUET_OPTIONS``)."""
    pq.write_table(table, path, **PARQUET_OPTIONS)


class ShardWriter:
    """Writes batches into consecutive Parquet shards of ``shard_rows`` rows (memory: one batch).

    ``next_path()`` names each new shard; ``conform(batch)`` gives every batch the shards' schema.
    """

    def __init__(
        self,
        next_path: Callable[[], Path],
        conform: Callable[[pa.RecordBatch], pa.RecordBatch],
        shard_rows: int,
    ):
        self.next_path, self.conform, self.shard_rows = next_path, conform, shard_rows
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_shard = 0
        self.rows = 0
        self.paths: list[Path] = []

    def write(self, batch: pa.RecordBatch) -> None:
        while batch.num_rows:
            if self._writer is None:
                batch = self.conform(batch)
                self.paths.append(self.next_path())
                self._writer = pq.ParquetWriter(self.paths[-1], batch.schema, **PARQUET_OPTIONS)
                self._rows_in_shard = 0
            room = self.shard_rows - self._rows_in_shard
            part, batch = batch.slice(0, room), batch.slice(room)
            self._writer.write_batch(self.conform(part))
            self._rows_in_shard += part.num_rows
            self.rows += part.num_rows
            if self._rows_in_shard >= self.shard_rows:
                self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Publisher:
    """Collects the files of one artefact and publishes them with their manifest, atomically."""

    def __init__(
        self,
        store: Store,
        *,
        kind: Kind,
        name: str,
        stage: str,
        recipe: dict[str, Any],
        parents: list[Manifest] | None = None,
        parent_roles: dict[str, str] | None = None,
        seed: int | None = None,
        execution: dict[str, Any] | None = None,
    ):
        refuse_secrets(recipe)
        self.store = store
        self.kind = kind
        self.name = name
        self.stage = stage
        self.recipe = recipe
        self.parents = parents or []
        self.parent_roles = parent_roles or {}
        self.seed = seed
        self.execution = execution or {}
        self.started_at = now()
        self.dir = (
            store.name_dir(kind, name) / f".tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"
        )
        self._splits: dict[str, str] = {}
        self._shards: dict[str, int] = {}
        self._schema: pa.Schema | None = None

    def __enter__(self) -> Publisher:
        self._remove_stale()
        claim_work_folder(self.dir)
        return self

    def _remove_stale(self) -> None:
        """Remove what killed jobs of this name left on this host (their process is gone)."""
        folder = self.dir.parent
        if not folder.is_dir():
            return
        for tmp in folder.glob(".tmp-*"):
            if tmp.is_dir() and folder_owner_running(tmp) is False:
                shutil.rmtree(tmp, ignore_errors=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)
        if exc_type is not None:
            self.store.remove_name_if_empty(self.kind, self.name)

    @property
    def schema(self) -> pa.Schema | None:
        """The schema of the shards written so far (None before the first)."""
        return self._schema

    def _next_shard(self, split: str) -> tuple[str, Path]:
        index = self._shards.get(split, 0)
        self._shards[split] = index + 1
        rel = f"data/{split}-{index:05d}.parquet"
        path = self.dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        self._splits[rel] = split
        return rel, path

    def _conform(self, table: pa.Table | pa.RecordBatch):
        if self._schema is None:
            self._schema = table.schema
        elif not table.schema.equals(self._schema):
            table = table.cast(self._schema)
        return table

    def write_table(self, table: pa.Table, split: str = "train") -> Path:
        """Write one Parquet shard of ``split``; all shards of an artefact share one schema."""
        table = self._conform(table)
        _, path = self._next_shard(split)
        write_parquet(table, path)
        return path

    def shard_writer(self, split: str = "train", shard_rows: int = 50_000) -> ShardWriter:
        """Stream batches into shards of ``shard_rows`` rows, holding one batch at a time."""
        return ShardWriter(lambda: self._next_shard(split)[1], self._conform, shard_rows)

    def add_shard(self, source: Path, split: str = "train") -> None:
        """Take a finished Parquet file, written elsewhere with this artefact's schema, as the next
        shard of ``split`` (a hard link where the filesystem allows: no copy, and the source stays)."""
        schema = pq.read_schema(source).remove_metadata()
        if self._schema is None:
            self._schema = schema
        elif not schema.equals(self._schema, check_metadata=False):
            raise ValueError(f"{source}: schema differs from this artefact's shards")
        _, path = self._next_shard(split)
        try:
            os.link(source, path)
        except OSError:
            shutil.copyfile(source, path)

    def write_ledger(self, rows: list[dict[str, Any]] | pa.Table, step: str) -> Path | None:
        """Write the ledger of one step (dropped/changed records, without their text)."""
        table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=LEDGER_SCHEMA)
        if table.num_rows == 0:
            return None
        path = self.dir / "ledger" / f"{step}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_parquet(table.cast(LEDGER_SCHEMA), path)
        return path

    def _entries(self) -> tuple[list[FileEntry], list[FileEntry]]:
        files: list[FileEntry] = []
        ledger: list[FileEntry] = []
        for path in sorted(p for p in self.dir.rglob("*") if p.is_file()):
            rel = path.relative_to(self.dir).as_posix()
            if rel == "manifest.json" or (path.parent == self.dir and path.name.startswith(OWNER_PREFIX)):
                continue  # the owner record belongs to the unfinished folder, not to the artefact
            rows = pq.ParquetFile(path).metadata.num_rows if rel.endswith(".parquet") else None
            entry = FileEntry(
                path=rel, sha256=sha256_file(path), bytes=path.stat().st_size, rows=rows,
                split=self._splits.get(rel),
            )  # fmt: skip
            (ledger if rel.startswith("ledger/") else files).append(entry)
        return files, ledger

    def publish(self, stats: dict[str, Any] | None = None, arrow_schema: pa.Schema | None = None) -> Manifest:
        """Hash every file, write ``manifest.json`` last, and rename the folder into place."""
        files, ledger = self._entries()
        schema = arrow_schema or self._schema
        schema_text = schema.to_string(show_schema_metadata=False) if schema is not None else None
        id_ = manifest_id(
            kind=self.kind,
            files=[(f.path, f.sha256) for f in files + ledger],
            arrow_schema=schema_text,
            parent_ids=[p.id for p in self.parents],
            recipe=self.recipe,
            schema_version=SCHEMA_VERSION,
        )
        final = self.store.artefact_dir(self.kind, self.name, id_)
        existing = self._intact_existing(final)
        if existing is not None:
            # Same content and recipe as an existing version: that version is this artefact,
            # and it becomes the latest of its name again.
            self.store.record_publish(existing)
            return existing
        commit, dirty = git_state()
        finished = now()
        manifest = Manifest(
            id=id_,
            name=self.name,
            kind=self.kind,
            created_at=finished,
            parents=[
                ParentRef(id=p.id, name=p.name, kind=p.kind, role=self.parent_roles.get(p.id, "input"))
                for p in self.parents
            ],
            producer=Producer(
                stage=self.stage,
                recipe=self.recipe,
                package_version=__version__,
                git_commit=commit,
                git_dirty=dirty,
                libraries=library_versions(),
                seed=self.seed,
                started_at=self.started_at,
                finished_at=finished,
                hardware=hardware(),
                execution=self.execution,
            ),
            files=files,
            ledger=ledger,
            arrow_schema=schema_text,
            stats=stats or {},
        )
        manifest.digest = manifest.integrity_digest()
        for entry in files + ledger:
            _fsync_file(self.dir / entry.path)
        tmp_manifest = self.dir / "manifest.json.tmp"
        tmp_manifest.write_text(manifest.to_json())
        _fsync_file(tmp_manifest)
        os.replace(tmp_manifest, self.dir / "manifest.json")
        _fsync_dir(self.dir)
        replaced = None
        if final.exists():
            # Under the final name: debris of a crashed rename (no manifest), a damaged copy or an
            # unsealed one (``_intact_existing``). Ours replaces it; it is moved aside first, under a
            # name ``clean`` removes, so that a kill here never leaves a half-removed version.
            replaced = self.dir.with_name(f"{self.dir.name}-replaced")
            os.replace(final, replaced)
        # Recorded as the latest before it appears: a kill between the two leaves a record of an id
        # with no folder, which listing ignores -- never a new version listed as an old one.
        self.store.record_publish(manifest)
        for owner in self.dir.glob(f"{OWNER_PREFIX}*"):
            owner.unlink()  # (killed after this, the folder's name still names this process)
        try:
            os.replace(self.dir, final)
        except OSError:
            if not (final / "manifest.json").is_file():
                raise
            # Another job published the same content meanwhile: theirs is ours.
            shutil.rmtree(self.dir, ignore_errors=True)
            manifest = load_manifest(final)
        else:
            _fsync_dir(final.parent)
            manifest._location = final.resolve()
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        return manifest

    def _intact_existing(self, final: Path) -> Manifest | None:
        """The version already published under this id, when it can stand for this publish: sealed
        and its files intact. A damaged one (a tampered file or manifest) or an unsealed one (made
        before manifests had a digest) is replaced by this publish instead of being handed back."""
        if not (final / "manifest.json").is_file():
            return None
        try:
            existing = load_manifest(final)
        except DistilleryError:
            return None
        if existing.digest is None or not verify(existing, use_cache=True).ok:
            return None
        return existing
