"""Manifest schema (version 1) shared by datasets, runs and evals.

A manifest as stored in ``manifest.json`` (abridged)::

    {"schema_version": 1, "id": "3f9c…", "name": "demo-corpus", "kind": "dataset",
     "created_at": "2026-11-29T10:00:00+00:00",
     "parents": [],
     "producer": {"stage": "corpus.build", "recipe": {...}, "package_version": "0.1.0",
                  "git_commit": "ab12…", "git_dirty": false, "libraries": {"pyarrow": "26.0.0"},
                  "seed": 0, "started_at": "…", "finished_at": "…"},
     "files": [{"path": "data/part-00000.parquet", "sha256": "…", "bytes": 81234, "rows": 241,
                "split": "train"}],
     "ledger": [{"path": "ledger/corpus.build.parquet", "sha256": "…", "bytes": 2048, "rows": 19}],
     "arrow_schema": "id: string\\n…", "stats": {"rows_in": 260, "rows_out": 241},
     "digest": "9b1e…"}

Two hashes protect it. The ``id`` covers what the artefact *is* (files, schema, parents, recipe), so
an identical rerun gets the same id. The ``digest`` covers every field of the manifest, timings
included, so a hand edit of anything (rows, stats, producer, names) is caught by ``verify``.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from manifests.hashing import canonical_json

SCHEMA_VERSION = 1

Kind = Literal["dataset", "run", "eval"]


class FileEntry(BaseModel):
    """One file of a published artefact, relative to the manifest's folder."""

    model_config = ConfigDict(extra="forbid")

    path: str
    sha256: str
    bytes: int
    rows: int | None = None
    split: str | None = None
    """The dataset split this shard belongs to (``train``, ``test``…); None for non-row files."""


class ParentRef(BaseModel):
    """A manifest this one was made from."""

    model_config = ConfigDict(extra="forbid")

    id: str
    name: str
    kind: Kind
    role: str = "input"
    """Why it is a parent: ``input``, ``model``, ``base_model``, ``eval_data``…"""


class Producer(BaseModel):
    """What made the artefact: stage, resolved recipe, code and library versions, seed, timings."""

    model_config = ConfigDict(extra="forbid")

    stage: str
    recipe: dict[str, Any]
    package_version: str
    git_commit: str | None = None
    git_dirty: bool | None = None
    libraries: dict[str, str] = Field(default_factory=dict)
    seed: int | None = None
    started_at: datetime
    finished_at: datetime
    hardware: dict[str, Any] = Field(default_factory=dict)
    execution: dict[str, Any] = Field(default_factory=dict)
    """How it ran (workers, executor): recorded, but not part of the id — the output does not depend on it."""


class Manifest(BaseModel):
    """The published description of a dataset, run or eval."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    id: str
    name: str
    kind: Kind
    created_at: datetime
    parents: list[ParentRef] = Field(default_factory=list)
    producer: Producer
    files: list[FileEntry] = Field(default_factory=list)
    ledger: list[FileEntry] = Field(default_factory=list)
    arrow_schema: str | None = None
    stats: dict[str, Any] = Field(default_factory=dict)
    digest: str | None = None
    """sha256 over every other field (see ``integrity_digest``); None in manifests published before
    it existed, whose stats and producer ``verify`` cannot check."""

    _location: Path | None = PrivateAttr(default=None)

    @property
    def location(self) -> Path:
        """The folder this manifest was read from (its files are relative to it)."""
        if self._location is None:
            raise ValueError(f"manifest {self.id[:12]} was not read from disk")
        return self._location

    @property
    def ref(self) -> str:
        """The pinned reference to this manifest, ``name@id-prefix``."""
        return f"{self.name}@{self.id[:12]}"

    def data_files(self, split: str | None = None) -> list[FileEntry]:
        """Row-holding files (Parquet shards), optionally of one split."""
        return [
            f
            for f in self.files
            if f.rows is not None and f.path.endswith(".parquet") and (split is None or f.split == split)
        ]

    def splits(self) -> list[str]:
        return sorted({f.split for f in self.data_files() if f.split})

    def integrity_digest(self) -> str:
        """The digest this manifest's fields hash to (equal to ``digest`` unless edited).

        Taken over the JSON as written, not the objects in memory: a value that JSON cannot hold
        exactly (a NaN stat, a tuple) hashes the same before writing and after reading.
        """
        data = json.loads(self.model_dump_json())
        data.pop("digest", None)
        return hashlib.sha256(canonical_json(data).encode()).hexdigest()

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"
