"""Perplexity: the negative log-likelihood of every assistant turn, per sample.

Perplexity is taken over every assistant turn given what precedes it — exactly the tokens SFT
trains on, labelled by the same ``manifests.chat_labels`` — so "before" and "after" training are
comparable, and a sample's value is ``exp(nll / tokens)`` of its own answer tokens. The task's
aggregate pools the tokens of all samples (``eval/metrics.py``).
"""

from __future__ import annotations

from collections.abc import Callable

from manifests.chat_labels import IGNORED, labelled_conversation


def padded(rows: list[list[int]], value: int):
    import torch

    width = max(len(x) for x in rows)
    return torch.tensor([x + [value] * (width - len(x)) for x in rows])


def labelled_batches(tokenizer, conversations: list[list[dict]], max_length: int, batch_size: int,
                     row_ids: list[str] | None = None):  # fmt: skip
    """(input_ids, attention_mask, labels) tensors per batch of chats, each cut to ``max_length``."""
    for start in range(0, len(conversations), batch_size):
        ids, labels = [], []
        for i, chat in enumerate(conversations[start : start + batch_size], start):
            example = labelled_conversation(chat, tokenizer, row_ids[i] if row_ids else str(i))
            ids.append(example["input_ids"][:max_length])
            labels.append(example["labels"][:max_length])
        mask = [[1] * len(x) for x in ids]
        yield padded(ids, tokenizer.pad_token_id), padded(mask, 0), padded(labels, IGNORED)


def next_token_logits(model, input_ids, mask):
    """Logits predicting each next real token: position t scores token t + 1."""
    import torch

    with torch.inference_mode():
        logits = model(input_ids=input_ids, attention_mask=mask).logits
    # Prompt-learning adapters (p-tuning, prompt tuning) prepend virtual tokens: keep the real positions.
    return logits[:, -input_ids.size(1) :][:, :-1].float()


def sample_nll(
    model,
    tokenizer,
    conversations: list[list[dict]],
    max_length: int,
    batch_size: int,
    row_ids: list[str] | None = None,
    advance: Callable[[int], None] | None = None,
) -> list[tuple[float, int]]:
    """(negative log-likelihood, answer tokens) of each chat, over every assistant turn."""
    import torch

    out: list[tuple[float, int]] = []
    for input_ids, mask, labels in labelled_batches(
        tokenizer, conversations, max_length, batch_size, row_ids
    ):
        logits = next_token_logits(model, input_ids, mask)
        target = labels[:, 1:]
        # Over (positions, vocabulary) rows: the log-softmax along the last dimension is the accurate
        # kernel; along dimension 1 of (batch, vocab, positions) it was ~1e-4 nats per token low in fp32.
        nll = (
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)),
                target.reshape(-1),
                ignore_index=IGNORED,
                reduction="none",
            )
            .view(target.shape)
            .sum(dim=1)
        )
        tokens = (target != IGNORED).sum(dim=1)
        out += [(float(a), int(b)) for a, b in zip(nll, tokens, strict=True)]
        if advance:
            advance(len(input_ids))
    return out


def answer_nll(model, tokenizer, conversations: list[list[dict]], max_length: int, batch_size: int,
               row_ids: list[str] | None = None) -> tuple[float, int]:  # fmt: skip
    """(sum of negative log-likelihood, number of tokens) over every assistant turn of all chats."""
    per_sample = sample_nll(model, tokenizer, conversations, max_length, batch_size, row_ids)
    return sum(n for n, _ in per_sample), sum(t for _, t in per_sample)
