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
    logprobs: list[dict[str, Any]] | None = None
    """When asked (``top_logprobs``): OpenAI's ``logprobs.content``, one entry per answer token."""


CONTEXT_TOKENS = 8
"""Tokens before a token that are decoded with it to find its text: enough for a decoder that joins words
with spaces or merges byte pieces to show the token's own leading space."""


def token_text(tokenizer, before: list[int], token: int, decoded_before: str | None = None) -> str:
    """The text ``token`` adds after the tokens ``before`` (its leading space included, as an API shows
    it), special tokens as their text."""
    window = before[-CONTEXT_TOKENS:]
    if decoded_before is None:
        decoded_before = tokenizer.decode(window, skip_special_tokens=False)
    after = tokenizer.decode([*window, token], skip_special_tokens=False)
    return after[len(decoded_before) :] if after.startswith(decoded_before) else tokenizer.decode([token])


def answer_logprobs(tokenizer, context: list[int], answer: list[int], logits, k: int) -> list[dict[str, Any]]:
    """OpenAI's ``logprobs.content`` of an answer: per token its text, log-prob and bytes, and the ``k``
    likeliest tokens at that step, from the model's own log-softmax (``logits[t]``: the raw logits that
    chose token t, before temperature or top-p)."""

    def entry(before: list[int], decoded: str, i: int, value: float) -> dict[str, Any]:
        text = token_text(tokenizer, before, i, decoded)
        return {"token": text, "logprob": value, "bytes": list(text.encode())}

    entries = []
    for t, token in enumerate(answer):
        logp = logits[t].float().log_softmax(-1)
        before = context + answer[:t]
        decoded = tokenizer.decode(before[-CONTEXT_TOKENS:], skip_special_tokens=False)
        values, ids = logp.topk(min(k, logp.numel())) if k else (logp[:0], logp[:0].long())
        top = [entry(before, decoded, i, v) for v, i in zip(values.tolist(), ids.tolist(), strict=True)]
        entries.append(entry(before, decoded, token, float(logp[token])) | {"top_logprobs": top})
    return entries


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """``text`` up to the first of the ``stop`` strings, and whether one was found."""
    cuts = [at for at in (text.find(s) for s in stop) if at >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def logprobs_before_stop(
    entries: list[dict[str, Any]] | None, stop: list[str]
) -> list[dict[str, Any]] | None:
    """The entries of the tokens an answer cut at its first ``stop`` string still shows."""
    if entries is None or not stop:
        return entries
    kept, text = [], ""
    for entry in entries:
        if cut_at_stop(text, stop)[1]:
            break
        kept.append(entry)
        text += entry["token"]
    return kept


def generate_answers(
    model,
    tokenizer,
    conversations: list[list[dict[str, str]] | str],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seeds: list[int],
    stop: list[str] | None = None,
    top_logprobs: int | None = None,
) -> list[Answer]:
    """Answers in order, one per conversation (a list of chat messages, or a raw prompt string).

    Greedy requests share one batched forward pass (the tokenizer must pad on the left, so that
    every row continues from its own last token); sampled ones run one by one under their own seed,
    so that an answer never depends on what it was batched with. An answer ends before the first
    of the ``stop`` strings. (transformers' ``stop_strings`` would end generation there too, but it
    fails on tokenizers whose vocabulary it cannot map back to text, such as word-level ones.) With
    ``top_logprobs`` (k), each answer carries its tokens' log-probs and top-k alternatives.
    """
    import torch

    if temperature > 0 and len(conversations) > 1:
        return [
            a
            for c, s in zip(conversations, seeds, strict=True)
            for a in generate_answers(
                model, tokenizer, [c], max_new_tokens, temperature, top_p, [s], stop, top_logprobs
            )
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
    if top_logprobs is not None:  # the raw logits of every step, before temperature and top-p
        kwargs |= {"output_logits": True, "return_dict_in_generate": True}
    with torch.inference_mode():
        out = model.generate(**batch, **kwargs)
    steps = out.logits if top_logprobs is not None else None
    out = out.sequences if top_logprobs is not None else out
    new = out[:, batch["input_ids"].shape[1] :]
    answers = []
    eos = tokenizer.eos_token_id
    for i, row in enumerate(new.tolist()):
        prompt_tokens = int(batch["attention_mask"][i].sum())
        finish = "length"
        if eos in row:
            row = row[: row.index(eos)]
            finish = "stop"
        logprobs = None
        if steps is not None:
            # Every token up to the end of turn, a generated pad token too (a finished row's padding
            # comes after its end of turn).
            context = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
            logprobs = answer_logprobs(tokenizer, context, row, [s[i] for s in steps], top_logprobs)
        row = [t for t in row if t != tokenizer.pad_token_id]
        text = tokenizer.decode(row, skip_special_tokens=True)
        text, stopped = cut_at_stop(text, stop or [])
        finish = "stop" if stopped else finish
        text = text.strip()
        answers.append(Answer(text, prompt_tokens, len(row) + (finish == "stop"), finish, logprobs))
    return answers
