"""``synth.loop``: mine → teacher → train → eval, round after round, each step a manifest of its own.

    stage: synth.loop
    name: arith
    student: demo-student                   # round 1 mines with it and trains from it
    candidates: examples/sample/math-qa.jsonl
    rounds: 3
    mine: {scores: {pass_at_k: 1}, samples: 4, verify: {method: numeric}, select: {teacher_tokens: 4000}}
    teacher: {stage: synth.cot, teachers: [{base_url: …, model: …}], verify: numeric}
    train: {method: sft, max_steps: 30, peft: {method: lora}}
    eval: {tasks: [{name: heldout, dataset: {ref: arith-test}, metrics: [exact_match]}]}
    metric: {task: heldout, name: exact_match}
    stop: {teacher_tokens: 20000, min_gain: 0.01}

Round r runs, through each stage's own recipe (the blocks above with the loop's fields filled in):

1. ``synth.mine`` ``<name>-r<r>-mined``: the candidates scored by the newest student (round 1: ``student``),
   sampled from it in process; the candidates of earlier rounds' mined datasets are excluded;
2. the teacher stage (``synth.cot``, ``synth.generate``…) ``<name>-r<r>-teacher`` on the mined rows;
   With ``reweight: true``, from round 2 each stratum's share of the teacher budget is the previous round's
   mean mining score there over their sum (the ``mixture_weights`` of its stats: where the student is
   weakest gets most), recorded in the round's mine recipe and the loop's row;
3. ``train`` ``<name>-r<r>``: by default from ``student`` on every round's teacher data so far
   (``base: last`` continues from the previous round's run, ``train_on: new`` uses this round's only);
4. ``eval`` ``<name>-r<r>-eval`` of that run (and ``<name>-r0-eval`` of ``student`` once, the baseline).

It stops after ``rounds``, once the teacher data has cost ``stop.teacher_tokens`` (prompt + completion
tokens of every request behind it, counted from the request cache), when a round gains less than
``stop.min_gain`` on the metric, or when mining keeps nothing. Every finished step is written to a
journal in the store (``loops/<name>/<recipe hash>.json``), so a killed loop started again skips what
is done, and the step it was in pays no teacher request twice (the engine's cache) and resumes its
training from the last checkpoint. At the end the loop publishes one dataset, ``<name>``, a row per
round (its manifests, metric, gain, teacher tokens, why it stopped), whose parents are every step.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from manifests.console import make_console
from manifests.data import read_table
from manifests.errors import DistilleryError
from manifests.hashing import canonical_json, record_id
from manifests.publish import Publisher
from manifests.recipes import Name, RecipeConfig, parse_config
from manifests.schema import Manifest
from manifests.store import Store
from synth.mine import NothingToMine
from synth.runner import NoOutputRows

TEACHER_STAGES = ("synth.cot", "synth.generate", "synth.preferences", "synth.augment")
FILLED = {
    "mine": ("name", "input", "student", "exclude"),
    "teacher": ("name", "input"),
    "train": ("name", "model", "datasets", "resume"),
    "eval": ("name", "models"),
}
"""The fields of each step's recipe that the loop sets (a block that sets them is refused)."""


class Metric(RecipeConfig):
    task: str
    name: str
    higher_is_better: bool = True


class LoopStop(RecipeConfig):
    teacher_tokens: int | None = Field(default=None, ge=1)
    """Start no round once the teacher data has cost this many tokens."""
    min_gain: float | None = None
    """With ``eval``: stop when a round improves the metric by less than this."""


