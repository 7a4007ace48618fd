"""The teacher engine: OpenAI-compatible requests that never pay twice.

One asyncio engine per run sends every request a task asks for to its teacher's endpoint (the
OpenAI API, vLLM, SGLang, Ollama, ``distillery serve``) with the ``openai`` client, and:

- **adapts its concurrency**: a 429 halves the teacher's in-flight limit and pauses it for the
  Retry-After the server asked for; every ``limit`` successes raise it by one again (AIMD, as TCP
  does), up to ``max_concurrency``. Optional requests/min and tokens/min windows reserve
  ``max_tokens`` up front and give back what the answer did not use;
- **retries** 5xx, timeouts, dropped connections and malformed responses with exponential
  backoff and full jitter, at most ``max_attempts`` times; a request that keeps failing becomes a
  failed answer carrying its error (never a gap, never an endless loop). Other 4xx are not retried;
- **caches** each answer the moment it arrives (``synth/cache.py``), so a rerun pays nothing twice;
- **keeps to a budget**: an estimate before the run, and a clean stop at the cost or token cap with
  every answer so far saved;
- sends the cache misses of a teacher with ``batch: true`` through its Batch API instead, at the batch
  price, with the same cache and lineage (``synth/batch.py``);
- records per answer what the row lineage needs: teacher as configured and as served (``model``,
  ``system_fingerprint``), endpoint, sampling, seed, attempts, finish reason, tokens, cost, cache hit.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import math
import os
import random
import re
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pydantic import Field, model_validator

from manifests.errors import DistilleryError
from manifests.recipes import RecipeConfig
from synth.cache import RequestCache, request_key

_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEY_PREFIXES = ("sk_", "hf_", "gsk_", "xai_", "ghp_", "gho_", "github_pat_", "AKIA", "AIza", "pk_", "rk_")


def looks_like_a_key(value: str) -> bool:
    """Whether an ``api_key_env`` value is a secret pasted where the variable's name belongs.

    A shell variable name is letters, digits and ``_``; keys have ``-`` or ``.`` in them (``sk-…``),
    or are long runs of mixed case and digits (``hf_…``, ``AKIA…``) or of hex digits, which names
    written in UPPER_SNAKE case are not."""
    if not _VARIABLE_NAME.fullmatch(value):
        return True
    if len(value) < 20:
        return False
    mixed = (
        any(c.islower() for c in value)
        and any(c.isupper() for c in value)
        and any(c.isdigit() for c in value)
    )
    digits = any(c.isdigit() for c in value)
    return mixed or digits and (value.startswith(_KEY_PREFIXES) or len(value) >= 32 and "_" not in value)


_SECRET_PARAMETERS = {"key", "api_key", "api-key", "apikey", "token", "access_token", "auth", "sig", "secret"}


def credentials_in_url(url: str) -> str | None:
    """What secret an endpoint URL carries (a password, a key parameter), or None."""
    from urllib.parse import parse_qsl, urlsplit

    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # a malformed port or host: the client says so when it connects
        return None
    if password or parts.username:
        return "a user name or password"
    named = [k for k, _ in parse_qsl(parts.query, keep_blank_values=True) if k.lower() in _SECRET_PARAMETERS]
    return f"a '{named[0]}' parameter" if named else None


class TeacherConfig(RecipeConfig):
    """One teacher: a model behind an OpenAI-compatible endpoint (or served locally for the run)."""

    name: str | None = None
    """How rows and routing name this teacher (default: the model)."""
    model: str | None = None
    """The model name the endpoint expects (``gpt-4o-mini``, ``Qwen/Qwen2.5-7B-Instruct``…)."""
    base_url: str | None = None
    """The endpoint, e.g. ``https://api.openai.com/v1``, ``http://localhost:8000/v1`` (vLLM)."""
    serve: str | None = None
    """Instead of ``base_url``: a checkpoint in the store, served on loopback for the run
    (``distillery serve``) -- for development, tests and small local teachers."""
    api_key_env: str | None = None
    """Name of the environment variable holding the API key (never the key itself)."""
    price_input: float = Field(default=0.0, ge=0)
    """Price per million input tokens, for cost tracking and the budget."""
    price_output: float = Field(default=0.0, ge=0)
    """Price per million output tokens."""
    max_concurrency: int = Field(default=16, ge=1)
    """Requests in flight at most (the adaptive limit starts here and climbs back to it)."""
    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    """Prompt plus ``max_tokens`` are reserved per request; what the answer did not use is given back."""
    timeout: float = Field(default=120.0, gt=0)
    """Seconds before a request counts as timed out (and is retried)."""
    max_attempts: int = Field(default=6, ge=1)
    """Attempts per request, the first included, before it becomes a failed answer."""
    backoff: float = Field(default=1.0, gt=0)
    """Base of the exponential backoff in seconds (attempt k waits up to ``backoff * 2**k``, capped at 60)."""
    serve_max_batch: int = Field(default=8, ge=1)
    """With ``serve``: requests generated together in one batch."""
    batch: bool = False
    """Send this teacher's requests through the endpoint's Batch API (``/v1/files`` + ``/v1/batches``:
    a lower price, answers within 24 h) instead of one by one; see ``synth/batch.py``. Every row of
    the run is then in flight at once, so that one batch holds them all."""
    batch_poll_s: float = Field(default=30.0, gt=0)
    """With ``batch``: seconds between two looks at a batch's status."""
    batch_max_requests: int = Field(default=50_000, ge=1)
    """With ``batch``: requests per batch file at most (OpenAI's limit is 50,000)."""
    batch_price_factor: float = Field(default=0.5, ge=0)
    """With ``batch``: the share of ``price_input``/``price_output`` a batch answer costs."""

    @model_validator(mode="after")
    def _one_endpoint(self) -> TeacherConfig:
        # Checked here, on the whole teacher, and not by a validator of the field: a field's error
        # line shows the value it got, and that value would be the key, on the terminal and in logs.
        if self.api_key_env is not None and looks_like_a_key(self.api_key_env):
            raise ValueError(
                "'api_key_env' looks like a key, not a variable name (the value is not shown); put the "
                "key in an environment variable and give its name there, e.g. "
                "export OPENAI_API_KEY=… and api_key_env: OPENAI_API_KEY"
            )
        if self.base_url is not None and credentials_in_url(self.base_url):
            # The endpoint goes into every row's lineage, the request keys and the manifest.
            raise ValueError(
                f"'base_url' carries {credentials_in_url(self.base_url)} (the URL is not shown): it would be "
                "written into every row and the manifest; give the bare endpoint and the key's variable "
                "in 'api_key_env'"
            )
        if (self.base_url is None) == (self.serve is None):
            raise ValueError("give exactly one of 'base_url' (an endpoint) or 'serve' (a store checkpoint)")
        if self.base_url is not None and not self.model:
            raise ValueError("'model' is needed with 'base_url'")
        return self

    @property
    def label(self) -> str:
        return self.name or self.model or self.serve or ""

    @property
    def price_factor(self) -> float:
        return self.batch_price_factor if self.batch else 1.0


