"""``eval`` (metric ``perplexity``): per-token perplexity of models on a chat dataset split.

    stage: eval
    name: demo-eval
    models: [student-base, demo-sft-run]
    dataset: {ref: demo-sft, split: test}

Perplexity is taken over every assistant turn given what precedes it — exactly the tokens SFT
trains on, labelled by the same ``manifests.chat_labels`` — so "before" and "after" are comparable. Publishes ``metrics.json`` and an eval manifest whose
parents are the models and the dataset.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import Field
from rich.progress import Progress

from manifests.chat_labels import IGNORED, labelled_conversation
from manifests.data import read_table, require_columns
from manifests.errors import DistilleryError
from manifests.model_runs import require_causal_lm
from manifests.models import load_causal_lm
from manifests.publish import Publisher
from manifests.recipes import Name, RecipeConfig, parse_config
from manifests.schema import Manifest
from manifests.store import Store


class EvalData(RecipeConfig):
    ref: str
    """Dataset reference with a ``messages`` column."""
    split: str = "test"


class PerplexityRecipe(RecipeConfig):
    """Perplexity of one or more models on the answers of a chat dataset."""

    name: Name
    metric: Literal["perplexity"] = "perplexity"
    models: list[str] = Field(min_length=1)
    """Run references (full checkpoints or adapters)."""
    dataset: EvalData
    max_length: int = Field(default=512, ge=8)
    batch_size: int = Field(default=4, ge=1)


def answer_nll(
    model,
    tokenizer,
    conversations: list[list[dict]],
    max_length: int,
    batch_size: int,
    progress=None,
    row_ids: list[str] | None = None,
):
    """(sum of negative log-likelihood, number of tokens) over every assistant turn of each chat, each
    chat cut to ``max_length`` tokens."""
    import torch

    total_nll, total_tokens = 0.0, 0
    task = progress.add_task("perplexity", total=len(conversations)) if progress else None
    for start in range(0, len(conversations), batch_size):
        ids, labels = [], []
        for i, chat in enumerate(conversations[start : start + batch_size], start):
            example = labelled_conversation(chat, tokenizer, row_ids[i] if row_ids else str(i))
            ids.append(example["input_ids"][:max_length])
            labels.append(example["labels"][:max_length])
        width = max(len(x) for x in ids)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        label_t = torch.tensor([x + [IGNORED] * (width - len(x)) for x in labels])
        with torch.inference_mode():
            logits = model(input_ids=input_ids, attention_mask=mask).logits
        # Prompt-learning adapters (p-tuning, prompt tuning) prepend virtual tokens: keep the real positions.
        logits = logits[:, -input_ids.size(1) :][:, :-1].float()
        target = label_t[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                                ignore_index=IGNORED, reduction="sum")  # fmt: skip
        total_nll += float(nll)
        total_tokens += int((target != IGNORED).sum())
        if progress:
            progress.advance(task, len(ids))
    return total_nll, total_tokens


def evaluate(cfg: PerplexityRecipe, store: Store) -> Manifest:
    data = store.resolve(cfg.dataset.ref, kind="dataset")
    require_columns(data, ["id", "messages"], "perplexity")
    # Every model is checked before the first is scored: a tokenizer run named last is one error
    # line now, not a traceback after the others' work.
    models = [require_causal_lm(store.resolve(ref, kind="run"), store) for ref in cfg.models]
    table = read_table(data, split=cfg.dataset.split, columns=["id", "messages"])
    conversations, row_ids = table.column("messages").to_pylist(), table.column("id").to_pylist()
    results: dict[str, Any] = {}
    with Progress() as progress:
        for manifest in models:
            model, tokenizer = load_causal_lm(manifest, store)
            model.eval()
            nll, tokens = answer_nll(
                model, tokenizer, conversations, cfg.max_length, cfg.batch_size, progress, row_ids
            )
            if tokens == 0:
                raise DistilleryError(
                    f"dataset {data.ref} split {cfg.dataset.split}: no answer tokens to score"
                )
            results[manifest.ref] = {"run_id": manifest.id, "perplexity": math.exp(nll / tokens),
                                     "nll_per_token": nll / tokens, "tokens": tokens}  # fmt: skip
    recipe = cfg.resolved() | {
        "models": [m.id for m in models],
        "dataset": cfg.dataset.resolved() | {"ref": data.id},
    }
    roles = {m.id: "model" for m in models} | {data.id: "eval_data"}
    with Publisher(store, kind="eval", name=cfg.name, stage="eval.perplexity", recipe=recipe,
                   parents=[*models, data], parent_roles=roles) as pub:  # fmt: skip
        (pub.dir / "metrics.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        stats = {
            "examples": len(conversations),
            "perplexity": {k: round(v["perplexity"], 4) for k, v in results.items()},
        }
        return pub.publish(stats=stats)


def run_recipe(data: dict[str, Any], store: Store, source: str) -> Manifest:
    return evaluate(parse_config(PerplexityRecipe, data, source), store)
