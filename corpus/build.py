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
the tasks already done. Phase 2 makes the global decisions over the task outputs in task order
(global cuts, URL and exact dedup with the first seen kept, dedup against earlier indexes), finds
MinHash near-duplicates in phases of tasks (map → reduce → verify → clusters), and filters the
task outputs into shards in workers; its tasks leave markers too, so a kill anywhere resumes. The
output has the same bytes whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from corpus.classifier import ClassifierConfig
from corpus.combine import Combiner, global_counts, use_returning_memory_pool, write_ledgers
from corpus.decontam import DecontaminateConfig
from corpus.dedup_index import LoadedIndex
from corpus.document_keys import HIDDEN_COLUMNS, MINHASH_KEYS, add_keys
from corpus.executor import run_tasks, run_tasks_ray
from corpus.language import LanguageConfig
from corpus.lines import LineDedupConfig, add_unit_keys
from corpus.minhash import MinHashConfig, band_keys
from corpus.pii import PiiConfig
from corpus.quality import C4QualityConfig, FineWebQualityConfig, GopherQualityConfig, GopherRepetitionConfig
from corpus.sources import RECORD_SCHEMA, ReadLog, SourceConfig, Task, plan_tasks, read_task
from corpus.steps import MinWordsFilter, StepConfig, StepStats, TextNormalization
from corpus.task_markers import write_marker
from corpus.toxicity import ToxicityConfig
from manifests.errors import DistilleryError
from manifests.hashing import canonical_json
from manifests.publish import LEDGER_SCHEMA, Publisher
from manifests.recipes import Name, RecipeConfig, parse_config
from manifests.schema import Manifest
from manifests.store import Store, claim_work_folder


class MinWordsConfig(StepConfig):
    """Drop documents with fewer whitespace-separated words than ``min_words``."""

    type: Literal["min_words"] = "min_words"
    min_words: int = Field(default=20, ge=0)

    def build(self, store=None) -> MinWordsFilter:
        return MinWordsFilter(self.min_words)


AnyStep = Annotated[
    MinWordsConfig
    | LanguageConfig
    | GopherQualityConfig
    | GopherRepetitionConfig
    | C4QualityConfig
    | FineWebQualityConfig
    | ToxicityConfig
    | ClassifierConfig
    | PiiConfig
    | DecontaminateConfig,
    Field(discriminator="type"),
]


class DedupConfig(RecipeConfig):
    """Exact deduplication across the whole build (global: after every task's steps)."""

    exact: bool = True
    """Drop documents whose normalised text was seen before (first seen is kept)."""
    url: bool = False
    """Drop documents whose normalised URL was seen before (first seen is kept; before exact dedup)."""
    case_fold: bool = True
    """Also fold case before comparing."""
    normalize: TextNormalization = "none"
    """Exact dedup's text normalisation. ``none`` (the default): whitespace runs collapsed (and case,
    ``case_fold``). ``simplify``: as MinHash's default -- Unicode NFKC, punctuation, symbols and invisible
    characters removed, every digit made 0 -- so a copy that differs only in punctuation or quotes is
    dropped too; but so is a document that differs only in its numbers (a price list, a math problem),
    with no similarity threshold to stop it. Dedup indexes (``against``) must use the same setting."""
    against: list[str] = Field(default_factory=list)
    """Dedup indexes of earlier datasets (``corpus dedup-index``): their documents are dropped here too."""
    minhash: MinHashConfig | None = None
    """Near-duplicate dedup with MinHash LSH (after exact dedup), e.g. ``{threshold: 0.8}``."""
    lines: LineDedupConfig | None = None
    """Remove lines or paragraphs that recur across many documents (CCNet), after document dedup."""


EXECUTION_FIELDS = {"workers", "executor", "ray_address"}


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
    executor: Literal["local", "ray"] = "local"
    """``local``: processes on this machine; ``ray``: tasks on a Ray cluster (needs the ``ray`` extra)."""
    ray_address: str | None = None
    """Address of an existing Ray cluster (None starts a local one with ``workers`` CPUs)."""

    def content_recipe(self) -> dict[str, Any]:
        """The resolved recipe without execution settings: what the dataset's id depends on."""
        return {k: v for k, v in self.resolved().items() if k not in EXECUTION_FIELDS}


def _step_name(step) -> str:
    return f"corpus.build.{step.name}"


def _input_fields(batch: pa.RecordBatch, source: SourceConfig, steps: list) -> set[str]:
    """The input's own columns (JSONL fields, Parquet columns), refused where a build column would
    overwrite them; checked on every batch, since a field may first appear late in a file."""
    if source.format not in ("jsonl", "parquet"):
        return set()
    fields = set(batch.schema.names) - set(RECORD_SCHEMA.names)
    where = source.path or source.dataset
    for name in sorted(fields & set(HIDDEN_COLUMNS)):
        raise DistilleryError(
            f"input {where}: field '{name}' has the name of a column the build uses internally; "
            "rename it in the input, or list the fields to keep with 'keep_fields'"
        )
    return fields


