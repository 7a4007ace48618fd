"""``train.tokenizer``: a byte-level BPE tokenizer trained on the ``text`` of corpus datasets.

    stage: train.tokenizer
    name: demo-bpe
    datasets: [{ref: demo-corpus}]
    vocab_size: 2000

The texts stream from the datasets' shards in batches (never the whole corpus in memory) into the
``tokenizers`` BPE trainer. The run publishes ``checkpoint/`` with a Hugging Face fast tokenizer
(``tokenizer.json``, ``tokenizer_config.json`` and, for ``chat_template: chatml``, the template),
so ``manifests.models.load_tokenizer(run)`` loads it like a model's tokenizer; its parents are the
datasets. Byte-level BPE without normalisation is lossless: ``decode(encode(text)) == text``.

Training is deterministic: the trainer has no randomness, its base alphabet is sorted and merge
ties break on token ids; the only known source of run-to-run differences (continuing-subword
prefixes created in hash-map order, huggingface/tokenizers#1794) is not used by byte-level BPE.
The same datasets and recipe therefore give the same files and the same id, on any number of
threads.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import Field, model_validator

from manifests.data import require_columns, require_split, shard_batches
from manifests.errors import DistilleryError
from manifests.models import CHECKPOINT_DIR
from manifests.publish import Publisher
from manifests.recipes import Name, RecipeConfig, parse_config
from manifests.schema import Manifest
from manifests.store import Store

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML, as SmolLM2 and Qwen write chats (without a default system prompt)."""
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]
BYTE_ALPHABET = 256


class TextInput(RecipeConfig):
    """One dataset whose ``text`` column is read."""

    ref: str
    """Dataset reference: ``name``, ``name@id-prefix`` or a path."""
    split: str | None = None
    """Split to read (all splits by default)."""


class TokenizerRecipe(RecipeConfig):
    """Train a byte-level BPE tokenizer on the texts of one or more datasets."""

    name: Name
    datasets: list[TextInput] = Field(min_length=1)
    vocab_size: int = Field(default=8192, ge=260, le=1_000_000)
    """Size of the vocabulary: the 256 bytes, the special tokens and the learnt merges."""
    min_frequency: int = Field(default=2, ge=1)
    """A pair must occur this often to be merged."""
    eos_token: str = "<|endoftext|>"
    """End of a document; also the bos token (GPT-2 style, one separator between documents)."""
    pad_token: str = "<|pad|>"
    chat_template: Literal["chatml", "none"] = "chatml"
    """``chatml`` adds ``<|im_start|>``/``<|im_end|>`` as special tokens and the ChatML template."""
    special_tokens: list[str] = Field(default_factory=list)
    """Further special tokens (never split, never merged)."""
    max_token_length: int | None = Field(default=None, ge=1)
    """Longest token in characters (None: no limit)."""
    batch_size: int = Field(default=1000, ge=1)
    """Documents read per batch (memory: one batch of texts plus the trainer's word counts)."""

    @model_validator(mode="after")
    def _room_for_merges(self) -> TokenizerRecipe:
        specials = self.all_special_tokens()
        if self.vocab_size <= BYTE_ALPHABET + len(specials):
            raise ValueError(
                f"vocab_size {self.vocab_size} leaves no room for merges: the byte alphabet and "
                f"{len(specials)} special tokens take {BYTE_ALPHABET + len(specials)}"
            )
        return self

    def all_special_tokens(self) -> list[str]:
        chat = CHATML_TOKENS if self.chat_template == "chatml" else []
        # Specials come first in the vocabulary, in this order: eos is id 0, as in SmolLM2.
        return list(dict.fromkeys([self.eos_token, self.pad_token, *chat, *self.special_tokens]))


def text_batches(manifest: Manifest, split: str | None, batch_size: int, columns: list[str]) -> Iterator:
    """Record batches of ``columns`` from a (verified) dataset, shard by shard, in manifest order
    (the caller has checked the split: ``require_split``)."""
    for f in manifest.data_files(split):
        yield from shard_batches(manifest.location / f.path, manifest.ref, batch_size, columns)


def _texts(datasets: list[tuple[TextInput, Manifest]], batch_size: int, counts: dict[str, int]):
    for d, manifest in datasets:
        for batch in text_batches(manifest, d.split, batch_size, ["text"]):
            texts = [t for t in batch.column("text").to_pylist() if t]
            counts["documents"] += len(texts)
            counts["characters"] += sum(len(t) for t in texts)
            yield texts


def train_tokenizer(cfg: TokenizerRecipe, store: Store) -> Manifest:
    datasets = [store.resolve(d.ref, kind="dataset") for d in cfg.datasets]
    for d, manifest in zip(cfg.datasets, datasets, strict=True):
        require_columns(manifest, ["text"], "tokenizer training")
        require_split(manifest, d.split)

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = cfg.all_special_tokens()
    tokenizer = Tokenizer(models.BPE())
    # No normaliser and no prefix space: byte-level BPE then round-trips every text exactly.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), max_token_length=cfg.max_token_length,
        show_progress=False,
    )  # fmt: skip
    counts = {"documents": 0, "characters": 0}
    tokenizer.train_from_iterator(_texts(list(zip(cfg.datasets, datasets, strict=True)), cfg.batch_size, counts),
                                  trainer=trainer)  # fmt: skip
    if counts["documents"] == 0:
        refs = ", ".join(m.ref for m in datasets)
        raise DistilleryError(f"tokenizer training: no text in {refs}; give datasets with non-empty 'text'")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=cfg.eos_token, bos_token=cfg.eos_token, pad_token=cfg.pad_token,
        additional_special_tokens=[t for t in specials if t not in (cfg.eos_token, cfg.pad_token)],
    )  # fmt: skip
    if cfg.chat_template == "chatml":
        fast.chat_template = CHATML_TEMPLATE
    recipe = cfg.resolved() | {
        "datasets": [d.resolved() | {"ref": m.id} for d, m in zip(cfg.datasets, datasets, strict=True)]
    }
    with Publisher(store, kind="run", name=cfg.name, stage="train.tokenizer", recipe=recipe,
                   parents=datasets) as pub:  # fmt: skip
        fast.save_pretrained(pub.dir / CHECKPOINT_DIR)
        stats = {
            "vocab_size": tokenizer.get_vocab_size(), "merges": len(json.loads(tokenizer.to_str())["model"]["merges"]),
            "special_tokens": specials, "documents": counts["documents"], "characters": counts["characters"],
        }  # fmt: skip
        return pub.publish(stats=stats)


def run_recipe(data: dict[str, Any], store: Store, source: str) -> Manifest:
    return train_tokenizer(parse_config(TokenizerRecipe, data, source), store)
