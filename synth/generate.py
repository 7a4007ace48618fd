"""``synth.generate``: teachers answer prompts made from a dataset; every row keeps its lineage.

    stage: synth.generate
    name: demo-sft
    input: demo-corpus
    teachers: [{serve: smollm2-135m-instruct}]      # or {model: gpt-4o-mini, base_url: …, api_key_env: …}
    sampling: {max_tokens: 48}
    prompt_template: "Summarise this text in one sentence.\\n\\n{text}"
    limit: 48
    splits: {train: 0.8, test: 0.2}

An output row (messages ready for SFT; ``requests`` is the lineage, see ``synth/runner.py``)::

    {"id": "…", "parents": ["c0ffee…"], "source": null, "prompt_id": "…", "teacher": "smollm2-135m-instruct",
     "sample_index": 0,
     "messages": [{"role": "user", "content": "Summarise…"}, {"role": "assistant", "content": "…"}],
     "requests": [{"key": "9c41…", "served_model": "smollm2-135m-instruct", "finish_reason": "stop", …}],
     "verdict": null}

With ``input:`` a JSONL or Parquet file, ``parents`` is empty and ``source`` names the file and line
(or row) of the record instead: ``manifests trace`` ends there.

With ``sampling: {top_logprobs: k}`` the endpoint is asked for each answer token's log-prob and its ``k``
likeliest alternatives, and the rows get a ``logprobs`` column: per answer token
``{"token": " Paris", "logprob": -0.02, "top": [{"token": " Paris", "logprob": -0.02}, …]}`` as the
endpoint sent them (texts in its own tokenizer), or null where it sent none. ``method: proxy`` fits an
open model to them.

With several teachers, ``routing: all`` asks each of them; ``routing: hash`` sends each prompt to
one teacher, chosen by a hash of the prompt (stable across runs), in proportion to ``weights``.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from manifests.hashing import canonical_json, record_id
from manifests.schema import Manifest
from manifests.store import Store
from synth.engine import Request
from synth.runner import MESSAGE, Dropped, Output, SynthConfig, SynthTask, run_synth

TOKEN_LOGPROB = pa.struct([("token", pa.string()), ("logprob", pa.float64())])
ANSWER_LOGPROBS = pa.list_(
    pa.struct([("token", pa.string()), ("logprob", pa.float64()), ("top", pa.list_(TOKEN_LOGPROB))])
)
"""The ``logprobs`` column (with ``sampling.top_logprobs``): one entry per answer token."""


class GenerateConfig(SynthConfig):
    """Teacher answers for prompts built from a text dataset."""

    prompt_template: str = "Summarise the following text in one sentence.\n\n{text}"
    """The user message; ``{text}`` is replaced by the (truncated) document."""
    system_prompt: str | None = None
    max_input_chars: int = Field(default=800, ge=1)
    """Documents are cut to this many characters (at a word boundary) before templating."""
    samples_per_prompt: int = Field(default=1, ge=1)
    """Answers per prompt and teacher (sample ``k`` is sent with ``seed + k``)."""
    routing: Literal["all", "hash"] = "all"
    """With several teachers: ask ``all`` of them, or one per prompt chosen by a ``hash`` of the prompt."""
    weights: dict[str, float] | None = None
    """With ``routing: hash``: the share of prompts each teacher (by name) gets (default: equal)."""

    @field_validator("prompt_template")
    @classmethod
    def _has_text(cls, v: str) -> str:
        if "{text}" not in v:
            raise ValueError("must contain '{text}'")
        return v

    @model_validator(mode="after")
    def _weights_name_teachers(self) -> GenerateConfig:
        if self.weights is not None:
            names = {t.label for t in self.teachers}
            if (
                set(self.weights) != names
                or any(w < 0 for w in self.weights.values())
                or not sum(self.weights.values())
            ):
                raise ValueError(f"'weights' needs a non-negative share for each teacher: {sorted(names)}")
        return self


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit]
    return cut[: cut.rfind(" ")] if " " in cut else cut


class GenerateTask(SynthTask):
    stage = "synth.generate"
    required = ["id", "text"]
    columns = [("prompt_id", pa.string()), ("teacher", pa.string()), ("sample_index", pa.int32()),
               ("messages", pa.list_(MESSAGE))]  # fmt: skip
    cfg: GenerateConfig

    @classmethod
    def output_columns(
        cls, cfg: SynthConfig, input_schema: pa.Schema | None = None
    ) -> list[tuple[str, pa.DataType]]:
        asked = cfg.sampling.top_logprobs is not None
        return cls.columns + ([("logprobs", ANSWER_LOGPROBS)] if asked else [])

    def _messages(self, text: str) -> list[dict[str, str]]:
        user = self.cfg.prompt_template.replace(
            "{text}", _truncate((text or "").strip(), self.cfg.max_input_chars)
        )
        system = [{"role": "system", "content": self.cfg.system_prompt}] if self.cfg.system_prompt else []
        return system + [{"role": "user", "content": user}]

    def _teachers(self, prompt_id: str) -> list[str]:
        names = [t.label for t in self.cfg.teachers]
        if self.cfg.routing == "all" or len(names) == 1:
            return names
        weights = self.cfg.weights or dict.fromkeys(names, 1.0)
        point = int(hashlib.sha256(prompt_id.encode()).hexdigest()[:12], 16) / 16**12 * sum(weights.values())
        for name in names:
            point -= weights[name]
            if point < 0:
                return [name]
        return [names[-1]]

    def first_requests(self, row: dict[str, Any]) -> list[Request]:
        if not (row["text"] or "").strip():
            return []
        messages = self._messages(row["text"])
        prompt_id = record_id("prompt", row["id"], canonical_json(messages))
        return [self.engine.request(name, messages, self.cfg.sampling, k)
                for name in self._teachers(prompt_id) for k in range(self.cfg.samples_per_prompt)]  # fmt: skip

    async def run(self, row: dict[str, Any]) -> list[Output | Dropped]:
        requests = self.first_requests(row)
        if not requests:  # nothing to make a prompt of: no request is paid for
            return [Dropped(row["id"], "empty_input")]
        messages = requests[0].messages
        prompt_id = record_id("prompt", row["id"], canonical_json(messages))
        out: list[Output | Dropped] = []
        for request, answer in zip(requests, await self.engine.ask(requests), strict=True):
            if not answer.ok:
                out.append(
                    Dropped(
                        row["id"],
                        "request_failed",
                        {"error": answer.error, "teacher": answer.teacher},
                        [answer],
                    )
                )
            elif not answer.content.strip():
                out.append(Dropped(row["id"], "empty_answer", {"teacher": answer.teacher}, [answer]))
            else:
                columns = {"prompt_id": prompt_id, "teacher": answer.teacher, "sample_index": request.sample_index,
                           "messages": messages + [{"role": "assistant", "content": answer.content}]}  # fmt: skip
                if self.cfg.sampling.top_logprobs is not None:
                    columns["logprobs"] = answer.logprobs
                out.append(Output(columns, [answer], [row["id"]], group=prompt_id))
        return out


def generate(cfg: GenerateConfig, store: Store) -> Manifest:
    return run_synth(GenerateTask, cfg, store)


def run_recipe(data: dict[str, Any], store: Store, source: str) -> Manifest:
    from manifests.recipes import parse_config

    return generate(parse_config(GenerateConfig, data, source), store)
