"""Running a synth task: dataset rows in, teacher requests through the engine, rows out.

A task (``synth/generate.py`` and its siblings) is a small class that turns one input row into
requests and the answers into output rows; everything else is here, written once: reading and
checking the input, the engine and its cache, the cost estimate and the budget, progress, the
per-row lineage columns, splits by prompt, the ledger of what was dropped, and publishing.

Every output row names the records it was made from: ``parents`` (record ids of the input dataset)
or, for records read from a JSONL/Parquet file, ``source`` (the file, its sha256, the line or row),
so ``manifests trace`` ends at the file and line whichever task made the row. And it carries
``requests``: one entry per teacher request it was made from::

    {"key": "9c41…", "teacher": "smollm2", "endpoint": "serve:0f348e65…", "served_model": "smollm2-135m-instruct",
     "system_fingerprint": "fp_0f348e65c684", "sampling": "{\\"max_tokens\\":48,…}", "seed": 0, "attempts": 1,
     "finish_reason": "stop", "prompt_tokens": 161, "completion_tokens": 31, "cost": 0.0, "cache_hit": false}
"""

from __future__ import annotations

import asyncio
import math
import re
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from manifests.console import make_console
from manifests.errors import DistilleryError, RunFailed
from manifests.hashing import canonical_json, record_id
from manifests.model_runs import require_causal_lm
from manifests.publish import Publisher
from manifests.recipes import Name, RecipeConfig
from manifests.records import SOURCE_TYPE, assign_splits
from manifests.schema import Manifest
from manifests.store import Store
from synth.cache import RequestCache
from synth.engine import TeacherEngine, gather_all
from synth.inputs import read_input
from synth.teacher_requests import Answer, BudgetConfig, Request, RunStopped, SamplingConfig, TeacherConfig

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
LINEAGE = pa.struct(
    [("key", pa.string()), ("teacher", pa.string()), ("endpoint", pa.string()), ("served_model", pa.string()),
     ("system_fingerprint", pa.string()), ("sampling", pa.string()), ("seed", pa.int64()), ("attempts", pa.int32()),
     ("finish_reason", pa.string()), ("prompt_tokens", pa.int32()), ("completion_tokens", pa.int32()),
     ("cost", pa.float64()), ("cache_hit", pa.bool_())]
)  # fmt: skip
COMMON = [("id", pa.string()), ("parents", pa.list_(pa.string())), ("source", SOURCE_TYPE)]
TRAILING = [("requests", pa.list_(LINEAGE)), ("verdict", pa.string())]
CACHE_FILE = "cache/synth.sqlite"


class SynthConfig(RecipeConfig):
    """What every synth task shares: input, teachers, sampling, budget, splits."""

    name: Name
    """Name of the output dataset."""
    input: str
    """Reference of the input dataset."""
    teachers: list[TeacherConfig] = Field(min_length=1)
    """One or more teachers (OpenAI-compatible endpoints, or store checkpoints served for the run)."""
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    limit: int | None = Field(default=None, ge=1)
    """Use at most this many input rows (the first by record id: a deterministic pick)."""
    splits: dict[str, float] = Field(default_factory=lambda: {"train": 1.0})
    """Split shares (e.g. ``{train: 0.8, test: 0.2}``), decided per prompt so that a prompt's rows stay together."""
    seed: int = 0
    """Seed of the split assignment."""
    rows_in_flight: int = Field(default=256, ge=1)
    """Input rows worked on at once (bounds memory; the teachers' concurrency limits requests)."""
    keep_columns: list[str] = Field(default_factory=list)
    """Input columns every output row carries as they are -- a score to order training by (``synth mine``'s
    ``mine_score``: ``curriculum: {by: mine_score}``), a domain; a row made from several takes the first's."""

    @field_validator("splits")
    @classmethod
    def _sums_to_one(cls, v: dict[str, float]) -> dict[str, float]:
        if not v or any(x < 0 for x in v.values()) or not math.isclose(sum(v.values()), 1.0, abs_tol=1e-6):
            raise ValueError("split shares must be non-negative and sum to 1")
        return v


class NoOutputRows(RunFailed):
    """Every input row was dropped: the task ran, and nothing is left to publish."""


@dataclass
class Output:
    """One output row: the task's own columns, the answers it was made from, its split group."""

    columns: dict[str, Any]
    answers: list[Answer]
    parents: list[str]
    group: str
    verdict: str | None = None


