"""``stage: eval``: run tasks on models, record every sample, aggregate with intervals, publish.

    stage: eval
    name: demo-eval
    models: [student-base, demo-sft-run]
    tasks:
      - {name: heldout, dataset: {ref: demo-sft, split: test}, metrics: [perplexity]}
      - name: answers
        dataset: {ref: demo-sft, split: test}
        generation: {max_new_tokens: 48}
        metrics: [rougeL, chrf]

Publishes an eval manifest (parents: every model run, every dataset) with

- ``metrics.json``: per task and model each metric's value with its seeded bootstrap interval, and
  for every pair of models the paired difference on the same samples (b − a, with its interval) and
  the samples that flipped (right in one, wrong in the other);
- per-sample records (split ``records``): ``id``, ``parents`` (the dataset record), ``sample_id``,
  ``task``, ``model``, ``model_id``, ``prompt_sha256``, ``target_sha256``, ``outputs``,
  ``extracted``, ``correct`` and one column per metric — so ``manifests trace`` of a failed sample
  reaches the dataset record and its source.

Everything is checked before a model loads (datasets, columns, metrics, models' kinds), and nothing
is published when any part fails.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from typing import Any

import pyarrow as pa
from pydantic import Field, model_validator

from eval.contamination import (
    ContaminationConfig,
    load_contamination_index,
    overlap_with_index,
    overlap_with_training,
)
from eval.explain import ExplainConfig, TrainingIndex, by_source, index_training, nearest
from eval.judge import JudgeConfig
from eval.metrics import Metric, TextScorers, is_right
from eval.models import EndpointModel, RunModel
from eval.scoring import (
    Engines,
    Scored,
    progress_bar,
    score_agreement,
    score_generation,
    score_judge,
    score_perplexity,
    score_rewards,
)
from eval.stats import BootstrapSettings, interval, paired_difference
from eval.tasks import Sample, TaskConfig, TaskData, load_samples
from manifests.errors import DistilleryError
from manifests.hashing import canonical_json, record_id
from manifests.model_runs import require_causal_lm, require_sequence_classifier
from manifests.publish import Publisher
from manifests.recipes import Name, RecipeConfig, parse_config
from manifests.schema import Manifest
from manifests.store import Store
from synth.teacher_requests import BudgetConfig, TeacherConfig

STAGE = "eval"


class BootstrapConfig(RecipeConfig):
    samples: int = Field(default=1000, ge=0)
    """Resamples (0: no intervals)."""
    seed: int = 0
    confidence: float = Field(default=0.95, gt=0, lt=1)


class EvalRecipe(RecipeConfig):
    """Evaluate models on tasks; every sample's result is recorded with its lineage."""

    name: Name
    models: list[str | TeacherConfig] = Field(min_length=1)
    """Run references (full checkpoints, adapters, reward models) or endpoints
    (``{name, base_url, model, api_key_env}``), labelled by the reference or the endpoint's name."""
    tasks: list[TaskConfig] = Field(min_length=1)
    judges: dict[str, JudgeConfig] = Field(default_factory=dict)
    """For ``win_rate``: judges by task name."""
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    """A cap on what endpoint models and judges may spend in this eval."""
    bootstrap: BootstrapConfig = Field(default_factory=BootstrapConfig)
    contamination: ContaminationConfig | None = None
    """Count the samples whose n-grams occur in each model's training data (or an index); metrics on the rest."""
    explain: ExplainConfig | None = None
    """For each failed sample, the nearest records of the data each model run was trained on."""

    @model_validator(mode="before")
    @classmethod
    def _single_perplexity(cls, data: Any) -> Any:
        # The first eval recipes named one dataset and scored perplexity: still read as one task.
        if isinstance(data, dict) and "dataset" in data and "tasks" not in data:
            data = dict(data)
            metric = data.pop("metric", "perplexity")
            if metric != "perplexity":
                raise ValueError(
                    f"'metric': {metric!r}: the single-dataset form scores perplexity only; for other "
                    f"metrics write 'tasks: [{{name: …, dataset: {{ref: …}}, metrics: [{metric}]}}]'"
                )
            task = {"name": "perplexity", "dataset": data.pop("dataset"), "metrics": ["perplexity"]}
            if "max_length" in data:
                task["max_length"] = data.pop("max_length")
            if "batch_size" in data:
                task["generation"] = {"batch_size": data.pop("batch_size")}
            data["tasks"] = [task]
        return data

    @model_validator(mode="after")
    def _consistent(self) -> EvalRecipe:
        labels = [model_label(m) for m in self.models]
        if len(set(labels)) != len(labels):
            raise ValueError(f"models need distinct labels, got {labels}; set 'name' on endpoints")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be distinct, got {names}")
        for task in self.tasks:
            unknown = sorted(set(task.models or []) - set(labels))
            if unknown:
                raise ValueError(
                    f"task {task.name}: models {unknown} are not among the eval's models {labels}"
                )
            if task.needs("judge"):
                judge = self.judges.get(task.name)
                if judge is None:
                    raise ValueError(
                        f"task {task.name}: win_rate needs a judge: 'judges: {{{task.name}: {{teacher: …}}}}'"
                    )
                if judge.against != "reference" and judge.against not in labels:
                    raise ValueError(
                        f"judge of {task.name}: 'against: {judge.against}' is neither 'reference' nor a model label ({labels})"
                    )
                if (
                    judge.against != "reference"
                    and task.models is not None
                    and judge.against not in task.models
                ):
                    raise ValueError(
                        f"judge of {task.name}: 'against: {judge.against}' does not run this task; add it to the task's 'models:'"
                    )
        for name in self.judges:
            if name not in names:
                raise ValueError(f"judges: no task named {name!r} (tasks: {names})")
            if not next(t for t in self.tasks if t.name == name).needs("judge"):
                raise ValueError(f"judges: task {name!r} has no win_rate metric for its judge to score")
        return self


