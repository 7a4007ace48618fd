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

The engine owns what every request shares (cache, budget, usage, stop, an answer's lineage); each
teacher has a transport that only sends: ``DirectTransport`` here, or the Batch API client, which
uses the same public accounting methods (``reserve``/``release``, ``answer_from``, ``record``).
The types the tasks and transports share live in ``synth/teacher_requests.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import time
from collections import deque
from dataclasses import asdict, replace
from typing import Any

from manifests.errors import DistilleryError
from manifests.retry_after import parse_delay, parse_retry_after
from synth.batch import BatchClient
from synth.cache import RequestCache, request_key
from synth.teacher_requests import (  # the tasks import these from here too
    Answer,
    BudgetConfig,
    Request,
    RunStopped,
    SamplingConfig,
    TeacherConfig,
    Transport,
    Usage,
    estimate_prompt_tokens,
)

__all__ = [
    "AdaptiveLimit",
    "Answer",
    "BudgetConfig",
    "DirectTransport",
    "RateWindow",
    "Request",
    "RunStopped",
    "SamplingConfig",
    "TeacherConfig",
    "TeacherEngine",
    "Usage",
    "estimate_prompt_tokens",
    "gather_all",
]


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
    """How long a 429 asked to wait: OpenAI's ``retry-after-ms`` first, else the standard header
    (``manifests/retry_after.py``: the crawler reads it the same way). Unreadable counts as absent,
    and the backoff decides: raised here, it escaped the retry loop; "inf" paused the teacher forever."""
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None) or {}
    if "retry-after-ms" in headers:
        millis = parse_delay(headers["retry-after-ms"])
        return None if millis is None else millis / 1000
    return parse_retry_after(headers.get("retry-after"))


class DirectTransport:
    """A teacher's requests one at a time to its endpoint: the adaptive limit, the rate window, retries."""

    def __init__(self, engine: TeacherEngine, teacher: TeacherConfig, client: Any, rng: random.Random):
        self.engine, self.teacher, self.client = engine, teacher, client
        self.limit = AdaptiveLimit(teacher.max_concurrency)
        self.window = RateWindow(teacher.requests_per_minute, teacher.tokens_per_minute)
        self._rng = rng
        self._stopping = asyncio.Event()
        self._wakers: set[asyncio.Task] = set()

    async def close(self) -> None:
        await self.client.close()

    def stop(self) -> None:
        # Requests waiting for a slot, a rate window or a backoff give up now rather than after it.
        self._stopping.set()
        self.window.stop()
        with contextlib.suppress(RuntimeError):  # no event loop running: nothing is waiting
            task = asyncio.get_running_loop().create_task(self.limit.close())
            self._wakers.add(task)
            task.add_done_callback(self._wakers.discard)

    async def answer(self, r: Request) -> Answer:
        engine, t = self.engine, self.teacher
        window_tokens = estimate_prompt_tokens(r.messages) + r.sampling["max_tokens"]
        answer = engine.new_answer(r)
        error, attempt = "no attempt made", 0
        while attempt < t.max_attempts:
            attempt += 1
            # The slot first, then the window: a request waiting out a 429's pause for its slot must
            # not hold a window entry stamped long before it is sent (the window would then let a
            # burst through once that entry slid out).
            if not await self.limit.acquire():
                raise RunStopped(engine.stopped)
            entry = await self.window.reserve(window_tokens)
            try:  # checked last, right before sending: a stop or the cap may have come while waiting
                reserved = engine.reserve(r)
            except RunStopped:
                self.window.settle(entry, 0)
                await self.limit.release("cancelled")
                raise
            outcome, pause = "error", 0.0
            try:
                engine.usage.sent += 1
                answer = engine.answer_from(t, r, await self.post(r), attempt)
                outcome = "ok"
            except Exception as e:  # sorted by _classify: which failures are worth another attempt
                outcome, pause, error = self._classify(e, attempt)
            finally:
                engine.release(reserved)
                used = answer.prompt_tokens + answer.completion_tokens if outcome == "ok" else 0
                self.window.settle(entry, used)
                await self.limit.release(outcome, pause)
            if outcome == "ok":
                engine.record(answer)
                engine.on_progress()
                return answer
            if outcome == "fatal":
                break
            if attempt < t.max_attempts:
                engine.usage.retries += 1
                if outcome != "rate_limited":  # after a 429 the limiter itself waits for Retry-After
                    with contextlib.suppress(TimeoutError):  # a stop ends the backoff at once
                        await asyncio.wait_for(self._stopping.wait(), pause)
        answer = engine.failed_answer(r, error, attempt)
        engine.on_progress()
        return answer

    async def post(self, r: Request) -> Any:
        """One chat completion request, sent once."""
        body = self.engine.request_body(self.teacher, r)
        # client.post with a plain body, not chat.completions.create: the latter re-validates the
        # parameters through typed dicts, about 1 ms of CPU per request (benchmarks/synth).
        from openai.types.chat import ChatCompletion

        return await self.client.post("/chat/completions", body=body, cast_to=ChatCompletion)

    def _classify(self, error: Exception, attempt: int) -> tuple[str, float, str]:
        """(``rate_limited``, ``retry`` or ``fatal``; seconds to wait first; the error as one line)."""
        import openai

        t = self.teacher
        backoff = self._rng.uniform(0, min(60.0, t.backoff * 2 ** (attempt - 1)))  # full jitter
        if isinstance(error, openai.RateLimitError):
            self.engine.usage.rate_limited += 1
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