def _check_step_columns(fields: set[str], step, source: SourceConfig) -> None:
    for name in sorted(fields & step.columns_written):
        raise DistilleryError(
            f"input {source.path}: field '{name}' would be overwritten by the column step "
            f"'{step.name}' writes; rename it in the input, or leave it out with 'keep_fields'"
        )


def run_task(task: Task, cfg_json: str, work: str, store_root: str) -> dict[str, Any]:
    """Phase 1 for one task (in a worker): read, apply the steps, leave rows + ledger + marker."""
    cfg = CorpusBuildConfig.model_validate_json(cfg_json)
    use_returning_memory_pool()
    store = Store(store_root)
    steps = [s.build(store) for s in cfg.steps]
    source = cfg.inputs[task.input_index]
    log = ReadLog()
    folder = Path(work)
    stem = folder / f"task-{task.index:05d}"
    writer: pq.ParquetWriter | None = None
    parts: list[str] = []
    rows_in = rows_out = 0
    try:
        for batch in read_task(task, source, log):
            rows_in += batch.num_rows
            fields = _input_fields(batch, source, steps)
            for step in steps:
                batch = step(batch)
                _check_step_columns(fields, step, source)
            if batch.num_rows:
                batch = add_keys(batch, cfg.dedup.case_fold, cfg.dedup.normalize)
                if cfg.dedup.lines is not None:
                    batch = add_unit_keys(batch, cfg.dedup.lines)
                if cfg.dedup.minhash is not None:
                    batch = batch.append_column(
                        MINHASH_KEYS, band_keys(batch.column("text"), cfg.dedup.minhash)
                    )
                if writer is None or not batch.schema.equals(writer.schema, check_metadata=True):
                    # A field first seen later in the task (or widened from int to float) starts a new
                    # part; phase 2 gives every part the build's unified schema.
                    if writer is not None:
                        writer.close()
                    parts.append(f"{stem.name}.parquet" if not parts else f"{stem.name}-{len(parts)}.parquet")
                    writer = pq.ParquetWriter(folder / parts[-1], batch.schema, compression="zstd")
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
        "data": parts or None, "fields_seen": sorted(log.fields_seen),
        "ledger": f"{stem.name}.ledger.parquet" if ledger else None,
    }  # fmt: skip
    write_marker(Path(f"{stem}.done.json"), result)  # last: a task without one is redone on resume
    return result


def _data_files(result: dict[str, Any]) -> list[str]:
    """A task's row files, in order (one name in markers of older builds)."""
    data = result["data"]
    return [data] if isinstance(data, str) else list(data or [])


def _check_inputs_read(cfg: CorpusBuildConfig, tasks: list[Task], results: dict[int, dict[str, Any]]) -> None:
    """Refuse an input with no records at all, and a ``keep_fields`` name no record of its input has."""
    for i, source in enumerate(cfg.inputs):
        mine = [results[t.index] for t in tasks if t.input_index == i]
        where = source.path or source.dataset
        if not sum(r["rows_in"] + sum(r["skipped"].values()) for r in mine):
            raise DistilleryError(
                f"input {where} is empty: no records in its {len(mine)} file(s); fill it or remove it from 'inputs'"
            )
        seen = {name for r in mine for name in r.get("fields_seen", [])}
        missing = [name for name in source.keep_fields or [] if name not in seen]
        if missing:
            raise DistilleryError(
                f"input {where}: no record has the field(s) {', '.join(missing)} named in 'keep_fields'; "
                "check their spelling"
            )


def _work_dir(cfg: CorpusBuildConfig, tasks: list[Task], store: Store) -> Path:
    plan = {"recipe": cfg.content_recipe(), "tasks": [t.key() for t in tasks]}
    digest = hashlib.sha256(canonical_json(plan).encode()).hexdigest()[:16]
    return store.name_dir("dataset", cfg.name) / f".work-{digest}"