def model_label(spec: str | TeacherConfig) -> str:
    return spec if isinstance(spec, str) else spec.label


# ---------------------------------------------------------------------------------------- the stage


def _sha(value: Any) -> str:
    text = value if isinstance(value, str) else canonical_json(value)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _aggregates(
    metrics: list[Metric],
    results: dict[str, Scored],
    run_ids: dict[str, str | None],
    settings: BootstrapSettings,
) -> dict[str, Any]:
    out: dict[str, Any] = {"models": {}, "paired": []}
    for label, scored in results.items():
        out["models"][label] = {
            "run_id": run_ids[label],
            "metrics": {m.name: interval(scored.stats[m.name], m.aggregate, settings) | {"higher_is_better": m.higher_is_better}
                        for m in metrics if m.name in scored.stats},
        }  # fmt: skip
    for a, b in itertools.combinations(results, 2):
        shared = [m for m in metrics if m.name in results[a].stats and m.name in results[b].stats]
        if not shared:
            continue
        entry: dict[str, Any] = {"a": a, "b": b, "metrics": {}}
        for m in shared:
            entry["metrics"][m.name] = paired_difference(results[a].stats[m.name], results[b].stats[m.name],
                                                         m.aggregate, settings)  # fmt: skip
        out["paired"].append(entry)
    return out


def _flips(primary: Metric, samples: list[Sample], results: dict[str, Scored], paired: list[dict]) -> None:
    if not primary.binary:
        return
    for entry in paired:
        a = results[entry["a"]].values.get(primary.name)
        b = results[entry["b"]].values.get(primary.name)
        if a is None or b is None:
            continue
        right = [(is_right(primary, x), is_right(primary, y)) for x, y in zip(a, b, strict=True)]
        entry["flipped"] = {
            "metric": primary.name,
            "a_only": [s.id for s, (x, y) in zip(samples, right, strict=True) if x and y is False],
            "b_only": [s.id for s, (x, y) in zip(samples, right, strict=True) if y and x is False],
        }