@dataclass
class Dropped:
    """An input row (or one of its samples) that gave no output row, and why."""

    parent: str
    reason: str
    detail: dict[str, Any] = field(default_factory=dict)
    answers: list[Answer] = field(default_factory=list)
    score: float | None = None
    """The ledger's ``score``: the measure the drop was decided on, where there is one."""


class SynthTask:
    """Turns one input row into requests and their answers into ``Output`` rows (or ``Dropped``)."""

    stage: ClassVar[str]
    required: ClassVar[list[str]] = ["id"]
    """Input columns the task reads."""
    columns: ClassVar[list[tuple[str, pa.DataType]]] = []
    """The task's own output columns (between ``id, parents, source`` and ``requests, verdict``)."""

    def __init__(self, cfg: SynthConfig, engine: TeacherEngine):
        self.cfg, self.engine = cfg, engine
        self.progress: Callable[[int, int], None] = lambda done, total: None
        """Set by the runner: ``progress(done, total)`` moves the progress bar."""

    def first_requests(self, row: dict[str, Any]) -> list[Request]:
        """The requests a row starts with (for the cost estimate before the run)."""
        return []

    def initial_requests(self, rows: list[dict[str, Any]]) -> list[Request]:
        """The requests the run starts with, for the cost estimate (every row's ``first_requests``)."""
        return [r for row in rows for r in self.first_requests(row)]

    async def run(self, row: dict[str, Any]) -> list[Output | Dropped]:
        """One row's outputs. A task defines this, unless its rows depend on each other and it
        overrides ``run_all`` instead (Self-Instruct)."""
        raise NotImplementedError(f"{type(self).__name__} defines neither run nor run_all")

    async def run_all(self, rows: list[dict[str, Any]]) -> list[list[Output | Dropped]]:
        """Every row's results. Rows are independent by default: ``run`` on each, ``rows_in_flight`` at
        a time. A task whose rows depend on each other (Self-Instruct grows one pool round by round)
        overrides this. Every row finishes -- so requests in flight are answered and cached -- before
        the first error is raised."""
        # A batch teacher gathers the requests of every row in flight into one batch: all rows then,
        # or a large run becomes many batches one after another (each may take hours).
        batch = any(t.batch for t in self.cfg.teachers)
        limit = asyncio.Semaphore(len(rows) if batch else self.cfg.rows_in_flight)
        done = 0

        async def one(row: dict[str, Any]) -> list[Output | Dropped]:
            nonlocal done
            async with limit:
                result = await self.run(row)
            done += 1
            self.progress(done, len(rows))
            return result

        return await gather_all(*(one(r) for r in rows))

    @classmethod
    def input_columns(cls, cfg: SynthConfig) -> list[str]:
        """The input columns to read (``required``, unless the recipe names them)."""
        return cls.required

    @classmethod
    def output_columns(
        cls, cfg: SynthConfig, input_schema: pa.Schema | None = None
    ) -> list[tuple[str, pa.DataType]]:
        """The task's own output columns (``columns``, unless the recipe changes them); a task that
        carries input columns through takes their types from ``input_schema``."""
        return cls.columns

    @classmethod
    def schema(cls, cfg: SynthConfig | None = None, input_schema: pa.Schema | None = None) -> pa.Schema:
        own = cls.columns if cfg is None else cls.output_columns(cfg, input_schema)
        kept = []
        if cfg is not None and input_schema is not None:
            taken = {name for name, _ in COMMON + own + TRAILING}
            clash = [c for c in cls.kept(cfg) if c in taken]
            if clash:
                raise DistilleryError(
                    f"keep_columns: {', '.join(clash)} {'is' if len(clash) == 1 else 'are'} already an output column "
                    f"of {cls.stage}; keep another column, or rename it in the input"
                )
            kept = [(c, input_schema.field(c).type) for c in cls.kept(cfg)]
        return pa.schema(COMMON + own + kept + TRAILING)

    @classmethod
    def carried(cls, cfg: SynthConfig) -> list[str]:
        """Input columns the task's rows already carry as they are (``keep_columns`` naming one is satisfied)."""
        return []

    @classmethod
    def kept(cls, cfg: SynthConfig) -> list[str]:
        """The ``keep_columns`` the runner adds (those the task does not already carry)."""
        return [c for c in cfg.keep_columns if c not in cls.carried(cfg)]

    @classmethod
    def lineage_parents(cls, cfg: SynthConfig, store: Store) -> dict[str, Manifest]:
        """Manifests besides the input and the served teachers that the output is made from, by role
        (mining's student run)."""
        return {}

    @classmethod
    def extra_stats(cls, cfg: SynthConfig, outputs: list[Output], dropped: list[Dropped]) -> dict[str, Any]:
        """The task's own numbers for the manifest's stats."""
        return {}