def _runner(cfg: CorpusBuildConfig) -> Callable[[str, Callable, list[tuple]], Iterator[dict[str, Any]]]:
    """``run(label, fn, jobs)`` on the build's executor, with a progress bar per phase."""

    def run(label: str, fn: Callable, jobs: list[tuple], done: int = 0) -> Iterator[dict[str, Any]]:
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[docs]}"), TimeRemainingColumn()]  # fmt: skip
        with Progress(*columns, transient=True) as progress:
            bar = progress.add_task(f"corpus.build {label}", total=len(jobs) + done, completed=done, docs="")
            docs = 0
            if cfg.executor == "ray":
                finished = run_tasks_ray(fn, jobs, cfg.workers, cfg.ray_address, label=label)
            else:
                finished = run_tasks(fn, jobs, cfg.workers, label=label)
            for result in finished:
                docs += result.get("rows_in", 0)
                rate = docs / (progress.tasks[0].elapsed or 1e-9)
                progress.update(bar, advance=1, docs=f"{docs} docs, {rate:.0f} docs/s" if docs else "")
                yield result

    return run


def _phase1(cfg: CorpusBuildConfig, tasks: list[Task], work: Path, store: Store) -> dict[int, dict[str, Any]]:
    results: dict[int, dict[str, Any]] = {}
    todo = []
    for task in tasks:
        marker = work / f"task-{task.index:05d}.done.json"
        if marker.is_file():
            results[task.index] = json.loads(marker.read_text())
        else:
            todo.append(task)
    jobs = [(t, cfg.model_dump_json(), str(work.resolve()), str(store.root.resolve())) for t in todo]
    for result in _runner(cfg)("tasks", run_task, jobs, done=len(results)):
        results[result["index"]] = result
    return results


def _phase2(
    cfg: CorpusBuildConfig,
    tasks: list[Task],
    results: dict,
    work: Path,
    pub: Publisher,
    indexes: list[LoadedIndex],
) -> dict[str, Any]:
    """Combine task outputs in task order: unique ids, global cuts, dedup, then the filter phase."""
    parts = [(t, name) for t in tasks for name in _data_files(results[t.index])]
    inputs = [cfg.inputs[t.input_index].path or cfg.inputs[t.input_index].dataset or "" for t, _ in parts]
    cuts = [cut for step in cfg.steps if (cut := step.global_cut()) is not None]
    files = [work / name for _, name in parts]
    combiner = Combiner(files, inputs, cfg.dedup.exact, cuts, url_dedup=cfg.dedup.url, lines=cfg.dedup.lines,
                        minhash=cfg.dedup.minhash, against=indexes, work=work, run=_runner(cfg),
                        workers=cfg.workers)  # fmt: skip
    rows_out, ledger, line_ledgers = combiner.publish_rows(pub, cfg.shard_rows)
    task_ledgers = [work / results[t.index]["ledger"] for t in tasks if results[t.index]["ledger"]]
    write_ledgers(pub, task_ledgers + line_ledgers, ledger)
    removed, changed = global_counts(ledger)
    for path in line_ledgers:
        more_removed, more_changed = global_counts(pq.read_table(path, columns=["step", "action"]))
        removed.update(more_removed)
        changed.update(more_changed)
    return _funnel(cfg, results, removed, changed, rows_out, pub.store)


_STANDARD_STATS = {"rows_in", "rows_out", "changed", "seconds", "reasons", "changes"}


