"""Runs used as models must be causal LMs (one error line otherwise); synth rows from a file trace to
its line; keys never reach the terminal or the store; a SIGKILLed synth run re-sends at most what
was in flight."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from manifests.cli import main
from manifests.data import read_table
from manifests.models import CHECKPOINT_DIR
from manifests.publish import Publisher
from manifests.store import Store
from synth.serve import FaultOptions, ServeOptions, Server, start_server
from synth.teacher import Answer

from .conftest import ROOT, assert_one_line_error, docs, tiny_tokenizer, write_jsonl, write_recipe

# ------------------------------------------------------------------------------- helpers


class Scripted:
    """A served teacher whose answer is ``answer(last user message, seed)``."""

    fingerprint = "fp_scripted"
    chat_template = True

    def __init__(self, answer: Callable[[str, int], str]):
        self.answer = answer

    def generate(self, prompts, max_tokens, temperature, top_p, seeds):
        out = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            text = [m["content"] for m in prompt if m["role"] == "user"][-1]
            reply = self.answer(text, seed)
            out.append(Answer(reply, len(text.split()), len(reply.split()), "stop"))
        return out


@contextmanager
def scripted(answer: Callable[[str, int], str]):
    server = Server("scripted", Scripted(answer), "127.0.0.1", 0, ServeOptions(), FaultOptions())
    try:
        yield server.url
    finally:
        server.close()


def _teacher(url: str, extra: str = "") -> str:
    return f"teachers: [{{model: scripted, base_url: '{url}', backoff: 0.05, max_attempts: 2{extra}}}]\n"


def _rows(store: Store, name: str) -> list[dict]:
    return read_table(store.resolve(name)).to_pylist()


def _traces_to(cli, store: Store, row: dict, where: str) -> None:
    """``manifests trace`` of ``row`` ends at ``where`` (a file and line or row), with no dead end."""
    result = cli("--store", store.root, "manifests", "trace", row["id"])
    assert result.code == 0, result.err
    assert f"source: {where}" in result.out, result.out
    assert "not found" not in result.out and "Traceback" not in result.err


QUESTIONS = [
    {"text": "Explain how tides work near a coast", "question": "What is 2+2?", "answer": "4"},
    {"text": "Describe a rainy day in the city", "question": "What is 3+3?", "answer": "6"},
    {"text": "Compare cats and dogs as pets", "question": "What is 5+5?", "answer": "10"},
]


@pytest.fixture
def qa_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "in" / "questions.jsonl", QUESTIONS)


def _line_of(row_text: str, column: str = "text") -> int:
    return next(i for i, q in enumerate(QUESTIONS, 1) if q[column] in row_text)


# ------------------------------------------------------------- file rows keep their file and line


@pytest.mark.network
def test_generate_from_jsonl_and_parquet_traces_to_the_file_line_and_row(cli, tmp_path, store, qa_file):
    parquet = tmp_path / "in" / "questions.parquet"
    pq.write_table(pa.Table.from_pylist(QUESTIONS), parquet)
    with start_server("echo") as server:
        for name, source in (("from-jsonl", qa_file), ("from-parquet", parquet)):
            recipe = write_recipe(
                tmp_path / f"{name}.yaml",
                f"stage: synth.generate\nname: {name}\ninput: {source}\nprompt_template: 'Say: {{text}}'\n"
                f"teachers: [{{model: echo, base_url: '{server.url}'}}]\nsampling: {{max_tokens: 12}}\n",
            )
            assert cli("--store", store.root, "synth", "generate", recipe).code == 0
    for row in _rows(store, "from-jsonl"):
        line = _line_of(row["messages"][0]["content"])
        assert row["parents"] == [] and row["source"]["uri"] == str(qa_file) and row["source"]["line"] == line
        _traces_to(cli, store, row, f"{qa_file} line {line}")
    for row in _rows(store, "from-parquet"):
        index = _line_of(row["messages"][0]["content"]) - 1
        assert row["source"]["row"] == index and row["source"]["sha256"]
        _traces_to(cli, store, row, f"{parquet} row {index}")


@pytest.mark.network
def test_generate_through_the_batch_api_keeps_the_file_line(cli, tmp_path, store, qa_file):
    with start_server("echo", batch_delay_s=0.1) as server:
        recipe = write_recipe(
            tmp_path / "b.yaml",
            f"stage: synth.generate\nname: b\ninput: {qa_file}\n"
            f"teachers: [{{model: echo, base_url: '{server.url}', batch: true, batch_poll_s: 0.05}}]\n"
            "sampling: {max_tokens: 12}\n",
        )
        result = cli("--store", store.root, "synth", "generate", recipe)
        assert result.code == 0, result.err
        assert len(server.batches.batches) == 1
    rows = _rows(store, "b")
    assert len(rows) == 3
    for row in rows:
        _traces_to(cli, store, row, f"{qa_file} line {_line_of(row['messages'][0]['content'])}")


@pytest.mark.network
def test_cot_rows_from_a_file_trace_to_the_line(cli, tmp_path, store, qa_file):
    answers = {"What is 2+2?": "4", "What is 3+3?": "6", "What is 5+5?": "10"}
    with scripted(lambda q, seed: f"Step by step.\nFinal answer: {answers[q.rsplit(chr(10), 1)[-1]]}") as url:
        recipe = write_recipe(
            tmp_path / "cot.yaml",
            f"stage: synth.cot\nname: cot\ninput: {qa_file}\n{_teacher(url)}max_tries: 1\n",
        )
        result = cli("--store", store.root, "synth", "cot", recipe)
    assert result.code == 0, result.err
    rows = _rows(store, "cot")
    assert len(rows) == 3
    for row in rows:
        _traces_to(cli, store, row, f"{qa_file} line {_line_of(row['question'], 'question')}")


def _instruction_reply(text: str, seed: int) -> str:
    if "Continue the list" in text:  # Self-Instruct: two new numbered tasks
        return f"9. Write a short poem about autumn leaves number {seed}\n10. List three uses of copper wire {seed}"
    if "#Given Prompt#" in text:  # Evol-Instruct: a harder prompt with a new content word
        given = text.split("#Given Prompt#:\n", 1)[1].split("\n", 1)[0]
        return f"{given} using exactly three detailed examples"
    return "Kindly " + text.rsplit("Instruction: ", 1)[-1].lower() + f" please {seed}"  # paraphrase


@pytest.mark.network
@pytest.mark.parametrize(
    "method",
    [
        "{type: paraphrase, n: 2}",
        "{type: evol_instruct, rounds: 2, information_gain: heuristic}",
        "{type: self_instruct, target_size: 3, requests_per_round: 2, examples: 2, machine_examples: 0}",
    ],
)
def test_augment_rows_from_a_file_trace_to_the_line(cli, tmp_path, store, qa_file, method):
    with scripted(_instruction_reply) as url:
        recipe = write_recipe(
            tmp_path / "a.yaml",
            f"stage: synth.augment\nname: a\ninput: {qa_file}\n{_teacher(url)}"
            f"sampling: {{max_tokens: 64, temperature: 0.7}}\nmethod: {method}\n",
        )
        result = cli("--store", store.root, "synth", "augment", recipe)
    assert result.code == 0, result.err
    rows = _rows(store, "a")
    assert rows
    for row in rows:
        assert row["parents"] == [] and row["source"]["uri"] == str(qa_file)
        if "self_instruct" in method:  # made from several lines: the first example's, all in `examples`
            assert row["source"]["line"] in (1, 2, 3) and len(row["examples"]) == 2
            _traces_to(cli, store, row, f"{qa_file} line {row['source']['line']}")
        else:  # the input instruction itself is `original`, not the lineage column
            line = _line_of(row["original"])
            assert row["source"]["line"] == line
            _traces_to(cli, store, row, f"{qa_file} line {line}")


@pytest.mark.network
def test_preference_pairs_from_a_file_trace_to_the_line(cli, tmp_path, store, qa_file):
    def answer(text: str, seed: int) -> str:
        reference = next(q["answer"] for q in QUESTIONS if q["question"] in text)
        return reference if seed % 2 == 0 else "no idea"

    with scripted(answer) as url:
        recipe = write_recipe(
            tmp_path / "p.yaml",
            f"stage: synth.preferences\nname: p\ninput: {qa_file}\nprompt_column: question\n{_teacher(url)}"
            "sampling: {max_tokens: 8, temperature: 0.9}\nscore: {method: verifier, reference_column: answer}\n",
        )
        result = cli("--store", store.root, "synth", "preferences", recipe)
    assert result.code == 0, result.err
    rows = _rows(store, "p")
    assert len(rows) == 3
    for row in rows:
        _traces_to(cli, store, row, f"{qa_file} line {_line_of(row['prompt'][-1]['content'], 'question')}")


@pytest.mark.network
def test_a_dropped_file_row_names_its_line_in_the_ledger(cli, tmp_path, store):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": "a fine prompt here"}, {"text": "   "}])
    with start_server("echo") as server:
        recipe = write_recipe(
            tmp_path / "g.yaml",
            f"stage: synth.generate\nname: g\ninput: {source}\n"
            f"teachers: [{{model: echo, base_url: '{server.url}'}}]\nsampling: {{max_tokens: 8}}\n",
        )
        assert cli("--store", store.root, "synth", "generate", recipe).code == 0
    m = store.resolve("g")
    (entry,) = pq.read_table(m.location / "ledger" / "synth.generate.parquet").to_pylist()
    assert entry["reason"] == "empty_input"
    assert json.loads(entry["detail"])["source"] == {"uri": str(source), "line": 2}
    result = cli("--store", store.root, "manifests", "trace", entry["id"])
    assert result.code == 0 and "empty_input" in result.out and '"line":2' in result.out


# ------------------------------------------------------------ runs of the wrong kind used as models


@pytest.fixture(scope="module")
def model_store(tmp_path_factory) -> Store:
    """A store with a tokenizer run made by the tokenizer recipe (tiny), runs that are no model, a
    tiny causal LM, and a chat dataset. The tests only read it: every command here fails before it
    would publish."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("model-runs")
    store = Store(tmp / "store")
    corpus = write_jsonl(tmp / "docs.jsonl", docs(40))
    recipe = write_recipe(
        tmp / "c.yaml",
        f"stage: corpus.build\nname: c\ninputs:\n  - {{path: {corpus}, format: jsonl}}\nsteps: []\n",
    )
    assert main(["--store", str(store.root), "run", str(recipe)]) == 0
    tokenizer = write_recipe(
        tmp / "tok.yaml", "stage: train.tokenizer\nname: tok\ndatasets: [{ref: c}]\nvocab_size: 300\n"
    )
    assert main(["--store", str(store.root), "run", str(tokenizer)]) == 0

    with Publisher(store, kind="run", name="broken", stage="train.import-model", recipe={}) as pub:
        (pub.dir / CHECKPOINT_DIR).mkdir()
        (pub.dir / CHECKPOINT_DIR / "config.json").write_text('{"model_type": "llama", ')
        tiny_tokenizer().save_pretrained(pub.dir / CHECKPOINT_DIR)
        pub.publish(stats={})
    with Publisher(store, kind="run", name="noconfig", stage="train.sft", recipe={}) as pub:
        (pub.dir / CHECKPOINT_DIR).mkdir()
        (pub.dir / CHECKPOINT_DIR / "model.safetensors").write_bytes(b"\0" * 64)
        tiny_tokenizer().save_pretrained(pub.dir / CHECKPOINT_DIR)
        pub.publish(stats={})
    with Publisher(store, kind="run", name="index", stage="corpus.dedup-index", recipe={}) as pub:
        (pub.dir / "index").mkdir()
        (pub.dir / "index" / "keys.bin").write_bytes(b"\1" * 16)
        pub.publish(stats={})

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)  # fmt: skip
    with Publisher(store, kind="run", name="lm", stage="train.import-model", recipe={}) as pub:
        LlamaForCausalLM(config).save_pretrained(pub.dir / CHECKPOINT_DIR)
        tok.save_pretrained(pub.dir / CHECKPOINT_DIR)
        pub.publish(stats={})

    chat = [{"role": "user", "content": "alpha beta"}, {"role": "assistant", "content": "gamma delta"}]
    schema = pa.schema([("id", pa.string()), ("parents", pa.list_(pa.string())),
                        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))])  # fmt: skip
    with Publisher(store, kind="dataset", name="chats", stage="test", recipe={}) as pub:
        for split in ("train", "test"):
            rows = [{"id": f"{split}{i}", "parents": [], "messages": chat} for i in range(4)]
            pub.write_table(pa.Table.from_pylist(rows, schema=schema), split=split)
        pub.publish(stats={}, arrow_schema=schema)
    return store


