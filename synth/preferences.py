"""``synth.preferences``: candidate answers per prompt, scored, turned into chosen/rejected pairs.

    stage: synth.preferences
    name: demo-prefs
    input: demo-corpus
    teachers: [{name: policy, serve: student-base}, {name: judge, base_url: …, model: …}]
    candidate_teachers: [policy]
    candidates: 4
    sampling: {temperature: 0.9, max_tokens: 128}
    score: {method: judge, judge: judge}            # or {method: reward_model, reward_model: rm}
    min_margin: 0.5

Each prompt gets ``candidates`` answers, spread over ``candidate_teachers`` in turn (sample ``k``
with its own seed). They are scored by

- **judge**: a teacher compares every two candidates, asked **in both orders** (A/B and B/A). A
  candidate wins a comparison only when both orders agree; a split verdict -- the judge preferring
  whichever came first, or second -- counts as a tie, which cancels position bias. A candidate's
  score is its share of wins (ties count one half);
- **reward_model**: a sequence-classification checkpoint in the store scores (prompt, answer);
- **verifier**: the answer is checked against the row's reference (``synth/verify.py``): 1 or 0.

The best and the worst candidate become ``chosen`` and ``rejected`` when their scores differ by at
least ``min_margin``; two candidates with the same (normalised) text never make a pair. A prompt
without such a pair is dropped with its reason in the ledger. An output row, in TRL's conversational
preference format (DPO, reward modelling)::

    {"prompt": [{"role": "user", "content": "…"}], "chosen": [{"role": "assistant", "content": "…"}],
     "rejected": [{"role": "assistant", "content": "…"}], "score_chosen": 1.0, "score_rejected": 0.0, …}
"""

from __future__ import annotations

import asyncio
import itertools
import re
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from manifests.hashing import canonical_json, record_id
from manifests.model_runs import require_sequence_classifier
from manifests.recipes import RecipeConfig
from manifests.schema import Manifest
from manifests.store import Store
from synth.engine import Answer, Request, SamplingConfig
from synth.runner import MESSAGE, Dropped, Output, SynthConfig, SynthTask, fill, run_synth

JUDGE_TEMPLATE = """You are comparing two answers to the same request. Judge which answer is more helpful, \
correct and clear. Reply with exactly one letter: A, B, or T for a tie.

[Request]
{prompt}

[Answer A]
{a}

[Answer B]
{b}

Which answer is better? Reply A, B or T."""


class ScoreConfig(RecipeConfig):
    """How candidates are scored."""

    method: Literal["judge", "reward_model", "verifier"] = "judge"
    judge: str | None = None
    """With ``judge``: the name of the judging teacher."""
    judge_template: str = JUDGE_TEMPLATE
    """Has ``{prompt}``, ``{a}`` and ``{b}``; the judge must answer A, B or T."""
    judge_sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(max_tokens=4, temperature=0.0)
    )
    reward_model: str | None = None
    """With ``reward_model``: a sequence-classification checkpoint in the store (one logit: the reward)."""
    verifier: Literal["exact", "numeric", "math", "regex"] = "exact"
    """With ``verifier``: a method of ``synth/verify.py`` (exact, numeric, math, regex)."""
    reference_column: str = "answer"
    """With ``verifier``: the input column holding the reference answer."""

    @model_validator(mode="after")
    def _named(self) -> ScoreConfig:
        if self.method == "judge" and not self.judge:
            raise ValueError("'method: judge' needs 'judge': the name of the judging teacher")
        if self.method == "reward_model" and not self.reward_model:
            raise ValueError("'method: reward_model' needs 'reward_model': a checkpoint in the store")
        for field in ("{prompt}", "{a}", "{b}"):
            if field not in self.judge_template:
                raise ValueError(f"'judge_template' must contain {field}")
        return self


class PreferencesConfig(SynthConfig):
    """Chosen/rejected pairs from scored candidate answers."""

    prompt_column: str = "text"
    """The input column the prompt is made from."""
    prompt_template: str = "{text}"
    """The user message; ``{text}`` is replaced by the (truncated) input column."""
    system_prompt: str | None = None
    max_input_chars: int = Field(default=2000, ge=1)
    candidates: int = Field(default=2, ge=2, le=16)
    """Candidate answers per prompt."""
    candidate_teachers: list[str] | None = None
    """Teachers that write candidates, in turn (default: every teacher but the judge)."""
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    min_margin: float = Field(default=0.5, ge=0)
    """The least score difference between chosen and rejected (judge and verifier scores lie in 0..1)."""

    @model_validator(mode="after")
    def _teachers_exist(self) -> PreferencesConfig:
        names = [t.label for t in self.teachers]
        for name in [
            *(self.candidate_teachers or []),
            *([self.score.judge] if self.score.method == "judge" else []),
        ]:
            if name not in names:
                raise ValueError(f"no teacher named {name!r}; the recipe declares {names}")
        if "{text}" not in self.prompt_template:
            raise ValueError("'prompt_template' must contain '{text}'")
        if not self._writers():
            raise ValueError("no teacher left to write candidates: set 'candidate_teachers'")
        return self

    def _writers(self) -> list[str]:
        if self.candidate_teachers:
            return self.candidate_teachers
        return [t.label for t in self.teachers if t.label != self.score.judge]


