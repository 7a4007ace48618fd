"""``eval.harness``: lm-evaluation-harness tasks on store models, published as one eval manifest.

    stage: eval.harness
    name: smollm2-arc
    models: [smollm2-135m-instruct, demo-sft-run]
    tasks: [arc_easy, my_local_task]
    include_path: examples/lm-eval-tasks     # folder of your own task YAMLs (optional)
    limit: 100

Each model (a full checkpoint or an adapter, loaded merged) is wrapped in lm-eval's ``HFLM`` and run
through ``lm_eval.simple_evaluate`` with every sample logged. The eval manifest (parents: the
models) holds

- ``metrics.json`` in the layout of ``stage: eval``: per task and model, each metric's value with
  ``low``/``high`` = value ± 1.96 × lm-eval's stderr (a normal interval, not a bootstrap one, so
  ``bootstrap`` is null), plus under ``harness`` the lm-eval version, the settings and each task's
  resolved config and version, so the numbers can be reproduced;
- per-sample records (split ``records``), one row per model, task and document::

    {"id": "5d0c…", "parents": [], "sample_id": "3", "task": "arc_easy", "model": "sft@ab12cd34ef56",
     "model_id": "ab12…", "prompt_sha256": "…", "target_sha256": "…",
     "outputs": ["[-4.21,false]", "[-2.03,false]", …], "extracted": ["a prism"], "correct": true,
     "acc": 1.0, "acc_norm": 1.0}

lm-eval names a metric ``<metric>,<filter>``; here the name is the metric alone under the filter
``none`` and keeps lm-eval's spelling otherwise (``exact_match,strict-match``). ``outputs`` are the
model's raw responses as text (a generation, or a loglikelihood as ``[logprob, is_greedy]``);
``extracted`` the filtered answers (for a multiple-choice task, the choice with the highest
loglikelihood). Everything is checked (models, ``include_path``, task names, the tasks' data) before
the first model is scored, and nothing is published when any part fails.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import math
import numbers
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import Field, PositiveInt

from manifests.errors import DistilleryError
from manifests.hashing import record_id, sha256_file
from manifests.model_runs import require_causal_lm
from manifests.models import load_causal_lm
from manifests.publish import Publisher
from manifests.recipes import Name, RecipeConfig, parse_config
from manifests.schema import Manifest
from manifests.store import Store

STAGE = "eval.harness"
Z95 = 1.96
"""``low``/``high`` are value ± Z95 × stderr: lm-eval reports a standard error, not an interval."""
CORRECTNESS = ("acc", "acc_norm", "exact_match", "em")
"""Metrics whose per-sample value is 1 for a right answer and 0 for a wrong one (``correct``)."""
RECORD_FIELDS = [
    ("id", pa.string()), ("parents", pa.list_(pa.string())), ("sample_id", pa.string()),
    ("task", pa.string()), ("model", pa.string()), ("model_id", pa.string()),
    ("prompt_sha256", pa.string()), ("target_sha256", pa.string()),
    ("outputs", pa.list_(pa.string())), ("extracted", pa.list_(pa.string())), ("correct", pa.bool_()),
]  # fmt: skip
"""The records' columns before the metric columns (the same as ``stage: eval``'s)."""
INSTALL = "lm-eval is not installed: pip install 'distillery[lmeval]'"


class HarnessRecipe(RecipeConfig):
    """Run lm-evaluation-harness tasks on models from the store."""

    name: Name
    models: list[str] = Field(min_length=1)
    """Run references (full checkpoints or LoRA adapters, merged for scoring)."""
    tasks: list[str] = Field(min_length=1)
    """lm-eval task, group or tag names (``arc_easy``, ``mmlu``, or a task of ``include_path``)."""
    include_path: str | None = None
    """A folder of your own lm-eval task YAMLs, relative to the working directory."""
    num_fewshot: int | None = Field(default=None, ge=0)
    """Few-shot examples per prompt; unset keeps each task's own setting (0 when it has none)."""
    limit: PositiveInt | None = None
    """Score only the first this many documents of each task (unset: all)."""
    batch_size: PositiveInt = 8
    device: str = "cpu"
    """Where the models run (``cpu``, ``cuda``, ``cuda:1``)."""
    seed: int = 1234
    """Seed of Python, NumPy, torch and the few-shot sampler (lm-eval's default is 1234 for the last three)."""
    gen_kwargs: dict[str, Any] | None = None
    """Generation settings that override those of every ``generate_until`` task (``{max_gen_toks: 64}``)."""
    apply_chat_template: bool = False
    """Wrap prompts in the model's chat template (for instruct models)."""
    bootstrap_iters: int = Field(default=1000, ge=0)
    """Resamples for the stderr of metrics without a closed form (BLEU, F1…); lm-eval's own default is
    100000. 0 leaves those stderrs out."""


