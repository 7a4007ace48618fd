"""The student's (and a white-box teacher's) view of an answer, one token at a time, for mining.

For a chat prompt and an answer, the answer's tokens are those the chat template adds when the
assistant turn is rendered after the prompt (its text and end-of-turn, as SFT labels them). Over those
tokens, from one forward pass:

- ``loss``: the student's mean negative log-likelihood per answer token (nats) -- how far the student
  is from writing the teacher's answer;
- ``entropy``: the mean entropy (nats) of the student's next-token distribution -- its uncertainty;
- ``kl``: with a teacher of the same tokenizer, the mean per-token KL(teacher || student) -- where the
  two disagree even when the student would pick the same top token.

Sequences run in padded batches (right padding, attention mask), each answer's numbers taken from its
own positions only, in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from manifests.chat_labels import render_chat
from manifests.errors import DistilleryError


def answer_tokens(tokenizer, prompt: list[dict[str, str]], answer: str) -> tuple[list[int], int]:
    """(prompt + answer token ids, where the answer starts). Without a chat template: the last user
    message, a newline and the answer, as plain text."""
    if not tokenizer.chat_template:
        head = tokenizer(prompt[-1]["content"] + "\n", add_special_tokens=False)["input_ids"]
        tail = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return head + tail, len(head)
    head = render_chat(tokenizer, prompt, add_generation_prompt=True)
    full = render_chat(tokenizer, prompt + [{"role": "assistant", "content": answer}])
    if full[: len(head)] != head:
        raise DistilleryError(
            "the chat template does not render the prompt as the start of the prompt and answer; mining needs "
            "a template whose conversations extend their prefixes (as ChatML does)"
        )
    return full, len(head)


@dataclass
class TokenStats:
    """One answer's numbers (means over its tokens)."""

    tokens: int
    loss: float
    entropy: float
    kl: float | None = None


class AnswerScorer:
    """The student (and optionally a teacher) loaded once; ``stats`` scores (prompt, answer) pairs."""

    def __init__(self, student: Any, tokenizer: Any, teacher: Any = None, batch_size: int = 8,
                 max_length: int = 2048):  # fmt: skip
        import torch

        self.torch, self.student, self.teacher, self.tokenizer = torch, student, teacher, tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        for model in (student, teacher):
            if model is not None:
                model.eval()

    def stats(self, pairs: list[tuple[list[dict[str, str]], str]]) -> list[TokenStats]:
        encoded = [answer_tokens(self.tokenizer, prompt, answer) for prompt, answer in pairs]
        results: list[TokenStats] = []
        for i in range(0, len(encoded), self.batch_size):
            results += self._batch(encoded[i : i + self.batch_size])
        return results

    def _batch(self, encoded: list[tuple[list[int], int]]) -> list[TokenStats]:
        torch = self.torch
        # An answer cut by max_length keeps its first tokens: a prompt longer than the limit keeps none.
        encoded = [(ids[: self.max_length], start) for ids, start in encoded]
        width = max(len(ids) for ids, _ in encoded)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        attention = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, (ids, _) in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
        with torch.inference_mode():
            student = self.student(input_ids=input_ids, attention_mask=attention).logits.float()
            teacher = (
                self.teacher(input_ids=input_ids, attention_mask=attention).logits.float()
                if self.teacher is not None
                else None
            )
        out = []
        for row, (ids, start) in enumerate(encoded):
            if start >= len(ids):
                out.append(
                    TokenStats(0, float("nan"), float("nan"), None if teacher is None else float("nan"))
                )
                continue
            # The logits at position t predict token t + 1: the answer's tokens start..len-1 are predicted
            # by positions start-1..len-2.
            positions = torch.arange(start - 1, len(ids) - 1)
            targets = input_ids[row, start : len(ids)]
            logp = torch.log_softmax(student[row, positions], dim=-1)
            loss = -logp.gather(-1, targets[:, None]).squeeze(-1)
            entropy = -(logp.exp() * logp).sum(-1)
            kl = None
            if teacher is not None:
                t_logp = torch.log_softmax(teacher[row, positions], dim=-1)
                kl = float((t_logp.exp() * (t_logp - logp)).sum(-1).mean())
            out.append(TokenStats(len(targets), float(loss.mean()), float(entropy.mean()), kl))
        return out


@dataclass
class Sampled:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


def sample_answers(model: Any, tokenizer: Any, prompt: list[dict[str, str]], n: int, max_new_tokens: int,
                   temperature: float, top_p: float, seed: int) -> list[Sampled]:  # fmt: skip
    """``n`` answers to one chat prompt from one ``generate`` call (``num_return_sequences``), under a seed
    of the prompt's own -- so a prompt's answers never depend on which prompts ran beside it."""
    import torch

    ids = render_chat(tokenizer, prompt, add_generation_prompt=True) if tokenizer.chat_template else (
        tokenizer(prompt[-1]["content"] + "\n", add_special_tokens=False)["input_ids"])  # fmt: skip
    input_ids = torch.tensor([ids])
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "num_return_sequences": n,
                              "pad_token_id": tokenizer.pad_token_id, "do_sample": temperature > 0}  # fmt: skip
    if temperature > 0:
        kwargs |= {"temperature": temperature, "top_p": top_p}
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    answers = []
    for row in out[:, len(ids) :].tolist():
        finish = "length"
        if tokenizer.eos_token_id in row:
            row, finish = row[: row.index(tokenizer.eos_token_id)], "stop"
        if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
            row = [t for t in row if t != tokenizer.pad_token_id]
        answers.append(Sampled(tokenizer.decode(row, skip_special_tokens=True), len(ids), len(row), finish))
    return answers
