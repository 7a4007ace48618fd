"""``corpus.build``: inputs → tasks → steps (in parallel, resumable) → global exact dedup → shards.

    stage: corpus.build
    name: demo-corpus
    inputs:
      - {path: examples/sample/web.jsonl, format: jsonl}
      - {path: examples/sample/notes, format: text, glob: "*.txt"}
    steps:
      - {type: min_words, min_words: 20}
      - {type: language, keep: [en]}
    dedup: {exact: true}
    workers: 2

Phase 1 runs the steps over each task in a worker and leaves its rows, ledger and a ``.done``
marker in a work folder beside the dataset (``.work-<plan hash>``); a killed build resumes from
the tasks already done. Phase 2 reads the task outputs in task order, drops exact duplicates
(first seen is kept), and publishes shards, ledgers and the funnel — the same bytes whatever the
number of workers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from corpus.classifier import ClassifierConfig
from corpus.executor import run_tasks
from corpus.language import LanguageConfig
from corpus.sources import RECORD_SCHEMA, ReadLog, SourceConfig, Task, plan_tasks, read_task
from corpus.steps import MinWordsFilter, StepConfig, StepStats, normalise
from corpus.toxicity import ToxicityConfig
from manifests.errors import DistilleryError
from manifests.hashing import canonical_json
from manifests.publish import LEDGER_SCHEMA, Publisher
from manifests.recipes import Name, RecipeConfig, parse_config
from manifests.schema import Manifest
from manifests.store import Store


class MinWordsConfig(StepConfig):
    """Drop documents with fewer whitespace-separated words than ``min_words``."""

    type: Literal["min_words"] = "min_words"
    min_words: int = Field(default=20, ge=0)

    def build(self, store=None) -> MinWordsFilter:
        return MinWordsFilter(self.min_words)


AnyStep = Annotated[
    MinWordsConfig | LanguageConfig | ToxicityConfig | ClassifierConfig, Field(discriminator="type")
]


class DedupConfig(RecipeConfig):
    """Exact deduplication across the whole build (global: after every task's steps)."""

    exact: bool = True
    """Drop documents whose whitespace-normalised text was seen before (first seen is kept)."""
    case_fold: bool = True
    """Also fold case before comparing."""


class CorpusBuildConfig(RecipeConfig):
    """Build a text dataset from files or crawls."""

    name: Name
    """Name of the output dataset in the store."""
    inputs: list[SourceConfig] = Field(min_length=1)
    """Inputs, read in order (the order decides which duplicate is kept)."""
    steps: list[AnyStep] = Field(default_factory=list)
    """Filters and mappers applied to every document, in order."""
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    shard_rows: int = Field(default=50_000, ge=1)
    """Rows per output Parquet shard."""
    split_bytes: int = Field(default=64 << 20, ge=1 << 10)
    """JSONL files larger than this are read as several tasks."""
    seed: int = 0
    workers: int = Field(default=1, ge=1)
    """Worker processes for phase 1 (execution only: the output and its id do not depend on it)."""

    def content_recipe(self) -> dict[str, Any]:
        """The resolved recipe without execution settings: what the dataset's id depends on."""
        return {k: v for k, v in self.resolved().items() if k != "workers"}


def _step_name(step) -> str:
    return f"corpus.build.{step.name}"


def run_task(task: Task, cfg_json: str, work: str, store_root: str) -> dict[str, Any]:
    """Phase 1 for one task (in a worker): read, apply the steps, leave rows + ledger + marker."""
    cfg = CorpusBuildConfig.model_validate_json(cfg_json)
    store = Store(store_root)
    steps = [s.build(store) for s in cfg.steps]
    log = ReadLog()
    folder = Path(work)
    stem = folder / f"task-{task.index:05d}"
    writer: pq.ParquetWriter | None = None
    rows_in = rows_out = 0
    try:
        for batch in read_task(task, cfg.inputs[task.input_index], log):
            rows_in += batch.num_rows
            for step in steps:
                batch = step(batch)
            if batch.num_rows:
                if writer is None:
                    writer = pq.ParquetWriter(f"{stem}.parquet", batch.schema, compression="zstd")
                writer.write_batch(batch)
                rows_out += batch.num_rows
    finally:
        if writer is not None:
            writer.close()
    ledger = log.ledger + [entry | {"step": _step_name(s)} for s in steps for entry in s.ledger]
    if ledger:
        pq.write_table(pa.Table.from_pylist(ledger, schema=LEDGER_SCHEMA), f"{stem}.ledger.parquet")
    result = {
        "index": task.index, "rows_in": rows_in, "rows_out": rows_out, "skipped": log.counts,
        "steps": {s.name: s.stats.as_dict() for s in steps},
        "data": f"{stem.name}.parquet" if writer is not None else None,
        "ledger": f"{stem.name}.ledger.parquet" if ledger else None,
    }  # fmt: skip
    # The marker goes last: a task without one is redone on resume.
    tmp = Path(f"{stem}.done.tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, f"{stem}.done.json")
    return result


def _work_dir(cfg: CorpusBuildConfig, tasks: list[Task], store: Store) -> Path:
    plan = {"recipe": cfg.content_recipe(), "tasks": [t.key() for t in tasks]}
    digest = hashlib.sha256(canonical_json(plan).encode()).hexdigest()[:16]
    return store.name_dir("dataset", cfg.name) / f".work-{digest}"


def _phase1(cfg: CorpusBuildConfig, tasks: list[Task], work: Path, store: Store) -> dict[int, dict[str, Any]]:
    results: dict[int, dict[str, Any]] = {}
    todo = []
    for task in tasks:
        marker = work / f"task-{task.index:05d}.done.json"
        if marker.is_file():
            results[task.index] = json.loads(marker.read_text())
        else:
            todo.append(task)
    cfg_json = cfg.model_dump_json()
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[docs]} docs"),
               TextColumn("{task.fields[rate]} docs/s"), TimeRemainingColumn()]  # fmt: skip
    with Progress(*columns, transient=True) as progress:
        bar = progress.add_task(
            "corpus.build tasks", total=len(tasks), completed=len(results), docs=0, rate="-"
        )
        docs = 0
        for result in run_tasks(
            run_task, [(t, cfg_json, str(work), str(store.root)) for t in todo], cfg.workers
        ):
            results[result["index"]] = result
            docs += result["rows_in"]
            elapsed = progress.tasks[0].elapsed or 1e-9
            progress.update(bar, advance=1, docs=docs, rate=f"{docs / elapsed:.0f}")
    return results