def _records(task: TaskConfig, label: str, run_id: str | None, samples: list[Sample], scored: Scored,
             primary: Metric) -> list[dict[str, Any]]:  # fmt: skip
    rows = []
    primary_values = scored.values.get(primary.name)
    for i, s in enumerate(samples):
        row = {
            "id": record_id(STAGE, task.name, run_id or label, s.id),
            "parents": [s.id],
            "sample_id": s.id,
            "task": task.name,
            "model": label,
            "model_id": run_id,
            "prompt_sha256": _sha(s.prompt),
            "target_sha256": None if s.target is None else _sha(s.target),
            "outputs": scored.outputs[i] if scored.outputs else [],
            "extracted": scored.extracted[i] if scored.extracted else [],
            "correct": is_right(primary, primary_values[i]) if primary_values else None,
        }
        for name, values in scored.values.items():
            row[name] = values[i]
        for name, values in scored.detail.items():
            row[name] = values[i]
        rows.append(row)
    return rows


def _records_table(rows: list[dict[str, Any]], metric_names: list[str]) -> pa.Table:
    fields = [
        ("id", pa.string()), ("parents", pa.list_(pa.string())), ("sample_id", pa.string()),
        ("task", pa.string()), ("model", pa.string()), ("model_id", pa.string()),
        ("prompt_sha256", pa.string()), ("target_sha256", pa.string()),
        ("outputs", pa.list_(pa.string())), ("extracted", pa.list_(pa.string())), ("correct", pa.bool_()),
    ]  # fmt: skip
    fields += [(name, pa.float64()) for name in metric_names]
    if any("judge_letters" in r for r in rows):
        fields.append(("judge_letters", pa.list_(pa.string())))
    if any("contaminated" in r for r in rows):
        fields.append(("contaminated", pa.bool_()))
    if any("nearest" in r for r in rows):
        near = pa.struct([("id", pa.string()), ("dataset", pa.string()), ("similarity", pa.float64()),
                          ("source", pa.string())])  # fmt: skip
        fields.append(("nearest", pa.list_(near)))
    schema = pa.schema(fields)
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)


def _resolve_models(cfg: EvalRecipe, store: Store) -> dict[str, Manifest | TeacherConfig]:
    """Every model checked for what its tasks need before the first loads."""
    out: dict[str, Manifest | TeacherConfig] = {}
    for spec in cfg.models:
        label = model_label(spec)
        tasks = [t for t in cfg.tasks if t.models is None or label in t.models]
        if isinstance(spec, TeacherConfig):
            out[label] = spec
            continue
        manifest = store.resolve(spec, kind="run")
        reward = [t.name for t in tasks if t.needs("reward")]
        other = [t.name for t in tasks if not t.needs("reward")]
        if reward and other:
            raise DistilleryError(
                f"model {label} runs reward tasks ({', '.join(reward)}) and generation/scoring tasks "
                f"({', '.join(other)}); give each task its 'models:'"
            )
        try:
            out[label] = (
                require_sequence_classifier(manifest) if reward else require_causal_lm(manifest, store)
            )
        except DistilleryError as e:
            raise DistilleryError(f"model {label}: {e}") from None
    return out


def _precheck(cfg: EvalRecipe, store: Store, samples: dict[str, list[Sample]],
              models: dict[str, RunModel | EndpointModel], teachers: dict[str, RunModel]) -> None:  # fmt: skip
    """What each task asks of each model, checked before any model loads or any request is paid for."""
    from eval.agreement import require_same_tokenizer
    from eval.training_data import training_datasets
    from manifests.verify import ensure_verified

    for task in cfg.tasks:
        for label in _labels(task, models):
            model = models[label]
            if isinstance(model, EndpointModel):
                if task.needs("loglikelihood") or task.needs("teacher"):
                    model.nll()  # the one error line
                if task.needs("reward"):
                    raise DistilleryError(
                        f"task {task.name}: reward_accuracy needs a reward-model run, and {label} is an endpoint"
                    )
            elif task.needs("teacher"):
                teacher = teachers[task.teacher]
                require_same_tokenizer(label, model.tokenizer(), teacher.label, teacher.tokenizer())
            if (task.needs("generation") or task.needs("judge")) and task.chat_template:
                model.require_chat_template(task.name)
            if task.needs("loglikelihood") or task.needs("teacher"):
                model.require_chat_template(task.name, scoring=True)
        if (
            task.needs("judge")
            and cfg.judges[task.name].against == "reference"
            and any(s.target is None for s in samples[task.name])
        ):
            raise DistilleryError(
                f"task {task.name}: win_rate against 'reference' needs a reference answer in every row; name the "
                "column with 'target:', or judge against another model"
            )
    # The data behind each model run that contamination or explain will read: verified now, not after
    # every model has generated.
    if (cfg.contamination and cfg.contamination.against == "training") or cfg.explain:
        for model in models.values():
            if isinstance(model, RunModel):
                for dataset in training_datasets(model.manifest, store, ancestors=bool(cfg.explain)):
                    ensure_verified(dataset)


