"""Which mined candidates get the teacher: combined scores, then a top fraction, a threshold or a token
budget, per stratum, with an n-gram novelty against what is already chosen.

Pure functions over plain lists (``synth/mine.py`` feeds them), so each rule is tested on its own:

- ``combine``: one score is used as it is; several are each turned into a percentile rank over the
  candidates (ties share their mean rank) and averaged by weight -- a loss in nats and a pass@k in 0..1
  then count alike;
- ``select``: candidates in order of score (ties by id, so a rerun picks the same), each stratum with its
  share of the budget or of the kept count (``proportional`` to its candidates, ``equal``, or given
  weights), greedily: a
  candidate that no longer fits the stratum's tokens is skipped and a cheaper one after it may still fit;
  what a stratum leaves unused goes to the best remaining candidates of any stratum. With a diversity
  weight, a candidate's score is multiplied by ``novelty ** weight`` -- novelty is one minus its largest
  word n-gram Jaccard with a chosen one -- evaluated lazily (novelty only falls as the selection grows,
  so a stale score is an upper bound: the standard lazy greedy of submodular selection).
"""

from __future__ import annotations

import heapq
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field


def pass_at_k(n: int, correct: int, k: int) -> float:
    """The unbiased pass@k of Chen et al. (2021): the chance that k of the n samples, drawn without
    replacement, hold at least one correct answer (``1 - C(n-c, k) / C(n, k)``)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def percentile_ranks(values: Sequence[float]) -> list[float]:
    """Each value's rank among ``values`` scaled to 0..1 (the lowest 0, the highest 1), ties sharing the
    mean of their ranks; a single value ranks 1."""
    n = len(values)
    if n == 1:
        return [1.0]
    order = sorted(range(n), key=lambda i: values[i])
    ranks = [0.0] * n
    i = 0
    while i < n:
        j = i
        while j + 1 < n and values[order[j + 1]] == values[order[i]]:
            j += 1
        for position in range(i, j + 1):
            ranks[order[position]] = (i + j) / 2 / (n - 1)
        i = j + 1
    return ranks


def combine(scores: dict[str, Sequence[float]], weights: dict[str, float]) -> list[float]:
    """One score per candidate: the score itself when there is one, else the weighted mean of each
    score's percentile rank."""
    if len(scores) == 1:
        return [float(v) for v in next(iter(scores.values()))]
    total = sum(weights[name] for name in scores)
    ranked = {name: percentile_ranks(values) for name, values in scores.items()}
    n = len(next(iter(scores.values())))
    return [sum(weights[name] * ranked[name][i] for name in scores) / total for i in range(n)]


WORD = re.compile(r"\w+")


def ngrams(text: str, n: int) -> frozenset[str]:
    """The word n-grams of ``text`` (lower-cased words; the whole text when it has fewer than n words)."""
    words = WORD.findall(text.lower())
    if len(words) < n:
        return frozenset([" ".join(words)]) if words else frozenset()
    return frozenset(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))


class NoveltyIndex:
    """The chosen candidates' n-gram sets, indexed by n-gram: a candidate's largest Jaccard with any of
    them costs one look-up per n-gram it has, not one comparison per chosen candidate."""

    def __init__(self) -> None:
        self.sets: list[frozenset[str]] = []
        self.ids: list[str] = []
        self.holders: dict[str, list[int]] = defaultdict(list)

    def add(self, key: str, grams: frozenset[str]) -> None:
        for g in grams:
            self.holders[g].append(len(self.sets))
        self.sets.append(grams)
        self.ids.append(key)

    def closest(self, grams: frozenset[str]) -> tuple[float, str | None]:
        """(largest Jaccard with a chosen set, that candidate's id); (0, None) when none overlaps."""
        shared: dict[int, int] = defaultdict(int)
        for g in grams:
            for holder in self.holders.get(g, ()):
                shared[holder] += 1
        best, best_id = 0.0, None
        for holder, common in shared.items():
            jaccard = common / (len(grams) + len(self.sets[holder]) - common)
            if jaccard > best:
                best, best_id = jaccard, self.ids[holder]
        return best, best_id


@dataclass
class Candidate:
    """What selection needs of a candidate."""

    id: str
    score: float
    tokens: int
    """The teacher tokens it would cost (prompt plus every answer at ``max_tokens``)."""
    stratum: str = ""
    text: str = ""
    """What novelty compares (the prompt)."""


@dataclass
class Rules:
    top_fraction: float | None = None
    threshold: float | None = None
    teacher_tokens: int | None = None
    strata: str = "proportional"
    """``proportional`` | ``equal`` | ``weights`` (then ``stratum_weights``)."""
    stratum_weights: dict[str, float] = field(default_factory=dict)
    diversity: float = 0.0
    """The exponent of novelty in the effective score (0: novelty is not used)."""
    min_novelty: float = 0.0
    """A candidate whose novelty falls below this is never chosen."""
    ngram: int = 3


