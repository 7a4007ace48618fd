"""Failures explained by the data: the training records nearest to each sample a model gets wrong.

    explain: {k: 3, ngram: 3}

For a model that is a run, every dataset behind it — the datasets its run pins and, through their
parents, the data those were made from (a synth dataset back to its corpus) — is streamed once; each
record gets a MinHash signature of its word n-grams (the corpus package's vectorised MinHash), and
each failed sample (prompt and target) is compared with all of them by the share of equal signature
slots, an unbiased estimate of the Jaccard similarity of their n-gram sets. The ``k`` nearest, with
their dataset and source (their own ``source`` pointer, else the first ancestor record's), go into the
sample's record (``nearest``), and the task reports how the failures' nearest records spread over
sources: where the data that looked most like what the model got wrong came from.

Cost: one signature per training record (``num_perm`` × 4 bytes kept: 256 bytes at the default 64)
and failures × records comparisons, in blocks.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
from pydantic import Field

from eval.contamination import sample_text
from eval.tasks import Sample
from eval.training_data import dataset_batches, training_datasets
from manifests.lineage import describe_source
from manifests.recipes import RecipeConfig
from manifests.schema import Manifest
from manifests.store import Store
from manifests.verify import ensure_verified

_BLOCK = 1024


class ExplainConfig(RecipeConfig):
    """Nearest training records of the failed samples."""

    k: int = Field(default=3, ge=1, le=50)
    ngram: int = Field(default=3, ge=1, le=16)
    """Word n-gram length of the MinHash shingles (short, because eval samples are short)."""
    num_perm: int = Field(default=64, ge=16, le=512)
    max_failures: int = Field(default=500, ge=1)
    """Failed samples explained per task and model at most (the first, in id order)."""


def source_key(source: dict[str, Any] | None, dataset: str) -> str:
    """What a failure summary groups by: the file, or the web host, else the dataset."""
    if not source:
        return f"dataset {dataset}"
    if source.get("url"):
        return urlsplit(str(source["url"])).netloc or str(source["url"])
    return str(source.get("uri") or f"dataset {dataset}")


@dataclass
class TrainingIndex:
    """Signatures of every record behind a run, with where each came from."""

    signatures: np.ndarray  # (records, num_perm) uint32
    ids: list[str]
    datasets: list[str]
    sources: list[dict[str, Any] | None]
    scanned: list[str] = field(default_factory=list)


def _minhash(cfg: ExplainConfig):
    from corpus.minhash import MinHashConfig

    rows = 4
    return MinHashConfig(
        num_perm=cfg.num_perm, bands=cfg.num_perm // rows, rows=rows, ngram=cfg.ngram, verify=False
    )


def _signatures(texts: list[str], cfg: ExplainConfig) -> np.ndarray:
    from corpus.minhash import signatures

    sig, _ = signatures(pa.array(texts, pa.string()), _minhash(cfg))
    return np.ascontiguousarray(sig.T)


def index_training(run: Manifest, store: Store, cfg: ExplainConfig) -> TrainingIndex:
    datasets = training_datasets(run, store, ancestors=True)
    sigs, ids, names, sources = [], [], [], []
    by_id: dict[str, tuple[dict[str, Any] | None, list[str]]] = {}
    for dataset in datasets:
        ensure_verified(dataset)
        for rows, texts in dataset_batches(dataset, extra=("parents", "source")):
            sigs.append(_signatures(texts, cfg))
            for r in rows:
                ids.append(r["id"])
                names.append(dataset.ref)
                by_id[r["id"]] = (r.get("source"), list(r.get("parents") or []))
    for record in ids:
        sources.append(_root_source(record, by_id))
    matrix = np.concatenate(sigs) if sigs else np.zeros((0, cfg.num_perm), np.uint32)
    return TrainingIndex(matrix, ids, names, sources, [d.ref for d in datasets])


def _root_source(
    record: str, by_id: dict[str, tuple[dict[str, Any] | None, list[str]]]
) -> dict[str, Any] | None:
    seen = set()
    while record in by_id and record not in seen:
        seen.add(record)
        source, parents = by_id[record]
        if source:
            return source
        if not parents:
            return None
        record = parents[0]
    return None


def nearest(index: TrainingIndex, samples: list[Sample], cfg: ExplainConfig) -> list[list[dict[str, Any]]]:
    """The ``k`` most similar training records of each sample (estimated Jaccard, highest first)."""
    if not samples or len(index.ids) == 0:
        return [[] for _ in samples]
    queries = _signatures([sample_text(s) for s in samples], cfg)
    k = min(cfg.k, len(index.ids))
    best_sim = np.full((len(samples), 0), -1.0)
    best_idx = np.zeros((len(samples), 0), dtype=np.int64)
    for lo in range(0, len(index.ids), _BLOCK):
        block = index.signatures[lo : lo + _BLOCK]
        sim = (queries[:, None, :] == block[None, :, :]).mean(axis=2)
        sims = np.concatenate([best_sim, sim], axis=1)
        idxs = np.concatenate([best_idx, np.broadcast_to(np.arange(lo, lo + len(block)), sim.shape)], axis=1)
        top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        best_sim = np.take_along_axis(sims, top, axis=1)
        best_idx = np.take_along_axis(idxs, top, axis=1)
    return [
        [{"id": index.ids[j], "dataset": index.datasets[j], "similarity": round(float(s), 4),
          "source": describe_source(index.sources[j]) if index.sources[j] else None}
         for s, j in zip(sims_row, idx_row, strict=True)]
        for sims_row, idx_row in zip(best_sim, best_idx, strict=True)
    ]  # fmt: skip


def by_source(index: TrainingIndex, found: list[list[dict[str, Any]]]) -> dict[str, int]:
    """How many failures have their nearest training record in each source."""
    position = {record: i for i, record in enumerate(index.ids)}
    counts: Counter = Counter()
    for near in found:
        if near:
            j = position[near[0]["id"]]
            counts[source_key(index.sources[j], index.datasets[j])] += 1
    return dict(counts.most_common())
