"""The Batch API of ``distillery serve``: OpenAI's Files and Batches endpoints, in memory.

    POST /v1/files                  multipart: file=<JSONL>, purpose=batch   -> file object
    GET  /v1/files/{id}             GET /v1/files/{id}/content
    POST /v1/batches                {input_file_id, endpoint, completion_window: 24h} -> batch object
    GET  /v1/batches                GET /v1/batches/{id}          POST /v1/batches/{id}/cancel

A batch is validated (every line an object with a unique ``custom_id``, ``method: POST`` and the
batch's ``url``; else the batch ends ``failed`` with ``errors``), then its lines go through the same
batched generation as online requests, from a background thread. An output file line::

    {"id": "batch_req_…", "custom_id": "9c41…", "response": {"status_code": 200, "request_id": "req_…",
     "body": {"object": "chat.completion", "choices": […], "usage": {…}, …}}, "error": null}

Lines that fail (a bad body: 4xx; ``--batch-fail``: 500) keep that shape with the error body and go
to the error file; lines left undone when a batch expires (``--batch-expire``) or is cancelled go
there as ``{"response": null, "error": {"code": "batch_expired", …}}``, as OpenAI writes them. Each
line is logged to the request log under ``/v1/batches/<id>`` with the key of its body and the
outcome ``batch-answered``, ``batch-<status>`` or ``batch-expired``/``batch-cancelled``.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qs

from pydantic import BaseModel, ConfigDict, Field, model_validator

from synth.serve_http import GENERATION_PATHS, BadRequest, RequestLog, Response, error_body, request_key

WINDOW_S = 24 * 3600
"""``completion_window: 24h``, the only window OpenAI offers."""
EXPIRED = "This request could not be executed before the completion window expired."
CANCELLED = "This request was not executed because the batch was cancelled."
FINAL = {"completed", "failed", "expired", "cancelled"}


class BatchOptions(BaseModel):
    """Faults of the Batch API (/v1/files, /v1/batches)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    batch_expire: float = Field(default=0.0, ge=0, le=1)
    """Share of a batch's lines left undone: the batch ends 'expired' with them in its error file."""
    batch_fail: float = Field(default=0.0, ge=0, le=1)
    """Share of a batch's lines that fail with a 500 body (in the error file)."""
    batch_delay_s: float = Field(default=0.0, ge=0)
    """Seconds a batch stays in progress before it completes (so clients must poll)."""

    @model_validator(mode="after")
    def _shares(self) -> BatchOptions:
        if self.batch_expire + self.batch_fail > 1 + 1e-9:
            raise ValueError("the batch fault rates add up to more than 1")
        return self


@dataclass
class StoredFile:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int = field(default_factory=lambda: int(time.time()))

    def card(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": len(self.data), "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "expires_at": None, "status_details": None}  # fmt: skip


@dataclass
class Batch:
    """One batch and its state; ``card()`` is OpenAI's batch object."""

    id: str
    input_file_id: str
    endpoint: str
    metadata: dict[str, str] | None
    model: str
    created_at: int = field(default_factory=lambda: int(time.time()))
    status: str = "validating"
    times: dict[str, int] = field(default_factory=dict)
    """``in_progress_at``, ``finalizing_at``, ``completed_at``, … as they happen."""
    counts: dict[str, int] = field(default_factory=lambda: {"total": 0, "completed": 0, "failed": 0})
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def card(self) -> dict[str, Any]:
        times = {k: self.times.get(k) for k in ("in_progress_at", "finalizing_at", "completed_at", "failed_at",
                                                "expired_at", "cancelling_at", "cancelled_at")}  # fmt: skip
        errors = {"object": "list", "data": self.errors} if self.errors else None
        return {"id": self.id, "object": "batch", "endpoint": self.endpoint, "errors": errors,
                "input_file_id": self.input_file_id, "completion_window": "24h", "status": self.status,
                "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
                "created_at": self.created_at, "expires_at": self.created_at + WINDOW_S, **times,
                "request_counts": dict(self.counts), "metadata": self.metadata, "model": self.model}  # fmt: skip

    def move(self, status: str) -> None:
        self.status = status
        self.times[f"{status}_at"] = int(time.time())


