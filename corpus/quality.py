"""Heuristic quality filters: the Gopher, C4 and FineWeb rules, columnar over Arrow batches.

Four steps, each a ``Filter`` with a typed config (defaults = the published thresholds, as
datatrove applies them):

- ``gopher_quality`` — document length, mean word length, ``#`` and ellipsis ratios, bullet and
  ellipsis lines, words with a letter, stop words (Rae et al. 2021, *Scaling Language Models:
  Methods, Analysis & Insights from Training Gopher*, appendix A, MassiveWeb quality filters);
- ``gopher_repetition`` — duplicate paragraphs and lines, top 2–4-grams, duplicate 5–10-grams
  (same paper, table A1);
- ``c4_quality`` — lorem ipsum, curly brackets, at least five sentences in the lines C4 keeps
  (Raffel et al. 2020, *Exploring the Limits of Transfer Learning*, section 2.2);
- ``fineweb_quality`` — lines ending in punctuation, short lines, duplicated line characters,
  newlines per word (Penedo et al. 2024, *The FineWeb Datasets*, its additional heuristic filters).

Every drop carries a reason code (``gopher_short_doc``, ``c4_curly_bracket``,
``fineweb_line_punct_ratio``…) and the failing statistic as its ledger score; each step adds a
few prefixed score columns (``gopher_words``, ``c4_kept_lines``…) to every row.

**Words.** ``tokenizer: fast`` (the default) splits on whitespace, column-wise. ``tokenizer:
datatrove`` is a compatibility mode that splits words as datatrove does for English (spaCy's
rule-based English tokenizer, re-implemented here: prefixes, suffixes, infixes and the English
exceptions), so punctuation marks are words of their own. That moves every Gopher ratio: the
share of words with a letter in the embedded sample's prose has a median of 1.0 by whitespace and
0.88 by datatrove's words, against a limit of 0.8. Decisions therefore differ between the modes
near thresholds; ``benchmarks/quality.md`` measures and explains how much (the compatibility mode
agreed with datatrove on every document there).

**C4 line removal.** C4 deletes lines (no terminal punctuation, fewer than three words, a word
over 1000 characters, "javascript", cookie/terms-of-use notices) and keeps the rest of the page.
A filter here only keeps or drops, so ``c4_quality`` makes exactly C4's *document* decisions —
lorem ipsum or a curly bracket in a line C4 would otherwise keep, fewer than five sentences in
the lines it keeps — and leaves the text of kept documents untouched; ``c4_kept_lines`` says
how many lines C4 would keep, and a dropped document's ledger detail counts the lines each line
rule removed.
"""

from __future__ import annotations

import string
from collections import Counter
from operator import itemgetter
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from corpus.steps import Decision, Filter, StepConfig
from corpus.words import TERMINAL_PUNCTUATION, DatatroveWordSplitter

Tokenizer = Literal["fast", "datatrove"]