def _serve(tmp: Path, run: str) -> list[str]:
    return ["serve", run, "--port", "0"]


def _make_student(tmp: Path, run: str) -> list[str]:
    return ["train", "make-student", "--teacher", run, "--layers", "1", "--name", "student"]


def _sft(tmp: Path, run: str) -> list[str]:
    text = f"stage: train\nmethod: sft\nname: s\nmodel: {run}\ndatasets: [{{ref: chats}}]\nmax_steps: 1\n"
    return ["train", "run", str(write_recipe(tmp / "sft.yaml", text))]


def _sft_lora(tmp: Path, run: str) -> list[str]:
    # target_modules makes SFT read the model's architecture before it loads the model
    text = (
        f"stage: train\nmethod: sft\nname: s\nmodel: {run}\ndatasets: [{{ref: chats}}]\nmax_steps: 1\n"
        "peft: {method: lora, r: 2, alpha: 4, target_modules: [q_proj]}\n"
    )
    return ["train", "run", str(write_recipe(tmp / "sft-lora.yaml", text))]


def _eval(tmp: Path, run: str) -> list[str]:
    text = f"stage: eval\nname: e\nmodels: [lm, {run}]\ndataset: {{ref: chats, split: test}}\n"
    return ["eval", "run", str(write_recipe(tmp / "eval.yaml", text))]


