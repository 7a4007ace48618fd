"""``synth.augment``: more instructions from a few -- paraphrases, Evol-Instruct, Self-Instruct.

    stage: synth.augment
    name: seed-evolved
    input: seed-instructions
    prompt_column: text                   # or a conversation column (messages): its first user turn
    teachers: [{model: gpt-4o-mini, base_url: https://api.openai.com/v1, api_key_env: OPENAI_API_KEY}]
    sampling: {temperature: 0.7, max_tokens: 256}
    method: {type: evol_instruct, rounds: 3, information_gain: teacher}
    answer: true                          # the teacher also answers each new instruction: SFT-ready messages

- **paraphrase**: ``n`` rewordings of each instruction (sample ``k`` with seed + k); a rewording equal
  to its source or to an earlier one (after case, punctuation and spacing are folded) is dropped.
- **evol_instruct** (WizardLM, Xu et al. 2023): ``rounds`` evolutions of each instruction, each a
  mutation drawn from a generator seeded by (seed, row id, round): in depth (add constraints,
  deepen, concretize, more reasoning steps, complicate the input) or in breadth (a new instruction
  in the same domain). As in the paper an evolution is eliminated -- to the ledger, and the next
  round evolves the last surviving instruction -- when it (1) brings no information gain over its
  parent (a teacher answers yes/no, or a heuristic: no new content word), (2) makes the teacher fail
  (an empty or refusing evolution; with ``answer``, an empty, short, or "sorry"-and-short answer),
  (3) copies words of the evolving prompt ("#Rewritten Prompt#"…), or (4) is only punctuation and
  stop words. Every surviving round is a row: the paper trains on all of them.
- **self_instruct** (Wang et al. 2022): the input rows are the seed pool; each round sends
  ``requests_per_round`` requests at once, each showing ``examples`` pool instructions (at most
  ``machine_examples`` of them generated ones) drawn by a seeded generator, and parses the numbered
  new instructions of the answers. One is kept only if its ROUGE-L F-measure against every
  instruction in the pool stays below ``rouge_threshold`` (0.7 in the paper) and it passes the
  paper's length and keyword filters; kept ones join the pool at once. Rounds run until
  ``target_size`` new instructions or ``max_rounds``. Everything is decided from the seed and the
  answers, so a rerun from the cache rebuilds the same dataset without a request.

An output row (evol_instruct with ``answer: true``; ``requests`` is the lineage, see ``synth/runner.py``)::

    {"id": "…", "parents": ["c0ffee…"], "source": null, "method": "evol_instruct",
     "prompt": "Explain … in three steps, …",
     "teacher": "gpt-4o-mini", "original": "Explain …", "evolved_from": "Explain …", "round": 2,
     "mutation": "reasoning", "mutations": ["constraints", "reasoning"],
     "messages": [{"role": "user", "content": "Explain …"}, {"role": "assistant", "content": "…"}], …}

``original`` is the input instruction a row was made from. (``source`` is the lineage column every
synth row has: for an input read from a JSONL/Parquet file, the file and line; see ``synth/runner.py``.)
Self-Instruct rows name the in-context examples: ``parents`` are those from the input dataset,
``examples`` all of them (input ids and ids of earlier rows of this dataset).
"""

from __future__ import annotations

import random
import re
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from manifests.console import make_console
from manifests.hashing import canonical_json, record_id
from manifests.recipes import RecipeConfig
from manifests.schema import Manifest
from manifests.store import Store
from synth.engine import Answer, Request, SamplingConfig
from synth.rouge import RougeLIndex, tokens
from synth.runner import MESSAGE, Dropped, Output, SynthConfig, SynthTask, fill, row_id, run_synth

PARAPHRASE_TEMPLATE = """Reword the instruction below. Keep its meaning and everything it asks for, but \
change the wording and the sentence structure. Reply with the reworded instruction only.

Instruction: {instruction}"""

DEPTH_TEMPLATE = """You rewrite prompts to make them harder. Turn the prompt below into a more demanding \
version: one that a strong AI assistant would find somewhat harder to answer, yet still sensible, \
self-contained and answerable by a person. Keep every non-text part of the prompt (tables, code, \
formulas) as it is. {how}
The rewrite may be at most 20 words longer than the prompt. Reply with the rewritten prompt alone, \
without labels such as '#Given Prompt#' or '#Rewritten Prompt#'.

#Given Prompt#:
{instruction}

#Rewritten Prompt#:
"""

