"""Run reports: training curves from the run's ``metrics.jsonl``, the guard rails' events, and the
run's parents, key recipe settings and stats.

``metrics.jsonl`` (written by the trainers' monitor) holds one record per logged step, and one per
guard-rail event::

    {"step": 12, "loss": 3.41, "lr": 0.00028, "grad_norm": 0.93, "tokens": 49152, "tokens_per_s": 5120.4,
     "mfu": 0.41, "elapsed_s": 9.6}
    {"step": 13, "guard": {"step": 13, "reason": "loss_spike", "loss": 9.7, "grad_norm": 4.1, "action": "skip"}}

TRL-run methods log ``learning_rate`` instead of ``lr``, and evaluations as records with
``eval_loss`` only; their guard events are in the manifest's ``stats.guard_triggers`` rather than in
the file. A line that cannot be read (the last one of a killed writer) is skipped and named on the
page. After a rollback the same steps are logged again: the later record of a step is the one the
run kept, and the loss it replaced is drawn faintly as discarded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from manifests.report_html import (
    Html,
    compact,
    esc,
    finite,
    key_values,
    number,
    page,
    parents_table,
    plot,
    table,
)
from manifests.schema import Manifest
from manifests.verify import ensure_verified

CURVES = {
    "loss": "training loss",
    "lr": "learning rate",
    "grad_norm": "gradient norm",
    "tokens_per_s": "tokens/s",
    "mfu": "MFU",
    "eval_loss": "eval loss",
}
ALIASES = {"learning_rate": "lr"}
"""Names ``transformers``' logs use for the curves above."""

KEY_SETTINGS = (
    "method", "model", "tokenizer", "datasets", "peft", "loss", "shape", "max_steps", "num_epochs",
    "per_device_batch_size", "gradient_accumulation_steps", "learning_rate", "min_lr_ratio",
    "warmup_steps", "weight_decay", "max_grad_norm", "max_length", "seq_len", "packing", "precision",
    "strategy", "guard", "seed",
)  # fmt: skip
"""Recipe fields shown at the top of a run's page (all of the recipe is one click further)."""

ACTION_COLOURS = {"skip": "#e69f00", "rollback": "#8e44ad", "stop": "#c0392b"}


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """The step and guard records of a ``metrics.jsonl``, and the numbers of the lines skipped."""
    records: list[dict[str, Any]] = []
    skipped: list[int] = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                skipped.append(line_no)
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
            else:
                skipped.append(line_no)
    return records, skipped


def _guard_event(event: dict[str, Any]) -> dict[str, Any]:
    known = {"step", "reason", "loss", "grad_norm", "action"}
    return {"step": event.get("step"), "kind": event.get("action"), "reason": event.get("reason"),
            "loss": event.get("loss"), "grad_norm": event.get("grad_norm"),
            "detail": {k: v for k, v in event.items() if k not in known}}  # fmt: skip


def _curves(records: list[dict[str, Any]]) -> tuple[dict[str, list[list[float]]], list[list[float]]]:
    """Each curve as ``[[step, value], …]`` by step (a step's last record wins), and the losses that
    later records of the same step replaced (logged before a rollback)."""
    by_step: dict[str, dict[int, float]] = {name: {} for name in CURVES}
    discarded: list[list[float]] = []
    for record in records:
        if "guard" in record:
            continue
        for key, value in record.items():
            name = ALIASES.get(key, key)
            if name not in CURVES:
                continue
            value = finite(value)
            if value is None:
                continue
            if name == "loss" and record["step"] in by_step[name]:
                discarded.append([record["step"], by_step[name][record["step"]]])
            by_step[name][record["step"]] = value
    curves = {name: [[s, v] for s, v in sorted(points.items())] for name, points in by_step.items() if points}
    return curves, discarded


def summarise_run(manifest: Manifest) -> dict[str, Any]:
    """Everything a run's report shows, as plain data (the ``--format json`` output)."""
    ensure_verified(manifest)
    recipe = manifest.producer.recipe
    stats = dict(manifest.stats)
    has_metrics = any(f.path == "metrics.jsonl" for f in manifest.files)
    records, skipped = read_metrics(manifest.location / "metrics.jsonl") if has_metrics else ([], [])
    curves, discarded = _curves(records)
    events = [_guard_event(r["guard"]) for r in records if isinstance(r.get("guard"), dict)]
    seen = {(e["step"], e["reason"], e["kind"]) for e in events}
    for trigger in stats.pop("guard_triggers", None) or []:  # where the file has none (TRL-run methods)
        event = _guard_event(trigger) if isinstance(trigger, dict) else None
        if event is not None and (event["step"], event["reason"], event["kind"]) not in seen:
            events.append(event)
    events.sort(key=lambda e: e["step"] if isinstance(e["step"], int) else -1)
    return {
        "kind": "run", "run": manifest.ref, "name": manifest.name, "id": manifest.id,
        "stage": manifest.producer.stage, "method": recipe.get("method", stats.get("method")),
        "created": manifest.created_at.isoformat(), "parents": [p.model_dump() for p in manifest.parents],
        "settings": {k: recipe[k] for k in KEY_SETTINGS if k in recipe}, "recipe": recipe, "stats": stats,
        "metrics": {
            "file": "metrics.jsonl" if has_metrics else None, "records": len(records),
            "skipped_lines": skipped, "curves": curves, "discarded_loss": discarded, "guard_events": events,
        },
    }  # fmt: skip