def parse_multipart(raw: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """``{field name: (file name or None, bytes)}`` of a multipart/form-data body."""
    found = re.search(r'boundary="?([^";]+)"?', content_type)
    if "multipart/form-data" not in content_type.lower() or not found:
        raise BadRequest("upload the file as multipart/form-data (fields 'file' and 'purpose')")
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in raw.split(b"--" + found.group(1).encode())[1:]:
        if part.startswith(b"--"):
            break
        head, sep, body = part.partition(b"\r\n\r\n")
        disposition = next((line for line in head.decode("utf-8", "replace").split("\r\n")
                            if line.lower().startswith("content-disposition:")), "")  # fmt: skip
        name = re.search(r'\bname="([^"]*)"', disposition)
        if sep and name:
            filename = re.search(r'\bfilename="([^"]*)"', disposition)
            fields[name.group(1)] = (filename.group(1) if filename else None, body.removesuffix(b"\r\n"))
    return fields


class GenerationServer(Protocol):
    """What the Batch API uses of its server (``synth.serve.Server``): the model it serves, request
    validation, the batched generation and the completion object of an answer."""

    model: str
    batcher: Any
    """``synth.serve.Batcher``: ``submit(request)`` and ``options.max_batch``."""

    def validate(self, kind: str, body: Any) -> Any: ...

    def completion(self, kind: str, request: Any, answers: list[Any]) -> dict[str, Any]: ...


class BatchService:
    """Files and batches of one server; each batch runs in its own background thread."""

    def __init__(self, server: GenerationServer, options: BatchOptions, seed: int, log: RequestLog | None):
        self.server, self.options, self.log = server, options, log
        self.files: dict[str, StoredFile] = {}
        self.batches: dict[str, Batch] = {}
        """By id, in creation order (what a test inspects)."""
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []

    def close(self) -> None:
        self._closing.set()
        for thread in self._threads:
            thread.join(timeout=10)

    # ------------------------------------------------------------------ HTTP

    def respond(self, method: str, path: str, raw: bytes, content_type: str, query: str) -> Response:
        parts = path.split("/")[2:]  # ["files", id, "content"] or ["batches", id, "cancel"]
        try:
            if parts == ["files"] and method == "POST":
                return self._upload(raw, content_type)
            if parts[0] == "files" and len(parts) in (2, 3) and method == "GET":
                stored = self._file(parts[1])
                if len(parts) == 2:
                    return Response.json(200, stored.card(), "ok")
                if parts[2] == "content":
                    return Response(200, stored.data, "ok", content_type="application/octet-stream")
            if parts == ["batches"] and method == "POST":
                return self._create(raw)
            if parts == ["batches"] and method == "GET":
                return self._list(parse_qs(query))
            if parts[0] == "batches" and len(parts) == 2 and method == "GET":
                return Response.json(200, self._batch(parts[1]).card(), "ok")
            if parts[0] == "batches" and parts[2:] == ["cancel"] and method == "POST":
                return self._cancel(self._batch(parts[1]))
        except BadRequest as e:
            return Response.error(e.status, str(e), e.code)
        return Response.error(404, f"{method} {path} is not served", "not_found")

    def _file(self, file_id: str) -> StoredFile:
        if file_id not in self.files:
            raise BadRequest(f"No such File object: {file_id}", 404, "not_found")
        return self.files[file_id]

    def _batch(self, batch_id: str) -> Batch:
        if batch_id not in self.batches:
            raise BadRequest(f"No such Batch object: {batch_id}", 404, "not_found")
        return self.batches[batch_id]

    def _upload(self, raw: bytes, content_type: str) -> Response:
        fields = parse_multipart(raw, content_type)
        if "file" not in fields:
            raise BadRequest("missing the 'file' field")
        purpose = fields.get("purpose", (None, b""))[1].decode("utf-8", "replace")
        if purpose != "batch":
            raise BadRequest(f"purpose {purpose!r} is not served here; upload with purpose 'batch'")
        stored = self._store(fields["file"][0] or "upload.jsonl", "batch", fields["file"][1])
        return Response.json(200, stored.card(), "ok")

    def _store(self, filename: str, purpose: str, data: bytes) -> StoredFile:
        stored = StoredFile(f"file-{uuid.uuid4().hex[:24]}", filename, purpose, data)
        with self._lock:
            self.files[stored.id] = stored
        return stored

    def _create(self, raw: bytes) -> Response:
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        self._file(str(body.get("input_file_id")))
        if body.get("endpoint") not in GENERATION_PATHS:
            raise BadRequest(f"'endpoint' must be one of {sorted(GENERATION_PATHS)}")
        if body.get("completion_window") != "24h":
            raise BadRequest("'completion_window' must be '24h'")
        batch = Batch(f"batch_{uuid.uuid4().hex[:24]}", body["input_file_id"], body["endpoint"],
                      body.get("metadata"), self.server.model)  # fmt: skip
        with self._lock:
            self.batches[batch.id] = batch
        thread = threading.Thread(target=self._run, args=(batch,), name=f"distillery-{batch.id}", daemon=True)
        self._threads.append(thread)
        thread.start()
        return Response.json(200, batch.card(), "ok")

    def _list(self, query: dict[str, list[str]]) -> Response:
        """Newest first, ``limit`` at a time, after the id ``after`` (OpenAI's cursor pagination)."""
        newest = list(reversed(self.batches.values()))
        after = query.get("after", [None])[0]
        if after is not None:
            ids = [b.id for b in newest]
            newest = newest[ids.index(after) + 1 :] if after in ids else []
        try:
            limit = max(1, min(100, int(query.get("limit", ["20"])[0])))
        except ValueError:
            raise BadRequest("'limit' must be an integer") from None
        page = [b.card() for b in newest[:limit]]
        return Response.json(200, {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                                   "last_id": page[-1]["id"] if page else None,
                                   "has_more": len(newest) > limit}, "ok")  # fmt: skip

    def _cancel(self, batch: Batch) -> Response:
        with self._lock:
            if batch.status not in FINAL:
                batch.cancel.set()
                batch.move("cancelling")
        return Response.json(200, batch.card(), "ok")

    # ------------------------------------------------------------------ processing

    def _run(self, batch: Batch) -> None:
        lines, errors = self._validate(batch)
        if errors:
            batch.errors = errors
            batch.move("failed")
            return
        batch.counts["total"] = len(lines)
        with self._lock:  # a cancel may have come meanwhile
            if not batch.cancel.is_set():
                batch.move("in_progress")
        started = time.monotonic()
        with self._lock:  # one draw per line, in file order: the same seed and file give the same faults
            draws = [self._draw() for _ in lines]
        workers = max(1, 2 * self.server.batcher.options.max_batch)  # enough to fill a generation step
        with ThreadPoolExecutor(workers, thread_name_prefix=f"distillery-{batch.id}") as pool:
            results = list(pool.map(self._line, [batch] * len(lines), lines, draws))
        # The delay is the batch's turnaround; a cancel or the server closing cuts it short.
        while not (batch.cancel.is_set() or self._closing.is_set()):
            left = self.options.batch_delay_s - (time.monotonic() - started)
            if left <= 0:
                break
            batch.cancel.wait(min(left, 0.05))
        if self._closing.is_set():
            return
        outputs = [record for record, outcome in results if outcome == "batch-answered"]
        failures = [record for record, outcome in results if outcome != "batch-answered"]
        with self._lock:
            cancelled = batch.cancel.is_set()
            if not cancelled:
                batch.move("finalizing")
        output = self._jsonl(f"{batch.id}_output.jsonl", outputs) if outputs else None
        error = self._jsonl(f"{batch.id}_error.jsonl", failures) if failures else None
        with self._lock:
            batch.output_file_id, batch.error_file_id = output and output.id, error and error.id
            batch.counts.update(completed=len(outputs), failed=len(failures))
            if cancelled:
                batch.move("cancelled")
            elif any(outcome == "batch-expired" for _, outcome in results):
                batch.move("expired")
            else:
                batch.move("completed")

    def _draw(self) -> str | None:
        u = self._rng.random()
        if u < self.options.batch_expire:
            return "expire"
        return "fail" if u < self.options.batch_expire + self.options.batch_fail else None

    def _validate(self, batch: Batch) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The lines of the input file, or the errors that fail the whole batch (as OpenAI's validation does)."""
        lines, errors, seen = [], [], set()

        def error(code: str, message: str, number: int, param: str | None = None) -> None:
            errors.append({"code": code, "message": message, "param": param, "line": number})

        text = self.files[batch.input_file_id].data.decode("utf-8", "replace")
        for number, raw in enumerate(text.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                error("invalid_json_line", "This line is not parseable as valid JSON.", number)
                continue
            if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
                error(
                    "missing_required_parameter",
                    "Missing required parameter: 'custom_id'.",
                    number,
                    "custom_id",
                )
            elif line["custom_id"] in seen:
                error("duplicate_custom_id", "The custom_id for this request is a duplicate of another request.",
                      number, "custom_id")  # fmt: skip
            elif line.get("method") != "POST":
                error("invalid_method", "The method must be 'POST'.", number, "method")
            elif line.get("url") != batch.endpoint:
                error("mismatched_endpoint", f"The url must be the batch's endpoint, {batch.endpoint}.", number,
                      "url")  # fmt: skip
            elif not isinstance(line.get("body"), dict):
                error("missing_required_parameter", "Missing required parameter: 'body'.", number, "body")
            else:
                seen.add(line["custom_id"])
                lines.append(line)
        if not lines and not errors:
            error("empty_file", "The input file has no requests.", 0)
        return lines, errors

    def _line(self, batch: Batch, line: dict[str, Any], fault: str | None) -> tuple[dict[str, Any], str]:
        """(the line's output or error record, its outcome in the request log)."""
        record: dict[str, Any] = {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": line["custom_id"],
                                  "response": None, "error": None}  # fmt: skip
        if batch.cancel.is_set() or self._closing.is_set() or fault == "expire":
            code, message = (
                ("batch_expired", EXPIRED) if fault == "expire" else ("batch_cancelled", CANCELLED)
            )
            outcome = "batch-expired" if fault == "expire" else "batch-cancelled"
            record["error"] = {"code": code, "message": message}
        else:
            status, body = self._generate(batch, line["body"], fault)
            record["response"] = {
                "status_code": status,
                "request_id": f"req_{uuid.uuid4().hex}",
                "body": body,
            }
            outcome = "batch-answered" if status == 200 else f"batch-{status}"
        with self._lock:
            batch.counts["completed" if outcome == "batch-answered" else "failed"] += 1
        if self.log:
            self.log.write(f"/v1/batches/{batch.id}", request_key(json.dumps(line["body"]).encode()), outcome)
        return record, outcome

    def _generate(self, batch: Batch, body: dict[str, Any], fault: str | None) -> tuple[int, dict[str, Any]]:
        if fault == "fail":
            return 500, error_body("Injected server error", "server_error")
        kind = GENERATION_PATHS[batch.endpoint]
        try:
            request = self.server.validate(kind, body)
        except BadRequest as e:
            type_ = "invalid_request_error" if e.status < 500 else "server_error"
            return e.status, error_body(str(e), type_, e.code)
        try:
            answers = self.server.batcher.submit(request)
        except Exception as e:  # already reported by the generation thread
            return 500, error_body(f"generation failed: {e}", "server_error")
        return 200, self.server.completion(kind, request, answers)

    def _jsonl(self, filename: str, records: list[dict[str, Any]]) -> StoredFile:
        data = "".join(json.dumps(r) + "\n" for r in records).encode()
        return self._store(filename, "batch_output", data)
