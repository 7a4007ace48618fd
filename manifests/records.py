"""The record model: stable ids, ``parents`` for derived rows, and deterministic splits.

A corpus row::

    {"id": "c0ffee0123456789abcd", "parents": [], "text": "How to true a wheel…",
     "source": {"uri": "examples/sample/web.jsonl", "sha256": "…", "line": 42, "row": None,
                "offset": None, "url": "https://blog.example.com/wheels"}}

A derived row (e.g. teacher output) has its own id and ``parents: ["c0ffee0123456789abcd"]``.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

SOURCE_TYPE = pa.struct(
    [
        ("uri", pa.string()),
        ("sha256", pa.string()),
        ("line", pa.int64()),
        ("row", pa.int64()),
        ("offset", pa.int64()),
        ("url", pa.string()),
    ]
)
"""Where a source record came from: file (and line or row), or URL and WARC offset."""


def split_of(record_id: str, fractions: dict[str, float], seed: int = 0) -> str:
    """Assign a record to a split by hashing its id: stable whatever the order or the batch.

    ``fractions`` maps split names to shares that sum to 1 (e.g. ``{"train": 0.9, "test": 0.1}``).
    """
    digest = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    total = 0.0
    names = list(fractions)
    for name in names:
        total += fractions[name]
        if u < total:
            return name
    return names[-1]
