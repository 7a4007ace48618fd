"""The Batch API path of the teacher engine: one file of requests, half the price, answers within 24 h.

A teacher with ``batch: true`` gets its cache misses answered through the endpoint's Batch API
instead of one request at a time. ``BatchClient`` collects the requests the rows in flight ask for
(until none arrived for a moment, or ``batch_max_requests`` are waiting), writes them as a JSONL
file (``custom_id`` is the request key), uploads it (``/v1/files``, purpose ``batch``), creates the
batch (``/v1/batches``), polls it every ``batch_poll_s`` and reads its output and error files.

Nothing is paid twice:

- the job is recorded in the request cache's SQLite file *before* the batch is created (as
  ``pending:<file id>``) and again once it exists, in the ``batches`` table::

      batch_id      teacher  endpoint                   keys                                        status     created
      batch_6f1c…   gpt4o    https://api.openai.com/v1  {"9c41…": {"attempt": 1, "sampling": {…}}}  in_progress 1718…

  A run killed while a batch is in flight finds it there when started again and collects it
  instead of sending its requests again (a ``pending:`` job is looked up among the endpoint's
  batches by its input file);
- every answer goes into the request cache the moment its line is read, with the same lineage as
  an online answer (``attempts`` counts the batches a request was sent in; ``cost`` is at
  ``batch_price_factor`` of the teacher's prices);
- requests that expired, were cancelled or failed in a way worth another try (5xx, 408, 409, 429,
  an unreadable line) go into the next batch, at most ``max_attempts`` times in all; after that, or
  after another 4xx, they become failed answers carrying their error, as online failures do.

An interrupted run stops polling (the batch goes on at the endpoint, and the next run collects it);
at the budget cap no new batch is submitted, and those in flight are still collected.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, replace
from typing import Any

from manifests.console import make_console
from synth.cache import BatchJobs, RequestCache
from synth.teacher_requests import Answer, Engine, Request, RunStopped, TeacherConfig

COLLECT_S = 0.2
"""A batch is submitted once no new request arrived for this long (the rows in flight have all asked)."""
FINAL = {"completed", "failed", "expired", "cancelled"}
RETRIED_STATUS = {408, 409, 429}


@dataclass
class Job:
    """A batch this run waits for: its id (``pending:<file id>`` until the endpoint named it) and requests."""

    id: str
    teacher: str
    entries: dict[str, dict[str, Any]]
    """By request key: the attempt this batch is, and the sampling as sent (for the cached answer)."""
    created: float
    status: str = ""


@dataclass
class Failure:
    error: str
    retry: bool


class BatchClient:
    """The transport of the batch teachers: one per engine, shared by them (a request key is collected
    once whichever teacher asks). It uses only the engine's public accounting (``synth.teacher_requests.Engine``)."""

    def __init__(self, engine: Engine, clients: dict[str, Any], cache: RequestCache):
        self.engine = engine
        self._clients = clients
        """Per batch teacher: its ``openai`` client (this transport closes them)."""
        self.jobs = BatchJobs(cache)
        self.console = make_console()
        self._waiters: dict[str, list[tuple[Request, asyncio.Future[Answer]]]] = {}
        self._attempts: dict[str, int] = {}
        """Batches each request was sent in so far (this run and the jobs it took over)."""
        self._queue: dict[str, dict[str, Request]] = {}
        """Per teacher: requests waiting for the next batch, in arrival order."""
        self._last_arrival: dict[str, float] = {}
        self._job_of: dict[str, Job] = {}
        """The job each request waits in (this run's, or an earlier run's taken over)."""
        self._earlier: dict[str, Job] | None = None
        """Jobs of earlier runs not yet collected, by request key (read at the first request)."""
        self._tasks: set[asyncio.Task] = set()
        self._flushing: set[str] = set()

    def stop(self) -> None:
        """Nothing to wake: polls look at ``engine.stopped``, and no batch is submitted past ``reserve``."""

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        for client in self._clients.values():
            await client.close()

    # ------------------------------------------------------------------ requests in, answers out

    async def answer(self, r: Request) -> Answer:
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        waiting = self._waiters.setdefault(r.key, [])
        waiting.append((r, future))
        if len(waiting) == 1 and r.key not in self._job_of:  # the first to ask: its request goes out
            earlier = self._earlier_jobs().get(r.key)
            if earlier is not None:
                self._take_over(earlier, r.teacher)
            else:
                self._enqueue(r)
        return await future

    def _earlier_jobs(self) -> dict[str, Job]:
        if self._earlier is None:
            endpoints = {self.engine.endpoints[label] for label, t in self.engine.teachers.items() if t.batch}
            self._earlier = {}
            for batch_id, _endpoint, entries, created in self.jobs.open_jobs(endpoints):
                job = Job(batch_id, "", entries, created)
                self._earlier.update(dict.fromkeys(entries, job))
        return self._earlier

    def _take_over(self, job: Job, teacher: str) -> None:
        """Collect an earlier run's batch (with this run's teacher of the same endpoint and model)."""
        job.teacher = teacher
        for key, entry in job.entries.items():
            self._job_of[key] = job
            self._attempts[key] = max(self._attempts.get(key, 0), entry["attempt"])
            self._earlier.pop(key, None)
        self.console.print(f"batch {job.id} ({teacher}, {len(job.entries)} requests): submitted by an earlier "
                           f"run, collecting it")  # fmt: skip
        self._spawn(self._follow(job))

    def _enqueue(self, r: Request) -> None:
        self._queue.setdefault(r.teacher, {})[r.key] = r
        self._last_arrival[r.teacher] = time.monotonic()
        if r.teacher not in self._flushing:
            self._flushing.add(r.teacher)
            self._spawn(self._flush(r.teacher))

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(self._guarded(coroutine))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guarded(self, coroutine) -> None:
        try:
            await coroutine
        except Exception as e:  # a bug: every waiting request gets it (a traceback), none waits forever
            for key in list(self._waiters):
                self._stop(key, e)

    def _resolve(self, key: str, answer: Answer) -> None:
        for r, future in self._waiters.pop(key, []):
            if not future.done():
                future.set_result(
                    replace(answer, teacher=r.teacher, endpoint=self.engine.endpoints[r.teacher])
                )
        self._job_of.pop(key, None)
        self.engine.on_progress()

    def _stop(self, key: str, error: Exception) -> None:
        for _, future in self._waiters.pop(key, []):
            if not future.done():
                future.set_exception(error)
        self._job_of.pop(key, None)

    def _fail(self, key: str, failure: Failure) -> None:
        """Another batch for the request, or (no attempt left, or not worth one) a failed answer."""
        waiting = self._waiters.get(key)
        self._job_of.pop(key, None)
        if not waiting:
            return  # an earlier run's request that this run does not ask for
        r = waiting[0][0]
        attempts = self._attempts.get(key, 0)
        if failure.retry and attempts < self.engine.teachers[r.teacher].max_attempts:
            self.engine.usage.retries += 1
            self._enqueue(r)
            return
        self._resolve(key, self.engine.failed_answer(r, failure.error, attempts))

    # ------------------------------------------------------------------ submitting

    async def _flush(self, teacher: str) -> None:
        t = self.engine.teachers[teacher]
        queue = self._queue[teacher]
        try:
            while queue:
                quiet = COLLECT_S - (time.monotonic() - self._last_arrival[teacher])
                if len(queue) < t.batch_max_requests and quiet > 0:
                    await asyncio.sleep(quiet)
                    continue
                keys = list(queue)[: t.batch_max_requests]
                requests = [queue.pop(k) for k in keys]
                self._spawn(self._submit(t, requests))
        finally:
            self._flushing.discard(teacher)

    async def _submit(self, t: TeacherConfig, requests: list[Request]) -> None:
        engine, reserved = self.engine, []
        sendable = []
        for r in requests:
            try:
                reserved.append(engine.reserve(r))
            except RunStopped as e:
                self._stop(r.key, e)
                continue
            sendable.append(r)
        if not sendable:
            return
        entries = {}
        for r in sendable:
            self._attempts[r.key] = self._attempts.get(r.key, 0) + 1
            entries[r.key] = {"attempt": self._attempts[r.key], "sampling": engine.new_answer(r).sampling}
        try:  # the reservations hold until the answers are spent: no other batch passes the budget meanwhile
            try:
                job = await self._create(t, sendable, entries)
            except Exception as e:  # the endpoint refused the file or the batch, after the client's retries
                error = _api_error(e)
                for r in sendable:
                    self._fail(r.key, Failure(f"batch not created: {error}", retry=True))
                return
            engine.usage.sent += len(sendable)
            await self._follow(job)
        finally:
            for cost_tokens in reserved:
                engine.release(cost_tokens)

    async def _create(self, t: TeacherConfig, requests: list[Request], entries: dict[str, Any]) -> Job:
        endpoint = self.engine.endpoints[t.label]
        lines = [
            {"custom_id": r.key, "method": "POST", "url": "/v1/chat/completions",
             "body": self.engine.request_body(t, r)}
            for r in requests
        ]  # fmt: skip
        data = "".join(json.dumps(line) + "\n" for line in lines).encode()
        client = self._control(t.label)
        uploaded = await client.files.create(file=(f"distillery-{len(lines)}.jsonl", data), purpose="batch")
        # Recorded before the batch exists: a run killed between the two calls finds it by its file.
        job = Job(f"pending:{uploaded.id}", t.label, entries, time.time())
        self.jobs.add(job.id, t.label, endpoint, entries, "submitting")
        for key in entries:
            self._job_of[key] = job
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
            metadata={"distillery": "synth", "teacher": t.label[:500]},
        )  # fmt: skip
        self.jobs.rename(job.id, batch.id, batch.status)
        job.id = batch.id
        self._show(job, batch)
        return job

    def _control(self, teacher: str):
        """The teacher's client, retrying on its own: a status poll or an upload is cheap to repeat."""
        t = self.engine.teachers[teacher]
        return self._clients[teacher].with_options(max_retries=t.max_attempts - 1)

    # ------------------------------------------------------------------ polling and collecting

    async def _follow(self, job: Job) -> None:
        """Poll the job until it is final, then read its answers (or stop at an interruption)."""
        import openai

        t, client = self.engine.teachers[job.teacher], self._control(job.teacher)
        try:
            if job.id.startswith("pending:") and not await self._find(job, client):
                return self._lost(job, "the batch was never created")
            while True:
                if self.engine.stopped == "interrupted":
                    raise RunStopped("interrupted")
                batch = await client.batches.retrieve(job.id)
                if batch.status != job.status:
                    self.jobs.set_status(job.id, batch.status)
                    self._show(job, batch)
                if batch.status in FINAL:
                    break
                await self._sleep(t.batch_poll_s)
            await self._collect(job, batch, client)
        except RunStopped as e:
            for key in job.entries:
                if self._job_of.get(key) is job:
                    self._stop(key, e)
        except openai.NotFoundError:
            self._lost(job, "the endpoint no longer knows it")
        except Exception as e:  # polling failed after the client's retries: the batch may still finish
            error = _api_error(e)
            self.console.print(f"[yellow]batch {job.id}: {error}; a later run collects it")
            for key in job.entries:
                if self._job_of.get(key) is job:
                    self._fail(key, Failure(f"batch {job.id} not collected: {error}", retry=False))

    async def _sleep(self, seconds: float) -> None:
        """Sleep, waking early when the run is interrupted."""
        until = time.monotonic() + seconds
        while self.engine.stopped != "interrupted" and (left := until - time.monotonic()) > 0:
            await asyncio.sleep(min(left, 0.25))

    async def _find(self, job: Job, client) -> bool:
        """A ``pending:`` job: find the batch made from its file (a run was killed before recording it)."""
        file_id = job.id.removeprefix("pending:")
        async for batch in client.batches.list(limit=100):
            if batch.input_file_id == file_id:
                self.jobs.rename(job.id, batch.id, batch.status)
                job.id = batch.id
                return True
            if batch.created_at < job.created - 3600:
                break  # newest first: older than the job by far, so not it
        return False

    def _lost(self, job: Job, why: str) -> None:
        self.console.print(f"[yellow]batch {job.id}: {why}; its requests go out again")
        self.jobs.set_status(job.id, "lost")
        for key in job.entries:
            if self._job_of.get(key) is job:
                self._fail(key, Failure(f"batch {job.id} lost: {why}", retry=True))

    async def _collect(self, job: Job, batch, client) -> None:
        results: dict[str, dict[str, Any]] = {}
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                content = await client.files.content(file_id)
                for line in content.content.decode("utf-8", "replace").splitlines():
                    with contextlib.suppress(ValueError):  # an unreadable line: its request has no result
                        record = json.loads(line)
                        if isinstance(record, dict) and isinstance(record.get("custom_id"), str):
                            results[record["custom_id"]] = record
        failures: dict[str, Failure] = {}
        why = _batch_error(batch)
        for key, entry in job.entries.items():
            record = results.get(key)
            outcome = self._read(job, key, entry, record) if record else Failure(why, retry=True)
            if isinstance(outcome, Failure):
                failures[key] = outcome
        self.jobs.set_status(job.id, "collected")  # every answer is cached: the job is done
        for key, failure in failures.items():
            if self._job_of.get(key) is job:
                self._fail(key, failure)

    def _read(self, job: Job, key: str, entry: dict[str, Any], record: dict[str, Any]) -> Answer | Failure:
        """One line of the output or error file: an answer, cached at once, or why there is none."""
        from openai.types.chat import ChatCompletion

        if error := record.get("error"):  # expired, cancelled: never run
            if isinstance(error, dict):
                error = f"{error.get('code')}: {error.get('message')}"
            return Failure(str(error)[:300], retry=True)
        response = record.get("response")
        response = response if isinstance(response, dict) else {}
        status, body = response.get("status_code"), response.get("body")
        if status != 200:
            message = body.get("error") if isinstance(body, dict) else body
            message = message.get("message") if isinstance(message, dict) else message
            retry = not isinstance(status, int) or status >= 500 or status in RETRIED_STATUS
            return Failure(f"HTTP {status}: {str(message)[:300]}", retry)
        t = self.engine.teachers[job.teacher]
        # The request as this batch sent it (sampling as sent): the same whether or not this run asked.
        sent = Request(job.teacher, [], entry["sampling"], 0, key)
        try:
            answer = self.engine.answer_from(t, sent, ChatCompletion.model_validate(body), entry["attempt"])
        except (ValueError, AttributeError, TypeError) as e:
            return Failure(f"malformed response: {str(e)[:200]}", retry=True)
        self.engine.record(answer)
        if self._job_of.get(key) is job:
            self._resolve(key, answer)
        return answer

    def _show(self, job: Job, batch) -> None:
        job.status = batch.status
        counts = batch.request_counts
        done = f" {counts.completed + counts.failed}/{counts.total}" if counts and counts.total else ""
        self.console.print(
            f"batch {job.id} ({job.teacher}, {len(job.entries)} requests): {batch.status}{done}"
        )
        self.engine.on_progress()


def _batch_error(batch) -> str:
    errors = getattr(getattr(batch, "errors", None), "data", None)
    if batch.status == "failed" and errors:
        first = errors[0]
        return f"batch {batch.id} failed: {first.code}: {first.message}"
    return f"batch {batch.id} {batch.status} without a result for the request"


def _api_error(error: Exception) -> str:
    import openai

    if isinstance(error, openai.APIStatusError):
        return f"HTTP {error.status_code}: {str(error.message)[:300]}"
    if isinstance(error, openai.APIConnectionError):
        return f"connection failed: {str(error.__cause__ or error)[:200]}"
    if isinstance(error, openai.APIError):  # e.g. a response that is not the object asked for
        return f"malformed response: {str(error)[:200]}"
    raise error  # a bug here, not the endpoint's failure
