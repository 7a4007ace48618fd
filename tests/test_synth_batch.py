"""The Batch API path: ``distillery serve``'s Files/Batches endpoints and the engine's batch client."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import openai
import pytest
import yaml

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

FAST = ", batch_poll_s: 0.05, backoff: 0.05"


@pytest.fixture
def corpus(cli, tmp_path, store) -> int:
    """A 30-document dataset ``c`` to make prompts from."""
    source = write_jsonl(tmp_path / "docs.jsonl", docs(30))
    assert cli("--store", store.root, "corpus", "build", corpus_recipe(tmp_path, source)).code == 0
    return read_table(store.resolve("c")).num_rows


def _recipe(tmp_path: Path, url: str, teacher: str = "", extra: str = "", poll_s: float = 0.05) -> Path:
    return write_recipe(
        tmp_path / "s.yaml",
        "stage: synth.generate\nname: s\ninput: c\nprompt_template: 'Say: {text}'\n"
        f"teachers: [{{model: echo, base_url: '{url}', batch: true, batch_poll_s: {poll_s}, backoff: 0.05{teacher}}}]\n"
        f"sampling: {{max_tokens: 6}}\nrows_in_flight: 1000\n{extra}",
    )


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _answered(log: list[dict]) -> Counter:
    """How often each request was answered, online or in a batch."""
    return Counter(e["key"] for e in log if e["outcome"] in ("answered", "batch-answered"))


def _rows(store: Store) -> list[dict]:
    return read_table(store.resolve("s")).to_pylist()


def _jobs(store: Store) -> list[tuple[str, str]]:
    with sqlite3.connect(store.root / "cache" / "synth.sqlite") as db:
        return db.execute("SELECT batch_id, status FROM batches ORDER BY created").fetchall()


def test_a_batch_teacher_answers_every_row_once_in_one_batch(cli, tmp_path, store, corpus):
    log = tmp_path / "requests.jsonl"
    with start_server("echo", request_log=log, batch_delay_s=0.3) as server:
        recipe = _recipe(tmp_path, server.url, ", price_input: 1000, price_output: 2000")
        result = cli("--store", store.root, "synth", "generate", recipe)
        assert result.code == 0, result.err
        batches = list(server.batches.batches.values())
        assert [(b.status, b.counts["total"]) for b in batches] == [("completed", corpus)]
        assert "in_progress" in result.out and "completed" in result.out  # the batch's state is shown
        first = store.resolve("s")
        # A rerun pays nothing: every answer is in the cache, whichever path it came by.
        assert cli("--store", store.root, "synth", "generate", recipe).code == 0
        assert len(server.batches.batches) == 1
    assert store.resolve("s").stats["requests"]["cache_hits"] == corpus
    rows = _rows(store)
    assert len(rows) == len({r["parents"][0] for r in rows}) == corpus
    answered = _answered(_log(log))
    assert len(answered) == corpus and set(answered.values()) == {1}
    assert not any(e["path"] == "/v1/chat/completions" for e in _log(log))  # nothing went online
    lineage = [r["requests"][0] for r in rows]
    assert {(x["attempts"], x["served_model"], x["system_fingerprint"]) for x in lineage} == {
        (1, "echo", "fp_echo")
    }
    for x in lineage:  # half the online price
        assert x["cost"] == pytest.approx(
            (x["prompt_tokens"] * 1000 + x["completion_tokens"] * 2000) / 1e6 * 0.5
        )
    assert first.stats["cost_this_run"] == pytest.approx(sum(x["cost"] for x in lineage), abs=1e-5)
    assert _jobs(store) == [(batches[0].id, "collected")]
    for row in rows:  # each answer belongs to its own prompt
        assert row["messages"][-1]["content"].split()[0] in row["messages"][0]["content"]


def test_expired_lines_are_resubmitted_and_nothing_is_answered_twice(cli, tmp_path, store, corpus):
    log = tmp_path / "requests.jsonl"
    with start_server("echo", request_log=log, batch_expire=0.4, batch_delay_s=0.1, fault_seed=2) as server:
        result = cli("--store", store.root, "synth", "generate",
                     _recipe(tmp_path, server.url, ", max_attempts: 20", "samples_per_prompt: 2\n"))  # fmt: skip
        assert result.code == 0, result.err
        batches = list(server.batches.batches.values())
    assert len(batches) > 1 and batches[0].status == "expired" and batches[-1].status == "completed"
    assert batches[1].counts["total"] == batches[0].counts["failed"]  # exactly the expired lines went again
    rows = _rows(store)
    assert len({(r["parents"][0], r["sample_index"]) for r in rows}) == len(rows) == 2 * corpus
    log_rows = _log(log)
    assert Counter(e["outcome"] for e in log_rows if e["path"].startswith("/v1/batches/"))["batch-expired"]
    answered = _answered(log_rows)
    assert len(answered) == 2 * corpus and set(answered.values()) == {1}
    attempts = Counter(r["requests"][0]["attempts"] for r in rows)
    assert attempts[1] and max(attempts) > 1
    assert store.resolve("s").stats["requests"]["retries"] == sum(b.counts["total"] for b in batches[1:])


def test_lines_that_keep_failing_end_in_one_clear_error(cli, tmp_path, store, corpus):
    log = tmp_path / "requests.jsonl"
    with start_server("echo", request_log=log, batch_fail=1.0) as server:
        result = cli("--store", store.root, "synth", "generate",
                     _recipe(tmp_path, server.url, ", max_attempts: 2", "limit: 4\n"))  # fmt: skip
        assert [b.counts["failed"] for b in server.batches.batches.values()] == [4, 4]
    assert_one_line_error(result, code=1)
    assert "request_failed" in result.err and "HTTP 500" in result.err
    assert Counter(e["outcome"] for e in _log(log) if e["outcome"].startswith("batch-")) == {"batch-500": 8}


def test_a_client_error_in_a_line_is_not_resubmitted(cli, tmp_path, store, corpus):
    with start_server("echo") as server:
        recipe = (
            _recipe(tmp_path, server.url, extra="limit: 2\n")
            .read_text()
            .replace("model: echo", "model: other")
        )
        result = cli(
            "--store", store.root, "synth", "generate", write_recipe(tmp_path / "wrong.yaml", recipe)
        )
        assert len(server.batches.batches) == 1
    assert_one_line_error(result, code=1)
    assert "HTTP 404" in result.err and "not served here" in result.err


def test_killed_while_a_batch_is_in_flight_collects_it_on_the_next_run(cli, tmp_path, store, corpus):
    log = tmp_path / "requests.jsonl"
    with start_server("echo", request_log=log, batch_delay_s=1.5) as server:
        recipe = _recipe(tmp_path, server.url)
        proc = subprocess.Popen(
            [sys.executable, "-m", "manifests.cli", "--store", str(store.root), "synth", "generate", str(recipe)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.time() + 60
        while not server.batches.batches and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        (batch,) = server.batches.batches.values()
        assert batch.status not in ("completed", "expired")  # killed while the batch was in flight
        assert store.list(kind="dataset") == [store.resolve("c")]
        result = cli("--store", store.root, "synth", "generate", recipe)
        assert result.code == 0, result.err
        assert list(server.batches.batches) == [batch.id]  # collected, not submitted again
        assert "submitted by an earlier run" in result.out
    assert len(_rows(store)) == corpus
    answered = _answered(_log(log))
    assert len(answered) == corpus and set(answered.values()) == {1}
    assert _jobs(store) == [(batch.id, "collected")]


def test_an_interrupted_run_stops_polling_and_the_next_collects_the_batch(cli, tmp_path, store, corpus):
    log = tmp_path / "requests.jsonl"
    with start_server("echo", request_log=log, batch_delay_s=1.5) as server:
        recipe = _recipe(tmp_path, server.url, poll_s=10)  # a stop must not wait for the next poll
        proc = subprocess.Popen(
            [sys.executable, "-m", "manifests.cli", "--store", str(store.root), "synth", "generate", str(recipe)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.time() + 60
        while not (server.batches.batches and _jobs(store)) and time.time() < deadline:
            time.sleep(0.02)
        started = time.time()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert time.time() - started < 5
        assert proc.returncode == 130 and "interrupted after 0 answers" in err and "Traceback" not in err
        result = cli(
            "--store", store.root, "synth", "generate", _recipe(tmp_path, server.url)
        )  # polls faster
        assert result.code == 0, result.err
        assert len(server.batches.batches) == 1
    assert len(_rows(store)) == corpus and set(_answered(_log(log)).values()) == {1}


def test_batch_and_online_teachers_in_one_run(cli, tmp_path, store, corpus):
    log = tmp_path / "requests.jsonl"
    with start_server("echo", request_log=log) as server:
        teachers = (f"[{{name: cheap, model: echo, base_url: '{server.url}', batch: true{FAST}}}, "
                    f"{{name: fast, model: echo, base_url: '{server.url.replace('127.0.0.1', 'localhost')}'}}]")  # fmt: skip
        recipe = _recipe(tmp_path, server.url, extra="limit: 5\n").read_text()
        recipe = recipe.replace(recipe.splitlines()[4].removeprefix("teachers: "), teachers)
        result = cli("--store", store.root, "synth", "generate", write_recipe(tmp_path / "two.yaml", recipe))
        assert result.code == 0, result.err
    rows = _rows(store)
    assert Counter(r["teacher"] for r in rows) == {"cheap": 5, "fast": 5}
    assert Counter(e["outcome"] for e in _log(log) if e["outcome"].endswith("answered")) == {
        "answered": 5, "batch-answered": 5
    }  # fmt: skip
    assert len({r["requests"][0]["key"] for r in rows}) == 10  # two endpoints (by name): ten requests


def test_a_job_recorded_before_its_batch_was_named_is_found_by_its_file(cli, tmp_path, store, corpus):
    """Killed between creating the batch and recording its id: the next run finds it by its input file."""
    log = tmp_path / "requests.jsonl"
    with start_server("echo", request_log=log, batch_delay_s=0.5) as server:
        recipe = _recipe(tmp_path, server.url, extra="limit: 5\n")
        assert cli("--store", store.root, "synth", "generate", recipe).code == 0
        (batch,) = server.batches.batches.values()
        cache = store.root / "cache" / "synth.sqlite"
        with sqlite3.connect(cache) as db:  # as if the run died right after batches.create
            db.execute("DELETE FROM answers")
            db.execute(
                "UPDATE batches SET batch_id = ?, status = 'submitting'", (f"pending:{batch.input_file_id}",)
            )
        result = cli("--store", store.root, "synth", "generate", recipe)
        assert result.code == 0, result.err
        assert list(server.batches.batches) == [batch.id]
        # A job whose batch the endpoint does not know (never created, or a restarted local server) goes again.
        with sqlite3.connect(cache) as db:
            db.execute("DELETE FROM answers")
            db.execute("UPDATE batches SET batch_id = 'batch_gone', status = 'in_progress'")
        result = cli("--store", store.root, "synth", "generate", recipe)
        assert result.code == 0, result.err
        assert (
            "batch_gone: the endpoint no longer knows it" in result.out and len(server.batches.batches) == 2
        )
    assert len(_rows(store)) == 5 and set(_answered(_log(log)).values()) == {2}  # the deleted answers, again
    assert [s for _, s in _jobs(store)] == ["lost", "collected"]


def test_a_budget_caps_what_batches_submit(cli, tmp_path, store, corpus):
    prices = ", price_input: 1000, price_output: 1000"
    with start_server("echo") as server:
        result = cli("--store", store.root, "synth", "generate",
                     _recipe(tmp_path, server.url, prices, "budget: {max_cost: 0.2}\n"))  # fmt: skip
        assert_one_line_error(result, code=1)
        assert "budget reached after" in result.err
        (batch,) = server.batches.batches.values()
        assert 0 < batch.counts["total"] < corpus
        result = cli("--store", store.root, "synth", "generate",
                     _recipe(tmp_path, server.url, prices, "budget: {max_cost: 100}\n"))  # fmt: skip
        assert result.code == 0, result.err
        assert sum(b.counts["total"] for b in server.batches.batches.values()) == corpus


def test_the_real_openai_client_uses_files_and_batches():
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "echo", "messages": [{"role": "user", "content": f"w{i} x y"}], "temperature": 0}}
             for i in range(6)]  # fmt: skip
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    with start_server("echo", batch_delay_s=0.2, batch_fail=0.5, fault_seed=1) as server:
        api = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
        uploaded = api.files.create(file=("in.jsonl", data), purpose="batch")
        assert (uploaded.object, uploaded.purpose, uploaded.bytes) == ("file", "batch", len(data))
        assert api.files.retrieve(uploaded.id).filename == "in.jsonl"
        assert api.files.content(uploaded.id).content == data
        batch = api.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                   completion_window="24h", metadata={"who": "test"})  # fmt: skip
        assert batch.status in ("validating", "in_progress") and batch.metadata == {"who": "test"}
        while batch.status not in ("completed", "failed", "expired", "cancelled"):
            time.sleep(0.05)
            batch = api.batches.retrieve(batch.id)
        counts = batch.request_counts
        assert batch.status == "completed" and batch.completed_at and counts.total == 6
        assert 0 < counts.failed < 6 and counts.completed + counts.failed == 6
        out = [json.loads(x) for x in api.files.content(batch.output_file_id).text.splitlines()]
        errors = [json.loads(x) for x in api.files.content(batch.error_file_id).text.splitlines()]
        assert {x["custom_id"] for x in out} | {x["custom_id"] for x in errors} == {f"r{i}" for i in range(6)}
        first = out[0]
        assert first["error"] is None and first["response"]["status_code"] == 200
        reply = openai.types.chat.ChatCompletion.model_validate(first["response"]["body"])
        assert reply.choices[0].message.content.split()[0] == "w" + first["custom_id"][1:]
        assert (
            errors[0]["response"]["status_code"] == 500 and errors[0]["response"]["body"]["error"]["message"]
        )
        assert [b.id for b in api.batches.list()] == [batch.id]

        # Validation fails the whole batch (OpenAI's shape); a cancel stops one in flight.
        bad = api.files.create(file=("bad.jsonl", data + data), purpose="batch")
        failed = api.batches.create(
            input_file_id=bad.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        while failed.status == "validating":
            failed = api.batches.retrieve(failed.id)
        assert failed.status == "failed" and failed.errors.data[0].code == "duplicate_custom_id"
        slow = api.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        slow = api.batches.cancel(slow.id)
        assert slow.status == "cancelling"
        while slow.status == "cancelling":
            slow = api.batches.retrieve(slow.id)
        assert slow.status == "cancelled" and slow.cancelled_at
        with pytest.raises(openai.NotFoundError):
            api.batches.retrieve("batch_nope")
        with pytest.raises(openai.BadRequestError, match="purpose"):
            api.files.create(file=("x.jsonl", data), purpose="fine-tune")
        with pytest.raises(openai.BadRequestError, match="completion_window"):
            api.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="1h"
            )


def test_the_shipped_batch_recipe_runs_against_a_loopback_server(cli, tmp_path, store):
    """``examples/recipes/synth-batch.yaml`` with its endpoint on this test's server, its input a small corpus."""
    source = write_jsonl(tmp_path / "docs.jsonl", docs(6))
    assert cli("--store", store.root, "corpus", "build", corpus_recipe(tmp_path, source)).code == 0
    data = yaml.safe_load((ROOT / "examples" / "recipes" / "synth-batch.yaml").read_text())
    (teacher,) = data["teachers"]
    assert teacher["batch"] is True and teacher["base_url"].startswith("http://127.0.0.1:")
    with start_server("echo", batch_delay_s=0.2) as server:
        teacher.update(base_url=server.url, batch_poll_s=0.05)
        recipe = write_recipe(tmp_path / "synth-batch.yaml", yaml.safe_dump(data))
        result = cli("--store", store.root, "synth", "generate", recipe, "--set", "input=c")
        assert result.code == 0, result.err
        assert len(server.batches.batches) == 1
    m = store.resolve(data["name"])
    assert sum(m.stats["rows_per_split"].values()) == 6 and m.stats["cost_this_run"] > 0


def test_a_chunked_upload_is_read_and_bad_options_are_one_error():
    import http.client

    from manifests.errors import DistilleryError

    data = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n'
    body = (b'--xyz\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="in.jsonl"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n--xyz--\r\n")  # fmt: skip
    with start_server("echo") as server:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
        chunks = iter([body[:50], body[50:]])  # sent with Transfer-Encoding: chunked, no length
        conn.request("POST", "/v1/files", body=chunks, encode_chunked=True,
                     headers={"Content-Type": "multipart/form-data; boundary=xyz"})  # fmt: skip
        card = json.loads(conn.getresponse().read())
        assert (card["filename"], card["bytes"]) == ("in.jsonl", len(data))
        assert server.batches.files[card["id"]].data == data
    with pytest.raises(DistilleryError, match="add up to more than 1"):
        start_server("echo", batch_expire=0.6, batch_fail=0.6)


def test_a_damaged_or_locked_request_cache_is_one_clear_error_for_a_batch_teacher(
    cli, tmp_path, store, corpus, monkeypatch
):
    # Whichever path opens the cache (the engine, the batch jobs), a fault in it is the same one line.
    assert_cache_faults_are_one_line(cli, store, lambda url: _recipe(tmp_path, url), monkeypatch)
