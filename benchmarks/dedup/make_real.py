"""A labelled near-duplicate benchmark from long real documents found on this machine.

**Originals** are the pieces of ``real_text.py`` (man pages, Python docstrings, Rust books and API
pages, plain-text documentation; ~5,000 characters each), cleared of their own exact and near
duplicates first: a piece is dropped when its *folded* word 5-gram set (NFKC, lower-cased, ``\\w+``
words, every digit as 0 -- the widest view any method compared here takes) has Jaccard >= 0.5
with a piece kept before it. Candidates come from MinHash LSH over those sets (32 bands x 4
rows), and every candidate is checked exactly. A random sample of the survivors, at most
``--source-share`` of it from any one source, are the originals.

**Copies** (a fifth of the set: one original in six gets one or two) carry edits of two kinds,
either or both:

- word edits: insertions, deletions or substitutions (or a mix) at 0.2-8% of the words;
- punctuation-level edits at 1-20% of the words, of one to three kinds: punctuation added (a
  comma, quotes, parentheses), removed (at a word's edges), or changed (``,`` -> ``;``, ``-`` -> an
  en dash, straight -> curly quotes); case changed; digits changed; Unicode compatibility forms
  (fullwidth letters, ``fi``/``fl`` ligatures, a no-break space, ``...`` -> ``…``).

**The truth** is computed here, without any of the project's code: the Jaccard of *normalised*
word 5-gram sets (NFKC, lower-cased, ``\\w+`` words, as Python tuples) for every pair of documents
of one family (an original and its copies); pairs at or above the threshold are the true
duplicate pairs. The raw Jaccard (lower-cased whitespace-separated words, ``make_data.shingles``:
what a method that does not normalise sees) is recorded beside it. Digit edits change the
normalised truth (digits are words), so a method that folds digits sees those copies closer than
the truth does.

    .venv/bin/python benchmarks/dedup/make_real.py --originals 16000 --out /tmp/dedup-real
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import random
import re
import sys
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import make_data  # noqa: E402
import real_text  # noqa: E402

NGRAM = 5
MIN_WORDS = 100
WORD = re.compile(r"\w+")


def normalised_words(text: str) -> list[str]:
    return WORD.findall(unicodedata.normalize("NFKC", text).lower())


def normalised_shingles(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    """Word n-grams of NFKC, lower-cased ``\\w+`` words (the truth's definition)."""
    return shingle_set(normalised_words(text), n)


@lru_cache(maxsize=1)
def _symbols() -> dict[int, None]:
    """Every punctuation, symbol and format character of Unicode, for ``str.translate`` to delete."""
    return {c: None for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c))[0] in "PS"
            or unicodedata.category(chr(c)) == "Cf"}  # fmt: skip


def simplified_words(text: str) -> list[str]:
    """datatrove's view, written again here: NFKC, lower case, punctuation and symbols deleted
    (``don't`` -> ``dont``), every digit 0, whitespace-separated words."""
    return re.sub(r"\d", "0", unicodedata.normalize("NFKC", text).lower().translate(_symbols())).split()


def shingle_set(words: list[str], n: int = NGRAM) -> set[tuple[str, ...]]:
    if len(words) < n:
        return {tuple(words)} if words else set()
    return set(zip(*(words[i:] for i in range(n)), strict=False))


# ----------------------------------------------------------------------------- dedup the pool


def _mix(x: np.ndarray) -> np.ndarray:
    """A 64-bit finaliser (MurmurHash3's fmix64), wrapping arithmetic."""
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xFF51AFD7ED558CCD)
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xC4CEB9FE1A85EC53)
    return x ^ (x >> np.uint64(33))