def _normalised(text: str) -> str:
    return " ".join(text.split()).casefold()


def judge_letter(text: str | None) -> str | None:
    """A, B or T from a judge's reply (the first such standalone letter), else None."""
    match = re.search(r"\b([ABT])\b", (text or "").upper())
    return match.group(1) if match else None


def pairwise_scores(n: int, verdicts: dict[tuple[int, int], tuple[str | None, str | None]]) -> list[float]:
    """Share of wins per candidate from both-order verdicts: ``verdicts[(i, j)] = (order i-j, order j-i)``.

    In order i-j candidate i is A; in order j-i it is B. i wins only if it wins in both orders.
    """
    wins = [0.0] * n
    for (i, j), (first, second) in verdicts.items():
        i_first = first == "A"
        i_second = second == "B"
        j_first = first == "B"
        j_second = second == "A"
        if i_first and i_second:
            wins[i] += 1
        elif j_first and j_second:
            wins[j] += 1
        else:  # a tie, a split verdict (position bias) or an unreadable reply
            wins[i] += 0.5
            wins[j] += 0.5
    return [w / (n - 1) for w in wins]


class RewardModel:
    """Scores (prompt, answer) with a sequence-classification checkpoint; one forward pass at a time."""

    def __init__(self, manifest: Manifest, store: Store):
        import torch
        from transformers import AutoModelForSequenceClassification

        from manifests.models import checkpoint_path, load_tokenizer
        from manifests.verify import ensure_verified

        ensure_verified(manifest)
        require_sequence_classifier(manifest)
        self.torch = torch
        self.tokenizer = load_tokenizer(manifest)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            checkpoint_path(manifest), num_labels=1
        )
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.eval()

    def score(self, prompt: list[dict[str, str]], answers: list[str]) -> list[float]:
        texts = [
            self.tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": a}], tokenize=False)
            if self.tokenizer.chat_template
            else prompt[-1]["content"] + "\n" + a
            for a in answers
        ]
        scores = []
        with self.torch.inference_mode():
            for text in texts:  # one by one: no padding, so a score never depends on its neighbours
                batch = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
                scores.append(float(self.model(**batch).logits[0, 0]))
        return scores


