"""Decontamination: an n-gram index of evaluation sets, and a step that drops (or flags) training
documents sharing n-grams with them.

Build the index once (stage ``corpus.decontam-index``; a run in the store)::

    stage: corpus.decontam-index
    name: evals-13gram
    ngram: 13
    benchmarks:
      - {name: tiny-qa, path: examples/sample/evals/tiny-qa.jsonl, fields: [question, answer]}
      - {name: held-out, dataset: my-evals@3f2a, fields: [prompt, completion], split: test}

then use it in a corpus build::

    steps:
      - {type: decontaminate, index: evals-13gram, action: drop, min_matches: 1}

Text is cut into lower-cased word tokens (runs of Unicode letters, digits and marks; punctuation
and whitespace only separate), so ``"Saturn?\\nIt has RINGS."`` and ``"saturn it has rings"`` give the
same tokens. An example's fields are joined in order before its n-grams are taken, so an n-gram
spanning the end of a question and the start of its answer is indexed too. A dropped document's
ledger entry names what it matched (example ids, never text)::

    {"id": "web.jsonl:41", "step": "corpus.build.decontaminate", "action": "drop",
     "reason": "benchmark_contamination", "score": 14.0,
     "detail": "{\\"contamination\\": {\\"tiny-qa\\": [\\"tq-11\\"]}, \\"matched_ngrams\\": 14}"}

The step's statistics hold ``contamination``: ``{"documents": {"tiny-qa": 3}, "examples":
{"tiny-qa:tq-11": 2, "tiny-qa:tq-04": 1}}`` — documents flagged per benchmark, and per example the
number of documents that matched it. Both are plain counts, so summing them over worker tasks
stays exact; the number of distinct contaminated examples is the number of keys of ``examples``
(``contamination_report`` derives it, with the fraction of each benchmark).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from corpus.steps import Decision, Filter, StepConfig, StepStats
from manifests.data import jsonl_objects, read_shard, read_table, require_columns
from manifests.errors import DistilleryError
from manifests.hashing import sha256_file
from manifests.publish import Publisher, write_parquet
from manifests.recipes import Name, RecipeConfig, parse_config
from manifests.schema import Manifest
from manifests.store import Store
from manifests.verify import ensure_verified

STAGE = "corpus.decontam-index"
INDEX_FILE = "index/ngrams.parquet"
SETTINGS_FILE = "index/settings.json"
TOKENS = "lower-unicode-words-v1"
"""How text becomes tokens; part of the index settings (a change of rule must not match old indexes)."""
HASHING = "blake2b64-poly-splitmix-v1"
"""How tokens become n-gram hashes; part of the index settings too."""
INDEX_SCHEMA = pa.schema(
    [("hash", pa.uint64()), ("length", pa.uint8()), ("benchmark", pa.string()), ("example", pa.string())]
)
"""One row per distinct (n-gram, example): its hash, its length in tokens, and who holds it."""
REASON = "benchmark_contamination"
SLICE_CHARS = 8 << 20
"""Bytes of text hashed at a time: the step's working arrays stay near 100 MB whatever the batch."""
MAX_EXAMPLES_IN_DETAIL = 50
"""A ledger detail lists at most this many example ids per benchmark (and the full count)."""

_NON_WORD = r"[^\pL\pN\pM]+"
_MULTIPLIER = np.uint64(0x100000001B3)  # odd, so the polynomial hash is a bijection per step
_U64 = (1 << 64) - 1


# --- tokens and n-gram hashes (shared by the index and the step: both must hash identically) ---


