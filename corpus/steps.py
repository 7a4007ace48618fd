"""Pipeline steps over Arrow record batches.

A step is a small class with one method over a batch:

- a ``Filter`` says *keep* or *drop with a reason* (``decide``);
- a ``Mapper`` rewrites the text of some rows, saying why (``transform``, e.g. PII scrubbing).

Both may add score columns (``lang``, ``lang_score``, ``gopher_mean_word_length``…) that stay in
the output for later analysis. The base classes apply the decision, count, time, and write the
ledger entries (``id, step, action, reason, score, detail`` — never the text).

Each step has a typed config (a ``StepConfig`` with a ``type`` literal) whose ``build()`` makes
the step; recipes list them under ``steps:``::

    steps:
      - {type: min_words, min_words: 20}
      - {type: language, keep: [en], threshold: 0.65}
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from manifests.recipes import RecipeConfig


@dataclass
class Decision:
    """What a filter decided for one batch.

    ``keep`` is the mask; ``reasons``/``scores``/``details`` are per row (read for dropped rows);
    ``columns`` are score columns added to every row of the batch before filtering.
    """

    keep: pa.BooleanArray
    reasons: list[str | None] | None = None
    scores: list[float | None] | None = None
    details: list[dict | None] | None = None
    columns: dict[str, pa.Array] = field(default_factory=dict)


@dataclass
class Change:
    """What a mapper did to one batch: the new text column and, per changed row, why.

    ``drop`` (optional) removes rows outright — e.g. a document with more PII findings than a
    scrubber is allowed to rewrite; ``drop_reasons`` says why, per row.
    """

    text: pa.Array
    changed: pa.BooleanArray
    reasons: list[str | None] | None = None
    details: list[dict | None] | None = None
    columns: dict[str, pa.Array] = field(default_factory=dict)
    drop: pa.BooleanArray | None = None
    drop_reasons: list[str | None] | None = None
    rewritten: dict[str, pa.Array] = field(default_factory=dict)
    """Existing columns besides the text that the mapper rewrote (e.g. a scrubbed title); unlike
    ``columns`` they are the input's, not written by the step."""


@dataclass
class StepStats:
    rows_in: int = 0
    rows_out: int = 0
    changed: int = 0
    seconds: float = 0.0
    reasons: Counter = field(default_factory=Counter)
    """Dropped rows by reason."""
    changes: Counter = field(default_factory=Counter)
    """Changed (kept) rows by reason."""

    def merge(self, other: StepStats) -> None:
        self.rows_in += other.rows_in
        self.rows_out += other.rows_out
        self.changed += other.changed
        self.seconds += other.seconds
        self.reasons.update(other.reasons)
        self.changes.update(other.changes)

    def as_dict(self) -> dict:
        return {"rows_in": self.rows_in, "rows_out": self.rows_out, "changed": self.changed,
                "seconds": round(self.seconds, 4), "reasons": dict(sorted(self.reasons.items())),
                "changes": dict(sorted(self.changes.items()))}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict) -> StepStats:
        return cls(data["rows_in"], data["rows_out"], data["changed"], data["seconds"],
                   Counter(data["reasons"]), Counter(data.get("changes", {})))  # fmt: skip


def _with_columns(batch: pa.RecordBatch, columns: dict[str, pa.Array]) -> pa.RecordBatch:
    for name, values in columns.items():
        index = batch.schema.get_field_index(name)
        if index >= 0:
            batch = batch.set_column(index, name, values)
        else:
            batch = batch.append_column(name, values)
    return batch


class Step(ABC):
    """Common part of filters and mappers: a name, statistics and the ledger."""

    name = "step"

    def __init__(self) -> None:
        self.stats = StepStats()
        self.ledger: list[dict] = []
        self.columns_written: set[str] = set()
        """Columns the step has added or replaced (the build refuses an input field of the same name)."""

    def _log(self, rid: str, action: str, reason: str, score: float | None, detail: dict | None) -> None:
        (self.stats.reasons if action == "drop" else self.stats.changes)[reason] += 1
        self.ledger.append(
            {"id": rid, "step": self.name, "action": action, "reason": reason, "score": score,
             "detail": json.dumps(detail, sort_keys=True) if detail else None}
        )  # fmt: skip

    @abstractmethod
    def __call__(self, batch: pa.RecordBatch) -> pa.RecordBatch: ...


