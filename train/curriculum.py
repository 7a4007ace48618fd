"""Curricula: the training rows in the order of a score -- easy to hard, or in stages.

    curriculum:
      by: mine_score          # a numeric column of every dataset, or `length` (characters of the text)
      order: ascending        # ascending: the lowest score first; descending: the highest first
      stages: 3               # 3 buckets by quantile, shuffled within each with the recipe's seed

``by`` names the score: any numeric column the datasets share (``synth mine``'s ``mine_score``, a
preference ``margin``, a teacher's confidence), or ``length`` -- the characters of the row's text
(``messages``, or ``prompt`` / ``completion`` / ``chosen`` / ``rejected``; a packed pretraining row has
no text to measure). ``stages: 1`` (the default) is the strict order; with ``stages: N`` the rows in
score order are cut into N buckets of equal size (quantiles of the score's rank), each bucket's rows
are shuffled with the recipe's seed, and the buckets follow one another. Ties keep the mixture's order.

The order is of the whole mixture (``train/data.py``): the datasets are concatenated, or interleaved
by weight (the smaller ones repeated), and then the rows are ordered. So weights decide how often each
dataset's rows are trained on, the curriculum when: a stage may hold more of one dataset than its
weight when its scores are lower -- the scores must mean the same thing in every dataset.

It is a function of the recipe and its seed alone, so every process of a multi-process run computes
the same global order and takes its share of each step from it, a resumed run continues it, and a run
longer than the data goes through the same order again.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from manifests.data import column_names, read_table
from manifests.errors import DistilleryError
from manifests.recipes import RecipeConfig
from manifests.schema import Manifest

LENGTH = "length"
"""``by: length``: the characters of a row's text, not a column (a column of that name is not read)."""
TEXT_COLUMNS = ("messages", "prompt", "completion", "chosen", "rejected")
"""The columns whose text ``by: length`` measures, those a dataset has."""


class Curriculum(RecipeConfig):
    """Train on the rows in the order of a score, easy to hard or in stages (``train/curriculum.py``)."""

    by: str = Field(min_length=1)
    """A numeric column of every dataset (``mine_score``, ``margin``, …), or ``length``: the characters of
    the row's text."""
    order: Literal["ascending", "descending"] = "ascending"
    """``ascending``: the lowest score first; ``descending``: the highest first."""
    stages: int = Field(default=1, ge=1)
    """1: the strict order. N: N buckets by quantile, in order, each shuffled with the recipe's seed."""


def curriculum_order(scores, curriculum: Curriculum, seed: int) -> np.ndarray:
    """The row indexes in curriculum order: sorted by score (ties in their given order), cut into
    ``stages`` equal buckets, each bucket shuffled by its own generator of ``(seed mod 2**32, stage)``."""
    scores = np.asarray(scores, dtype=np.float64)
    key = -scores if curriculum.order == "descending" else scores
    order = np.argsort(key, kind="stable")
    if curriculum.stages > 1:
        bounds = [len(order) * k // curriculum.stages for k in range(curriculum.stages + 1)]
        for stage, (lo, hi) in enumerate(pairwise(bounds)):
            order[lo:hi] = np.random.default_rng([seed % 2**32, stage]).permutation(order[lo:hi])
    return order


def check_curriculum(curriculum: Curriculum, manifest: Manifest, split: str) -> None:
    """Fail before any model loads when ``manifest`` cannot be ordered by the curriculum's score: no such
    column, a column that is not numbers, or empty (null or NaN) scores in ``split``."""
    have = column_names(manifest)
    if curriculum.by == LENGTH:
        if not any(c in have for c in TEXT_COLUMNS):
            raise DistilleryError(
                f"curriculum: by: length counts the characters of a row's text ({', '.join(TEXT_COLUMNS)}); "
                f"dataset {manifest.ref} has none of those columns (it has: {', '.join(have)}); order by a "
                "numeric column"
            )
        return
    if curriculum.by not in have:
        raise DistilleryError(
            f"curriculum: dataset {manifest.ref} has no column {curriculum.by!r} to order by; it has: "
            f"{', '.join(have)} (or use by: length)"
        )
    column = read_table(manifest, split=split, columns=[curriculum.by]).column(curriculum.by)
    kind = column.type
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
        raise DistilleryError(
            f"curriculum: column {curriculum.by!r} of dataset {manifest.ref} holds {kind}, not numbers; "
            f"order by a numeric column (it has: {', '.join(have)}) or by: length"
        )
    empty = column.null_count
    if pa.types.is_floating(kind):
        empty += int(pc.sum(pc.is_nan(column.fill_null(0.0))).as_py() or 0)
    if empty:
        raise DistilleryError(
            f"curriculum: column {curriculum.by!r} of dataset {manifest.ref} (split {split}) has {empty} "
            "empty score(s) (null or NaN); fill them or leave those rows out"
        )


def text_length(value: Any) -> int:
    """Characters of the text in a value: a string, a list of them, or a chat (its messages' contents)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return text_length(value.get("content"))
    if isinstance(value, list):
        return sum(text_length(v) for v in value)
    return 0


def scores(mixture, curriculum: Curriculum) -> np.ndarray:
    """The score of every row of ``mixture`` (a Hugging Face dataset) the curriculum orders by."""
    if curriculum.by != LENGTH:
        return np.asarray(mixture.with_format("numpy")[curriculum.by], dtype=np.float64)
    texts = [c for c in TEXT_COLUMNS if c in mixture.column_names]
    total = np.zeros(len(mixture), dtype=np.float64)
    for column in texts:
        total += np.fromiter((text_length(v) for v in mixture[column]), dtype=np.float64, count=len(mixture))
    return total


def in_curriculum_order(mixture, curriculum: Curriculum, seed: int):
    """``mixture``'s rows in curriculum order (an index over the same rows: nothing is copied)."""
    return mixture.select(curriculum_order(scores(mixture, curriculum), curriculum, seed))
