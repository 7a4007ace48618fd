"""Did the model see the eval's samples in training? 13-gram overlap, and the metric on the rest.

    contamination:
      against: training          # each model run's training data (the datasets its run pins)
      # index: my-decontam-index # or a `corpus decontam-index` (its n-gram size is used)
      ngram: 13

A sample (its prompt's text and its target) overlaps when one of its n-grams — lower-cased words,
hashed exactly as ``corpus decontaminate`` hashes them — occurs in the training data; a sample
shorter than n counts whole (as the decontamination index does). The training data is streamed
batch by batch against the (small) set of the eval's n-grams, so its size does not bound memory.
Every record gets ``contaminated``, and each task reports, per model, how many samples overlap and
every metric on the clean subset with its interval.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from eval.tasks import Sample
from eval.training_data import dataset_batches, training_datasets
from manifests.errors import DistilleryError
from manifests.recipes import RecipeConfig
from manifests.schema import Manifest
from manifests.store import Store
from manifests.verify import ensure_verified

MIN_TOKENS = 3
"""A sample of fewer words than this is too short for an overlap to mean anything; it counts clean."""


class ContaminationConfig(RecipeConfig):
    """Overlap of the eval's samples with what the models were trained on."""

    against: Literal["training", "index"] = "training"
    index: str | None = None
    """With ``against: index``: a ``corpus decontam-index`` run."""
    ngram: int = Field(default=13, ge=3, le=64)

    @model_validator(mode="after")
    def _index_named(self) -> ContaminationConfig:
        if (self.against == "index") != (self.index is not None):
            raise ValueError(
                "'against: index' needs 'index:' (a corpus decontam-index), and 'index:' needs 'against: index'"
            )
        return self


def sample_text(sample: Sample) -> str:
    """The sample's own question(s) and its target: not the few-shot examples before it."""
    asked = " ".join(m["content"] for m in sample.own_prompt() if m["role"] == "user")
    return f"{asked}\n{sample.target or ''}"


class SampleGrams:
    """The eval samples' n-grams, each knowing its sample."""

    def __init__(self, texts: list[str], ngram: int):
        from corpus.decontam import gram_hashes, token_hashes

        tokens, counts = token_hashes(pa.array(texts, pa.string()))
        lengths = sorted({ngram} | {int(c) for c in counts if MIN_TOKENS <= c < ngram})
        grams = gram_hashes(tokens, counts, lengths)
        hashes, owners = [], []
        for length, (h, owner) in grams.items():
            keep = counts[owner] >= ngram if length == ngram else counts[owner] == length
            hashes.append(h[keep])
            owners.append(owner[keep])
        self.hashes = np.concatenate(hashes)
        self.owners = np.concatenate(owners)
        self.lengths = lengths
        self.ngram = ngram
        self.hit = np.zeros(len(texts), dtype=bool)

    def mark(self, found: np.ndarray) -> None:
        """Mark the samples owning any of the ``found`` hashes."""
        if len(found) and len(self.hashes):
            self.hit[self.owners[np.isin(self.hashes, found)]] = True

    def scan_texts(self, texts: list[str]) -> None:
        from corpus.decontam import gram_hashes, token_hashes

        tokens, counts = token_hashes(pa.array(texts, pa.string()))
        for h, _ in gram_hashes(tokens, counts, self.lengths).values():
            self.mark(h)


def overlap_with_training(
    run: Manifest, store: Store, samples: list[Sample], ngram: int
) -> tuple[np.ndarray, list[str]]:
    """(overlaps per sample, refs of the datasets scanned) against every dataset behind ``run``."""
    grams = SampleGrams([sample_text(s) for s in samples], ngram)
    scanned = []
    for dataset in training_datasets(run, store):
        ensure_verified(dataset)
        scanned.append(dataset.ref)
        for _, texts in dataset_batches(dataset):
            grams.scan_texts(texts)
    return grams.hit, scanned


def load_contamination_index(ref: str, store: Store, ngram: int):
    """A ``corpus decontam-index`` checked to hold ``ngram``-grams hashed as this version hashes them."""
    from corpus.decontam import INDEX_FILE, SETTINGS_FILE, STAGE, check_settings, load_index

    index = store.resolve(ref, kind="run")
    ensure_verified(index)
    if not all((index.location / f).is_file() for f in (INDEX_FILE, SETTINGS_FILE)):
        raise DistilleryError(
            f"contamination: {index.ref} (stage {index.producer.stage}) is not a decontamination index; "
            f"build one with stage {STAGE}"
        )
    built = load_index(str(index.location))
    check_settings(built.settings, index.ref, ngram)
    return built


def overlap_with_index(built, samples: list[Sample], ngram: int) -> np.ndarray:
    grams = SampleGrams([sample_text(s) for s in samples], ngram)
    grams.mark(built.keys)
    return grams.hit
