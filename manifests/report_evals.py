"""Eval reports: per task, each model's metrics with their bootstrap intervals, the paired
differences between models, and the samples that flipped (right with one model, wrong with the
other) with both models' answers.

Read from the eval's ``metrics.json``::

    {"bootstrap": {"samples": 1000, "seed": 0, "confidence": 0.95},
     "tasks": {"gsm8k": {"dataset": "3f9c…", "split": "test", "samples": 50, "primary": "exact_match",
       "models": {"base": {"run_id": "ab12…", "metrics": {"exact_match": {"value": 0.4, "low": 0.3, "high": 0.52, "n": 50}}}},
       "paired": [{"a": "base", "b": "sft", "metrics": {"exact_match": {"diff": 0.1, "low": 0.02, "high": 0.18, "n": 50}},
                   "flipped": {"a_only": ["s7"], "b_only": ["s2", "s9"]}}]}}}

and from its per-sample records (the ``records`` split: ``task``, ``model``, ``sample_id``,
``outputs``…), for the flipped samples' answers. An eval written before tasks existed (a
``metrics.json`` of ``{model: {"perplexity": …}}``) is shown as one task without intervals.
Model outputs are untrusted text: they are escaped and shortened, never interpreted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from manifests.data import read_shard, unreadable_shard
from manifests.eval_tables import eval_metrics
from manifests.report_html import Html, esc, number, page, parents_table, table
from manifests.schema import Manifest
from manifests.verify import ensure_verified

FLIPPED_SHOWN = 25
"""Flipped samples per pair and direction shown with their outputs (all ids are listed)."""
OUTPUT_CHARS = 400


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _legacy_tasks(metrics: dict[str, Any], manifest: Manifest) -> dict[str, Any]:
    """``{model: {metric: number}}`` (the perplexity eval before tasks) as one task without intervals."""
    recipe = manifest.producer.recipe
    data = _dict(recipe.get("dataset"))
    models = {}
    for label, values in metrics.items():
        values = _dict(values)
        numbers = {k: v for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        models[label] = {
            "run_id": values.get("run_id"),
            "metrics": {k: {"value": v} for k, v in numbers.items()},
        }
    name = str(recipe.get("metric") or manifest.producer.stage)
    return {name: {"dataset": data.get("ref"), "split": data.get("split"), "primary": recipe.get("metric"),
                   "models": models, "paired": []}}  # fmt: skip


def _intervals(metrics: dict[str, Any]) -> str | None:
    """How the file's intervals were made: its bootstrap settings, or what the producer says instead
    (``eval.harness``: a normal interval from lm-eval's stderr)."""
    boot = _dict(metrics.get("bootstrap"))
    if boot:
        confidence = boot.get("confidence")
        level = f"{number(confidence * 100)}% " if isinstance(confidence, int | float) else ""
        return f"{level}bootstrap, {boot.get('samples')} resamples, seed {boot.get('seed')}"
    described = _dict(metrics.get("harness")).get("interval")
    return str(described) if described else None


def _read_metrics(manifest: Manifest) -> tuple[str | None, dict[str, Any], dict[str, Any] | None]:
    """(how the intervals were made, tasks, bootstrap settings) from ``metrics.json``; no tasks when the
    eval has no such file."""
    if not any(f.path == "metrics.json" for f in manifest.files):
        return None, {}, None
    metrics = eval_metrics(manifest)
    if "tasks" not in metrics:
        return None, _legacy_tasks(metrics, manifest), None
    return _intervals(metrics), _dict(metrics["tasks"]), metrics.get("bootstrap")


def _columns(path: Path, manifest: Manifest) -> list[str]:
    try:
        return pq.read_schema(path).names
    except (pa.ArrowException, OSError) as e:
        raise unreadable_shard(path, e, manifest.ref, kind="eval") from None


def _record_model_ids(manifest: Manifest) -> dict[str, str | None]:
    """``model label → run id`` (None: an endpoint) from the per-sample records."""
    ids: dict[str, str | None] = {}
    for f in manifest.data_files("records") or manifest.data_files():
        path = manifest.location / f.path
        if {"model", "model_id"} <= set(_columns(path, manifest)):
            rows = read_shard(path, columns=["model", "model_id"], ref=manifest.ref, kind="eval")
            for row in rows.to_pylist():
                ids.setdefault(row["model"], row["model_id"])
    return ids


def _first_outputs(manifest: Manifest, wanted: set[tuple[str, str]]) -> dict[tuple[str, str, str], str]:
    """``(task, model, sample id) → first output`` (shortened) for each ``(task, sample id)`` wanted."""
    found: dict[tuple[str, str, str], str] = {}
    if not wanted:
        return found
    ids = sorted({sample for _, sample in wanted})
    needed = ["task", "model", "sample_id", "outputs"]
    for f in manifest.data_files("records") or manifest.data_files():
        path = manifest.location / f.path
        if not set(needed) <= set(_columns(path, manifest)):
            continue  # records without outputs: the page shows ids only
        rows = read_shard(path, columns=needed, ref=manifest.ref, kind="eval")
        rows = rows.filter(pc.is_in(pc.cast(rows.column("sample_id"), pa.string()), value_set=pa.array(ids)))
        for row in rows.to_pylist():
            if (row["task"], str(row["sample_id"])) in wanted:
                text = (row["outputs"] or [""])[0] or ""
                short = text if len(text) <= OUTPUT_CHARS else text[: OUTPUT_CHARS - 1] + "…"
                found.setdefault((row["task"], row["model"], str(row["sample_id"])), short)
    return found


def _pair_summary(pair: Any) -> dict[str, Any]:
    pair = _dict(pair)
    flipped = _dict(pair.get("flipped"))
    a_only, b_only = list(flipped.get("a_only") or []), list(flipped.get("b_only") or [])
    shown = [("a", s) for s in a_only[:FLIPPED_SHOWN]] + [("b", s) for s in b_only[:FLIPPED_SHOWN]]
    return {
        "a": pair.get("a"), "b": pair.get("b"), "metrics": _dict(pair.get("metrics")),
        "flipped": {"metric": flipped.get("metric"), "a_only": a_only, "b_only": b_only},
        "examples": [{"sample_id": str(s), "right": side} for side, s in shown],
    }  # fmt: skip


def _model_entry(entry: Any) -> dict[str, Any]:
    """``{"run_id", "metrics"}`` of one model: as written, or (``{metric: {...}}`` without the wrapper,
    as ``stage: eval`` writes it) with the run id left to the records."""
    entry = _dict(entry)
    if isinstance(entry.get("metrics"), dict):
        return {"run_id": entry.get("run_id"), "metrics": entry["metrics"]}
    return {"metrics": {k: v for k, v in entry.items() if isinstance(v, dict)}}


def _task_summary(task: Any) -> dict[str, Any]:
    task = _dict(task)
    models = {label: _model_entry(m) for label, m in _dict(task.get("models")).items()}
    names = [task["primary"]] if task.get("primary") else []
    for m in models.values():
        names += [k for k in m["metrics"] if k not in names]
    return {
        "dataset": task.get("dataset"), "split": task.get("split"), "samples": task.get("samples"),
        "primary": task.get("primary"), "metric_names": names, "models": models,
        "paired": [_pair_summary(p) for p in task.get("paired") or []],
    }  # fmt: skip


def summarise_eval(manifest: Manifest) -> dict[str, Any]:
    """Everything an eval's report shows, as plain data (the ``--format json`` output)."""
    ensure_verified(manifest)
    intervals, raw_tasks, bootstrap = _read_metrics(manifest)
    tasks = {name: _task_summary(task) for name, task in raw_tasks.items()}
    examples = [
        (name, pair, e) for name, t in tasks.items() for pair in t["paired"] for e in pair["examples"]
    ]
    outputs = _first_outputs(manifest, {(name, e["sample_id"]) for name, _, e in examples})
    for name, pair, e in examples:
        e["outputs"] = {label: outputs.get((name, label, e["sample_id"])) for label in (pair["a"], pair["b"])}
    unnamed = [(label, m) for t in tasks.values() for label, m in t["models"].items() if "run_id" not in m]
    run_ids = _record_model_ids(manifest) if unnamed else {}
    for label, m in unnamed:
        m["run_id"] = run_ids.get(label)
    return {
        "kind": "eval", "eval": manifest.ref, "name": manifest.name, "id": manifest.id,
        "stage": manifest.producer.stage, "created": manifest.created_at.isoformat(),
        "parents": [p.model_dump() for p in manifest.parents], "bootstrap": bootstrap, "intervals": intervals,
        "records": sum(f.rows or 0 for f in manifest.data_files()), "tasks": tasks,
    }  # fmt: skip


def _interval(value: Any, low: Any, high: Any) -> Html:
    if low is None and high is None:
        return esc(number(value))
    return Html(f"{esc(number(value))} <span class='note'>[{esc(number(low))}, {esc(number(high))}]</span>")


def _metric_cell(metric: Any) -> Html:
    m = _dict(metric)
    return _interval(m.get("value"), m.get("low"), m.get("high")) if m else Html("—")


def _diff_cell(metric: Any) -> Html:
    m = _dict(metric)
    if not m:
        return Html("—")
    text = _interval(m.get("diff"), m.get("low"), m.get("high"))
    low, high = m.get("low"), m.get("high")
    apart = isinstance(low, int | float) and isinstance(high, int | float) and (low > 0 or high < 0)
    return Html(f"<b>{text}</b>") if apart else text


def _output(text: str | None) -> Html:
    return Html(f"<div class='out'>{esc(text)}</div>") if text is not None else Html("—")


def _direction(task: dict[str, Any], metric: str) -> str:
    """`` ↑`` or `` ↓`` where the eval recorded which way the metric is better."""
    for m in task["models"].values():
        better = _dict(m["metrics"].get(metric)).get("higher_is_better")
        if isinstance(better, bool):
            return " ↑" if better else " ↓"
    return ""


def _task_section(name: str, task: dict[str, Any]) -> str:
    names, primary = task["metric_names"], task["primary"]
    facts = [
        f"dataset {str(task['dataset'])[:12]}" if task["dataset"] else "",
        f"split {task['split']}" if task["split"] else "",
        f"{task['samples']} samples" if task["samples"] is not None else "",
        f"primary metric {primary}" if primary else "",
    ]
    headers = ["model", "run"] + [
        m + _direction(task, m) + (" (primary)" if m == primary else "") for m in names
    ]
    rows = [
        [
            label,
            str(m["run_id"] or "endpoint")[:12],
            *(_metric_cell(m["metrics"].get(k)) for k in names),
        ]
        for label, m in task["models"].items()
    ]
    parts = [
        f"<h2>Task {esc(name)}</h2><p>{esc(' · '.join(f for f in facts if f))}</p>",
        table(headers, rows),
    ]
    if task["paired"]:
        pair_names = list(dict.fromkeys(k for p in task["paired"] for k in p["metrics"]))
        diffs = [
            [p["a"], p["b"], *(_diff_cell(p["metrics"].get(k)) for k in pair_names)] for p in task["paired"]
        ]
        parts.append(
            "<h3>Paired differences</h3><p class='note'>diff = b − a, with its interval; bold where the "
            "interval excludes 0.</p>" + table(["a", "b", *pair_names], diffs)
        )
    parts += [_flipped_section(p) for p in task["paired"]]
    return "".join(parts)


def _flipped_section(pair: dict[str, Any]) -> str:
    a, b = str(pair["a"]), str(pair["b"])
    a_only, b_only = pair["flipped"]["a_only"], pair["flipped"]["b_only"]
    on = f" ({pair['flipped']['metric']})" if pair["flipped"]["metric"] else ""
    head = (
        f"<h3>Flipped samples: {esc(a)} vs {esc(b)}{esc(on)}</h3><p>right only with {esc(a)}: {len(a_only)} · "
        f"right only with {esc(b)}: {len(b_only)}</p>"
    )
    if not (a_only or b_only):
        return head
    rows = [
        [e["sample_id"], a if e["right"] == "a" else b, _output(e["outputs"].get(pair["a"])),
         _output(e["outputs"].get(pair["b"]))]
        for e in pair["examples"]
    ]  # fmt: skip
    body = table(["sample", "right only with", f"{a}: first output", f"{b}: first output"], rows)
    if len(pair["examples"]) < len(a_only) + len(b_only):
        listed = "; ".join(
            f"right only with {label}: {', '.join(map(str, ids))}"
            for label, ids in ((a, a_only), (b, b_only))
        )
        body += (
            f"<details><summary>all {len(a_only) + len(b_only)} flipped sample ids</summary>"
            f"<p>{esc(listed)}</p></details>"
        )
    return head + body


def render_eval(summary: dict[str, Any]) -> str:
    intervals = f"intervals: {summary['intervals']}" if summary["intervals"] else "no intervals recorded"
    sections = [
        f"<h1>Eval {esc(summary['eval'])}</h1>",
        f"<p>id <code>{esc(summary['id'])}</code> · stage {esc(summary['stage'])} · published "
        f"{esc(summary['created'])} · {summary['records']} per-sample records · {esc(intervals)}</p>",
        "<h2>Parents</h2>" + parents_table(summary["parents"]),
        *(_task_section(name, task) for name, task in summary["tasks"].items()),
    ]
    if not summary["tasks"]:
        sections.append("<p class='note'>This eval has no metrics.json: there are no metrics to show.</p>")
    return page(summary["eval"], sections)