def _xy(points: list[list[float]]) -> tuple[list[float], list[float]]:
    return [p[0] for p in points], [p[1] for p in points]


def _loss_plot(curves: dict[str, list], discarded: list, events: list[dict[str, Any]]) -> Html:
    def draw(ax):
        if discarded:
            ax.plot(*_xy(discarded), ".", color="#bbb", label="discarded (rolled back)")
        if "loss" in curves:
            ax.plot(*_xy(curves["loss"]), color="#4a78a8", label="training loss")
        if "eval_loss" in curves:
            ax.plot(*_xy(curves["eval_loss"]), "o-", color="#2a9d5c", label="eval loss")
        labelled = set()
        for e in events:
            if isinstance(e["step"], int):
                kind = e["kind"] or "event"
                ax.axvline(e["step"], color=ACTION_COLOURS.get(kind, "#555"), linestyle="--", linewidth=1,
                           label=None if kind in labelled else f"guard: {kind}")  # fmt: skip
                labelled.add(kind)
        ax.set_xlabel("step")
        ax.set_title("loss")
        ax.legend(fontsize="small")

    return plot(draw, size=(5.6, 3.2))


def _curve_plot(name: str, points: list[list[float]]) -> Html:
    def draw(ax):
        ax.plot(*_xy(points), "o-" if len(points) < 20 else "-", color="#4a78a8")
        ax.set_xlabel("step")
        ax.set_title(CURVES[name])

    return plot(draw, size=(5.6, 3.2))


def render_run(summary: dict[str, Any]) -> str:
    metrics = summary["metrics"]
    curves, events = metrics["curves"], metrics["guard_events"]
    header = [
        f"<h1>Run {esc(summary['run'])}</h1>",
        f"<p>id <code>{esc(summary['id'])}</code> · stage {esc(summary['stage'])} · method "
        f"{esc(summary['method'] or '—')} · published {esc(summary['created'])}</p>",
        "<h2>Parents</h2>" + parents_table(summary["parents"]),
        "<h2>Recipe</h2>" + key_values(summary["settings"].items()) + "<details><summary>whole recipe"
        f"</summary><pre>{esc(json.dumps(summary['recipe'], indent=2, default=str))}</pre></details>",
        "<h2>Stats</h2>" + key_values(summary["stats"].items()),
    ]
    if metrics["file"] is None:
        return page(summary["run"], [*header, "<h2>Training</h2><p class='note'>This run has no training "
                    f"metrics (no metrics.jsonl): it was made by {esc(summary['stage'])}, not trained "
                    "step by step.</p>", _events_section(events)])  # fmt: skip
    skipped = metrics["skipped_lines"]
    notes = (
        f"<p class='note'>{len(skipped)} unreadable line(s) of metrics.jsonl skipped (line "
        f"{esc(', '.join(map(str, skipped[:20])))}{'…' if len(skipped) > 20 else ''}).</p>"
        if skipped
        else ""
    )
    plots = []
    if "loss" in curves or "eval_loss" in curves or events:
        plots.append(_loss_plot(curves, metrics["discarded_loss"], events))
    plots += [_curve_plot(name, curves[name]) for name in CURVES if name != "loss" and name in curves]
    body = (
        f"<div class='plots'>{''.join(plots)}</div>"
        if plots
        else "<p class='note'>metrics.jsonl holds no step records.</p>"
    )
    steps = f"{metrics['records']} records in metrics.jsonl"
    if "loss" in curves:
        last = curves["loss"][-1]
        steps += f", last step {last[0]}, loss {number(last[1])}"
    return page(summary["run"], [*header, f"<h2>Training</h2><p>{esc(steps)}</p>{notes}{body}",
                                 _events_section(events)])  # fmt: skip


def _events_section(events: list[dict[str, Any]]) -> str:
    if not events:
        return ""
    rows = [(e["step"], e["kind"], e["reason"], e["loss"], e["grad_norm"],
             compact(e["detail"]) if e["detail"] else "") for e in events]  # fmt: skip
    return "<h2>Guard-rail events</h2>" + table(
        ["step", "kind", "reason", "loss", "grad norm", "detail"], rows
    )
