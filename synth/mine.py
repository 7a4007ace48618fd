"""``synth.mine``: the student scores candidate prompts, and only those it is weak on go to the teacher.

    stage: synth.mine
    name: arith-mined
    input: arith-pool                    # candidate prompts: a dataset, or a JSONL/Parquet file
    student: demo-student                # a run: a full checkpoint or an adapter
    scores: {pass_at_k: 1.0}             # any of loss, pass_at_k, kl, entropy, self_consistency (weights)
    samples: 4                           # the student's sampled answers per prompt (pass@k, entropy, agreement)
    k: 1
    sampling: {temperature: 0.8, max_tokens: 64}
    verify: {method: numeric, extract: last_number}
    select: {teacher_tokens: 20000, teacher_max_tokens: 256, stratify_by: domain, diversity: 1.0}

Scores, each a *hardness* (higher: more worth the teacher's tokens):

- ``loss``: the student's mean negative log-likelihood per token of the row's existing teacher answer
  (``answer_column``, or the last assistant turn of ``messages_column``);
- ``pass_at_k``: ``1 - pass@k`` of the student's ``samples`` answers, each checked by the verifiers of
  ``synth cot`` against the row's reference (or unit tests); the unbiased estimator of Chen et al.;
- ``kl``: the mean per-token KL(teacher || student) over the teacher answer, for a white-box ``teacher``
  run of the same tokenizer;
- ``entropy``: the student's mean per-token entropy over its own sampled answers;
- ``self_consistency``: one minus the share of the student's sampled answers that agree with their majority;
- ``random``: a uniform number fixed by ``seed`` and the candidate -- the baseline: the same budget, strata
  and output, without asking the student.

The student's answers are sampled in this process by default (``sampler: in_process``: a prompt's answers
from one batched ``generate`` call under the prompt's own seed), or through the teacher engine from
``sampler:`` -- ``{serve: <the student>}`` (``distillery serve`` on loopback, one request per answer) or an
endpoint serving the same checkpoint (vLLM). Either way they are cached like any teacher answer: a rerun
samples nothing twice. (In-process answers are keyed apart from any endpoint's, so a teacher that is the
student's own checkpoint served with the same prompt and sampling never gets the mined -- wrong --
answers back from the cache as its own.) Loss, KL and entropy come
from forward passes in this process. With several scores each becomes a percentile rank, averaged by
weight (``synth/selection.py``), then the top fraction, the rows above a threshold, or the best rows
that fit a budget of teacher tokens (a prompt costs its estimated tokens plus ``teacher_max_tokens`` per
request, as the engine estimates) are kept -- per stratum when ``stratify_by`` names a column, and
away from near-copies of what is already kept with ``diversity``/``min_novelty``. A kept row::

    {"id": "…", "parents": ["<candidate record id>"], "prompt_id": "…", "question": "What is 17 + 25?",
     "answer": "42", "mine_score": 1.0, "pass_at_k": 0.0, "samples_correct": 0, "student_loss": null, …,
     "rank": 3, "teacher_tokens": 268, "student": "<run id>",
     "reason": "rank 3 of 200 by score 1; 268 teacher tokens within the budget", "requests": [… the samples …]}

The rows not kept are in the ledger with their score and why (``not_selected``), as are rows that could
not be scored. ``exclude:`` names datasets already mined (earlier rounds of a loop): their candidates are
not offered again.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections import Counter
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from manifests.errors import DistilleryError
from manifests.hashing import canonical_json, record_id
from manifests.recipes import RecipeConfig
from manifests.schema import Manifest
from manifests.store import Store
from synth.engine import Answer, SamplingConfig, gather_all
from synth.runner import MESSAGE, Dropped, Output, SynthConfig, SynthTask, run_synth
from synth.selection import Candidate, Rules, combine, pass_at_k, select
from synth.teacher_requests import TeacherConfig, estimate_prompt_tokens
from synth.verify import Verifier, VerifyOptions

ScoreName = Literal["loss", "pass_at_k", "kl", "entropy", "self_consistency", "random"]
SAMPLED = ("pass_at_k", "entropy", "self_consistency")
"""The scores that need the student's own answers."""
STUDENT = "student"
"""The sampler's teacher label: the student's answers are requests like any teacher's."""