class SamplingConfig(RecipeConfig):
    """Sampling parameters (every one enters the request key)."""

    max_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = 0
    """Sent to the endpoint (sample ``k`` of a prompt uses ``seed + k``); endpoints honour it to
    different degrees, and the response's ``system_fingerprint`` says which build answered."""


class BudgetConfig(RecipeConfig):
    """A cap on what the run may spend; it stops cleanly there, every answer so far cached."""

    max_cost: float | None = Field(default=None, ge=0)
    """In the currency of the teachers' prices."""
    max_tokens: int | None = Field(default=None, ge=1)
    """Prompt plus completion tokens sent by this run (cache hits are free)."""


@dataclass
class Request:
    teacher: str
    messages: list[dict[str, str]]
    sampling: dict[str, Any]
    sample_index: int = 0
    key: str = ""


@dataclass
class Answer:
    """What came back for one request, with the lineage a row keeps."""

    key: str
    teacher: str
    endpoint: str
    content: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    served_model: str | None = None
    system_fingerprint: str | None = None
    attempts: int = 0
    cache_hit: bool = False
    error: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


class RunStopped(Exception):
    """No new request starts: the budget is reached or the run was interrupted (SIGINT/SIGTERM).
    Requests in flight finish and are cached first."""


class AdaptiveLimit:
    """An in-flight limit that halves on a 429 and climbs back by one every ``limit`` successes."""

    def __init__(self, ceiling: int):
        self.ceiling = self.limit = ceiling
        self.in_flight = 0
        self.resume_at = 0.0
        self.closed = False
        self._successes = 0
        self._changed = asyncio.Condition()

    async def acquire(self) -> bool:
        """Take a slot (True), or False once ``close`` was called: the run stopped, nothing may start."""
        async with self._changed:
            while True:
                pause = self.resume_at - time.monotonic()
                if self.closed:
                    return False
                if pause > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), pause)
                elif self.in_flight < self.limit:
                    self.in_flight += 1
                    return True
                else:
                    await self._changed.wait()

    async def close(self) -> None:
        """Wake every waiter with no slot: a Retry-After may be an hour away, and a stopped run must
        not wait it out before it can end."""
        async with self._changed:
            self.closed = True
            self._changed.notify_all()

    async def release(self, outcome: str, retry_after: float = 0.0) -> None:
        async with self._changed:
            self.in_flight -= 1
            now = time.monotonic()
            if outcome == "rate_limited":
                if now >= self.resume_at:  # one halving per burst of 429s, not one per request in it
                    self.limit = max(1, self.limit // 2)
                self.resume_at = max(self.resume_at, now + retry_after)
                self._successes = 0
            elif outcome == "ok":
                self._successes += 1
                if self._successes >= self.limit and self.limit < self.ceiling:
                    self.limit += 1
                    self._successes = 0
            # Wake only as many waiters as there are free slots: waking all of a long queue on
            # every answer cost more CPU than the requests themselves.
            self._changed.notify(max(1, self.limit - self.in_flight))


class RateWindow:
    """Requests and tokens per minute over a sliding 60 s window."""

    def __init__(self, rpm: int | None, tpm: int | None):
        self.rpm, self.tpm = rpm, tpm
        self._entries: deque[list[float]] = deque()  # [time, tokens]
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        """Set by ``settle`` and ``stop``: the one waiter (it holds the lock) looks again."""
        self._stopped = False

    async def reserve(self, tokens: int) -> list[float] | None:
        """Wait until the request fits in the window and record it; None without limits, or once
        ``stop`` was called (the caller then starts nothing)."""
        if self.rpm is None and self.tpm is None:
            return None
        tokens = min(tokens, self.tpm or tokens)  # one request larger than the window still goes, alone
        async with self._lock:
            while True:
                if self._stopped:
                    return None
                now = time.monotonic()
                while self._entries and self._entries[0][0] <= now - 60:
                    self._entries.popleft()
                used = sum(e[1] for e in self._entries)
                if (self.rpm is None or len(self._entries) < self.rpm) and (
                    self.tpm is None or used + tokens <= self.tpm
                ):
                    entry = [now, float(tokens)]
                    self._entries.append(entry)
                    return entry
                # Until the oldest entry leaves the window, or a settled answer gives tokens back: a
                # reservation of max_tokens is mostly unused, and waiting out the whole minute
                # regardless held a tpm-limited run to a few requests a minute.
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), max(0.01, self._entries[0][0] + 60 - now))

    def settle(self, entry: list[float] | None, tokens_used: int) -> None:
        if entry is not None:
            entry[1] = float(tokens_used)  # give back the unused part of the reservation
            self._changed.set()

    def stop(self) -> None:
        self._stopped = True
        self._changed.set()


