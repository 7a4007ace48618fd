"""Tasks: a dataset reference, how the model is asked, and the metrics — a recipe entry each.

    tasks:
      - name: answers
        dataset: {ref: demo-sft, split: test}        # a dataset in the store
        metrics: [perplexity, rougeL, chrf]          # chat rows: the last assistant turn is the target
        generation: {max_new_tokens: 48}
      - name: arithmetic
        dataset: {ref: math-questions, split: test}
        prompt: question                             # a text column (a user turn) or a chat column
        target: answer
        system: "Answer with 'Final answer: <number>'."
        fewshot: {split: train, n: 3}
        generation: {n: 4, temperature: 0.7, max_new_tokens: 256, stop: ["\\n\\nQuestion:"]}
        verifier: {extract: final_line}
        metrics: [numeric, pass@1, pass@4]

Which columns a row gives: ``prompt`` (default: ``messages`` up to its last assistant turn, else a
``prompt``/``question``/``instruction`` column), ``target`` (default: that last assistant turn, else
``reference``/``answer``/``target``/``completion``), ``tests`` for ``unit_tests``, and ``chosen`` /
``rejected`` for ``reward_accuracy``. A sample's id is the dataset row's ``id``, so every result
traces to its record.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import Field, StringConstraints, field_validator, model_validator

from eval.metrics import Metric, metric_named
from manifests.data import column_names, read_table, require_columns
from manifests.errors import DistilleryError
from manifests.recipes import RecipeConfig
from manifests.schema import Manifest

PROMPT_COLUMNS = ("prompt", "question", "instruction", "input")
TARGET_COLUMNS = ("reference", "answer", "target", "completion", "output")


class TaskData(RecipeConfig):
    ref: str
    """Dataset reference (``name``, ``name@id-prefix`` or a path)."""
    split: str = "test"


class FewShot(RecipeConfig):
    """Examples placed before each prompt as earlier user/assistant turns, from another split."""

    split: str = "train"
    n: int = Field(default=0, ge=0)
    seed: int = 0


class Generation(RecipeConfig):
    """How answers are generated (greedy at ``temperature: 0``)."""

    max_new_tokens: int = Field(default=128, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    """Answers per prompt (``pass@k`` needs k ≤ n; sampled answers need ``temperature`` > 0)."""
    stop: list[Annotated[str, StringConstraints(min_length=1)]] = Field(default_factory=list)
    """An answer ends before the first of these strings."""
    seed: int = 0
    """Sample ``i`` of a prompt is drawn with seed ``seed + i``."""
    batch_size: int = Field(default=8, ge=1)


class VerifierSettings(RecipeConfig):
    """How an answer is extracted for ``exact_match``, ``numeric``, ``math``, ``regex``, ``unit_tests``,
    ``pass@k`` (the extraction of ``synth/verify.py``)."""

    extract: str = "auto"
    """auto, final_line, boxed, last_number, regex, code."""
    pattern: str | None = None
    """With ``extract: regex``."""
    method: str = "exact"
    """The check behind ``pass@k``: exact, numeric, math, regex or tests."""

    @model_validator(mode="after")
    def _valid(self) -> VerifierSettings:
        import re

        from synth.verify import Verifier

        Verifier(self.method, self.extract, self.pattern)  # an unknown method or extraction: its ValueError
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"'pattern' is not a regular expression: {e}") from None
        return self


class TaskConfig(RecipeConfig):
    """One task of an eval."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    dataset: TaskData
    metrics: list[str] = Field(min_length=1)
    """perplexity, exact_match, numeric, math, regex, unit_tests, pass@k, bleu, chrf, rouge1, rouge2,
    rougeL, reward_accuracy, win_rate, top1_agreement, kl_teacher_student."""
    prompt: str | None = None
    """The column the model is asked from: text (a user turn) or a chat (a list of messages)."""
    target: str | None = None
    """The column holding the reference answer."""
    tests: str = "tests"
    """The column of unit tests (asserts) for ``unit_tests``."""
    system: str | None = None
    """A system message put before every prompt."""
    chat_template: bool = True
    """Ask through the tokenizer's chat template; ``false``: the prompt text is continued as is."""
    fewshot: FewShot = Field(default_factory=FewShot)
    generation: Generation = Field(default_factory=Generation)
    verifier: VerifierSettings = Field(default_factory=VerifierSettings)
    limit: int | None = Field(default=None, ge=1)
    """Score only the first ``limit`` rows (in id order)."""
    max_length: int = Field(default=1024, ge=8)
    """Tokens per chat at most for perplexity and teacher agreement (longer chats are cut)."""
    teacher: str | None = None
    """With ``top1_agreement`` / ``kl_teacher_student``: the teacher run (same tokenizer)."""
    models: list[str] | None = Field(default=None, min_length=1)
    """Labels of the eval's models this task runs on (default: all), e.g. only the reward models."""

    @field_validator("metrics")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        for name in v:
            metric_named(name)
        if len(set(v)) != len(v):
            raise ValueError(f"a metric is listed twice in {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TaskConfig:
        for m in self.metric_list:
            if m.k > self.generation.n:
                raise ValueError(
                    f"{m.name} needs k ≤ n answers per prompt, but generation.n is {self.generation.n}; "
                    f"set 'generation: {{n: {m.k}, temperature: 0.8}}' or lower k"
                )
            if m.needs == "teacher" and not self.teacher:
                raise ValueError(f"{m.name} needs 'teacher': the teacher run to compare against")
        if self.generation.n > 1 and self.generation.temperature == 0:
            raise ValueError(
                "generation.n > 1 with temperature 0 gives n copies of one answer; set a temperature"
            )
        return self

    @property
    def metric_list(self) -> list[Metric]:
        return [metric_named(m) for m in self.metrics]

    @property
    def primary(self) -> Metric:
        """The metric that says whether a sample is right (``correct``, flips, failures to explain): the
        first right-or-wrong metric listed, else the first."""
        return next((m for m in self.metric_list if m.binary), self.metric_list[0])

    def needs(self, what: str) -> bool:
        return any(m.needs == what for m in self.metric_list)


@dataclass
class Sample:
    id: str
    prompt: list[dict[str, str]]
    """The chat the model answers (few-shot turns and system message included)."""
    target: str | None
    row: dict[str, Any] = field(default_factory=dict)
    """The other columns a metric may need (tests, chosen, rejected)."""
    shots: int = 0
    """Messages of ``prompt`` that are few-shot examples (after the system message, if any)."""

    def own_prompt(self) -> list[dict[str, str]]:
        """The prompt without its few-shot examples: the sample's own turns (and the system message)."""
        start = 1 if self.prompt and self.prompt[0]["role"] == "system" else 0
        return [*self.prompt[:start], *self.prompt[start + self.shots :]]

    def conversation(self) -> list[dict[str, str]]:
        """The sample's own turns, then the target as the assistant's answer: what perplexity and
        teacher agreement score (every assistant turn of it, so not the examples')."""
        return [*self.own_prompt(), {"role": "assistant", "content": self.target or ""}]


def answer_text(value: Any) -> str:
    """An answer column's text: a string as is; a chat (as ``synth preferences`` writes ``chosen`` and
    ``rejected``) by its last assistant turn."""
    if isinstance(value, list):
        turns = [m for m in value if isinstance(m, dict) and m.get("role") == "assistant"]
        return str((turns or [{}])[-1].get("content") or "")
    return "" if value is None else str(value)


def _as_chat(value: Any, column: str, row_id: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value):
        return [{"role": m["role"], "content": m.get("content") or ""} for m in value]
    raise DistilleryError(
        f"row {row_id}: column {column!r} holds neither text nor a chat (a list of messages)"
    )


def _split_chat(messages: list[dict], row_id: str) -> tuple[list[dict[str, str]], str]:
    chat = _as_chat(messages, "messages", row_id)
    last = max((i for i, m in enumerate(chat) if m["role"] == "assistant"), default=None)
    if last is None:
        raise DistilleryError(f"row {row_id}: 'messages' has no assistant turn to take as the target")
    return chat[:last], chat[last]["content"]


def task_columns(task: TaskConfig, data: Manifest) -> tuple[list[str], str | None, str | None]:
    """(columns to read, prompt column, target column) — a missing column is one error line."""
    names = set(column_names(data))
    prompt = task.prompt or (
        "messages" if "messages" in names else next((c for c in PROMPT_COLUMNS if c in names), None)
    )
    target = task.target
    if target is None and prompt != "messages":
        target = next((c for c in TARGET_COLUMNS if c in names), None)
    needed = ["id"]
    if prompt is None:
        raise DistilleryError(
            f"task {task.name}: dataset {data.ref} has no prompt column ({', '.join(('messages', *PROMPT_COLUMNS))}); "
            "name one with 'prompt:'"
        )
    needed.append(prompt)
    if target:
        needed.append(target)
    if any(m.verifier_method == "tests" for m in task.metric_list) or task.verifier.method == "tests":
        needed.append(task.tests)
    if task.needs("reward"):
        needed += ["chosen", "rejected"]
    require_columns(data, needed, f"task {task.name}")
    return list(dict.fromkeys(needed)), prompt, target


def _fewshot_turns(task: TaskConfig, data: Manifest, prompt: str, target: str | None) -> list[dict[str, str]]:
    if task.fewshot.n == 0:
        return []
    if task.fewshot.split == task.dataset.split:
        raise DistilleryError(
            f"task {task.name}: few-shot examples come from the split being scored ({task.fewshot.split}); "
            "take them from another split ('fewshot: {split: train}')"
        )
    columns = [c for c in dict.fromkeys(["id", prompt, target]) if c]
    rows = read_table(data, split=task.fewshot.split, columns=columns).to_pylist()
    rows.sort(key=lambda r: r["id"])
    chosen = random.Random(task.fewshot.seed).sample(rows, min(task.fewshot.n, len(rows)))
    turns: list[dict[str, str]] = []
    for r in chosen:
        question, answer = _prompt_and_target(r, prompt, target)
        # An example's own system message would land mid-chat, which many chat templates refuse.
        turns += [
            *(m for m in question if m["role"] != "system"),
            {"role": "assistant", "content": answer or ""},
        ]
    return turns


def _prompt_and_target(
    row: dict[str, Any], prompt: str, target: str | None
) -> tuple[list[dict[str, str]], str | None]:
    if prompt == "messages" and target is None:
        return _split_chat(row["messages"], row["id"])
    chat = _as_chat(row[prompt], prompt, row["id"])
    value = row.get(target) if target else None
    return chat, (None if value is None else answer_text(value))


def load_samples(task: TaskConfig, data: Manifest) -> list[Sample]:
    """The task's samples in id order, each prompt with the system message and few-shot turns."""
    columns, prompt, target = task_columns(task, data)
    table = read_table(data, split=task.dataset.split, columns=columns)
    rows = sorted(table.to_pylist(), key=lambda r: r["id"])
    if task.limit:
        rows = rows[: task.limit]
    if not rows:
        raise DistilleryError(f"task {task.name}: split {task.dataset.split!r} of {data.ref} has no rows")
    shots = _fewshot_turns(task, data, prompt, target)
    samples = []
    for r in rows:
        chat, answer = _prompt_and_target(r, prompt, target)
        # One system message, first: the task's, else the row's own; then the examples, then the row.
        own = [m for m in chat if m["role"] == "system"][:1]
        system = [{"role": "system", "content": task.system}] if task.system else own
        chat = [m for m in chat if m["role"] != "system"]
        extra = {c: r[c] for c in columns if c not in ("id", prompt, target)}
        samples.append(Sample(str(r["id"]), [*system, *shots, *chat], answer, extra, len(shots)))
    needs_target = [m.name for m in task.metric_list if _needs_reference(task, m)]
    missing = [s.id for s in samples if s.target is None]
    if needs_target and missing:
        where = f"column {target!r} is empty in {len(missing)} rows (e.g. {missing[0]})" if target else (
            f"{data.ref} has no target column ({', '.join(TARGET_COLUMNS)}); name one with 'target:'"
        )  # fmt: skip
        raise DistilleryError(
            f"task {task.name}: {', '.join(needs_target)} need a reference answer, and {where}"
        )
    return samples


def _needs_reference(task: TaskConfig, m: Metric) -> bool:
    if m.verifier_method:
        return m.verifier_method != "tests"
    if m.k:
        return task.verifier.method != "tests"
    return m.needs in ("generation", "loglikelihood", "teacher")
