"""``distillery eval compare A B …``: evals side by side, and the samples that flipped.

Each column is one model of one eval (``eval-ref · model``). Rows are every task × metric the
columns share, as ``value [low, high]``. Against the first column, each other column gets the paired
difference on the samples both scored (for per-sample means: accuracy, ROUGE, chrF, pass@k, win rate,
— seeded bootstrap on the same resamples), and for tasks with a right/wrong metric the
sample ids that are right in one and wrong in the other, read from the evals' records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from eval.metrics import METRICS, metric_named
from eval.stats import BootstrapSettings, paired_difference
from manifests.data import read_table
from manifests.errors import DistilleryError
from manifests.eval_tables import cell, diff_cell, eval_metrics
from manifests.schema import Manifest
from manifests.store import Store


@dataclass
class Column:
    eval: Manifest
    model: str
    metrics: dict[str, dict[str, dict[str, Any]]]
    """task → metric → {value, low, high, n}."""
    records: dict[tuple[str, str], dict[str, Any]]
    """(task, sample id) → record."""

    @property
    def label(self) -> str:
        return f"{self.eval.name}@{self.eval.id[:8]} · {self.model}"


def _metrics(manifest: Manifest) -> dict[str, Any]:
    if manifest.kind != "eval":
        raise DistilleryError(f"{manifest.ref} is a {manifest.kind}; compare takes evals")
    data = eval_metrics(manifest)
    tasks = data.get("tasks")
    if not isinstance(tasks, dict) or not all(
        isinstance(m, dict) and isinstance(m.get("metrics"), dict)
        for t in tasks.values()
        for m in (t.get("models") or {}).values()
    ):
        raise DistilleryError(
            f"{manifest.ref} has no per-task metrics in this layout (made by an older eval, or without "
            "metrics.json); rerun its recipe"
        )
    return data


def columns_of(store: Store, refs: list[str]) -> list[Column]:
    from manifests.verify import ensure_verified

    columns = []
    for ref in refs:
        manifest = store.resolve(ref, kind="eval")
        ensure_verified(manifest)
        data = _metrics(manifest)
        records = read_table(manifest, split="records").to_pylist() if manifest.data_files("records") else []
        # metrics.json keeps the recipe's order of models
        models = list(dict.fromkeys(label for task in data["tasks"].values() for label in task["models"]))
        for label in models:
            per_task = {
                task: entry["models"][label]["metrics"]
                for task, entry in data["tasks"].items()
                if label in entry["models"]
            }
            mine = {(r["task"], r["sample_id"]): r for r in records if r["model"] == label}
            columns.append(Column(manifest, label, per_task, mine))
    if len(columns) < 2:
        raise DistilleryError("compare needs at least two models: give two evals, or an eval of two models")
    return columns


def compare(columns: list[Column], settings: BootstrapSettings | None = None) -> dict[str, Any]:
    """Rows of shared task × metric values, paired differences and flips against the first column."""
    settings = settings or BootstrapSettings()
    base = columns[0]
    rows = []
    for task, metrics in base.metrics.items():
        for metric in metrics:
            if not all(metric in c.metrics.get(task, {}) for c in columns):
                continue
            row: dict[str, Any] = {"task": task, "metric": metric,
                                   "values": [c.metrics[task][metric] for c in columns], "diffs": []}  # fmt: skip
            for other in columns[1:]:
                row["diffs"].append(_paired(base, other, task, metric, settings))
            rows.append(row)
    flips = []
    for other in columns[1:]:
        for task in base.metrics:
            shared = sorted(k for k in base.records if k[0] == task and k in other.records)
            a_only = [
                k[1]
                for k in shared
                if base.records[k]["correct"] is True and other.records[k]["correct"] is False
            ]
            b_only = [
                k[1]
                for k in shared
                if base.records[k]["correct"] is False and other.records[k]["correct"] is True
            ]
            if a_only or b_only:
                flips.append(
                    {"task": task, "a": base.label, "b": other.label, "a_only": a_only, "b_only": b_only}
                )
    return {"columns": [c.label for c in columns], "rows": rows, "flipped": flips}


def _paired(
    a: Column, b: Column, task: str, metric: str, settings: BootstrapSettings
) -> dict[str, Any] | None:
    known = metric in METRICS or metric.startswith("pass@")
    if not known or metric_named(metric).pooled:  # the records' values alone cannot redo a pooled aggregate
        return None
    keys = sorted(k for k in a.records if k[0] == task and k in b.records)
    pairs = [(a.records[k].get(metric), b.records[k].get(metric)) for k in keys]
    pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
    if not pairs:
        return None
    xs = np.asarray([[x, 1.0] for x, _ in pairs])
    ys = np.asarray([[y, 1.0] for _, y in pairs])
    return paired_difference(xs, ys, lambda s: s[..., 0] / s[..., 1], settings)


def print_comparison(result: dict[str, Any], limit: int = 10) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(
        "task", "metric", *result["columns"], *[f"Δ {c} − first" for c in result["columns"][1:]], box=None
    )
    for row in result["rows"]:
        table.add_row(row["task"], row["metric"], *[cell(v) for v in row["values"]],
                      *[diff_cell(d) for d in row["diffs"]])  # fmt: skip
    console.print(table)
    for flip in result["flipped"]:
        console.print(
            f"[bold]{flip['task']}[/]: right only in {flip['a']}: {len(flip['a_only'])}, "
            f"right only in {flip['b']}: {len(flip['b_only'])}"
        )
        for name, ids in (("a", flip["a_only"]), ("b", flip["b_only"])):
            if ids:
                more = f" … (+{len(ids) - limit})" if len(ids) > limit else ""
                console.print(f"  only {flip[name]}: {' '.join(ids[:limit])}{more}", soft_wrap=True)