async def gather_all(*aws) -> list[Any]:
    """The results in order, once every one has finished; then the first error, if any (a real one
    before a ``RunStopped``, which it may have caused). Unlike a plain ``gather``, an error never
    leaves a sibling running unawaited: its request would be answered but never cached, and the
    engine closed under it."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise next((e for e in errors if not isinstance(e, RunStopped)), errors[0])
    return list(results)


def estimate_prompt_tokens(messages: list[dict[str, str]]) -> int:
    """About four characters a token (the common rule of thumb) plus a few per message."""
    return sum(len(m.get("content") or "") // 4 + 4 for m in messages)


def _text_content(content: Any) -> str:
    """A message's content as text. The client does not validate responses, so whatever JSON the
    endpoint sent is here: null is an empty answer, a list of content parts is joined, anything
    else is a malformed response (retried) -- never a number that breaks the task or the cache."""
    if content is None:
        return ""
    if isinstance(content, str):
        return _utf8(content)
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        parts = [p.get("text") for p in content if p.get("type") == "text"]
        if all(isinstance(p, str) for p in parts):
            return _utf8("".join(parts))
    raise ValueError(f"message content is not text: {str(content)[:80]}")


def _optional_text(value: Any, name: str) -> str | None:
    if value is None or isinstance(value, str):
        return None if value is None else _utf8(value)
    raise ValueError(f"'{name}' is not a string: {str(value)[:80]}")


def _utf8(text: str) -> str:
    """JSON may carry a lone surrogate (``"\\ud800"``), which no UTF-8 text can hold: hashing the row or
    writing it to Parquet would fail at the end of the run. It becomes U+FFFD, as an invalid byte would."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return re.sub("[\ud800-\udfff]", "\ufffd", text)
    return text


