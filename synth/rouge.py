"""ROUGE-L of one text against every text of a growing pool, fast enough for Self-Instruct.

ROUGE-L (Lin 2004) is the F-measure of the longest common subsequence (LCS) of tokens: with
precision ``lcs / len(a)`` and recall ``lcs / len(b)`` it is ``2 * lcs / (len(a) + len(b))``.
Tokens are lower-cased runs of letters and digits, as ``rouge-score``'s default tokenizer makes
them (which, unlike this one, also drops non-ASCII letters).

Self-Instruct compares every candidate with the whole pool (thousands of instructions), so the
LCS is bit-parallel (Allison & Dix 1986; Hyyrö 2004) and vectorised over the pool: bit ``j`` of
a pool text's vector stands for its token ``j``, 64 to a machine word, and each query token
updates every pool text at once with a few numpy operations on ``pool × words`` integers::

    U = V & match(token);  V = (V + U) | (V - U)        # LCS = zero bits of V below the length

A pool of 5,000 instructions of up to 64 tokens answers a 20-token query in a few milliseconds.
"""

from __future__ import annotations

import re

import numpy as np

WORD = re.compile(r"[^\W_]+")
ALL_ONES = np.uint64(0xFFFF_FFFF_FFFF_FFFF)


def tokens(text: str) -> list[str]:
    return WORD.findall(text.casefold())


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F-measure of two texts."""
    index = RougeLIndex()
    index.add(b)
    return float(index.scores(a)[0])


class RougeLIndex:
    """Texts added one by one; ``scores(text)`` is the ROUGE-L F-measure against each, in order."""

    def __init__(self) -> None:
        self._vocab: dict[str, int] = {}
        self._tokens = np.full((16, 64), -1, dtype=np.int32)  # one row per text, padded with -1
        self._lengths = np.zeros(16, dtype=np.int64)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def add(self, text: str) -> None:
        ids = [self._vocab.setdefault(t, len(self._vocab)) for t in tokens(text)]
        rows, width = self._tokens.shape
        need = max(width, -(-len(ids) // 64) * 64)
        if self._n == rows or need > width:
            grown = np.full((rows * 2 if self._n == rows else rows, need), -1, dtype=np.int32)
            grown[:rows, :width] = self._tokens
            self._tokens = grown
            self._lengths = np.concatenate([self._lengths, np.zeros(len(grown) - rows, dtype=np.int64)])
        self._tokens[self._n, : len(ids)] = ids
        self._lengths[self._n] = len(ids)
        self._n += 1

    def _bits(self, mask: np.ndarray) -> np.ndarray:
        """A (texts, positions) boolean mask as (texts, words) little-endian bit vectors."""
        return np.packbits(mask, axis=1, bitorder="little").view("<u8").astype(np.uint64, copy=False)

    def scores(self, text: str) -> np.ndarray:
        query = [self._vocab.get(t, -2) for t in tokens(text)]
        n = self._n
        if not n or not query:
            return np.zeros(n)
        pool = self._tokens[:n]
        v = np.full((n, pool.shape[1] // 64), ALL_ONES, dtype=np.uint64)
        matches: dict[int, np.ndarray] = {}
        for t in query:
            if t < 0:  # a token no pool text has: U is empty and V stays as it is
                continue
            if t not in matches:
                matches[t] = self._bits(pool == t)
            u = v & matches[t]
            total = np.empty_like(v)
            carry = np.zeros(n, dtype=np.uint64)
            for w in range(v.shape[1]):  # V + U, carrying from each 64-position word into the next
                s = v[:, w] + u[:, w]
                s_carried = s + carry
                total[:, w] = s_carried
                carry = ((s < v[:, w]) | (s_carried < s)).astype(np.uint64)
            v = total | (v & ~u)  # V - U is V & ~U, as U holds only bits of V
        lcs = np.bitwise_count(~v & self._bits(pool >= 0)).sum(axis=1)
        return 2.0 * lcs / (len(query) + self._lengths[:n])
