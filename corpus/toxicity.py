"""Toxicity signals: word lists per language, and a trained offensive-language model.

    - {type: toxicity, languages: [en], max_word_ratio: 0.005, model_threshold: 0.9}

Adds ``toxicity_words`` (whole-word hits of the lists) and ``toxicity_score`` (the probability
from ``alt-profanity-check``'s linear model, trained on English) to every document, and drops a
document over either limit with reason ``toxic_words`` or ``toxic_model``. A trainable route for
other languages or definitions is the ``classifier`` step with a model from
``distillery corpus train-classifier``.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from corpus.steps import Decision, Filter, StepConfig
from manifests.errors import DistilleryError

WORDLISTS = Path(__file__).parent / "wordlists"
_PUNCT = "\"'.,;:!?()[]{}<>«»“”‘’-—–*_/\\|#@&%$^~`+="


@functools.cache
def load_wordlist(language: str) -> tuple[frozenset[str], tuple[str, ...]]:
    """(single words, multi-word phrases) of one language's list."""
    path = WORDLISTS / f"{language}.txt"
    if not path.is_file():
        have = ", ".join(sorted(p.stem for p in WORDLISTS.glob("*.txt")))
        raise DistilleryError(f"toxicity step: no word list for '{language}' (have: {have})")
    entries = [
        line.split("#", 1)[0].strip().lower() for line in path.read_text(encoding="utf-8").splitlines()
    ]
    entries = [e for e in entries if e]
    return frozenset(e for e in entries if " " not in e), tuple(e for e in entries if " " in e)


def count_hits(texts: pa.Array, words: frozenset[str], phrases: tuple[str, ...]) -> np.ndarray:
    """Whole-word list hits per document, column-wise: split, trim punctuation, set lookup."""
    lowered = pc.utf8_lower(texts)
    tokens = pc.utf8_split_whitespace(lowered)
    flat = pc.utf8_trim(pc.list_flatten(tokens), characters=_PUNCT)
    hit = pc.is_in(flat, value_set=pa.array(sorted(words), pa.string())).to_numpy(zero_copy_only=False)
    owners = pc.list_parent_indices(tokens).to_numpy()
    counts = np.bincount(owners[hit], minlength=len(texts)) if len(owners) else np.zeros(len(texts), np.int64)
    for phrase in phrases:
        # Phrases are rare; a regex per phrase over the whole column is cheap enough.
        pattern = r"(?:^|[^\pL\pN_])" + re.escape(phrase).replace(r"\ ", r"\s+") + r"(?:[^\pL\pN_]|$)"
        counts += pc.count_substring_regex(lowered, pattern=pattern).to_numpy(zero_copy_only=False)
    return counts


class ToxicityFilter(Filter):
    name = "toxicity"

    def __init__(self, cfg: ToxicityConfig):
        super().__init__()
        self.cfg = cfg
        self.lists = {lang: load_wordlist(lang) for lang in cfg.languages}
        self.model = None
        if cfg.model_threshold is not None:
            # Imported here: scikit-learn costs a second or two, paid only when the model is used.
            from profanity_check import predict_prob

            self.model = predict_prob

    def decide(self, batch: pa.RecordBatch) -> Decision:
        texts = batch.column("text")
        n = batch.num_rows
        hits = np.zeros(n, np.int64)
        for words, phrases in self.lists.values():
            hits += count_hits(texts, words, phrases)
        n_words = pc.list_value_length(pc.utf8_split_whitespace(texts)).to_numpy(zero_copy_only=False)
        ratio = hits / np.maximum(n_words, 1)
        scores = np.zeros(n, np.float32)
        if self.model is not None and n:
            scores = self.model(texts.to_pylist()).astype(np.float32)
        keep, reasons, values = [], [], []
        for i in range(n):
            reason, value = None, None
            if self.cfg.max_word_ratio is not None and ratio[i] > self.cfg.max_word_ratio:
                reason, value = "toxic_words", float(ratio[i])
            elif self.cfg.model_threshold is not None and scores[i] > self.cfg.model_threshold:
                reason, value = "toxic_model", float(scores[i])
            keep.append(reason is None)
            reasons.append(reason)
            values.append(value)
        columns = {"toxicity_words": pa.array(hits, pa.int32())}
        if self.model is not None:
            columns["toxicity_score"] = pa.array(scores, pa.float32())
        return Decision(keep=pa.array(keep, pa.bool_()), reasons=reasons, scores=values, columns=columns)


class ToxicityConfig(StepConfig):
    """Score documents for toxicity (word lists and a model) and drop those over the limits."""

    type: Literal["toxicity"] = "toxicity"
    languages: list[str] = Field(default_factory=lambda: ["en"])
    """Word lists to match (``corpus/wordlists/<language>.txt``: en, fr, de, es)."""
    max_word_ratio: float | None = Field(default=0.005, ge=0)
    """Drop when list hits per word exceed this (0.005: more than one in 200 words); None: score only."""
    model_threshold: float | None = Field(default=0.95, ge=0, le=1)
    """Drop when the offensive-language model's probability exceeds this; None: no model."""

    def build(self, store=None) -> ToxicityFilter:
        return ToxicityFilter(self)