class LoopConfig(RecipeConfig):
    """Rounds of mining, teacher data and training (see the module docstring)."""

    name: Name
    student: str
    """The starting student: a run (full checkpoint or adapter)."""
    candidates: str
    """The candidate prompts: a dataset or a JSONL/Parquet file, mined every round."""
    rounds: int = Field(default=2, ge=1)
    mine: dict[str, Any]
    """A ``synth.mine`` recipe without name, input, student and exclude (the student is sampled in process)."""
    teacher: dict[str, Any]
    """A teacher stage's recipe (``stage:`` one of synth.cot, synth.generate, …) without name and input."""
    train: dict[str, Any]
    """A ``train`` recipe (``method:``…) without name, model and datasets."""
    eval: dict[str, Any] | None = None
    """An ``eval`` recipe without name and models; with ``metric``."""
    metric: Metric | None = None
    base: Literal["start", "last"] = "start"
    """Train every round from ``student`` (default) or from the previous round's run."""
    train_on: Literal["all", "new"] = "all"
    """Every round's teacher data so far (default), or this round's only."""
    split: str = "train"
    """The teacher data's split to train on."""
    reweight: bool = False
    """From round 2, share the teacher budget among the strata (``mine.select.stratify_by``) by the
    previous round's per-stratum mining scores -- the student's weakness there -- instead of by size."""
    stop: LoopStop = Field(default_factory=LoopStop)

    @model_validator(mode="after")
    def _blocks(self) -> LoopConfig:
        for block in ("mine", "teacher", "train", "eval"):
            given = set(getattr(self, block) or {}) & set(FILLED[block])
            if given:
                raise ValueError(f"'{block}' must not set {', '.join(sorted(given))}: the loop fills it in")
        if self.mine.get("sampler") not in (None, "in_process"):
            raise ValueError(
                "mine.sampler: the student changes every round, so the loop samples it in process; an endpoint "
                "would go on serving the first student"
            )
        if self.teacher.get("stage") not in TEACHER_STAGES:
            raise ValueError(f"'teacher' needs 'stage': one of {', '.join(TEACHER_STAGES)}")
        if (self.eval is None) != (self.metric is None):
            raise ValueError(
                "'eval' and 'metric' go together: the metric names a task and a metric of the eval"
            )
        if self.reweight and not (self.mine.get("select") or {}).get("stratify_by"):
            raise ValueError("'reweight' shares the budget among strata: set mine.select.stratify_by")
        if self.stop.min_gain is not None and self.eval is None:
            raise ValueError("'stop.min_gain' needs 'eval' and 'metric' (the gain is measured there)")
        return self