BREADTH_TEMPLATE = """You write new prompts. Taking the prompt below as inspiration, write a brand-new \
prompt in the same domain but on a rarer, more specific topic. It should be about as long and as hard \
as the given one, sensible, self-contained and answerable by a person. Reply with the new prompt alone, \
without labels such as '#Given Prompt#' or '#Created Prompt#'.

#Given Prompt#:
{instruction}

#Created Prompt#:
"""

HOW = {
    "constraints": "Add one more constraint or requirement that the answer has to meet.",
    "deepen": "Where the prompt asks about a matter, ask about it in more depth and breadth.",
    "concretize": "Replace general concepts with more specific ones.",
    "reasoning": "If the prompt can be solved in a few simple steps, make it ask explicitly for "
    "reasoning in several steps.",
    "complicate_input": "Add input the answer has to work with -- a short table, a code snippet, a JSON "
    "object or a formula -- and make the prompt refer to it.",
}
Mutation = Literal["constraints", "deepen", "concretize", "reasoning", "complicate_input", "breadth"]
MUTATIONS: list[Mutation] = [*HOW, "breadth"]  # type: ignore[list-item]

GAIN_TEMPLATE = """Here are two instructions. Does the second one ask for anything the first does not -- \
an added requirement or constraint, more depth, more steps, more specific content, or a different topic?
Answer yes or no.

First instruction:
{parent}

Second instruction:
{evolved}"""

SELF_INSTRUCT_TEMPLATE = """Come up with a list of diverse tasks. Each task is one instruction a person \
could give an AI assistant that reads and writes text only.
- Vary the verbs, the topics and the kinds of task: open questions, writing, classification, editing, \
advice, reasoning and more.
- Each instruction is self-contained, one or two sentences long, and asks for something a text-only \
assistant can do (no images, audio, files or web browsing).

Here are some tasks:
{examples}

Continue the list with {n} new tasks, numbered from {next}, one per line."""

LEAKS = ("given prompt", "rewritten prompt", "created prompt")
"""The paper's rule 3: words of the evolving prompt that leaked into the evolution."""
REFUSAL = re.compile(r"\b(sorry|apologi[sz]e|i can ?not|i can[’']t|i(?: am|'m|’m) unable|as an ai)\b", re.I)
_STOP = (
    "a about above after again against all am an and any are as at be because been before being below "
    "between both but by can could did do does doing down during each few for from further had has have "
    "having he her here hers herself him himself his how i if in into is it its itself just me more most "
    "my myself no nor not now of off on once only or other our ours ourselves out over own same she "
    "should so some such than that the their theirs them themselves then there these they this those "
    "through to too under until up very was we were what when where which while who whom why will with "
    "would you your yours yourself yourselves"
)  # fmt: skip
STOP_WORDS = frozenset(_STOP.split())
BANNED = ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
          "plot", "go to", "video", "audio", "music", "flowchart", "diagram"]  # fmt: skip
"""Self-Instruct's keyword filter: tasks a text-only model cannot do."""
NUMBERED = re.compile(r"^\s*(\d+)\s*[.)]\s*(.*)$")


class ParaphraseMethod(RecipeConfig):
    """``n`` rewordings of each instruction."""

    type: Literal["paraphrase"]
    n: int = Field(default=3, ge=1, le=64)
    """Paraphrases asked for per instruction (sample ``k`` is sent with seed + k)."""
    template: str = PARAPHRASE_TEMPLATE
    """The request; ``{instruction}`` is replaced by the instruction."""
    keep_answer: bool = False
    """With a conversation column: output it with its first user turn replaced by the paraphrase
    (its answer kept) as ``messages``, SFT-ready without asking the teacher again."""


class EvolInstructMethod(RecipeConfig):
    """Evol-Instruct: instructions made harder (in depth) or new (in breadth), round by round."""

    type: Literal["evol_instruct"]
    rounds: int = Field(default=3, ge=1, le=16)
    mutations: list[Mutation] = Field(default_factory=lambda: list(MUTATIONS), min_length=1)
    """The mutations drawn from, uniformly."""
    information_gain: Literal["teacher", "heuristic", "off"] = "teacher"
    """Elimination rule 1: a ``teacher`` (the ``judge``) answers yes/no; ``heuristic``: the evolution
    must have a content word its parent lacks (free, cruder); ``off``: only identical ones are dropped."""
    judge: str | None = None
    """The teacher asked about information gain (default: ``teacher``)."""
    judge_sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(max_tokens=8, temperature=0.0)
    )


