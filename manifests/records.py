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
        ("fetch_date", pa.string()),
        ("http_status", pa.int32()),
        ("content_type", pa.string()),
    ]
)
"""Where a source record came from: file (and line or row), or URL and WARC offset."""


def _unit(key: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(keys: list[str], fractions: dict[str, float], seed: int = 0) -> list[str]:
    """Split names for ``keys`` in the given shares (e.g. ``{"train": 0.9, "test": 0.1}``).

    Rows are ordered by a hash of their key and cut into consecutive runs, so the result depends
    only on the set of keys and the seed (not on their order), the shares are met to within one
    row, and every split with a positive share gets at least one row when there are enough rows.
    """
    n = len(keys)
    names = list(fractions)
    counts = [int(fractions[name] * n) for name in names]
    # Largest remainders first, then make sure no positive share ends up empty.
    by_remainder = sorted(range(len(names)), key=lambda i: fractions[names[i]] * n - counts[i], reverse=True)
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    for i, name in enumerate(names):
        if fractions[name] > 0 and counts[i] == 0 and n >= len(names):
            donor = max(range(len(names)), key=lambda j: counts[j])
            counts[donor] -= 1
            counts[i] = 1
    order = sorted(range(n), key=lambda i: (_unit(keys[i], seed), keys[i]))
    out = [""] * n
    position = 0
    for name, count in zip(names, counts, strict=True):
        for i in order[position : position + count]:
            out[i] = name
        position += count
    return out
