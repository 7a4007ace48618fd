"""``corpus.build``: read inputs, assign ids and source pointers, filter, publish Parquet shards.

stage: corpus.build
name: demo-corpus
inputs:
  - {path: examples/sample/web.jsonl, format: jsonl}
  - {path: examples/sample/notes, format: text, glob: "*.txt"}
min_words: 20
exact_dedup: true
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from pydantic import Field
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from corpus.sources import RECORD_SCHEMA, SourceConfig, read_source
from corpus.steps import ExactDedupFilter, Filter, MinWordsFilter
from manifests.errors import DistilleryError
from manifests.publish import Publisher
from manifests.recipes import Name, RecipeConfig, parse_config
from manifests.schema import Manifest
from manifests.store import Store


class CorpusBuildConfig(RecipeConfig):
    """Build a text dataset from files."""

    name: Name
    """Name of the output dataset in the store."""
    inputs: list[SourceConfig] = Field(min_length=1)
    """Input files or folders, read in order (order decides which duplicate is kept)."""
    min_words: int = Field(default=20, ge=0)
    """Drop documents with fewer whitespace-separated words (0 keeps everything)."""
    exact_dedup: bool = True
    """Drop documents whose whitespace-normalised, case-folded text was seen before."""
    dedup_case_fold: bool = True
    """Fold case before comparing texts for exact dedup."""
    shard_rows: int = Field(default=50_000, ge=1)
    """Rows per output Parquet shard."""
    seed: int = 0


def _steps(cfg: CorpusBuildConfig) -> list[Filter]:
    steps: list[Filter] = []
    if cfg.min_words:
        steps.append(MinWordsFilter(cfg.min_words))
    if cfg.exact_dedup:
        steps.append(ExactDedupFilter(case_fold=cfg.dedup_case_fold))
    return steps


def _check_unique(batch: pa.RecordBatch, seen: set[str], where: str) -> None:
    for rid in batch.column("id").to_pylist():
        if rid in seen:
            raise DistilleryError(
                f"input {where}: record {rid} was already read (is this input listed twice?)"
            )
        seen.add(rid)


def build(cfg: CorpusBuildConfig, store: Store) -> Manifest:
    steps = _steps(cfg)
    rows_in = rows_out = 0
    seen_ids: set[str] = set()
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    with Publisher(
        store, kind="dataset", name=cfg.name, stage="corpus.build", recipe=cfg.resolved(), seed=cfg.seed
    ) as pub:

        def flush() -> None:
            nonlocal pending, pending_rows, rows_out
            if pending:
                pub.write_table(pa.Table.from_batches(pending, schema=RECORD_SCHEMA))
                rows_out += pending_rows
            pending, pending_rows = [], 0

        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.speed} docs/s"),
                   TimeRemainingColumn()]  # fmt: skip
        with Progress(*columns, transient=True) as progress:
            task = progress.add_task("corpus.build", total=None)
            for source in cfg.inputs:
                for batch in read_source(source):
                    rows_in += batch.num_rows
                    _check_unique(batch, seen_ids, source.path)
                    for step in steps:
                        batch = step(batch)
                    if batch.num_rows:
                        pending.append(batch)
                        pending_rows += batch.num_rows
                    if pending_rows >= cfg.shard_rows:
                        flush()
                    progress.advance(task, rows_in - progress.tasks[0].completed)
            flush()
        if rows_out == 0:
            raise DistilleryError(
                f"{cfg.name}: every document was filtered out ({rows_in} read); loosen min_words?"
            )
        for step in steps:
            qualified = f"corpus.build.{step.name}"
            pub.write_ledger([entry | {"step": qualified} for entry in step.ledger], step=qualified)
        stats: dict[str, Any] = {
            "rows_in": rows_in,
            "rows_out": rows_out,
            "steps": {s.name: s.summary() for s in steps},
        }
        return pub.publish(stats=stats, arrow_schema=RECORD_SCHEMA)


def run_recipe(data: dict[str, Any], store: Store, source: str) -> Manifest:
    cfg = parse_config(CorpusBuildConfig, data, source)
    return build(cfg, store)