@dataclass
class Decision:
    chosen: bool
    rank: int
    """1 for the highest score."""
    reason: str
    novelty: float | None = None
    similar_to: str | None = None


def shares(candidates: list[Candidate], rules: Rules) -> dict[str, float]:
    """Each stratum's share (summing to 1) of the budget."""
    sizes: dict[str, int] = defaultdict(int)
    for c in candidates:
        sizes[c.stratum] += 1
    if rules.strata == "equal":
        raw = dict.fromkeys(sizes, 1.0)
    elif rules.strata == "weights":
        raw = {s: rules.stratum_weights.get(s, 0.0) for s in sizes}
    else:
        raw = {s: float(n) for s, n in sizes.items()}
    total = sum(raw.values()) or 1.0
    return {s: w / total for s, w in sorted(raw.items())}


def select(candidates: list[Candidate], rules: Rules) -> dict[str, Decision]:
    """A decision per candidate id (see the module docstring)."""
    order = sorted(candidates, key=lambda c: (-c.score, c.id))
    rank = {c.id: i + 1 for i, c in enumerate(order)}
    decisions: dict[str, Decision] = {}
    eligible = []
    for c in order:
        if rules.threshold is not None and c.score < rules.threshold:
            decisions[c.id] = Decision(
                False, rank[c.id], f"score {c.score:.4g} below the threshold {rules.threshold:g}"
            )
        else:
            eligible.append(c)
    share = shares(candidates, rules)
    by_stratum: dict[str, list[Candidate]] = defaultdict(list)
    for c in eligible:
        by_stratum[c.stratum].append(c)
    if rules.teacher_tokens is not None:
        total = float(rules.teacher_tokens)
    elif rules.top_fraction is not None:
        total = float(round(rules.top_fraction * len(candidates)))
    else:
        total = math.inf
    index = NoveltyIndex()
    grams = {c.id: ngrams(c.text, rules.ngram) for c in eligible} if _novelty_used(rules) else {}
    spent = {"units": 0}

    def cost(c: Candidate) -> float:
        return c.tokens if rules.teacher_tokens is not None else 1

    def pick(pool: list[Candidate], left: float) -> None:
        """Greedy over ``pool`` (by effective score) while ``left`` allows."""
        heap = [(-_effective(c.score, 1.0, rules), rank[c.id], c) for c in pool if c.id not in decisions]
        heapq.heapify(heap)
        while heap and left > 0:
            bound, _, c = heapq.heappop(heap)
            novelty, similar = (1.0, None)
            if _novelty_used(rules):
                overlap, similar = index.closest(grams[c.id])
                novelty = 1.0 - overlap
                if novelty < rules.min_novelty:
                    decisions[c.id] = Decision(False, rank[c.id], f"novelty {novelty:.3f} below {rules.min_novelty:g}",
                                               novelty, similar)  # fmt: skip
                    continue
                current = -_effective(c.score, novelty, rules)
                if heap and current > heap[0][0] + 1e-12:  # fell behind the next best bound: look again later
                    heapq.heappush(heap, (current, rank[c.id], c))
                    continue
            if cost(c) > left:
                continue  # too dear for what is left; a cheaper one below may fit
            left -= cost(c)
            spent["units"] += cost(c)
            if _novelty_used(rules):
                index.add(c.id, grams[c.id])
            decisions[c.id] = Decision(
                True, rank[c.id], _why(c, rank[c.id], len(candidates), rules), novelty, similar
            )

    for stratum in sorted(by_stratum):
        pick(by_stratum[stratum], total * share[stratum])
    if math.isfinite(total) and total > spent["units"]:
        # what the strata left unused goes to the best candidates left, whatever their stratum
        pick(eligible, total - spent["units"])
    for c in eligible:
        if c.id not in decisions:
            why = (
                "over the teacher-token budget"
                if rules.teacher_tokens is not None
                else "outside the top fraction"
            )
            decisions[c.id] = Decision(False, rank[c.id], why)
    return decisions


def _novelty_used(rules: Rules) -> bool:
    return rules.diversity > 0 or rules.min_novelty > 0


def _effective(score: float, novelty: float, rules: Rules) -> float:
    return score * novelty**rules.diversity if rules.diversity > 0 else score


def _why(c: Candidate, rank: int, total: int, rules: Rules) -> str:
    parts = [f"rank {rank} of {total} by score {c.score:.4g}"]
    if rules.teacher_tokens is not None:
        parts.append(f"{c.tokens} teacher tokens within the budget")
    elif rules.top_fraction is not None:
        parts.append(f"in the top {rules.top_fraction:g}")
    if rules.threshold is not None:
        parts.append(f"at or above the threshold {rules.threshold:g}")
    if c.stratum:
        parts.append(f"stratum {c.stratum}")
    return "; ".join(parts)
