"""Pipeline steps over Arrow record batches.

A step is a small class with one method over a batch. A filter only says *keep* or *drop with a
reason*; the ``Filter`` base class applies the mask, counts, and writes the ledger entries
(``id, step, action, reason, score`` — never the text).
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc


@dataclass
class Decision:
    """What a filter decided for one batch: a keep mask, and per-row reasons/scores for drops."""

    keep: pa.BooleanArray
    reasons: list[str | None] | None = None
    scores: list[float | None] | None = None
    details: list[dict | None] | None = None


@dataclass
class StepStats:
    rows_in: int = 0
    rows_out: int = 0
    reasons: Counter = field(default_factory=Counter)


class Filter(ABC):
    """Base of keep/drop steps; subclasses implement ``decide``."""

    name = "filter"
    reason = "dropped"

    def __init__(self) -> None:
        self.stats = StepStats()
        self.ledger: list[dict] = []

    @abstractmethod
    def decide(self, batch: pa.RecordBatch) -> Decision:
        """Which rows of ``batch`` to keep, and why the others go."""

    def __call__(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        decision = self.decide(batch)
        keep = decision.keep
        self.stats.rows_in += batch.num_rows
        ids = batch.column("id").to_pylist()
        for i, kept in enumerate(keep.to_pylist()):
            if kept:
                continue
            reason = (decision.reasons[i] if decision.reasons else None) or self.reason
            self.stats.reasons[reason] += 1
            detail = decision.details[i] if decision.details else None
            self.ledger.append(
                {"id": ids[i], "step": self.name, "action": "drop", "reason": reason,
                 "score": decision.scores[i] if decision.scores else None,
                 "detail": json.dumps(detail, sort_keys=True) if detail else None}
            )  # fmt: skip
        out = batch.filter(keep)
        self.stats.rows_out += out.num_rows
        return out

    def summary(self) -> dict:
        return {
            "rows_in": self.stats.rows_in,
            "rows_out": self.stats.rows_out,
            "dropped": dict(self.stats.reasons),
        }


def word_counts(texts: pa.Array) -> pa.Array:
    """Whitespace-separated words per document, computed column-wise."""
    return pc.list_value_length(pc.utf8_split_whitespace(texts))


class MinWordsFilter(Filter):
    """Drop documents with fewer than ``min_words`` whitespace-separated words."""

    name = "min_words"
    reason = "too_short"

    def __init__(self, min_words: int):
        super().__init__()
        self.min_words = min_words

    def decide(self, batch: pa.RecordBatch) -> Decision:
        counts = word_counts(batch.column("text"))
        keep = pc.greater_equal(counts, self.min_words)
        return Decision(keep=keep, scores=[float(c) for c in counts.to_pylist()])


def normalise(texts: pa.Array, case_fold: bool = True) -> pa.Array:
    """Collapse whitespace runs and trim; optionally lower-case (column-wise)."""
    out = pc.utf8_trim_whitespace(pc.replace_substring_regex(texts, pattern=r"\s+", replacement=" "))
    return pc.utf8_lower(out) if case_fold else out


class ExactDedupFilter(Filter):
    """Keep the first document of each normalised text; later copies name it in the ledger.

    Holds one 16-byte digest per kept document: fine for the thin path and for millions of
    documents; corpus-scale dedup (out-of-core, MinHash) is its own global step.
    """

    name = "exact_dedup"
    reason = "exact_duplicate"

    def __init__(self, case_fold: bool = True):
        super().__init__()
        self.case_fold = case_fold
        self.seen: dict[bytes, str] = {}

    def decide(self, batch: pa.RecordBatch) -> Decision:
        texts = normalise(batch.column("text"), self.case_fold).to_pylist()
        ids = batch.column("id").to_pylist()
        keep: list[bool] = []
        details: list[dict | None] = []
        for rid, text in zip(ids, texts, strict=True):
            digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
            first = self.seen.get(digest)
            if first is None:
                self.seen[digest] = rid
                keep.append(True)
                details.append(None)
            else:
                keep.append(False)
                details.append({"duplicate_of": first})
        return Decision(keep=pa.array(keep, pa.bool_()), details=details)
