"""Building blocks of the report pages (datasets, runs, evals).

A page is one self-contained HTML file: inline CSS, plots as PNG data URIs, no script and no
external URL. Its Content-Security-Policy says so to the browser too, so that a model output or a
file name that slipped through unescaped could not run or fetch anything.

Every value from the store (names, recipe values, model outputs) is untrusted text: ``cell`` and
``table`` escape whatever is not already ``Html`` built here.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Callable, Iterable
from typing import Any

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

STYLE = (
    "body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0 1em}"
    "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}"
    "th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}"
    ".out{white-space:pre-wrap;word-break:break-word;font-family:monospace;font-size:.85em;max-width:28em}"
    "pre{white-space:pre-wrap;word-break:break-word}.note{color:#555}.scroll{overflow-x:auto}img{max-width:100%}.plots{display:flex;flex-wrap:wrap;gap:.5em}"
)


class Html(str):
    """Markup built by this module (or checked by its caller): inserted as is, never escaped again."""


def esc(value: Any) -> Html:
    return Html(html.escape(str(value)))


def number(value: Any, digits: int = 4) -> str:
    """A number as a report shows it: ints whole, floats to ``digits`` significant digits."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}"


def finite(value: Any) -> float | None:
    """A finite float, or None (JSON has no NaN; the monitor writes non-finite values as strings)."""
    if isinstance(value, bool):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def compact(value: Any, limit: int = 160) -> str:
    """A recipe or stats value on one line: JSON for structures, shortened past ``limit`` characters."""
    text = value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def cell(value: Any) -> Html:
    """One table cell: numbers right-aligned, ``Html`` as is, anything else escaped."""
    if isinstance(value, Html):
        return Html(f"<td>{value}</td>")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return Html(f"<td class='num'>{number(value)}</td>")
    return Html(f"<td>{esc('—' if value is None else value)}</td>")


def table(headers: Iterable[str], rows: Iterable[Iterable[Any]]) -> Html:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return Html(f"<div class='scroll'><table><tr>{head}</tr>{body}</table></div>")


def key_values(pairs: Iterable[tuple[str, Any]]) -> Html:
    """A two-column table of settings or stats, keys as row headers; structures on one line (``compact``)."""
    rows = "".join(
        f"<tr><th>{esc(key)}</th>{cell(number(v) if isinstance(v, int | float) else compact(v))}</tr>"
        for key, v in pairs
    )
    return Html(f"<div class='scroll'><table>{rows}</table></div>") if rows else Html("")


def parents_table(parents: list[dict[str, Any]]) -> Html:
    if not parents:
        return Html("<p class='note'>no parents</p>")
    return table(
        ["role", "kind", "name", "id"], [(p["role"], p["kind"], p["name"], p["id"][:12]) for p in parents]
    )


def plot(draw: Callable[[Any], None], size: tuple[float, float] = (7, 3.2)) -> Html:
    """``draw(ax)`` rendered to a PNG, inlined."""
    import matplotlib

    matplotlib.use("Agg")  # no screen: render to memory
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=100)
    try:
        draw(ax)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return Html(f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">')


def page(title: str, sections: Iterable[str]) -> str:
    """The whole HTML document; ``sections`` are markup (empty ones are left out)."""
    body = "\n".join(s for s in sections if s)
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">"
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>{body}</body></html>\n"
    )