def _synth_teacher(tmp: Path, run: str) -> list[str]:
    source = write_jsonl(tmp / "prompts.jsonl", [{"text": "alpha beta gamma"}])
    text = f"stage: synth.generate\nname: g\ninput: {source}\nteachers: [{{serve: {run}}}]\n"
    return ["synth", "generate", str(write_recipe(tmp / "synth.yaml", text))]


def _merge(tmp: Path, run: str) -> list[str]:
    return ["train", "merge", run]


ENTRY_POINTS = [_serve, _make_student, _sft, _sft_lora, _eval, _synth_teacher, _merge]
WRONG_RUNS = {
    "tok": "is a tokenizer (made by train.tokenizer), not a causal language model",
    "broken": "config.json cannot be read (JSONDecodeError",
    "noconfig": "its checkpoint has no config.json",
    "index": "is a dedup index (made by corpus.dedup-index)",
}


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("run", list(WRONG_RUNS))
def test_a_run_that_is_no_causal_lm_is_one_error_line_naming_what_it_is(
    cli, tmp_path, model_store, entry, run
):
    result = cli("--store", model_store.root, *entry(tmp_path, run))
    assert_one_line_error(result)
    assert f"run {run}@" in result.err and WRONG_RUNS[run] in result.err, result.err
    assert "give a model run (train import-model, make-student, sft, pretrain)" in result.err
    assert "full checkpoint" not in result.err  # merge said a tokenizer was one
    assert [m.name for m in model_store.list(kind="run")].count("student") == 0