# Python's whitespace (str.isspace): the published rules are written with str.split/strip.
_SPACE_CHARS = "".join(chr(c) for c in range(0x3001) if chr(c).isspace())
# Whitespace inside a line: str.splitlines() breaks at the others.
_LINE_SPACE_CHARS = "".join(c for c in _SPACE_CHARS if c not in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
# A "symbol word" in the Gopher rules has only these characters: ASCII punctuation, the CJK and
# typographic marks datatrove lists, control characters and the sentence terminals. Kept equal
# to datatrove's set so that the compatibility mode counts the same words.
SYMBOLS = (
    frozenset(
        string.punctuation
        + "—”％１〈、━【「」，】；“《„’∶´．（–？！：～«〉》）。…►»"
        + "".join(map(chr, [*range(0, 9), *range(11, 32), *range(127, 160)]))
    )
    | TERMINAL_PUNCTUATION
)


def _re_class(chars) -> str:
    """An RE2 (Arrow) character class body matching exactly ``chars``."""
    return "".join(f"\\x{{{ord(c):x}}}" for c in sorted(chars))


_NON_SYMBOL_RE2 = f"[^{_re_class(SYMBOLS)}]"
_TERMINAL_END_RE2 = f"[{_re_class(TERMINAL_PUNCTUATION)}]$"
_NON_SPACE_RE2 = f"[^{_re_class(_SPACE_CHARS)}]"
_WORD_RE2 = f"{_NON_SPACE_RE2}+"
_LINE_SPACE_RE2 = f"[{_re_class(_LINE_SPACE_CHARS)}]*"
# str.splitlines() boundaries other than "\n", folded into "\n" so Arrow can split on one char.
_LINE_BREAKS_RE2 = r"\r\n|[\r\x0b\x0c\x1c\x1d\x1e\x{85}\x{2028}\x{2029}]"
GOPHER_STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")

# ---------------------------------------------------------------------------------------------
# Column helpers: a document's lines, paragraphs or words are a flat Arrow array plus the index of
# the document each item belongs to (``parents``); per-document statistics are bincounts.


def _texts(batch: pa.RecordBatch) -> pa.Array:
    texts = batch.column("text")
    return pc.fill_null(texts, "") if texts.null_count else texts


def _flat(lists: pa.Array) -> tuple[pa.Array, np.ndarray]:
    return pc.list_flatten(lists), pc.list_parent_indices(lists).to_numpy()


def _mask(values: pa.Array) -> np.ndarray:
    return values.to_numpy(zero_copy_only=False).astype(bool)


def _per_doc(parents: np.ndarray, n: int, weights: np.ndarray | None = None) -> np.ndarray:
    return np.bincount(parents, weights=weights, minlength=n).astype(np.float64)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(numerator, denominator, out=np.zeros(len(numerator)), where=denominator > 0)


def _duplicates(items: pa.Array, parents: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per document: items equal to an earlier item of the same document, and their characters."""
    if len(items) == 0:
        return np.zeros(n), np.zeros(n)
    codes = pc.dictionary_encode(items).indices.to_numpy().astype(np.int64)
    _, first = np.unique(parents * (int(codes.max()) + 1) + codes, return_index=True)
    repeated = np.ones(len(items), dtype=bool)
    repeated[first] = False
    lengths = pc.utf8_length(items).to_numpy()
    return _per_doc(parents, n, repeated), _per_doc(parents, n, repeated * lengths)


def _split_words(texts: pa.Array, splitter: DatatroveWordSplitter | None) -> tuple[pa.Array, np.ndarray]:
    """Every document's words, flattened: whitespace-separated (fast) or datatrove's."""
    if splitter is None:
        words, parents = _flat(pc.utf8_split_whitespace(texts))
        # Leading and trailing whitespace leave empty strings behind.
        present = pc.greater(pc.utf8_length(words), 0)
        return words.filter(present), parents[_mask(present)]
    words: list[str] = []
    counts = []
    for text in texts.to_pylist():
        before = len(words)
        words += splitter.words(text)
        counts.append(len(words) - before)
    return pa.array(words, pa.string()), np.repeat(np.arange(len(texts)), counts)


def _word_counts(texts: pa.Array, splitter: DatatroveWordSplitter | None) -> np.ndarray:
    if splitter is None:
        return pc.count_substring_regex(texts, _WORD_RE2).to_numpy().astype(np.float64)
    return np.array([len(splitter.words(t)) for t in texts.to_pylist()], dtype=np.float64)


def _line_count(texts: pa.Array) -> np.ndarray:
    """``len(text.splitlines())``: breaks, plus one unless the text ends with a break or is empty."""
    breaks = pc.count_substring(texts, "\n").to_numpy()
    open_end = _mask(pc.and_(pc.greater(pc.utf8_length(texts), 0), pc.invert(pc.ends_with(texts, "\n"))))
    return (breaks + open_end).astype(np.float64)


Rule = tuple[str | np.ndarray, np.ndarray, np.ndarray]
"""A rule's reason code (or one per document), its statistic per document, and where it fails."""


def _decision(n: int, rules: list[Rule], columns: dict[str, pa.Array]) -> Decision:
    """The first failing rule (in the published order) names the reason; its statistic is the score."""
    failed = np.vstack([fails for _, _, fails in rules]) if rules else np.zeros((1, n), dtype=bool)
    dropped, first = failed.any(axis=0), failed.argmax(axis=0)
    reasons: list[str | None] = [None] * n
    scores: list[float | None] = [None] * n
    for i in np.flatnonzero(dropped):
        reason, values, _ = rules[first[i]]
        reasons[i] = reason if isinstance(reason, str) else reason[i]
        scores[i] = round(float(values[i]), 6)
    return Decision(keep=pa.array(~dropped), reasons=reasons, scores=scores, columns=columns)


def _fails(values: np.ndarray, limit: float | None, above: bool) -> np.ndarray:
    if limit is None:
        return np.zeros(len(values), dtype=bool)
    return values > limit if above else values < limit


class _QualityFilter(Filter):
    """Shared by the four filters: the config, and the word splitter it asks for."""

    def __init__(self, config: _QualityConfig):
        super().__init__()
        self.config = config
        self.splitter = config.splitter()


class _QualityConfig(StepConfig):
    """What the four quality configs share: the choice of word splitting."""

    tokenizer: Tokenizer = "fast"
    """How words are split: ``fast`` on whitespace; ``datatrove`` as datatrove's English word
    tokenizer does (punctuation marks are words), to reproduce datatrove's decisions."""

    def splitter(self) -> DatatroveWordSplitter | None:
        return DatatroveWordSplitter() if self.tokenizer == "datatrove" else None


# ---------------------------------------------------------------------------------------------
# Gopher quality (Rae et al. 2021, appendix A: MassiveWeb quality filters)


class GopherQualityConfig(_QualityConfig):
    """Gopher's quality rules; thresholds from the paper, each ``None`` switches its rule off."""

    type: Literal["gopher_quality"] = "gopher_quality"
    min_doc_words: int | None = Field(default=50, ge=0)
    """Drop documents with fewer words (words of only punctuation do not count)."""
    max_doc_words: int | None = Field(default=100_000, ge=0)
    """Drop documents with more words."""
    min_avg_word_length: float | None = Field(default=3, ge=0)
    """Drop documents whose mean word length is below this (tables of numbers, code)."""
    max_avg_word_length: float | None = Field(default=10, ge=0)
    """Drop documents whose mean word length is above this (URLs, base64, concatenated words)."""
    max_symbol_word_ratio: float | None = Field(default=0.1, ge=0)
    """Drop documents with more ``#`` or more ellipses than this per word."""
    max_bullet_lines_ratio: float | None = Field(default=0.9, ge=0)
    """Drop documents where more than this share of lines starts with a bullet (``•`` or ``-``)."""
    max_ellipsis_lines_ratio: float | None = Field(default=0.3, ge=0)
    """Drop documents where more than this share of lines ends with an ellipsis (truncated text)."""
    min_alpha_words_ratio: float | None = Field(default=0.8, ge=0)
    """Drop documents where fewer than this share of words contains a letter."""
    min_stop_words: int | None = Field(default=2, ge=0)
    """Drop documents containing fewer of the distinct ``stop_words`` (not natural prose)."""
    stop_words: list[str] = Field(default_factory=lambda: list(GOPHER_STOP_WORDS))
    """Stop words, matched case-sensitively as datatrove does."""

    def build(self, store=None) -> GopherQualityFilter:
        return GopherQualityFilter(self)


class GopherQualityFilter(_QualityFilter):
    """Gopher's quality heuristics; adds ``gopher_words`` and ``gopher_alpha_ratio``."""

    name = "gopher_quality"

    def decide(self, batch: pa.RecordBatch) -> Decision:
        c = self.config
        texts = _texts(batch)
        n = len(texts)
        words, parents = _split_words(texts, self.splitter)
        all_words = _per_doc(parents, n)
        some_words = np.maximum(all_words, 1)
        content = _mask(pc.match_substring_regex(words, _NON_SYMBOL_RE2))
        lengths = pc.utf8_length(words).to_numpy()
        content_words = _per_doc(parents, n, content)
        mean_length = np.divide(
            _per_doc(parents, n, content * lengths),
            content_words,
            out=np.full(n, np.nan),
            where=content_words > 0,
        )
        hashes = pc.count_substring(texts, "#").to_numpy() / some_words
        ellipses = (
            pc.count_substring(texts, "...").to_numpy() + pc.count_substring(texts, "…").to_numpy()
        ) / some_words
        # Lines as str.splitlines() makes them: fold its other line boundaries into "\n".
        folded = pc.replace_substring_regex(texts, _LINE_BREAKS_RE2, "\n")
        lines = np.maximum(_line_count(folded), 1)
        # Each match runs to the end of its line: Arrow resumes the search after a match as if
        # at the start of a text, so a shorter match would let "---" count three times.
        bullets = pc.count_substring_regex(folded, f"(?m)^{_LINE_SPACE_RE2}[•-][^\n]*").to_numpy() / lines
        trailing = (
            pc.count_substring_regex(folded, f"(?m)(?:\\.\\.\\.|…){_LINE_SPACE_RE2}$").to_numpy() / lines
        )
        alpha = _per_doc(parents, n, _mask(pc.match_substring_regex(words, r"\pL"))) / some_words
        stop_words = self._stop_words(words, parents, n)
        rules = [
            ("gopher_short_doc", content_words, _fails(content_words, c.min_doc_words, above=False)),
            ("gopher_long_doc", content_words, _fails(content_words, c.max_doc_words, above=True)),
            ("gopher_short_words", mean_length, _fails(mean_length, c.min_avg_word_length, above=False)),
            ("gopher_long_words", mean_length, _fails(mean_length, c.max_avg_word_length, above=True)),
            ("gopher_hash_ratio", hashes, _fails(hashes, c.max_symbol_word_ratio, above=True)),
            ("gopher_ellipsis_ratio", ellipses, _fails(ellipses, c.max_symbol_word_ratio, above=True)),
            ("gopher_bullet_lines", bullets, _fails(bullets, c.max_bullet_lines_ratio, above=True)),
            ("gopher_ellipsis_lines", trailing, _fails(trailing, c.max_ellipsis_lines_ratio, above=True)),
            ("gopher_alpha_ratio", alpha, _fails(alpha, c.min_alpha_words_ratio, above=False)),
            ("gopher_few_stop_words", stop_words, _fails(stop_words, c.min_stop_words, above=False)),
        ]
        columns = {
            "gopher_words": pa.array(content_words.astype(np.int32)),
            "gopher_alpha_ratio": pa.array(alpha.astype(np.float32)),
        }
        return _decision(n, rules, columns)

    def _stop_words(self, words: pa.Array, parents: np.ndarray, n: int) -> np.ndarray:
        """Distinct stop words per document."""
        stop = self.config.stop_words
        if self.splitter is None:
            # Whitespace words keep their punctuation ("the,"): compare them without it.
            words = pc.utf8_trim(words, "".join(sorted(SYMBOLS)))
        index = pc.index_in(words, value_set=pa.array(stop, pa.string()))
        found = _mask(pc.is_valid(index))
        if not found.any():
            return np.zeros(n)
        keys = np.unique(parents[found] * len(stop) + index.filter(pa.array(found)).to_numpy())
        return _per_doc(keys // len(stop), n)


# ---------------------------------------------------------------------------------------------
# Gopher repetition (Rae et al. 2021, table A1)


class GopherRepetitionConfig(_QualityConfig):
    """Gopher's repetition rules: repeated paragraphs, lines and n-grams (table A1 thresholds)."""

    type: Literal["gopher_repetition"] = "gopher_repetition"
    dup_para_frac: float | None = Field(default=0.3, ge=0)
    """Drop documents where more than this share of paragraphs repeats an earlier one."""
    dup_para_char_frac: float | None = Field(default=0.2, ge=0)
    """Drop documents where repeated paragraphs hold more than this share of the characters."""
    dup_line_frac: float | None = Field(default=0.3, ge=0)
    """Drop documents where more than this share of lines repeats an earlier one."""
    dup_line_char_frac: float | None = Field(default=0.2, ge=0)
    """Drop documents where repeated lines hold more than this share of the characters."""
    top_n_grams: dict[int, float] = Field(default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16})
    """n -> limit: drop when the most frequent n-gram covers more than this share of characters."""
    dup_n_grams: dict[int, float] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )
    """n -> limit: drop when repeated n-grams cover more than this share of characters."""

    def build(self, store=None) -> GopherRepetitionFilter:
        return GopherRepetitionFilter(self)


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return list(zip(*(words[i:] for i in range(n)), strict=False))


def _repeated_chars(grams: list[tuple[str, ...]], ends: list[int], n: int) -> int:
    """Characters in n-grams that repeat an earlier one, scanning left to right and jumping over a
    repeat (so overlapping repeats count once), as Gopher's reference implementation does."""
    counts = Counter(grams)
    seen: set[tuple[str, ...]] = set()
    total = after = 0
    # Only n-grams occurring twice or more can repeat: visit just those positions.
    for i in [i for i, gram in enumerate(grams) if counts[gram] > 1]:
        if i < after:
            continue  # inside a repeat already counted
        if grams[i] in seen:
            total += ends[i + n] - ends[i]
            after = i + n
        else:
            seen.add(grams[i])
            after = i + 1
    return total


class GopherRepetitionFilter(_QualityFilter):
    """Gopher's repetition heuristics; adds ``gopher_dup_line_char_frac``.

    Paragraph and line repetition is column-wise; the n-gram rules run per document, only for
    the documents the line rules kept.
    """

    name = "gopher_repetition"

    def decide(self, batch: pa.RecordBatch) -> Decision:
        c = self.config
        texts = _texts(batch)
        n = len(texts)
        chars = pc.utf8_length(texts).to_numpy().astype(np.float64)
        paragraphs, parents = _flat(pc.split_pattern_regex(pc.utf8_trim(texts, _SPACE_CHARS), r"\n{2,}"))
        repeated, repeated_chars = _duplicates(paragraphs, parents, n)
        para_frac, para_chars = _ratio(repeated, _per_doc(parents, n)), _ratio(repeated_chars, chars)
        lines, parents = _flat(pc.split_pattern_regex(texts, r"\n+"))
        repeated, repeated_chars = _duplicates(lines, parents, n)
        line_frac, line_chars = _ratio(repeated, _per_doc(parents, n)), _ratio(repeated_chars, chars)
        rules = [
            ("gopher_empty", chars, chars == 0),
            ("gopher_dup_para_frac", para_frac, _fails(para_frac, c.dup_para_frac, above=True)),
            ("gopher_dup_para_char_frac", para_chars, _fails(para_chars, c.dup_para_char_frac, above=True)),
            ("gopher_dup_line_frac", line_frac, _fails(line_frac, c.dup_line_frac, above=True)),
            ("gopher_dup_line_char_frac", line_chars, _fails(line_chars, c.dup_line_char_frac, above=True)),
        ]
        ngram_frac, ngram_fails = np.zeros(n), np.zeros(n, dtype=bool)
        reasons = np.array([""] * n, dtype=object)
        undecided = ~np.vstack([fails for _, _, fails in rules]).any(axis=0)
        index = np.flatnonzero(undecided)
        for i, text in zip(index, texts.take(pa.array(index)).to_pylist(), strict=True):
            words = text.split() if self.splitter is None else self.splitter.words(text)
            found = self._ngram_rule(words, len(text))
            if found:
                reasons[i], ngram_frac[i], ngram_fails[i] = found[0], found[1], True
        columns = {"gopher_dup_line_char_frac": pa.array(line_chars.astype(np.float32))}
        return _decision(n, [*rules, (reasons, ngram_frac, ngram_fails)], columns)

    def _ngram_rule(self, words: list[str], chars: int) -> tuple[str, float] | None:
        for n, limit in self.config.top_n_grams.items():
            if len(words) < n:
                continue
            # The most frequent n-gram (the first seen among equals), with its joining spaces.
            gram, count = max(Counter(_ngrams(words, n)).items(), key=itemgetter(1))
            frac = (sum(map(len, gram)) + n - 1) * count / chars
            if frac > limit:
                return f"gopher_top_{n}_gram", frac
        ends = [0]
        for word in words:
            ends.append(ends[-1] + len(word))
        unique_from = None
        for n, limit in self.config.dup_n_grams.items():
            if unique_from is not None and n >= unique_from:
                continue  # no n-gram repeats, so no longer one can
            grams = _ngrams(words, n)
            if len(set(grams)) == len(grams):
                unique_from = n
                continue
            frac = _repeated_chars(grams, ends, n) / chars
            if frac > limit:
                return f"gopher_dup_{n}_gram", frac
        return None


# ---------------------------------------------------------------------------------------------
# C4 (Raffel et al. 2020, section 2.2; the rules as TensorFlow Datasets' c4_utils applies them)

_CITATION_RE2 = r"\[\d*]|\[edit]|\[citation needed]"
_POLICY_RE2 = "terms of use|privacy policy|cookie policy|uses cookies|use of cookies|use cookies"
# Fast sentence ends: a terminal mark (not part of an ellipsis), closing quotes, then more text.
_SENTENCE_END_RE2 = r"(?:[^.]\.|[!?])[\"'”’)\]]*\s+\S"


class C4QualityConfig(_QualityConfig):
    """C4's rules, as document decisions (its line removal is not applied: see the module doc)."""

    type: Literal["c4_quality"] = "c4_quality"
    remove_citations: bool = True
    """Ignore Wikipedia-style citation marks ([1], [edit], [citation needed]) when reading lines."""
    filter_no_terminal_punct: bool = True
    """C4 keeps only lines ending in ``.``, ``?``, ``!``, ``"`` or ``'`` (not an ellipsis)."""
    min_num_sentences: int | None = Field(default=5, ge=0)
    """Drop documents with fewer sentences in the lines C4 keeps."""
    min_words_per_line: int = Field(default=3, ge=0)
    """C4 keeps only lines with at least this many words."""
    max_word_length: int | None = Field(default=1000, ge=1)
    """C4 removes lines with a longer word."""
    filter_lorem_ipsum: bool = True
    """Drop documents containing "lorem ipsum" (placeholder text)."""
    filter_javascript: bool = True
    """C4 removes lines mentioning "javascript" (browser warnings)."""
    filter_curly_bracket: bool = True
    """Drop documents containing ``{`` (code)."""
    filter_policy: bool = True
    """C4 removes lines about cookies, privacy policies and terms of use."""

    def build(self, store=None) -> C4QualityFilter:
        return C4QualityFilter(self)


class C4QualityFilter(_QualityFilter):
    """C4's document decisions; adds ``c4_kept_lines`` (the lines C4's line rules keep)."""

    name = "c4_quality"

    def decide(self, batch: pa.RecordBatch) -> Decision:
        c = self.config
        texts = _texts(batch)
        n = len(texts)
        raw, parents = _flat(
            pc.split_pattern(pc.replace_substring_regex(texts, _LINE_BREAKS_RE2, "\n"), "\n")
        )
        stripped = pc.utf8_trim(raw, _SPACE_CHARS)
        lines = pc.replace_substring_regex(stripped, _CITATION_RE2, "") if c.remove_citations else stripped
        # The line rules in C4's order; each line counts under the first rule that removes it.
        long_word = self._long_word(stripped)
        if c.filter_no_terminal_punct:
            ending = pc.and_(
                pc.match_substring_regex(lines, r"[.?!\"']$"), pc.invert(pc.ends_with(lines, "..."))
            )
            no_punct = ~long_word & ~_mask(ending)
        else:
            no_punct = np.zeros(len(lines), dtype=bool)
        few_words = pc.count_substring_regex(stripped, _WORD_RE2).to_numpy() < c.min_words_per_line
        few_words &= ~long_word & ~no_punct
        candidate = ~long_word & ~no_punct & ~few_words
        lorem = candidate & self._contains(lines, "lorem ipsum", c.filter_lorem_ipsum)
        javascript = candidate & self._contains(lines, "javascript", c.filter_javascript)
        curly = candidate & ~javascript & self._contains(lines, r"\{", c.filter_curly_bracket)
        policy = candidate & ~javascript & ~curly & self._contains(lines, _POLICY_RE2, c.filter_policy)
        kept = candidate & ~lorem & ~javascript & ~curly & ~policy
        kept_lines = _per_doc(parents, n, kept)

        # A page goes at its first line with lorem ipsum or a bracket (lorem first within a line).
        page_rule = np.full(n, "", dtype=object)
        fatal = np.flatnonzero(lorem | curly)
        docs, first = np.unique(parents[fatal], return_index=True)
        page_rule[docs] = np.where(lorem[fatal[first]], "c4_lorem_ipsum", "c4_curly_bracket")
        sentences = kept_lines.copy()
        # Every kept line holds a sentence, so only pages with few kept lines need counting.
        short = np.flatnonzero((kept_lines < (c.min_num_sentences or 0)) & (page_rule == ""))
        if len(short):
            sentences[short] = self._sentences(lines, parents, kept, short)[short]
        few = _fails(sentences, c.min_num_sentences, above=False)
        decision = _decision(
            n,
            [(page_rule, np.zeros(n), page_rule != ""), ("c4_too_few_sentences", sentences, few)],
            {"c4_kept_lines": pa.array(kept_lines.astype(np.int32))},
        )
        removed = {"long_word": long_word, "no_terminal_punct": no_punct, "few_words": few_words}
        removed |= {"javascript": javascript, "policy": policy}
        counts = {name: _per_doc(parents, n, mask) for name, mask in removed.items()}
        details: list[dict | None] = [None] * n
        for i in np.flatnonzero(~_mask(decision.keep)):
            details[i] = {name: int(v[i]) for name, v in counts.items() if v[i]} or None
        decision.details = details
        return decision

    def _long_word(self, lines: pa.Array) -> np.ndarray:
        limit = self.config.max_word_length
        out = np.zeros(len(lines), dtype=bool)
        if limit is not None:
            # Only a line longer than the limit can hold such a word: check those few in Python.
            for i in np.flatnonzero(pc.utf8_length(lines).to_numpy() > limit):
                out[i] = any(len(word) > limit for word in lines[i].as_py().split())
        return out

    @staticmethod
    def _contains(lines: pa.Array, pattern: str, enabled: bool) -> np.ndarray:
        if not enabled:
            return np.zeros(len(lines), dtype=bool)
        return _mask(pc.match_substring_regex(lines, pattern, ignore_case=True))

    def _sentences(
        self, lines: pa.Array, parents: np.ndarray, kept: np.ndarray, docs: np.ndarray
    ) -> np.ndarray:
        """Sentences in the kept lines of ``docs``: spaCy's sentencizer (datatrove) or a regex (fast)."""
        wanted = kept & np.isin(parents, docs)
        index = np.flatnonzero(wanted)
        selected = lines.take(pa.array(index))
        if self.splitter is None:
            per_line = pc.count_substring_regex(selected, _SENTENCE_END_RE2).to_numpy() + 1
        else:
            per_line = np.array([self.splitter.sentences(line) for line in selected.to_pylist()])
        # Every document has a line (maybe empty), so this has one total per document.
        return np.bincount(parents[index], weights=per_line, minlength=int(parents[-1]) + 1)


# ---------------------------------------------------------------------------------------------
# FineWeb (Penedo et al. 2024: rules that separated their better datasets from the worse ones)


class FineWebQualityConfig(_QualityConfig):
    """FineWeb's additional rules with its published thresholds; each ``None`` switches one off."""

    type: Literal["fineweb_quality"] = "fineweb_quality"
    line_punct_thr: float | None = Field(default=0.12, ge=0)
    """Drop documents where fewer than this share of lines ends in terminal punctuation."""
    line_punct_exclude_zero: bool = False
    """Keep documents where no line at all ends in punctuation (e.g. for languages without it)."""
    stop_chars: str | None = None
    """Characters that end a line "with punctuation" (default: Unicode sentence terminals)."""
    short_line_thr: float | None = Field(default=0.67, ge=0)
    """Drop documents where more than this share of lines is short."""
    short_line_length: int = Field(default=30, ge=0)
    """A line of at most this many characters is short."""
    char_duplicates_ratio: float | None = Field(default=0.01, ge=0)
    """Drop documents where repeated lines hold more than this share of the characters."""
    new_line_ratio: float | None = Field(default=0.3, ge=0)
    """Drop documents with more than this many newlines per word (lists, menus)."""

    def build(self, store=None) -> FineWebQualityFilter:
        return FineWebQualityFilter(self)


class FineWebQualityFilter(_QualityFilter):
    """FineWeb's heuristics; adds ``fineweb_line_punct_ratio``."""

    name = "fineweb_quality"

    def __init__(self, config: FineWebQualityConfig):
        super().__init__(config)
        stops = TERMINAL_PUNCTUATION if config.stop_chars is None else config.stop_chars
        self._ends_with_stop = f"[{_re_class(set(stops))}]$"

    def decide(self, batch: pa.RecordBatch) -> Decision:
        c = self.config
        texts = _texts(batch)
        n = len(texts)
        # FineWeb's lines: split on "\n" only, blank lines ignored.
        lines, parents = _flat(pc.split_pattern(texts, "\n"))
        present = pc.match_substring_regex(lines, _NON_SPACE_RE2)
        lines, parents = lines.filter(present), parents[_mask(present)]
        count = _per_doc(parents, n)
        punct = _ratio(
            _per_doc(parents, n, _mask(pc.match_substring_regex(lines, self._ends_with_stop))), count
        )
        punct_fails = _fails(punct, c.line_punct_thr, above=False)
        if c.line_punct_exclude_zero:
            punct_fails &= punct > 0
        short = _ratio(_per_doc(parents, n, pc.utf8_length(lines).to_numpy() <= c.short_line_length), count)
        breaks = pc.count_substring(texts, "\n").to_numpy().astype(np.float64)
        chars = pc.utf8_length(texts).to_numpy() - breaks
        dup = _ratio(_duplicates(lines, parents, n)[1], chars)
        rules = [
            ("fineweb_empty", count, count == 0),
            ("fineweb_line_punct_ratio", punct, punct_fails),
            ("fineweb_short_line_ratio", short, _fails(short, c.short_line_thr, above=True)),
            ("fineweb_char_dup_ratio", dup, _fails(dup, c.char_duplicates_ratio, above=True)),
        ]
        # Words are only needed for the last rule: split only the documents still kept.
        per_word = np.zeros(n)
        undecided = np.flatnonzero(~np.vstack([fails for _, _, fails in rules]).any(axis=0))
        if c.new_line_ratio is not None and len(undecided):
            words = _word_counts(texts.take(pa.array(undecided)), self.splitter)
            per_word[undecided] = _ratio(breaks[undecided], words)
        rules.append(("fineweb_list_ratio", per_word, _fails(per_word, c.new_line_ratio, above=True)))
        return _decision(n, rules, {"fineweb_line_punct_ratio": pa.array(punct.astype(np.float32))})


QUALITY_STEP_CONFIGS = (GopherQualityConfig, GopherRepetitionConfig, C4QualityConfig, FineWebQualityConfig)
