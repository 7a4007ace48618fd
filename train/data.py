"""Training data from dataset manifests: checked before any model loads, mixed by weight, pinned.

    datasets:
      - {ref: demo-sft, split: train, weight: 3}       # name (latest), name@id-prefix, or a path
      - {ref: more-sft@3f9c, weight: 1}

Every dataset is resolved and verified, and must have the split and the columns the method needs
(``messages`` for SFT, ``input_ids`` for pretraining) -- a dataset without them is one error line
naming the dataset and the columns it has, before a model is loaded. Without weights the datasets
are concatenated; with weights they are interleaved with ``datasets.interleave_datasets`` in those
proportions, the smaller ones repeated until every dataset has been seen once in full
(``all_exhausted``), with the recipe's seed -- so a mixture is the same in every run. The run's
manifest names each dataset by its pinned id.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from manifests.data import read_table, require_columns, require_split
from manifests.errors import DistilleryError
from manifests.recipes import RecipeConfig
from manifests.schema import Manifest
from manifests.store import Store


class DatasetInput(RecipeConfig):
    """One training dataset."""

    ref: str
    """Dataset reference: ``name``, ``name@id-prefix`` or a path."""
    split: str = "train"
    weight: float | None = Field(default=None, gt=0)
    """Mixture weight (relative to the others); without weights the datasets are concatenated."""


def resolve_datasets(
    inputs: list[DatasetInput], store: Store, columns: list[str], purpose: str
) -> list[Manifest]:
    """The manifests of ``inputs``, verified, each checked for its split and ``columns``."""
    weighted = [d.weight is not None for d in inputs]
    if any(weighted) and not all(weighted):
        raise DistilleryError("datasets: give every dataset a 'weight', or none (they are then concatenated)")
    manifests = []
    for d in inputs:
        manifest = store.resolve(d.ref, kind="dataset")
        require_columns(manifest, columns, purpose)
        require_split(manifest, d.split)
        manifests.append(manifest)
    return manifests


def load_mixture(inputs: list[DatasetInput], manifests: list[Manifest], columns: list[str], seed: int):
    """One Hugging Face dataset of ``columns``: the inputs concatenated, or interleaved by weight."""
    from datasets import Dataset, concatenate_datasets, interleave_datasets

    parts = [
        Dataset(read_table(m, split=d.split, columns=columns)) for d, m in zip(inputs, manifests, strict=True)
    ]
    if len(parts) == 1:
        return parts[0]
    if inputs[0].weight is None:
        return concatenate_datasets(parts)
    total = sum(d.weight for d in inputs)
    return interleave_datasets(
        parts, probabilities=[d.weight / total for d in inputs], seed=seed, stopping_strategy="all_exhausted"
    )


def pinned(inputs: list[DatasetInput], manifests: list[Manifest]) -> list[dict[str, Any]]:
    """The dataset entries of the resolved recipe, each naming its dataset by id."""
    return [d.resolved() | {"ref": m.id} for d, m in zip(inputs, manifests, strict=True)]
