"""The teacher engine against ``distillery serve`` on loopback: faults, cache, resume, budget."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from manifests.data import read_table
from manifests.store import Store
from synth.serve import start_server

from .conftest import (
    ROOT,
    assert_cache_faults_are_one_line,
    assert_one_line_error,
    corpus_recipe,
    docs,
    write_jsonl,
    write_recipe,
)

pytestmark = pytest.mark.network


@pytest.fixture
def corpus(cli, tmp_path, store) -> int:
    """A 30-document dataset ``c`` to make prompts from."""
    source = write_jsonl(tmp_path / "docs.jsonl", docs(30))
    assert cli("--store", store.root, "corpus", "build", corpus_recipe(tmp_path, source)).code == 0
    return read_table(store.resolve("c")).num_rows


def _recipe(
    tmp_path: Path, url: str, name: str = "s", teacher: str = "", extra: str = "", concurrency: int = 8
) -> Path:
    return write_recipe(
        tmp_path / f"{name}.yaml",
        f"stage: synth.generate\nname: {name}\ninput: c\nprompt_template: 'Say: {{text}}'\n"
        f"teachers: [{{model: echo, base_url: '{url}', max_concurrency: {concurrency}, backoff: 0.05{teacher}}}]\n"
        f"sampling: {{max_tokens: 6}}\n{extra}",
    )


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _answered_twice(log: list[dict]) -> list[str]:
    # "slow-answered" is an answer the server wrote after the client's timeout: the client had given
    # up on it (and retried), so it never received it. Only answers a client received count.
    answered = Counter(e["key"] for e in log if e["outcome"] == "answered")
    return [k for k, n in answered.items() if n > 1]


def _rows(store: Store, name: str = "s") -> list[dict]:
    return read_table(store.resolve(name)).to_pylist()


def test_every_row_exactly_once_through_429s_500s_malformed_and_timeouts(cli, tmp_path, store, corpus):
    log = tmp_path / "requests.jsonl"
    # 35% of requests fail one way or another; with 10 attempts a request fails for good at odds of 3e-5.
    faults = {"fault_429": 0.15, "retry_after": 0, "fault_500": 0.1, "fault_malformed": 0.05, "fault_slow": 0.05,
              "slow_seconds": 1.5, "request_log": log}  # fmt: skip
    with start_server("echo", **faults) as server:
        result = cli(
            "--store",
            store.root,
            "synth",
            "generate",
            _recipe(
                tmp_path,
                server.url,
                teacher=", timeout: 0.5, max_attempts: 10",
                extra="samples_per_prompt: 3\n",
            ),
        )
    assert result.code == 0, result.err
    rows = _rows(store)
    assert len(rows) == 3 * corpus and len({(r["parents"][0], r["sample_index"]) for r in rows}) == 3 * corpus
    outcomes = Counter(e["outcome"] for e in _log(log))
    assert outcomes["429"] and outcomes["500"] and outcomes["malformed"] and outcomes["slow-answered"]
    assert not _answered_twice(_log(log)), "a request was answered twice"
    stats = store.resolve("s").stats["requests"]
    assert stats["answered"] == 3 * corpus and stats["retries"] >= outcomes["429"] + outcomes["500"]
    attempts = [r["requests"][0]["attempts"] for r in rows]
    assert max(attempts) > 1 and all(r["requests"][0]["served_model"] == "echo" for r in rows)
    for row in rows:  # the answer belongs to its own prompt (the echo teacher repeats the prompt's words)
        assert row["messages"][-1]["content"].split()[0] in row["messages"][0]["content"]


def test_a_rerun_pays_for_nothing_and_a_new_prompt_only_for_itself(cli, tmp_path, store, corpus):
    log = tmp_path / "requests.jsonl"
    with start_server("echo", request_log=log) as server:
        assert (
            cli(
                "--store", store.root, "synth", "generate", _recipe(tmp_path, server.url, extra="limit: 20\n")
            ).code
            == 0
        )
        first = store.resolve("s")
        assert len(_log(log)) == 20
        assert (
            cli(
                "--store", store.root, "synth", "generate", _recipe(tmp_path, server.url, extra="limit: 20\n")
            ).code
            == 0
        )
        assert len(_log(log)) == 20  # nothing re-sent
        result = cli(
            "--store", store.root, "synth", "generate", _recipe(tmp_path, server.url, extra="limit: 21\n")
        )
        assert result.code == 0, result.err
    assert len(_log(log)) == 21 and not _answered_twice(_log(log))
    again = store.resolve("s")
    assert again.stats["requests"]["cache_hits"] == 20 and again.stats["requests"]["sent"] == 1
    assert first.stats["requests"]["sent"] == 20
    hits = [r["requests"][0]["cache_hit"] for r in _rows(store)]
    assert hits.count(True) == 20 and hits.count(False) == 1


def test_interrupted_run_finishes_in_flight_requests_and_resumes_without_paying_twice(
    cli, tmp_path, store, corpus
):
    log = tmp_path / "requests.jsonl"
    with start_server("echo", request_log=log, latency_ms=150) as server:
        recipe = _recipe(tmp_path, server.url, concurrency=3)
        proc = subprocess.Popen(
            [sys.executable, "-m", "manifests.cli", "--store", str(store.root), "synth", "generate", str(recipe)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.time() + 60
        while len(_log(log)) < 8 and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and "interrupted after" in err and "Traceback" not in err
        assert store.list(kind="dataset") == [store.resolve("c")]  # nothing half-published
        before = len(_log(log))
        assert 8 <= before < corpus
        result = cli("--store", store.root, "synth", "generate", recipe)
        assert result.code == 0, result.err
    log_rows = _log(log)
    assert not _answered_twice(log_rows), "an in-flight request was dropped and sent again"
    assert len(log_rows) == corpus and len(_rows(store)) == corpus


def test_sigkill_midway_then_resume_loses_nothing(cli, tmp_path, store, corpus):
    log = tmp_path / "requests.jsonl"
    with start_server("echo", request_log=log, latency_ms=100) as server:
        recipe = _recipe(tmp_path, server.url, concurrency=2)
        proc = subprocess.Popen(
            [sys.executable, "-m", "manifests.cli", "--store", str(store.root), "synth", "generate", str(recipe)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.time() + 60
        while len(_log(log)) < 6 and time.time() < deadline:
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        killed_at = len(_log(log))
        assert cli("--store", store.root, "synth", "generate", recipe).code == 0
    rows, log_rows = _rows(store), _log(log)
    assert len(rows) == len({r["id"] for r in rows}) == corpus
    # Only what was in flight at the kill (at most max_concurrency) can have been answered twice.
    assert len(_answered_twice(log_rows)) <= 2 and len(log_rows) <= corpus + 2
    assert killed_at >= 6


def test_budget_stops_cleanly_and_a_larger_budget_continues(cli, tmp_path, store, corpus):
    log = tmp_path / "requests.jsonl"
    prices = ", price_input: 1000, price_output: 1000"
    with start_server("echo", request_log=log) as server:
        tight = _recipe(
            tmp_path, server.url, teacher=prices, concurrency=1, extra="budget: {max_cost: 0.1}\n"
        )
        result = cli("--store", store.root, "synth", "generate", tight)
        assert_one_line_error(result, code=1)
        assert "budget reached after" in result.err and "cached" in result.err
        spent = len(_log(log))
        assert 0 < spent < corpus and store.list(kind="dataset") == [store.resolve("c")]
        loose = _recipe(tmp_path, server.url, name="s", teacher=prices, extra="budget: {max_cost: 100}\n")
        assert cli("--store", store.root, "synth", "generate", loose).code == 0
    assert len(_log(log)) == corpus and not _answered_twice(_log(log))
    costs = [r["requests"][0]["cost"] for r in _rows(store)]
    assert all(c > 0 for c in costs) and store.resolve("s").stats["cost_this_run"] < sum(costs)


def test_a_request_that_keeps_failing_is_one_clear_error_not_a_loop(cli, tmp_path, store, corpus):
    log = tmp_path / "requests.jsonl"
    with start_server("echo", request_log=log, fault_500=1.0) as server:
        result = cli("--store", store.root, "synth", "generate",
                     _recipe(tmp_path, server.url, teacher=", max_attempts: 3", extra="limit: 4\n"))  # fmt: skip
    assert_one_line_error(result, code=1)
    assert "request_failed" in result.err and "HTTP 500" in result.err
    assert len(_log(log)) == 4 * 3  # every request tried exactly max_attempts times


def test_some_failures_are_ledgered_and_the_rest_published(cli, tmp_path, store, corpus):
    with start_server("echo", fault_500=0.5, fault_seed=3) as server:
        result = cli("--store", store.root, "synth", "generate",
                     _recipe(tmp_path, server.url, teacher=", max_attempts: 1"))  # fmt: skip
    assert result.code == 0, result.err
    m = store.resolve("s")
    dropped = pq.read_table(m.location / "ledger" / "synth.generate.parquet").to_pylist()
    assert dropped and all(d["reason"] == "request_failed" and "HTTP 500" in d["detail"] for d in dropped)
    assert len(dropped) + m.stats["rows_out"] == corpus


def test_a_client_error_is_not_retried(cli, tmp_path, store, corpus):
    log = tmp_path / "requests.jsonl"
    with start_server("echo", request_log=log) as server:
        recipe = (
            _recipe(tmp_path, server.url, extra="limit: 2\n")
            .read_text()
            .replace("model: echo", "model: other")
        )
        result = cli(
            "--store", store.root, "synth", "generate", write_recipe(tmp_path / "wrong.yaml", recipe)
        )
    assert_one_line_error(result, code=1)
    assert "HTTP 404" in result.err and len(_log(log)) == 2


def test_missing_api_key_variable_is_named(cli, tmp_path, store, corpus, monkeypatch):
    monkeypatch.delenv("DISTILLERY_TEST_KEY", raising=False)
    recipe = _recipe(tmp_path, "http://127.0.0.1:9/v1", teacher=", api_key_env: DISTILLERY_TEST_KEY")
    result = cli("--store", store.root, "synth", "generate", recipe)
    assert_one_line_error(result)
    assert "DISTILLERY_TEST_KEY is not set" in result.err


def test_an_unreachable_endpoint_fails_after_bounded_attempts(cli, tmp_path, store, corpus):
    recipe = _recipe(tmp_path, "http://127.0.0.1:9/v1", teacher=", max_attempts: 2", extra="limit: 2\n")
    started = time.time()
    result = cli("--store", store.root, "synth", "generate", recipe)
    assert_one_line_error(result, code=1)
    assert "connection failed" in result.err and time.time() - started < 30


def test_adaptive_limit_halves_on_429_and_climbs_back():
    from synth.engine import AdaptiveLimit

    async def scenario() -> tuple[int, float, int]:
        limit = AdaptiveLimit(8)
        for _ in range(3):
            await limit.acquire()
        await limit.release("rate_limited", 0.2)
        await limit.release("rate_limited", 0.2)  # the same burst: one halving
        halved = limit.limit
        started = time.monotonic()
        await limit.acquire()  # waits out Retry-After
        waited = time.monotonic() - started
        await limit.release("ok")
        await limit.release("ok")
        for _ in range(40):
            await limit.acquire()
            await limit.release("ok")
        return halved, waited, limit.limit

    halved, waited, climbed = asyncio.run(scenario())
    assert halved == 4 and waited >= 0.15 and climbed == 8


def test_rate_window_gives_back_unused_tokens():
    from synth.engine import RateWindow

    async def scenario() -> float:
        window = RateWindow(rpm=None, tpm=100)
        first = await window.reserve(80)
        window.settle(first, 10)  # the answer was short: 70 tokens come back
        started = time.monotonic()
        await window.reserve(80)  # fits now, no wait for the window to slide
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 0.5


def test_several_teachers_all_or_routed_by_hash(cli, tmp_path, store, corpus):
    with start_server("echo") as one, start_server("echo") as two:
        teachers = (f"teachers: [{{name: a, model: echo, base_url: '{one.url}'}}, "
                    f"{{name: b, model: echo, base_url: '{two.url}'}}]\n")  # fmt: skip
        base = "stage: synth.generate\nname: NAME\ninput: c\nprompt_template: 'Say: {text}'\n" + teachers
        everyone = write_recipe(tmp_path / "all.yaml", base.replace("NAME", "all") + "routing: all\n")
        routed = write_recipe(
            tmp_path / "hash.yaml", base.replace("NAME", "hash") + "routing: hash\nweights: {a: 3, b: 1}\n"
        )
        assert cli("--store", store.root, "synth", "generate", everyone).code == 0
        assert cli("--store", store.root, "synth", "generate", routed).code == 0
    both = Counter(r["teacher"] for r in _rows(store, "all"))
    assert both == {"a": corpus, "b": corpus}
    rows = _rows(store, "hash")
    split = Counter(r["teacher"] for r in rows)
    assert len(rows) == corpus and split["a"] > split["b"] > 0  # about 3:1
    # The route is a function of the prompt: a second run routes alike, all from the cache (the
    # servers are gone: a request sent now would fail).
    first = {r["id"]: r["teacher"] for r in rows}
    assert cli("--store", store.root, "synth", "generate", routed).code == 0
    assert {r["id"]: r["teacher"] for r in _rows(store, "hash")} == first
    assert store.resolve("hash").stats["requests"]["sent"] == 0


# ------------------------------------------------------------------------------------ regressions


def _engine(tmp_path: Path, url: str, **teacher):
    from synth.cache import RequestCache
    from synth.engine import TeacherConfig, TeacherEngine

    config = TeacherConfig(model="echo", base_url=url, **teacher)
    return TeacherEngine([config], RequestCache(tmp_path / "cache.sqlite"))


def _requests(engine, n: int) -> list:
    from synth.engine import SamplingConfig

    return [
        engine.request("echo", [{"role": "user", "content": f"say {i}"}], SamplingConfig(max_tokens=4))
        for i in range(n)
    ]


@pytest.mark.parametrize(
    "faults, teacher",
    [
        ({"fault_429": 1.0, "retry_after": 3600}, {}),  # waiting out Retry-After for a slot
        ({"fault_500": 1.0}, {"backoff": 3600}),  # sleeping a backoff between attempts
        ({}, {"requests_per_minute": 1}),  # waiting for the rate window
    ],
)
def test_a_stop_ends_the_waits_for_a_slot_a_backoff_or_the_rate_window(tmp_path, faults, teacher):
    from synth.engine import RunStopped

    async def scenario(url: str) -> float:
        async with _engine(tmp_path, url, max_attempts=3, **teacher) as engine:
            asked = asyncio.ensure_future(engine.ask(_requests(engine, 4)))
            await asyncio.sleep(0.5)  # the first requests went out; the rest wait
            engine.stop()
            started = time.monotonic()
            with pytest.raises(RunStopped):
                await asyncio.wait_for(asked, 10)
            u = engine.usage
            assert u.reserved_cost == 0 and u.reserved_tokens == 0  # nothing left reserved
            return time.monotonic() - started

    with start_server("echo", **faults) as server:
        assert asyncio.run(scenario(server.url)) < 2


def test_rate_window_wakes_its_waiter_when_an_answer_gives_tokens_back():
    from synth.engine import RateWindow

    async def scenario() -> float:
        window = RateWindow(rpm=None, tpm=100)
        first = await window.reserve(80)  # max_tokens reserved; the answer turns out short
        second = asyncio.ensure_future(window.reserve(80))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        window.settle(first, 10)
        await asyncio.wait_for(second, 5)  # not a minute, until the first entry slides out
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 0.5


def test_a_request_waiting_out_a_429_is_stamped_in_the_rate_window_when_it_is_sent(tmp_path):
    # The window counts requests by when they are sent: one stamped before it waited for its slot
    # would slide out of the window early and let a burst over requests_per_minute through.
    import httpx
    import openai

    sent: list[float] = []

    async def scenario() -> list[float]:
        async with _engine(
            tmp_path, "http://127.0.0.1:9/v1", max_concurrency=2, requests_per_minute=1000
        ) as e:

            async def send(r):
                sent.append(time.monotonic())
                first = len(sent) == 1
                await asyncio.sleep(0.01)
                if first:
                    response = httpx.Response(
                        429, headers={"retry-after": "0.5"}, request=httpx.Request("POST", "http://x")
                    )
                    raise openai.RateLimitError("rate limited", response=response, body=None)
                return await _completion()

            e.transports["echo"].post = send
            answers = await e.ask(_requests(e, 3))
            assert all(a.ok for a in answers)
            return sorted(entry[0] for entry in e.transports["echo"].window._entries)

    stamps = asyncio.run(scenario())
    assert len(stamps) == len(sent) == 4
    for stamp, at in zip(stamps, sorted(sent), strict=True):
        assert abs(stamp - at) < 0.1


async def _completion():
    from openai.types.chat import ChatCompletion

    return ChatCompletion.model_validate(
        {"id": "x", "object": "chat.completion", "created": 0, "model": "echo",
         "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}],
         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    )  # fmt: skip


@contextmanager
def _fixed_reply(message: dict, **extra):
    """An endpoint that answers every chat request with ``message`` (whatever JSON it is)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "echo",
                               "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
                               **extra}).encode()  # fmt: skip
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "message, extra",
    [
        ({"role": "assistant", "content": 5}, {}),
        ({"role": "assistant", "content": {"text": "hi"}}, {}),
        ({"role": "assistant", "content": "hi"}, {"model": 3}),
        ({"role": "assistant", "content": "hi"}, {"usage": {"prompt_tokens": -50, "completion_tokens": 1}}),
    ],
)
def test_a_reply_that_is_not_text_is_a_malformed_response_never_cached(
    cli, tmp_path, store, corpus, message, extra
):
    with _fixed_reply(message, **extra) as url:
        result = cli("--store", store.root, "synth", "generate",
                     _recipe(tmp_path, url, teacher=", max_attempts: 2", extra="limit: 2\n"))  # fmt: skip
    assert_one_line_error(result, code=1)
    assert "malformed response" in result.err
    from synth.cache import RequestCache

    assert len(RequestCache(store.root / "cache" / "synth.sqlite")) == 0


