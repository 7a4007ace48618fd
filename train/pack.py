"""``train.pack``: a corpus dataset → fixed-length token sequences for pretraining.

    stage: train.pack
    name: demo-pack
    dataset: demo-corpus
    tokenizer: smollm2-135m-instruct    # a model run, or a run of `train tokenizer`
    seq_len: 256

Documents are tokenized in batches, each followed by the separator (the eos token), concatenated
and cut into rows of exactly ``seq_len`` tokens. Each document goes to one split (``train`` or
``validation``) by a hash of its record id and the seed, so its tokens never straddle splits, and
every row says which document's tokens it holds. A packed row::

    {"id": "5be0c2…", "parents": ["c0ffee0123456789abcd", "0d15ea5e…"],
     "input_ids": [504, 3958, …, 0, 1127, …],          # seq_len tokens (int32)
     "sources": [{"id": "c0ffee0123456789abcd", "start": 0, "end": 180, "offset": 412},
                 {"id": "0d15ea5e…", "start": 180, "end": 256, "offset": 0}]}

``sources[i]`` says that positions ``start`` (inclusive) to ``end`` (exclusive) of the row are the
document's tokens ``offset`` to ``offset + end - start`` (its separator counts as its last
token); the ranges cover every position exactly once. With ``remainder: pad`` the last row of a
split may end in padding: the positions after the last range. ``parents`` are the documents, so
``distillery manifests trace <row id>`` leads to their files and lines.

The stream holds one batch of documents and the rows being filled, and writes shards of
``shard_rows`` rows. Documents dropped with the remainder (or cut by it) and empty documents are in
the ledger.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from manifests.data import require_columns, require_split
from manifests.errors import DistilleryError
from manifests.hashing import canonical_json, record_id
from manifests.models import CHECKPOINT_DIR, checkpoint_path, load_tokenizer
from manifests.publish import Publisher, ShardWriter
from manifests.recipes import Name, RecipeConfig, parse_config
from manifests.schema import Manifest
from manifests.store import Store
from manifests.verify import ensure_verified
from train.tokenizer import text_batches

SOURCE_RANGE = pa.struct(
    [("id", pa.string()), ("start", pa.int32()), ("end", pa.int32()), ("offset", pa.int32())]
)
PACKED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("parents", pa.list_(pa.string())),
        ("input_ids", pa.list_(pa.int32())),
        ("sources", pa.list_(SOURCE_RANGE)),
    ]
)
TOKENIZER_FILES = frozenset(
    {"tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "tokenizer_config.json",
     "special_tokens_map.json", "added_tokens.json"}
)  # fmt: skip
"""The files that decide how text becomes ids (a chat template does not)."""
WRITE_TOKENS = 1 << 22
"""Tokens collected before a write (a Parquet row group of at most 512 rows, ~16 MB of ids)."""


class PackRecipe(RecipeConfig):
    """Tokenize a corpus dataset and pack it into rows of ``seq_len`` tokens."""

    name: Name
    dataset: str
    """Dataset reference (``name``, ``name@id-prefix`` or a path) with ``id`` and ``text``."""
    split: str | None = None
    """Split of the dataset to read (all splits by default)."""
    tokenizer: str
    """Run reference: a model run (its tokenizer) or a ``train tokenizer`` run."""
    seq_len: int = Field(default=2048, ge=2, le=1 << 22)
    """Tokens per row."""
    eos_token: str | None = None
    """Separator appended after every document (default: the tokenizer's eos token). An instruct
    model's eos is often its end-of-turn token; pretraining data wants ``<|endoftext|>``."""
    remainder: Literal["drop", "pad"] = "drop"
    """The last, partly filled row of each split: dropped (counted in stats and the ledger) or padded."""
    validation_fraction: float = Field(default=0.05, ge=0.0, lt=1.0)
    """Share of documents (by a hash of their id and the seed) whose tokens go to ``validation``."""
    seed: int = 0
    batch_size: int = Field(default=256, ge=1)
    """Documents tokenized per batch."""
    shard_rows: int = Field(default=10_000, ge=1)
    """Rows per Parquet shard."""


def resolve_tokenizer_run(store: Store, ref: str) -> Manifest:
    """The run behind a tokenizer reference; naming a dataset or an eval is a clear error."""
    try:
        run = store.resolve(ref, kind="run")
    except DistilleryError as missing:
        try:
            other = store.resolve(ref)
        except DistilleryError:
            raise missing from None
        raise DistilleryError(
            f"tokenizer: {other.ref} is a {other.kind}, not a run with a tokenizer; give a model run "
            "(distillery train import-model) or a tokenizer run (distillery train tokenizer)"
        ) from None
    checkpoint_path(run)
    return run


def tokenizer_identity(run: Manifest) -> dict[str, Any]:
    """The run and a hash of its tokenizer files: equal hashes tokenize equally, whichever run."""
    files = sorted(
        (PurePosixPath(f.path).name, f.sha256)
        for f in run.files
        if PurePosixPath(f.path).parent == PurePosixPath(CHECKPOINT_DIR)
        and PurePosixPath(f.path).name in TOKENIZER_FILES
    )
    if not files:
        raise DistilleryError(
            f"tokenizer: run {run.ref} has no tokenizer files in '{CHECKPOINT_DIR}/' "
            f"(expected one of {', '.join(sorted(TOKENIZER_FILES))})"
        )
    digest = hashlib.sha256(canonical_json(files).encode()).hexdigest()
    return {"run": run.id, "ref": run.ref, "files_sha256": digest, "files": [name for name, _ in files]}


def split_of(record: str, seed: int, validation_fraction: float) -> str:
    """``validation`` for a stable share of documents; depends only on the id and the seed."""
    digest = hashlib.sha256(f"{seed}:{record}".encode()).digest()
    return "validation" if int.from_bytes(digest[:8], "big") / 2**64 < validation_fraction else "train"


Piece = tuple[str, int, np.ndarray]
"""(document id, token offset in the document, tokens)."""


class SequencePacker:
    """Cuts a stream of documents into rows of ``seq_len`` tokens, remembering whose tokens sit where."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.pieces: list[Piece] = []
        self.filled = 0

    def add(self, document: str, tokens: np.ndarray) -> Iterator[list[Piece]]:
        """The rows this document completes (each a list of pieces filling ``seq_len`` positions)."""
        offset = 0
        while offset < len(tokens):
            take = min(self.seq_len - self.filled, len(tokens) - offset)
            self.pieces.append((document, offset, tokens[offset : offset + take]))
            self.filled += take
            offset += take
            if self.filled == self.seq_len:
                yield self.pieces
                self.pieces, self.filled = [], 0


class RowBatch:
    """Packed rows gathered column-wise, written as one Arrow batch."""

    def __init__(self, seq_len: int, id_salt: str):
        self.seq_len, self.id_salt = seq_len, id_salt
        self.ids: list[str] = []
        self.parents: list[list[str]] = []
        self.tokens: list[np.ndarray] = []
        self.sources: list[list[dict[str, Any]]] = []

    def add(self, pieces: list[Piece], pad_id: int | None = None) -> None:
        tokens = np.concatenate([p[2] for p in pieces]).astype(np.int32, copy=False)
        if pad_id is not None and len(tokens) < self.seq_len:
            tokens = np.concatenate([tokens, np.full(self.seq_len - len(tokens), pad_id, np.int32)])
        sources, start = [], 0
        for doc, offset, part in pieces:
            sources.append({"id": doc, "start": start, "end": start + len(part), "offset": offset})
            start += len(part)
        # The id is what the row holds: which tokens of which documents, under which tokenizer.
        self.ids.append(record_id("pack", self.id_salt, *(f"{s['id']}:{s['offset']}:{s['end'] - s['start']}"
                                                          for s in sources)))  # fmt: skip
        self.parents.append(list(dict.fromkeys(s["id"] for s in sources)))
        self.tokens.append(tokens)
        self.sources.append(sources)

    def __len__(self) -> int:
        return len(self.ids)

    def flush(self, writer: ShardWriter) -> None:
        if not self.ids:
            return
        lengths = np.cumsum([0] + [len(t) for t in self.tokens], dtype=np.int32)
        input_ids = pa.ListArray.from_arrays(pa.array(lengths), pa.array(np.concatenate(self.tokens)))
        batch = pa.RecordBatch.from_arrays(
            [pa.array(self.ids, pa.string()), pa.array(self.parents, PACKED_SCHEMA.field("parents").type),
             input_ids.cast(PACKED_SCHEMA.field("input_ids").type),
             pa.array(self.sources, PACKED_SCHEMA.field("sources").type)],
            schema=PACKED_SCHEMA,
        )  # fmt: skip
        writer.write(batch)
        self.ids, self.parents, self.tokens, self.sources = [], [], [], []


class SplitStream:
    """One output split: its packer, the rows waiting to be written, its shards and its counts."""

    def __init__(self, name: str, cfg: PackRecipe, pub: Publisher, id_salt: str):
        self.name = name
        self.packer = SequencePacker(cfg.seq_len)
        self.rows = RowBatch(cfg.seq_len, id_salt)
        self.writer = pub.shard_writer(name, cfg.shard_rows)
        self.write_rows = max(1, min(512, WRITE_TOKENS // cfg.seq_len))
        self.counts = {"documents": 0, "tokens": 0, "sequences": 0, "tokens_dropped": 0, "tokens_padded": 0}

    def add(self, document: str, tokens: np.ndarray) -> None:
        self.counts["documents"] += 1
        self.counts["tokens"] += len(tokens)
        for pieces in self.packer.add(document, tokens):
            self._emit(pieces)

    def _emit(self, pieces: list[Piece], pad_id: int | None = None) -> None:
        self.rows.add(pieces, pad_id)
        self.counts["sequences"] += 1
        if len(self.rows) >= self.write_rows:
            self.rows.flush(self.writer)

    def finish(self, remainder: str, pad_id: int, ledger: list[dict[str, Any]]) -> None:
        """Pad or drop the partly filled last row; a dropped one's documents go to the ledger."""
        pieces, filled = self.packer.pieces, self.packer.filled
        if pieces and remainder == "pad":
            self.counts["tokens_padded"] += self.packer.seq_len - filled
            self._emit(pieces, pad_id)
        elif pieces:
            self.counts["tokens_dropped"] += filled
            for doc, offset, part in pieces:
                # A remainder piece runs to its document's end: from offset 0 it is the whole document.
                whole = offset == 0
                ledger.append({
                    "id": doc, "step": "train.pack", "action": "drop" if whole else "change",
                    "reason": "pack_remainder" if whole else "pack_remainder_cut", "score": None,
                    "detail": canonical_json({"split": self.name, "tokens_dropped": len(part), "tokens_kept": offset}),
                })  # fmt: skip
        self.rows.flush(self.writer)
        self.writer.close()


def _tokenizer(run: Manifest, eos_token: str | None):
    """(fast tokenizer, separator id, separator token) of a run, ready for plain batch encoding."""
    ensure_verified(run)
    tokenizer = load_tokenizer(run)
    if not getattr(tokenizer, "is_fast", False):
        raise DistilleryError(
            f"tokenizer: run {run.ref} has no fast tokenizer (tokenizer.json); packing needs one"
        )
    backend = tokenizer.backend_tokenizer
    # A checkpoint may ship with truncation or padding switched on; packing needs every token.
    backend.no_truncation()
    backend.no_padding()
    token = eos_token or tokenizer.eos_token
    eos_id = backend.token_to_id(token) if token else None
    if eos_id is None:
        what = f"'{token}' is not in its vocabulary" if token else "it has no eos token"
        raise DistilleryError(f"tokenizer: run {run.ref}: {what}; set eos_token to one of its special tokens")
    return tokenizer, eos_id, token


def _encode(backend, texts: list[str]) -> list[list[int]]:
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [e.ids for e in encode(texts, add_special_tokens=False)]


def _percentiles(lengths: Counter) -> dict[str, float]:
    """Exact summary of document lengths from a histogram (memory: one entry per distinct length)."""
    total = sum(lengths.values())
    if not total:
        return {}
    out: dict[str, float] = {"mean": round(sum(k * v for k, v in lengths.items()) / total, 2)}
    marks = {"min": 0.0, "p50": 0.5, "p90": 0.9, "p99": 0.99, "max": 1.0}
    seen, keys = 0, sorted(lengths)
    position = {name: max(1, int(np.ceil(q * total))) for name, q in marks.items()}
    for key in keys:
        seen += lengths[key]
        for name, rank in position.items():
            if name not in out and seen >= rank:
                out[name] = key
    return {k: out[k] for k in ["mean", *marks]}


def _progress(total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn()]  # fmt: skip
    progress = Progress(*columns, transient=True)
    return progress, progress.add_task("train.pack documents", total=total, rate="")


def pack(cfg: PackRecipe, store: Store) -> Manifest:
    dataset = store.resolve(cfg.dataset, kind="dataset")
    require_columns(dataset, ["id", "text"], "packing")
    require_split(dataset, cfg.split)
    run = resolve_tokenizer_run(store, cfg.tokenizer)
    identity = tokenizer_identity(run)
    tokenizer, eos_id, eos_token = _tokenizer(run, cfg.eos_token)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    backend = tokenizer.backend_tokenizer

    recipe = cfg.resolved() | {
        "dataset": dataset.id, "tokenizer": run.id, "tokenizer_files_sha256": identity["files_sha256"],
        "eos_token": eos_token,
    }  # fmt: skip
    salt = f"{identity['files_sha256']}:{eos_id}:{cfg.seq_len}"
    ledger: list[dict[str, Any]] = []
    lengths: Counter = Counter()
    empty = 0
    total = sum(f.rows or 0 for f in dataset.data_files(cfg.split))
    with Publisher(store, kind="dataset", name=cfg.name, stage="train.pack", recipe=recipe, parents=[dataset, run],
                   parent_roles={run.id: "tokenizer"}, seed=cfg.seed) as pub:  # fmt: skip
        streams = {name: SplitStream(name, cfg, pub, salt) for name in ("train", "validation")}
        progress, bar = _progress(total)
        with progress:
            for batch in text_batches(dataset, cfg.split, cfg.batch_size, ["id", "text"]):
                ids, texts = batch.column("id").to_pylist(), batch.column("text").to_pylist()
                keep = [i for i, text in enumerate(texts) if text]
                for i in (i for i in range(len(texts)) if not texts[i]):
                    ledger.append({"id": ids[i], "step": "train.pack", "action": "drop", "reason": "empty_text",
                                   "score": None, "detail": None})  # fmt: skip
                empty += len(texts) - len(keep)
                for i, encoded in zip(keep, _encode(backend, [texts[i] for i in keep]), strict=True):
                    lengths[len(encoded)] += 1
                    tokens = np.array([*encoded, eos_id], dtype=np.int32)
                    streams[split_of(ids[i], cfg.seed, cfg.validation_fraction)].add(ids[i], tokens)
                done = progress.tasks[0].completed + len(texts)
                rate = done / (progress.tasks[0].elapsed or 1e-9)
                progress.update(bar, completed=done, rate=f"{rate:.0f} docs/s")
        for stream in streams.values():
            stream.finish(cfg.remainder, pad_id, ledger)
        counts = {name: s.counts for name, s in streams.items()}
        sequences = sum(c["sequences"] for c in counts.values())
        if sequences == 0:
            tokens = sum(c["tokens"] for c in counts.values())
            raise DistilleryError(
                f"pack: {dataset.ref} gives {tokens} tokens in {sum(lengths.values())} documents, not one row "
                f"of seq_len {cfg.seq_len}; lower seq_len or set remainder: pad"
            )
        pub.write_ledger(ledger, step="train.pack")
        stats = {
            "tokenizer": identity | {"eos_token": eos_token, "eos_id": eos_id, "vocab_size": backend.get_vocab_size()},
            "seq_len": cfg.seq_len, "documents": sum(lengths.values()), "documents_empty": empty,
            "tokens": sum(c["tokens"] for c in counts.values()), "sequences": sequences,
            "tokens_dropped": sum(c["tokens_dropped"] for c in counts.values()),
            "tokens_padded": sum(c["tokens_padded"] for c in counts.values()),
            "splits": counts, "tokens_per_document": _percentiles(lengths),
        }  # fmt: skip
        return pub.publish(stats=stats, arrow_schema=PACKED_SCHEMA)


def run_recipe(data: dict[str, Any], store: Store, source: str) -> Manifest:
    return pack(parse_config(PackRecipe, data, source), store)
