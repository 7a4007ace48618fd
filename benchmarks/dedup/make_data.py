"""A labelled near-duplicate benchmark built from real text, seeded and reproducible.

Seeds are the embedded sample (``examples/sample/web.jsonl`` and ``notes/*.txt``), cleared of its
own exact and near duplicates. More originals are made by recombining the sample's sentences into
new paragraphs. Then:

- **copies** of originals, each with one mutation -- word insertions, deletions or substitutions
  at rates from 0.5% to 10%, reordered paragraphs, boilerplate added (cookie banner, menu,
  footer) -- or substitutions plus boilerplate. Their true Jaccard with the original spans the
  threshold on both sides, which is the point;
- **hard negatives**: groups of different documents that share one long common paragraph (the
  same text, 40-80% of each document), true Jaccard mostly 0.55-0.8.

The ground truth is computed here, independently of ``corpus/minhash.py``: shingles are Python
tuples of five lower-cased whitespace-separated words (the whole document when shorter), and
every pair of documents *within* a family (an original and its copies, or a hard-negative group)
gets its exact Jaccard. Pairs at or above a threshold are the true duplicate pairs; documents of
different families share no more than stray sentences of the pool.

    .venv/bin/python benchmarks/dedup/make_data.py --originals 2000 --out /tmp/dedup-bench
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "examples" / "sample"
NGRAM = 5

BOILERPLATE = [
    "We use cookies to improve your experience on our site. By continuing to browse you agree to our "
    "use of cookies and our privacy policy.",
    "Home | About | Contact | Blog | Shop | Newsletter | Careers | Help centre",
    "Copyright 2024 Example Media Group. All rights reserved. Reproduction without permission is prohibited.",
    "Share this article: Facebook Twitter LinkedIn Email Print",
    "Sign up for our weekly newsletter and never miss a story. Unsubscribe at any time.",
    "Related posts: Ten things to know before you start | Our most popular guides of the year",
]


def shingles(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    """Word n-gram shingles of lower-cased whitespace-split text (the reference definition)."""
    words = text.lower().split()
    if len(words) < n:
        return {tuple(words)} if words else set()
    return set(zip(*(words[i:] for i in range(n)), strict=False))


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


@dataclass
class Benchmark:
    """Documents in their (shuffled) input order, with their labels."""

    texts: list[str] = field(default_factory=list)
    family: list[int] = field(default_factory=list)
    """Documents of one family may be duplicates; different families never are."""
    kind: list[str] = field(default_factory=list)
    """``original``, ``copy`` or ``negative``."""
    mutation: list[str] = field(default_factory=list)
    original: list[int] = field(default_factory=list)
    """A copy's original (row); -1 for other documents."""
    jaccard: list[float] = field(default_factory=list)
    """A copy's exact shingle Jaccard with its original; -1 for other documents."""
    family_pairs: dict[tuple[int, int], float] = field(default_factory=dict)
    """Exact Jaccard of every pair of rows (low, high) of the same family."""

    def true_pairs(self, threshold: float) -> set[tuple[int, int]]:
        return {pair for pair, j in self.family_pairs.items() if j >= threshold}


def _seed_documents() -> list[str]:
    """The sample's documents of 40+ words, without its exact and near duplicates."""
    docs = [json.loads(line)["text"] for line in (SAMPLE / "web.jsonl").read_text().splitlines() if line]
    docs += [p.read_text(encoding="utf-8") for p in sorted((SAMPLE / "notes").glob("*.txt"))]
    kept: list[tuple[str, set]] = []
    for doc in docs:
        if len(doc.split()) < 40:
            continue
        sh = shingles(doc)
        if all(jaccard(sh, other) < 0.2 for _, other in kept):
            kept.append((doc, sh))
    return [doc for doc, _ in kept]


def _sentences(docs: list[str]) -> list[str]:
    found = {s.strip() for doc in docs for s in re.split(r"(?<=[.!?])\s+", doc) if len(s.split()) >= 5}
    return sorted(found)