class SelfInstructMethod(RecipeConfig):
    """Self-Instruct: grow a pool of instructions from the seed pool, keeping only novel ones."""

    type: Literal["self_instruct"]
    target_size: int = Field(default=100, ge=1)
    """New instructions to make (the seeds are neither counted nor output)."""
    max_rounds: int = Field(default=50, ge=1)
    requests_per_round: int = Field(default=8, ge=1)
    """Requests sent at once in a round (each shows its own sample of examples)."""
    examples: int = Field(default=8, ge=1)
    """In-context examples per request (8 in the paper)."""
    machine_examples: int = Field(default=2, ge=0)
    """Of those, at most this many generated ones once there are some (2 in the paper)."""
    new_per_request: int = Field(default=8, ge=1)
    """New instructions asked for per request."""
    rouge_threshold: float = Field(default=0.7, gt=0, le=1)
    """A new instruction is kept only if its ROUGE-L F-measure with every pool instruction is below this."""
    min_words: int = Field(default=3, ge=1)
    max_words: int = Field(default=150, ge=1)
    banned_words: list[str] = Field(default_factory=lambda: list(BANNED))
    """Instructions naming any of these (whole words, any case) are dropped."""
    template: str = SELF_INSTRUCT_TEMPLATE
    """Has ``{examples}`` (a numbered list), ``{n}`` and ``{next}`` (the first new number)."""

    @model_validator(mode="after")
    def _consistent(self) -> SelfInstructMethod:
        if self.machine_examples > self.examples:
            raise ValueError("'machine_examples' cannot exceed 'examples'")
        if "{examples}" not in self.template:
            raise ValueError("'template' must contain '{examples}'")
        return self


class AugmentConfig(SynthConfig):
    """New instructions from a dataset of instructions: paraphrase, evol_instruct or self_instruct."""

    prompt_column: str = "text"
    """The input column holding the instruction: text, or a conversation (its first user turn)."""
    method: Annotated[ParaphraseMethod | EvolInstructMethod | SelfInstructMethod, Field(discriminator="type")]
    teacher: str | None = None
    """The teacher that writes (default: the first one)."""
    answer: bool = False
    """Also have the teacher answer every new instruction: rows get ``messages`` (user, assistant)."""
    answer_sampling: SamplingConfig | None = None
    """Sampling of the answers (default: ``sampling``)."""
    min_answer_words: int = Field(default=1, ge=1)
    """An answer with fewer words fails (elimination rule 2)."""
    refusal_max_words: int = Field(default=80, ge=1)
    """An answer with refusal words ("sorry", "I cannot"…) and fewer words than this fails (the paper: 80)."""
    seed: int = 0
    """Seeds the split assignment, the mutation draws and the choice of in-context examples."""

    @model_validator(mode="after")
    def _teachers_exist(self) -> AugmentConfig:
        names = [t.label for t in self.teachers]
        judge = self.method.judge if isinstance(self.method, EvolInstructMethod) else None
        for name in (self.teacher, judge):
            if name is not None and name not in names:
                raise ValueError(f"no teacher named {name!r}; the recipe declares {names}")
        if isinstance(self.method, ParaphraseMethod):
            if self.method.keep_answer and self.answer:
                raise ValueError("give 'method.keep_answer' or 'answer', not both")
            if "{instruction}" not in self.method.template:
                raise ValueError("'method.template' must contain '{instruction}'")
        return self


def instruction_of(value: Any) -> str:
    """The instruction in an input cell: the text, or a conversation's first user turn."""
    if isinstance(value, list):
        return next((str(m.get("content") or "") for m in value if m.get("role") == "user"), "").strip()
    return str(value or "").strip()


def normalised(text: str) -> str:
    return " ".join(tokens(text))


def cleaned(text: str | None) -> str:
    return (text or "").strip().strip("\"'“”").strip()


