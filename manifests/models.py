"""Loading a model checkpoint published as a run (a full checkpoint or a PEFT adapter).

Any stage that needs a model — a synth teacher, a trainer's base, an evaluator — loads it through
here by reference, never through another stage's internals. torch and transformers are imported
lazily so that the manifest tools stay light.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from manifests.errors import DistilleryError
from manifests.hashing import canonical_json
from manifests.model_runs import CHECKPOINT_DIR, base_model_of, require_causal_lm
from manifests.schema import Manifest
from manifests.store import Store
from manifests.verify import ensure_verified


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what makes token ids mean something: the vocabulary and the special tokens (two models
    whose tokenizers share it read the same token ids the same way)."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())
    return hashlib.sha256(canonical_json({"vocab": vocab, "special": special}).encode()).hexdigest()


def checkpoint_path(manifest: Manifest) -> Path:
    path = manifest.location / CHECKPOINT_DIR
    if manifest.kind != "run" or not path.is_dir():
        raise DistilleryError(
            f"{manifest.ref} is not a model checkpoint (a run with a '{CHECKPOINT_DIR}/' folder)"
        )
    return path


def is_adapter(manifest: Manifest) -> bool:
    return (checkpoint_path(manifest) / "adapter_config.json").is_file()


def load_tokenizer(manifest: Manifest):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint_path(manifest))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(manifest: Manifest, store: Store, *, merge_adapter: bool = True, **kwargs: Any):
    """(model, tokenizer) for a run reference, after verifying its files.

    An adapter run is loaded on top of its base model; with ``merge_adapter`` a LoRA or IA³ adapter
    is merged so that inference runs at full speed. A prompt-learning adapter (prefix, p-tuning,
    prompt tuning) stays a ``PeftModel``: its virtual tokens are not weights that could be merged.
    """
    from transformers import AutoModelForCausalLM

    ensure_verified(manifest)
    require_causal_lm(manifest, store)  # a tokenizer run is one error line, not transformers' traceback
    path = checkpoint_path(manifest)
    tokenizer = load_tokenizer(manifest)
    if is_adapter(manifest):
        from peft import PeftModel

        base, _ = load_causal_lm(base_model_of(manifest, store), store, **kwargs)
        model = PeftModel.from_pretrained(base, path)
        if merge_adapter and not model.active_peft_config.is_prompt_learning:
            model = model.merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model, tokenizer