class PreferencesTask(SynthTask):
    stage = "synth.preferences"
    columns = [("prompt_id", pa.string()), ("prompt", pa.list_(MESSAGE)), ("chosen", pa.list_(MESSAGE)),
               ("rejected", pa.list_(MESSAGE)), ("score_chosen", pa.float64()), ("score_rejected", pa.float64()),
               ("margin", pa.float64()), ("chosen_teacher", pa.string()), ("rejected_teacher", pa.string())]  # fmt: skip
    cfg: PreferencesConfig

    def __init__(self, cfg: PreferencesConfig, engine):
        super().__init__(cfg, engine)
        self._reward: RewardModel | None = None
        self._reward_lock = asyncio.Lock()
        if cfg.score.method == "reward_model":
            # A wrong name -- or a run that is no reward model, such as the policy's own causal LM,
            # whose score head would be random -- is an error now, not after paying for candidates.
            require_sequence_classifier(engine.store.resolve(cfg.score.reward_model, kind="run"))

    @classmethod
    def input_columns(cls, cfg: PreferencesConfig) -> list[str]:
        return ["id", cfg.prompt_column] + (
            [cfg.score.reference_column] if cfg.score.method == "verifier" else []
        )

    def _prompt(self, row: dict[str, Any]) -> list[dict[str, str]]:
        text = str(row[self.cfg.prompt_column] or "").strip()[: self.cfg.max_input_chars]
        system = [{"role": "system", "content": self.cfg.system_prompt}] if self.cfg.system_prompt else []
        return system + [{"role": "user", "content": self.cfg.prompt_template.replace("{text}", text)}]

    def first_requests(self, row: dict[str, Any]) -> list[Request]:
        prompt, writers = self._prompt(row), self.cfg._writers()
        return [self.engine.request(writers[k % len(writers)], prompt, self.cfg.sampling, k)
                for k in range(self.cfg.candidates)]  # fmt: skip

    async def run(self, row: dict[str, Any]) -> list[Output | Dropped]:
        requests = self.first_requests(row)
        prompt = requests[0].messages
        prompt_id = record_id("prompt", row["id"], canonical_json(prompt))
        answers = await self.engine.ask(requests)
        failed = [a for a in answers if not a.ok]
        if failed:
            return [Dropped(row["id"], "request_failed", {"error": failed[0].error}, answers)]
        # Identical texts are one candidate: they could only ever make a pair of equal answers.
        unique: dict[str, int] = {}
        for k, a in enumerate(answers):
            if a.content.strip():
                unique.setdefault(_normalised(a.content), k)
        keep = sorted(unique.values())
        if len(keep) < 2:
            return [Dropped(row["id"], "too_few_distinct_candidates", {"distinct": len(keep)}, answers)]
        candidates = [answers[k] for k in keep]
        scores, detail, judged = await self._score(row, prompt, candidates)
        best = max(range(len(candidates)), key=lambda i: (scores[i], -i))
        worst = min(range(len(candidates)), key=lambda i: (scores[i], i))
        verdict = canonical_json({"method": self.cfg.score.method, "scores": scores, **detail})
        margin = scores[best] - scores[worst]
        if best == worst or margin < self.cfg.min_margin or margin <= 0:
            return [Dropped(row["id"], "no_margin", {"scores": scores, "min_margin": self.cfg.min_margin},
                            answers + judged)]  # fmt: skip
        chosen, rejected = candidates[best], candidates[worst]
        columns = {"prompt_id": prompt_id, "prompt": prompt,
                   "chosen": [{"role": "assistant", "content": chosen.content}],
                   "rejected": [{"role": "assistant", "content": rejected.content}],
                   "score_chosen": scores[best], "score_rejected": scores[worst], "margin": margin,
                   "chosen_teacher": chosen.teacher, "rejected_teacher": rejected.teacher}  # fmt: skip
        return [Output(columns, answers + judged, [row["id"]], group=prompt_id, verdict=verdict)]

    async def _score(
        self, row: dict[str, Any], prompt: list[dict[str, str]], candidates: list[Answer]
    ) -> tuple[list[float], dict[str, Any], list[Answer]]:
        method = self.cfg.score.method
        if method == "judge":
            return await self._judge(prompt, candidates)
        if method == "verifier":
            from synth.verify import verify

            reference = row[self.cfg.score.reference_column]
            verdicts = [verify(a.content, reference, self.cfg.score.verifier) for a in candidates]
            return (
                [1.0 if v.passed else 0.0 for v in verdicts],
                {"verified": [v.passed for v in verdicts]},
                [],
            )
        async with self._reward_lock:  # one model, loaded once, used by one row at a time
            if self._reward is None:
                store = self.engine.store
                self._reward = await asyncio.to_thread(
                    RewardModel, store.resolve(self.cfg.score.reward_model, kind="run"), store
                )
            scores = await asyncio.to_thread(self._reward.score, prompt, [a.content for a in candidates])
        return scores, {}, []

    async def _judge(
        self, prompt: list[dict[str, str]], candidates: list[Answer]
    ) -> tuple[list[float], dict[str, Any], list[Answer]]:
        score = self.cfg.score
        asked = prompt[-1]["content"]
        pairs = list(itertools.combinations(range(len(candidates)), 2))
        requests = []
        for i, j in pairs:
            for a, b in ((i, j), (j, i)):
                text = fill(
                    score.judge_template, prompt=asked, a=candidates[a].content, b=candidates[b].content
                )
                requests.append(
                    self.engine.request(
                        score.judge, [{"role": "user", "content": text}], score.judge_sampling
                    )
                )
        replies = await self.engine.ask(requests)
        letters = [judge_letter(r.content) if r.ok else None for r in replies]
        verdicts = {pair: (letters[2 * n], letters[2 * n + 1]) for n, pair in enumerate(pairs)}
        split = sum(1 for first, second in verdicts.values() if first and second and first != "T"
                    and first == second)  # fmt: skip
        detail = {
            "comparisons": {f"{i}-{j}": list(v) for (i, j), v in verdicts.items()},
            "position_bias_splits": split,
        }
        return pairwise_scores(len(candidates), verdicts), detail, replies


def preferences(cfg: PreferencesConfig, store: Store) -> Manifest:
    return run_synth(PreferencesTask, cfg, store)


def run_recipe(data: dict[str, Any], store: Store, source: str) -> Manifest:
    from manifests.recipes import parse_config

    return preferences(parse_config(PreferencesConfig, data, source), store)
