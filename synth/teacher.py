"""Batched generation with a checkpoint on this machine: what ``distillery serve`` runs.

Teachers are reached through OpenAI-compatible endpoints (``synth/engine.py``); for a store
checkpoint, ``distillery serve`` is that endpoint and calls ``generate_answers`` for each batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """``text`` up to the first of the ``stop`` strings, and whether one was found."""
    cuts = [at for at in (text.find(s) for s in stop) if at >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def generate_answers(
    model,
    tokenizer,
    conversations: list[list[dict[str, str]] | str],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seeds: list[int],
    stop: list[str] | None = None,
) -> list[Answer]:
    """Answers in order, one per conversation (a list of chat messages, or a raw prompt string).

    Greedy requests share one batched forward pass (the tokenizer must pad on the left, so that
    every row continues from its own last token); sampled ones run one by one under their own seed,
    so that an answer never depends on what it was batched with. An answer ends before the first
    of the ``stop`` strings. (transformers' ``stop_strings`` would end generation there too, but it
    fails on tokenizers whose vocabulary it cannot map back to text, such as word-level ones.)
    """
    import torch

    if temperature > 0 and len(conversations) > 1:
        return [
            a
            for c, s in zip(conversations, seeds, strict=True)
            for a in generate_answers(model, tokenizer, [c], max_new_tokens, temperature, top_p, [s], stop)
        ]
    texts = [
        c
        if isinstance(c, str)
        else tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
        for c in conversations
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    sample = temperature > 0
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": sample,
                              "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    if sample:
        kwargs |= {"temperature": temperature, "top_p": top_p}
        torch.manual_seed(seeds[0])
    with torch.inference_mode():
        out = model.generate(**batch, **kwargs)
    new = out[:, batch["input_ids"].shape[1] :]
    answers = []
    eos = tokenizer.eos_token_id
    for i, row in enumerate(new.tolist()):
        prompt_tokens = int(batch["attention_mask"][i].sum())
        finish = "length"
        if eos in row:
            row = row[: row.index(eos)]
            finish = "stop"
        row = [t for t in row if t != tokenizer.pad_token_id]
        text = tokenizer.decode(row, skip_special_tokens=True)
        text, stopped = cut_at_stop(text, stop or [])
        finish = "stop" if stopped else finish
        text = text.strip()
        answers.append(Answer(text, prompt_tokens, len(row) + (finish == "stop"), finish))
    return answers
