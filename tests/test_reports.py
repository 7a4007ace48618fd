"""``manifests report`` for datasets, runs and evals: the JSON summaries, the HTML (escaped,
self-contained), and every page opened in a real headless Chromium -- rendered, not blank, and
without a console error, an uncaught exception, an undecoded image or a blocked resource.

The artefacts are published by hand with ``Publisher`` (a fake run's ``metrics.jsonl`` written as
the trainers' monitor writes it, an eval's ``metrics.json`` and records as the eval stage writes
them), so nothing here trains or generates.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest

from manifests.publish import Publisher
from manifests.report import render_html, summarise
from manifests.schema import Manifest
from manifests.store import Store

from .conftest import assert_one_line_error

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium on this machine: the report browser tests need a headless Chromium "
    "('make setup' installs Debian's chromium where it can)",
)

SCRIPT = "<script>alert('pwned')</script>"


# -- publishing the artefacts ------------------------------------------------------------------


def _dataset(store: Store) -> Manifest:
    texts = [f"alpha beta gamma document {i} " + "delta " * (i % 7) for i in range(12)]
    table = pa.table({"id": [f"d{i}" for i in range(12)], "text": texts, "language": ["en"] * 10 + ["de"] * 2,
                      "language_score": [0.7 + i / 50 for i in range(12)]})  # fmt: skip
    funnel = [
        {"step": "read", "in": 14, "out": 14},
        {"step": "min_words", "in": 14, "out": 12, "removed": {"too_short": 2}},
    ]
    with Publisher(store, kind="dataset", name="qa", stage="corpus.build", recipe={"name": "qa"}) as pub:
        pub.write_table(table, split="test")
        return pub.publish(stats={"funnel": funnel})


def _base_model(store: Store) -> Manifest:
    """An imported model: a checkpoint, no training metrics."""
    with Publisher(
        store, kind="run", name="base", stage="train.import-model", recipe={"source": "tiny"}
    ) as pub:
        (pub.dir / "checkpoint").mkdir()
        (pub.dir / "checkpoint" / "config.json").write_text('{"model_type": "llama"}')
        return pub.publish(stats={"parameters": 1234})


def _metrics_lines() -> list[str]:
    """What ``train.monitor`` writes: steps, evaluations, a guard event -- and a last line cut short."""
    lines = []
    for step in range(1, 31):
        record = {"step": step, "loss": round(4.0 - step * 0.08, 4), "lr": 3e-4 * min(1.0, step / 5),
                  "grad_norm": 1.5 - step * 0.02, "tokens": step * 4096, "tokens_per_s": 5000.0 + step,
                  "mfu": 0.4, "elapsed_s": step * 0.8}  # fmt: skip
        if step % 10 == 0:
            record["eval_loss"] = 3.9 - step * 0.05
        lines.append(json.dumps(record))
        if step == 15:
            guard = {"step": 16, "reason": "loss_spike", "loss": 9.7, "grad_norm": 4.1, "action": "skip"}
            lines.append(json.dumps({"step": 16, "guard": guard}))
    return [*lines, '{"step": 31, "loss": 1.5, "lr": 0.0003, "grad_n']  # killed mid-write


def _run(store: Store, data: Manifest, base: Manifest, lines: list[str], name: str = "sft-run") -> Manifest:
    recipe = {"method": "sft", "name": name, "model": base.id, "datasets": [{"ref": data.id, "split": "test"}],
              "learning_rate": 3e-4, "max_steps": 30, "peft": {"method": "lora", "r": 8},
              "seed": 0}  # fmt: skip
    nan_grad = {"step": 22, "reason": "nan_grad", "loss": "nan", "grad_norm": "inf", "action": "skip"}
    with Publisher(store, kind="run", name=name, stage="train.sft", recipe=recipe, parents=[data, base],
                   parent_roles={base.id: "base_model"}) as pub:  # fmt: skip
        (pub.dir / "metrics.jsonl").write_text("\n".join(lines))
        (pub.dir / "checkpoint").mkdir()
        (pub.dir / "checkpoint" / "config.json").write_text('{"model_type": "llama"}')
        # TRL-run methods keep their guard events in the stats only (here: the step-22 one).
        guards = [json.loads(line)["guard"] for line in lines if '"guard"' in line] + [nan_grad]
        return pub.publish(stats={"method": "sft", "steps": 30, "final_loss": 1.6, "guard_triggers": guards})


def _eval(store: Store, data: Manifest, runs: dict[str, Manifest | None], answer_s1: dict[str, str] | None = None,
          wrapped: bool = True):  # fmt: skip
    """An eval of ``runs`` (label → run; None for an endpoint) on ``data``, published as the eval stage
    does: per-sample records and ``metrics.json``. ``answer_s1`` gives a label's answer to sample s1;
    not ``wrapped``, each model's entry is its metrics alone (``{metric: {...}}``, no run id)."""
    rows = []
    for label, run in runs.items():
        for i in range(4):
            right = (i + len(label)) % 2 == 0
            answer = (answer_s1 or {}).get(label) if i == 1 else None
            rows.append({
                "id": f"{label}-s{i}", "parents": [f"d{i}"], "sample_id": f"s{i}", "task": "qa", "model": label,
                "model_id": run.id if run else None, "prompt_sha256": "ab" * 32, "target_sha256": "cd" * 32,
                "outputs": [answer or f"{label} says {i}", "second"], "extracted": [str(i)], "correct": right,
                "exact_match": float(right), "rougeL": 0.25,
            })  # fmt: skip
    scores = {
        "exact_match": {"value": 0.5, "low": 0.0, "high": 1.0, "n": 4},
        "rougeL": {"value": 0.25, "low": 0.2, "high": 0.3, "n": 4, "higher_is_better": True},
    }
    a, b = list(runs)
    diffs = {
        "exact_match": {"diff": 0.0, "low": -0.5, "high": 0.5, "n": 4},
        "rougeL": {"diff": 0.01, "low": 0.005, "high": 0.02, "n": 4},
    }
    flipped = {"a_only": ["s1"], "b_only": ["s0"]} | ({} if wrapped else {"metric": "exact_match"})
    task = {
        "dataset": data.id, "split": "test", "samples": 4, "primary": "exact_match",
        "models": {label: {"run_id": run.id if run else None, "metrics": scores} if wrapped else scores
                   for label, run in runs.items()},
        "paired": [{"a": a, "b": b, "metrics": diffs, "flipped": flipped}],
    }  # fmt: skip
    metrics = {"bootstrap": {"samples": 1000, "seed": 0, "confidence": 0.95}, "tasks": {"qa": task}}
    models = [r for r in runs.values() if r is not None]
    roles = {r.id: "model" for r in models} | {data.id: "eval_data"}
    with Publisher(store, kind="eval", name="qa-eval", stage="eval", recipe={"tasks": ["qa"]},
                   parents=[*models, data], parent_roles=roles) as pub:  # fmt: skip
        pub.write_table(pa.Table.from_pylist(rows), split="records")
        (pub.dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return pub.publish(stats={"tasks": 1})


@pytest.fixture
def published(store):
    data = _dataset(store)
    base = _base_model(store)
    run = _run(store, data, base, _metrics_lines())
    evaluation = _eval(store, data, {"base": base, "sft": run}, answer_s1={"base": f"{SCRIPT} & <b>bold</b>"})
    return {"dataset": data, "untrained-run": base, "run": run, "eval": evaluation}


def _not_json(constant: str):
    raise AssertionError(f"the JSON holds {constant}, which strict JSON readers reject")


# -- the summaries and pages -------------------------------------------------------------------


def test_run_report_json_has_curves_guard_events_and_skips_a_truncated_line(cli, store, published):
    result = cli("--store", store.root, "manifests", "report", "sft-run", "--format", "json")
    assert result.code == 0, result.err
    summary = json.loads(result.out, parse_constant=_not_json)
    assert summary["kind"] == "run" and summary["method"] == "sft" and summary["stage"] == "train.sft"
    assert {p["role"] for p in summary["parents"]} == {"input", "base_model"}
    assert summary["settings"]["learning_rate"] == 3e-4 and summary["settings"]["peft"]["method"] == "lora"
    metrics = summary["metrics"]
    assert metrics["skipped_lines"] == [32] and metrics["records"] == 31  # 30 steps + 1 guard event
    curves = metrics["curves"]
    assert [len(curves[k]) for k in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu")] == [30] * 5
    assert [s for s, _ in curves["eval_loss"]] == [10, 20, 30]
    # The file's event and the one only in the stats, each once, non-finite values kept as written.
    assert [(e["step"], e["kind"], e["reason"]) for e in metrics["guard_events"]] == [
        (16, "skip", "loss_spike"), (22, "skip", "nan_grad")]  # fmt: skip
    assert metrics["guard_events"][1]["grad_norm"] == "inf" and "guard_triggers" not in summary["stats"]


def test_run_report_html_marks_the_guard_events(store, published):
    page = render_html(summarise(published["run"]))
    assert page.count("data:image/png;base64,") == 6  # loss (+ eval), lr, grad norm, tokens/s, MFU, eval loss
    assert "Guard-rail events" in page and "loss_spike" in page and "nan_grad" in page
    assert "1 unreadable line(s) of metrics.jsonl skipped (line 32)" in page
    assert "base_model" in page and "train.sft" in page


def test_a_rollback_keeps_the_steps_the_run_kept_and_marks_the_rest_discarded(store):
    data, base = _dataset(store), _base_model(store)
    lines = [json.dumps({"step": s, "loss": 3.0 - s / 10, "lr": 1e-3}) for s in range(1, 8)]
    rollback = {"step": 8, "reason": "loss_spike", "loss": 40.0, "grad_norm": 9.0, "action": "rollback",
                "positions": [3, 4]}  # fmt: skip
    lines.append(json.dumps({"step": 8, "guard": rollback}))
    lines += [json.dumps({"step": s, "loss": 2.0 - s / 10, "learning_rate": 1e-3}) for s in range(6, 11)]
    summary = summarise(_run(store, data, base, lines, name="pre"))
    curves = summary["metrics"]["curves"]
    assert [s for s, _ in curves["loss"]] == list(range(1, 11)) and curves["loss"][5] == [6, 1.4]
    assert len(curves["lr"]) == 10  # 'learning_rate' (transformers' name) is the same curve
    assert summary["metrics"]["discarded_loss"] == [[6, 2.4], [7, 2.3]]
    event = summary["metrics"]["guard_events"][0]
    assert event["kind"] == "rollback" and event["detail"] == {"positions": [3, 4]}
    assert "rollback" in render_html(summary)


def test_a_run_without_metrics_renders_a_page_that_says_so(cli, store, published, tmp_path):
    out = tmp_path / "base.html"
    assert cli("--store", store.root, "manifests", "report", "base", "--out", out).code == 0
    page = out.read_text()
    assert "has no training metrics" in page and "train.import-model" in page and "data:image" not in page


def test_eval_report_json_has_intervals_pairs_and_flipped_outputs(cli, store, published):
    result = cli("--store", store.root, "manifests", "report", "qa-eval", "--format", "json")
    assert result.code == 0, result.err
    summary = json.loads(result.out, parse_constant=_not_json)
    assert summary["kind"] == "eval" and summary["bootstrap"]["samples"] == 1000 and summary["records"] == 8
    assert {p["role"] for p in summary["parents"]} == {"model", "eval_data"}
    task = summary["tasks"]["qa"]
    assert task["metric_names"] == ["exact_match", "rougeL"] and set(task["models"]) == {"base", "sft"}
    pair = task["paired"][0]
    assert pair["flipped"] == {"metric": None, "a_only": ["s1"], "b_only": ["s0"]}
    by_id = {e["sample_id"]: e for e in pair["examples"]}
    assert by_id["s1"]["right"] == "a" and by_id["s1"]["outputs"]["base"].startswith(SCRIPT)
    assert by_id["s0"]["outputs"] == {"base": "base says 0", "sft": "sft says 0"}


def test_eval_page_shows_intervals_and_escapes_model_outputs(store, published):
    page = render_html(summarise(published["eval"]))
    assert "0.5 <span class='note'>[0, 1]</span>" in page  # value [low, high]
    assert "<b>0.01 <span class='note'>[0.005, 0.02]</span></b>" in page  # an interval that excludes 0
    assert "exact_match (primary)" in page and "rougeL ↑" in page and "Flipped samples: base vs sft" in page
    assert SCRIPT not in page and "<b>bold</b>" not in page
    assert "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in page
    assert "<script" not in page.lower()  # the page needs no script at all


def test_an_eval_of_an_endpoint_and_a_hostile_label_is_escaped_everywhere(store):
    data, base = _dataset(store), _base_model(store)
    evaluation = _eval(store, data, {"base": base, "<i>api</i>": None})
    summary = summarise(evaluation)
    assert summary["tasks"]["qa"]["models"]["<i>api</i>"]["run_id"] is None
    page = render_html(summary)
    assert "<i>api</i>" not in page and "&lt;i&gt;api&lt;/i&gt;" in page and "endpoint" in page


def test_model_entries_without_a_run_id_take_it_from_the_records(store):
    data, base = _dataset(store), _base_model(store)
    summary = summarise(_eval(store, data, {"base": base, "api": None}, wrapped=False))
    task = summary["tasks"]["qa"]
    assert task["models"]["base"] == {"metrics": task["models"]["api"]["metrics"], "run_id": base.id}
    assert task["models"]["api"]["run_id"] is None and task["paired"][0]["flipped"]["metric"] == "exact_match"
    page = render_html(summary)
    assert f"<td>{base.id[:12]}</td>" in page and "<td>endpoint</td>" in page
    assert "Flipped samples: base vs api (exact_match)" in page


def test_older_harness_and_metricless_evals_render(store):
    data, base = _dataset(store), _base_model(store)

    def publish(name: str, stage: str, metrics: dict | None, recipe: dict | None = None) -> Manifest:
        with Publisher(
            store, kind="eval", name=name, stage=stage, recipe=recipe or {}, parents=[base, data]
        ) as pub:
            if metrics is not None:
                (pub.dir / "metrics.json").write_text(json.dumps(metrics))
            return pub.publish()

    # The perplexity eval before tasks: {model: {"perplexity": …}}, one task without intervals.
    older = publish("ppl", "eval.perplexity", {base.ref: {"run_id": base.id, "perplexity": 12.5, "tokens": 80},
                                               "broken": {"run_id": None, "perplexity": float("inf")}},
                    {"metric": "perplexity", "dataset": {"ref": data.id, "split": "test"}})  # fmt: skip
    summary = summarise(older)
    models = summary["tasks"]["perplexity"]["models"]
    assert models[base.ref]["metrics"]["perplexity"] == {"value": 12.5}
    assert models["broken"]["metrics"]["perplexity"] == {"value": "inf"}  # JSON has no Infinity
    json.dumps(summary, allow_nan=False)
    page = render_html(summary)
    assert summary["intervals"] is None and "<td>12.5</td>" in page and "<td>inf</td>" in page
    # eval.harness: no bootstrap, its own interval, no dataset manifest, no pairs.
    interval = "value ± 1.96 × lm-eval's stderr (normal approximation)"
    scores = {"acc": {"value": 0.6, "low": 0.5, "high": 0.7, "n": 30, "higher_is_better": True}}
    harness = {"bootstrap": None, "harness": {"interval": interval}, "tasks": {"arc_easy": {
        "dataset": None, "split": None, "samples": 30, "primary": "acc", "paired": [],
        "models": {base.ref: {"run_id": base.id, "metrics": scores}}}}}  # fmt: skip
    page = render_html(summarise(publish("arc", "eval.harness", harness)))
    assert "intervals: value ± 1.96 × lm-eval&#x27;s stderr" in page and "acc ↑ (primary)" in page
    assert "0.6 <span class='note'>[0.5, 0.7]</span>" in page
    assert "has no metrics.json" in render_html(summarise(publish("none", "eval", None)))


def test_report_of_a_missing_reference_is_one_error_line(cli, store, published):
    result = cli("--store", store.root, "manifests", "report", "no-such-run", "--format", "json")
    assert_one_line_error(result)
    assert "no-such-run" in result.err and result.out == ""


def test_a_malformed_metrics_json_is_one_error_line(cli, store):
    data, base = _dataset(store), _base_model(store)
    with Publisher(store, kind="eval", name="bad", stage="eval", recipe={}, parents=[base, data]) as pub:
        (pub.dir / "metrics.json").write_text('{"tasks": {"qa": ')
        pub.publish()
    result = cli("--store", store.root, "manifests", "report", "bad", "--out", store.root / "bad.html")
    assert_one_line_error(result)
    assert "metrics.json: not valid JSON" in result.err and not (store.root / "bad.html").exists()


# -- in a real browser -------------------------------------------------------------------------

_PROBE = """<script>(function(){var seen=[];function note(k,m){seen.push(k+": "+m);}
window.addEventListener("error",function(e){if(e.target&&e.target!==window&&e.target.tagName){
note("resource failed",e.target.tagName+" "+String(e.target.src||e.target.href).slice(0,80));}
else{note("uncaught",e.message);}},true);
window.addEventListener("unhandledrejection",function(e){note("unhandled rejection",String(e.reason));});
["error","warn"].forEach(function(l){var o=console[l];console[l]=function(){
note("console."+l,Array.prototype.join.call(arguments," "));return o.apply(console,arguments);};});
window.addEventListener("load",function(){Array.prototype.forEach.call(document.images,function(i){
if(!i.complete||!i.naturalWidth){note("image not decoded",String(i.src).slice(0,60));}});
var p=document.createElement("pre");p.id="report-probe";p.textContent=JSON.stringify(seen);
document.body.appendChild(p);});})();</script>"""
"""Put first in a copy of the page (before its Content-Security-Policy, which then does not apply to
it): records uncaught errors, console errors and warnings, failed loads and images that did not
decode, into an element ``--dump-dom`` prints."""

_CONSOLE = re.compile(r"CONSOLE[:(]\d*\)?\] (.*)")
"""A console message in Chromium's log (``--enable-logging=stderr``): every level, uncaught errors and
what the page's Content-Security-Policy blocked too."""


def _chromium(page: Path, *args: str) -> subprocess.CompletedProcess:
    profile = page.parent / f"{page.stem}-profile"
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
         f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args, page.as_uri()],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip


def browser_problems(page: Path) -> list[str]:
    """What went wrong while Chromium loaded ``page``: the probe's findings, and every console message
    of the browser's log (the pages have no script, so any message is a fault)."""
    probed = page.with_name(f"{page.stem}-probed.html")
    probed.write_text(page.read_text().replace("<head>", "<head>" + _PROBE, 1))
    run = _chromium(probed, "--dump-dom")
    found = re.search(r'<pre id="report-probe">(.*?)</pre>', run.stdout, re.S)
    assert found, f"the probe did not report (exit {run.returncode}): {run.stderr[-2000:]}"
    problems = json.loads(html.unescape(found.group(1)))
    problems += [f"console: {m}" for m in _CONSOLE.findall(run.stderr)]
    return problems


def screenshot(page: Path) -> tuple[Path, list[str]]:
    """A 1280x2000 screenshot of ``page``, and the console messages logged while taking it."""
    png = page.with_suffix(".png")
    run = _chromium(page, f"--screenshot={png}", "--window-size=1280,2000")
    assert run.returncode == 0 and png.is_file(), run.stderr[-2000:]
    return png, [f"console: {m}" for m in _CONSOLE.findall(run.stderr)]


def ink(png: Path) -> tuple[int, float]:
    """(distinct colours, fraction of pixels that are not white) of a screenshot."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    colours = len(np.unique(pixels[:: max(1, len(pixels) // 200_000)], axis=0))
    return colours, float((pixels < 245).any(axis=1).mean())


@pytest.mark.browser
@needs_chromium
@pytest.mark.parametrize("kind", ["dataset", "run", "untrained-run", "eval"])
def test_every_report_renders_in_a_real_browser(kind, published, tmp_path):
    page = tmp_path / f"{kind}.html"
    page.write_text(render_html(summarise(published[kind])), encoding="utf-8")
    text = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", text), (
        "the page loads something from outside"
    )
    png, console = screenshot(page)
    problems = browser_problems(page) + console
    assert problems == [], problems
    colours, inked = ink(png)
    assert colours > 2 and inked > (0.02 if kind != "untrained-run" else 0.005), (colours, inked)


@pytest.mark.browser
@needs_chromium
def test_the_browser_check_catches_errors_broken_images_and_an_escaping_bug(published, tmp_path):
    broken = tmp_path / "broken.html"
    broken.write_text("<!doctype html><html><head><meta charset='utf-8'></head><body><h1>broken</h1>"
                      "<img src='data:image/png;base64,AAAAnotapng'><script>console.error('boom');"
                      "undefinedFunction();</script></body></html>")  # fmt: skip
    problems = browser_problems(broken)
    assert "console.error: boom" in problems
    assert any(p.startswith("uncaught:") and "undefinedFunction is not defined" in p for p in problems), (
        problems
    )
    assert any(p.startswith("image not decoded: data:image/png") for p in problems), problems
    _, console = screenshot(broken)
    assert any("Uncaught ReferenceError" in m for m in console), console
    # A report whose model output escaped unescaped: the page's policy blocks it, and the check says so.
    leaky = tmp_path / "leaky.html"
    leaky.write_text(render_html(summarise(published["eval"])).replace("<h1>", SCRIPT + "<h1>", 1))
    problems = browser_problems(leaky)
    assert any("violates the following Content Security Policy" in p for p in problems), problems
