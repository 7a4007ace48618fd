"""``synth.generate``: a teacher answers prompts made from a dataset; every row keeps its lineage.

    stage: synth.generate
    name: demo-sft
    input: demo-corpus
    teacher: {model: smollm2-135m-instruct, max_new_tokens: 48}
    prompt_template: "Summarise this text in one sentence.\\n\\n{text}"
    limit: 48
    splits: {train: 0.8, test: 0.2}

An output row (messages ready for SFT)::

    {"id": "…", "parents": ["c0ffee…"], "prompt_id": "…", "request_hash": "…",
     "messages": [{"role": "user", "content": "Summarise…"}, {"role": "assistant", "content": "…"}],
     "teacher": {"model": "smollm2-135m-instruct@0f348e65c684", "endpoint": "local"},
     "sampling": "{\\"max_new_tokens\\": 48, …}", "prompt_tokens": 161, "completion_tokens": 31,
     "finish_reason": "stop"}
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from manifests.data import read_table, require_columns
from manifests.errors import DistilleryError
from manifests.hashing import canonical_json, record_id
from manifests.publish import Publisher
from manifests.recipes import Name, RecipeConfig, parse_config
from manifests.records import assign_splits
from manifests.schema import Manifest
from manifests.store import Store
from synth.teacher import LocalTeacher, TeacherConfig

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
OUTPUT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("parents", pa.list_(pa.string())),
        ("prompt_id", pa.string()),
        ("request_hash", pa.string()),
        ("messages", pa.list_(MESSAGE)),
        ("teacher", pa.struct([("model", pa.string()), ("endpoint", pa.string())])),
        ("sampling", pa.string()),
        ("sample_index", pa.int32()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("finish_reason", pa.string()),
    ]
)


class GenerateConfig(RecipeConfig):
    """Teacher answers for prompts built from a text dataset."""

    name: Name
    input: str
    """Reference of the dataset the prompts are made from (needs ``id`` and ``text``)."""
    teacher: TeacherConfig
    prompt_template: str = "Summarise the following text in one sentence.\n\n{text}"
    """The user message; ``{text}`` is replaced by the (truncated) document."""
    system_prompt: str | None = None
    max_input_chars: int = Field(default=800, ge=1)
    """Documents are cut to this many characters (at a word boundary) before templating."""
    limit: int | None = Field(default=None, ge=1)
    """Use at most this many documents (a deterministic pick by record id)."""
    samples_per_prompt: int = Field(default=1, ge=1)
    splits: dict[str, float] = Field(default_factory=lambda: {"train": 1.0})
    """Split shares (e.g. ``{train: 0.8, test: 0.2}``), cut from the prompts ordered by a hash of their id."""

    @field_validator("prompt_template")
    @classmethod
    def _has_text(cls, v: str) -> str:
        if "{text}" not in v:
            raise ValueError("must contain '{text}'")
        return v

    @field_validator("splits")
    @classmethod
    def _sums_to_one(cls, v: dict[str, float]) -> dict[str, float]:
        if not v or any(x < 0 for x in v.values()) or not math.isclose(sum(v.values()), 1.0, abs_tol=1e-6):
            raise ValueError("split shares must be non-negative and sum to 1")
        return v


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit]
    return cut[: cut.rfind(" ")] if " " in cut else cut


def _messages(cfg: GenerateConfig, text: str) -> list[dict[str, str]]:
    user = cfg.prompt_template.replace("{text}", _truncate(text.strip(), cfg.max_input_chars))
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    return system + [{"role": "user", "content": user}]


def request_hash(
    teacher_id: str, endpoint: str, messages: list[dict], sampling: dict, sample_index: int
) -> str:
    """The key of one request: everything that determines its answer."""
    payload = {
        "endpoint": endpoint,
        "model": teacher_id,
        "messages": messages,
        "sampling": sampling,
        "n": sample_index,
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def generate(cfg: GenerateConfig, store: Store) -> Manifest:
    source = store.resolve(cfg.input, kind="dataset")
    require_columns(source, ["id", "text"], "synth.generate prompts")
    teacher_manifest = store.resolve(cfg.teacher.model, kind="run")
    docs = read_table(source, columns=["id", "text"])
    docs = docs.take(pc.sort_indices(docs, sort_keys=[("id", "ascending")]))
    if cfg.limit:
        docs = docs.slice(0, cfg.limit)
    teacher = LocalTeacher(teacher_manifest, store, cfg.teacher)
    sampling = cfg.teacher.sampling()
    requests = []
    for doc_id, text in zip(docs.column("id").to_pylist(), docs.column("text").to_pylist(), strict=True):
        messages = _messages(cfg, text)
        prompt_id = record_id("prompt", doc_id, canonical_json(messages))
        for n in range(cfg.samples_per_prompt):
            key = request_hash(teacher.model_id, teacher.endpoint, messages, sampling, n)
            requests.append(
                {"doc_id": doc_id, "prompt_id": prompt_id, "messages": messages, "n": n, "hash": key}
            )
    rows: list[dict[str, Any]] = []
    tokens = 0
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[tps]} tok/s"),
               TimeRemainingColumn()]  # fmt: skip
    with Progress(*columns) as progress:
        task = progress.add_task("synth.generate", total=len(requests), tps="-")
        for start in range(0, len(requests), cfg.teacher.batch_size):
            chunk = requests[start : start + cfg.teacher.batch_size]
            # Each request's sampling seed comes from its own key, so answers do not depend on batching.
            seeds = [int(r["hash"][:8], 16) for r in chunk]
            answers = teacher.answer([r["messages"] for r in chunk], seeds=seeds)
            for req, ans in zip(chunk, answers, strict=True):
                tokens += ans.completion_tokens
                rows.append(
                    {"id": record_id(req["hash"], req["doc_id"]), "parents": [req["doc_id"]], "prompt_id": req["prompt_id"],
                     "request_hash": req["hash"],
                     "messages": req["messages"] + [{"role": "assistant", "content": ans.text}],
                     "teacher": {"model": teacher.model_id, "endpoint": teacher.endpoint},
                     "sampling": canonical_json(sampling), "sample_index": req["n"],
                     "prompt_tokens": ans.prompt_tokens, "completion_tokens": ans.completion_tokens,
                     "finish_reason": ans.finish_reason}
                )  # fmt: skip
            elapsed = progress.tasks[0].elapsed or 1e-9
            progress.update(task, advance=len(chunk), tps=f"{tokens / elapsed:.0f}")
    empty = [r["id"] for r in rows if not r["messages"][-1]["content"]]
    with Publisher(
        store, kind="dataset", name=cfg.name, stage="synth.generate", recipe=cfg.resolved() | {"input": source.id,
        "teacher_run": teacher_manifest.id}, parents=[source, teacher_manifest],
        parent_roles={teacher_manifest.id: "teacher"}, seed=cfg.teacher.seed,
    ) as pub:  # fmt: skip
        kept = [r for r in rows if r["messages"][-1]["content"]]
        if not kept:
            raise DistilleryError(
                f"{cfg.name}: the teacher returned no usable answer for {len(rows)} prompts"
            )
        # Split by prompt, so that the samples of one prompt never straddle train and test.
        prompts = sorted({r["prompt_id"] for r in kept})
        split_of_prompt = dict(
            zip(prompts, assign_splits(prompts, cfg.splits, cfg.teacher.seed), strict=True)
        )
        by_split: dict[str, list] = {}
        for r in kept:
            by_split.setdefault(split_of_prompt[r["prompt_id"]], []).append(r)
        for split, split_rows in sorted(by_split.items()):
            pub.write_table(pa.Table.from_pylist(split_rows, schema=OUTPUT_SCHEMA), split=split)
        pub.write_ledger(
            [{"id": rid, "step": "synth.generate", "action": "drop", "reason": "empty_answer", "score": None,
              "detail": None} for rid in empty], step="synth.generate",
        )  # fmt: skip
        stats = {
            "prompts": len({r["prompt_id"] for r in requests}),
            "rows_out": len(kept),
            "rows_per_split": {k: len(v) for k, v in sorted(by_split.items())},
            "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
            "completion_tokens": tokens,
            "finish_reasons": {f: sum(r["finish_reason"] == f for r in rows) for f in ("stop", "length")},
        }
        return pub.publish(stats=stats, arrow_schema=OUTPUT_SCHEMA)


def run_recipe(data: dict[str, Any], store: Store, source: str) -> Manifest:
    return generate(parse_config(GenerateConfig, data, source), store)