def token_hashes(texts: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of the tokens of every text, flat, and the number of tokens of each text.

    Column-wise: Arrow lower-cases and splits; only the *distinct* tokens of the batch are hashed
    in Python (blake2b, stable across processes and versions, unlike ``hash()``).
    """
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    texts = pc.fill_null(texts.cast(pa.string()), "")
    words = pc.replace_substring_regex(pc.utf8_lower(texts), pattern=_NON_WORD, replacement=" ")
    lists = pc.utf8_split_whitespace(pc.utf8_trim_whitespace(words))
    per_text = np.asarray(pc.list_value_length(lists).fill_null(0), dtype=np.int64)
    flat = pc.list_flatten(lists)
    # A text without words splits into one empty string; it must count as zero tokens.
    nonempty = np.asarray(pc.greater(pc.utf8_length(flat), 0).fill_null(False))
    owner = np.repeat(np.arange(len(per_text)), per_text)
    counts = np.bincount(owner[nonempty], minlength=len(per_text)).astype(np.int64)
    flat = flat.filter(pa.array(nonempty))
    if len(flat) == 0:
        return np.zeros(0, np.uint64), counts
    encoded = pc.dictionary_encode(flat)
    digests = b"".join(
        hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        for t in encoded.dictionary.to_pylist()
    )
    distinct = np.frombuffer(digests, dtype="<u8")
    return distinct[np.asarray(encoded.indices)], counts


def _mix(h: np.ndarray, length: int) -> np.ndarray:
    """splitmix64's finaliser, salted with the gram length (a 5-gram never equals a 13-gram)."""
    z = h ^ np.uint64((length * 0x9E3779B97F4A7C15) & _U64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def gram_hashes(
    tokens: np.ndarray, counts: np.ndarray, lengths: list[int]
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Hashes of every k-gram of every text, for each k in ``lengths``: {k: (hashes, text index)}.

    The window hash grows one token at a time over the whole flat token array (k vector operations
    in all, not one per gram); windows that cross from one text into the next are masked out.
    """
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    total = len(tokens)
    wanted = set(lengths)
    owner = np.repeat(np.arange(len(counts)), counts)
    ends = np.repeat(np.cumsum(counts), counts)
    h = np.zeros(total, np.uint64)
    for k in range(1, max(wanted, default=0) + 1):
        width = total - k + 1
        if width <= 0:
            break
        # numpy's uint64 arithmetic wraps around: the hash is a polynomial modulo 2**64.
        h = h[:width] * _MULTIPLIER + tokens[k - 1 :]
        if k in wanted:
            valid = np.arange(width) + k <= ends[:width]
            out[k] = (_mix(h[valid], k), owner[:width][valid])
    for k in wanted - out.keys():
        out[k] = (np.zeros(0, np.uint64), np.zeros(0, np.int64))
    return out


def settings(ngram: int) -> dict[str, Any]:
    return {"ngram": ngram, "tokens": TOKENS, "hashing": HASHING}


# --- the index ---


class BenchmarkConfig(RecipeConfig):
    """One evaluation set: a JSONL/Parquet file or a dataset, and the fields that make an example."""

    name: Name
    """Benchmark name, as the ledger and the report show it."""
    path: str | None = None
    """A ``.jsonl`` or ``.parquet`` file."""
    dataset: str | None = None
    """A dataset reference (pinned to its id when the index is built)."""
    split: str | None = None
    """Split of ``dataset`` to read (all splits by default)."""
    fields: list[str] = Field(min_length=1)
    """Fields joined, in this order, into the text of an example (question, answer, …)."""
    id_field: str | None = None
    """Field holding each example's id. Default: ``id`` when the examples have one, else the
    example's 0-based position."""

    @model_validator(mode="after")
    def _one_source(self) -> BenchmarkConfig:
        if (self.path is None) == (self.dataset is None):
            raise ValueError("give 'path' or 'dataset' (one of them)")
        return self


class BuildIndexConfig(RecipeConfig):
    """Build an n-gram index of evaluation sets for the ``decontaminate`` step."""

    name: Name
    """Name of the index (a run) in the store."""
    benchmarks: list[BenchmarkConfig] = Field(min_length=1)
    ngram: int = Field(default=13, ge=1, le=64)
    """Tokens per n-gram (13, as GPT-3's decontamination). An example with fewer tokens is indexed
    as one gram of its whole text, which a document matches when it contains those words in a row."""

    @model_validator(mode="after")
    def _distinct_names(self) -> BuildIndexConfig:
        seen = Counter(b.name for b in self.benchmarks)
        twice = [n for n, c in seen.items() if c > 1]
        if twice:
            raise ValueError(f"benchmark names must differ; repeated: {', '.join(twice)}")
        return self


def _as_text(value: Any) -> str:
    # Multiple-choice options arrive as lists; numbers as numbers: all become words.
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple):
        return " ".join(_as_text(v) for v in value)
    if isinstance(value, dict):
        return " ".join(_as_text(v) for v in value.values())
    return str(value)


def _read_jsonl(bench: BenchmarkConfig, path: Path) -> list[dict]:
    records = []
    for number, record in jsonl_objects(path, f"benchmark {bench.name}: {path}"):
        if not isinstance(record, dict):
            raise DistilleryError(f"benchmark {bench.name}: {path} line {number} is not a JSON object")
        missing = [k for k in [*bench.fields, bench.id_field] if k is not None and k not in record]
        if missing:
            raise DistilleryError(
                f"benchmark {bench.name}: {path} line {number} has no field {', '.join(map(repr, missing))}; "
                f"it has: {', '.join(record) or 'none'} (fix 'fields' or 'id_field')"
            )
        records.append(record)
    return records


def _read_columns(bench: BenchmarkConfig, table: pa.Table, where: str) -> list[dict]:
    missing = [k for k in [*bench.fields, bench.id_field] if k is not None and k not in table.column_names]
    if missing:
        raise DistilleryError(
            f"benchmark {bench.name}: {where} has no column {', '.join(map(repr, missing))}; "
            f"it has: {', '.join(table.column_names)} (fix 'fields' or 'id_field')"
        )
    return table.to_pylist()


def read_benchmark(
    bench: BenchmarkConfig, store: Store
) -> tuple[list[str], list[str], Manifest | None, str | None]:
    """(example ids, example texts, the dataset read or None, the file's sha256 or None)."""
    manifest = sha = None
    if bench.dataset is not None:
        manifest = store.resolve(bench.dataset, kind="dataset")
        require_columns(
            manifest, [f for f in [*bench.fields, bench.id_field] if f], f"benchmark {bench.name}"
        )
        table = read_table(manifest, split=bench.split)
        records = _read_columns(bench, table, manifest.ref)
    else:
        path = Path(bench.path)
        if not path.is_file():
            raise DistilleryError(f"benchmark {bench.name}: {path}: no such file")
        sha = sha256_file(path)
        if path.suffix in (".jsonl", ".json"):
            records = _read_jsonl(bench, path)
        elif path.suffix == ".parquet":
            records = _read_columns(bench, pq.read_table(path), str(path))
        else:
            raise DistilleryError(f"benchmark {bench.name}: {path}: give a .jsonl or .parquet file")
    if not records:
        raise DistilleryError(f"benchmark {bench.name}: {bench.path or bench.dataset} holds no examples")
    id_field = bench.id_field or ("id" if all("id" in r for r in records) else None)
    ids = [str(r[id_field]) if id_field else str(i) for i, r in enumerate(records)]
    texts = ["\n".join(_as_text(r[f]) for f in bench.fields) for r in records]
    return ids, texts, manifest, sha


def index_rows(name: str, ids: list[str], texts: list[str], ngram: int) -> tuple[pa.Table, dict[str, int]]:
    """The index rows of one benchmark, and its counts."""
    tokens, counts = token_hashes(pa.array(texts, pa.string()))
    short = sorted({int(c) for c in counts if 0 < c < ngram})
    parts = []
    for k, (hashes, owner) in gram_hashes(tokens, counts, [*short, ngram]).items():
        # A short example is its one whole-text gram; a long one, its n-grams only.
        keep = counts[owner] == k if k < ngram else np.ones(len(owner), bool)
        parts.append((hashes[keep], owner[keep], k))
    hashes = np.concatenate([p[0] for p in parts])
    owner = np.concatenate([p[1] for p in parts])
    length = np.concatenate([np.full(len(p[0]), p[2], np.uint8) for p in parts])
    table = pa.table(
        {"hash": hashes, "length": length, "benchmark": pa.array([name] * len(hashes), pa.string()),
         "example": pa.array(np.asarray(ids, dtype=object)[owner] if len(owner) else [], pa.string())},
        schema=INDEX_SCHEMA,
    )  # fmt: skip
    stats = {
        "examples": len(ids),
        "short_examples": int(((counts > 0) & (counts < ngram)).sum()),
        "empty_examples": int((counts == 0).sum()),
        "ngrams": int(len(np.unique(hashes))),
    }
    return table, stats


def build_index(cfg: BuildIndexConfig, store: Store) -> Manifest:
    """Read every benchmark, hash its n-grams, publish the index as a run."""
    parents: list[Manifest] = []
    tables, per_benchmark = [], {}
    for bench in cfg.benchmarks:
        ids, texts, manifest, sha = read_benchmark(bench, store)
        if manifest is not None:
            parents.append(manifest)
            bench.dataset = f"{manifest.name}@{manifest.id}"
        table, stats = index_rows(bench.name, ids, texts, cfg.ngram)
        if sha:
            stats["sha256"] = sha
        tables.append(table)
        per_benchmark[bench.name] = stats
    # One row per distinct (gram, example), sorted by hash: the step finds a gram's rows by bisection.
    index = pa.concat_tables(tables).group_by(["hash", "length", "benchmark", "example"]).aggregate([])
    index = index.sort_by([("hash", "ascending"), ("benchmark", "ascending"), ("example", "ascending")])
    index = index.select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA)
    with Publisher(store, kind="run", name=cfg.name, stage=STAGE, recipe=cfg.resolved(), parents=parents,
                   parent_roles={m.id: "benchmark" for m in parents}) as pub:  # fmt: skip
        (pub.dir / INDEX_FILE).parent.mkdir(parents=True)
        write_parquet(index, pub.dir / INDEX_FILE)
        (pub.dir / SETTINGS_FILE).write_text(
            json.dumps(settings(cfg.ngram) | {"benchmarks": sorted(per_benchmark)}, sort_keys=True) + "\n"
        )
        return pub.publish(
            stats={"settings": settings(cfg.ngram), "rows": index.num_rows, "benchmarks": per_benchmark},
            arrow_schema=INDEX_SCHEMA,
        )


def run_build_index(data: dict[str, Any], store: Store, source: str) -> Manifest:
    return build_index(parse_config(BuildIndexConfig, data, source), store)


# --- the step ---


@dataclass
class NgramIndex:
    """An index as the step uses it: distinct hashes sorted, and for each its rows' examples."""

    settings: dict[str, Any]
    keys: np.ndarray
    """Distinct gram hashes, ascending."""
    first: np.ndarray
    """Row of the first example holding ``keys[i]`` (rows of one hash are contiguous)."""
    count: np.ndarray
    """How many examples hold ``keys[i]``."""
    row_example: np.ndarray
    """Per row: which of ``examples`` it belongs to."""
    examples: list[tuple[str, str]]
    """(benchmark, example id) of each example code."""
    lengths: list[int]
    """Gram lengths present (the n-gram size, and those of short examples)."""


def _load_settings(manifest: Manifest) -> dict[str, Any]:
    folder = manifest.location
    if not (folder / INDEX_FILE).is_file() or not (folder / SETTINGS_FILE).is_file():
        raise DistilleryError(
            f"decontaminate: {manifest.ref} is not a decontamination index; build one with stage {STAGE}"
        )
    return json.loads((folder / SETTINGS_FILE).read_text(encoding="utf-8"))


def check_settings(found: dict[str, Any], ref: str, ngram: int | None) -> None:
    """Fail in one line when an index was hashed differently from what the step expects."""
    if found.get("tokens") != TOKENS or found.get("hashing") != HASHING:
        raise DistilleryError(
            f"decontaminate: index {ref} was built with tokens={found.get('tokens')!r}, "
            f"hashing={found.get('hashing')!r}; this version uses {TOKENS!r}, {HASHING!r}: rebuild the index"
        )
    if ngram is not None and found.get("ngram") != ngram:
        raise DistilleryError(
            f"decontaminate: index {ref} holds {found.get('ngram')}-grams but the step expects {ngram}-grams; "
            f"rebuild the index with 'ngram: {ngram}' or set the step's 'ngram: {found.get('ngram')}'"
        )


@functools.lru_cache(maxsize=4)
def load_index(folder: str) -> NgramIndex:
    """Read an index once per process (the folder name is its content id, so caching is safe)."""
    path = Path(folder)
    found = json.loads((path / SETTINGS_FILE).read_text(encoding="utf-8"))
    table = read_shard(path / INDEX_FILE, ref=f"{path.parent.name}@{path.name}", kind="run")
    hashes = np.asarray(table.column("hash").combine_chunks(), dtype=np.uint64)
    keys, first, count = np.unique(hashes, return_index=True, return_counts=True)
    pairs = pc.binary_join_element_wise(table.column("benchmark"), table.column("example"), "\x00")
    encoded = pc.dictionary_encode(pairs).combine_chunks()
    examples = [tuple(p.split("\x00", 1)) for p in encoded.dictionary.to_pylist()]
    lengths = sorted({int(x) for x in pc.unique(table.column("length")).to_pylist()})
    return NgramIndex(found, keys, first.astype(np.int64), count.astype(np.int64),
                      np.asarray(encoded.indices, dtype=np.int64), examples, lengths)  # fmt: skip


@dataclass
class ContaminationStats(StepStats):
    """The step statistics plus ``contamination``: documents per benchmark, documents per example."""

    documents: Counter = field(default_factory=Counter)
    examples: Counter = field(default_factory=Counter)

    def merge(self, other: StepStats) -> None:
        super().merge(other)
        self.documents.update(getattr(other, "documents", {}))
        self.examples.update(getattr(other, "examples", {}))

    def as_dict(self) -> dict:
        return super().as_dict() | {"contamination": {"documents": dict(sorted(self.documents.items())),
                                                      "examples": dict(sorted(self.examples.items()))}}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict) -> ContaminationStats:
        tally = data.get("contamination", {})
        return cls(**vars(StepStats.from_dict(data)), documents=Counter(tally.get("documents", {})),
                   examples=Counter(tally.get("examples", {})))  # fmt: skip