def _funnel(
    cfg: CorpusBuildConfig, results: dict, removed: Counter, changed: Counter, rows_out: int, store: Store
) -> dict[str, Any]:
    skipped: Counter = Counter()
    steps: dict[str, StepStats] = {}
    tallies: dict[str, dict[str, Any]] = {}
    for result in results.values():
        skipped.update(result["skipped"])
        for name, stats in result["steps"].items():
            steps.setdefault(name, StepStats()).merge(StepStats.from_dict(stats))
            # Step-specific tallies (PII findings per type, contamination per benchmark) are summed.
            for key, value in stats.items():
                if key not in _STANDARD_STATS and isinstance(value, dict):
                    per_step = tallies.setdefault(name, {})
                    per_step[key] = _add_tally(per_step.get(key, {}), value)
    rows_read = sum(r["rows_in"] for r in results.values())
    funnel = [
        {"step": "read", "in": rows_read + sum(skipped.values()), "out": rows_read, "removed": dict(skipped)}
    ]
    for name, stats in steps.items():
        funnel.append({"step": name, "in": stats.rows_in, "out": stats.rows_out, "changed": stats.changed,
                       "removed": dict(sorted(stats.reasons.items())), "changes": dict(sorted(stats.changes.items())),
                       "seconds": round(stats.seconds, 3)} | tallies.get(name, {}))  # fmt: skip
    remaining = funnel[-1]["out"]
    for step in cfg.steps:
        if (cut := step.global_cut()) is not None:
            column, _, reason = cut
            dropped = removed.get(column, 0)
            funnel.append({"step": f"{column} (top fraction)", "in": remaining, "out": remaining - dropped,
                           "removed": {reason: dropped} if dropped else {}})  # fmt: skip
            remaining -= dropped
    if cfg.dedup.url:
        dropped = removed.get("url_dedup", 0)
        funnel.append({"step": "url_dedup", "in": remaining, "out": remaining - dropped,
                       "removed": {"duplicate_url": dropped} if dropped else {}})  # fmt: skip
        remaining -= dropped
    if cfg.dedup.exact:
        dropped = removed.get("exact_dedup", 0)
        funnel.append({"step": "exact_dedup", "in": remaining, "out": remaining - dropped,
                       "removed": {"exact_duplicate": dropped} if dropped else {}})  # fmt: skip
        remaining -= dropped
    if cfg.dedup.minhash is not None:
        dropped = removed.get("minhash_dedup", 0)
        funnel.append({"step": "minhash_dedup", "in": remaining, "out": remaining - dropped,
                       "removed": {"near_duplicate": dropped} if dropped else {}})  # fmt: skip
        remaining -= dropped
    if cfg.dedup.lines is not None:
        dropped = removed.get("line_dedup", 0)
        funnel.append({"step": "line_dedup", "in": remaining, "out": remaining - dropped,
                       "changed": changed.get("line_dedup", 0),
                       "removed": {"all_units_repeated": dropped} if dropped else {}})  # fmt: skip
    stats: dict[str, Any] = {
        "rows_in": funnel[0]["in"],
        "rows_out": rows_out,
        "tasks": len(results),
        "funnel": funnel,
    }
    pii: dict = {}
    for per_step in tallies.values():
        pii = _add_tally(pii, per_step.get("pii_counts", {}))
    if pii:
        stats["pii"] = pii
    for step in cfg.steps:
        if isinstance(step, DecontaminateConfig) and "contamination" in tallies.get("decontaminate", {}):
            stats["contamination"] = step.report(tallies["decontaminate"]["contamination"], store)
    return stats


def _add_tally(total: dict, more: dict) -> dict:
    """Sum nested count dictionaries; keys sorted, so the result never depends on task order."""
    out = dict(total)
    for key, value in more.items():
        out[key] = _add_tally(out.get(key, {}), value) if isinstance(value, dict) else out.get(key, 0) + value
    return dict(sorted(out.items()))


def _roles(parents: list[Manifest]) -> dict[str, str]:
    """Why each run is a parent: a dedup index, or a model a step used (datasets are inputs)."""
    return {m.id: "dedup_index" if m.producer.stage == "corpus.dedup-index" else "step_model"
            for m in parents if m.kind == "run"}  # fmt: skip


def build(cfg: CorpusBuildConfig, store: Store) -> Manifest:
    use_returning_memory_pool()
    parents = []
    for source in cfg.inputs:
        if source.dataset is not None:
            # Pinned: the dataset's id (and a rerun) then depend on exactly this version of the input.
            manifest = store.resolve(source.dataset, kind="dataset")
            source.dataset = f"{manifest.name}@{manifest.id}"
            parents.append(manifest)
    parents += [m for step in cfg.steps for m in step.prepare(store)]
    indexes = []
    for i, ref in enumerate(cfg.dedup.against):
        manifest = store.resolve(ref, kind="run")
        indexes.append(
            LoadedIndex(manifest, cfg.dedup.case_fold, cfg.dedup.minhash, cfg.dedup.normalize)
        )  # settings checked before any work
        cfg.dedup.against[i] = f"{manifest.name}@{manifest.id}"
        parents.append(manifest)
    tasks = plan_tasks(cfg.inputs, store, cfg.split_bytes)
    work = _work_dir(cfg, tasks, store)
    claim_work_folder(work)
    try:
        results = _phase1(cfg, tasks, work, store)
        _check_inputs_read(cfg, tasks, results)
        with Publisher(store, kind="dataset", name=cfg.name, stage="corpus.build", recipe=cfg.content_recipe(),
                       parents=parents, parent_roles=_roles(parents),
                       seed=cfg.seed, execution={k: getattr(cfg, k) for k in sorted(EXECUTION_FIELDS)}) as pub:  # fmt: skip
            stats = _phase2(cfg, tasks, results, work, pub, indexes)
            if stats["rows_out"] == 0:
                raise DistilleryError(
                    f"{cfg.name}: every document was removed ({stats['rows_in']} read); loosen the steps?"
                )
            manifest = pub.publish(stats=stats, arrow_schema=pub.schema or RECORD_SCHEMA)
    except DistilleryError:
        # A mistake in the input or recipe: fixing it changes the plan, so this work cannot be resumed.
        # (A crash or kill keeps the folder: the same command resumes from the finished tasks.)
        shutil.rmtree(work, ignore_errors=True)
        store.remove_name_if_empty("dataset", cfg.name)
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
