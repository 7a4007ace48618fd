"""Preference pairs from dataset manifests, tokenized once for every method that learns from them.

A row is TRL's preference format, conversational (what ``synth preferences`` writes) or plain text::

    {"id": "…", "prompt": [{"role": "user", "content": "What is 2 + 2?"}],
     "chosen": [{"role": "assistant", "content": "4."}], "rejected": [{"role": "assistant", "content": "5."}],
     "margin": 1.0}

and becomes ``prompt_ids``, ``chosen_ids`` and ``rejected_ids``: the chat rendered through the
prompt (with the generation prompt) and each answer's tokens after it -- found as
``manifests.chat_labels`` finds an assistant turn, so DPO learns exactly the tokens SFT would label.
Plain strings are tokenized as text, each answer ending in the end-of-sequence token. A pair longer
than ``max_length`` keeps its start (each answer cut to what fits after the prompt); a pair whose
prompt alone fills ``max_length`` has no answer token left to compare and is dropped, counted in the
run's stats. The optional ``margin`` column (``synth preferences``: the score difference) travels
with each pair.
"""

from __future__ import annotations

from typing import Any

import pyarrow.parquet as pq

from manifests.chat_labels import render_chat
from manifests.errors import DistilleryError
from manifests.schema import Manifest

PAIR_COLUMNS = ["id", "prompt", "chosen", "rejected"]


def has_margin(manifests: list[Manifest]) -> bool:
    """Whether every dataset has a ``margin`` column (a mixture uses it only when all have it)."""
    return all("margin" in pq.read_schema(m.location / m.data_files()[0].path).names for m in manifests)


def _conversational(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


def pair_tokens(row: dict[str, Any], tokenizer) -> dict[str, list[int]]:
    """``prompt_ids``, ``chosen_ids``, ``rejected_ids`` of one preference row (untruncated)."""
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    kinds = {_conversational(v) for v in (prompt, chosen, rejected)}
    if len(kinds) > 1:
        raise DistilleryError(
            f"row {row['id']}: prompt, chosen and rejected must all be chats (lists of messages) or all be text"
        )
    if kinds == {True}:
        if not tokenizer.chat_template:
            raise DistilleryError(
                "the preference data are chats and the model has no chat template; set chat_template:"
            )
        clean = [
            [{k: v for k, v in m.items() if v is not None} for m in x] for x in (prompt, chosen, rejected)
        ]
        prompt_ids = render_chat(tokenizer, clean[0], add_generation_prompt=True)
        answers = []
        for side, answer in zip(("chosen", "rejected"), clean[1:], strict=True):
            if not answer or any(m.get("role") != "assistant" for m in answer):
                raise DistilleryError(
                    f"row {row['id']}: {side} must be the assistant's answer (messages with role assistant)"
                )
            whole = render_chat(tokenizer, clean[0] + answer)
            if whole[: len(prompt_ids)] != prompt_ids:
                raise DistilleryError(
                    f"row {row['id']}: the chat template does not render the prompt as the start of prompt + {side}, "
                    "so the answer's tokens cannot be found; use a chat template that renders earlier turns the same "
                    "way (chat_template: in the recipe)"
                )
            answers.append(whole[len(prompt_ids) :])
        return {"prompt_ids": prompt_ids, "chosen_ids": answers[0], "rejected_ids": answers[1]}
    if not all(isinstance(v, str) for v in (prompt, chosen, rejected)):
        raise DistilleryError(f"row {row['id']}: prompt, chosen and rejected must be text or chats")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def answer(text: str) -> list[int]:  # tokenized after the prompt, as it is read in context
        whole = tokenizer(prompt + text, add_special_tokens=True)["input_ids"]
        common = next((i for i, (a, b) in enumerate(zip(prompt_ids, whole, strict=False)) if a != b), None)
        cut = min(len(prompt_ids), len(whole)) if common is None else common
        return whole[cut:] + eos

    return {"prompt_ids": prompt_ids, "chosen_ids": answer(chosen), "rejected_ids": answer(rejected)}


def truncated(pair: dict[str, Any], max_length: int) -> dict[str, Any] | None:
    """``pair`` with each answer cut so that prompt + answer fits ``max_length``; None when no answer
    token fits (the prompt alone fills it)."""
    room = max_length - len(pair["prompt_ids"])
    if room <= 0:
        return None
    return pair | {"chosen_ids": pair["chosen_ids"][:room], "rejected_ids": pair["rejected_ids"][:room]}


def tokenized_pairs(mixture, tokenizer, max_length: int, margin: bool) -> tuple[list[dict[str, Any]], int]:
    """Every row of ``mixture`` as a tokenized pair (with ``id`` and, when ``margin``, its margin), and
    how many were dropped because the prompt alone fills ``max_length``."""
    if len(mixture) == 0:
        raise DistilleryError("datasets: the preference datasets have no rows (in this split)")
    pairs, dropped = [], 0
    for row in mixture:
        pair = truncated(pair_tokens(row, tokenizer), max_length)
        if pair is None:
            dropped += 1
            continue
        if not pair["chosen_ids"] or not pair["rejected_ids"]:
            raise DistilleryError(
                f"row {row['id']}: an empty answer (chosen or rejected) has nothing to compare"
            )
        pair["id"] = row["id"]
        if margin:
            pair["margin"] = float(row["margin"] or 0.0)
        pairs.append(pair)
    if not pairs:
        raise DistilleryError(
            f"every preference pair's prompt fills max_length {max_length}: no answer token is left; raise max_length"
        )
    return pairs, dropped
