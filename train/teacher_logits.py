"""``distillery train teacher-logits`` (stage ``train.teacher-logits``): a teacher's next-token
distributions, stored once as a dataset, so that many students distil from it without the teacher in
memory.

    stage: train.teacher-logits
    name: demo-teacher-logits
    teacher: smollm2-135m-instruct
    datasets: [{ref: demo-sft, split: train}]
    top_k: 32
    max_length: 512

Each example is tokenized exactly as ``method: distill`` tokenizes it (``distill_examples``: the chat
through the template, labels on the assistant turns, ``manifests.chat_labels``), and for every
labelled position -- every position whose next token is an answer token -- the teacher's ``top_k``
token ids and their log-probabilities (over the whole vocabulary, at temperature 1) are kept. One
record per example::

    {"id": "9f2c…", "parents": ["<example id>"], "sequence_sha256": "<sha256 of the int32 token ids>",
     "positions": 41, "teacher_ids": [41 x 32 ids, flattened], "teacher_logprobs": [41 x 32, float16]}

Ids are stored as ``uint16`` when the vocabulary fits (SmolLM2's 49,152 does) and log-probs as
``float16``: 4 bytes per kept token instead of the 196 kB of a float32 row of SmolLM2's vocabulary.
The manifest's parents are the teacher run (role ``teacher``) and the datasets; its stats hold the
tokenizer's fingerprint, ``top_k``, ``max_length`` and the vocabulary size. A distill run checks all of
them, and every example's token hash, before it trains: outputs made with another tokenizer, another
chat template or for another version of the data are one error line.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np
from pydantic import Field

from manifests.chat_labels import IGNORED, labelled_conversation
from manifests.errors import DistilleryError
from manifests.hashing import record_id
from manifests.model_runs import require_causal_lm
from manifests.models import load_causal_lm, load_tokenizer, tokenizer_fingerprint
from manifests.publish import Publisher
from manifests.recipes import Name, RecipeConfig, parse_config
from manifests.schema import Manifest
from manifests.store import Store
from train.curriculum import Curriculum
from train.data import DatasetInput, load_mixture, pinned, resolve_datasets

STAGE = "train.teacher-logits"
COLUMNS = ["id", "parents", "sequence_sha256", "positions", "teacher_ids", "teacher_logprobs"]
FORMAT_COLUMNS: dict[str, list[str]] = {
    "messages": ["messages"],
    "prompt-completion": ["prompt", "completion"],
}


class TeacherLogitsRecipe(RecipeConfig):
    """Store a teacher's top-k next-token log-probabilities on the answer positions of datasets."""

    name: Name
    teacher: str
    """Run reference of the teacher (a full checkpoint or an adapter run)."""
    datasets: list[DatasetInput] = Field(min_length=1)
    """The training data the students will distil on (``messages``, or ``prompt`` + ``completion``)."""
    top_k: int = Field(default=32, ge=1)
    """Token ids kept per position (the rest of the probability mass is the student run's ``leftover``)."""
    max_length: int = Field(default=512, ge=8)
    """Tokens per example (longer ones are truncated), as the distill run's ``max_length``."""
    chat_template: str | None = None
    """A Jinja chat template (text or ``.jinja`` file) instead of the teacher tokenizer's own; the distill
    run must use the same one (the token hashes are checked)."""
    batch_size: int = Field(default=8, ge=1)
    seed: int = 0
    """Order of a weighted mixture (as in the distill run)."""


def sequence_sha256(input_ids: list[int]) -> str:
    return hashlib.sha256(np.asarray(input_ids, dtype=np.int32).tobytes()).hexdigest()


def data_format(columns: list[str], ref: str) -> str:
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and "completion" in columns:
        return "prompt-completion"
    raise DistilleryError(
        f"dataset {ref} lacks column(s) messages (or prompt and completion) needed for distillation; "
        f"it has: {', '.join(columns)}"
    )


