"""What the teacher engine, its transports and the synth tasks share: who is asked, what, and what came back.

A leaf module (it imports no other module of ``synth``): the engine (``synth/engine.py``), the Batch
API transport (``synth/batch.py``) and every task read these types from here. ``Engine`` is the part of
the engine a transport may use -- the budget, the answer's lineage, the cache -- so that no transport
reaches into the engine's private members.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import Field, model_validator

from manifests.recipes import RecipeConfig

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
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    """Ask for the log-prob of every answer token and its ``k`` likeliest alternatives (OpenAI's
    ``logprobs: true, top_logprobs: k``; 20 at most); ``synth generate`` keeps them in a ``logprobs``
    column (null where the endpoint returns none). Unset: not asked for."""

    def resolved(self) -> dict[str, Any]:
        data = super().resolved()
        if data["top_logprobs"] is None:  # not asked: the request keys of earlier runs stay the same
            del data["top_logprobs"]
        return data


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
    logprobs: list[dict[str, Any]] | None = None
    """With ``sampling.top_logprobs``: per answer token ``{"token", "logprob", "top": [{"token", "logprob"}]}``,
    as the endpoint returned them (None where it returned none)."""

    @property
    def ok(self) -> bool:
        return self.error is None


class RunStopped(Exception):
    """No new request starts: the budget is reached or the run was interrupted (SIGINT/SIGTERM).
    Requests in flight finish and are cached first."""


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


def estimate_prompt_tokens(messages: list[dict[str, str]]) -> int:
    """About four characters a token (the common rule of thumb) plus a few per message."""
    return sum(len(m.get("content") or "") // 4 + 4 for m in messages)


class Engine(Protocol):
    """The engine as a transport sees it: its teachers, the run's usage and stop, and its accounting."""

    teachers: dict[str, TeacherConfig]
    endpoints: dict[str, str]
    """Per teacher label: the endpoint identity that request keys and lineage name."""
    usage: Usage
    stopped: str | None

    def on_progress(self) -> None: ...

    def reserve(self, r: Request) -> tuple[float, int]:
        """Hold the most ``r`` may cost against the budget (``RunStopped`` at the cap or after a stop)."""
        ...

    def release(self, reserved: tuple[float, int]) -> None: ...

    def request_body(self, t: TeacherConfig, r: Request) -> dict[str, Any]: ...

    def new_answer(self, r: Request) -> Answer: ...

    def answer_from(self, t: TeacherConfig, r: Request, response: Any, attempt: int) -> Answer: ...

    def record(self, answer: Answer) -> None:
        """Count a paid answer and cache it at once."""
        ...

    def failed_answer(self, r: Request, error: str, attempts: int) -> Answer: ...


class Transport(Protocol):
    """How one teacher's cache misses reach it: one request at a time, or in Batch API files."""

    async def answer(self, r: Request) -> Answer: ...

    def stop(self) -> None:
        """Start nothing new (the run is stopping); requests in flight finish."""
        ...

    async def close(self) -> None: ...