class Filter(Step):
    """Base of keep/drop steps; subclasses implement ``decide``."""

    reason = "dropped"

    @abstractmethod
    def decide(self, batch: pa.RecordBatch) -> Decision:
        """Which rows of ``batch`` to keep, and why the others go."""

    def __call__(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        started = time.perf_counter()
        decision = self.decide(batch)
        self.stats.rows_in += batch.num_rows
        ids = batch.column("id").to_pylist()
        for i, kept in enumerate(decision.keep.to_pylist()):
            if not kept:
                reason = (decision.reasons[i] if decision.reasons else None) or self.reason
                score = decision.scores[i] if decision.scores else None
                self._log(ids[i], "drop", reason, score, decision.details[i] if decision.details else None)
        self.columns_written.update(decision.columns)
        out = _with_columns(batch, decision.columns).filter(decision.keep)
        self.stats.rows_out += out.num_rows
        self.stats.seconds += time.perf_counter() - started
        return out


class Mapper(Step):
    """Base of steps that rewrite text; subclasses implement ``transform``."""

    reason = "changed"

    @abstractmethod
    def transform(self, batch: pa.RecordBatch) -> Change:
        """The new text of every row, and which rows changed and why."""

    def __call__(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        started = time.perf_counter()
        change = self.transform(batch)
        ids = batch.column("id").to_pylist()
        dropped = change.drop.to_pylist() if change.drop is not None else [False] * batch.num_rows
        for i, changed in enumerate(change.changed.to_pylist()):
            detail = change.details[i] if change.details else None
            if dropped[i]:
                reason = (change.drop_reasons[i] if change.drop_reasons else None) or "dropped"
                self._log(ids[i], "drop", reason, None, detail)
            elif changed:
                self.stats.changed += 1
                reason = (change.reasons[i] if change.reasons else None) or self.reason
                self._log(ids[i], "change", reason, None, detail)
        out = batch.set_column(batch.schema.get_field_index("text"), "text", change.text)
        for name, values in change.rewritten.items():
            index = out.schema.get_field_index(name)
            out = out.set_column(index, out.schema.field(index), values)  # the field keeps its metadata
        out = _with_columns(out, change.columns)
        self.columns_written.update(change.columns)
        if change.drop is not None:
            out = out.filter(pc.invert(change.drop))
        self.stats.rows_in += batch.num_rows
        self.stats.rows_out += out.num_rows
        self.stats.seconds += time.perf_counter() - started
        return out


class StepConfig(RecipeConfig):
    """Base of step configs: ``type`` names the step; ``build`` makes it (once per worker).

    A step that needs artefacts from the store (a trained classifier) resolves and pins them in
    ``prepare`` — run once, before any task — and returns their manifests, which become parents of
    the output. A step whose decision needs the whole build (keep the top 10%) says so in
    ``global_cut``: phase 1 only scores, phase 2 cuts.
    """

    type: str

    def prepare(self, store) -> list:
        return []

    def global_cut(self) -> tuple[str, float, str] | None:
        """(score column, fraction of documents to keep, reason for the rest), or None."""
        return None

    def build(self, store=None) -> Step:  # pragma: no cover - every subclass overrides
        raise TypeError(f"step type {self.type} cannot be built")


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


TextNormalization = Literal["simplify", "none"]
"""How dedup normalises a text before comparing it: ``simplify_text`` or only whitespace and case."""

# Whitespace as Python's str.split and Arrow's utf8_split_whitespace see it (RE2's \s is ASCII only),
# a single space aside: a run is rewritten only where it is not one space already, which is what
# makes the collapse cheap (rewriting every space costs ten times as much).
_OTHER_SPACE = (
    r"\t\n\x{0b}\x{0c}\r\x{1c}-\x{1f}\x{85}"  # the controls Python counts as whitespace
    r"\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}"  # \p{Z} but the space
)
_WHITESPACE = rf"[ {_OTHER_SPACE}]{{2,}}|[{_OTHER_SPACE}]"
_ASCII_WHITESPACE = r"\s{2,}|[\t\n\f\r]"
r"""RE2's ``\s+`` (ASCII whitespace runs) in the same cheap form."""
# Punctuation, symbols and invisible characters: format characters (soft hyphen, zero-width space,
# byte-order mark, direction marks) and the control characters that are not whitespace.
_NOT_WORDS = r"[\p{P}\p{S}\p{Cf}\x{00}-\x{08}\x{0e}-\x{1b}\x{7f}-\x{84}\x{86}-\x{9f}]+"


def normalise(texts: pa.Array, case_fold: bool = True, normalize: TextNormalization = "none") -> pa.Array:
    """Exact dedup's text before hashing: ``simplify_text``, or (``none``) ASCII whitespace runs
    collapsed and the ends trimmed; optionally lower-cased (column-wise)."""
    if normalize == "simplify":
        return simplify_text(texts, case_fold)
    out = pc.utf8_trim_whitespace(
        pc.replace_substring_regex(texts, pattern=_ASCII_WHITESPACE, replacement=" ")
    )
    return pc.utf8_lower(out) if case_fold else out


def simplify_text(texts: pa.Array, case_fold: bool = True, collapse_whitespace: bool = True) -> pa.Array:
    """Text reduced to its words, as datatrove's ``simplify_text`` does before MinHash (column-wise).

    Unicode NFKC (fullwidth letters, ligatures such as "ﬁ", superscripts become plain ones), then
    optionally lower case, then punctuation, symbols and invisible characters removed (``_NOT_WORDS``:
    "don't" and "don’t" both become "dont", "well-known" "wellknown"), every decimal digit of any
    script made "0" (one per digit, so a number keeps its length), whitespace runs made one space
    and the ends trimmed::

        "Ｔｈｅ ﬁrst — “3.5×” faster!"  ->  "the first 00 faster"

    Letters, marks (accents stay) and other numbers (Roman numerals) are kept. Case folding is
    Arrow's per-character lower case (no context: a final capital sigma becomes "σ").

    With ``collapse_whitespace=False`` whitespace is left as it is: for a tokeniser that splits at
    whitespace runs itself (MinHash's words) the words are the same, and the collapse is a third of
    the cost.
    """
    out = _only_non_ascii(texts, lambda some: pc.utf8_normalize(some, form="NFKC"))  # ASCII is NFKC
    if case_fold:
        out = pc.utf8_lower(out)
    out = _fold_digits(pc.replace_substring_regex(out, pattern=_NOT_WORDS, replacement=""))
    if not collapse_whitespace:
        return out
    return pc.utf8_trim_whitespace(pc.replace_substring_regex(out, pattern=_WHITESPACE, replacement=" "))


def _only_non_ascii(texts: pa.Array, change: Callable[[pa.Array], pa.Array]) -> pa.Array:
    """``change`` applied to the texts that are not pure ASCII, the others kept as they are."""
    other = pc.invert(pc.fill_null(pc.string_is_ascii(texts), True))
    if not pc.any(other).as_py():
        return texts
    return pc.replace_with_mask(texts, other, change(texts.filter(other)))


def _fold_digits(texts: pa.Array) -> pa.Array:
    """Every decimal digit made "0": ASCII ones by a byte map over the UTF-8 data (an ASCII byte never
    occurs inside a multi-byte character), the digits of other scripts by RE2 in non-ASCII texts only."""
    if texts.type != pa.large_string():
        texts = texts.cast(pa.large_string())
    validity, offsets, data = texts.buffers()
    if data is not None and data.size:
        raw = np.frombuffer(data, np.uint8)
        folded = np.where((raw >= 0x30) & (raw <= 0x39), np.uint8(0x30), raw)
        texts = pa.Array.from_buffers(
            texts.type, len(texts), [validity, offsets, pa.py_buffer(folded)], texts.null_count, texts.offset
        )
    return _only_non_ascii(texts, lambda some: pc.replace_substring_regex(some, r"\p{Nd}", "0"))
