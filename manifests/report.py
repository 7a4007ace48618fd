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
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from manifests.report_evals import render_eval, summarise_eval
from manifests.report_html import esc, page, plot
from manifests.report_runs import render_run, summarise_run
from manifests.scan import data_schema, scan_rows
from manifests.schema import Manifest
from manifests.verify import ensure_verified

if TYPE_CHECKING:
    import polars as pl

_SKIP_NUMERIC = {"line", "row", "offset", "http_status"}
_BINS = 30
_WHITESPACE = (
    r"[\t-\r\x{1c}-\x{20}\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}]"
)
"""The characters Arrow's ``utf8_split_whitespace`` splits on (those of Python's ``str.isspace``)."""
_ROW = "__report_row"


def _histogram(values: pl.DataFrame, total: float | None = None, bins: int = _BINS) -> dict[str, Any]:
    """The histogram of a column given as its value counts (``v`` ascending, ``n``): count, min, max,
    mean, median and ``bins`` equal bins. ``total`` is the sum of the values in row order (floats: it
    is added up in that order, as Python's ``sum`` does), else it is summed from the counts.

    Value counts keep the memory to the number of distinct values (lengths have few), and give the
    exact median without holding every value.
    """
    import polars as pl

    if values.is_empty():
        return {"count": 0}
    values = values.sort("v")
    count = values["n"].sum()
    lo, hi = values["v"][0], values["v"][-1]
    if total is None:
        total = values.select((pl.col("v") * pl.col("n")).sum()).item()
    width = (hi - lo) / bins or 1.0
    ranked = values.with_columns(upto=pl.col("n").cum_sum())

    def at(rank: int):
        return ranked.filter(pl.col("upto") > rank)["v"][0]

    mid = count // 2
    median = at(mid) if count % 2 else (at(mid - 1) + at(mid)) / 2
    # numpy, not polars, divides: polars multiplies by the reciprocal, which puts a value on a bin edge
    # into the bin below.
    index = np.minimum(((values["v"].to_numpy() - lo) / width).astype(np.int64), bins - 1)
    counts = np.bincount(index, weights=values["n"].to_numpy(), minlength=bins).astype(np.int64).tolist()
    return {"count": count, "min": lo, "max": hi, "mean": total / count, "median": median,
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
    schema = data_schema(manifest)
    measured = _measure(manifest, schema) if schema is not None else {}
    stats = manifest.stats
    pii = measured.get("pii") or Counter(stats.get("pii", {}))
    empty = {"count": 0}
    return {
        "kind": "dataset", "dataset": manifest.ref, "id": manifest.id, "stage": manifest.producer.stage,
        "rows": sum(f.rows or 0 for f in manifest.data_files()), "splits": manifest.splits(),
        "funnel": stats.get("funnel", []),
        "languages": measured.get("languages", {}),
        "length_chars": measured.get("length_chars", empty), "length_words": measured.get("length_words", empty),
        "scores": measured.get("scores", {}),
        "pii": dict(pii.most_common()),
        "contamination": stats.get("contamination", {}),
    }  # fmt: skip


def _measure(manifest: Manifest, schema: pa.Schema) -> dict[str, Any]:
    """Lengths, score columns, languages and PII counts over every row: polars queries over one
    streaming scan of the dataset (``manifests.scan``) whose results are value counts and sums, so
    memory grows with the distinct values of a column, not with its rows."""
    import polars as pl

    used = ["text", "language", "pii_counts"]
    used += [f.name for f in schema if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)]
    rows = scan_rows(manifest, schema, used)
    measures: dict[str, pl.Expr] = {}
    floats: list[str] = []
    if "text" in schema.names:
        text = pl.col("text")
        measures["length_chars"] = text.str.len_chars().cast(pl.Int64)
        measures["length_words"] = _arrow_word_count(text)
    for field in schema:
        if field.name in _SKIP_NUMERIC:
            continue
        if pa.types.is_integer(field.type):
            measures[f"score {field.name}"] = pl.col(field.name).cast(pl.Int64)
        elif pa.types.is_floating(field.type):
            measures[f"score {field.name}"] = pl.col(field.name).cast(pl.Float64)
            floats.append(f"score {field.name}")
    queries = {
        name: rows.select(v=value).drop_nulls().group_by("v").agg(n=pl.len())
        for name, value in measures.items()
    }
    # Floats are added up in row order, as Python's sum() does (polars' sum() adds them pairwise).
    queries["sums"] = rows.select(
        [measures[k].drop_nulls().cum_sum().last().alias(k) for k in floats] or pl.len()
    )
    if "language" in schema.names:
        queries["languages"] = _first_seen_counts(rows, "language")
    pii_type = schema.field("pii_counts").type if "pii_counts" in schema.names else None
    if pii_type is not None and pa.types.is_struct(pii_type):
        found = rows.filter(pl.col("pii_counts").is_not_null())
        fields = [pl.col("pii_counts").struct.field(f.name).sum() for f in pii_type]
        queries["pii"] = found.select(pl.len().alias(_ROW), *fields)
    elif pii_type is not None and (pa.types.is_string(pii_type) or pa.types.is_large_string(pii_type)):
        queries["pii"] = _first_seen_counts(rows.filter(pl.col("pii_counts").is_not_null()), "pii_counts")
    results = dict(zip(queries, pl.collect_all(list(queries.values()), engine="streaming"), strict=True))

    sums = results["sums"].row(0, named=True)
    out: dict[str, Any] = {"scores": {}}
    for name in measures:
        hist = _histogram(results[name], sums.get(name))
        if name.startswith("score "):
            out["scores"][name.removeprefix("score ")] = hist
        else:
            out[name] = hist
    out["scores"] = dict(sorted(out["scores"].items()))
    if "languages" in results:
        out["languages"] = dict(results["languages"].iter_rows())
    pii: Counter = Counter()
    if "pii" in results and pii_type is not None and pa.types.is_struct(pii_type):
        totals = results["pii"].row(0, named=True)
        if totals.pop(_ROW):  # else no row has counts, and the manifest's stats say what was found
            pii.update(totals)
    elif "pii" in results:
        for value, n in results["pii"].iter_rows():
            counts = json.loads(value)
            for key, count in (counts if isinstance(counts, dict) else Counter(counts)).items():
                pii[key] += count * n
    out["pii"] = pii
    return out


