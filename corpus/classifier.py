"""Model-based filtering: train a fastText classifier from two datasets, score documents with it.

Training, as DCLM does for quality (curated text as positives, random web text as negatives)::

    stage: corpus.train-classifier
    name: quality-clf
    positive: {ref: curated}
    negative: {ref: random-web}

publishes a run holding ``model/classifier.bin`` with its held-out accuracy; the step::

    - {type: classifier, model: quality-clf, label: positive, column: quality_score, threshold: 0.5}
    - {type: classifier, model: quality-clf, keep_top_fraction: 0.1}    # DCLM keeps the top 10%

adds the score column and keeps documents by threshold, or the top fraction of the whole build (a
global cut, decided after every task has been scored).
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from corpus.language import load_model
from corpus.steps import Decision, Filter, StepConfig
from manifests.data import read_table, require_columns
from manifests.errors import DistilleryError
from manifests.publish import Publisher
from manifests.recipes import Name, RecipeConfig, parse_config
from manifests.schema import Manifest
from manifests.store import Store

MODEL_FILE = "model/classifier.bin"


def _one_line(text: str, max_chars: int) -> str:
    # fastText reads one example a line; case is kept (it is a quality signal).
    return " ".join(text[:max_chars].split())


class DatasetSlice(RecipeConfig):
    ref: str
    """Dataset reference."""
    split: str | None = None
    text_field: str = "text"
    limit: int | None = Field(default=None, ge=1)
    """Use at most this many documents (a deterministic sample)."""


class TrainClassifierConfig(RecipeConfig):
    """Train a fastText classifier: documents of ``positive`` against those of ``negative``."""

    name: Name
    positive: DatasetSlice
    negative: DatasetSlice
    labels: tuple[str, str] = ("positive", "negative")
    """Label names of the two classes (the step scores the probability of the first by default)."""
    epochs: int = Field(default=5, ge=1)
    lr: float = Field(default=0.1, gt=0)
    word_ngrams: int = Field(default=2, ge=1)
    dim: int = Field(default=64, ge=2)
    min_count: int = Field(default=1, ge=1)
    holdout: float = Field(default=0.1, ge=0, lt=1)
    """Share of each class kept out of training to measure accuracy."""
    max_chars: int = Field(default=10_000, ge=1)
    seed: int = 0


def _examples(store: Store, part: DatasetSlice, label: str, seed: int) -> tuple[Manifest, list[str]]:
    manifest = store.resolve(part.ref, kind="dataset")
    require_columns(manifest, [part.text_field], "train-classifier")
    texts = (
        read_table(manifest, split=part.split, columns=[part.text_field]).column(part.text_field).to_pylist()
    )
    random.Random(seed).shuffle(texts)
    if part.limit:
        texts = texts[: part.limit]
    return manifest, [f"__label__{label} {_one_line(t, 10**9)}" for t in texts if t and t.strip()]


def train_classifier(cfg: TrainClassifierConfig, store: Store) -> Manifest:
    import fasttext

    pos_manifest, positives = _examples(store, cfg.positive, cfg.labels[0], cfg.seed)
    neg_manifest, negatives = _examples(store, cfg.negative, cfg.labels[1], cfg.seed + 1)
    if len(positives) < 2 or len(negatives) < 2:
        raise DistilleryError(
            f"{cfg.name}: need at least 2 documents per class ({len(positives)} positive, {len(negatives)} negative)"
        )
    cut_pos, cut_neg = int(len(positives) * cfg.holdout), int(len(negatives) * cfg.holdout)
    train = positives[cut_pos:] + negatives[cut_neg:]
    test = positives[:cut_pos] + negatives[:cut_neg]
    random.Random(cfg.seed).shuffle(train)
    recipe = cfg.resolved() | {"positive": cfg.positive.resolved() | {"ref": pos_manifest.id},
                               "negative": cfg.negative.resolved() | {"ref": neg_manifest.id}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        train_file = Path(tmp) / "train.txt"
        train_file.write_text("\n".join(train) + "\n", encoding="utf-8")
        # One thread and a seed: the same data gives the same model.
        model = fasttext.train_supervised(
            input=str(train_file), epoch=cfg.epochs, lr=cfg.lr, wordNgrams=cfg.word_ngrams, dim=cfg.dim,
            minCount=cfg.min_count, seed=cfg.seed, thread=1, verbose=0,
        )  # fmt: skip
        stats: dict[str, Any] = {"train_examples": len(train), "test_examples": len(test)}
        if test:
            right = sum(model.f.predict(line.split(" ", 1)[1] + "\n", 1, 0.0, "strict")[0][1] == line.split(" ", 1)[0]
                        for line in test)  # fmt: skip
            stats["holdout_accuracy"] = round(right / len(test), 4)
        parents = [pos_manifest, neg_manifest]
        roles = {pos_manifest.id: "positive", neg_manifest.id: "negative"}
        with Publisher(store, kind="run", name=cfg.name, stage="corpus.train-classifier", recipe=recipe,
                       parents=parents, parent_roles=roles, seed=cfg.seed) as pub:  # fmt: skip
            (pub.dir / MODEL_FILE).parent.mkdir(parents=True)
            model.save_model(str(pub.dir / MODEL_FILE))
            return pub.publish(stats=stats | {"labels": list(cfg.labels)})


class ClassifierFilter(Filter):
    name = "classifier"

    def __init__(self, cfg: ClassifierConfig, model_path: Path):
        super().__init__()
        self.cfg = cfg
        self.model = load_model(str(model_path))
        self.label = f"__label__{cfg.label}"
        self.name = cfg.column

    def decide(self, batch: pa.RecordBatch) -> Decision:
        scores = []
        for text in batch.column("text").to_pylist():
            found = dict(
                (label, p)
                for p, label in self.model.f.predict(
                    _one_line(text, self.cfg.max_chars) + "\n", -1, 0.0, "strict"
                )
            )
            scores.append(round(float(found.get(self.label, 0.0)), 5))
        threshold = self.cfg.threshold
        keep = [threshold is None or s >= threshold for s in scores]
        reasons = [None if k else f"{self.cfg.column}_below_threshold" for k in keep]
        return Decision(keep=pa.array(keep, pa.bool_()), reasons=reasons, scores=scores,
                        columns={self.cfg.column: pa.array(scores, pa.float32())})  # fmt: skip


class ClassifierConfig(StepConfig):
    """Score documents with a trained fastText classifier; keep by threshold or top fraction."""

    type: Literal["classifier"] = "classifier"
    model: str
    """Run reference of a classifier from ``corpus train-classifier`` (pinned to its id when the build starts)."""
    label: str = "positive"
    """The class whose probability is the score."""
    column: str = "quality_score"
    """Name of the score column (and of the step in the ledger)."""
    threshold: float | None = Field(default=None, ge=0, le=1)
    """Keep documents scoring at least this."""
    keep_top_fraction: float | None = Field(default=None, gt=0, le=1)
    """Keep this share of the build's documents with the highest scores (a global cut)."""
    max_chars: int = Field(default=10_000, ge=1)

    @model_validator(mode="after")
    def _one_rule(self) -> ClassifierConfig:
        if self.threshold is not None and self.keep_top_fraction is not None:
            raise ValueError("give 'threshold' or 'keep_top_fraction', not both")
        return self

    def prepare(self, store: Store) -> list[Manifest]:
        manifest = store.resolve(self.model, kind="run")
        if not (manifest.location / MODEL_FILE).is_file():
            raise DistilleryError(
                f"classifier step: {manifest.ref} holds no {MODEL_FILE}; train one with 'corpus train-classifier'"
            )
        self.model = f"{manifest.name}@{manifest.id}"
        return [manifest]

    def global_cut(self) -> tuple[str, float, str] | None:
        if self.keep_top_fraction is None:
            return None
        return self.column, self.keep_top_fraction, f"{self.column}_below_top_fraction"

    def build(self, store: Store | None = None) -> ClassifierFilter:
        manifest = (store or Store()).resolve(self.model, kind="run")
        return ClassifierFilter(self, manifest.location / MODEL_FILE)


def run_train(data: dict[str, Any], store: Store, source: str) -> Manifest:
    return train_classifier(parse_config(TrainClassifierConfig, data, source), store)