def content_words(text: str) -> set[str]:
    return {t for t in tokens(text) if t not in STOP_WORDS}


def failure(text: str, min_words: int, refusal_max_words: int) -> str | None:
    """Why an answer fails the paper's rule 2 (``empty``, ``refusal``, ``short``), or None."""
    words = len(text.split())
    if not words:
        return "empty"
    if words < refusal_max_words and REFUSAL.search(text):
        return "refusal"
    return "short" if words < min_words else None


def refused(text: str) -> bool:
    """A rewrite that opens with a refusal (one that mentions "sorry" later may be a fine prompt)."""
    return bool(REFUSAL.search(" ".join(text.split()[:8])))


def parse_numbered(text: str) -> list[str]:
    """The items of a numbered list. An unnumbered line continues the item before it; unnumbered text
    before the first item is an item too (the answer continues the prompt's list, whose next number
    the prompt already wrote), unless it ends with ':' (a preamble: "Here are eight tasks:")."""
    items: list[str] = []
    lead: list[str] = []
    for line in text.splitlines():
        match = NUMBERED.match(line)
        if match:
            items.append(match.group(2).strip())
        elif line.strip():
            if items:
                items[-1] = f"{items[-1]} {line.strip()}".strip()
            else:
                lead.append(line.strip())
    first = " ".join(lead)
    return ([first] if first and not first.endswith(":") else []) + items


class AugmentTask(SynthTask):
    """What the three methods share: the instruction of a row, the teacher, answering, columns."""

    stage = "synth.augment"
    method_columns: list[tuple[str, pa.DataType]] = []
    cfg: AugmentConfig

    @classmethod
    def input_columns(cls, cfg: AugmentConfig) -> list[str]:
        return ["id", cfg.prompt_column]

    @classmethod
    def output_columns(
        cls, cfg: AugmentConfig, input_schema: pa.Schema | None = None
    ) -> list[tuple[str, pa.DataType]]:
        common = [("method", pa.string()), ("prompt", pa.string()), ("teacher", pa.string())]
        keep = isinstance(cfg.method, ParaphraseMethod) and cfg.method.keep_answer
        return common + cls.method_columns + ([("messages", pa.list_(MESSAGE))] if cfg.answer or keep else [])

    @property
    def teacher(self) -> str:
        return self.cfg.teacher or self.cfg.teachers[0].label

    def ask_one(self, text: str, sampling: SamplingConfig, sample_index: int = 0, teacher: str | None = None):
        return self.engine.request(
            teacher or self.teacher, [{"role": "user", "content": text}], sampling, sample_index
        )

    async def answers_for(self, prompts: list[str]) -> list[tuple[Answer, tuple[str, dict] | None]]:
        """The teacher's answer to each prompt, with why it fails (reason, detail) or None."""
        sampling = self.cfg.answer_sampling or self.cfg.sampling
        answers = await self.engine.ask([self.ask_one(p, sampling) for p in prompts])
        out = []
        for a in answers:
            if not a.ok:
                out.append((a, ("request_failed", {"what": "answer", "error": a.error})))
                continue
            why = failure(a.content, self.cfg.min_answer_words, self.cfg.refusal_max_words)
            out.append((a, ("teacher_failed", {"what": "answer", "why": why}) if why else None))
        return out

    def columns_for(self, prompt: str, answer: Answer | None, **extra: Any) -> dict[str, Any]:
        columns = {"method": self.cfg.method.type, "prompt": prompt, "teacher": self.teacher, **extra}
        if answer is not None:
            columns["messages"] = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": answer.content},
            ]
        return columns