class DecontaminationFilter(Filter):
    """Drop (or flag) documents sharing at least ``min_matches`` n-grams with one benchmark example."""

    name = "decontaminate"
    reason = REASON

    def __init__(self, index: NgramIndex, action: Literal["drop", "flag"] = "drop", min_matches: int = 1):
        super().__init__()
        self.index, self.action, self.min_matches = index, action, min_matches
        self.stats = ContaminationStats()
        self._flags: list[tuple[int, float, dict]] = []

    def matches(self, texts: pa.Array) -> dict[int, tuple[float, dict]]:
        """{row: (score, detail)} for the contaminated rows of ``texts``."""
        # A few arrays of 8 bytes per token are alive at once: slices bound that, whatever the batch.
        lengths = np.asarray(pc.binary_length(texts).fill_null(0), dtype=np.int64)
        before = np.concatenate([[0], np.cumsum(lengths)])
        found: dict[int, tuple[float, dict]] = {}
        start = 0
        while start < len(texts):
            stop = int(np.searchsorted(before, before[start] + SLICE_CHARS, side="right")) - 1
            stop = max(stop, start + 1)
            part = self._slice_matches(texts.slice(start, stop - start))
            found.update((start + row, v) for row, v in part.items())
            start = stop
        return found

    def _slice_matches(self, texts: pa.Array) -> dict[int, tuple[float, dict]]:
        index = self.index
        tokens, counts = token_hashes(texts)
        grams = gram_hashes(tokens, counts, index.lengths)
        hashes = np.concatenate([h for h, _ in grams.values()])
        owner = np.concatenate([o for _, o in grams.values()]).astype(np.int64)
        if not len(hashes) or not len(index.keys):
            return {}
        at = np.minimum(np.searchsorted(index.keys, hashes), len(index.keys) - 1)
        hit = index.keys[at] == hashes
        # Distinct (document, gram) pairs: a gram repeated in a document counts once.
        pairs = np.unique(owner[hit] * len(index.keys) + at[hit])
        doc, key = pairs // len(index.keys), pairs % len(index.keys)
        per = index.count[key]
        rows = np.repeat(index.first[key], per) + np.arange(per.sum()) - np.repeat(np.cumsum(per) - per, per)
        n_examples = len(index.examples)
        shared, grams_shared = np.unique(
            np.repeat(doc, per) * n_examples + index.row_example[rows], return_counts=True
        )
        strong = grams_shared >= self.min_matches
        matched_grams = np.bincount(doc, minlength=len(counts))
        found: dict[int, dict[str, list[str]]] = {}
        score: dict[int, int] = {}
        # Python only over (document, example) pairs that passed: a handful, not every row.
        for pair, n in zip(shared[strong].tolist(), grams_shared[strong].tolist(), strict=True):
            row, example = divmod(pair, n_examples)
            benchmark, example_id = index.examples[example]
            found.setdefault(row, {}).setdefault(benchmark, []).append(example_id)
            score[row] = max(score.get(row, 0), n)
        out = {}
        for row, per_benchmark in found.items():
            detail: dict[str, Any] = {"contamination": {}, "matched_ngrams": int(matched_grams[row])}
            for benchmark, ids in sorted(per_benchmark.items()):
                ids.sort()
                self.stats.documents[benchmark] += 1
                self.stats.examples.update(f"{benchmark}:{i}" for i in ids)
                detail["contamination"][benchmark] = ids[:MAX_EXAMPLES_IN_DETAIL]
                if len(ids) > MAX_EXAMPLES_IN_DETAIL:
                    detail.setdefault("examples_matched", {})[benchmark] = len(ids)
            out[row] = (float(score[row]), detail)
        return out

    def decide(self, batch: pa.RecordBatch) -> Decision:
        found = self.matches(batch.column("text"))
        n = batch.num_rows
        contaminated = np.zeros(n, bool)
        contaminated[list(found)] = True
        if self.action == "flag":
            self._flags = [(row, score, detail) for row, (score, detail) in sorted(found.items())]
            return Decision(keep=pa.array(np.ones(n, bool)), columns={"contaminated": pa.array(contaminated)})
        scores: list[float | None] = [None] * n
        details: list[dict | None] = [None] * n
        for row, (score, detail) in found.items():
            scores[row], details[row] = score, detail
        return Decision(keep=pa.array(~contaminated), scores=scores, details=details)

    def __call__(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        out = super().__call__(batch)
        if self._flags:
            # The base class writes ledger entries for dropped rows only; flagged rows stay, noted.
            ids = batch.column("id").to_pylist()
            for row, score, detail in self._flags:
                self._log(ids[row], "flag", REASON, score, detail)
                self.stats.changed += 1
            self._flags = []
        return out


class DecontaminateConfig(StepConfig):
    """Drop or flag documents that share n-grams with an evaluation set (index: ``corpus.decontam-index``)."""

    type: Literal["decontaminate"] = "decontaminate"
    index: str
    """Run reference of the index (pinned to its id when the build starts)."""
    action: Literal["drop", "flag"] = "drop"
    """``drop`` removes contaminated documents; ``flag`` keeps them with ``contaminated: true``."""
    min_matches: int = Field(default=1, ge=1)
    """Distinct n-grams a document must share with one example to count as contaminated."""
    ngram: int | None = Field(default=None, ge=1, le=64)
    """The n-gram size this recipe expects of the index (checked; None accepts the index's)."""

    def _resolve(self, store: Store, verify: bool = False) -> Manifest:
        manifest = store.resolve(self.index, kind="run")
        if verify:
            ensure_verified(manifest)
        check_settings(_load_settings(manifest), manifest.ref, self.ngram)
        return manifest

    def prepare(self, store: Store) -> list[Manifest]:
        manifest = self._resolve(store, verify=True)
        self.index = f"{manifest.name}@{manifest.id}"
        return [manifest]

    def build(self, store: Store | None = None) -> DecontaminationFilter:
        manifest = self._resolve(store or Store())
        return DecontaminationFilter(load_index(str(manifest.location)), self.action, self.min_matches)

    def report(self, contamination: dict, store: Store) -> dict[str, dict[str, Any]]:
        """The per-benchmark report of merged step statistics (see ``contamination_report``)."""
        return contamination_report(contamination, store.resolve(self.index, kind="run"))


def contamination_report(contamination: dict, index: Manifest) -> dict[str, dict[str, Any]]:
    """Per benchmark: documents flagged, distinct examples hit, examples indexed, and the fraction hit.

    ``contamination`` is the step's merged ``{"documents": …, "examples": …}``; an example counts
    once however many documents (in however many tasks) matched it.
    """
    hit: Counter = Counter(key.split(":", 1)[0] for key in contamination.get("examples", {}))
    documents = contamination.get("documents", {})
    report = {}
    for name, stats in sorted(index.stats.get("benchmarks", {}).items()):
        total = stats.get("examples", 0)
        report[name] = {"documents": documents.get(name, 0), "examples_hit": hit.get(name, 0),
                        "examples": total, "fraction": round(hit.get(name, 0) / total, 4) if total else 0.0}  # fmt: skip
    return report
