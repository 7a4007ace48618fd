"""Reports: one self-contained HTML page (plots inlined) or JSON for machines, for a dataset, a run
or an eval.

    distillery manifests report demo-corpus                 # → demo-corpus-<id>.html
    distillery manifests report demo-sft-run --format json

A dataset's page shows the funnel (documents in, removed per step with reasons, out), the language
distribution, document length, every numeric score column, PII counts and contamination per
benchmark — read from the manifest's stats and the dataset's columns (the text itself is only
measured, never shown). A run's page is ``report_runs``, an eval's ``report_evals``; the shared
page, table and plot helpers are ``report_html``.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from manifests.data import read_shard
from manifests.report_evals import render_eval, summarise_eval
from manifests.report_html import esc, page, plot
from manifests.report_runs import render_run, summarise_run
from manifests.schema import Manifest
from manifests.verify import ensure_verified

_SKIP_NUMERIC = {"line", "row", "offset", "http_status"}
_BINS = 30


def _histogram(values: list[float], bins: int = _BINS) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    lo, hi = min(values), max(values)
    width = (hi - lo) / bins or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(int((v - lo) / width), bins - 1)] += 1
    ordered = sorted(values)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return {"count": len(values), "min": lo, "max": hi, "mean": sum(values) / len(values), "median": median,
            "bin_edges": [lo + i * width for i in range(bins + 1)], "counts": counts}  # fmt: skip


def summarise(manifest: Manifest) -> dict[str, Any]:
    """Everything the report shows, as plain data (the ``--format json`` output); ``kind`` says which."""
    if manifest.kind == "run":
        return _json_safe(summarise_run(manifest))
    if manifest.kind == "eval":
        return _json_safe(summarise_eval(manifest))
    return _json_safe(summarise_dataset(manifest))


def _json_safe(value: Any) -> Any:
    """Non-finite numbers as the strings the trainers' monitor writes (``"nan"``, ``"inf"``): JSON has
    no NaN, and a perplexity of a broken model can be infinite."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def render_html(summary: dict[str, Any]) -> str:
    """The page of a ``summarise`` result."""
    if summary["kind"] == "run":
        return render_run(summary)
    if summary["kind"] == "eval":
        return render_eval(summary)
    return render_dataset(summary)


def summarise_dataset(manifest: Manifest) -> dict[str, Any]:
    """What a dataset's page shows: measured from its columns and its manifest's stats."""
    ensure_verified(manifest)
    languages: Counter = Counter()
    chars: list[float] = []
    words: list[float] = []
    scores: dict[str, list[float]] = {}
    pii: Counter = Counter()
    for f in manifest.data_files():
        table = read_shard(manifest.location / f.path, ref=manifest.ref)
        if "text" in table.column_names:
            text = table.column("text")
            chars += pc.utf8_length(text).to_pylist()
            words += pc.list_value_length(pc.utf8_split_whitespace(text)).to_pylist()
        if "language" in table.column_names:
            languages.update(table.column("language").to_pylist())
        for field in table.schema:
            if field.name in _SKIP_NUMERIC or not (
                pa.types.is_floating(field.type) or pa.types.is_integer(field.type)
            ):
                continue
            scores.setdefault(field.name, []).extend(
                v for v in table.column(field.name).to_pylist() if v is not None
            )
        if "pii_counts" in table.column_names:
            for counts in table.column("pii_counts").to_pylist():
                pii.update(json.loads(counts) if isinstance(counts, str) else (counts or {}))
    stats = manifest.stats
    pii.update(stats.get("pii", {}) if not pii else {})
    return {
        "kind": "dataset", "dataset": manifest.ref, "id": manifest.id, "stage": manifest.producer.stage,
        "rows": sum(f.rows or 0 for f in manifest.data_files()), "splits": manifest.splits(),
        "funnel": stats.get("funnel", []),
        "languages": dict(languages.most_common()),
        "length_chars": _histogram(chars), "length_words": _histogram(words),
        "scores": {name: _histogram(values) for name, values in sorted(scores.items())},
        "pii": dict(pii.most_common()),
        "contamination": stats.get("contamination", {}),
    }  # fmt: skip


def _hist_plot(title: str, hist: dict[str, Any]) -> str:
    if not hist.get("count"):
        return ""

    def draw(ax):
        edges = hist["bin_edges"]
        ax.bar(edges[:-1], hist["counts"], width=(edges[1] - edges[0]) or 1, align="edge", color="#4a78a8")
        ax.set_title(title)
        ax.set_ylabel("documents")

    return plot(draw, size=(6, 3.2))


def _bar_plot(title: str, counts: dict[str, int]) -> str:
    if not counts:
        return ""
    items = list(counts.items())[:20]

    def draw(ax):
        ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1], color="#4a78a8")
        ax.set_title(title)

    return plot(draw, size=(6, 3.2))


def render_dataset(summary: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{esc(str(r['step']))}</td><td>{r['in']}</td><td>{r['out']}</td><td>{r.get('changed', '')}</td>"
        f"<td>{esc(', '.join(f'{k}: {v}' for k, v in r.get('removed', {}).items()))}</td></tr>"
        for r in summary["funnel"]
    )
    sections = [
        f"<h1>Dataset {esc(summary['dataset'])}</h1>",
        f"<p>id <code>{summary['id']}</code> · stage {esc(summary['stage'])} · {summary['rows']} rows · "
        f"splits {esc(', '.join(summary['splits']))}</p>",
        "<h2>Funnel</h2><table><tr><th>step</th><th>in</th><th>out</th><th>changed</th><th>removed</th></tr>"
        f"{rows}</table>" if rows else "",
        "<h2>Languages</h2>" + _bar_plot("documents per language", summary["languages"]) if summary["languages"] else "",
        "<h2>Length</h2>" + _hist_plot("characters per document", summary["length_chars"])
        + _hist_plot("words per document", summary["length_words"]),
        "<h2>Scores</h2>" + "".join(_hist_plot(name, hist) for name, hist in summary["scores"].items())
        if summary["scores"] else "",
        "<h2>PII found</h2>" + _bar_plot("findings per entity type", summary["pii"]) if summary["pii"] else "",
        "<h2>Contamination</h2><table><tr><th>benchmark</th><th>documents removed or flagged</th><th>examples hit</th>"
        "<th>examples</th><th>fraction</th></tr>" + "".join(
            f"<tr><td>{esc(name)}</td><td>{c['documents']}</td><td>{c['examples_hit']}</td><td>{c['examples']}</td>"
            f"<td>{c['fraction']:.2%}</td></tr>" for name, c in summary["contamination"].items()) + "</table>"
        if summary["contamination"] else "",
    ]  # fmt: skip
    return page(summary["dataset"], sections)