def fill(template: str, **values: str) -> str:
    """``template`` with each ``{name}`` replaced by its value, in one pass: what goes in (a prompt, an
    answer) is never searched for placeholders again, so a candidate that contains ``{b}`` reaches
    the judge as written rather than with the other candidate pasted into it."""
    return re.sub(r"\{(" + "|".join(map(re.escape, values)) + r")\}", lambda m: values[m.group(1)], template)


def row_id(stage: str, output: Output) -> str:
    """The id of an output row: a hash of its parents, the answers it was made from and its columns."""
    return record_id(stage, *output.parents, *(a.key for a in output.answers), canonical_json(output.columns))


def lineage(answer: Answer) -> dict[str, Any]:
    seed = answer.sampling.get("seed")
    return {"key": answer.key, "teacher": answer.teacher, "endpoint": answer.endpoint,
            "served_model": answer.served_model, "system_fingerprint": answer.system_fingerprint,
            "sampling": canonical_json(answer.sampling), "seed": seed, "attempts": answer.attempts,
            "finish_reason": answer.finish_reason, "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens, "cost": answer.cost, "cache_hit": answer.cache_hit}  # fmt: skip


def _progress_text(engine: TeacherEngine, started: float, done: int, total: int) -> str:
    u = engine.usage
    elapsed = max(time.monotonic() - started, 1e-9)
    projected = u.cost / done * total if done else 0.0
    return (f"{u.answered / elapsed:.1f} req/s  {u.completion_tokens / elapsed:.0f} tok/s  "
            f"cost {u.cost:.4f} (projected {projected:.4f})  cached {u.cache_hits}  retries {u.retries}  failed {u.failed}")  # fmt: skip


async def _run_rows(
    task_cls: type[SynthTask], cfg: SynthConfig, store: Store, rows: list[dict], cache: RequestCache
):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = make_console()
    async with TeacherEngine(cfg.teachers, cache, store, cfg.budget) as engine:
        task = task_cls(cfg, engine)
        cost, tokens = engine.estimate(task.initial_requests(rows))
        console.print(f"{task_cls.stage}: {len(rows)} input rows; first requests not yet cached cost at most "
                      f"{cost:.4f} ({tokens} tokens, every answer at max_tokens)")  # fmt: skip
        if cfg.budget.max_cost is not None and cost > cfg.budget.max_cost:
            console.print(
                f"[yellow]the estimate passes budget.max_cost ({cfg.budget.max_cost}): the run may stop there"
            )
        started, done, total = time.monotonic(), 0, len(rows)
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeRemainingColumn()]  # fmt: skip
        with Progress(*columns, console=console, transient=True) as progress:
            bar = progress.add_task(task_cls.stage, total=total, info="")

            def refresh() -> None:
                progress.update(
                    bar, completed=done, total=total, info=_progress_text(engine, started, done, total)
                )

            def advance(done_now: int, total_now: int) -> None:
                nonlocal done, total
                done, total = done_now, total_now
                refresh()

            engine.on_progress, task.progress = refresh, advance
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, engine.stop)
            stopped = False
            try:
                results = await task.run_all(rows)
            except RunStopped:
                stopped = True
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
        if stopped:
            u = engine.usage
            what = (
                "budget reached" if engine.stopped == "budget" else "interrupted"
            ) + f" after {u.answered} answers"
            fix = (
                "raise 'budget' and run again" if engine.stopped == "budget" else "run the same command again"
            )
            raise RunFailed(
                f"{cfg.name}: {what} (cost {u.cost:.4f}, {u.prompt_tokens + u.completion_tokens} tokens); every "
                f"answer so far is cached in {cache.path} -- {fix} to continue without paying twice",
                exit_code=1 if engine.stopped == "budget" else 130,
            )
        return results, engine.usage


def _served_model(teacher: TeacherConfig, store: Store) -> Manifest:
    """The run a ``{serve: …}`` teacher names, checked to be a causal LM before anything is paid for."""
    run = store.resolve(teacher.serve, kind="run")
    try:
        return require_causal_lm(run, store)
    except DistilleryError as e:
        raise DistilleryError(f"teacher {teacher.label} (serve: {teacher.serve}): {e}") from None


