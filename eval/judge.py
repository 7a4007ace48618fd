"""Win rate by an LLM judge, through the teacher engine (cached and budgeted like any synth request).

    - name: helpfulness
      dataset: {ref: demo-sft, split: test}
      metrics: [win_rate]
      judge:
        teacher: {serve: smollm2-135m-instruct}    # or {base_url: …, model: …, api_key_env: …}
        against: reference                        # the dataset's answer, or another model of this eval

Every comparison is asked twice, with the answers in both orders (position bias is the best known
flaw of LLM judges): a sample is a win (1) only if the judge prefers the model's answer both times, a
loss (0) only if it prefers the other both times, and a tie (½) otherwise — a split verdict, a "T",
or an unreadable reply. The judge's prompt and reply letters are those of ``synth preferences``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from eval.models import ask_through_engine
from manifests.recipes import RecipeConfig
from synth.preferences import JUDGE_TEMPLATE, judge_letter
from synth.runner import fill
from synth.teacher_requests import SamplingConfig, TeacherConfig


class JudgeConfig(RecipeConfig):
    """The judge of ``win_rate`` and what the model's answers are compared with."""

    teacher: TeacherConfig
    against: str = "reference"
    """``reference`` (the task's target answers) or the label of another model of this eval."""
    template: str = JUDGE_TEMPLATE
    """Has ``{prompt}``, ``{a}`` and ``{b}``; the judge must answer A, B or T."""
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(max_tokens=4, temperature=0.0))

    @model_validator(mode="after")
    def _template_fields(self) -> JudgeConfig:
        for name in ("{prompt}", "{a}", "{b}"):
            if name not in self.template:
                raise ValueError(f"'template' must contain {name} (the request, answer A and answer B)")
        return self


def verdict(first: str | None, second: str | None) -> float:
    """The model's score from (order model-first, order other-first) letters: 1 win, 0 loss, ½ else."""
    if first == "A" and second == "B":
        return 1.0
    if first == "B" and second == "A":
        return 0.0
    return 0.5


def win_rates(engine_factory, judge: JudgeConfig, judge_label: str, questions: list[str], answers: list[str],
              others: list[str]) -> tuple[list[float], list[list[str | None]]]:  # fmt: skip
    """Per sample: the score of ``answers`` against ``others`` and the two letters the judge gave."""

    def requests(engine) -> list[Any]:
        out = []
        for q, mine, theirs in zip(questions, answers, others, strict=True):
            for a, b in ((mine, theirs), (theirs, mine)):
                text = fill(judge.template, prompt=q, a=a, b=b)
                out.append(engine.request(judge_label, [{"role": "user", "content": text}], judge.sampling))
        return out

    replies = ask_through_engine(engine_factory, requests, f"judge {judge_label}")
    letters = [judge_letter(r.content) for r in replies]
    pairs = [[letters[2 * i], letters[2 * i + 1]] for i in range(len(questions))]
    return [verdict(a, b) for a, b in pairs], pairs


def question_of(prompt: list[dict[str, Any]]) -> str:
    """What the judge is shown as the request: the last user turn."""
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