def _retry_after(error: Exception) -> float | None:
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None) or {}
    # A header that is neither a number nor a date, or an endless one, counts as absent (the backoff
    # decides): raised here, it escaped the retry loop as a traceback; "inf" paused the teacher forever.
    with contextlib.suppress(ValueError, TypeError, OverflowError):
        if "retry-after-ms" in headers:
            seconds = float(headers["retry-after-ms"]) / 1000
        elif (value := headers.get("retry-after")) is None:
            return None
        else:
            try:
                seconds = float(value)
            except ValueError:
                seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        if math.isfinite(seconds):
            return max(0.0, seconds)
    return None


@dataclass
class Usage:
    """What this run spent and did, for progress, stats and the budget."""

    sent: int = 0
    answered: int = 0
    cache_hits: int = 0
    failed: int = 0
    retries: int = 0
    rate_limited: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    reserved_cost: float = 0.0
    reserved_tokens: int = 0


class TeacherEngine:
    """Sends requests to the configured teachers; use as ``async with TeacherEngine(...) as engine``."""

    def __init__(self, teachers: list[TeacherConfig], cache: RequestCache, store=None,
                 budget: BudgetConfig | None = None):  # fmt: skip
        labels = [t.label for t in teachers]
        if len(set(labels)) != len(labels):
            raise DistilleryError(f"teachers need distinct names, got {labels}; set 'name' on each")
        self.teachers = {t.label: t for t in teachers}
        self.cache = cache
        self.store = store
        self.budget = budget or BudgetConfig()
        self.usage = Usage()
        self.endpoints: dict[str, str] = {}
        self._clients: dict[str, Any] = {}
        self._limits: dict[str, AdaptiveLimit] = {}
        self._windows: dict[str, RateWindow] = {}
        self._servers: list[Any] = []
        self._rng = random.Random(0)
        self.stopped: str | None = None
        """Why no new request may start (``budget`` or ``interrupted``), once that happens."""
        self._stopping = asyncio.Event()
        self._wakers: set[asyncio.Task] = set()
        self._in_flight: dict[str, asyncio.Future[Answer]] = {}
        """Requests being sent, by key: one that is asked again meanwhile waits for this answer."""
        self.on_progress = lambda: None
        self._batch: Any = None
        """The Batch API client (``synth/batch.py``) when a teacher has ``batch: true``."""

    # ------------------------------------------------------------------ set-up

    def endpoint_of(self, teacher: TeacherConfig) -> str:
        """The endpoint identity in request keys: stable across runs (a served checkpoint by its id)."""
        if teacher.serve is not None:
            return f"serve:{self.store.resolve(teacher.serve, kind='run').id}"
        return teacher.base_url.rstrip("/")

    def model_of(self, teacher: TeacherConfig) -> str:
        return teacher.model or teacher.serve

    async def __aenter__(self) -> TeacherEngine:
        import openai

        for label, teacher in self.teachers.items():
            self.endpoints[label] = self.endpoint_of(teacher)
            base_url = teacher.base_url
            if teacher.serve is not None:
                from synth.serve import start_server

                server = start_server(teacher.serve, store=self.store, max_batch=teacher.serve_max_batch)
                self._servers.append(server)
                base_url = server.url
            key = "unused"
            if teacher.api_key_env:
                key = os.environ.get(teacher.api_key_env, "")
                if not key:
                    raise DistilleryError(
                        f"teacher {label}: environment variable {teacher.api_key_env} is not set; export the API key there"
                    )
            # The engine retries itself (and counts attempts): the client's own retries are off.
            # aiohttp as the transport: the default one spent ~8 ms of CPU per request at 64 in flight
            # (benchmarks/synth), capping a run near 130 requests/s whatever the endpoint could do.
            self._clients[label] = openai.AsyncOpenAI(
                base_url=base_url, api_key=key, max_retries=0, timeout=teacher.timeout,
                http_client=openai.DefaultAioHttpClient(timeout=teacher.timeout),
            )  # fmt: skip
            self._limits[label] = AdaptiveLimit(teacher.max_concurrency)
            self._windows[label] = RateWindow(teacher.requests_per_minute, teacher.tokens_per_minute)
        if any(t.batch for t in self.teachers.values()):
            from synth.batch import BatchClient

            self._batch = BatchClient(self)
        return self

    async def __aexit__(self, *exc) -> None:
        if self._batch is not None:
            await self._batch.close()
        for client in self._clients.values():
            await client.close()
        for server in self._servers:
            server.close()

    # ------------------------------------------------------------------ requests

    def request(
        self, teacher: str, messages: list[dict[str, str]], sampling: SamplingConfig, sample_index: int = 0
    ) -> Request:
        if teacher not in self.teachers:
            raise DistilleryError(
                f"no teacher named {teacher!r}; the recipe declares {sorted(self.teachers)}"
            )
        t = self.teachers[teacher]
        params = sampling.resolved()
        key = request_key(self.endpoint_of(t), self.model_of(t), messages, params, sample_index)
        return Request(teacher, messages, params, sample_index, key)

    def estimate(self, requests: list[Request]) -> tuple[float, int]:
        """(cost, tokens) of the requests not in the cache, at most (every answer ``max_tokens`` long)."""
        cached = self.cache.get_many([r.key for r in requests])
        cost, tokens = 0.0, 0
        for r in requests:
            if r.key in cached:
                continue
            t = self.teachers[r.teacher]
            prompt = estimate_prompt_tokens(r.messages)
            cost += (
                (prompt * t.price_input + r.sampling["max_tokens"] * t.price_output) / 1e6 * t.price_factor
            )
            tokens += prompt + r.sampling["max_tokens"]
        return cost, tokens

    async def ask(self, requests: list[Request]) -> list[Answer]:
        """Answers in request order: from the cache, else from the teacher.

        At the budget cap, or once ``stop()`` was called, no new request starts; those in flight
        finish (and are cached), then ``RunStopped`` is raised.
        """
        cached = self.cache.get_many([r.key for r in requests])
        return await gather_all(*(self._one(r, cached.get(r.key)) for r in requests))

    def _base(self, r: Request) -> Answer:
        sent = dict(r.sampling)
        if sent.get("seed") is not None:
            sent["seed"] += r.sample_index  # as sent: sample k of a prompt uses seed + k
        return Answer(key=r.key, teacher=r.teacher, endpoint=self.endpoints[r.teacher], sampling=sent)

    async def _one(self, r: Request, cached: dict[str, Any] | None) -> Answer:
        if cached is not None:
            self.usage.cache_hits += 1
            self.on_progress()
            known = {k: v for k, v in cached.items() if k in Answer.__dataclass_fields__}  # older entries too
            return Answer(**(known | {"cache_hit": True, "key": r.key, "teacher": r.teacher,
                                      "endpoint": self.endpoints[r.teacher]}))  # fmt: skip
        t = self.teachers[r.teacher]
        if t.batch:  # cache misses of a batch teacher wait for their batch (synth/batch.py)
            return await self._batch.answer(r)
        # Two rows with the same prompt make the same request at once, before the cache has its answer:
        # the second waits for the first rather than paying again -- and perhaps getting another
        # answer under the one key (a rerun would then read both rows back with the one cached last).
        first = self._in_flight.get(r.key)
        if first is not None:
            answer = replace(await first, teacher=r.teacher, endpoint=self.endpoints[r.teacher])
            if answer.ok:
                self.usage.cache_hits += 1
                answer.cache_hit = True
            else:
                self.usage.failed += 1
            self.on_progress()
            return answer
        mine = self._in_flight[r.key] = asyncio.get_running_loop().create_future()
        try:
            answer = await self._send_with_retries(t, r)
        except BaseException as e:
            mine.set_exception(e)
            mine.exception()  # retrieved: it is raised here, whether or not a second request waits
            raise
        else:
            mine.set_result(answer)
        finally:
            del self._in_flight[r.key]
        return answer

    async def _send_with_retries(self, t: TeacherConfig, r: Request) -> Answer:
        prompt_estimate = estimate_prompt_tokens(r.messages)
        limit, window = self._limits[r.teacher], self._windows[r.teacher]
        answer = self._base(r)
        error, attempt = "no attempt made", 0
        while attempt < t.max_attempts:
            attempt += 1
            # The slot first, then the window: a request waiting out a 429's pause for its slot must
            # not hold a window entry stamped long before it is sent (the window would then let a
            # burst through once that entry slid out).
            if not await limit.acquire():
                raise RunStopped(self.stopped)
            entry = await window.reserve(prompt_estimate + r.sampling["max_tokens"])
            try:  # checked last, right before sending: a stop or the cap may have come while waiting
                reserved = self._reserve(t, prompt_estimate, r.sampling["max_tokens"])
            except RunStopped:
                window.settle(entry, 0)
                await limit.release("cancelled")
                raise
            outcome, pause = "error", 0.0
            try:
                self.usage.sent += 1
                answer = self._read(t, r, await self._send(t, r), attempt)
                outcome = "ok"
            except Exception as e:  # sorted by _classify: which failures are worth another attempt
                outcome, pause, error = self._classify(e, t, attempt)
            finally:
                self._unreserve(reserved)
                window.settle(
                    entry, answer.prompt_tokens + answer.completion_tokens if outcome == "ok" else 0
                )
                await limit.release(outcome, pause)
            if outcome == "ok":
                self._spend(answer)
                try:
                    self.cache.put(r.key, self._cacheable(answer))
                except DistilleryError:
                    self.stop("cache")  # an answer that cannot be saved would be paid for again
                    raise
                self.on_progress()
                return answer
            if outcome == "fatal":
                break
            if attempt < t.max_attempts:
                self.usage.retries += 1
                if outcome != "rate_limited":  # after a 429 the limiter itself waits for Retry-After
                    with contextlib.suppress(TimeoutError):  # a stop ends the backoff at once
                        await asyncio.wait_for(self._stopping.wait(), pause)
        self.usage.failed += 1
        self.on_progress()
        answer = self._base(r)
        answer.error, answer.attempts = error, attempt
        return answer

    def stop(self, reason: str = "interrupted") -> None:
        """Start no new request (a signal handler calls this); those in flight finish and are cached."""
        self.stopped = self.stopped or reason
        if self._stopping.is_set():
            return
        self._stopping.set()
        # Requests waiting for a slot, a rate window or a backoff give up now rather than after it.
        for window in self._windows.values():
            window.stop()
        with contextlib.suppress(RuntimeError):  # no event loop running: nothing is waiting
            loop = asyncio.get_running_loop()
            for limit in self._limits.values():
                task = loop.create_task(limit.close())
                self._wakers.add(task)
                task.add_done_callback(self._wakers.discard)

    def request_body(self, t: TeacherConfig, r: Request) -> dict[str, Any]:
        """The chat completion request sent for ``r`` (online, or as a line of a batch file)."""
        s = r.sampling
        kwargs: dict[str, Any] = {"model": self.model_of(t), "messages": r.messages, "max_tokens": s["max_tokens"],
                                  "temperature": s["temperature"], "top_p": s["top_p"]}  # fmt: skip
        if s.get("seed") is not None:
            kwargs["seed"] = s["seed"] + r.sample_index  # sample k of a prompt: its own seed
        return kwargs

    async def _send(self, t: TeacherConfig, r: Request) -> Any:
        kwargs = self.request_body(t, r)
        # client.post with a plain body, not chat.completions.create: the latter re-validates the
        # parameters through typed dicts, about 1 ms of CPU per request (benchmarks/synth).
        from openai.types.chat import ChatCompletion

        return await self._clients[r.teacher].post("/chat/completions", body=kwargs, cast_to=ChatCompletion)

    def _read(self, t: TeacherConfig, r: Request, response: Any, attempt: int) -> Answer:
        if not getattr(response, "choices", None):
            raise ValueError("response without choices")
        choice = response.choices[0]
        usage = response.usage
        prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion = int(getattr(usage, "completion_tokens", 0) or 0)
        if prompt < 0 or completion < 0:
            raise ValueError(f"negative token counts in usage ({prompt}, {completion})")
        answer = self._base(r)
        answer.content = _text_content(choice.message.content)
        answer.finish_reason = _optional_text(choice.finish_reason, "finish_reason")
        answer.prompt_tokens, answer.completion_tokens = prompt, completion
        answer.cost = (prompt * t.price_input + completion * t.price_output) / 1e6 * t.price_factor
        answer.served_model = _optional_text(getattr(response, "model", None), "model")
        answer.system_fingerprint = _optional_text(
            getattr(response, "system_fingerprint", None), "system_fingerprint"
        )
        answer.attempts = attempt
        return answer

    def _classify(self, error: Exception, t: TeacherConfig, attempt: int) -> tuple[str, float, str]:
        """(``rate_limited``, ``retry`` or ``fatal``; seconds to wait first; the error as one line)."""
        import openai

        backoff = self._rng.uniform(0, min(60.0, t.backoff * 2 ** (attempt - 1)))  # full jitter
        if isinstance(error, openai.RateLimitError):
            self.usage.rate_limited += 1
            wait = _retry_after(error)
            return (
                "rate_limited",
                backoff if wait is None else wait + self._rng.uniform(0, 0.1),
                "HTTP 429 (rate limited)",
            )
        if isinstance(error, openai.APITimeoutError) and not isinstance(
            error.__cause__, ConnectionError | OSError
        ):
            cause = error.__cause__
            # The aiohttp transport reports a refused connection as a connect "timeout": say what it was.
            if (
                cause is not None
                and "connect" in type(cause).__name__.lower()
                and "timed out" not in str(cause)
            ):
                return "retry", backoff, f"connection failed: {str(cause)[:200]}"
            return "retry", backoff, f"timed out after {t.timeout:g} s"
        if isinstance(error, openai.APIConnectionError):
            return "retry", backoff, f"connection failed: {error}"
        if isinstance(error, openai.APIStatusError):
            status = error.status_code
            kind = "retry" if status >= 500 or status in (408, 409) else "fatal"
            return kind, backoff, f"HTTP {status}: {str(error.message)[:300]}"
        if isinstance(
            error,
            (openai.APIResponseValidationError, json.JSONDecodeError, ValueError, AttributeError, TypeError),
        ):
            return "retry", backoff, f"malformed response: {str(error)[:200]}"
        raise error  # a bug here, not the endpoint's failure

    # ------------------------------------------------------------------ budget

    def _reserve(self, t: TeacherConfig, prompt: int, max_tokens: int) -> tuple[float, int]:
        cost = (prompt * t.price_input + max_tokens * t.price_output) / 1e6 * t.price_factor
        tokens = prompt + max_tokens
        u, b = self.usage, self.budget
        over_cost = b.max_cost is not None and u.cost + u.reserved_cost + cost > b.max_cost
        over_tokens = (
            b.max_tokens is not None
            and u.prompt_tokens + u.completion_tokens + u.reserved_tokens + tokens > b.max_tokens
        )
        if over_cost or over_tokens:
            self.stop("budget")
        if self.stopped:
            raise RunStopped(self.stopped)
        u.reserved_cost += cost
        u.reserved_tokens += tokens
        return cost, tokens

    def _unreserve(self, reserved: tuple[float, int]) -> None:
        self.usage.reserved_cost -= reserved[0]
        self.usage.reserved_tokens -= reserved[1]

    def _spend(self, answer: Answer) -> None:
        u = self.usage
        u.answered += 1
        u.prompt_tokens += answer.prompt_tokens
        u.completion_tokens += answer.completion_tokens
        u.cost += answer.cost

    @staticmethod
    def _cacheable(answer: Answer) -> dict[str, Any]:
        data = asdict(answer)
        for transient in ("cache_hit", "key", "teacher", "endpoint"):
            data.pop(transient)
        return data