def test_content_parts_are_joined_into_the_answer(cli, tmp_path, store, corpus):
    parts = [{"type": "text", "text": "one "}, {"type": "text", "text": "two"}]
    with _fixed_reply({"role": "assistant", "content": parts}) as url:
        result = cli("--store", store.root, "synth", "generate", _recipe(tmp_path, url, extra="limit: 2\n"))
    assert result.code == 0, result.err
    assert {r["messages"][-1]["content"] for r in _rows(store)} == {"one two"}


def test_a_damaged_or_locked_request_cache_is_one_clear_error(cli, tmp_path, store, corpus, monkeypatch):
    # Whichever path opens the cache (the engine, the batch jobs), a fault in it is the same one line.
    assert_cache_faults_are_one_line(cli, store, lambda url: _recipe(tmp_path, url), monkeypatch)


def test_lone_surrogates_in_a_reply_or_an_input_line_never_break_the_run(cli, tmp_path, store, corpus):
    # JSON may escape a lone surrogate ("\ud800"): valid JSON, but no UTF-8 text. In a reply it once
    # broke hashing the rows after every request was paid for; in an input line, reading the file.
    with _fixed_reply({"role": "assistant", "content": "bad \ud800 text"}) as url:
        result = cli("--store", store.root, "synth", "generate", _recipe(tmp_path, url, extra="limit: 2\n"))
    assert result.code == 0, result.err
    assert {r["messages"][-1]["content"] for r in _rows(store)} == {"bad \ufffd text"}
    # In an input line it becomes U+FFFD as it is read (web text has them; one must not stop a run).
    source = tmp_path / "bad.jsonl"
    source.write_text('{"text": "fine"}\n{"text": "bad \\ud800 input"}\n')
    with start_server("echo") as server:
        recipe = _recipe(tmp_path, server.url).read_text().replace("input: c", f"input: {source}")
        result = cli("--store", store.root, "synth", "generate", write_recipe(tmp_path / "bad.yaml", recipe))
    assert result.code == 0, result.err
    assert any("bad \ufffd input" in r["messages"][0]["content"] for r in _rows(store))


