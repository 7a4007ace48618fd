"""Reading published datasets: verified first, then as Arrow tables or Hugging Face datasets."""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.errors import DistilleryError
from manifests.schema import Manifest
from manifests.verify import ensure_verified

RECORD_COLUMNS = ("id", "parents")
"""Every dataset row has a stable ``id``; derived rows list the ids they came from in ``parents``."""


def read_table(manifest: Manifest, split: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """All rows of a dataset (or of one split), after verifying its files."""
    if manifest.kind != "dataset":
        raise DistilleryError(f"{manifest.ref} is a {manifest.kind}, not a dataset")
    ensure_verified(manifest)
    files = manifest.data_files(split)
    if not files:
        have = ", ".join(manifest.splits()) or "none"
        raise DistilleryError(f"{manifest.ref} has no split '{split}' (splits: {have})")
    tables = [pq.read_table(manifest.location / f.path, columns=columns) for f in files]
    return pa.concat_tables(tables)


def require_columns(manifest: Manifest, needed: Iterable[str], purpose: str) -> None:
    """Fail before any model loads when a dataset is altered or lacks the columns a stage needs."""
    ensure_verified(manifest)
    files = manifest.data_files()
    if not files:
        raise DistilleryError(f"{manifest.ref} has no data files")
    have = pq.read_schema(manifest.location / files[0].path).names
    missing = [c for c in needed if c not in have]
    if missing:
        raise DistilleryError(
            f"dataset {manifest.ref} lacks column(s) {', '.join(missing)} needed for {purpose}; "
            f"it has: {', '.join(have)}"
        )
