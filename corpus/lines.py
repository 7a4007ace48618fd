"""Line and paragraph dedup across a build (as CCNet does): boilerplate that recurs in many
documents — navigation, cookie notices, "share this" lines — is cut out of each of them.

A unit (a line, or a blank-line-separated paragraph) is compared after stripping, collapsing
whitespace and folding case; one that occurs in more than ``max_documents`` documents is removed
from all of them, and the ledger records how much of each document went.
"""

from __future__ import annotations

import hashlib
import re
from typing import Literal

import pyarrow as pa

from manifests.recipes import RecipeConfig

UNIT_KEYS = "_unit_keys"
_PARAGRAPH = re.compile(r"(\n\s*\n)")
_LINE = re.compile(r"(\n)")


class LineDedupConfig(RecipeConfig):
    """Remove lines (or paragraphs) that recur across more than ``max_documents`` documents."""

    unit: Literal["line", "paragraph"] = "line"
    """The unit removed where it recurs: a line, or a paragraph (text between blank lines)."""
    max_documents: int = 2
    """A unit found in more documents than this is removed from every one of them."""
    min_chars: int = 10
    """Units shorter than this (after stripping) are never counted or removed: short lines such as
    "Ingredients:" recur legitimately."""


def _key(unit: str) -> int:
    normal = " ".join(unit.split()).lower()
    return int.from_bytes(
        hashlib.blake2b(normal.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big"
    )


def _pieces(text: str, unit: str) -> list[str]:
    """The text split into units and the separators between them (joined back, it is the text)."""
    return (_PARAGRAPH if unit == "paragraph" else _LINE).split(text)


def unit_keys(text: str, cfg: LineDedupConfig) -> list[int]:
    """The distinct keys of a document's countable units (a unit counts once per document)."""
    pieces = _pieces(text, cfg.unit)
    return sorted({_key(p) for p in pieces[::2] if len(p.strip()) >= cfg.min_chars})


def add_unit_keys(batch: pa.RecordBatch, cfg: LineDedupConfig) -> pa.RecordBatch:
    keys = [unit_keys(t, cfg) for t in batch.column("text").to_pylist()]
    return batch.append_column(UNIT_KEYS, pa.array(keys, pa.list_(pa.uint64())))


def strip_repeated(text: str, cfg: LineDedupConfig, frequent: set[int]) -> tuple[str, int, int]:
    """(text without the frequent units, units removed, characters removed)."""
    pieces = _pieces(text, cfg.unit)
    kept: list[str] = []
    removed_units = removed_chars = 0
    for i in range(0, len(pieces), 2):
        unit = pieces[i]
        if len(unit.strip()) >= cfg.min_chars and _key(unit) in frequent:
            removed_units += 1
            removed_chars += len(unit)
            continue
        if kept and i > 0:
            kept.append(pieces[i - 1])  # the separator before a kept unit
        kept.append(unit)
    new = "".join(kept).strip("\n")
    return new, removed_units, len(text) - len(new) if removed_units else 0