def example_tokens(row: dict[str, Any], fmt: str, tokenizer, max_length: int) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` of one example, truncated to ``max_length``: a chat (or a
    prompt + completion of messages) labelled on its assistant turns; string prompt + completion as TRL
    tokenizes them (the completion and an end-of-sequence token labelled, special tokens as the tokenizer
    adds them)."""
    if fmt == "messages":
        tokens = labelled_conversation(row["messages"], tokenizer, row["id"])
    elif not isinstance(row["prompt"], str):
        tokens = labelled_conversation(list(row["prompt"]) + list(row["completion"]), tokenizer, row["id"])
    else:  # as TRL's SFTTrainer: the text with an end-of-sequence token; the answer where the two diverge
        eos = tokenizer.eos_token or ""
        completion = row["completion"] if row["completion"].endswith(eos) else row["completion"] + eos
        prompt = tokenizer(text=row["prompt"])["input_ids"]
        ids = tokenizer(text=row["prompt"] + completion)["input_ids"]
        pairs = enumerate(zip(prompt, ids, strict=False))
        shared = next((i for i, (a, b) in pairs if a != b), min(len(prompt), len(ids)))
        tokens = {"input_ids": ids, "labels": [IGNORED] * shared + ids[shared:]}
    return {k: v[:max_length] for k, v in tokens.items()}


def distill_examples(manifests: list[Manifest], inputs: list[DatasetInput], tokenizer, max_length: int,
                     seed: int, curriculum: Curriculum | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """The mixture of ``inputs`` as tokenized examples (``id``, ``input_ids``, ``labels``), in the
    ``curriculum``'s order if any: the one tokenization both the stored teacher outputs and the distill
    run use."""
    import pyarrow.parquet as pq

    formats = set()
    for m in manifests:
        formats.add(data_format(pq.read_schema(m.location / m.data_files()[0].path).names, m.ref))
    if len(formats) > 1:
        raise DistilleryError("datasets: a mixture needs one format (all messages, or all prompt/completion)")
    fmt = formats.pop()
    mixture = load_mixture(inputs, manifests, ["id", *FORMAT_COLUMNS[fmt]], seed, curriculum=curriculum)
    if len(mixture) == 0:
        raise DistilleryError(
            f"datasets: {', '.join(m.ref for m in manifests)} hold no rows in the split(s) given"
        )
    needs_template = fmt == "messages" or not isinstance(mixture[0]["prompt"], str)
    if needs_template and not tokenizer.chat_template:
        raise DistilleryError("the model has no chat template and the data are chats; set chat_template:")
    return [{"id": row["id"], **example_tokens(row, fmt, tokenizer, max_length)} for row in mixture]


def labelled_targets(labels: list[int]) -> int:
    """Positions whose next token is labelled: where a causal LM's prediction is trained."""
    return sum(1 for label in labels[1:] if label != IGNORED)


def teacher_logits(head, hidden):
    """A teacher's logits in float32 whatever its dtype: bf16 logits would blur the distribution a
    student learns (and the offline and online paths would differ)."""
    import torch.nn.functional as F

    bias = head.bias.float() if head.bias is not None else None
    return F.linear(hidden.float(), head.weight.float(), bias)


def require_plain_head(model_run: Manifest, config, role: str) -> None:
    """Distillation applies LM heads itself: a model whose forward changes the logits after the head
    would be distilled wrongly."""
    from train.sft import lm_head_problem

    problem = lm_head_problem(config)
    if problem:
        raise DistilleryError(f"{role} {model_run.ref}: {problem}, which distillation does not reproduce")


def is_prompt_learning(run: Manifest) -> bool:
    """An adapter run of virtual tokens (prefix, p-tuning, prompt tuning): its hidden states hold
    positions the text has not, so it can be no teacher."""
    import json

    from manifests.models import checkpoint_path, is_adapter

    if not is_adapter(run):
        return False
    config = json.loads((checkpoint_path(run) / "adapter_config.json").read_text())
    return config.get("peft_type") in {"PREFIX_TUNING", "P_TUNING", "PROMPT_TUNING"}


def teacher_topk(teacher, examples: list[dict[str, Any]], k: int, batch_size: int, device: str):
    """Per example: (ids [n, k], log-probs [n, k]) of the teacher's next-token distribution at its
    labelled positions, in order; the LM head applied only there."""
    import torch

    head = teacher.get_output_embeddings()
    out = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        width = max(len(e["input_ids"]) for e in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORED, dtype=torch.long)
        for i, e in enumerate(batch):
            n = len(e["input_ids"])
            ids[i, :n], mask[i, :n], labels[i, :n] = (
                torch.tensor(e["input_ids"]),
                1,
                torch.tensor(e["labels"]),
            )
        with torch.no_grad():
            none_kept = torch.empty(0, dtype=torch.long)
            hidden = teacher(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True,
                             use_cache=False, logits_to_keep=none_kept.to(device)).hidden_states[-1]  # fmt: skip
            for i in range(len(batch)):
                where = (labels[i, 1:] != IGNORED).to(device)
                logp = torch.log_softmax(teacher_logits(head, hidden[i, :-1][where]), dim=-1)
                values, indexes = logp.topk(min(k, logp.size(-1)), dim=-1)
                out.append((indexes.cpu().numpy(), values.cpu().numpy()))
    return out


def run_teacher_logits(cfg: TeacherLogitsRecipe, store: Store) -> Manifest:
    import pyarrow as pa
    import torch

    datasets = resolve_datasets(cfg.datasets, store, ["id"], "teacher outputs")
    teacher = require_causal_lm(store.resolve(cfg.teacher, kind="run"), store)
    tokenizer = load_tokenizer(teacher)
    if cfg.chat_template:
        from train.sft import chat_template_text

        tokenizer.chat_template = chat_template_text(cfg.chat_template)
    if cfg.top_k > len(tokenizer):
        raise DistilleryError(f"top_k {cfg.top_k} is larger than the vocabulary ({len(tokenizer)} tokens)")
    from train.sft import architecture

    require_plain_head(teacher, architecture(teacher, store).config, "teacher")
    if is_prompt_learning(teacher):
        raise DistilleryError(
            f"teacher {teacher.ref} is a prompt-learning adapter; give a full run or a LoRA/IA3 one"
        )
    examples = distill_examples(datasets, cfg.datasets, tokenizer, cfg.max_length, cfg.seed)
    unique = list({e["id"]: e for e in examples}.values())  # a weighted mixture repeats rows: once each
    started = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = load_causal_lm(teacher, store, dtype=torch.float32)
    model.to(device).eval()
    vocab = model.get_output_embeddings().weight.shape[0]
    id_type, id_dtype = (pa.uint16(), np.uint16) if vocab <= 1 << 16 else (pa.int32(), np.int32)
    rows: dict[str, list] = {c: [] for c in COLUMNS}
    for example, (ids, logprobs) in zip(
        unique, teacher_topk(model, unique, cfg.top_k, cfg.batch_size, device), strict=True
    ):
        rows["id"].append(record_id(STAGE, teacher.id, example["id"]))
        rows["parents"].append([example["id"]])
        rows["sequence_sha256"].append(sequence_sha256(example["input_ids"]))
        rows["positions"].append(len(ids))
        rows["teacher_ids"].append(ids.astype(id_dtype).reshape(-1))
        rows["teacher_logprobs"].append(logprobs.astype(np.float16).reshape(-1))
    schema = pa.schema([("id", pa.string()), ("parents", pa.list_(pa.string())), ("sequence_sha256", pa.string()),
                        ("positions", pa.int32()), ("teacher_ids", pa.list_(id_type)),
                        ("teacher_logprobs", pa.list_(pa.float16()))])  # fmt: skip
    table = pa.table(
        {c: rows[c] for c in COLUMNS[:4]}
        | {
            "teacher_ids": pa.array(rows["teacher_ids"], type=pa.list_(id_type)),
            "teacher_logprobs": pa.array(rows["teacher_logprobs"], type=pa.list_(pa.float16())),
        },
        schema=schema,
    )
    recipe = cfg.resolved() | {"teacher": teacher.id, "datasets": pinned(cfg.datasets, datasets)}
    with Publisher(store, kind="dataset", name=cfg.name, stage=STAGE, recipe=recipe, parents=[teacher, *datasets],
                   parent_roles={teacher.id: "teacher"}, seed=cfg.seed) as pub:  # fmt: skip
        pub.write_table(table)
        stats = {
            "rows": table.num_rows, "positions": int(sum(rows["positions"])), "top_k": min(cfg.top_k, vocab),
            "vocab_size": vocab, "max_length": cfg.max_length, "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
            "teacher": teacher.id, "datasets": [m.id for m in datasets], "wall_s": round(time.time() - started, 2),
        }  # fmt: skip
        return pub.publish(stats=stats)


def run_recipe(data: dict[str, Any], store: Store, source: str) -> Manifest:
    return run_teacher_logits(parse_config(TeacherLogitsRecipe, data, source), store)