class Verification(RecipeConfig):
    """How a sampled answer is checked (``synth/verify.py``, as ``synth cot`` checks)."""

    method: Literal["exact", "numeric", "math", "regex", "tests"] = "math"
    extract: Literal["auto", "final_line", "boxed", "last_number", "regex", "code"] = "auto"
    pattern: str | None = None
    final_marker: str = "Final answer:"

    def verifier(self) -> Verifier:
        return Verifier(
            self.method, self.extract, self.pattern, VerifyOptions(final_marker=self.final_marker)
        )


class SelectConfig(RecipeConfig):
    """Which scored candidates are kept."""

    top_fraction: float | None = Field(default=None, gt=0, le=1)
    """Keep this share of the candidates (of each stratum's)."""
    threshold: float | None = None
    """Keep only candidates whose score is at least this (alone, or with a fraction or budget)."""
    teacher_tokens: int | None = Field(default=None, ge=1)
    """Keep the best candidates whose estimated teacher tokens fit this budget."""
    teacher_max_tokens: int = Field(default=512, ge=1)
    """The teacher's ``max_tokens`` per request, for the estimate (every answer that long, as the engine estimates)."""
    teacher_requests: int = Field(default=1, ge=1)
    """Teacher requests per kept prompt at most (a rejection-sampling ``synth cot``: its ``max_tries``)."""
    teacher_template: str | None = None
    """The teacher task's prompt template with ``{question}`` (``synth cot``'s asks for steps and a final
    line), for the estimate; default: the mining prompt."""
    stratify_by: str | None = None
    """An input column (source, domain): each of its values gets its share of the budget or fraction."""
    strata: Literal["proportional", "equal", "weights"] = "proportional"
    """Shares by the strata's sizes, equal, or ``stratum_weights``."""
    stratum_weights: dict[str, float] = Field(default_factory=dict)
    diversity: float = Field(default=0.0, ge=0)
    """The power of novelty (one minus the largest word n-gram Jaccard with a kept prompt) that multiplies a score."""
    min_novelty: float = Field(default=0.0, ge=0, le=1)
    """Never keep a prompt less novel than this."""
    ngram: int = Field(default=3, ge=1)

    @model_validator(mode="after")
    def _one_rule(self) -> SelectConfig:
        if self.top_fraction is None and self.threshold is None and self.teacher_tokens is None:
            raise ValueError("give 'top_fraction', 'threshold' or 'teacher_tokens' (a budget)")
        if self.top_fraction is not None and self.teacher_tokens is not None:
            raise ValueError("give 'top_fraction' or 'teacher_tokens', not both")
        if self.strata == "weights" and not self.stratum_weights:
            raise ValueError("'strata: weights' needs 'stratum_weights'")
        if self.strata != "proportional" and not self.stratify_by:
            raise ValueError(f"'strata: {self.strata}' needs 'stratify_by' (a column)")
        return self


