"""The HTTP pieces of ``distillery serve`` that its generation endpoints (``synth/serve.py``) and its
Batch API (``synth/serve_batch.py``) share: a response, a refused request, the error body in
OpenAI's shape, the request log and the key it logs a body under.

A leaf module (standard library only), so that the two servers' modules import it and not each other.
An error body, as OpenAI writes it::

    {"error": {"message": "'messages' must be a non-empty list of messages",
               "type": "invalid_request_error", "param": null, "code": null}}
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GENERATION_PATHS = {"/v1/chat/completions": "chat", "/v1/completions": "text"}
"""The generation endpoints, and the kind of request each takes."""


class BadRequest(Exception):
    """A request refused with ``status`` (400 unless said) and an OpenAI error ``code``."""

    def __init__(self, message: str, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


class RequestLog:
    """One JSON line per HTTP request, flushed as it happens (thread-safe)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, path: str, key: str, outcome: str) -> None:
        line = json.dumps({"time": time.time(), "path": path, "key": key, "outcome": outcome})
        with self._lock:
            if not self._file.closed:
                self._file.write(line + "\n")
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


def request_key(raw: bytes) -> str:
    """sha256 of the canonical JSON body (of the raw bytes when the body is not JSON)."""
    with contextlib.suppress(ValueError):  # UnicodeDecodeError is one too
        raw = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()


def error_body(message: str, type_: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


@dataclass
class Response:
    status: int
    body: bytes
    outcome: str
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"

    @classmethod
    def json(cls, status: int, payload: Any, outcome: str, **headers: str) -> Response:
        return cls(status, json.dumps(payload).encode(), outcome, headers)

    @classmethod
    def error(cls, status: int, message: str, code: str | None = None) -> Response:
        type_ = "invalid_request_error" if status < 500 else "server_error"
        return cls.json(status, error_body(message, type_, code), "error")
