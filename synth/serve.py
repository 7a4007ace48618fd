"""``distillery serve``: a store checkpoint behind a local OpenAI-compatible endpoint, with faults.

    distillery serve smollm2-135m-instruct --port 8000
    distillery serve echo --port 0 --latency-ms 200 --fault-429 0.1 --request-log requests.jsonl

``GET /v1/models``, ``POST /v1/chat/completions`` (with ``logprobs: true, top_logprobs: k``: each
answer token's log-prob and its k likeliest alternatives, from the model's own log-softmax) and
``POST /v1/completions`` answer in OpenAI's JSON shapes, so the ``openai`` client (and so the synth engine) talks to it unchanged; so do the
Files and Batches endpoints of the Batch API (``synth/serve_batch.py``). Handler
threads queue their requests; one generation thread answers up to ``--max-batch`` of them at a
time, in one batched ``model.generate`` per group of equal sampling settings. The model ``echo``
loads nothing and answers with the words of the last user message: a teacher for benchmarks and
reliability tests that costs no compute. The fault options make a share of requests fail the ways
hosted APIs fail (429 with Retry-After, 500, a truncated body, a stall), drawn from a seeded
generator, and ``--request-log`` writes one line per request::

    {"time": 1718000000.1, "path": "/v1/chat/completions", "key": "5f1c…", "outcome": "429"}

(a batch line is logged under ``/v1/batches/<id>`` with the key of its body and ``batch-answered``).

Only the standard library serves HTTP: no server dependency, and nothing but loopback by default.
"""

from __future__ import annotations

import argparse
import json
import queue
import random
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from manifests.errors import DistilleryError
from manifests.store import Store
from synth.serve_batch import BatchOptions, BatchService
from synth.serve_http import GENERATION_PATHS, BadRequest, RequestLog, Response, error_body, request_key
from synth.teacher import Answer, cut_at_stop, generate_answers, logprobs_before_stop

ECHO = "echo"
"""The model name that serves no model (see ``EchoModel``)."""
DEFAULT_MAX_TOKENS = 64
MAX_CHOICES = 128
MAX_BODY = 1 << 30
"""Bytes a request body may have (a batch input file of OpenAI's largest allowed size fits)."""
BATCH_PATHS = ("/v1/files", "/v1/batches")
"""Served by ``synth/serve_batch.py``."""