def run_synth(task_cls: type[SynthTask], cfg: SynthConfig, store: Store) -> Manifest:
    """Read the input, run the task over every row through the engine, publish rows + ledger."""
    wanted = list(dict.fromkeys([*task_cls.input_columns(cfg), *cfg.keep_columns]))
    source = read_input(cfg.input, store, wanted, f"{task_cls.stage} input")
    table = source.table.take(pc.sort_indices(source.table, sort_keys=[("id", "ascending")]))
    if cfg.limit:
        table = table.slice(0, cfg.limit)
    if table.num_rows == 0:
        raise DistilleryError(f"{source.label} has no rows to make prompts from")
    schema = task_cls.schema(cfg, source.table.schema)  # a kept column that clashes fails before any request
    served = [_served_model(t, store) for t in cfg.teachers if t.serve is not None]
    extra = task_cls.lineage_parents(cfg, store)
    roles = {m.id: "teacher" for m in served} | {m.id: role for role, m in extra.items()}
    made_from = list({m.id: m for m in [*source.parents, *served, *extra.values()]}.values())
    cache = RequestCache(store.root / CACHE_FILE)
    try:
        results, usage = asyncio.run(_run_rows(task_cls, cfg, store, table.to_pylist(), cache))
    finally:
        cache.close()
    outputs = [o for result in results for o in result if isinstance(o, Output)]
    dropped = [o for result in results for o in result if isinstance(o, Dropped)]
    if not outputs:
        reasons = sorted({f"{d.reason}: {d.detail.get('error', '')}".rstrip(": ") for d in dropped})
        raise NoOutputRows(
            f"{cfg.name}: no output row from {table.num_rows} input rows ({'; '.join(reasons[:3])})"
        )
    inputs = (
        {r["id"]: r for r in table.select(["id", *task_cls.kept(cfg)]).to_pylist()}
        if task_cls.kept(cfg)
        else {}
    )
    rows = []
    for o in outputs:
        parents, file_source = source.lineage(o.parents)
        first = inputs.get(o.parents[0], {}) if o.parents else {}
        kept = {c: first.get(c) for c in task_cls.kept(cfg)}
        rows.append({"id": row_id(task_cls.stage, o), "parents": parents, "source": file_source, **o.columns, **kept,
                     "requests": [lineage(a) for a in o.answers], "verdict": o.verdict, "_group": o.group})  # fmt: skip
    groups = sorted({r["_group"] for r in rows})
    split_of = dict(zip(groups, assign_splits(groups, cfg.splits, cfg.seed), strict=True))
    by_split: dict[str, list[dict]] = {}
    for r in rows:
        by_split.setdefault(split_of[r.pop("_group")], []).append(r)
    recipe = cfg.resolved() | source.recipe
    with Publisher(store, kind="dataset", name=cfg.name, stage=task_cls.stage, recipe=recipe,
                   parents=made_from, parent_roles=roles, seed=cfg.seed) as pub:  # fmt: skip
        for split, split_rows in sorted(by_split.items()):
            pub.write_table(pa.Table.from_pylist(split_rows, schema=schema), split=split)
        pub.write_ledger(
            [{"id": d.parent, "step": task_cls.stage, "action": "drop", "reason": d.reason, "score": d.score,
              "detail": canonical_json(d.detail | {"requests": [a.key for a in d.answers]}
                                       | ({"source": p} if (p := source.pointer(d.parent)) else {}))}
             for d in dropped],
            step=task_cls.stage,
        )  # fmt: skip
        answers = list({a.key: a for o in outputs for a in o.answers}.values())  # rows may share an answer
        stats = {
            "input_rows": table.num_rows,
            "rows_out": len(rows),
            "rows_per_split": {k: len(v) for k, v in sorted(by_split.items())},
            "dropped": dict(sorted(Counter(d.reason for d in dropped).items())),
            "requests": {"sent": usage.sent, "answered": usage.answered, "cache_hits": usage.cache_hits,
                         "failed": usage.failed, "retries": usage.retries, "rate_limited": usage.rate_limited},
            "tokens_this_run": {"prompt": usage.prompt_tokens, "completion": usage.completion_tokens},
            "cost_this_run": round(usage.cost, 6),
            "cost_of_rows": round(sum(a.cost for a in answers), 6),
            "finish_reasons": dict(sorted(Counter(str(a.finish_reason) for a in answers).items())),
        } | task_cls.extra_stats(cfg, outputs, dropped)  # fmt: skip
        return pub.publish(stats=stats, arrow_schema=schema)