class NearDuplicateFilter:
    """Keeps a text unless its folded 5-gram set has Jaccard >= ``threshold`` with one kept before.

    Sets are sorted arrays of 64-bit shingle hashes (word ids numbered in order of appearance, so
    runs are reproducible). Candidates come from MinHash LSH over the kept texts, 32 bands of 4
    rows (a pair at Jaccard 0.5 becomes a candidate with probability 0.87, at 0.6 0.99, at 0.7
    0.9998), and each candidate is compared exactly.
    """

    BANDS, ROWS = 32, 4

    def __init__(self, threshold: float = 0.5):
        self.threshold = threshold
        count = np.arange(self.BANDS * self.ROWS, dtype=np.uint64)
        self.xor, self.mul = _mix(count + np.uint64(1)), _mix(count + np.uint64(1 << 20)) | np.uint64(1)
        self.band_salt = _mix(np.arange(self.BANDS, dtype=np.uint64) + np.uint64(1 << 40))
        self.word_ids: dict[str, int] = {}
        self.kept: list[np.ndarray] = []
        self.buckets: dict[int, list[int]] = {}

    def shingle_hashes(self, text: str) -> np.ndarray:
        folded = re.sub(r"\d", "0", unicodedata.normalize("NFKC", text).lower())
        ids = np.fromiter(
            (self.word_ids.setdefault(w, len(self.word_ids) + 1) for w in WORD.findall(folded)), np.uint64
        )
        if len(ids) < MIN_WORDS:
            return np.zeros(0, np.uint64)
        with np.errstate(over="ignore"):
            h = np.zeros(len(ids) - NGRAM + 1, np.uint64)
            for i in range(NGRAM):
                h = _mix(h + ids[i : len(ids) - NGRAM + 1 + i])
        return np.unique(h)

    def band_keys(self, h: np.ndarray) -> list[int]:
        with np.errstate(over="ignore"):
            signature = ((h[None, :] ^ self.xor[:, None]) * self.mul[:, None]).min(axis=1)
            rows = signature.reshape(self.BANDS, self.ROWS)
            key = self.band_salt
            for r in range(self.ROWS):
                key = _mix(key ^ rows[:, r])
        return key.tolist()

    def add(self, text: str) -> bool:
        h = self.shingle_hashes(text)
        if not len(h):
            return False
        keys = self.band_keys(h)
        for doc in sorted({doc for key in keys for doc in self.buckets.get(key, ())}):
            other = self.kept[doc]
            both = len(np.intersect1d(h, other, assume_unique=True))
            if both / (len(h) + len(other) - both) >= self.threshold:
                return False
        for key in keys:
            self.buckets.setdefault(key, []).append(len(self.kept))
        self.kept.append(h)
        return True