def _arrow_word_count(text: pl.Expr) -> pl.Expr:
    """The pieces of Arrow's ``utf8_split_whitespace`` (what the report has always counted as words):
    one more than the runs of whitespace, so leading or trailing whitespace adds an empty piece and ""
    is one; and a run of two or more at the end counts twice (Arrow leaves its last character out of
    the run)."""
    import polars as pl

    runs = text.str.count_matches(_WHITESPACE + "+").cast(pl.Int64)
    return runs + 1 + text.str.contains(_WHITESPACE + _WHITESPACE + "$").cast(pl.Int64)


def _first_seen_counts(rows: pl.LazyFrame, column: str) -> pl.LazyFrame:
    """(value, rows) of ``column``, most frequent first and ties in order of first appearance: the
    order of ``Counter.most_common`` over the rows."""
    import polars as pl

    # The row index is taken here, on this query's own column: on the scan that every query shares, it
    # made polars buffer the whole dataset for the others.
    counted = (
        rows.select(column).with_row_index(_ROW).group_by(column).agg(n=pl.len(), first=pl.col(_ROW).min())
    )
    return counted.sort(["n", "first"], descending=[True, False]).select(column, "n")


def _hist_plot(title: str, hist: dict[str, Any]) -> str:
    if not hist.get("count"):
        return ""

    def draw(ax):
        edges = hist["bin_edges"]
        ax.bar(edges[:-1], hist["counts"], width=(edges[1] - edges[0]) or 1, align="edge", color="#4a78a8")
        ax.set_title(title)
        ax.set_ylabel("documents")

    return plot(draw, size=(6, 3.2))


def _bar_plot(title: str, counts: dict[str | None, int]) -> str:
    if not counts:
        return ""
    # Rows with no value (a null language) are a bar of their own; matplotlib takes no None label.
    items = [("(none)" if k is None else str(k), v) for k, v in list(counts.items())[:20]]

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