class ParaphraseTask(AugmentTask):
    method_columns = [("original", pa.string()), ("sample_index", pa.int32())]

    def first_requests(self, row: dict[str, Any]) -> list[Request]:
        method, source = self.cfg.method, instruction_of(row[self.cfg.prompt_column])
        text = method.template.replace("{instruction}", source)
        return [self.ask_one(text, self.cfg.sampling, k) for k in range(method.n)] if source else []

    async def run(self, row: dict[str, Any]) -> list[Output | Dropped]:
        rid, value = row["id"], row[self.cfg.prompt_column]
        source = instruction_of(value)
        if not source:
            return [Dropped(rid, "empty_input")]
        if self.cfg.method.keep_answer and not isinstance(value, list):
            return [Dropped(rid, "not_a_conversation", {"column": self.cfg.prompt_column})]
        out: list[Output | Dropped] = []
        seen = {normalised(source): -1}
        kept: list[tuple[int, Answer, str]] = []
        for k, a in enumerate(await self.engine.ask(self.first_requests(row))):
            text = cleaned(a.content)
            key, step = normalised(text), {"sample_index": k}
            if not a.ok:
                out.append(Dropped(rid, "request_failed", step | {"error": a.error}, [a]))
            elif not key or refused(text):
                out.append(Dropped(rid, "teacher_failed", step | {"why": "refusal" if key else "empty"}, [a]))
            elif key in seen:
                reason = "same_as_source" if seen[key] < 0 else "duplicate"
                out.append(
                    Dropped(rid, reason, step | ({"same_as": seen[key]} if seen[key] >= 0 else {}), [a])
                )
            else:
                seen[key] = k
                kept.append((k, a, text))
        answered = (
            await self.answers_for([t for _, _, t in kept]) if self.cfg.answer else [(None, None)] * len(kept)
        )
        for (k, a, text), (reply, problem) in zip(kept, answered, strict=True):
            if problem:
                out.append(Dropped(rid, problem[0], {"sample_index": k, **problem[1]}, [a, reply]))
                continue
            columns = self.columns_for(text, reply, original=source, sample_index=k)
            if self.cfg.method.keep_answer:
                first = next(i for i, m in enumerate(value) if m.get("role") == "user")
                columns["messages"] = [dict(m) for m in value]
                columns["messages"][first] = {"role": "user", "content": text}
            out.append(Output(columns, [a] + ([reply] if reply else []), [rid], group=rid))
        return out


class EvolInstructTask(AugmentTask):
    method_columns = [("original", pa.string()), ("evolved_from", pa.string()), ("round", pa.int32()),
                      ("mutation", pa.string()), ("mutations", pa.list_(pa.string()))]  # fmt: skip

    def mutation(self, rid: str, round_: int) -> str:
        """Drawn from a generator seeded by (seed, row, round): the same on every run and machine."""
        return random.Random(f"{self.cfg.seed}:{rid}:{round_}").choice(self.cfg.method.mutations)

    def evolve_request(self, instruction: str, mutation: str) -> Request:
        if mutation == "breadth":
            text = BREADTH_TEMPLATE.replace("{instruction}", instruction)
        else:
            text = DEPTH_TEMPLATE.replace("{how}", HOW[mutation]).replace("{instruction}", instruction)
        return self.ask_one(text, self.cfg.sampling)

    def first_requests(self, row: dict[str, Any]) -> list[Request]:
        source = instruction_of(row[self.cfg.prompt_column])
        return [self.evolve_request(source, self.mutation(row["id"], 1))] if source else []

    def eliminated(self, parent: str, evolved: str) -> tuple[str, dict[str, Any]] | None:
        """The free elimination rules (2: a refusing or empty rewrite, 3, 4, and 1 when heuristic)."""
        if not evolved.strip() or refused(evolved):
            return "teacher_failed", {"what": "evolution", "why": "refusal" if evolved.strip() else "empty"}
        leak = next((w for w in LEAKS if w in evolved.lower()), None)
        if leak:
            return "prompt_leak", {"words": leak}
        if not content_words(evolved):
            return "no_content", {}
        if normalised(evolved) == normalised(parent):
            return "no_information_gain", {"by": "identical"}
        gained = content_words(evolved) - content_words(parent)
        if self.cfg.method.information_gain == "heuristic" and not gained:
            return "no_information_gain", {"by": "heuristic"}
        return None

    async def judged(self, parent: str, evolved: str) -> tuple[Answer, tuple[str, dict] | None]:
        method = self.cfg.method
        text = fill(GAIN_TEMPLATE, parent=parent, evolved=evolved)
        (reply,) = await self.engine.ask([self.ask_one(text, method.judge_sampling, teacher=method.judge)])
        if not reply.ok:
            return reply, ("request_failed", {"what": "judge", "error": reply.error})
        word = next(iter(tokens(reply.content or "")), "")
        if word == "yes":
            return reply, None
        return reply, ("no_information_gain", {"by": "teacher", "judge": word[:16]})

    async def run(self, row: dict[str, Any]) -> list[Output | Dropped]:
        rid, method = row["id"], self.cfg.method
        source = current = instruction_of(row[self.cfg.prompt_column])
        if not source:
            return [Dropped(rid, "empty_input")]
        out: list[Output | Dropped] = []
        chain: list[Answer] = []  # the evolutions the current instruction was made by
        mutations: list[str] = []
        for round_ in range(1, method.rounds + 1):
            mutation = self.mutation(rid, round_)
            step = {"round": round_, "mutation": mutation}
            (evolution,) = await self.engine.ask([self.evolve_request(current, mutation)])
            if not evolution.ok:
                out.append(Dropped(rid, "request_failed", step | {"error": evolution.error}, [evolution]))
                continue
            evolved, extra = cleaned(evolution.content), []
            problem = self.eliminated(current, evolved)
            if problem is None and method.information_gain == "teacher":
                judge, problem = await self.judged(current, evolved)
                extra.append(judge)
            reply = None
            if problem is None and self.cfg.answer:
                ((reply, problem),) = await self.answers_for([evolved])
                extra.append(reply)
            if problem:
                out.append(Dropped(rid, problem[0], step | problem[1], [evolution, *extra]))
                continue  # the paper: the next round evolves the last instruction that survived
            chain.append(evolution)
            mutations.append(mutation)
            columns = self.columns_for(evolved, reply, original=source, evolved_from=current, round=round_,
                                       mutation=mutation, mutations=list(mutations))  # fmt: skip
            verdict = canonical_json({"information_gain": method.information_gain})
            out.append(Output(columns, [*chain, *extra], [rid], group=rid, verdict=verdict))
            current = evolved
        return out