class ServeOptions(BaseModel):
    """How requests are batched for generation."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    max_batch: int = Field(default=8, ge=1)
    """Most requests answered together by one generation step."""
    batch_wait_ms: float = Field(default=10.0, ge=0)
    """How long the generation thread waits for more requests before it starts a batch."""


class FaultOptions(BaseModel):
    """Faults and latency injected into the generation endpoints (``/v1/models`` always answers).

    One draw per request from a generator seeded with ``fault_seed`` picks at most one fault: the
    rates are shares of the requests and must add up to at most 1.
    """

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    fault_429: float = Field(default=0.0, ge=0, le=1)
    """Share of requests refused with 429 (rate limited) and a Retry-After header."""
    retry_after: int = Field(default=1, ge=0)
    """Seconds named by the Retry-After header of an injected 429."""
    fault_500: float = Field(default=0.0, ge=0, le=1)
    """Share of requests failed with 500 and an error body."""
    fault_malformed: float = Field(default=0.0, ge=0, le=1)
    """Share of requests answered 200 with a truncated body that is not valid JSON."""
    fault_slow: float = Field(default=0.0, ge=0, le=1)
    """Share of requests that stall for --slow-seconds before being answered normally."""
    slow_seconds: float = Field(default=30.0, ge=0)
    """How long a slow request stalls (longer than a client's timeout makes the timeout fire)."""
    latency_ms: float = Field(default=0.0, ge=0)
    """Every response of a generation endpoint takes at least this long (a fixed round trip, slept
    in the request's own thread, so concurrent requests overlap)."""
    fault_seed: int = 0
    """Seed of the generator that draws the faults (same seed, same order of requests: same faults)."""
    request_log: Path | None = None
    """Append one JSON line per request (time, path, key = sha256 of the canonical body, outcome)."""

    @model_validator(mode="after")
    def _shares(self) -> FaultOptions:
        if self.fault_429 + self.fault_500 + self.fault_malformed + self.fault_slow > 1 + 1e-9:
            raise ValueError("the fault rates add up to more than 1")
        return self

    def draw(self, rng: random.Random) -> str | None:
        """The fault for one request, or None."""
        u = rng.random()
        for fault, rate in (("429", self.fault_429), ("500", self.fault_500),
                            ("malformed", self.fault_malformed), ("slow", self.fault_slow)):  # fmt: skip
            if u < rate:
                return fault
            u -= rate
        return None


@dataclass
class GenerationRequest:
    """One request to a generation endpoint, validated."""

    prompt: list[dict[str, str]] | str
    """Chat messages, or the raw prompt of ``/v1/completions``."""
    max_tokens: int
    temperature: float
    top_p: float
    seeds: list[int]
    """One per choice (``n`` of them)."""
    stop: list[str]
    top_logprobs: int | None = None
    """Chat requests with ``logprobs: true``: the alternatives wanted per token (0 to 20); None: no logprobs."""


class EchoModel:
    """No model: the answer is the words of the last user message (of the prompt, for completions),
    shuffled by the request's seed when sampling, cut to ``max_tokens`` words; usage counts words. It has
    no distribution: asked for log-probs, it returns none (``logprobs: null``, as some endpoints do)."""

    fingerprint = "fp_echo"
    chat_template = True

    def generate(self, prompts, max_tokens: int, temperature: float, top_p: float, seeds: list[int],
                 top_logprobs: int | None = None):  # fmt: skip
        answers = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            if isinstance(prompt, str):
                words = source = prompt.split()
            else:
                words = [w for m in prompt for w in m["content"].split()]
                users = [m["content"] for m in prompt if m["role"] == "user"]
                source = users[-1].split() if users else []
            if temperature > 0:
                source = list(source)
                random.Random(seed).shuffle(source)
            cut = source[:max_tokens]
            answers.append(
                Answer(" ".join(cut), len(words), len(cut), "length" if len(source) > max_tokens else "stop")
            )
        return answers


class CheckpointModel:
    """A run from the store, loaded with its tokenizer (``manifests.models.load_causal_lm``)."""

    def __init__(self, manifest, store: Store):
        from manifests.models import load_causal_lm

        self.model, self.tokenizer = load_causal_lm(manifest, store)
        self.model.eval()
        # Left padding so that every row of a batch continues from its own last token.
        self.tokenizer.padding_side = "left"
        self.fingerprint = f"fp_{manifest.id[:12]}"
        self.chat_template = bool(getattr(self.tokenizer, "chat_template", None))

    def generate(self, prompts, max_tokens: int, temperature: float, top_p: float, seeds: list[int],
                 top_logprobs: int | None = None):  # fmt: skip
        return generate_answers(self.model, self.tokenizer, prompts, max_tokens, temperature, top_p, seeds,
                                top_logprobs=top_logprobs)  # fmt: skip


@dataclass
class _Job:
    request: GenerationRequest
    done: threading.Event = field(default_factory=threading.Event)
    answers: list[Answer] = field(default_factory=list)
    error: Exception | None = None


class Batcher:
    """One generation thread; handler threads block in ``submit`` until their answers are ready."""

    def __init__(self, backend, options: ServeOptions):
        self.backend, self.options = backend, options
        self.batch_sizes: list[int] = []
        """Sequences in each generation call, in order (what a benchmark or a test inspects)."""
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="distillery-serve-generate", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest) -> list[Answer]:
        """The request's ``n`` answers."""
        job = _Job(request)
        with self._lock:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            self._queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.answers

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            jobs, deadline = [job], time.monotonic() + self.options.batch_wait_ms / 1000
            while len(jobs) < self.options.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(deadline - time.monotonic(), 1e-6))
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # seen again by the outer loop, after this batch
                    break
                jobs.append(nxt)
            self._answer(jobs)

    def _answer(self, jobs: list[_Job]) -> None:
        groups: dict[tuple, list[_Job]] = {}
        for job in jobs:
            r = job.request
            groups.setdefault((r.max_tokens, r.temperature, r.top_p, r.top_logprobs), []).append(job)
        for (max_tokens, temperature, top_p, top_logprobs), group in groups.items():
            # A greedy answer is the same for every choice: generate it once and copy it.
            counts = [1 if temperature == 0 else len(j.request.seeds) for j in group]
            prompts = [j.request.prompt for j, c in zip(group, counts, strict=True) for _ in range(c)]
            seeds = [s for j, c in zip(group, counts, strict=True) for s in j.request.seeds[:c]]
            try:
                # (only when asked: a backend of five arguments serves everything else)
                asked = {} if top_logprobs is None else {"top_logprobs": top_logprobs}
                answers = self.backend.generate(prompts, max_tokens, temperature, top_p, seeds, **asked)
            except Exception as e:  # the requests fail with 500; the server goes on
                print(f"error: generation failed: {e!r}", file=sys.stderr)
                answers, failure = [], e
            else:
                self.batch_sizes.append(len(prompts))
                failure = None
            start = 0
            for job, count in zip(group, counts, strict=True):
                mine = answers[start : start + count]
                start += count
                job.error = failure
                job.answers = mine * len(job.request.seeds) if count == 1 else mine
                job.done.set()