class _ExactDedup:
    """First-seen-wins exact dedup over whitespace-normalised (optionally case-folded) text.

    Holds one 16-byte digest per kept document: fine up to hundreds of millions of documents;
    near-duplicate dedup at corpus scale is its own out-of-core step.
    """

    def __init__(self, case_fold: bool):
        self.case_fold = case_fold
        self.seen: dict[bytes, str] = {}
        self.ledger: list[dict] = []

    def __call__(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        texts = normalise(batch.column("text"), self.case_fold).to_pylist()
        keep = []
        for rid, text in zip(batch.column("id").to_pylist(), texts, strict=True):
            digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
            first = self.seen.setdefault(digest, rid)
            keep.append(first == rid)
            if first != rid:
                self.ledger.append({"id": rid, "step": "corpus.build.exact_dedup", "action": "drop",
                                    "reason": "exact_duplicate", "score": None,
                                    "detail": json.dumps({"duplicate_of": first})})  # fmt: skip
        return batch.filter(pa.array(keep, pa.bool_()))


def _phase2(
    cfg: CorpusBuildConfig, tasks: list[Task], results: dict, work: Path, pub: Publisher
) -> dict[str, Any]:
    """Combine task outputs in task order: unique ids, exact dedup, shards, ledgers, funnel."""
    dedup = _ExactDedup(cfg.dedup.case_fold) if cfg.dedup.exact else None
    seen_ids: set[str] = set()
    pending: list[pa.RecordBatch] = []
    pending_rows = rows_out = 0
    schema: pa.Schema | None = None

    def flush() -> None:
        nonlocal pending, pending_rows, rows_out
        if pending:
            pub.write_table(pa.Table.from_batches(pending, schema=schema))
            rows_out += pending_rows
        pending, pending_rows = [], 0

    cuts = _global_cuts(cfg, tasks, results, work)
    cut_ledger: list[dict] = []
    ledgers: dict[str, list[pa.Table]] = {}
    for task in tasks:
        result = results[task.index]
        if result["ledger"]:
            table = pq.read_table(work / result["ledger"])
            for step in sorted(set(table.column("step").to_pylist())):
                ledgers.setdefault(step, []).append(table.filter(pc.equal(table.column("step"), step)))
        if not result["data"]:
            continue
        for batch in pq.ParquetFile(work / result["data"]).iter_batches(batch_size=10_000):
            for rid in batch.column("id").to_pylist():
                if rid in seen_ids:
                    where = cfg.inputs[task.input_index].path or cfg.inputs[task.input_index].dataset
                    raise DistilleryError(
                        f"input {where}: record {rid} was already read (is this input listed twice?)"
                    )
                seen_ids.add(rid)
            for column, cutoff, reason in cuts:
                scores = batch.column(column)
                keep = pc.greater_equal(scores, cutoff)
                for rid, score, kept in zip(
                    batch.column("id").to_pylist(), scores.to_pylist(), keep.to_pylist(), strict=True
                ):
                    if not kept:
                        cut_ledger.append({"id": rid, "step": f"corpus.build.{column}", "action": "drop", "reason": reason,
                                           "score": score, "detail": json.dumps({"cutoff": cutoff})})  # fmt: skip
                batch = batch.filter(keep)
            if dedup is not None:
                batch = dedup(batch)
            if schema is None:
                schema = batch.schema
            if batch.num_rows:
                pending.append(batch)
                pending_rows += batch.num_rows
            if pending_rows >= cfg.shard_rows:
                flush()
    flush()
    for step in sorted({entry["step"] for entry in cut_ledger}):
        rows = [entry for entry in cut_ledger if entry["step"] == step]
        ledgers.setdefault(step, []).append(pa.Table.from_pylist(rows, schema=LEDGER_SCHEMA))
    if dedup is not None and dedup.ledger:
        ledgers.setdefault("corpus.build.exact_dedup", []).append(
            pa.Table.from_pylist(dedup.ledger, schema=LEDGER_SCHEMA)
        )
    for step, tables in ledgers.items():
        pub.write_ledger(pa.concat_tables(tables), step=step)
    return _funnel(cfg, results, cut_ledger, len(dedup.ledger) if dedup else 0, rows_out)


def _global_cuts(
    cfg: CorpusBuildConfig, tasks: list[Task], results: dict, work: Path
) -> list[tuple[str, float, str]]:
    """(column, cutoff, reason) for every step that keeps a top fraction of the whole build."""
    cuts = []
    for step in cfg.steps:
        cut = step.global_cut()
        if cut is None:
            continue
        column, fraction, reason = cut
        files = [work / results[t.index]["data"] for t in tasks if results[t.index]["data"]]
        ranked = sorted(
            (s for f in files for s in pq.read_table(f, columns=[column]).column(column).to_pylist()),
            reverse=True,
        )
        if not ranked:
            continue
        keep = max(1, math.ceil(fraction * len(ranked)))
        # Ties at the cutoff are all kept: the cut never depends on row order.
        cuts.append((column, ranked[keep - 1], reason))
    return cuts


def _funnel(
    cfg: CorpusBuildConfig, results: dict, cut_ledger: list[dict], dedup_dropped: int, rows_out: int
) -> dict[str, Any]:
    skipped: Counter = Counter()
    steps: dict[str, StepStats] = {}
    for result in results.values():
        skipped.update(result["skipped"])
        for name, stats in result["steps"].items():
            merged = steps.setdefault(name, StepStats())
            merged.merge(StepStats.from_dict(stats))
    rows_read = sum(r["rows_in"] for r in results.values())
    funnel = [
        {"step": "read", "in": rows_read + sum(skipped.values()), "out": rows_read, "removed": dict(skipped)}
    ]
    for name, stats in steps.items():
        funnel.append({"step": name, "in": stats.rows_in, "out": stats.rows_out, "changed": stats.changed,
                       "removed": dict(sorted(stats.reasons.items())), "changes": dict(sorted(stats.changes.items())),
                       "seconds": round(stats.seconds, 3)})  # fmt: skip
    cut_counts = Counter(entry["step"].removeprefix("corpus.build.") for entry in cut_ledger)
    after_steps = funnel[-1]["out"]
    for column, dropped in sorted(cut_counts.items()):
        funnel.append({"step": f"{column} (top fraction)", "in": after_steps, "out": after_steps - dropped,
                       "removed": {f"{column}_below_top_fraction": dropped}})  # fmt: skip
        after_steps -= dropped
    if cfg.dedup.exact:
        kept = rows_out
        funnel.append({"step": "exact_dedup", "in": kept + dedup_dropped, "out": kept,
                       "removed": {"exact_duplicate": dedup_dropped} if dedup_dropped else {}})  # fmt: skip
    return {"rows_in": funnel[0]["in"], "rows_out": rows_out, "tasks": len(results), "funnel": funnel}


def build(cfg: CorpusBuildConfig, store: Store) -> Manifest:
    parents = [m for step in cfg.steps for m in step.prepare(store)]
    tasks = plan_tasks(cfg.inputs, store, cfg.split_bytes)
    work = _work_dir(cfg, tasks, store)
    work.mkdir(parents=True, exist_ok=True)
    try:
        results = _phase1(cfg, tasks, work, store)
        with Publisher(store, kind="dataset", name=cfg.name, stage="corpus.build", recipe=cfg.content_recipe(),
                       parents=parents, parent_roles={m.id: "step_model" for m in parents},
                       seed=cfg.seed, execution={"workers": cfg.workers}) as pub:  # fmt: skip
            stats = _phase2(cfg, tasks, results, work, pub)
            if stats["rows_out"] == 0:
                raise DistilleryError(
                    f"{cfg.name}: every document was removed ({stats['rows_in']} read); loosen the steps?"
                )
            manifest = pub.publish(stats=stats, arrow_schema=pub.schema or RECORD_SCHEMA)
    except DistilleryError:
        # A mistake in the input or recipe: fixing it changes the plan, so this work cannot be resumed.
        # (A crash or kill keeps the folder: the same command resumes from the finished tasks.)
        shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def print_funnel(manifest: Manifest) -> None:
    from rich.table import Table

    from manifests.console import make_console

    table = Table("step", "in", "out", "changed", "removed (reason: count)", box=None, title="funnel")
    for row in manifest.stats.get("funnel", []):
        removed = ", ".join(f"{k}: {v}" for k, v in row.get("removed", {}).items())
        table.add_row(row["step"], str(row["in"]), str(row["out"]), str(row.get("changed", "")), removed)
    make_console().print(table)


def run_recipe(data: dict[str, Any], store: Store, source: str) -> Manifest:
    return build(parse_config(CorpusBuildConfig, data, source), store)