def _token_logprobs(logprobs: Any) -> list[dict[str, Any]] | None:
    """A choice's ``logprobs.content`` as plain data (token text, log-prob, top alternatives), or None
    where the endpoint sent none; ``ValueError`` where it sent something else (a malformed response)."""
    content = getattr(logprobs, "content", None) if logprobs is not None else None
    if content is None:
        return None

    def entry(item: Any) -> dict[str, Any]:
        token, value = getattr(item, "token", None), getattr(item, "logprob", None)
        if not isinstance(token, str) or isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("logprobs.content: an entry without a text token and a numeric logprob")
        return {"token": token, "logprob": float(value)}

    return [entry(t) | {"top": [entry(a) for a in (getattr(t, "top_logprobs", None) or [])]} for t in content]


class TeacherEngine:
    """Sends requests to the configured teachers; use as ``async with TeacherEngine(...) as engine``.

    The engine owns what every request shares -- the cache, the budget, the usage, the stop, the
    lineage of an answer; each teacher's ``Transport`` (``DirectTransport``, or the Batch API's
    ``synth.batch.BatchClient``) only sends, and uses the public accounting methods below."""

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
        self.transports: dict[str, Transport] = {}
        """Per teacher label: how its cache misses are sent (batch teachers share one Batch API client)."""
        self._servers: list[Any] = []
        self._rng = random.Random(0)
        self.stopped: str | None = None
        """Why no new request may start (``budget``, ``interrupted`` or ``cache``), once that happens."""
        self._in_flight: dict[str, asyncio.Future[Answer]] = {}
        """Requests being sent, by key: one that is asked again meanwhile waits for this answer."""
        self.on_progress = lambda: None

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

        clients: dict[str, Any] = {}
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
            clients[label] = openai.AsyncOpenAI(
                base_url=base_url, api_key=key, max_retries=0, timeout=teacher.timeout,
                http_client=openai.DefaultAioHttpClient(timeout=teacher.timeout),
            )  # fmt: skip
        batched = {label: client for label, client in clients.items() if self.teachers[label].batch}
        if batched:
            batch = BatchClient(self, batched, self.cache)  # one for all: a request key is collected once
            self.transports.update(dict.fromkeys(batched, batch))
        for label, client in clients.items():
            if label not in batched:
                self.transports[label] = DirectTransport(self, self.teachers[label], client, self._rng)
        if self.stopped is not None:  # stopped before it started: nothing may start now either
            for transport in self.transports.values():
                transport.stop()
        return self

    async def __aexit__(self, *exc) -> None:
        for transport in {id(t): t for t in self.transports.values()}.values():
            await transport.close()
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

    async def _one(self, r: Request, cached: dict[str, Any] | None) -> Answer:
        if cached is not None:
            self.usage.cache_hits += 1
            self.on_progress()
            known = {k: v for k, v in cached.items() if k in Answer.__dataclass_fields__}  # older entries too
            return Answer(**(known | {"cache_hit": True, "key": r.key, "teacher": r.teacher,
                                      "endpoint": self.endpoints[r.teacher]}))  # fmt: skip
        transport = self.transports[r.teacher]
        if self.teachers[r.teacher].batch:  # cache misses of a batch teacher wait for their batch
            return await transport.answer(r)
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
            answer = await transport.answer(r)
        except BaseException as e:
            mine.set_exception(e)
            mine.exception()  # retrieved: it is raised here, whether or not a second request waits
            raise
        else:
            mine.set_result(answer)
        finally:
            del self._in_flight[r.key]
        return answer

    def stop(self, reason: str = "interrupted") -> None:
        """Start no new request (a signal handler calls this); those in flight finish and are cached."""
        if self.stopped is not None:
            return
        self.stopped = reason
        for transport in self.transports.values():
            transport.stop()

    def request_body(self, t: TeacherConfig, r: Request) -> dict[str, Any]:
        """The chat completion request sent for ``r`` (online, or as a line of a batch file)."""
        s = r.sampling
        kwargs: dict[str, Any] = {"model": self.model_of(t), "messages": r.messages, "max_tokens": s["max_tokens"],
                                  "temperature": s["temperature"], "top_p": s["top_p"]}  # fmt: skip
        if s.get("seed") is not None:
            kwargs["seed"] = s["seed"] + r.sample_index  # sample k of a prompt: its own seed
        if s.get("top_logprobs") is not None:
            kwargs |= {"logprobs": True, "top_logprobs": s["top_logprobs"]}
        return kwargs

    # ------------------------------------------------------------------ accounting, for every transport

    def new_answer(self, r: Request) -> Answer:
        """An answer to ``r`` with its lineage (teacher, endpoint, sampling as sent) and nothing else yet."""
        sent = dict(r.sampling)
        if sent.get("seed") is not None:
            sent["seed"] += r.sample_index  # as sent: sample k of a prompt uses seed + k
        return Answer(key=r.key, teacher=r.teacher, endpoint=self.endpoints[r.teacher], sampling=sent)

    def failed_answer(self, r: Request, error: str, attempts: int) -> Answer:
        """The answer of a request that kept failing (counted as failed): it carries its error."""
        self.usage.failed += 1
        answer = self.new_answer(r)
        answer.error, answer.attempts = error, attempts
        return answer

    def answer_from(self, t: TeacherConfig, r: Request, response: Any, attempt: int) -> Answer:
        """The answer in a chat completion ``response``, priced; ``ValueError`` & co. if it is malformed."""
        if not getattr(response, "choices", None):
            raise ValueError("response without choices")
        choice = response.choices[0]
        usage = response.usage
        prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion = int(getattr(usage, "completion_tokens", 0) or 0)
        if prompt < 0 or completion < 0:
            raise ValueError(f"negative token counts in usage ({prompt}, {completion})")
        answer = self.new_answer(r)
        answer.content = _text_content(choice.message.content)
        answer.finish_reason = _optional_text(choice.finish_reason, "finish_reason")
        answer.prompt_tokens, answer.completion_tokens = prompt, completion
        answer.cost = (prompt * t.price_input + completion * t.price_output) / 1e6 * t.price_factor
        answer.served_model = _optional_text(getattr(response, "model", None), "model")
        answer.system_fingerprint = _optional_text(
            getattr(response, "system_fingerprint", None), "system_fingerprint"
        )
        answer.attempts = attempt
        if r.sampling.get("top_logprobs") is not None:
            answer.logprobs = _token_logprobs(getattr(choice, "logprobs", None))
        return answer

    def reserve(self, r: Request) -> tuple[float, int]:
        """Hold the most ``r`` may cost (its prompt and ``max_tokens``) against the budget until
        ``release``, so that requests in flight together never pass the cap. ``RunStopped`` at the cap
        (the run stops there) or once the run was stopped."""
        t = self.teachers[r.teacher]
        prompt, max_tokens = estimate_prompt_tokens(r.messages), r.sampling["max_tokens"]
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

    def release(self, reserved: tuple[float, int]) -> None:
        self.usage.reserved_cost -= reserved[0]
        self.usage.reserved_tokens -= reserved[1]

    def record(self, answer: Answer) -> None:
        """Count a paid answer and cache it at once. An answer that cannot be saved would be paid for
        again by the next run, so a cache that fails stops this one (and its error is raised)."""
        u = self.usage
        u.answered += 1
        u.prompt_tokens += answer.prompt_tokens
        u.completion_tokens += answer.completion_tokens
        u.cost += answer.cost
        data = asdict(answer)
        for transient in ("cache_hit", "key", "teacher", "endpoint"):
            data.pop(transient)
        try:
            self.cache.put(answer.key, data)
        except DistilleryError:
            self.stop("cache")
            raise