def _number(
    body: dict, key: str, default: float, low: float, high: float, *, low_open: bool = False
) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"'{key}' must be a number")
    if value < low or value > high or (low_open and value == low):
        raise BadRequest(f"'{key}' must be {'>' if low_open else '>='} {low} and <= {high}")
    return float(value)


def _integer(body: dict, key: str, default: int | None, low: int) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise BadRequest(f"'{key}' must be an integer >= {low}")
    return value


def _content(message: Any, i: int) -> dict[str, str]:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise BadRequest(f"'messages[{i}]' must be an object with a 'role'")
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text parts mean anything here
        content = "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    if not isinstance(content, str):
        raise BadRequest(f"'messages[{i}].content' must be a string or a list of text parts")
    return {"role": message["role"], "content": content}


def parse_request(kind: str, body: Any) -> GenerationRequest:
    """Validate a chat or text completion request (the model name is checked by the caller)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if body.get("stream"):
        raise BadRequest("'stream: true' is not supported by distillery serve; send stream: false")
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list of messages")
        prompt: list[dict[str, str]] | str = [_content(m, i) for i, m in enumerate(messages)]
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadRequest("'prompt' must be a string")
    max_tokens = _integer(body, "max_completion_tokens", None, 1) or _integer(body, "max_tokens", None, 1)
    n = _integer(body, "n", 1, 1)
    if n > MAX_CHOICES:
        raise BadRequest(f"'n' must be <= {MAX_CHOICES}")
    seed = _integer(body, "seed", None, 0)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("'stop' must be a string or a list of strings")
    top_logprobs = None
    if kind == "chat" and body.get("logprobs") is not None:
        if not isinstance(body["logprobs"], bool):
            raise BadRequest("'logprobs' must be a boolean")
        if body["logprobs"]:
            top_logprobs = _integer(body, "top_logprobs", 0, 0)
            if top_logprobs > 20:
                raise BadRequest("'top_logprobs' must be <= 20")
    if kind == "chat" and body.get("top_logprobs") is not None and top_logprobs is None:
        raise BadRequest("'top_logprobs' needs 'logprobs: true'")
    # Without a seed a sampled request draws its own: unseeded sampling is not reproducible.
    base = seed if seed is not None else random.SystemRandom().randrange(2**31)
    return GenerationRequest(
        prompt=prompt,
        max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        seeds=[base + i for i in range(n)],
        stop=stop,
        top_logprobs=top_logprobs,
    )


def _apply_stop(answer: Answer, stop: list[str]) -> tuple[str, str]:
    text, stopped = cut_at_stop(answer.text, stop)
    return (text, "stop") if stopped else (text, answer.finish_reason)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the openai client expects
    # Headers and body go out in two writes; with Nagle's algorithm on, the body then waits for the
    # client's delayed ACK (~40 ms on Linux) on every keep-alive response.
    disable_nagle_algorithm = True
    server: _HTTPServer

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def _handle(self, method: str) -> None:
        path, _, query = self.path.partition("?")
        try:
            raw = self._body()
        except BadRequest as e:  # an answer, not a traceback on the server's stderr and a dropped socket
            self.close_connection = True  # the rest of the stream cannot be trusted
            response = Response.error(e.status, str(e), e.code)
        else:
            response = self.server.app.respond(
                method, path.rstrip("/"), raw, self.headers.get("Content-Type", ""), query
            )
        try:
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(response.body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (its timeout fired); nothing to do

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            # Streamed uploads (a batch file through an aiohttp client) come without a length.
            chunks, total = [], 0
            while size := self._chunk_size():
                total += size
                if total > MAX_BODY:
                    raise BadRequest(f"the request body is larger than {MAX_BODY} bytes", 413)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        if length > MAX_BODY:
            raise BadRequest(f"the request body is larger than {MAX_BODY} bytes", 413)
        return self.rfile.read(length) if length > 0 else b""

    def _chunk_size(self) -> int:
        line = self.rfile.readline().split(b";", 1)[0].strip()
        try:
            return int(line or b"0", 16)
        except ValueError:
            raise BadRequest("malformed chunked body (a chunk size is not hexadecimal)") from None

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request log, when asked for, is the record of requests


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024  # the default 5 resets connections when a client opens many at once
    app: Server


class Server:
    """A running endpoint: ``.url`` (``http://HOST:PORT/v1``), ``.close()``; a context manager."""

    def __init__(
        self,
        model: str,
        backend,
        host: str,
        port: int,
        options: ServeOptions,
        faults: FaultOptions,
        batch: BatchOptions | None = None,
    ):
        self.model, self.backend, self.faults = model, backend, faults
        self.created = int(time.time())
        self._rng = random.Random(faults.fault_seed)
        self._rng_lock = threading.Lock()
        self._closed = False
        self._httpd = _HTTPServer((host, port), _Handler)  # first: a port in use fails before threads start
        self._httpd.app = self
        self._log = RequestLog(faults.request_log) if faults.request_log else None
        self.batcher = Batcher(backend, options)
        self.batches = BatchService(self, batch or BatchOptions(), faults.fault_seed, self._log)
        """The Batch API's files and batches (in memory)."""
        self.host, self.port = self._httpd.server_address[:2]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="distillery-serve", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def batch_sizes(self) -> list[int]:
        """Sequences in each generation call so far."""
        return self.batcher.batch_sizes

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self.batches.close()
        self.batcher.close()
        if self._log:
            self._log.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def respond(
        self, method: str, path: str, raw: bytes, content_type: str = "", query: str = ""
    ) -> Response:
        """The response to one HTTP request (called in that request's handler thread)."""
        start = time.monotonic()
        if path.startswith(BATCH_PATHS):
            response = self.batches.respond(method, path, raw, content_type, query)
        else:
            response = self._respond(method, path, raw)
        if path in GENERATION_PATHS:
            time.sleep(max(0.0, self.faults.latency_ms / 1000 - (time.monotonic() - start)))
        if self._log:
            self._log.write(path, request_key(raw), response.outcome)
        return response

    def _respond(self, method: str, path: str, raw: bytes) -> Response:
        kind = GENERATION_PATHS.get(path)
        if path == "/v1/models" and method == "GET":
            card = {"id": self.model, "object": "model", "created": self.created, "owned_by": "distillery"}
            return Response.json(200, {"object": "list", "data": [card]}, "answered")
        if kind is None or method != "POST":
            known = path == "/v1/models" or kind is not None
            status, code = (405, "method_not_allowed") if known else (404, "not_found")
            return Response.error(status, f"{method} {path} is not served", code)
        with self._rng_lock:
            fault = self.faults.draw(self._rng)
        if fault == "429":
            body = error_body(
                "Rate limit reached (injected by distillery serve)", "rate_limit_error", "rate_limit_exceeded"
            )
            return Response.json(429, body, "429", **{"Retry-After": str(self.faults.retry_after)})
        if fault == "500":
            return Response.json(500, error_body("Injected server error", "server_error"), "500")
        if fault == "slow":
            time.sleep(self.faults.slow_seconds)
        try:
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                raise BadRequest("the request body is not valid JSON") from None
            request = self.validate(kind, body)
        except BadRequest as e:
            return Response.error(e.status, str(e), e.code)
        if fault == "malformed":
            whole = json.dumps(self.completion(kind, request, [])).encode()
            return Response(200, whole[: len(whole) // 2], "malformed")
        try:
            answers = self.batcher.submit(request)
        except Exception as e:  # already reported by the generation thread
            return Response.error(500, f"generation failed: {e}")
        return Response.json(
            200, self.completion(kind, request, answers), "slow-answered" if fault else "answered"
        )

    def validate(self, kind: str, body: Any) -> GenerationRequest:
        """A chat (``kind`` ``chat``) or text completion request for this server's model; else ``BadRequest``."""
        if isinstance(body, dict) and "model" not in body:
            raise BadRequest("'model' is required")
        if isinstance(body, dict) and body.get("model") != self.model:
            raise BadRequest(f"model '{body.get('model')}' is not served here; this server serves "
                             f"'{self.model}'", 404, "model_not_found")  # fmt: skip
        request = parse_request(kind, body)
        if kind == "chat" and not self.backend.chat_template:
            raise BadRequest(f"'{self.model}' has no chat template; use /v1/completions")
        return request

    def completion(self, kind: str, request: GenerationRequest, answers: list[Answer]) -> dict[str, Any]:
        choices = []
        for i, answer in enumerate(answers):
            text, finish = _apply_stop(answer, request.stop)
            if kind == "chat":
                content = logprobs_before_stop(answer.logprobs, request.stop)
                logprobs = None if content is None else {"content": content, "refusal": None}
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": logprobs, "finish_reason": finish})  # fmt: skip
            else:
                choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": finish})
        prompt_tokens = answers[0].prompt_tokens if answers else 0
        completion_tokens = sum(a.completion_tokens for a in answers)
        return {
            "id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": self.model,
            "system_fingerprint": self.backend.fingerprint,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }  # fmt: skip


def _option_models() -> tuple[type[BaseModel], ...]:
    return ServeOptions, FaultOptions, BatchOptions


def _options(options: dict[str, Any]) -> tuple[ServeOptions, FaultOptions, BatchOptions]:
    models = _option_models()
    unknown = set(options).difference(*(m.model_fields for m in models))
    if unknown:
        raise TypeError(f"unknown serve options: {', '.join(sorted(unknown))}")
    try:
        return tuple(m(**{k: v for k, v in options.items() if k in m.model_fields}) for m in models)
    except ValidationError as e:
        first = e.errors()[0]
        where = "--" + str(first["loc"][0]).replace("_", "-") + ": " if first["loc"] else ""
        raise DistilleryError(f"serve: {where}{first['msg'].removeprefix('Value error, ')}") from None


def start_server(
    model: str,
    store: Store | Path | str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    **options: Any,
) -> Server:
    """Serve ``model`` (a run reference in ``store``, or ``echo``) from background threads of this
    process. ``options`` are the fields of ``ServeOptions``, ``FaultOptions`` and ``BatchOptions``."""
    serve_options, faults, batch = _options(options)
    if not 0 <= port <= 65535:
        raise DistilleryError(f"serve: --port must be 0 (any free port) to 65535, got {port}")
    if model == ECHO:
        backend: Any = EchoModel()
    else:
        store = store if isinstance(store, Store) else Store(store)
        backend = CheckpointModel(store.resolve(model, kind="run"), store)
    return Server(model, backend, host, port, serve_options, faults, batch)


def run(args: argparse.Namespace) -> int:
    """The CLI verb: serve until SIGINT or SIGTERM, then exit 0."""
    fields = set().union(*(m.model_fields for m in _option_models()))
    options = {k: v for k, v in vars(args).items() if k in fields}
    stopping: list[int] = []
    with start_server(args.model, args.store_obj, args.host, args.port, **options) as server:
        previous = {s: signal.signal(s, lambda signum, _: stopping.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}  # fmt: skip
        try:
            print(f"serving {args.model} at {server.url}", flush=True)
            while not stopping:
                time.sleep(0.1)  # a flag, not an Event: Event.set in a signal handler can deadlock
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    return 0