def distinct_pieces(sources: list[str], threshold: float) -> list[tuple[str, str, str]]:
    """Every piece of the sources that is no near-copy of an earlier one, in source order."""
    keep = NearDuplicateFilter(threshold)
    kept, seen, start = [], Counter(), time.perf_counter()
    for source, name, text in real_text.documents(sources):
        seen[source] += 1
        if keep.add(text):
            kept.append((source, name, text))
    by_source = Counter(s for s, _, _ in kept)
    print(
        f"pool: {sum(seen.values()):,} pieces read, {len(kept):,} distinct ("
        + ", ".join(f"{s} {by_source[s]:,} of {seen[s]:,}" for s in sources)
        + f") in {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    return kept


def choose_originals(pool: list[tuple[str, str, str]], n: int, share: float, rng: random.Random) -> list:
    """``n`` pieces at random, at most ``share`` of them (or an equal share) from one source."""
    order = list(range(len(pool)))
    rng.shuffle(order)
    sources = len({source for source, _, _ in pool})
    cap, taken, chosen = max(-(-n // sources), int(n * share)), Counter(), []
    for i in order:
        source = pool[i][0]
        if taken[source] < cap:
            taken[source] += 1
            chosen.append(pool[i])
            if len(chosen) == n:
                break
    return chosen


# ------------------------------------------------------------------------------------- copies

WORD_RATES = [0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.06, 0.08]
PUNCT_RATES = [0.01, 0.03, 0.05, 0.1, 0.2]
PUNCT_KINDS = ["add", "remove", "change", "case", "digits", "unicode"]
_CHANGED = str.maketrans(
    {",": ";", ";": ",", ".": "!", ":": ";", "-": "–", '"': "“", "'": "’", "(": "[", ")": "]"}
)
_FULLWIDTH = str.maketrans({chr(c): chr(c + 0xFEE0) for c in range(0x21, 0x7F)})
_EDGE_PUNCT = re.compile(r"^[^\w\s]+|[^\w\s]+$")


class Editor:
    """Edits a text in place of its words, keeping its whitespace (line breaks, indents) as it is."""

    def __init__(self, rng: random.Random, vocabulary: list[str]):
        self.rng, self.vocabulary = rng, vocabulary

    def words(self, parts: list[str], kind: str, rate: float) -> None:
        rng = self.rng
        positions = [i for i in range(0, len(parts), 2) if parts[i]]
        for p in rng.sample(positions, min(len(positions), max(1, round(len(positions) * rate)))):
            how = rng.choice(["insert", "delete", "substitute"]) if kind == "mixed" else kind
            if how == "insert":
                parts[p] = f"{rng.choice(self.vocabulary)} {parts[p]}"
            elif how == "delete":
                parts[p] = ""
                if p + 1 < len(parts):
                    parts[p + 1] = ""
            else:
                parts[p] = rng.choice(self.vocabulary)

    def punctuation(self, parts: list[str], kind: str, count: int) -> None:
        rng = self.rng
        wanted = {
            "remove": lambda w: _EDGE_PUNCT.search(w) and _EDGE_PUNCT.sub("", w),
            "change": lambda w: w != w.translate(_CHANGED),
            "case": lambda w: any(c.isalpha() for c in w),
            "digits": lambda w: any(c.isdigit() for c in w),
        }.get(kind, bool)
        positions = [i for i in range(0, len(parts), 2) if parts[i] and wanted(parts[i])]
        if kind == "digits":  # a few numbers (dates, versions, counts), not every number of a changelog
            count = min(count, max(1, len(parts) // 200))
        for p in rng.sample(positions, min(count, len(positions))):
            w = parts[p]
            if kind == "add":
                parts[p] = rng.choice([w + rng.choice(",.;:!?"), f'"{w}"', f"({w})", f"'{w}'"])
            elif kind == "remove":
                parts[p] = _EDGE_PUNCT.sub("", w)
            elif kind == "change":
                parts[p] = w.translate(_CHANGED)
            elif kind == "case":
                parts[p] = rng.choice([w.upper(), w.capitalize(), w.lower(), w.swapcase()])
            elif kind == "digits":
                parts[p] = re.sub(r"\d", lambda m: rng.choice("0123456789".replace(m.group(), "")), w)
            else:
                self.compatibility_form(parts, p)

    def compatibility_form(self, parts: list[str], p: int) -> None:
        """A Unicode compatibility form NFKC folds back: fullwidth, a ligature, NBSP, an ellipsis."""
        w, rng = parts[p], self.rng
        options = ["fullwidth"] + ["ligature"] * ("fi" in w or "fl" in w) + ["ellipsis"] * ("..." in w)
        options += ["nbsp"] * (p + 1 < len(parts) and parts[p + 1] == " ")
        how = rng.choice(options)
        if how == "fullwidth":
            parts[p] = w.translate(_FULLWIDTH)
        elif how == "ligature":
            parts[p] = w.replace("fi", "\ufb01").replace("fl", "\ufb02")
        elif how == "ellipsis":
            parts[p] = w.replace("...", "\u2026")
        else:
            parts[p + 1] = "\u00a0"

    def copy(self, text: str) -> tuple[str, str, str]:
        """A copy, the description of its edits, and their kind: ``words``, ``punct`` or ``both``."""
        rng = self.rng
        edit = rng.choice(["words", "punct", "both", "both"])
        rate = rng.choice(WORD_RATES) if edit != "punct" else 0.0
        punct = rng.choice(PUNCT_RATES) if edit != "words" else 0.0
        parts = re.split(r"(\s+)", text)
        described = []
        if rate:
            kind = rng.choice(["insert", "delete", "substitute", "mixed"])
            self.words(parts, kind, rate)
            described.append(f"words {kind} {rate:.1%}")
        if punct:
            kinds = rng.sample(PUNCT_KINDS, rng.randint(1, 3))
            count = max(1, round(len(parts) / 2 * punct / len(kinds)))
            for kind in kinds:
                self.punctuation(parts, kind, count)
            described.append(f"punct {punct:.0%} ({', '.join(kinds)})")
        copy = "".join(parts)
        if copy == text:  # no position qualified for the chosen edits
            parts = re.split(r"(\s+)", text)
            self.words(parts, "substitute", 0.002)
            copy, described = "".join(parts), [*described, "words substitute 0.2%"]
            edit = "both" if edit == "punct" else edit
        return copy, " + ".join(described), edit


# -------------------------------------------------------------------------------------- build


@dataclass
class RealBenchmark(make_data.Benchmark):
    """``jaccard`` and ``family_pairs`` hold the normalised truth; the raw Jaccard is beside it."""

    raw_jaccard: list[float] = field(default_factory=list)
    simple_jaccard: list[float] = field(default_factory=list)
    """A copy's Jaccard in datatrove's view (``simplified_words``): a second truth, for comparison."""
    edit: list[str] = field(default_factory=list)
    """A copy's kind of edits: ``words``, ``punct`` or ``both``; empty for originals."""
    source: list[str] = field(default_factory=list)
    raw_pairs: dict[tuple[int, int], float] = field(default_factory=dict)
    simple_pairs: dict[tuple[int, int], float] = field(default_factory=dict)


def build(
    originals: int, seed: int = 0, sources: list[str] | None = None, share: float = 0.4, pool_threshold: float = 0.5
) -> RealBenchmark:  # fmt: skip
    rng = random.Random(seed)
    pool = distinct_pieces(sources or list(real_text.SOURCES), pool_threshold)
    chosen = choose_originals(pool, originals, share, rng)
    words = sorted(
        {w for _, _, text in chosen[:2000] for w in text.split() if w.isalpha() and 3 <= len(w) <= 12}
    )
    editor = Editor(rng, words)
    docs: list[dict] = []
    for family, (source, _, text) in enumerate(chosen):
        docs.append({"text": text, "family": family, "kind": "original", "of": None, "source": source})
        for _ in range(rng.choice([0] * 10 + [1, 2])):  # 1.5 copies for one original in six
            copy, how, edit = editor.copy(text)
            docs.append({"text": copy, "family": family, "kind": "copy", "mutation": how, "edit": edit,
                         "of": text, "source": source})  # fmt: skip
    rng.shuffle(docs)
    return _labelled(docs)


def _labelled(docs: list[dict]) -> RealBenchmark:
    bench = RealBenchmark()
    row_of_original = {d["family"]: row for row, d in enumerate(docs) if d["kind"] == "original"}
    by_family: dict[int, list[int]] = {}
    for row, d in enumerate(docs):
        by_family.setdefault(d["family"], []).append(row)
    for d in docs:
        bench.texts.append(d["text"])
        bench.family.append(d["family"])
        bench.kind.append(d["kind"])
        bench.mutation.append(d.get("mutation", ""))
        bench.edit.append(d.get("edit", ""))
        bench.source.append(d["source"])
        bench.original.append(row_of_original[d["family"]] if d["kind"] == "copy" else -1)
    for rows in by_family.values():
        if len(rows) < 2:
            continue
        norm = {r: normalised_shingles(bench.texts[r]) for r in rows}
        raw = {r: make_data.shingles(bench.texts[r]) for r in rows}
        simple = {r: shingle_set(simplified_words(bench.texts[r])) for r in rows}
        for a, b in itertools.combinations(sorted(rows), 2):
            bench.family_pairs[a, b] = make_data.jaccard(norm[a], norm[b])
            bench.raw_pairs[a, b] = make_data.jaccard(raw[a], raw[b])
            bench.simple_pairs[a, b] = make_data.jaccard(simple[a], simple[b])
    for row, original in enumerate(bench.original):
        pair = (min(row, original), max(row, original))
        bench.jaccard.append(bench.family_pairs[pair] if original >= 0 else -1.0)
        bench.raw_jaccard.append(bench.raw_pairs[pair] if original >= 0 else -1.0)
        bench.simple_jaccard.append(bench.simple_pairs[pair] if original >= 0 else -1.0)
    return bench


# ------------------------------------------------------------------------------ files on disk


TRUTH = [
    "family",
    "kind",
    "source",
    "edit",
    "mutation",
    "original",
    "jaccard",
    "raw_jaccard",
    "simple_jaccard",
]
"""The columns of truth.jsonl beside ``row``: one ``RealBenchmark`` list each."""


def write(bench: RealBenchmark, out: Path, info: dict) -> None:
    """docs.jsonl (id, text), truth.jsonl (one line a row), pairs.jsonl (family pairs), info.json."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "docs.jsonl", "w", encoding="utf-8") as f:
        for row, text in enumerate(bench.texts):
            f.write(json.dumps({"id": str(row), "text": text}) + "\n")
    with open(out / "truth.jsonl", "w", encoding="utf-8") as f:
        for row in range(len(bench.texts)):
            values = {name: getattr(bench, name)[row] for name in TRUTH}
            rounded = {k: round(v, 6) if isinstance(v, float) else v for k, v in values.items()}
            f.write(json.dumps({"row": row} | rounded) + "\n")
    with open(out / "pairs.jsonl", "w", encoding="utf-8") as f:
        for (a, b), j in bench.family_pairs.items():
            f.write(json.dumps([a, b, j, bench.raw_pairs[a, b], bench.simple_pairs[a, b]]) + "\n")
    digest = hashlib.sha256("\0".join(bench.texts).encode("utf-8", "surrogatepass")).hexdigest()[:16]
    info |= {"documents": len(bench.texts), "digest": digest}
    (out / "info.json").write_text(json.dumps(info, indent=1) + "\n")


def load(folder: Path) -> RealBenchmark:
    bench = RealBenchmark()
    with open(folder / "docs.jsonl", encoding="utf-8") as f:
        bench.texts = [json.loads(line)["text"] for line in f]
    with open(folder / "truth.jsonl", encoding="utf-8") as f:
        for line in f:
            t = json.loads(line)
            for name in TRUTH:
                getattr(bench, name).append(t[name])
    with open(folder / "pairs.jsonl", encoding="utf-8") as f:
        for line in f:
            a, b, j, raw, simple = json.loads(line)
            bench.family_pairs[a, b], bench.raw_pairs[a, b], bench.simple_pairs[a, b] = j, raw, simple
    return bench


def describe(bench: RealBenchmark) -> str:
    n, copies = len(bench.texts), [j for j in bench.jaccard if j >= 0]
    by_source = Counter(s for s, k in zip(bench.source, bench.kind, strict=True) if k == "original")
    return (
        f"{n:,} documents, {sum(map(len, bench.texts)) / n:,.0f} characters each on average: "
        f"{n - len(copies):,} originals ({', '.join(f'{s} {c:,}' for s, c in sorted(by_source.items()))}), "
        f"{len(copies):,} copies (edits: {', '.join(f'{e} {c:,}' for e, c in sorted(Counter(bench.edit).items()) if e)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--originals", type=int, default=16000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--sources", nargs="*", choices=list(real_text.SOURCES), default=list(real_text.SOURCES)
    )
    parser.add_argument(
        "--source-share", type=float, default=0.4, help="at most this share of originals per source"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for docs.jsonl, truth.jsonl, pairs.jsonl"
    )
    args = parser.parse_args()
    bench = build(args.originals, args.seed, args.sources, args.source_share)
    info = {
        "originals": args.originals,
        "seed": args.seed,
        "sources": args.sources,
        "source_share": args.source_share,
    }
    write(bench, args.out, info)
    print(f"{describe(bench)} -> {args.out}")


if __name__ == "__main__":
    main()