def test_a_causal_lm_passes_the_check_and_merge_says_it_is_no_adapter(cli, model_store):
    from manifests.model_runs import require_causal_lm

    lm = model_store.resolve("lm")
    assert require_causal_lm(lm, model_store) is lm
    result = cli("--store", model_store.root, "train", "merge", "lm")
    assert_one_line_error(result)
    assert "is a full model checkpoint (made by train.import-model), not an adapter" in result.err


@pytest.mark.network
@pytest.mark.parametrize(
    ("run", "message"),
    [("tok", "is a tokenizer (made by train.tokenizer), not a reward model"),
     ("lm", "is no reward model (LlamaForCausalLM): it has no sequence-classification head")],
)  # fmt: skip
def test_a_reward_model_that_is_no_sequence_classifier_is_refused_before_any_request(
    cli, tmp_path, model_store, run, message
):
    asked = []
    source = write_jsonl(tmp_path / "prompts.jsonl", [{"text": "alpha beta gamma"}])
    with scripted(lambda text, seed: asked.append(text) or f"answer {seed}") as url:
        recipe = write_recipe(
            tmp_path / "p.yaml",
            f"stage: synth.preferences\nname: p\ninput: {source}\n{_teacher(url)}"
            f"score: {{method: reward_model, reward_model: {run}}}\n",
        )
        result = cli("--store", model_store.root, "synth", "preferences", recipe)
    assert_one_line_error(result)
    assert message in result.err and not asked


# ---------------------------------------------------------------------------- keys stay secret

SECRET = "sk-proj-Zq81xUn4fake0key9Secret"


@pytest.mark.parametrize(
    "teacher",
    [f"api_key_env: {SECRET}", f"api_key_env: {SECRET.replace('-', '_')}",
     "api_key_env: hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345"],
)  # fmt: skip
def test_a_key_given_as_api_key_env_is_refused_without_showing_it(cli, tmp_path, store, qa_file, teacher):
    secret = teacher.split(": ", 1)[1]
    recipe = write_recipe(
        tmp_path / "k.yaml",
        f"stage: synth.generate\nname: k\ninput: {qa_file}\n"
        f"teachers: [{{model: m, base_url: 'http://127.0.0.1:9/v1', max_attempts: 1, {teacher}}}]\n",
    )
    result = cli("--store", store.root, "synth", "generate", recipe)
    assert_one_line_error(result)
    assert "looks like a key, not a variable name" in result.err
    assert secret not in result.err and secret not in result.out
    assert secret[:12] not in result.err + result.out  # not even in part
    stored = [p.read_bytes() for p in store.root.rglob("*") if p.is_file()] if store.root.exists() else []
    assert not any(secret.encode() in b for b in stored)
    assert not list(store.root.rglob("manifest.json"))  # nothing published