def _lm_eval():
    """The ``lm_eval`` module, or the one line that says how to install it."""
    try:
        import lm_eval
        import lm_eval.models.huggingface
        import lm_eval.tasks
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "lm_eval":
            raise  # lm-eval is there but broken: a traceback names what it lacks
        raise DistilleryError(INSTALL) from None
    return lm_eval


def _include_folder(include_path: str | None) -> Path | None:
    if include_path is None:
        return None
    folder = Path(include_path)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.is_file() else "no such folder"
        where = "" if folder.is_absolute() else f" (relative to {Path.cwd()})"
        raise DistilleryError(
            f"include_path {include_path}: {what}{where}; give the folder of your task YAMLs"
        )
    return folder.resolve()


def _task_files(folder: Path | None) -> dict[str, str]:
    """sha256 of every file of the user's task folder (YAMLs, their Python helpers, local data), so the
    eval's id changes when a task definition does."""
    if folder is None:
        return {}
    files = sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in files}


def _check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DistilleryError(
            f"device: '{device}' but torch {torch.__version__} sees no CUDA device; use 'cpu'"
        )
    if not device.startswith(("cpu", "cuda", "mps", "xpu")):
        raise DistilleryError(f"device: '{device}' is no torch device; use 'cpu' or 'cuda' ('cuda:1')")


@functools.lru_cache(maxsize=4)
def _cached_task_manager(include: str | None, fingerprint: tuple):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include)


def task_manager(folder: Path | None):
    """lm-eval's index of every task (its ~15k built-in YAMLs and the user's), kept per process: it takes
    seconds to build, and a process that evaluates again (a trainer's in-training eval, the tests)
    reuses it. The index holds only names and paths (a task's YAML is read again when it loads), so
    the user's folder is fingerprinted by its YAMLs' names, sizes and times."""
    fingerprint: tuple = ()
    if folder is not None:
        fingerprint = tuple(
            (p.as_posix(), p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.rglob("*.yaml"))
        )
    return _cached_task_manager(str(folder) if folder else None, fingerprint)


def _check_task_names(manager, names: list[str], folder: Path | None) -> None:
    known = set(manager.all_tasks)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DistilleryError(f"tasks: {', '.join(repeated)} given twice; name each task once")
    for name in names:
        if name in known:
            continue
        near = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6)
        hint = (
            f"did you mean {' or '.join(repr(n) for n in near)}?" if near else "'lm-eval ls tasks' lists them"
        )
        # lm-eval skips a task YAML it cannot parse with a debug message only: say so where it may apply.
        where = f" or include_path {folder} (a YAML lm-eval cannot parse is skipped)" if folder else ""
        raise DistilleryError(f"tasks: '{name}' is no task of lm-eval {_version()}{where}; {hint}")


def _load_tasks(manager, names: list[str]) -> list[Any]:
    """The requested tasks and groups, built (their data loaded) before any model is scored."""
    built: list[Any] = []
    for name in names:
        try:
            loaded = manager.load([name])
        except (
            Exception
        ) as e:  # jinja, datasets, the hub, a YAML's !function: each means "this task cannot load"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DistilleryError(
                f"lm-eval task '{name}' cannot be loaded ({type(e).__name__}: {first}); check its YAML and "
                "its dataset (a hub dataset needs the network or a copy in the HF datasets cache)"
            ) from None
        built += [loaded["groups"][name]] if name in loaded["groups"] else list(loaded["tasks"].values())
    return built


def _version() -> str:
    from importlib import metadata

    return metadata.version("lm_eval")


# --- lm-eval's results → the eval layout ------------------------------------------------------------


def metric_name(key: str) -> str:
    """``acc,none`` → ``acc``; ``exact_match,strict-match`` stays as it is."""
    metric, _, filter_ = key.partition(",")
    return metric if filter_ in ("", "none") else key


def _number(value: Any) -> float | None:
    """A metric value as a float; None for lm-eval's "N/A", NaN, or a per-sample tuple that only its
    aggregation turns into a number (perplexity's (loglikelihood, length), BLEU's pairs)."""
    if not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _sample_count(results: dict[str, Any], task: str, key: str | None = None) -> int:
    """Documents scored for a task (with ``key``: that report a metric ``key``), or for a group the sum
    over its subtasks."""
    counts = results.get("n-samples", {})
    if task in counts:
        reported = key is None or key in results["results"].get(task, {})
        return int(counts[task]["effective"]) if reported else 0
    return sum(_sample_count(results, sub, key) for sub in results.get("group_subtasks", {}).get(task, []))