class MineConfig(SynthConfig):
    """Student-aware selection of candidate prompts for the teacher."""

    student: str
    """The student run (a full checkpoint or an adapter) that scores the candidates."""
    teachers: list[TeacherConfig] = Field(default_factory=list)
    """Set from ``sampler``; not given in a recipe."""
    sampler: TeacherConfig | Literal["in_process"] = "in_process"
    """Where the student's answers are sampled: ``in_process`` (default: every answer of a prompt from one
    batched ``generate`` call, cached), or a teacher config -- ``{serve: <student>}`` on loopback, or an
    endpoint serving exactly ``student`` (answers are cached by endpoint and model name: give a name that
    changes with the checkpoint)."""
    scores: dict[ScoreName, float] = Field(default_factory=lambda: {"pass_at_k": 1.0})
    """Score → weight (> 0)."""
    teacher: str | None = None
    """With ``kl``: a white-box teacher run of the student's tokenizer."""
    question_column: str = "question"
    prompt_template: str = "{question}"
    """The user message; ``{question}`` is replaced by the question."""
    system_prompt: str | None = None
    messages_column: str | None = None
    """Instead of a question: a chat column; its turns before the last are the prompt, the last (the
    assistant's) the teacher answer."""
    answer_column: str | None = None
    """With ``loss``/``kl``: the column holding the teacher's answer text."""
    reference_column: str = "answer"
    """With ``pass_at_k``: the reference answer (a pattern under ``regex``)."""
    tests_column: str = "tests"
    """With ``pass_at_k`` and ``verify.method: tests``: the unit tests."""
    verify: Verification = Field(default_factory=Verification)
    samples: int = Field(default=4, ge=1, le=256)
    """The student's answers per prompt, for the sampled scores."""
    k: int = Field(default=1, ge=1)
    """pass@k's k (at most ``samples``)."""
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=0.8, max_tokens=256))
    batch_size: int = Field(default=8, ge=1)
    """Sequences per forward pass of the student (and teacher)."""
    max_length: int = Field(default=2048, ge=8)
    exclude: list[str] = Field(default_factory=list)
    """Datasets mined before: candidates that are a parent of one of their rows are not offered again."""
    select: SelectConfig

    @model_validator(mode="before")
    @classmethod
    def _no_teachers(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("teachers"):
            raise ValueError("synth.mine takes no 'teachers': the student is sampled through 'sampler'")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> MineConfig:
        if not self.scores or any(w <= 0 for w in self.scores.values()):
            raise ValueError("'scores' needs at least one score, each with a weight above 0")
        if "{question}" not in self.prompt_template:
            raise ValueError("'prompt_template' must contain '{question}'")
        if self.k > self.samples:
            raise ValueError(f"pass@k with k {self.k} needs 'samples' of at least {self.k}")
        if "kl" in self.scores and not self.teacher:
            raise ValueError("the 'kl' score needs 'teacher': a white-box teacher run")
        if {"loss", "kl"} & set(self.scores) and not (self.answer_column or self.messages_column):
            raise ValueError(
                "'loss' and 'kl' score a teacher answer: set 'answer_column' or 'messages_column'"
            )
        if self.sampled() and self.samples > 1 and self.sampling.temperature == 0:
            raise ValueError("sampling.temperature 0 gives every sample the same answer; set it above 0")
        if self.sampled() and self.sampler != "in_process":
            # set, not assigned: assignment would validate the model again, 'teachers' and all
            object.__setattr__(self, "teachers", [self.sampler.model_copy(update={"name": STUDENT})])
        return self

    def sampled(self) -> bool:
        return bool(set(SAMPLED) & set(self.scores))


class NothingToMine(DistilleryError):
    """Every candidate was kept by a dataset in ``exclude`` (earlier rounds took them all)."""


def hardness(measures: dict[str, float | None], name: str) -> float | None:
    """A score as a hardness (higher: weaker student) from the row's measures."""
    if name == "loss":
        return measures["student_loss"]
    if name == "random":
        return measures["random"]
    if name == "pass_at_k":
        return None if measures["pass_at_k"] is None else 1.0 - measures["pass_at_k"]
    if name == "self_consistency":
        return None if measures["agreement"] is None else 1.0 - measures["agreement"]
    return measures[name]


MEASURES = [("student_loss", pa.float64()), ("pass_at_k", pa.float64()), ("samples_correct", pa.int32()),
            ("kl", pa.float64()), ("entropy", pa.float64()), ("agreement", pa.float64())]  # fmt: skip


class MineTask(SynthTask):
    stage = "synth.mine"
    cfg: MineConfig

    def __init__(self, cfg: MineConfig, engine):
        super().__init__(cfg, engine)
        store = engine.store
        self.student = store.resolve(cfg.student, kind="run")
        self.teacher = store.resolve(cfg.teacher, kind="run") if cfg.teacher else None
        self.verifier = cfg.verify.verifier()
        self.excluded = excluded_ids(cfg.exclude, store)
        self._models = None
        if "kl" in cfg.scores:  # checked before any answer is sampled or any model loaded
            from manifests.models import load_tokenizer, tokenizer_fingerprint

            if tokenizer_fingerprint(load_tokenizer(self.teacher)) != tokenizer_fingerprint(
                load_tokenizer(self.student)
            ):
                raise DistilleryError(
                    f"teacher {self.teacher.ref} has another tokenizer than the student {self.student.ref}: KL compares "
                    "their next-token distributions token by token; use a teacher of the student's tokenizer, or the "
                    "'loss' score"
                )

    @classmethod
    def passed_through(cls, cfg: MineConfig) -> list[str]:
        """The input columns a kept row carries as they are (what the teacher task then reads)."""
        columns = [cfg.messages_column] if cfg.messages_column else [cfg.question_column]
        if cfg.answer_column:
            columns.append(cfg.answer_column)
        if "pass_at_k" in cfg.scores:
            columns.append(cfg.tests_column if cfg.verify.method == "tests" else cfg.reference_column)
        if cfg.select.stratify_by:
            columns.append(cfg.select.stratify_by)
        return list(dict.fromkeys(columns))

    @classmethod
    def input_columns(cls, cfg: MineConfig) -> list[str]:
        return ["id", *cls.passed_through(cfg)]

    @classmethod
    def carried(cls, cfg: MineConfig) -> list[str]:
        return cls.passed_through(cfg)

    @classmethod
    def output_columns(cls, cfg: MineConfig, input_schema: pa.Schema | None = None):
        passed = [(c, input_schema.field(c).type if input_schema is not None else pa.string())
                  for c in cls.passed_through(cfg)]  # fmt: skip
        return [("candidate_id", pa.string()), ("prompt_id", pa.string()), ("prompt", pa.list_(MESSAGE)), *passed,
                ("mine_score", pa.float64()),
                *MEASURES, ("novelty", pa.float64()), ("rank", pa.int64()), ("teacher_tokens", pa.int64()),
                ("student", pa.string()), ("reason", pa.string())]  # fmt: skip

    # ------------------------------------------------------------------ one row's prompt and answer

    def prompt(self, row: dict[str, Any]) -> list[dict[str, str]]:
        if self.cfg.messages_column:
            turns = list(row[self.cfg.messages_column] or [])
            return [{"role": t["role"], "content": t["content"]} for t in turns[:-1]]
        question = str(row[self.cfg.question_column] or "").strip()
        system = [{"role": "system", "content": self.cfg.system_prompt}] if self.cfg.system_prompt else []
        return system + [
            {"role": "user", "content": self.cfg.prompt_template.replace("{question}", question)}
        ]

    def teacher_answer(self, row: dict[str, Any]) -> str | None:
        if self.cfg.answer_column:
            value = row.get(self.cfg.answer_column)
            return None if value is None or not str(value).strip() else str(value)
        if self.cfg.messages_column:
            turns = list(row[self.cfg.messages_column] or [])
            if turns and turns[-1]["role"] == "assistant" and (turns[-1]["content"] or "").strip():
                return turns[-1]["content"]
        return None

    def first_requests(self, row: dict[str, Any]):
        if not self.cfg.sampled() or self.cfg.sampler == "in_process":
            return []
        prompt = self.prompt(row)
        return [self.engine.request(STUDENT, prompt, self.cfg.sampling, k) for k in range(self.cfg.samples)]

    def teacher_tokens(self, row: dict[str, Any], prompt: list[dict[str, str]]) -> int:
        """The engine's estimate of what the teacher will cost for the row: every request at max_tokens."""
        s = self.cfg.select
        if s.teacher_template is not None and not self.cfg.messages_column:
            question = str(row[self.cfg.question_column] or "").strip()
            prompt = [
                *prompt[:-1],
                {"role": "user", "content": s.teacher_template.replace("{question}", question)},
            ]
        return (estimate_prompt_tokens(prompt) + s.teacher_max_tokens) * s.teacher_requests

    # ------------------------------------------------------------------ the whole candidate set

    async def run_all(self, rows: list[dict[str, Any]]) -> list[list[Output | Dropped]]:
        cfg = self.cfg
        results: dict[str, list[Output | Dropped]] = {}
        scored = []
        for row in rows:
            why = self._unscorable(row)
            if why:
                results[row["id"]] = [Dropped(row["id"], why[0], {"error": why[1]})]
            else:
                scored.append(row)
        if not scored:
            reasons = Counter(r[0].reason for r in results.values())
            error = NothingToMine if set(reasons) == {"already_selected"} else DistilleryError
            raise error(f"{cfg.name}: no candidate can be scored ({dict(reasons)}); {self._fix(reasons)}")
        prompts = {row["id"]: self.prompt(row) for row in scored}
        tokens = {row["id"]: self.teacher_tokens(row, prompts[row["id"]]) for row in scored}
        if cfg.select.teacher_tokens is not None and cfg.select.teacher_tokens < min(tokens.values()):
            raise DistilleryError(
                f"{cfg.name}: select.teacher_tokens {cfg.select.teacher_tokens} is smaller than one teacher request "
                f"(the cheapest candidate is estimated at {min(tokens.values())} tokens); raise it"
            )
        samples = await self._sample(scored, prompts) if cfg.sampled() else {}
        measures: dict[str, dict[str, Any]] = {}
        for row in scored:
            answers = samples.get(row["id"], [])
            if answers and not any(a.ok for a in answers):
                results[row["id"]] = [
                    Dropped(row["id"], "request_failed", {"error": answers[-1].error}, answers)
                ]
                continue
            measures[row["id"]] = await self._sample_measures(row, answers)
            measures[row["id"]]["random"] = random_score(cfg.seed, row["id"])
        kept = [row for row in scored if row["id"] in measures]
        await asyncio.to_thread(self._forward_measures, kept, prompts, samples, measures)
        names = list(cfg.scores)
        values = {name: [hardness(measures[row["id"]], name) for row in kept] for name in names}
        unscored = {i for name in names for i, v in enumerate(values[name]) if v is None or math.isnan(v)}
        for i in sorted(unscored):
            rid = kept[i]["id"]
            results[rid] = [Dropped(rid, "not_scored", {"measures": measures[rid]}, samples.get(rid, []))]
        kept = [row for i, row in enumerate(kept) if i not in unscored]
        if not kept:
            raise DistilleryError(
                f"{cfg.name}: no candidate could be scored (every answer too long for max_length?)"
            )
        values = {name: [v for i, v in enumerate(vs) if i not in unscored] for name, vs in values.items()}
        combined = combine(values, cfg.scores)
        stratum = cfg.select.stratify_by
        candidates = [Candidate(row["id"], score, tokens[row["id"]], str(row.get(stratum)) if stratum else "",
                                " ".join(m["content"] for m in prompts[row["id"]]))
                      for row, score in zip(kept, combined, strict=True)]  # fmt: skip
        decisions = select(candidates, self.rules())
        for row, score in zip(kept, combined, strict=True):
            rid, decision = row["id"], decisions[row["id"]]
            m, answers = measures[rid], samples.get(rid, [])
            if decision.chosen:
                results[rid] = [self._output(row, prompts[rid], score, m, decision, tokens[rid], answers)]
            else:
                detail = {"measures": m, "rank": decision.rank, "why": decision.reason, "student": self.student.id,
                          "stratum": str(row.get(stratum)) if stratum else None, "teacher_tokens": tokens[rid]}  # fmt: skip
                if decision.similar_to:
                    detail["similar_to"] = decision.similar_to
                results[rid] = [Dropped(rid, "not_selected", detail, answers, score=score)]
        return [results[row["id"]] for row in rows]

    def rules(self) -> Rules:
        s = self.cfg.select
        return Rules(s.top_fraction, s.threshold, s.teacher_tokens, s.strata, s.stratum_weights, s.diversity,
                     s.min_novelty, s.ngram)  # fmt: skip

    def _unscorable(self, row: dict[str, Any]) -> tuple[str, str] | None:
        if row["id"] in self.excluded:
            return "already_selected", "a dataset in 'exclude' holds a row made from it"
        if {"loss", "kl"} & set(self.cfg.scores) and self.teacher_answer(row) is None:
            return "no_teacher_answer", "the row has no teacher answer to score"
        if "pass_at_k" in self.cfg.scores:
            column = self.cfg.tests_column if self.cfg.verify.method == "tests" else self.cfg.reference_column
            if row.get(column) is None or not str(row[column]).strip():
                return "no_reference", f"the row's '{column}' is empty"
        if self.cfg.messages_column and not self.prompt(row):
            return "no_prompt", "the chat has no turn before the answer"
        return None

    def _fix(self, reasons: Counter) -> str:
        if reasons.get("no_reference"):
            return "pass@k checks the student's answers against a reference: give candidates one ('reference_column')"
        if reasons.get("no_teacher_answer"):
            return "loss and kl score an existing teacher answer: give 'answer_column' a filled column"
        if reasons.get("already_selected"):
            return "every candidate was mined before ('exclude'); add candidates"
        return "check the input"

    async def _sample(self, rows, prompts) -> dict[str, list[Answer]]:
        if self.cfg.sampler == "in_process":
            return await asyncio.to_thread(self._sample_in_process, rows, prompts)
        limit = asyncio.Semaphore(self.cfg.rows_in_flight)
        done = 0

        async def one(row: dict[str, Any]) -> list[Answer]:
            nonlocal done
            async with limit:
                requests = [self.engine.request(STUDENT, prompts[row["id"]], self.cfg.sampling, k)
                            for k in range(self.cfg.samples)]  # fmt: skip
                answers = await self.engine.ask(requests)
            done += 1
            self.progress(done, len(rows))
            return answers

        answered = await gather_all(*(one(r) for r in rows))
        return {row["id"]: a for row, a in zip(rows, answered, strict=True)}

    def models(self):
        """(student, tokenizer), loaded once for sampling in process and the forward passes."""
        if self._models is None:
            from manifests.models import load_causal_lm

            self._models = load_causal_lm(self.student, self.engine.store)
            self._models[0].eval()
        return self._models

    def _sample_in_process(self, rows, prompts) -> dict[str, list[Answer]]:
        """Every prompt's answers from the student in this process, through the request cache: an answer
        is keyed like an engine request (endpoint ``in_process:<student id>``, the sampling and the number
        of samples), so a rerun generates none twice."""
        from synth.cache import request_key
        from synth.student_scores import sample_answers

        cfg, cache = self.cfg, self.engine.cache
        endpoint, params = f"in_process:{self.student.id}", cfg.sampling.resolved() | {"samples": cfg.samples}
        out: dict[str, list[Answer]] = {}
        for done, row in enumerate(rows, 1):
            prompt = prompts[row["id"]]
            keys = [request_key(endpoint, self.student.ref, prompt, params, k) for k in range(cfg.samples)]
            cached = cache.get_many(keys)
            hit = len(cached) == len(keys)
            if not hit:
                model, tokenizer = self.models()
                seed = int(
                    hashlib.sha256(f"{params.get('seed')}\x1f{row['id']}".encode()).hexdigest()[:8], 16
                )
                made = sample_answers(model, tokenizer, prompt, cfg.samples, cfg.sampling.max_tokens,
                                      cfg.sampling.temperature, cfg.sampling.top_p, seed)  # fmt: skip
                for key, a in zip(keys, made, strict=True):
                    cached[key] = {"content": a.text, "finish_reason": a.finish_reason, "prompt_tokens": a.prompt_tokens,
                                   "completion_tokens": a.completion_tokens, "served_model": self.student.ref}  # fmt: skip
                    cache.put(key, cached[key])
            out[row["id"]] = [Answer(key=key, teacher=STUDENT, endpoint=endpoint, sampling=params,
                                     cache_hit=hit, **cached[key]) for key in keys]  # fmt: skip
            self.progress(done, len(rows))
        return out

    async def _sample_measures(self, row: dict[str, Any], answers: list[Answer]) -> dict[str, Any]:
        m: dict[str, Any] = {name: None for name, _ in MEASURES}
        if not answers:
            return m
        extracted = [self.verifier.answer_of(a.content) if a.ok else None for a in answers]
        if "pass_at_k" in self.cfg.scores:
            tests = row.get(self.cfg.tests_column) if self.cfg.verify.method == "tests" else None
            reference = row.get(self.cfg.reference_column) if self.cfg.verify.method != "tests" else None
            verdicts = await gather_all(
                *(asyncio.to_thread(self.verifier.check, e, reference, tests) for e in extracted)
            )
            correct = sum(v.passed for v in verdicts)
            m["samples_correct"], m["pass_at_k"] = correct, pass_at_k(len(answers), correct, self.cfg.k)
            m["verdicts"] = [v.passed for v in verdicts]
        keys = [self.verifier.key(e) for e in extracted]
        votes = Counter(k for k in keys if k is not None)
        m["agreement"] = (votes.most_common(1)[0][1] if votes else 0) / len(answers)
        return m

    def _forward_measures(self, rows, prompts, samples, measures) -> None:
        """Loss and KL on the teacher answers, entropy on the student's own: forward passes, in place."""
        cfg = self.cfg
        wanted = {"loss", "kl", "entropy"} & set(cfg.scores)
        if not wanted or not rows:
            return
        from manifests.models import load_causal_lm
        from synth.student_scores import AnswerScorer

        student, tokenizer = self.models()
        teacher = load_causal_lm(self.teacher, self.engine.store)[0] if "kl" in wanted else None
        scorer = AnswerScorer(student, tokenizer, teacher, cfg.batch_size, cfg.max_length)
        if {"loss", "kl"} & wanted:
            stats = scorer.stats([(prompts[r["id"]], self.teacher_answer(r)) for r in rows])
            for row, s in zip(rows, stats, strict=True):
                measures[row["id"]]["student_loss"] = s.loss
                measures[row["id"]]["kl"] = s.kl
        if "entropy" in wanted:
            pairs = [(row["id"], a.content) for row in rows for a in samples[row["id"]] if a.ok]
            stats = scorer.stats([(prompts[rid], text) for rid, text in pairs])
            per_row: dict[str, list[float]] = {}
            for (rid, _), s in zip(pairs, stats, strict=True):
                if not math.isnan(s.entropy):
                    per_row.setdefault(rid, []).append(s.entropy)
            for row in rows:
                values = per_row.get(row["id"])
                measures[row["id"]]["entropy"] = sum(values) / len(values) if values else None

    def _output(self, row, prompt, score, m, decision, tokens, answers) -> Output:
        columns = {"candidate_id": row["id"], "prompt_id": record_id("prompt", row["id"], canonical_json(prompt)),
                   "prompt": prompt,
                   **{c: row[c] for c in self.passed_through(self.cfg)}, "mine_score": score,
                   **{name: m[name] for name, _ in MEASURES}, "novelty": decision.novelty, "rank": decision.rank,
                   "teacher_tokens": tokens, "student": self.student.id, "reason": decision.reason}  # fmt: skip
        verdict = canonical_json({"scores": dict(self.cfg.scores), "verified": m.get("verdicts")})
        return Output(columns, answers, [row["id"]], group=columns["prompt_id"], verdict=verdict)

    @classmethod
    def extra_stats(cls, cfg: MineConfig, outputs: list[Output], dropped: list[Dropped]) -> dict[str, Any]:
        # The student's answers of every candidate (kept or not): what scoring cost, in or out of process.
        answers = [a for o in [*outputs, *dropped] for a in o.answers if a.teacher == STUDENT]
        sampled = {"answers": len(answers), "from_cache": sum(a.cache_hit for a in answers),
                   "completion_tokens": sum(a.completion_tokens for a in answers),
                   "sampler": "in_process" if cfg.sampler == "in_process" else "engine"}  # fmt: skip
        return {"mined": stratum_stats(cfg, outputs, dropped) | {"student_samples": sampled}}

    @classmethod
    def lineage_parents(cls, cfg: MineConfig, store: Store) -> dict[str, Manifest]:
        """The student (and a KL teacher) as parents of the mined dataset, by role."""
        parents = {"student": store.resolve(cfg.student, kind="run")}
        if cfg.teacher:
            parents["teacher"] = store.resolve(cfg.teacher, kind="run")
        return parents


def random_score(seed: int, candidate: str) -> float:
    """A uniform number in [0, 1) fixed by the seed and the candidate: the ``random`` score, the baseline
    that spends the same budget on the same strata without asking the student."""
    return int(hashlib.sha256(f"{seed}\x1f{candidate}".encode()).hexdigest()[:13], 16) / 16**13


def stratum_stats(cfg: MineConfig, outputs: list[Output], dropped: list[Dropped]) -> dict[str, Any]:
    """Per stratum: candidates scored, kept, their mean score (hardness) and teacher tokens, and the mixture
    weights those gaps suggest for the next round (each stratum's share of the summed mean scores)."""
    column = cfg.select.stratify_by
    rows = [(str(o.columns.get(column)) if column else "", o.columns["mine_score"], True, o.columns["teacher_tokens"])
            for o in outputs]  # fmt: skip
    rows += [
        (d.detail.get("stratum") or "", d.score, False, 0) for d in dropped if d.reason == "not_selected"
    ]
    strata: dict[str, dict[str, Any]] = {}
    for stratum, score, kept, tokens in rows:
        s = strata.setdefault(stratum, {"candidates": 0, "kept": 0, "score_sum": 0.0, "teacher_tokens": 0})
        s["candidates"] += 1
        s["kept"] += kept
        s["score_sum"] += score
        s["teacher_tokens"] += tokens
    for s in strata.values():
        s["mean_score"] = round(s.pop("score_sum") / s["candidates"], 6)
    total = sum(max(s["mean_score"], 0.0) for s in strata.values())
    weights = {k: round(max(s["mean_score"], 0.0) / total, 6) if total else round(1 / len(strata), 6)
               for k, s in sorted(strata.items())}  # fmt: skip
    return {"strata": dict(sorted(strata.items())), "mixture_weights": weights,
            "mixture_reason": "each stratum's mean mining score (the student's weakness there) over their sum",
            "kept": len(outputs), "teacher_tokens_kept": sum(o.columns["teacher_tokens"] for o in outputs)}  # fmt: skip


def excluded_ids(refs: list[str], store: Store) -> set[str]:
    """The candidate record ids the mined datasets in ``refs`` kept (their ``candidate_id`` column: a
    candidate read from a file is the parent of no row, so ``parents`` cannot say)."""
    from manifests.data import read_table, require_columns

    ids: set[str] = set()
    for ref in refs:
        manifest = store.resolve(ref, kind="dataset")
        require_columns(manifest, ["candidate_id"], "'exclude' (a synth.mine dataset)")
        for split in manifest.splits():
            ids.update(
                read_table(manifest, split=split, columns=["candidate_id"]).column("candidate_id").to_pylist()
            )
    return ids


def mine(cfg: MineConfig, store: Store) -> Manifest:
    return run_synth(MineTask, cfg, store)


def run_recipe(data: dict[str, Any], store: Store, source: str) -> Manifest:
    from manifests.recipes import parse_config

    return mine(parse_config(MineConfig, data, source), store)
