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

With a ``curriculum`` (``train/curriculum.py``) the mixture's rows -- after concatenating or
interleaving -- are put in the order of a score; every method trains on them in that order.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Any

from pydantic import Field

from manifests.data import read_table, require_columns, require_split, shard_batches
from manifests.errors import DistilleryError
from manifests.recipes import RecipeConfig
from manifests.schema import Manifest
from manifests.store import Store
from manifests.verify import ensure_verified
from train.curriculum import LENGTH, Curriculum, check_curriculum, in_curriculum_order


class DatasetInput(RecipeConfig):
    """One training dataset."""

    ref: str
    """Dataset reference: ``name``, ``name@id-prefix`` or a path."""
    split: str = "train"
    weight: float | None = Field(default=None, gt=0)
    """Mixture weight (relative to the others); without weights the datasets are concatenated."""


def resolve_datasets(
    inputs: list[DatasetInput],
    store: Store,
    columns: list[str],
    purpose: str,
    curriculum: Curriculum | None = None,
) -> list[Manifest]:
    """The manifests of ``inputs``, verified, each checked for its split and ``columns`` (and for the
    ``curriculum``'s score)."""
    weighted = [d.weight is not None for d in inputs]
    if any(weighted) and not all(weighted):
        raise DistilleryError("datasets: give every dataset a 'weight', or none (they are then concatenated)")
    manifests = []
    for d in inputs:
        manifest = store.resolve(d.ref, kind="dataset")
        require_columns(manifest, columns, purpose)
        require_split(manifest, d.split)
        if curriculum is not None:
            check_curriculum(curriculum, manifest, d.split)
        manifests.append(manifest)
    return manifests


def load_mixture(inputs: list[DatasetInput], manifests: list[Manifest], columns: list[str], seed: int,
                 cache_dir: Path | None = None, curriculum: Curriculum | None = None):  # fmt: skip
    """One Hugging Face dataset of ``columns``: the inputs concatenated, or interleaved by weight, and
    with a ``curriculum`` then put in its order (its score column read for that, and not kept).

    In memory, or with ``cache_dir`` memory-mapped: each shard is copied once, a block at a time, to
    an Arrow file there, and rows are read from disk as they are used -- for corpora larger than memory.
    """
    extra = curriculum.by if curriculum and curriculum.by != LENGTH and curriculum.by not in columns else None
    mixture = _mixture(inputs, manifests, columns, seed, cache_dir, extra)
    if curriculum is None:
        return mixture
    ordered = in_curriculum_order(mixture, curriculum, seed)
    return ordered.remove_columns(extra) if extra else ordered


def _mixture(inputs: list[DatasetInput], manifests: list[Manifest], columns: list[str], seed: int,
             cache_dir: Path | None, score: str | None):  # fmt: skip
    """The mixture of ``columns`` (and of the ``score`` column, as float64: one dataset's integer scores
    and another's floats mix)."""
    from datasets import Dataset, Value, concatenate_datasets, interleave_datasets

    columns = [*columns, score] if score else columns

    if cache_dir is None:
        parts = [
            Dataset(read_table(m, split=d.split, columns=columns))
            for d, m in zip(inputs, manifests, strict=True)
        ]
    else:
        parts = [
            _memory_mapped(m, d.split, columns, cache_dir) for d, m in zip(inputs, manifests, strict=True)
        ]
    if score:
        parts = [part.cast_column(score, Value("float64")) for part in parts]
    if len(parts) == 1:
        return parts[0]
    if inputs[0].weight is None:
        return concatenate_datasets(parts)
    total = sum(d.weight for d in inputs)
    return interleave_datasets(
        parts, probabilities=[d.weight / total for d in inputs], seed=seed, stopping_strategy="all_exhausted"
    )


def _memory_mapped(manifest: Manifest, split: str, columns: list[str], cache_dir: Path):
    """The split's ``columns`` as a dataset over Arrow files in ``cache_dir`` (one per shard, named by
    the shard's hash and the columns, so a resumed run finds them), memory-mapped."""
    from datasets import Dataset, concatenate_datasets

    ensure_verified(manifest)
    require_split(manifest, split)
    cache_dir.mkdir(parents=True, exist_ok=True)
    parts = []
    for entry in manifest.data_files(split):
        key = hashlib.sha256(f"{entry.sha256} {columns}".encode()).hexdigest()[:32]
        target = cache_dir / f"{key}.arrow"
        if not target.is_file():
            _arrow_copy(manifest.location / entry.path, target, columns)
        parts.append(Dataset.from_file(str(target)))
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def _arrow_copy(source: Path, target: Path, columns: list[str], rows: int = 1024) -> None:
    """Copy a Parquet shard's ``columns`` into an Arrow stream file, ``rows`` at a time (so memory
    holds one block, not the shard), atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([pq.read_schema(source).field(c) for c in columns])
    tmp = target.with_name(f".tmp-{uuid.uuid4().hex}-{target.name}")
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for batch in shard_batches(source, batch_size=rows, columns=columns):
                writer.write_batch(batch.select(columns))
    except BaseException:
        tmp.unlink(missing_ok=True)  # a damaged shard (or a kill) leaves no half copy behind
        raise
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)


def pinned(inputs: list[DatasetInput], manifests: list[Manifest]) -> list[dict[str, Any]]:
    """The dataset entries of the resolved recipe, each naming its dataset by id."""
    return [d.resolved() | {"ref": m.id} for d, m in zip(inputs, manifests, strict=True)]