def _task_metrics(results: dict[str, Any], task: str) -> dict[str, dict[str, Any]]:
    """One task's metrics in the eval layout: value, normal interval, n, stderr, higher_is_better."""
    row = results["results"][task]
    better = results.get("higher_is_better", {}).get(task, {})
    out: dict[str, dict[str, Any]] = {}
    for key, raw in row.items():
        metric, sep, filter_ = key.partition(",")
        if not sep or metric.endswith("_stderr"):
            continue
        value = _number(raw)
        stderr = _number(row.get(f"{metric}_stderr,{filter_}"))
        entry = {
            "value": value,
            "low": None,
            "high": None,
            "n": _sample_count(results, task, key),
            "stderr": stderr,
        }
        if value is not None and stderr is not None:
            entry["low"], entry["high"] = value - Z95 * stderr, value + Z95 * stderr
        if metric in better:
            entry["higher_is_better"] = better[metric]
        out[metric_name(key)] = entry
    return out


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _flat(responses: Any) -> list[str]:
    """Responses (a string, a (logprob, is_greedy) pair, or lists of these) as a list of texts."""
    if isinstance(responses, list) and not (len(responses) == 2 and isinstance(responses[1], bool)):
        return [t for r in responses for t in _flat(r)]
    return [_text(responses)]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _choices(sample: dict[str, Any], delimiter: str) -> list[str]:
    return [str(args[1]).removeprefix(delimiter) for args in sample.get("arguments") or [] if len(args) > 1]


def _extracted(sample: dict[str, Any], config: dict[str, Any]) -> list[str]:
    filtered = sample.get("filtered_resps")
    if config.get("output_type") == "multiple_choice" and filtered:
        choices = _choices(sample, config.get("target_delimiter", " "))
        lls = [r[0] if isinstance(r, list | tuple) else r for r in filtered]
        if len(choices) == len(lls) and all(isinstance(x, int | float) for x in lls):
            return [choices[max(range(len(lls)), key=lls.__getitem__)]]
    return _flat(filtered) if filtered is not None else []


def _target(sample: dict[str, Any], config: dict[str, Any]) -> str:
    target = sample.get("target")
    if config.get("output_type") == "multiple_choice" and isinstance(target, int):
        choices = _choices(sample, config.get("target_delimiter", " "))
        if 0 <= target < len(choices):
            return choices[target]
    return _text(target)


def _records(results: dict[str, Any], manifest: Manifest, primary: dict[str, str]) -> list[dict[str, Any]]:
    """One row per task and document: lm-eval logs a document once per filter, merged here."""
    rows: list[dict[str, Any]] = []
    for task, samples in results.get("samples", {}).items():
        config = results.get("configs", {}).get(task, {})
        by_doc: dict[Any, dict[str, Any]] = {}
        for sample in samples:
            filter_ = sample.get("filter", "none")
            row = by_doc.get(sample["doc_id"])
            if row is None:
                args = sample.get("arguments") or [[""]]
                prompt = str(args[0][0]) if args[0] else ""
                row = by_doc[sample["doc_id"]] = {
                    "sample_id": str(sample["doc_id"]), "task": task, "model": manifest.ref,
                    "model_id": manifest.id, "parents": [], "prompt_sha256": _sha(prompt),
                    "target_sha256": _sha(_target(sample, config)), "outputs": _flat(sample.get("resps") or []),
                    "extracted": [],
                }  # fmt: skip
                row["id"] = record_id(STAGE, task, manifest.id, row["sample_id"], row["prompt_sha256"])
            row["extracted"] += _extracted(sample, config)
            for metric in sample.get("metrics", []):
                row[metric_name(f"{metric},{filter_}")] = _number(sample.get(metric))
        for row in by_doc.values():
            value = row.get(primary.get(task, ""))
            base = primary.get(task, "").partition(",")[0]
            row["correct"] = value == 1.0 if base in CORRECTNESS and value is not None else None
        rows += sorted(by_doc.values(), key=lambda r: (len(r["sample_id"]), r["sample_id"]))
    return rows


def records_table(rows: list[dict[str, Any]], metric_names: list[str]) -> pa.Table:
    schema = pa.schema(RECORD_FIELDS + [(name, pa.float64()) for name in metric_names])
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)