class Pool:
    """What a new instruction must differ from: the seeds and every candidate kept, by id."""

    def __init__(self, seeds: list[tuple[str, str]]):
        self.index, self.ids = RougeLIndex(), []
        self.made: list[tuple[str, str]] = []
        """(row id, text) of the rows made so far, in order: the generated in-context examples."""
        for sid, text in seeds:
            self.add(sid, text)

    def add(self, id_: str, text: str) -> int:
        self.index.add(text)
        self.ids.append(id_)
        return len(self.ids) - 1

    def nearest(self, text: str) -> tuple[str, float]:
        scores = self.index.scores(text)
        best = int(np.argmax(scores))
        return self.ids[best], float(scores[best])


class SelfInstructTask(AugmentTask):
    method_columns = [("round", pa.int32()), ("examples", pa.list_(pa.string()))]

    def __init__(self, cfg: AugmentConfig, engine):
        super().__init__(cfg, engine)
        words = cfg.method.banned_words
        self.banned = re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b", re.I) if words else None

    def initial_requests(self, rows: list[dict[str, Any]]) -> list[Request]:
        seeds = self._seeds(rows)[0]
        return [r for r, _ in self._round(0, seeds, [])] if seeds else []

    def _seeds(self, rows: list[dict[str, Any]]) -> tuple[list[tuple[str, str]], list[Dropped]]:
        seeds, dropped = [], []
        for row in rows:
            text = instruction_of(row[self.cfg.prompt_column])
            if text:
                seeds.append((row["id"], text))
            else:
                dropped.append(Dropped(row["id"], "empty_input"))
        return seeds, dropped

    def _round(self, round_: int, seeds: list, machine: list) -> list[tuple[Request, list[tuple[str, str]]]]:
        """The requests of a round, each with its (id, text) examples, drawn by a seeded generator."""
        method, out = self.cfg.method, []
        for j in range(method.requests_per_round):
            rng = random.Random(f"{self.cfg.seed}:self_instruct:{round_}:{j}")
            n_machine = min(method.machine_examples, len(machine))
            shown = rng.sample(seeds, min(method.examples - n_machine, len(seeds)))
            shown += rng.sample(machine, n_machine)
            rng.shuffle(shown)
            listed = "\n".join(f"{i}. {' '.join(text.split())}" for i, (_, text) in enumerate(shown, 1))
            text = fill(
                method.template, examples=listed, n=str(method.new_per_request), next=str(len(shown) + 1)
            )
            request = self.ask_one(text, self.cfg.sampling, round_ * method.requests_per_round + j)
            out.append((request, shown))
        return out

    def rejected(self, text: str) -> tuple[str, dict[str, Any]] | None:
        """The paper's filters before ROUGE-L: length, keywords, a start that is no word."""
        method, words = self.cfg.method, len(text.split())
        if words < method.min_words:
            return "too_short", {"words": words}
        if words > method.max_words:
            return "too_long", {"words": words}
        hit = self.banned.search(text) if self.banned else None
        if hit:
            return "banned_word", {"word": hit.group(1).lower()}
        if not text[0].isalnum():
            return "bad_start", {}
        return None

    def screened(self, a: Answer, shown: list, round_: int, pool: Pool, accepted: list) -> list[Dropped]:
        """Parse one answer's new instructions; those that pass every filter join ``pool`` and ``accepted``
        at once (so the next one must differ from them too), the others are returned, dropped."""
        method, dropped = self.cfg.method, []
        if not a.ok:
            return [Dropped(record_id(self.stage, "candidate", a.key), "request_failed",
                            {"round": round_, "error": a.error}, [a])]  # fmt: skip
        items = parse_numbered(a.content)
        for n, text in enumerate(cleaned(t) for t in items):
            cid = record_id(self.stage, "candidate", a.key, str(n))
            cut = a.finish_reason == "length" and n == len(items) - 1  # the paper drops a cut-off last one
            problem, score = ("truncated", {}) if cut else self.rejected(text), None
            if problem is None:
                nearest, score = pool.nearest(text)
                if score >= method.rouge_threshold:
                    problem = ("too_similar", {"nearest": nearest})
                elif len(pool.made) + len(accepted) >= method.target_size:
                    problem = ("over_target", {})
            if problem:
                dropped.append(Dropped(cid, problem[0], {"round": round_, **problem[1]}, [a], score=score))
            else:
                accepted.append((text, a, shown, score, pool.add(cid, text)))
        return dropped

    async def run_all(self, rows: list[dict[str, Any]]) -> list[list[Output | Dropped]]:
        method = self.cfg.method
        seeds, out = self._seeds(rows)
        pool, seed_ids, round_ = Pool(seeds), {s for s, _ in seeds}, 0
        while seeds and len(pool.made) < method.target_size and round_ < method.max_rounds:
            planned = self._round(round_, seeds, pool.made)
            accepted: list[tuple[str, Answer, list[tuple[str, str]], float, int]] = []
            for (_, shown), a in zip(planned, await self.engine.ask([r for r, _ in planned]), strict=True):
                out += self.screened(a, shown, round_, pool, accepted)
            answered = (await self.answers_for([t for t, *_ in accepted]) if self.cfg.answer
                        else [(None, None)] * len(accepted))  # fmt: skip
            for (text, a, shown, score, at), (reply, problem) in zip(accepted, answered, strict=True):
                if problem:  # it stays in the ROUGE-L pool under its candidate id, but shows in no prompt
                    out.append(Dropped(pool.ids[at], problem[0], {"round": round_, **problem[1]}, [a, reply]))
                    continue
                ids = [i for i, _ in shown]
                columns = self.columns_for(text, reply, round=round_, examples=ids)
                output = Output(columns, [a] + ([reply] if reply else []), [i for i in ids if i in seed_ids],
                                group=record_id(self.stage, normalised(text)),
                                verdict=canonical_json({"rouge_l_max": round(score, 4)}))  # fmt: skip
                out.append(output)
                pool.made.append((row_id(self.stage, output), text))
                pool.ids[at] = pool.made[-1][0]
            round_ += 1
            self.progress(len(pool.made), method.target_size)
        if len(pool.made) < method.target_size:
            make_console().print(f"[yellow]self_instruct: {len(pool.made)} of {method.target_size} new "
                                 f"instructions after {round_} rounds (max_rounds {method.max_rounds})")  # fmt: skip
        return [out]


TASKS = {"paraphrase": ParaphraseTask, "evol_instruct": EvolInstructTask, "self_instruct": SelfInstructTask}


def augment(cfg: AugmentConfig, store: Store) -> Manifest:
    return run_synth(TASKS[cfg.method.type], cfg, store)


def run_recipe(data: dict[str, Any], store: Store, source: str) -> Manifest:
    from manifests.recipes import parse_config

    return augment(parse_config(AugmentConfig, data, source), store)
