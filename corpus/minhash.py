"""MinHash LSH near-duplicate detection, in two phases over Arrow batches.

Phase 1 (``band_keys``, per batch, in any worker) turns each document into its LSH band
hashes: the text is normalised, split into word (or character) n-gram shingles, every shingle of
the batch is hashed at once with NumPy, ``bands * rows`` hash permutations are applied as one
(permutations x shingles) array, and ``np.minimum.reduceat`` takes each document's minima. Each
band of ``rows`` minima is folded into one 64-bit key, so a document becomes one
``fixed_size_binary(8 * bands)`` value (defaults: 16 bands, 128 bytes)::

    "The quick brown fox jumps over the lazy dog"  ->  e43b65bf20a0bc4b ... ebec53a0ea1aff40

Shingles: by default (``normalize: simplify``) the text is first reduced to its words by
``corpus.steps.simplify_text``, as datatrove does (text-dedup too splits words at punctuation):
Unicode NFKC, lower case, punctuation, symbols and invisible characters removed, every digit made
0, whitespace collapsed. A word is then a run of non-whitespace; a character shingle counts a
whitespace run as one space. Without it, a copy that differs only in punctuation, quotes, dashes
or fullwidth letters loses every shingle touching a difference: "It's 3 p.m. -- late." and
"It’s 3 p.m. — late" share none of their word 5-grams (Jaccard 0), simplified both are
"its 0 pm late" (Jaccard 1). ``normalize: none`` shingles the text as it is, case aside
(``lowercase``): words with their punctuation attached, the behaviour and the band keys from
before ``normalize`` existed.

Phase 2 (``find_duplicates``, once over the whole build, rows numbered in global order) groups
equal band keys by sorting, links each member of a bucket to the bucket's first row (so a bucket
of a thousand identical documents gives 999 candidate pairs, not half a million), optionally
checks each candidate pair's exact shingle Jaccard similarity (cutting LSH false positives),
joins the verified pairs into clusters and keeps one document per cluster
(``corpus/minhash_clusters.py``).

Everything is a pure function of the text and the config: hash constants come from the seed
through splitmix64, not from NumPy's random streams (which may change between releases), so
band keys computed in any batch size, order or worker, today or in a later run against a stored
index, are identical.

Choosing bands x rows: LSH makes a pair with Jaccard similarity ``s`` a candidate with probability
``1 - (1 - s**rows)**bands``. Like datasketch's ``MinHashLSH``, the pair (bands, rows) minimises a
weighted sum of the false-positive area below the threshold and the false-negative area above
it. Without verification both weigh the same (datasketch's default: 9 x 13 at 0.8, which finds
only 40% of pairs *at* the threshold). With verification a false positive costs one exact
comparison while a false negative is a missed duplicate, so misses weigh 19 times more
(16 x 8 at 0.8: 95% of pairs at the threshold become candidates, 99.4% at 0.85).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from corpus.minhash_clusters import connected_components, keep_one_per_cluster, pair_jaccard
from corpus.steps import TextNormalization, simplify_text
from manifests.recipes import RecipeConfig

U64 = np.uint64
# A document without a single token (empty or whitespace only) gets all-zero band keys; real keys
# are never zero, and phase 2 never groups zero keys, so empty documents are nobody's duplicate
# (exact dedup is the place for those).
EMPTY_KEY = 0
# Shingles permuted per step: bounds the (permutations x shingles) uint32 array to 32 MB at 128
# permutations, whatever the batch or a single document's size.
CHUNK_SHINGLES = 1 << 16
# Candidate pairs verified per fetch of texts (below 2**16: pair_jaccard packs the pair index
# above a 48-bit shingle).
VERIFY_BLOCK = 2048
SET_BITS = 48


class MinHashConfig(RecipeConfig):
    """MinHash LSH near-duplicate detection (word or character n-gram shingles)."""

    threshold: float = Field(default=0.8, gt=0.0, le=1.0)
    """Jaccard similarity of shingle sets at or above which two documents are near-duplicates."""
    num_perm: int = Field(default=128, ge=2, le=1024)
    """Hash permutations per document (the MinHash signature length); ``bands * rows`` of them are used."""
    bands: int | None = Field(default=None, ge=1)
    """LSH bands; with ``rows``, overrides the choice made from ``threshold``."""
    rows: int | None = Field(default=None, ge=1)
    """Permutations per band; set together with ``bands`` (``bands * rows <= num_perm``)."""
    normalize: TextNormalization = "simplify"
    """Text normalisation before shingling. ``simplify`` (the default, like datatrove's): Unicode NFKC
    (fullwidth letters and ligatures such as "ﬁ" become plain ones), punctuation, symbols and invisible
    characters removed, every digit made 0, whitespace collapsed -- so a copy that differs only in
    punctuation, quotes, dashes or numbers shares its shingles with the original. ``none``: the text
    as it is (only ``lowercase`` applies), words keep their punctuation; choose it where punctuation or
    numbers tell documents apart (code, math, tables) and for indexes built before this setting."""
    shingle: Literal["word", "char"] = "word"
    """Shingle unit: whitespace-separated words, or characters (whitespace runs count as one space)."""
    ngram: int = Field(default=5, ge=1, le=64)
    """Shingle length in units: 5 words, or for ``char`` typically 5-9 characters."""
    lowercase: bool = True
    """Fold case before shingling (with either ``normalize``)."""
    seed: int = Field(default=1, ge=0)
    """Seed of the hash permutations; band keys are only comparable between equal seeds."""
    verify: bool = True
    """Check each candidate pair's exact shingle Jaccard similarity and drop pairs below the threshold."""
    keep: Literal["first", "longest", "score"] = "first"
    """Which document of a cluster stays: the first in input order, the longest, or the one with the
    highest ``score_column`` (e.g. a quality score from an earlier step); ties go to the first."""
    score_column: str | None = None
    """The score column ``keep: score`` reads."""

    @model_validator(mode="after")
    def _check_banding(self) -> MinHashConfig:
        if (self.keep == "score") != (self.score_column is not None):
            raise ValueError("'keep: score' needs 'score_column' (and 'score_column' needs 'keep: score')")
        if (self.bands is None) != (self.rows is None):
            raise ValueError(
                "set both 'bands' and 'rows', or neither (they are then chosen from 'threshold')"
            )
        if self.bands is not None and self.bands * self.rows > self.num_perm:
            raise ValueError(
                f"bands * rows = {self.bands} * {self.rows} = {self.bands * self.rows} exceeds num_perm ({self.num_perm})"
            )
        return self

    def banding(self) -> tuple[int, int]:
        """(bands, rows): as set, or chosen from the threshold (see the module docstring)."""
        if self.bands is not None and self.rows is not None:
            return self.bands, self.rows
        fp_weight = 0.05 if self.verify else 0.5
        return optimal_banding(self.threshold, self.num_perm, fp_weight)


@lru_cache(maxsize=64)
def optimal_banding(threshold: float, num_perm: int, fp_weight: float = 0.5) -> tuple[int, int]:
    """The (bands, rows) with ``bands * rows <= num_perm`` minimising the weighted error areas.

    datasketch's ``_optimal_param`` with its ``scipy.integrate.quad`` replaced by the trapezoid
    rule on a fine grid (the same pairs at every threshold compared; see the tests).
    """
    below = np.linspace(0.0, threshold, 1001)
    above = np.linspace(threshold, 1.0, 1001)
    best, best_error = (1, 1), np.inf
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            fp = np.trapezoid(1 - (1 - below**rows) ** bands, below)
            fn = np.trapezoid((1 - above**rows) ** bands, above)
            error = fp * fp_weight + fn * (1 - fp_weight)
            if error < best_error:
                best, best_error = (bands, rows), error
    return best


# ---------------------------------------------------------------- hashing (all uint64, wrapping)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection on uint64 whose every output bit depends on every input bit."""
    z = x + U64(0x9E3779B97F4A7C15)
    z ^= z >> U64(30)
    z *= U64(0xBF58476D1CE4E5B9)
    z ^= z >> U64(27)
    z *= U64(0x94D049BB133111EB)
    z ^= z >> U64(31)
    return z


def _constants(seed: int, purpose: int, count: int, odd: bool = False) -> np.ndarray:
    """``count`` pseudo-random uint64 constants, a fixed function of (seed, purpose)."""
    base = U64((seed * 0x100000001B3 + purpose * 0x9E3779B1) & 0xFFFFFFFFFFFFFFFF)
    out = _splitmix64(_splitmix64(np.arange(count, dtype=U64) + base))
    return out | U64(1) if odd else out


# Position multipliers of the n-gram fold and the band fold; seed-independent for shingles, so
# shingle sets (and exact Jaccard) do not depend on the permutation seed.
_NGRAM_MULT = _constants(0, 1, 64, odd=True)
_BAND_MULT = _constants(0, 2, 1024, odd=True)


def _string_parts(texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(UTF-8 bytes, absolute offsets into them) of a string array without nulls."""
    if texts.type != pa.large_string():
        texts = texts.cast(pa.large_string())
    offsets = np.frombuffer(texts.buffers()[1], dtype=np.int64)[texts.offset : texts.offset + len(texts) + 1]
    data = texts.buffers()[2]
    data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    return data, offsets


def _word_tokens(texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(one uint64 hash per word, per-document offsets into them).

    Words are split by Arrow (Unicode whitespace) and dictionary-encoded, so only each distinct
    word of the batch is hashed: the sum of splitmix64 over its (byte, position) pairs -- a
    vectorisable function of the exact byte string -- mixed once more with its length.
    """
    # Arrow splits "" into [""] and keeps empty words at the ends, hence the trim and the filter.
    words = pc.utf8_split_whitespace(pc.utf8_trim_whitespace(texts))
    per_doc = np.diff(np.asarray(words.offsets, dtype=np.int64))
    encoded = pc.dictionary_encode(words.flatten())
    index = np.asarray(encoded.indices, dtype=np.int64)
    data, offsets = _string_parts(encoded.dictionary)
    lengths = np.diff(offsets)
    if (lengths == 0).any():
        empty = np.flatnonzero(lengths == 0)
        is_word = ~np.isin(index, empty)
        per_doc = np.bincount(np.repeat(np.arange(len(per_doc)), per_doc)[is_word], minlength=len(per_doc))
        index = index[is_word]
    doc_offsets = np.zeros(len(per_doc) + 1, np.int64)
    np.cumsum(per_doc, out=doc_offsets[1:])
    if len(index) == 0:
        return np.zeros(0, U64), doc_offsets
    starts = offsets[:-1]
    position = np.arange(offsets[0], offsets[-1], dtype=np.int64) - np.repeat(starts, lengths)
    mixed = _splitmix64(data[offsets[0] : offsets[-1]].astype(U64) | (position.astype(U64) << U64(8)))
    # reduceat cannot sum empty segments (the empty word); a cumulative sum can.
    cumulative = np.r_[U64(0), np.cumsum(mixed, dtype=U64)]
    sums = cumulative[offsets[1:] - offsets[0]] - cumulative[starts - offsets[0]]
    word_hash = _splitmix64(sums + lengths.astype(U64) * U64(0xD6E8FEB86659FD93))
    return word_hash[index], doc_offsets


def _char_tokens(texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(one uint64 value per character: its UTF-8 bytes, per-document offsets into them)."""
    # RE2's \s+ -> " " (ASCII whitespace runs), written so that a single space is not rewritten: the
    # same text, several times faster.
    texts = pc.utf8_trim_whitespace(pc.replace_substring_regex(texts, r"\s{2,}|[\t\n\f\r]", " "))
    data, offsets = _string_parts(texts)
    if len(data) == 0:
        return np.zeros(0, U64), np.zeros(len(texts) + 1, np.int64)
    data = data[offsets[0] : offsets[-1]]
    offsets = offsets - offsets[0]
    char_starts = np.flatnonzero((data & 0xC0) != 0x80)
    char_len = np.diff(np.append(char_starts, len(data)))
    value = data[char_starts].astype(U64)
    for extra in (1, 2, 3):
        has = char_len > extra
        value[has] |= data[char_starts[has] + extra].astype(U64) << U64(8 * extra)
    return value, np.searchsorted(char_starts, offsets)


def _shingles(texts: pa.Array, cfg: MinHashConfig) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 hash of every n-gram shingle of the batch, per-document offsets into them).

    The texts are normalised first (``cfg.normalize``, see the module docstring). A document with
    fewer tokens than ``ngram`` (but at least one) is one shingle of all its tokens, so very short
    documents still match their copies.
    """
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    elif not isinstance(texts, pa.Array):
        texts = pa.array(texts, type=pa.large_string())
    if texts.type not in (pa.string(), pa.large_string()):
        texts = texts.cast(pa.large_string())  # string_view, or a dictionary of strings
    texts = pc.fill_null(texts, "")
    if cfg.normalize == "simplify":
        # Words split at whitespace runs below, so the collapse can be skipped; characters count a run as one.
        texts = simplify_text(texts, cfg.lowercase, collapse_whitespace=cfg.shingle == "char")
    elif cfg.lowercase:
        texts = pc.utf8_lower(texts)
    tokens, tok_offsets = _word_tokens(texts) if cfg.shingle == "word" else _char_tokens(texts)
    n = cfg.ngram
    tok_counts = np.diff(tok_offsets)
    counts = np.where(tok_counts >= n, tok_counts - n + 1, np.minimum(tok_counts, 1))
    offsets = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    total = int(offsets[-1])
    if total == 0:
        return np.zeros(0, U64), offsets
    doc = np.repeat(np.arange(len(counts)), counts)
    start = tok_offsets[doc] + (np.arange(total) - offsets[doc])
    full = tok_counts[doc] >= n
    folded = np.empty(total, U64)
    if len(tokens) >= n:
        # One sliding fold over the whole token stream, contiguous slices only; windows that
        # cross a document boundary are computed and never picked.
        window = tokens[: len(tokens) - n + 1] * _NGRAM_MULT[0]
        for t in range(1, n):
            window += tokens[t : len(tokens) - n + 1 + t] * _NGRAM_MULT[t]
        folded[full] = window[start[full]]
    if not full.all():
        short_start, short_len = start[~full], tok_counts[doc[~full]]
        short = np.zeros(len(short_start), U64)
        for t in range(n - 1):
            has = short_len > t
            short[has] += tokens[short_start[has] + t] * _NGRAM_MULT[t]
        folded[~full] = short
    return _splitmix64(folded), offsets


# ---------------------------------------------------------------- phase 1


def _permutations(cfg: MinHashConfig, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Multipliers (odd) and offsets of ``x -> a * x + b (mod 2**32)``, a bijection on uint32.

    32 bits, not datasketch's 61: NumPy's uint32 multiply is several times faster, and on
    shingle hashes that are already random, the estimated Jaccard stays unbiased with the
    binomial variance of ideal permutations (checked by ``tests/test_minhash.py``).
    """
    a = _constants(cfg.seed, 3, count, odd=True).astype(np.uint32)
    return a[:, None], _constants(cfg.seed, 4, count).astype(np.uint32)[:, None]


def signatures(texts: pa.Array, cfg: MinHashConfig) -> tuple[np.ndarray, np.ndarray]:
    """(the (bands*rows x documents) uint32 MinHash signatures, mask of documents with a shingle).

    Permutations run down the first axis so that each document's minimum is a ``reduceat``
    over contiguous memory -- six times faster than the transposed layout.
    """
    bands, rows = cfg.banding()
    perms = bands * rows
    hashes, offsets = _shingles(texts, cfg)
    hashes = hashes.astype(np.uint32)  # the low 32 bits
    n = len(offsets) - 1
    sig = np.full((perms, n), np.iinfo(np.uint32).max, dtype=np.uint32)
    a, b = _permutations(cfg, perms)
    buffer = np.empty((perms, min(CHUNK_SHINGLES, len(hashes))), dtype=np.uint32)
    doc_of = np.repeat(np.arange(n), np.diff(offsets))
    for lo in range(0, len(hashes), CHUNK_SHINGLES):
        hi = min(lo + CHUNK_SHINGLES, len(hashes))
        permuted = buffer[:, : hi - lo]
        np.multiply(a, hashes[None, lo:hi], out=permuted)
        permuted += b
        # Segments: each document's shingles inside this chunk (a document may span chunks).
        docs = doc_of[lo:hi]
        seg = np.flatnonzero(np.r_[True, docs[1:] != docs[:-1]])
        seg_docs = docs[seg]
        sig[:, seg_docs] = np.minimum(sig[:, seg_docs], np.minimum.reduceat(permuted, seg, axis=1))
    return sig, np.diff(offsets) > 0


def band_keys(texts: pa.Array | list[str], cfg: MinHashConfig) -> pa.Array:
    """Phase 1: one ``fixed_size_binary(8 * bands)`` value per document, its LSH band hashes.

    Band ``j`` is the little-endian uint64 at bytes ``8j .. 8j+8``. A document without tokens
    gets all-zero keys and is never grouped.
    """
    bands, rows = cfg.banding()
    sig, nonempty = signatures(texts, cfg)
    folded = np.zeros((sig.shape[1], bands), U64)
    for row in range(rows):
        folded += sig[row::rows].T.astype(U64) * _BAND_MULT[row]
    keys = _splitmix64(folded + np.arange(bands, dtype=U64) * U64(0x9E3779B97F4A7C15))
    keys[keys == U64(EMPTY_KEY)] = U64(1)
    keys[~nonempty] = U64(EMPTY_KEY)
    data = np.ascontiguousarray(keys, dtype="<u8").tobytes()
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(8 * bands), len(keys), [None, pa.py_buffer(data)])


def shingle_sets(texts: list[str] | pa.Array, cfg: MinHashConfig) -> list[np.ndarray]:
    """Each document's distinct shingles (sorted uint64 values): what exact verification compares."""
    values, offsets = flat_shingle_sets(texts, cfg)
    return np.split(values, offsets[1:-1])


def flat_shingle_sets(texts: list[str] | pa.Array, cfg: MinHashConfig) -> tuple[np.ndarray, np.ndarray]:
    """``shingle_sets`` as one array (sorted and distinct per document) plus per-document offsets.

    A shingle is the top 48 bits of its 64-bit hash: that leaves 16 bits to put the document (or,
    in ``pair_jaccard``, the pair) above it, so that one ``np.sort`` of plain integers groups and
    orders everything -- much faster than a two-key ``lexsort``. Two different shingles of a pair
    of documents collide with probability about ``|A| * |B| / 2**48``.
    """
    hashes, offsets = _shingles(texts, cfg)
    n = len(offsets) - 1
    items = hashes >> U64(64 - SET_BITS)
    doc = np.repeat(np.arange(n, dtype=U64), np.diff(offsets))
    if n <= 1 << (64 - SET_BITS):
        keys = np.sort((doc << U64(SET_BITS)) | items)
        fresh = np.r_[True, keys[1:] != keys[:-1]] if len(keys) else np.zeros(0, bool)
        keys = keys[fresh]
        items, doc = keys & U64((1 << SET_BITS) - 1), keys >> U64(SET_BITS)
    else:
        order = np.lexsort((items, doc))
        items, doc = items[order], doc[order]
        fresh = (
            np.r_[True, (items[1:] != items[:-1]) | (doc[1:] != doc[:-1])]
            if len(items)
            else np.zeros(0, bool)
        )
        items, doc = items[fresh], doc[fresh]
    set_offsets = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(doc.astype(np.int64), minlength=n), out=set_offsets[1:])
    return items, set_offsets


# ---------------------------------------------------------------- phase 2


def key_matrix(keys: pa.Array | pa.ChunkedArray | np.ndarray, bands: int) -> np.ndarray:
    """Band keys as a (documents x bands) uint64 array."""
    if isinstance(keys, np.ndarray):
        if keys.ndim != 2 or keys.shape[1] != bands or keys.dtype != U64:
            raise ValueError(
                f"band keys of shape {keys.shape}; this config expects (documents, {bands}) uint64"
            )
        return keys
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks() if keys.num_chunks else pa.array([], pa.binary(8 * bands))
    if keys.type != pa.binary(8 * bands):
        raise ValueError(f"band keys of type {keys.type}; this config expects fixed_size_binary({8 * bands})")
    if keys.null_count:
        raise ValueError("band keys contain nulls")
    raw = np.frombuffer(keys.buffers()[1], dtype="<u8")
    return raw[keys.offset * bands : (keys.offset + len(keys)) * bands].reshape(-1, bands).astype(U64)


def link_to_first(keys: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first, other) pairs linking every row of a run of equal keys to the run's first row.

    ``keys`` must be sorted with ``rows`` ascending inside each run (a stable sort of rows taken in
    ascending order does that); zero keys (documents without shingles) are never linked. A bucket
    of a thousand identical documents gives 999 pairs, not half a million.
    """
    same = (keys[1:] == keys[:-1]) & (keys[1:] != U64(EMPTY_KEY))
    if not same.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    position = np.arange(len(keys), dtype=np.int64)
    run_start = np.maximum.accumulate(np.where(np.r_[True, ~same], position, 0))
    members = np.flatnonzero(same) + 1
    first, other = rows[run_start[members]], rows[members]
    differ = first != other  # one document whose two bands collide (chance 2**-64) is no pair
    return first[differ].astype(np.int64), other[differ].astype(np.int64)


def candidate_pairs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first, other) row pairs sharing a band bucket: each member linked to its bucket's lowest row.

    At most ``bands * (n - 1)`` pairs however large a bucket grows; distinct and sorted.
    """
    n = len(keys)
    found = []
    for band in range(keys.shape[1]):
        order = np.argsort(keys[:, band], kind="stable")  # stable: each bucket's rows stay ascending
        first, other = link_to_first(keys[order, band], order)
        found.append(first * n + other)
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pairs = np.unique(np.concatenate(found))
    return pairs // n, pairs % n


def band_similarity(keys: np.ndarray, u: np.ndarray, v: np.ndarray, rows: int) -> np.ndarray:
    """Jaccard estimated from the share of equal bands: ``(equal / bands) ** (1 / rows)``."""
    share = (keys[u] == keys[v]).mean(axis=1) if len(u) else np.zeros(0)
    return share ** (1.0 / rows)


def find_duplicates(
    band_keys: pa.Array | np.ndarray,
    order_keys: np.ndarray | None,
    cfg: MinHashConfig,
    texts_for_verify: Callable[[np.ndarray], list[str]] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Phase 2 over every document of the build (rows ``0..n-1`` in global order).

    Returns ``(removed rows ascending, the kept row of each one's cluster, estimated similarity
    of each removed row to its kept row)``. The similarity is the exact shingle Jaccard when
    ``cfg.verify`` (texts fetched through ``texts_for_verify(rows)`` for candidate rows only),
    otherwise estimated from the share of equal bands. ``order_keys`` are the document lengths
    for ``keep: longest``. The result depends only on the keys and row numbers, never on how
    the rows were batched.
    """
    bands, rows = cfg.banding()
    keys = key_matrix(band_keys, bands)
    if cfg.verify and texts_for_verify is None:
        raise ValueError("verify needs texts_for_verify (or set verify: false)")
    if cfg.keep != "first" and (order_keys is None or len(order_keys) != len(keys)):
        raise ValueError("keep: longest needs order_keys (one length per row)")
    u, v = candidate_pairs(keys)
    verify = (lambda a, b: exact_jaccard(a, b, texts_for_verify, cfg)) if cfg.verify else None
    weights = (lambda members: np.asarray(order_keys)[members]) if cfg.keep != "first" else None
    return resolve_clusters(
        u, v, verify(u, v) if verify else None, cfg, weights,
        verify or (lambda a, b: band_similarity(keys, a, b, rows)),
    )  # fmt: skip


def resolve_clusters(
    u: np.ndarray,
    v: np.ndarray,
    verified: np.ndarray | None,
    cfg: MinHashConfig,
    weights_of: Callable[[np.ndarray], np.ndarray] | None,
    similarity_of: Callable[[np.ndarray, np.ndarray], np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate pairs (sorted by ``(u, v)``, ``u < v``) to ``(removed, kept, similarity)``.

    ``verified`` holds the exact Jaccard of each pair (pairs below the threshold are dropped), or
    None to take the candidates as they are. ``weights_of(members)`` gives the keep rule's weight
    of each row (None: the first row stays). A removed row whose kept row was not one of its own
    pairs (a chain a-b-c) gets its similarity from ``similarity_of``.
    """
    if verified is not None and len(u):
        similar = verified >= cfg.threshold
        u, v, verified = u[similar], v[similar], verified[similar]
    members, root = connected_components(u, v)
    removed, kept = keep_one_per_cluster(members, root, weights_of(members) if weights_of else None)
    if verified is None:
        return removed, kept, similarity_of(removed, kept)
    # Most (removed, kept) pairs were verified already; compute only the chained ones.
    similarity = np.zeros(len(removed))
    low, high = np.minimum(removed, kept), np.maximum(removed, kept)
    span = int(max(v.max(initial=0), high.max(initial=0))) + 1  # (u, v) sorted = u * span + v sorted
    codes = u * span + v
    at = np.searchsorted(codes, low * span + high) if len(u) else np.zeros(len(removed), np.int64)
    known = at < len(u)
    known[known] = codes[at[known]] == (low * span + high)[known]
    similarity[known] = verified[at[known]]
    similarity[~known] = similarity_of(removed[~known], kept[~known])
    return removed, kept, similarity


def exact_jaccard(
    u: np.ndarray, v: np.ndarray, texts_for_verify: Callable[[np.ndarray], list[str]], cfg: MinHashConfig
) -> np.ndarray:
    """Exact shingle Jaccard of row pairs, fetching texts for a block of pairs at a time.

    Pairs are taken in order of their first row, so a bucket's star of pairs shares one fetch;
    memory holds the shingle sets of at most ``2 * VERIFY_BLOCK`` documents.
    """
    out = np.zeros(len(u))
    order = np.lexsort((v, u))
    for lo in range(0, len(u), VERIFY_BLOCK):
        block = order[lo : lo + VERIFY_BLOCK]
        rows = np.unique(np.concatenate([u[block], v[block]]))
        texts = texts_for_verify(rows)
        if len(texts) != len(rows):
            raise ValueError(f"texts_for_verify returned {len(texts)} texts for {len(rows)} rows")
        values, offsets = flat_shingle_sets(texts, cfg)
        a, b = np.searchsorted(rows, u[block]), np.searchsorted(rows, v[block])
        out[block] = pair_jaccard(values, offsets, a, b)
    return out