def _json_safe(value: Any) -> Any:
    """A task config as JSON: functions (a YAML's ``!function``) by their qualified name, not their
    address, so that the same config writes the same bytes."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, set):
        return sorted((_json_safe(v) for v in value), key=str)
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if callable(value):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__name__)}"
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


# --- the stage --------------------------------------------------------------------------------------


def _score(cfg: HarnessRecipe, lm_eval, manager, tasks: list[Any], manifest: Manifest, store: Store):
    model, tokenizer = load_causal_lm(manifest, store)
    model.to(cfg.device).eval()
    lm = lm_eval.models.huggingface.HFLM(
        pretrained=model, tokenizer=tokenizer, device=cfg.device, batch_size=cfg.batch_size
    )
    results = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=manager, num_fewshot=cfg.num_fewshot, limit=cfg.limit,
        batch_size=cfg.batch_size, device=cfg.device, log_samples=True, gen_kwargs=cfg.gen_kwargs,
        apply_chat_template=cfg.apply_chat_template, bootstrap_iters=cfg.bootstrap_iters,
        random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed,
    )  # fmt: skip
    del lm, model
    return results


def evaluate(cfg: HarnessRecipe, store: Store) -> Manifest:
    folder = _include_folder(cfg.include_path)
    repeated = sorted({ref for ref in cfg.models if cfg.models.count(ref) > 1})
    if repeated:
        raise DistilleryError(f"models: {', '.join(repeated)} given twice; name each model once")
    # Every model is checked before lm-eval builds its index: a tokenizer run named last is one error
    # line now, not a traceback after the others' work.
    models = [require_causal_lm(store.resolve(ref, kind="run"), store) for ref in cfg.models]
    _check_device(cfg.device)
    lm_eval = _lm_eval()
    manager = task_manager(folder)
    _check_task_names(manager, cfg.tasks, folder)
    tasks = _load_tasks(manager, cfg.tasks)
    started = time.monotonic()
    report: dict[str, Any] = {"bootstrap": None, "tasks": {}}
    records: list[dict[str, Any]] = []
    harness_tasks: dict[str, Any] = {}
    for manifest in models:
        results = _score(cfg, lm_eval, manager, tasks, manifest, store)
        for task in results["results"]:
            metrics = _task_metrics(results, task)
            entry = report["tasks"].setdefault(task, {
                "dataset": None, "split": None, "samples": _sample_count(results, task),
                "primary": next(iter(metrics), None), "models": {}, "paired": [],
            })  # fmt: skip
            entry["models"][manifest.ref] = {"run_id": manifest.id, "metrics": metrics}
        primary = {task: entry["primary"] for task, entry in report["tasks"].items()}
        records += _records(results, manifest, primary)
        for task, config in results.get("configs", {}).items():
            harness_tasks.setdefault(task, {
                "version": results.get("versions", {}).get(task), "n_shot": results.get("n-shot", {}).get(task),
                "config": _json_safe(config),
            })  # fmt: skip
    report["harness"] = {
        "lm_eval_version": _version(),
        "interval": f"value ± {Z95} × lm-eval's stderr (normal approximation)",
        "config": {k: v for k, v in cfg.resolved().items() if k not in ("name", "models", "tasks")},
        "tasks": harness_tasks,
    }
    return _publish(cfg, store, models, folder, report, records, time.monotonic() - started)


def _publish(cfg: HarnessRecipe, store: Store, models: list[Manifest], folder: Path | None,
             report: dict[str, Any], records: list[dict[str, Any]], seconds: float) -> Manifest:  # fmt: skip
    fixed = {name for name, _ in RECORD_FIELDS}
    metric_names = list(dict.fromkeys(k for r in records for k in r if k not in fixed))
    table = records_table(records, metric_names)
    # The lm-eval version and the task files' hashes are part of what the numbers mean: in the recipe,
    # they enter the eval's id.
    recipe = cfg.resolved() | {"models": [m.id for m in models], "lm_eval_version": _version()}
    if folder is not None:
        recipe["include_files"] = _task_files(folder)
    stats = {
        "samples": len(records),
        "seconds": round(seconds, 2),
        "tasks": {task: {label: {name: m["value"] for name, m in entry["metrics"].items()}
                         for label, entry in t["models"].items()} for task, t in report["tasks"].items()},
    }  # fmt: skip
    with Publisher(store, kind="eval", name=cfg.name, stage=STAGE, recipe=recipe, parents=models,
                   parent_roles={m.id: "model" for m in models}, seed=cfg.seed) as pub:  # fmt: skip
        pub.write_table(table, split="records")
        (pub.dir / "metrics.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        return pub.publish(stats=stats, arrow_schema=table.schema)


def run_recipe(data: dict[str, Any], store: Store, source: str) -> Manifest:
    return evaluate(parse_config(HarnessRecipe, data, source), store)
