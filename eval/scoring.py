"""How each metric is computed for one model on one task, into per-sample statistics (``Scored``),
and what the stage shares while it runs: the progress bar and the teacher engines of endpoints and judges.

``eval/run.py`` calls these in order for every task and model, then aggregates, records and publishes.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from eval.judge import JudgeConfig, question_of, win_rates
from eval.metrics import TextScorers, mean_stats, pass_at_k
from eval.models import RunModel
from eval.tasks import Sample, TaskConfig, answer_text
from manifests.store import Store
from synth.teacher_requests import BudgetConfig, TeacherConfig

# --------------------------------------------------------------------------------------- progress


class SamplesPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        # Completed over elapsed, not rich's windowed speed: a batch of generation advances many at once.
        speed = task.completed / task.elapsed if task.elapsed and task.completed else None
        return Text(f"{speed:.2f} samples/s" if speed else "– samples/s", style="progress.data.speed")


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), SamplesPerSecond(),
                    TimeRemainingColumn())  # fmt: skip


# ------------------------------------------------------------------------------------ engines


@dataclass
class Engines:
    """One teacher engine per use (an endpoint model's answers, a judge's verdicts), all on the synth
    cache, sharing one budget: each starts with what the ones before left."""

    store: Store
    budget: BudgetConfig
    spent_cost: float = 0.0
    spent_tokens: int = 0
    requests: dict[str, int] = field(
        default_factory=lambda: {"sent": 0, "answered": 0, "cache_hits": 0, "failed": 0}
    )

    def factory(self, teacher: TeacherConfig):
        from synth.cache import RequestCache
        from synth.engine import TeacherEngine
        from synth.runner import CACHE_FILE

        @asynccontextmanager
        async def session():
            left = BudgetConfig(
                max_cost=None
                if self.budget.max_cost is None
                else max(self.budget.max_cost - self.spent_cost, 0.0),
                max_tokens=None
                if self.budget.max_tokens is None
                else max(self.budget.max_tokens - self.spent_tokens, 1),
            )
            cache = RequestCache(self.store.root / CACHE_FILE)
            try:
                async with TeacherEngine([teacher], cache, self.store, left) as engine:
                    try:
                        yield engine
                    finally:
                        usage = engine.usage
                        self.spent_cost += usage.cost
                        self.spent_tokens += usage.prompt_tokens + usage.completion_tokens
                        for key in self.requests:
                            self.requests[key] += getattr(usage, key)
            finally:
                cache.close()

        return session


# --------------------------------------------------------------------------------------- scoring


@dataclass
class Scored:
    """One model's results on one task: per metric the statistics rows and shown values."""

    outputs: list[list[str]] = field(default_factory=list)
    extracted: list[list[str | None]] = field(default_factory=list)
    stats: dict[str, np.ndarray] = field(default_factory=dict)
    values: dict[str, list[float | None]] = field(default_factory=dict)
    detail: dict[str, list[Any]] = field(default_factory=dict)

    def put(self, metric: str, rows: list[tuple[list[float], float | None]]) -> None:
        self.stats[metric] = np.asarray([r[0] for r in rows], dtype=np.float64)
        self.values[metric] = [r[1] for r in rows]


def verifier_for(task: TaskConfig, method: str):
    from synth.verify import Verifier

    return Verifier(method, task.verifier.extract, task.verifier.pattern)  # checked when the recipe was read


def score_generation(task: TaskConfig, samples: list[Sample], scored: Scored, texts: TextScorers) -> None:
    """Every generation metric of the task, from the outputs already in ``scored``. Each output is
    extracted and checked once per verifier method (a ``tests`` check is a sandboxed process)."""
    metrics = [m for m in task.metric_list if m.needs == "generation"]
    verdicts: dict[str, list[list[bool]]] = {}

    def passed(method: str) -> list[list[bool]]:
        if method not in verdicts:
            check = verifier_for(task, method)
            verdicts[method] = [
                [check(output, s.target, s.row.get(task.tests)).passed for output in outputs]
                for s, outputs in zip(samples, scored.outputs, strict=True)
            ]
        return verdicts[method]

    extract = verifier_for(
        task, next((m.verifier_method for m in metrics if m.verifier_method), task.verifier.method)
    )
    scored.extracted = [[extract.answer_of(o) for o in outs] for outs in scored.outputs]
    for m in metrics:
        if m.verifier_method:
            rows = [(mean_stats(right[0]), float(right[0])) for right in passed(m.verifier_method)]
        elif m.k:
            values = [pass_at_k(len(right), sum(right), m.k) for right in passed(task.verifier.method)]
            rows = [(mean_stats(v), v) for v in values]
        else:
            rows = [
                texts.text_metric(m.name, outs[0], s.target or "")
                for s, outs in zip(samples, scored.outputs, strict=True)
            ]
        scored.put(m.name, rows)


def score_perplexity(model, task: TaskConfig, samples: list[Sample], scored: Scored, advance) -> None:
    per = model.nll([s.conversation() for s in samples], task.max_length, task.generation.batch_size,
                    [s.id for s in samples], advance)  # fmt: skip
    scored.put(
        "perplexity",
        [([nll, tokens], float(np.exp(nll / tokens)) if tokens else None) for nll, tokens in per],
    )


def score_rewards(model: RunModel, samples: list[Sample], scored: Scored, advance) -> None:
    from synth.preferences import RewardModel

    reward = RewardModel(model.manifest, model.store)
    rows = []
    for s in samples:
        chosen, rejected = reward.score(
            s.prompt, [answer_text(s.row["chosen"]), answer_text(s.row["rejected"])]
        )
        value = 1.0 if chosen > rejected else 0.5 if chosen == rejected else 0.0
        rows.append((mean_stats(value), value))
        advance(1)
    scored.put("reward_accuracy", rows)


def score_agreement(model: RunModel, teacher: RunModel, task: TaskConfig, samples: list[Sample], scored: Scored,
                       advance) -> None:  # fmt: skip
    from eval.agreement import agreement

    student, tokenizer = model.loaded()  # the same tokenizer as the teacher's: checked before any work
    teacher_model, _ = teacher.loaded()
    per = agreement(student, teacher_model, tokenizer, [s.conversation() for s in samples], task.max_length,
                    task.generation.batch_size, [s.id for s in samples], advance)  # fmt: skip
    scored.put("top1_agreement", [([a, t], a / t if t else None) for a, _, t in per])
    scored.put("kl_teacher_student", [([kl, t], kl / t if t else None) for _, kl, t in per])


def score_judge(judge: JudgeConfig, task: TaskConfig, samples: list[Sample], results: dict[str, Scored],
                engines: Engines) -> None:  # fmt: skip
    """``win_rate`` of every model of the task (but the one compared against), in one engine session:
    a judge served from the store loads once."""
    label = f"judge:{judge.teacher.label}"
    teacher = judge.teacher.model_copy(update={"name": label})
    if judge.against == "reference":
        others = [s.target or "" for s in samples]
    else:
        others = [o[0] for o in results[judge.against].outputs]
    judged = [name for name in results if name != judge.against]
    questions = [question_of(s.prompt) for s in samples]
    scores, letters = win_rates(engines.factory(teacher), judge, label, questions * len(judged),
                                [o[0] for name in judged for o in results[name].outputs], others * len(judged))  # fmt: skip
    for k, name in enumerate(judged):
        part = slice(k * len(samples), (k + 1) * len(samples))
        results[name].put("win_rate", [(mean_stats(v), v) for v in scores[part]])
        results[name].detail["judge_letters"] = letters[part]
