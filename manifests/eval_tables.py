"""An eval's ``metrics.json`` as terminal tables: task × metric × model with intervals, then the
paired differences and flips. Read by ``distillery eval run`` and the demo; the layout is written by
``eval/run.py``::

    {"tasks": {"answers": {"samples": 10, "primary": "rougeL",
                           "models": {"student-base": {"run_id": "a122…", "metrics": {"rougeL": {"value": 0.21, "low": 0.17, "high": 0.26, "n": 10}}}},
                           "paired": [{"a": "student-base", "b": "demo-sft-run",
                                       "metrics": {"rougeL": {"diff": 0.05, "low": 0.01, "high": 0.09, "n": 10}}}]}}}
"""

from __future__ import annotations

import json
from typing import Any

from manifests.errors import DistilleryError
from manifests.schema import Manifest


def cell(m: dict[str, Any]) -> str:
    if m.get("value") is None:
        return "–"
    if m.get("low") is None:
        return f"{m['value']:.4g}"
    return f"{m['value']:.4g} [{m['low']:.4g}, {m['high']:.4g}]"


def diff_cell(d: dict[str, Any] | None) -> str:
    if not d or d.get("diff") is None:
        return ""
    if d.get("low") is None:
        return f"{d['diff']:+.4g}"
    return f"{d['diff']:+.4g} [{d['low']:+.4g}, {d['high']:+.4g}]"


def eval_metrics(manifest: Manifest) -> dict[str, Any]:
    """An eval's ``metrics.json`` ({} when it has none); an unreadable one is one error line."""
    path = manifest.location / "metrics.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DistilleryError(
            f"{path}: not valid JSON ({e}); run 'distillery manifests verify {manifest.ref}' and rerun the eval"
        ) from None
    if not isinstance(data, dict):
        raise DistilleryError(f"{path}: expected a JSON object; rerun the eval {manifest.ref}")
    return data


def print_eval_metrics(manifest: Manifest, console) -> None:
    from rich.table import Table

    report = eval_metrics(manifest)
    for task, entry in report.get("tasks", {}).items():
        labels = list(entry["models"])
        table = Table(
            "metric", *labels, box=None, title=f"{task} ({entry['samples']} samples)", title_justify="left"
        )
        names = list(dict.fromkeys(n for label in labels for n in entry["models"][label]["metrics"]))
        for name in names:
            table.add_row(name, *[cell(entry["models"][label]["metrics"].get(name, {})) for label in labels])
        console.print(table)
        for pair in entry.get("paired", []):
            diffs = ", ".join(
                f"{name} {diff_cell(d)}" for name, d in pair["metrics"].items() if d.get("diff") is not None
            )
            console.print(f"  paired {pair['b']} − {pair['a']}: {diffs}", soft_wrap=True)
            flipped = pair.get("flipped")
            if flipped:
                console.print(
                    f"  flipped ({flipped['metric']}): right only in {pair['a']}: {len(flipped['a_only'])}, "
                    f"right only in {pair['b']}: {len(flipped['b_only'])}"
                )
