"""Teachers: what answers a batch of chat requests.

``LocalTeacher`` runs a checkpoint from the store in-process with batched generation, for
development, tests and the demo. An OpenAI-compatible teacher (hosted APIs, vLLM, a local server)
plugs in behind the same ``answer`` method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import Field

from manifests.recipes import RecipeConfig
from manifests.schema import Manifest
from manifests.store import Store


class TeacherConfig(RecipeConfig):
    """Which model answers and how it samples (every field enters the request hash)."""

    model: str
    """Run reference of a checkpoint in the store (e.g. ``smollm2-135m-instruct``)."""
    max_new_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    """0 means greedy decoding (deterministic)."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int = 0
    batch_size: int = Field(default=8, ge=1)
    """Requests generated together in one forward pass (not part of the request hash)."""

    def sampling(self) -> dict[str, Any]:
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
        }


@dataclass
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class LocalTeacher:
    """Batched generation with a store checkpoint on this machine."""

    endpoint = "local"

    def __init__(self, manifest: Manifest, store: Store, cfg: TeacherConfig):
        import torch

        from manifests.models import load_causal_lm

        self.cfg = cfg
        self.manifest = manifest
        self.torch = torch
        self.model, self.tokenizer = load_causal_lm(manifest, store)
        self.model.eval()
        # Left padding so that every row of a batch continues from its own last token.
        self.tokenizer.padding_side = "left"

    @property
    def model_id(self) -> str:
        return self.manifest.ref

    def answer(self, conversations: list[list[dict[str, str]]], seeds: list[int]) -> list[Answer]:
        """Answers in order. Greedy requests share one batched forward pass; sampled ones run one
        by one under their own seed, so that an answer never depends on what it was batched with."""
        if self.cfg.temperature > 0 and len(conversations) > 1:
            return [a for c, s in zip(conversations, seeds, strict=True) for a in self.answer([c], [s])]
        torch = self.torch
        texts = [
            self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
            for c in conversations
        ]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        sample = self.cfg.temperature > 0
        kwargs: dict[str, Any] = {"max_new_tokens": self.cfg.max_new_tokens, "do_sample": sample,
                                  "pad_token_id": self.tokenizer.pad_token_id}  # fmt: skip
        if sample:
            kwargs |= {"temperature": self.cfg.temperature, "top_p": self.cfg.top_p}
            torch.manual_seed(seeds[0])
        with torch.inference_mode():
            out = self.model.generate(**batch, **kwargs)
        new = out[:, batch["input_ids"].shape[1] :]
        answers = []
        eos = self.tokenizer.eos_token_id
        for i, row in enumerate(new.tolist()):
            prompt_tokens = int(batch["attention_mask"][i].sum())
            finish = "length"
            if eos in row:
                row = row[: row.index(eos)]
                finish = "stop"
            row = [t for t in row if t != self.tokenizer.pad_token_id]
            text = self.tokenizer.decode(row, skip_special_tokens=True).strip()
            answers.append(Answer(text, prompt_tokens, len(row) + (finish == "stop"), finish))
        return answers
