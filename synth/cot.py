"""``synth.cot``: step-by-step answers, kept only when their final answer checks out.

    stage: synth.cot
    name: math-cot
    input: examples/sample/math-qa.jsonl     # or a dataset with the columns
    teachers: [{serve: smollm2-135m-instruct}]
    sampling: {temperature: 0.7, max_tokens: 256}
    mode: rejection          # or self_consistency
    samples: 2               # answers asked at once (per round)
    max_tries: 4             # rejection: samples per question at most
    extract: final_line      # auto | final_line | boxed | last_number | regex (with pattern) | code
    verify: math             # exact | numeric | math | regex | tests | none  (synth/verify.py)

Each question is asked with a prompt that wants reasoning ending in ``Final answer: …``; sample
``k`` goes out with its own seed, and every answer is cached, so a rerun (or a larger
``max_tries``) pays only for samples never asked before.

- **rejection**: ``samples`` answers a round, rounds until one verifies against the reference or
  ``max_tries`` samples were used; the first verified sample (by index) becomes the row.
- **self_consistency**: ``samples`` answers; their extracted answers vote (equal as the verifier
  sees them: ``0.5`` and ``\\frac{1}{2}`` under ``math``); the majority answer is the consensus,
  checked against the reference when the row has one (without one, agreement is the only check:
  ``verified`` is true, the verdict's method ``consensus``). ``votes`` records the count.

A question that yields no verified answer is a ledger entry (``unverified``, ``no_consensus`` or
``request_failed``, with the verdicts in ``detail``), unless ``keep_unverified: true`` keeps it as
a row with ``verified: false``. An output row::

    {"id": "…", "parents": ["c0ffee…"], "source": null, "prompt_id": "…", "teacher": "smollm2-135m-instruct",
     "question": "A box holds 12 pens…", "reference": "36", "prompt": [{"role": "user", "content": "Solve…"}],
     "extracted": "36", "verified": true,
     "sample_index": 2, "votes": null,
     "messages": [{"role": "user", "content": "Solve…"}, {"role": "assistant", "content": "… Final answer: 36"}],
     "requests": [… one per sample asked …],
     "verdict": "{\\"passed\\":true,\\"method\\":\\"math\\",\\"extracted\\":\\"36\\",\\"tries\\":[…],…}"}

Rows made from a file's records have no parent record: ``source`` names the file and line instead
(``synth/runner.py`` does this for every task). The columns serve SFT (``messages``: the reasoning as the answer) and GRPO (``prompt`` with the
``reference`` answer for a reward function).
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from manifests.hashing import canonical_json, record_id
from manifests.schema import Manifest
from manifests.store import Store
from synth.engine import Answer, SamplingConfig, gather_all
from synth.runner import MESSAGE, Dropped, Output, SynthConfig, SynthTask, run_synth
from synth.verify import Verdict, Verifier, VerifyOptions

DEFAULT_TEMPLATE = (
    "Solve the following problem. Reason step by step, then give the final answer on the last line "
    "in the form 'Final answer: <answer>'.\n\n{question}"
)
VOTE = pa.struct([("answer", pa.string()), ("count", pa.int32())])


class CotConfig(SynthConfig):
    """Chain-of-thought answers from teachers, verified against reference answers or unit tests."""

    question_column: str = "question"
    """The input column holding the question."""
    answer_column: str | None = "answer"
    """The input column holding the reference answer (``null``: no references, for
    ``self_consistency`` or ``verify: none``). Under ``verify: regex`` it holds a pattern."""
    tests_column: str = "tests"
    """With ``verify: tests``: the input column holding the unit tests (Python asserts, as one string
    or a list of strings)."""
    prompt_template: str = DEFAULT_TEMPLATE
    """The user message; ``{question}`` is replaced by the question."""
    system_prompt: str | None = None
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(max_tokens=512, temperature=0.7))
    """Sampling of every answer (a temperature above 0 when more than one sample is asked)."""
    mode: Literal["rejection", "self_consistency"] = "rejection"
    """``rejection``: ask until one answer verifies; ``self_consistency``: the majority of ``samples``."""
    samples: int = Field(default=1, ge=1, le=64)
    """Answers asked at once: per round (``rejection``) or in all (``self_consistency``)."""
    max_tries: int = Field(default=4, ge=1)
    """``rejection``: samples per question and teacher at most."""
    extract: Literal["auto", "final_line", "boxed", "last_number", "regex", "code"] = "auto"
    """How the answer is found in a response: ``auto`` takes the ``Final answer:`` line, else the last
    ``\\boxed{}``, else the last line -- and under ``verify: tests`` the last fenced code block."""
    pattern: str | None = None
    """With ``extract: regex``: the answer is the last match (its first group, if it has one)."""
    final_marker: str = "Final answer:"
    """With ``extract: final_line``: the text that introduces the answer."""
    verify: Literal["exact", "numeric", "math", "regex", "tests", "none"] = "math"
    rel_tol: float = Field(default=1e-6, ge=0)
    """``numeric``/``math``: relative tolerance."""
    abs_tol: float = Field(default=1e-9, ge=0)
    """``numeric``/``math``: absolute tolerance."""
    math_time_limit: float = Field(default=2.0, gt=0)
    """``math``: seconds sympy may spend on one comparison."""
    time_limit: float = Field(default=5.0, gt=0)
    """``tests``: seconds a run may take (its processes are killed then)."""
    memory_mb: int = Field(default=1024, ge=64)
    """``tests``: memory (address space) of a run."""
    min_agreement: float = Field(default=0.0, ge=0, le=1)
    """``self_consistency``: the least share of samples that must agree on the consensus."""
    keep_unverified: bool = False
    """Keep questions without a verified answer as rows (``verified: false``) instead of dropping them."""

    @field_validator("prompt_template")
    @classmethod
    def _has_question(cls, v: str) -> str:
        if "{question}" not in v:
            raise ValueError("must contain '{question}'")
        return v

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"not a valid regular expression ({e})") from None
        return v

    @model_validator(mode="after")
    def _consistent(self) -> CotConfig:
        if self.extract == "regex" and not self.pattern:
            raise ValueError("'extract: regex' needs 'pattern'")
        if self.mode == "rejection" and self.samples > self.max_tries:
            raise ValueError("'samples' (answers per round) must not exceed 'max_tries'")
        many = self.samples if self.mode == "self_consistency" else self.max_tries
        if many > 1 and self.sampling.temperature == 0:
            raise ValueError(
                "sampling.temperature 0 gives every sample the same answer; set it above 0, or ask one sample"
            )
        if self.mode == "rejection" and self.answer_column is None and self.verify not in ("tests", "none"):
            raise ValueError(f"'verify: {self.verify}' checks a reference answer: set 'answer_column'")
        return self

    def verifier(self) -> Verifier:
        options = VerifyOptions(final_marker=self.final_marker, rel_tol=self.rel_tol, abs_tol=self.abs_tol,
                                math_time_limit=self.math_time_limit, time_limit=self.time_limit,
                                memory_mb=self.memory_mb)  # fmt: skip
        return Verifier(self.verify, self.extract, self.pattern, options)


def _cut(text: str | None, limit: int = 200) -> str | None:
    return text if text is None or len(text) <= limit else text[:limit] + "…"


def _summary(verdict: Verdict, sample_index: int) -> dict[str, Any]:
    return {"sample_index": sample_index, "passed": verdict.passed, "extracted": _cut(verdict.extracted)}


def _for_ledger(verdict: Verdict) -> dict[str, Any]:
    """A verdict short enough for the ledger, which keeps reasons, not texts (a code answer is cut)."""
    detail = dict(verdict.detail)
    if "stderr_tail" in detail:
        detail["stderr_tail"] = detail["stderr_tail"][-300:]
    return verdict.to_dict() | {"extracted": _cut(verdict.extracted), "detail": detail}


class CotTask(SynthTask):
    stage = "synth.cot"
    required = ["id", "question", "answer"]
    columns = [("prompt_id", pa.string()), ("teacher", pa.string()), ("question", pa.string()),
               ("reference", pa.string()), ("prompt", pa.list_(MESSAGE)), ("messages", pa.list_(MESSAGE)),
               ("extracted", pa.string()),
               ("verified", pa.bool_()), ("sample_index", pa.int32()), ("votes", pa.list_(VOTE))]  # fmt: skip
    cfg: CotConfig

    def __init__(self, cfg: CotConfig, engine):
        super().__init__(cfg, engine)
        self.verifier = cfg.verifier()

    @classmethod
    def input_columns(cls, cfg: CotConfig) -> list[str]:
        columns = ["id", cfg.question_column]
        if cfg.answer_column and cfg.verify not in ("tests", "none"):
            columns.append(cfg.answer_column)
        if cfg.verify == "tests":
            columns.append(cfg.tests_column)
        return list(dict.fromkeys(columns))

    def _messages(self, question: str) -> list[dict[str, str]]:
        user = self.cfg.prompt_template.replace("{question}", question.strip())
        system = [{"role": "system", "content": self.cfg.system_prompt}] if self.cfg.system_prompt else []
        return system + [{"role": "user", "content": user}]

    def _reference(self, row: dict[str, Any]) -> str | None:
        value = row.get(self.cfg.answer_column) if self.cfg.answer_column else None
        return None if value is None else str(value)

    def first_requests(self, row: dict[str, Any]):
        messages = self._messages(str(row[self.cfg.question_column] or ""))
        first = (
            self.cfg.samples
            if self.cfg.mode == "self_consistency"
            else min(self.cfg.samples, self.cfg.max_tries)
        )
        return [self.engine.request(t.label, messages, self.cfg.sampling, k)
                for t in self.cfg.teachers for k in range(first)]  # fmt: skip

    async def run(self, row: dict[str, Any]) -> list[Output | Dropped]:
        messages = self._messages(str(row[self.cfg.question_column] or ""))
        prompt_id = record_id("prompt", row["id"], canonical_json(messages))
        work = self._rejection if self.cfg.mode == "rejection" else self._self_consistency
        # gather_all: when one teacher's work stops (budget, interruption), the others' requests in
        # flight are still awaited and cached -- a plain gather would leave them running unawaited.
        per_teacher = await gather_all(*(work(row, messages, prompt_id, t.label) for t in self.cfg.teachers))
        return [o for results in per_teacher for o in results]

    async def _ask(self, teacher: str, messages: list[dict[str, str]], first: int, n: int) -> list[Answer]:
        requests = [
            self.engine.request(teacher, messages, self.cfg.sampling, k) for k in range(first, first + n)
        ]
        return await self.engine.ask(requests)

    async def _check(self, answer: str | None, row: dict[str, Any]) -> Verdict:
        tests = row.get(self.cfg.tests_column)
        if self.cfg.verify == "tests":  # a subprocess of up to time_limit seconds: off the event loop
            return await asyncio.to_thread(self.verifier.check, answer, None, tests)
        return self.verifier.check(answer, self._reference(row), tests)

    async def _verdict(self, answer: Answer, row: dict[str, Any]) -> Verdict:
        if not answer.ok:
            return Verdict(False, self.cfg.verify, None, {"error": answer.error})
        return await self._check(self.verifier.answer_of(answer.content), row)

    def _output(self, row, messages, prompt_id, answer: Answer, sample_index: int, verdict: Verdict,
                answers: list[Answer], votes: list[dict] | None, extra: dict[str, Any]) -> Output:  # fmt: skip
        columns = {"prompt_id": prompt_id, "teacher": answer.teacher, "question": str(row[self.cfg.question_column]),
                   "reference": self._reference(row), "prompt": messages,
                   "messages": messages + [{"role": "assistant", "content": answer.content}],
                   "extracted": verdict.extracted, "verified": verdict.passed, "sample_index": sample_index,
                   "votes": votes}  # fmt: skip
        return Output(columns, answers, [row["id"]], group=prompt_id,
                      verdict=canonical_json(verdict.to_dict() | {"mode": self.cfg.mode} | extra))  # fmt: skip

    async def _rejection(self, row, messages, prompt_id, teacher: str) -> list[Output | Dropped]:
        tried: list[tuple[int, Answer, Verdict]] = []
        while len(tried) < self.cfg.max_tries and not any(v.passed for _, _, v in tried):
            first = len(tried)
            answers = await self._ask(
                teacher, messages, first, min(self.cfg.samples, self.cfg.max_tries - first)
            )
            verdicts = await asyncio.gather(*(self._verdict(a, row) for a in answers))
            tried += [(first + i, a, v) for i, (a, v) in enumerate(zip(answers, verdicts, strict=True))]
        answers = [a for _, a, _ in tried]
        tries = {"tries": [_summary(v, k) for k, _, v in tried]}
        chosen = next(((k, a, v) for k, a, v in tried if v.passed), None)
        if chosen is None and not any(a.ok for a in answers):
            return [
                Dropped(
                    row["id"], "request_failed", {"error": answers[-1].error, "teacher": teacher}, answers
                )
            ]
        if chosen is None:
            if not self.cfg.keep_unverified:
                last = _for_ledger(tried[-1][2])
                return [
                    Dropped(row["id"], "unverified", {"teacher": teacher, "verdict": last, **tries}, answers)
                ]
            chosen = next((t for t in tried if t[2].extracted is not None), None) or next(
                t for t in tried if t[1].ok
            )
        k, answer, verdict = chosen
        return [self._output(row, messages, prompt_id, answer, k, verdict, answers, None, tries)]

    async def _self_consistency(self, row, messages, prompt_id, teacher: str) -> list[Output | Dropped]:
        answers = await self._ask(teacher, messages, 0, self.cfg.samples)
        if not any(a.ok for a in answers):
            return [
                Dropped(
                    row["id"], "request_failed", {"error": answers[-1].error, "teacher": teacher}, answers
                )
            ]
        extracted = [self.verifier.answer_of(a.content) if a.ok else None for a in answers]
        keys = [self.verifier.key(e) for e in extracted]
        counts = Counter(k for k in keys if k is not None)
        # Ties go to the answer seen first (the lowest sample index): stable across reruns.
        ranked = sorted(counts, key=lambda key: (-counts[key], keys.index(key)))
        votes = [{"answer": _cut(extracted[keys.index(key)]), "count": counts[key]} for key in ranked]
        detail = {"teacher": teacher, "votes": votes}
        if not ranked or counts[ranked[0]] / len(answers) < self.cfg.min_agreement:
            why = "no sample had an answer" if not ranked else f"agreement below {self.cfg.min_agreement:g}"
            return [Dropped(row["id"], "no_consensus", detail | {"error": why}, answers)]
        k = keys.index(ranked[0])
        agreement = {"agreement": round(counts[ranked[0]] / len(answers), 6)}
        has_reference = self._reference(row) is not None or self.cfg.verify == "tests"
        if self.cfg.verify != "none" and has_reference:
            verdict = await self._check(extracted[k], row)
        else:
            verdict = Verdict(True, "consensus", extracted[k])
        if not verdict.passed and not self.cfg.keep_unverified:
            return [
                Dropped(
                    row["id"], "unverified", detail | {"verdict": _for_ledger(verdict)} | agreement, answers
                )
            ]
        return [self._output(row, messages, prompt_id, answers[k], k, verdict, answers, votes, agreement)]


def cot(cfg: CotConfig, store: Store) -> Manifest:
    return run_synth(CotTask, cfg, store)


def run_recipe(data: dict[str, Any], store: Store, source: str) -> Manifest:
    from manifests.recipes import parse_config

    return cot(parse_config(CotConfig, data, source), store)