class Journal:
    """The loop's finished steps, by key (``r2/teacher``), in one JSON file replaced atomically."""

    def __init__(self, path: Path):
        self.path = path
        self.steps: dict[str, dict[str, Any]] = {}
        if path.is_file():
            try:
                self.steps = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise DistilleryError(
                    f"loop journal {path} is damaged ({e}); remove it and run again: finished steps are found "
                    "again by their manifests' content, and no teacher request is paid twice (the cache)"
                ) from None
            if not isinstance(self.steps, dict):
                raise DistilleryError(f"loop journal {path} is not a JSON object; remove it and run again")

    def get(self, key: str) -> dict[str, Any] | None:
        return self.steps.get(key)

    def mark(self, key: str, entry: dict[str, Any]) -> None:
        self.steps[key] = entry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(self.steps, indent=1, sort_keys=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


class Loop:
    def __init__(self, cfg: LoopConfig, store: Store):
        from manifests.stages import stage_table

        self.cfg, self.store, self.stages = cfg, store, stage_table()
        self.console = make_console()
        self.journal: Journal | None = None

    def open_journal(self, start: Manifest) -> Journal:
        """The journal of this recipe on these inputs: another candidates file, or another version of the
        student under the same name, starts a journal of its own."""
        inputs = {"recipe": self.cfg.resolved(), "student": start.id,
                  "candidates": candidates_version(self.cfg.candidates, self.store)}  # fmt: skip
        digest = hashlib.sha256(canonical_json(inputs).encode()).hexdigest()[:16]
        return Journal(self.store.root / "loops" / self.cfg.name / f"{digest}.json")

    # ------------------------------------------------------------------ the steps' recipes

    def mine_recipe(self, r: int, student: str, mined: list[str], weights: dict[str, float] | None = None):
        data = {"stage": "synth.mine", **copy.deepcopy(self.cfg.mine), "name": f"{self.cfg.name}-r{r}-mined",
                "input": self.cfg.candidates, "student": student, "exclude": mined}  # fmt: skip
        if weights:  # the previous round's gaps decide this round's shares
            data["select"] = data["select"] | {"strata": "weights", "stratum_weights": weights}
        return data

    def teacher_recipe(self, r: int, mined: str) -> dict[str, Any]:
        return {**copy.deepcopy(self.cfg.teacher), "name": f"{self.cfg.name}-r{r}-teacher", "input": mined}

    def train_recipe(self, r: int, base: str, data: list[str]) -> dict[str, Any]:
        return {"stage": "train", **copy.deepcopy(self.cfg.train), "name": f"{self.cfg.name}-r{r}", "model": base,
                "datasets": [{"ref": d, "split": self.cfg.split} for d in data]}  # fmt: skip

    def eval_recipe(self, r: int, run: str) -> dict[str, Any]:
        return {
            "stage": "eval",
            **copy.deepcopy(self.cfg.eval),
            "name": f"{self.cfg.name}-r{r}-eval",
            "models": [run],
        }

    def check_recipes(self) -> None:
        """Every step's recipe parsed once before round 1, so that a typo in a block costs nothing."""
        filled = "<filled by the loop>"
        recipes = {"mine": self.mine_recipe(1, filled, []), "teacher": self.teacher_recipe(1, filled),
                   "train": self.train_recipe(1, filled, [filled])}  # fmt: skip
        if self.cfg.eval is not None:
            recipes["eval"] = self.eval_recipe(1, filled)
        for block, data in recipes.items():
            stage = self.stages[data["stage"]]
            parse_config(
                stage.config_class(data, f"{self.cfg.name} '{block}'"), data, f"{self.cfg.name} '{block}'"
            )

    def step(self, key: str, data: dict[str, Any]) -> Manifest:
        """Run one step, or find it in the journal."""
        done = self.journal.get(key)
        if done and done.get("id"):
            try:
                manifest = self.store.resolve(done["ref"])
                if manifest.id == done["id"]:
                    self.console.print(f"{key}: done before ({manifest.ref})")
                    return manifest
            except DistilleryError:
                pass  # removed since: run it again (the cache still holds its answers)
        if data["stage"] == "train" and done and done.get("started"):
            data = data | {"resume": True}
        self.journal.mark(key, {"started": True})
        self.console.print(f"{key}: {data['stage']} {data['name']}")
        manifest = self.stages[data["stage"]].runner()(
            data, store=self.store, source=f"{self.cfg.name} {key}"
        )
        self.journal.mark(key, {"id": manifest.id, "ref": manifest.ref})
        return manifest

    # ------------------------------------------------------------------ the rounds

    def run(self) -> Manifest:
        cfg = self.cfg
        self.check_recipes()
        start = self.store.resolve(cfg.student, kind="run")
        self.journal = self.open_journal(start)
        rows: list[dict[str, Any]] = []
        parents: dict[str, tuple[Manifest, str]] = {start.id: (start, "student")}
        before = None
        if cfg.eval is not None:
            baseline = self.step("r0/eval", self.eval_recipe(0, start.ref))
            parents[baseline.id] = (baseline, "eval")
            before = metric_value(baseline, cfg.metric)
        student, mined, data, spent, why = start, [], [], 0, f"{cfg.rounds} rounds done"
        for r in range(1, cfg.rounds + 1):
            if cfg.stop.teacher_tokens is not None and spent >= cfg.stop.teacher_tokens:
                why = f"the teacher data cost {spent} tokens (stop.teacher_tokens {cfg.stop.teacher_tokens})"
                break
            base = student.ref if cfg.base == "last" else start.ref
            try:
                weights = mined[-1].stats["mined"]["mixture_weights"] if cfg.reweight and mined else None
                mined_now = self.step(
                    f"r{r}/mine", self.mine_recipe(r, student.ref, [m.ref for m in mined], weights)
                )
            except NothingToMine:
                why = "every candidate was mined in an earlier round"
                break
            mined.append(mined_now)
            if mined_now.stats.get("mined", {}).get("kept", 0) == 0:
                why = f"round {r} kept no candidate"
                break
            try:
                teacher = self.step(f"r{r}/teacher", self.teacher_recipe(r, mined_now.ref))
            except NoOutputRows:
                why = f"round {r}: the teacher gave no row for the {mined_now.stats['mined']['kept']} mined prompts"
                break
            data = (data if cfg.train_on == "all" else []) + [teacher.ref]
            run = self.step(f"r{r}/train", self.train_recipe(r, base, data))
            tokens = teacher_tokens(teacher, self.store)
            spent += tokens
            row = {"round": r, "strata_weights": canonical_json(weights) if weights else None, "mined": pin(mined_now), "teacher_data": pin(teacher), "run": pin(run), "eval": None,
                   "kept": mined_now.stats["mined"]["kept"], "teacher_tokens": tokens, "metric": None, "gain": None}  # fmt: skip
            for m, role in ((mined_now, "mined"), (teacher, "teacher_data"), (run, "run")):
                parents[m.id] = (m, role)
            student = run
            if cfg.eval is not None:
                evaluated = self.step(f"r{r}/eval", self.eval_recipe(r, run.ref))
                parents[evaluated.id] = (evaluated, "eval")
                value = metric_value(evaluated, cfg.metric)
                gain = (value - before) * (1 if cfg.metric.higher_is_better else -1)
                row |= {"eval": pin(evaluated), "metric": value, "gain": gain}
                before = value
            rows.append(row)
            self.console.print(f"round {r}: kept {row['kept']}, teacher tokens {tokens}, run {run.ref}"
                               + (f", {cfg.metric.name} {row['metric']:.4f} (gain {row['gain']:+.4f})" if cfg.eval else ""))  # fmt: skip
            if cfg.stop.min_gain is not None and row["gain"] < cfg.stop.min_gain:
                why = f"round {r} gained {row['gain']:+.4f} < stop.min_gain {cfg.stop.min_gain}"
                break
        if not rows:
            raise DistilleryError(f"{cfg.name}: no round finished ({why})")
        return self.publish(rows, parents, spent, why)

    def publish(self, rows, parents, spent: int, why: str) -> Manifest:
        cfg = self.cfg
        schema = pa.schema([("id", pa.string()), ("round", pa.int64()), ("strata_weights", pa.string()), ("mined", pa.string()),
                            ("teacher_data", pa.string()), ("run", pa.string()), ("eval", pa.string()),
                            ("kept", pa.int64()), ("teacher_tokens", pa.int64()), ("metric", pa.float64()),
                            ("gain", pa.float64())])  # fmt: skip
        table = pa.Table.from_pylist([{"id": record_id("synth.loop", cfg.name, r["round"]), **r} for r in rows],
                                     schema=schema)  # fmt: skip
        manifests = [m for m, _ in parents.values()]
        with Publisher(self.store, kind="dataset", name=cfg.name, stage="synth.loop", recipe=cfg.resolved(),
                       parents=manifests, parent_roles={m.id: role for m, role in parents.values()}) as pub:  # fmt: skip
            pub.write_table(table)
            stats = {"rounds": len(rows), "teacher_tokens": spent, "stopped": why, "final_run": rows[-1]["run"],
                     "metric": [r["metric"] for r in rows]}  # fmt: skip
            manifest = pub.publish(stats=stats, arrow_schema=schema)
        self.console.print(f"stopped: {why}; the last round's run: {rows[-1]['run']}")
        return manifest


def candidates_version(ref: str, store: Store) -> str:
    """What the candidates are: a file's sha256, or the dataset's manifest id."""
    from manifests.hashing import sha256_file
    from synth.inputs import is_data_file

    return sha256_file(Path(ref)) if is_data_file(ref) else store.resolve(ref, kind="dataset").id


def pin(manifest: Manifest) -> str:
    """A reference to exactly this version: ``name@<full id>``."""
    return f"{manifest.name}@{manifest.id}"


def metric_value(evaluated: Manifest, metric: Metric) -> float:
    """The metric of the one model an eval of the loop scored."""
    tasks = evaluated.stats.get("tasks", {})
    if metric.task not in tasks:
        raise DistilleryError(f"metric: the eval has no task {metric.task!r}; its tasks: {', '.join(tasks)}")
    models = list(tasks[metric.task].values())
    if not models or metric.name not in models[0]:
        have = ", ".join(models[0]) if models else "none"
        raise DistilleryError(f"metric: task {metric.task!r} has no metric {metric.name!r}; it has: {have}")
    return float(models[0][metric.name])


def teacher_tokens(manifest: Manifest, store: Store) -> int:
    """Prompt + completion tokens of every teacher request behind a synth dataset: its rows' and its ledger's
    (a question the teacher never got right cost tokens too), counted once each, from the request cache."""
    from synth.cache import RequestCache
    from synth.runner import CACHE_FILE

    keys: set[str] = set()
    for split in manifest.splits():
        for requests in (
            read_table(manifest, split=split, columns=["requests"]).column("requests").to_pylist()
        ):
            keys.update(r["key"] for r in requests or [])
    for entry in manifest.ledger:
        path = manifest.location / entry.path
        for detail in pq.read_table(path, columns=["detail"]).column("detail").to_pylist():
            keys.update(json.loads(detail or "{}").get("requests", []))
    cache = RequestCache(store.root / CACHE_FILE)
    try:
        answers = cache.get_many(sorted(keys))
    finally:
        cache.close()
    return sum(
        int(a.get("prompt_tokens") or 0) + int(a.get("completion_tokens") or 0) for a in answers.values()
    )


def loop(cfg: LoopConfig, store: Store) -> Manifest:
    return Loop(cfg, store).run()


def run_recipe(data: dict[str, Any], store: Store, source: str) -> Manifest:
    return loop(parse_config(LoopConfig, data, source), store)