class _Mutator:
    def __init__(self, rng: random.Random, vocabulary: list[str], pool: list[str]):
        self.rng, self.vocabulary, self.pool = rng, vocabulary, pool

    def recombined(self) -> str:
        """A new original: 2-6 paragraphs of 2-5 distinct pool sentences."""
        rng = self.rng
        sentences = rng.sample(self.pool, rng.randint(6, 24))
        paragraphs, i = [], 0
        while i < len(sentences):
            step = rng.randint(2, 5)
            paragraphs.append(" ".join(sentences[i : i + step]))
            i += step
        return "\n".join(paragraphs)

    def words(self, text: str, kind: str, rate: float) -> str:
        """Insert, delete or substitute about ``rate`` of the words, keeping the line structure."""
        rng = self.rng
        lines = [line.split() for line in text.split("\n")]
        total = sum(map(len, lines))
        for _ in range(max(1, round(total * rate))):
            line = rng.choice([ln for ln in lines if ln] or lines)
            at = rng.randrange(len(line) + (kind == "insert")) if line or kind == "insert" else 0
            if kind == "insert":
                line.insert(at, rng.choice(self.vocabulary))
            elif kind == "delete" and len(line) > 1:
                del line[at]
            elif kind == "substitute" and line:
                line[at] = rng.choice(self.vocabulary)
        return "\n".join(" ".join(line) for line in lines)

    def reorder(self, text: str) -> str:
        paragraphs = text.split("\n")
        if len(paragraphs) > 1:
            while paragraphs == text.split("\n"):
                self.rng.shuffle(paragraphs)
        return "\n".join(paragraphs)

    def boilerplate(self, text: str) -> str:
        head, tail = self.rng.sample(BOILERPLATE, 2)
        return f"{head}\n{text}\n{tail}"

    def copy(self, text: str) -> tuple[str, str]:
        """One mutated copy and the name of its mutation."""
        rng = self.rng
        kind = rng.choice(["insert", "delete", "substitute", "substitute", "reorder", "boilerplate", "mixed"])
        rate = rng.choice([0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1])
        if kind == "reorder":
            return self.reorder(text), kind
        if kind == "boilerplate":
            return self.boilerplate(text), kind
        if kind == "mixed":
            return self.boilerplate(
                self.words(text, "substitute", rate)
            ), f"substitute {rate:.1%} + boilerplate"
        return self.words(text, kind, rate), f"{kind} {rate:.1%}"


def build(originals: int = 2000, seed: int = 0, negative_groups: int | None = None) -> Benchmark:
    """Originals (seeds first, then recombined), 0-4 copies each, and hard-negative groups."""
    rng = random.Random(seed)
    seeds = _seed_documents()
    pool = _sentences(seeds)
    vocabulary = sorted({w for s in pool for w in s.split()})
    mutate = _Mutator(rng, vocabulary, pool)
    docs: list[dict] = []
    family = 0
    for i in range(originals):
        text = seeds[i] if i < len(seeds) else mutate.recombined()
        docs.append({"text": text, "family": family, "kind": "original", "mutation": "", "of": None})
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3, 4])):
            copy, how = mutate.copy(text)
            docs.append({"text": copy, "family": family, "kind": "copy", "mutation": how, "of": text})
        family += 1
    for _ in range(negative_groups if negative_groups is not None else originals // 10):
        common = " ".join(rng.sample(pool, rng.randint(6, 12)))
        common_words = len(common.split())
        for _ in range(rng.randint(2, 4)):
            own, target = [], common_words * rng.uniform(0.1, 0.45)
            while sum(len(s.split()) for s in own) < target:
                own.append(rng.choice(pool))
            cut = rng.randint(0, len(own))
            text = "\n".join(p for p in (" ".join(own[:cut]), common, " ".join(own[cut:])) if p)
            docs.append(
                {
                    "text": text,
                    "family": family,
                    "kind": "negative",
                    "mutation": "shared paragraph",
                    "of": None,
                }
            )
        family += 1
    rng.shuffle(docs)
    bench = Benchmark()
    row_of_text: dict[tuple[int, str], int] = {}
    sets = [shingles(d["text"]) for d in docs]
    for row, d in enumerate(docs):
        if d["kind"] == "original":
            row_of_text[d["family"], d["text"]] = row
    by_family: dict[int, list[int]] = {}
    for row, d in enumerate(docs):
        bench.texts.append(d["text"])
        bench.family.append(d["family"])
        bench.kind.append(d["kind"])
        bench.mutation.append(d["mutation"])
        original = row_of_text[d["family"], d["of"]] if d["of"] is not None else -1
        bench.original.append(original)
        bench.jaccard.append(jaccard(sets[row], sets[original]) if original >= 0 else -1.0)
        by_family.setdefault(d["family"], []).append(row)
    for rows in by_family.values():
        for a, b in itertools.combinations(sorted(rows), 2):
            bench.family_pairs[a, b] = jaccard(sets[a], sets[b])
    return bench


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--originals", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="folder for docs.jsonl and truth.jsonl")
    args = parser.parse_args()
    bench = build(args.originals, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "docs.jsonl", "w", encoding="utf-8") as f:
        for row, text in enumerate(bench.texts):
            f.write(json.dumps({"id": str(row), "text": text}) + "\n")
    with open(args.out / "truth.jsonl", "w", encoding="utf-8") as f:
        for row in range(len(bench.texts)):
            f.write(
                json.dumps(
                    {
                        "row": row,
                        "family": bench.family[row],
                        "kind": bench.kind[row],
                        "mutation": bench.mutation[row],
                        "original": bench.original[row],
                        "jaccard": round(bench.jaccard[row], 6),
                    }
                )
                + "\n"
            )
    copies = [j for j in bench.jaccard if j >= 0]
    print(
        f"{len(bench.texts)} documents ({bench.kind.count('original')} originals, {len(copies)} copies, "
        f"{bench.kind.count('negative')} hard negatives) -> {args.out}"
    )


if __name__ == "__main__":
    main()