def _labels(task: TaskConfig, models: dict[str, Any]) -> list[str]:
    """The eval's models that run ``task``, in the recipe's order."""
    return [label for label in models if task.models is None or label in task.models]


def _score_task(task: TaskConfig, samples: list[Sample], models: dict[str, RunModel | EndpointModel],
                teacher: RunModel | None, texts: TextScorers, progress) -> dict[str, Scored]:  # fmt: skip
    """Every metric of ``task`` for each of its models (the judge's verdicts come after, over all of them)."""
    results = {label: Scored() for label in _labels(task, models)}
    for label, scored in results.items():
        model = models[label]
        if isinstance(model, RunModel) and not task.needs("reward"):
            model.loaded()  # before the bar starts: its samples/s is the eval's, not the loading's
            if teacher:
                teacher.loaded()
        bar = progress.add_task(f"{task.name} · {label}", total=len(samples))
        # Each pass over the samples (rewards, likelihoods, teacher agreement, generation) is its share of the bar.
        passes = max(1, sum(map(task.needs, ("reward", "loglikelihood", "teacher")))
                     + (task.needs("generation") or task.needs("judge")))  # fmt: skip

        def advance(n: int, bar=bar, passes=passes) -> None:
            progress.advance(bar, n / passes)

        if task.needs("reward"):
            score_rewards(model, samples, scored, advance)
        if task.needs("loglikelihood"):
            score_perplexity(model, task, samples, scored, advance)
        if task.needs("teacher"):
            score_agreement(model, teacher, task, samples, scored, advance)
        if task.needs("generation") or task.needs("judge"):
            scored.outputs = model.generate(
                [s.prompt for s in samples], task.generation, task.chat_template, advance
            )
            score_generation(task, samples, scored, texts)
    return results


def _release_after(
    tasks: list[TaskConfig], models: dict[str, Any], teachers: dict[str, Any]
) -> dict[int, list]:
    """Per task index, the models and teachers no later task uses: closed after it, so that an eval of
    many models holds only those still needed."""
    last: dict[int, Any] = {}
    for i, task in enumerate(tasks):
        for label in _labels(task, models):
            last[id(models[label])] = (i, models[label])
        if task.teacher:
            last[id(teachers[task.teacher])] = (i, teachers[task.teacher])
    out: dict[int, list] = {}
    for i, model in last.values():
        out.setdefault(i, []).append(model)
    return out