def test_the_same_request_from_two_rows_at_once_is_sent_once(cli, tmp_path, store):
    source = write_jsonl(
        tmp_path / "dup.jsonl", [{"text": "same words here"}] * 3 + [{"text": "other words"}]
    )
    log = tmp_path / "requests.jsonl"
    with start_server("echo", request_log=log, latency_ms=100) as server:
        recipe = _recipe(tmp_path, server.url).read_text().replace("input: c", f"input: {source}")
        result = cli("--store", store.root, "synth", "generate", write_recipe(tmp_path / "dup.yaml", recipe))
    assert result.code == 0, result.err
    assert len(_log(log)) == 2  # one per distinct prompt
    rows = _rows(store)
    assert len(rows) == 4 and sorted(r["requests"][0]["cache_hit"] for r in rows) == [
        False,
        False,
        True,
        True,
    ]
    stats = store.resolve("s").stats["requests"]
    assert stats["sent"] == 2 and stats["cache_hits"] == 2


def test_a_retry_after_header_that_is_no_number_or_date_falls_back_to_the_backoff():
    import httpx
    import openai

    from synth.engine import _retry_after

    def wait(**headers: str) -> float | None:
        response = httpx.Response(429, headers=headers, request=httpx.Request("POST", "http://x"))
        return _retry_after(openai.RateLimitError("rate limited", response=response, body=None))

    assert wait(**{"retry-after": "2"}) == 2.0 and wait(**{"retry-after-ms": "1500"}) == 1.5
    assert wait(**{"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # a date in the past
    for bad in (
        {"retry-after": "soon"},
        {"retry-after-ms": "x"},
        {"retry-after": "inf"},
        {"retry-after": "nan"},
    ):
        assert wait(**bad) is None, bad


def test_an_empty_input_text_sends_no_request(cli, tmp_path, store):
    source = write_jsonl(
        tmp_path / "some-empty.jsonl", [{"text": "real words"}, {"text": "  "}, {"text": None}]
    )
    log = tmp_path / "requests.jsonl"
    with start_server("echo", request_log=log) as server:
        recipe = _recipe(tmp_path, server.url).read_text().replace("input: c", f"input: {source}")
        result = cli("--store", store.root, "synth", "generate", write_recipe(tmp_path / "e.yaml", recipe))
    assert result.code == 0, result.err
    assert len(_log(log)) == 1 and len(_rows(store)) == 1
    ledger = pq.read_table(store.resolve("s").location / "ledger" / "synth.generate.parquet").to_pylist()
    assert [d["reason"] for d in ledger] == ["empty_input", "empty_input"]


def test_the_engine_accounting_every_transport_uses(tmp_path):
    # The public API the Batch API transport is written against (it once called seven private members).
    from synth.cache import RequestCache
    from synth.engine import BudgetConfig, RunStopped, TeacherConfig, TeacherEngine

    teacher = TeacherConfig(model="echo", base_url="http://127.0.0.1:9/v1", price_input=1e6, price_output=1e6)
    cache = RequestCache(tmp_path / "cache.sqlite")
    engine = TeacherEngine([teacher], cache, budget=BudgetConfig(max_cost=30.0))
    engine.endpoints["echo"] = engine.endpoint_of(teacher)
    [r] = _requests(engine, 1)  # at most a prompt of 5 tokens and 4 answer tokens: 9.0 at these prices
    held = engine.reserve(r)
    assert held == (9.0, 9) and engine.usage.reserved_cost == 9.0
    engine.release(held)
    assert engine.usage.reserved_cost == 0.0

    answer = engine.new_answer(r)
    answer.content, answer.prompt_tokens, answer.completion_tokens, answer.cost = "hi", 6, 2, 8.0
    engine.record(answer)
    assert engine.usage.answered == 1 and engine.usage.cost == 8.0
    assert cache.get_many([r.key])[r.key]["content"] == "hi"

    failed = engine.failed_answer(r, "HTTP 400: no", 1)
    assert not failed.ok and failed.attempts == 1 and engine.usage.failed == 1

    engine.reserve(r)
    engine.reserve(r)  # 8 spent + 2 x 9 held: a third would pass the cap of 30
    with pytest.raises(RunStopped):
        engine.reserve(r)
    assert engine.stopped == "budget"
