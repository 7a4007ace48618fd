"""Content addressing: file hashes and the manifest id."""

from __future__ import annotations

import hashlib
import json
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