def test_credentials_in_the_endpoint_url_are_refused_without_showing_them(cli, tmp_path, store, qa_file):
    for url in (f"http://user:{SECRET}@127.0.0.1:9/v1", f"http://127.0.0.1:9/v1?api-key={SECRET}"):
        recipe = write_recipe(
            tmp_path / "u.yaml",
            f"stage: synth.generate\nname: u\ninput: {qa_file}\nteachers: [{{model: m, base_url: '{url}'}}]\n",
        )
        result = cli("--store", store.root, "synth", "generate", recipe)
        assert_one_line_error(result)
        assert "'base_url' carries" in result.err and SECRET not in result.err + result.out


def test_a_variable_name_is_not_taken_for_a_key(cli, tmp_path, store, qa_file, monkeypatch):
    monkeypatch.delenv("MY_PROVIDER_API_KEY_2", raising=False)
    recipe = write_recipe(
        tmp_path / "v.yaml",
        f"stage: synth.generate\nname: v\ninput: {qa_file}\n"
        "teachers: [{model: m, base_url: 'http://127.0.0.1:9/v1', api_key_env: MY_PROVIDER_API_KEY_2}]\n",
    )
    result = cli("--store", store.root, "synth", "generate", recipe)
    assert_one_line_error(result)
    assert "environment variable MY_PROVIDER_API_KEY_2 is not set" in result.err


# ------------------------------------------------------------------- SIGKILL re-sends at most in flight


@contextmanager
def counting_endpoint(latency_s: float):
    """A chat endpoint that counts every request as it arrives and answers after ``latency_s``."""
    count = {"n": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            with lock:
                count["n"] += 1
            time.sleep(latency_s)
            reply = "echo " + body["messages"][-1]["content"][-20:]
            payload = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "counted",
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": reply}}],
                                  "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}).encode()  # fmt: skip
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):  # the client was killed meanwhile
                pass

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", count
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.network
def test_a_sigkilled_run_resends_at_most_the_requests_in_flight(cli, tmp_path, store):
    rows, concurrency = 60, 4
    source = write_jsonl(
        tmp_path / "many.jsonl", [{"text": f"prompt number {i} about things"} for i in range(rows)]
    )
    with counting_endpoint(latency_s=0.15) as (url, count):
        recipe = write_recipe(
            tmp_path / "kill.yaml",
            f"stage: synth.generate\nname: kill\ninput: {source}\n"
            f"teachers: [{{model: counted, base_url: '{url}', max_concurrency: {concurrency}}}]\n",
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "manifests.cli", "--store", str(store.root), "synth", "generate", str(recipe)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.time() + 120
        while count["n"] < 16 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        at_kill = count["n"]
        assert 16 <= at_kill < rows, "the run should have been killed partway"
        time.sleep(0.3)  # requests that were in flight reach the server's count
        at_kill = count["n"]
        result = cli("--store", store.root, "synth", "generate", recipe)
        assert result.code == 0, result.err
        total = count["n"]
    stats = store.resolve("kill").stats["requests"]
    assert stats["cache_hits"] + stats["answered"] == rows and len(_rows(store, "kill")) == rows
    # Only what was in flight when the process died -- at most `max_concurrency` -- is paid twice;
    # every answer that had arrived came from the cache.
    assert total <= rows + concurrency
    assert stats["cache_hits"] >= at_kill - concurrency
    assert total - rows == at_kill - stats["cache_hits"]


@pytest.mark.parametrize("ref", ["missing.jsonl", "data/missing.parquet"])
def test_a_missing_input_file_is_named_as_a_file(cli, tmp_path, store, ref):
    recipe = write_recipe(
        tmp_path / "m.yaml",
        f"stage: synth.generate\nname: m\ninput: {ref}\nteachers: [{{model: m, base_url: 'http://127.0.0.1:9/v1'}}]\n",
    )
    result = cli("--store", store.root, "synth", "generate", recipe)
    assert_one_line_error(result)
    assert f"input {ref}: no such file (relative paths start at {ROOT})" in result.err