def evaluate(cfg: EvalRecipe, store: Store) -> Manifest:
    task_data: dict[str, Manifest] = {}
    samples: dict[str, list[Sample]] = {}
    for task in cfg.tasks:
        task_data[task.name] = store.resolve(task.dataset.ref, kind="dataset")
        samples[task.name] = load_samples(task, task_data[task.name])
    resolved = _resolve_models(cfg, store)
    teacher_runs = {t.teacher: require_causal_lm(store.resolve(t.teacher, kind="run"), store)
                    for t in cfg.tasks if t.teacher}  # fmt: skip
    engines = Engines(store, cfg.budget)
    models: dict[str, RunModel | EndpointModel] = {}
    for label, spec in resolved.items():
        if isinstance(spec, TeacherConfig):
            models[label] = EndpointModel(label, spec, store, engines.factory(spec))
        else:
            models[label] = RunModel(label, spec, store)
    # A teacher that is also one of the models is that model, loaded once.
    by_id = {m.manifest.id: m for m in models.values() if isinstance(m, RunModel)}
    teachers = {ref: by_id.get(m.id) or RunModel(ref, m, store) for ref, m in teacher_runs.items()}
    _precheck(cfg, store, samples, models, teachers)
    index = None
    if cfg.contamination and cfg.contamination.against == "index":
        index = load_contamination_index(cfg.contamination.index, store, cfg.contamination.ngram)
    settings = BootstrapSettings(cfg.bootstrap.samples, cfg.bootstrap.seed, cfg.bootstrap.confidence)
    texts = TextScorers()
    report: dict[str, Any] = {"bootstrap": cfg.bootstrap.resolved(), "tasks": {}}
    results: dict[str, dict[str, Scored]] = {}
    indexes: dict[str, TrainingIndex] = {}
    release = _release_after(cfg.tasks, models, teachers)
    started = time.monotonic()
    with progress_bar() as progress:
        for i, task in enumerate(cfg.tasks):
            task_samples = samples[task.name]
            results[task.name] = scored = _score_task(
                task, task_samples, models, teachers.get(task.teacher), texts, progress
            )
            if task.needs("judge"):
                score_judge(cfg.judges[task.name], task, task_samples, scored, engines)
            metrics = task.metric_list
            summary = _aggregates(
                metrics, scored, {label: models[label].run_id for label in scored}, settings
            )
            _flips(task.primary, task_samples, scored, summary["paired"])
            report["tasks"][task.name] = {
                "dataset": task_data[task.name].id, "split": task.dataset.split, "samples": len(task_samples),
                "primary": task.primary.name, **summary,
            }  # fmt: skip
            if cfg.explain:
                report["tasks"][task.name]["explained"] = _explain(
                    cfg.explain, store, models, task_samples, scored, task.primary, indexes
                )
            for model in release.get(i, []):
                model.close()
    if cfg.contamination:
        found = _contamination(cfg.contamination, store, models, index, cfg.tasks, samples, results, settings)
        for task_name, entry in found.items():
            report["tasks"][task_name]["contamination"] = entry
    records = [
        row
        for task in cfg.tasks
        for label, scored in results[task.name].items()
        for row in _records(task, label, models[label].run_id, samples[task.name], scored, task.primary)
    ]
    usage = engines.requests | {"tokens": engines.spent_tokens, "cost": round(engines.spent_cost, 6)}
    return _publish(
        cfg, store, resolved, task_data, teacher_runs, report, records, time.monotonic() - started, usage
    )


