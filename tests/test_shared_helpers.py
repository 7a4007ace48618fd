"""The helpers corpus and synth share through ``manifests/`` (one of each), and the import graph."""

from __future__ import annotations

import ast
import email.utils
import threading
import time
from pathlib import Path

import pytest

from manifests.retry_after import parse_delay, parse_retry_after
from manifests.time_limit import TimeLimitExceeded, call_with_time_limit

from .conftest import ROOT

# --- Retry-After ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, seconds",
    [("120", 120.0), (" 7 ", 7.0), ("0", 0.0), ("0.5", 0.5), ("1.", 1.0), (".25", 0.25)],
)
def test_retry_after_in_delta_seconds(value, seconds):
    assert parse_retry_after(value) == seconds


def test_retry_after_as_an_http_date():
    soon = email.utils.formatdate(time.time() + 30, usegmt=True)  # IMF-fixdate, as RFC 9110 writes it
    assert 28 <= parse_retry_after(soon) <= 30
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # passed: come back now
    # "-0000" is RFC 5322's "zone unknown": read as GMT, HTTP's only zone, not as local time.
    unknown_zone = email.utils.formatdate(time.time() + 60).rsplit(" ", 1)[0] + " -0000"
    assert 58 <= parse_retry_after(unknown_zone) <= 60


@pytest.mark.parametrize(
    "value", [None, "", "  ", "soon", "-5", "-0.5", "inf", "nan", "1e3", "0x10", "5 s", "9" * 400]
)
def test_a_retry_after_that_is_absent_negative_or_unreadable_is_none(value):
    assert parse_retry_after(value) is None


def test_parse_delay_reads_numbers_only():
    assert parse_delay("1500") == 1500.0 and parse_delay("2.5") == 2.5
    assert parse_delay("Wed, 21 Oct 2015 07:28:00 GMT") is None and parse_delay(None) is None


def test_the_crawler_and_the_engine_read_retry_after_alike():
    import httpx
    import openai

    from synth.engine import _retry_after

    def engine(value: str) -> float | None:
        response = httpx.Response(
            429, headers={"retry-after": value}, request=httpx.Request("POST", "http://x")
        )
        return _retry_after(openai.RateLimitError("rate limited", response=response, body=None))

    for value in ("3", "0.5", "-5", "soon", "inf", "Wed, 21 Oct 2015 07:28:00 GMT"):
        assert engine(value) == parse_retry_after(value), value
    # The crawler's only reader is the shared one.
    import corpus.crawl as crawl

    assert crawl.parse_retry_after is parse_retry_after


# --- time limit -------------------------------------------------------------------------------


def _spin(seconds: float) -> str:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return "done"


def test_a_call_within_its_limit_returns_its_value_and_its_errors():
    assert call_with_time_limit(lambda: 42, 1.0) == 42
    with pytest.raises(ZeroDivisionError):
        call_with_time_limit(lambda: 1 / 0, 1.0)


@pytest.mark.parametrize("seconds", [0, None])
def test_no_limit_when_the_limit_is_zero_or_none(seconds):
    assert call_with_time_limit(lambda: _spin(0.05), seconds) == "done"


def test_the_limit_interrupts_a_call_in_the_main_thread():
    started = time.monotonic()
    with pytest.raises(TimeLimitExceeded):
        call_with_time_limit(lambda: _spin(5), 0.2)
    assert time.monotonic() - started < 2


def test_the_limit_holds_outside_the_main_thread():
    # Signals reach only the main thread: elsewhere the call is abandoned at the limit, not awaited.
    outcome: dict[str, object] = {}

    def worker() -> None:
        started = time.monotonic()
        try:
            call_with_time_limit(lambda: _spin(3), 0.2)
        except TimeLimitExceeded:
            outcome["raised_after"] = time.monotonic() - started
        outcome["value"] = call_with_time_limit(lambda: 7, 1.0)
        try:
            call_with_time_limit(lambda: 1 / 0, 1.0)
        except ZeroDivisionError:
            outcome["error"] = True

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(10)
    assert outcome["raised_after"] < 2 and outcome["value"] == 7 and outcome["error"]


def test_extract_and_verify_use_the_shared_time_limit():
    import corpus.extract as extract
    import synth.verify as verify

    assert extract.call_with_time_limit is verify.call_with_time_limit is call_with_time_limit


# --- the import graph -------------------------------------------------------------------------

PACKAGES = ("manifests", "corpus", "synth", "train", "eval")
STAGES = ("corpus", "synth", "train", "eval")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module → the project modules it imports, anywhere in it (in functions and under TYPE_CHECKING too:
    a drawing of the graph shows those arrows as well)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [
                    f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules
                ]
                targets = targets or [base]
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                targets = [node.args[0].value]  # a lazy import is an arrow of the graph too
            for target in targets:
                while (
                    target and target not in modules
                ):  # ``import a.b.c`` of a module a.b.c, else its package
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle():
    assert _cycles(import_graph()) == []


def test_the_import_graph_finds_a_cycle_when_there_is_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_manifests_imports_no_stage_package():
    upward = {
        (name, target)
        for name, targets in import_graph().items()
        if name.split(".")[0] == "manifests"
        for target in targets
        if target.split(".")[0] in STAGES
    }
    assert upward == set()


def test_synth_engine_and_its_transports_import_one_way():
    graph = import_graph()
    assert "synth.engine" not in graph["synth.batch"] and "synth.serve" not in graph["synth.serve_batch"]
    leaves = ("synth.teacher_requests", "synth.serve_http", "manifests.retry_after", "manifests.time_limit")
    for leaf in leaves:
        assert not {t for t in graph[leaf] if t.split(".")[0] in STAGES}, leaf