def _contamination(cfg: ContaminationConfig, store: Store, models: dict[str, RunModel | EndpointModel], index,
                   tasks: list[TaskConfig], samples: dict[str, list[Sample]], results: dict[str, dict[str, Scored]],
                   settings: BootstrapSettings) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Per task and model: the overlapping samples and every metric on the clean ones. Each model's
    training data is scanned once, against the samples of all its tasks together."""
    out: dict[str, dict[str, Any]] = {task.name: {} for task in tasks}
    for label, model in models.items():
        mine = [task for task in tasks if label in results[task.name]]
        union = [s for task in mine for s in samples[task.name]]
        if index is not None:
            hit, against = overlap_with_index(index, union, cfg.ngram), [cfg.index]
        elif isinstance(model, RunModel):
            hit, against = overlap_with_training(model.manifest, store, union, cfg.ngram)
        else:
            for task in mine:
                out[task.name][label] = {"against": None, "note": "an endpoint: its training data is unknown"}
            continue
        start = 0
        for task in mine:
            task_samples = samples[task.name]
            task_hit = hit[start : start + len(task_samples)]
            start += len(task_samples)
            scored = results[task.name][label]
            scored.detail["contaminated"] = [bool(x) for x in task_hit]
            clean = ~task_hit
            out[task.name][label] = {
                "against": against, "ngram": cfg.ngram, "overlapping": int(task_hit.sum()),
                "samples": len(task_samples),
                "overlapping_ids": [s.id for s, h in zip(task_samples, task_hit, strict=True) if h],
                "clean": {m.name: interval(scored.stats[m.name][clean], m.aggregate, settings)
                          for m in task.metric_list if m.name in scored.stats},
            }  # fmt: skip
    return out


def _explain(cfg: ExplainConfig, store: Store, models: dict[str, RunModel | EndpointModel], samples: list[Sample],
             results: dict[str, Scored], primary: Metric, indexes: dict[str, TrainingIndex]) -> dict[str, Any]:  # fmt: skip
    """Per model run: each failed sample's nearest training records, and the failures by source."""
    out: dict[str, Any] = {}
    if not primary.binary:
        return out
    for label, scored in results.items():
        model = models[label]
        values = scored.values.get(primary.name)
        if not isinstance(model, RunModel) or values is None:
            continue
        failed = [i for i, v in enumerate(values) if is_right(primary, v) is False][: cfg.max_failures]
        if model.manifest.id not in indexes:
            indexes[model.manifest.id] = index_training(model.manifest, store, cfg)
        index = indexes[model.manifest.id]
        found = nearest(index, [samples[i] for i in failed], cfg)
        scored.detail["nearest"] = [None] * len(samples)
        for i, near in zip(failed, found, strict=True):
            scored.detail["nearest"][i] = near
        out[label] = {"failures": sum(1 for v in values if is_right(primary, v) is False), "explained": len(failed),
                      "datasets": index.scanned, "records_indexed": len(index.ids),
                      "by_source": by_source(index, found)}  # fmt: skip
    return out


def _publish(cfg: EvalRecipe, store: Store, resolved: dict[str, Any], task_data: dict[str, Manifest],
             teachers: dict[str, Manifest], report: dict[str, Any], records: list[dict[str, Any]],
             seconds: float, usage: dict[str, Any]) -> Manifest:  # fmt: skip
    runs = [m for m in resolved.values() if isinstance(m, Manifest)]
    datasets = list({m.id: m for m in task_data.values()}.values())
    teacher_runs = [
        m for m in {m.id: m for m in teachers.values()}.values() if m.id not in {r.id for r in runs}
    ]
    parents = [*runs, *teacher_runs, *datasets]
    roles = (
        {m.id: "model" for m in runs}
        | {m.id: "teacher" for m in teacher_runs}
        | {m.id: "eval_data" for m in datasets}
    )
    recipe = cfg.resolved() | {
        "models": [m.id if isinstance(m, Manifest) else m.resolved() for m in resolved.values()],
        "tasks": [t.resolved() | {"dataset": t.dataset.resolved() | {"ref": task_data[t.name].id}}
                  | ({"teacher": teachers[t.teacher].id} if t.teacher else {}) for t in cfg.tasks],
    }  # fmt: skip
    metric_names = list(dict.fromkeys(m.name for t in cfg.tasks for m in t.metric_list))
    table = _records_table(records, metric_names)
    stats = {
        "samples": sum(v["samples"] for v in report["tasks"].values()),
        "seconds": round(seconds, 2),
        "requests": usage,
        "tasks": {task: {label: {name: m["value"] for name, m in ms["metrics"].items()} for label, ms in entry["models"].items()}
                  for task, entry in report["tasks"].items()},
    }  # fmt: skip
    with Publisher(store, kind="eval", name=cfg.name, stage=STAGE, recipe=recipe, parents=parents,
                   parent_roles=roles, seed=cfg.bootstrap.seed) as pub:  # fmt: skip
        pub.write_table(table, split="records")
        # In the recipe's order (models as listed), not sorted: tables show them as the user listed them.
        (pub.dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
        return pub.publish(stats=stats, arrow_schema=table.schema)


def run_recipe(data: dict[str, Any], store: Store, source: str) -> Manifest:
    return evaluate(parse_config(EvalRecipe, data, source), store)


__all__ = ["EvalRecipe", "TaskData", "evaluate", "run_recipe"]
