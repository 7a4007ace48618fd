"""``distillery train merge RUN --name NAME``: fold a LoRA or IA³ adapter into its base model.

    distillery train merge demo-sft-run --name demo-sft-merged

The result is a run with a full checkpoint (safetensors and the adapter run's tokenizer, so its chat
template too) that loads and serves at full speed without peft; its parents are the adapter run
(role ``adapter``) and the base it was trained on (role ``base_model``). A base that is itself an
adapter is merged first, all the way down. Prompt-learning adapters (prefix, p-tuning, prompt
tuning) add virtual tokens in front of the input rather than changing weights, so there is nothing
to merge: that is one error, and such a run is used as it is (``load_causal_lm`` loads it on its base).
"""

from __future__ import annotations

import json
from typing import Any

from manifests.errors import DistilleryError
from manifests.model_runs import require_causal_lm
from manifests.models import CHECKPOINT_DIR, base_model_of, checkpoint_path, load_causal_lm
from manifests.publish import Publisher
from manifests.recipes import Name, RecipeConfig, parse_config
from manifests.schema import Manifest
from manifests.store import Store

MERGEABLE = ("LORA", "IA3")


class MergeConfig(RecipeConfig):
    """Merge an adapter run into its base model, as a full checkpoint run."""

    name: Name
    """Name of the merged run in the store."""
    adapter: str
    """Run reference of the adapter run (a LoRA or IA³ SFT run)."""


def merge_adapter(cfg: MergeConfig, store: Store) -> Manifest:
    run = store.resolve(cfg.adapter, kind="run")
    if not (run.location / CHECKPOINT_DIR / "adapter_config.json").is_file():
        # Say what the run is: a tokenizer or an index is no "full checkpoint" either.
        require_causal_lm(run, store)
        raise DistilleryError(
            f"{run.ref} is a full model checkpoint (made by {run.producer.stage}), not an adapter; there is "
            "nothing to merge -- use it as it is"
        )
    require_causal_lm(run, store)  # its base, all the way down, is a causal LM
    peft_type = json.loads((checkpoint_path(run) / "adapter_config.json").read_text()).get("peft_type", "?")
    if peft_type not in MERGEABLE:
        raise DistilleryError(
            f"{run.ref} is a {peft_type} adapter: its virtual tokens are not weights and cannot be merged "
            "(only LoRA and IA³ adapters can); use the run as it is, loaded on its base"
        )
    base = base_model_of(run, store)
    model, tokenizer = load_causal_lm(run, store, merge_adapter=True)
    recipe = cfg.resolved() | {"adapter": run.id, "base_model": base.id, "peft_type": peft_type}
    with Publisher(
        store, kind="run", name=cfg.name, stage="train.merge", recipe=recipe, parents=[run, base],
        parent_roles={run.id: "adapter", base.id: "base_model"},
    ) as pub:  # fmt: skip
        model.save_pretrained(pub.dir / CHECKPOINT_DIR)
        tokenizer.save_pretrained(pub.dir / CHECKPOINT_DIR)
        stats = {
            "peft_type": peft_type,
            "parameters": sum(p.numel() for p in model.parameters()),
            "architecture": type(model).__name__,
        }
        return pub.publish(stats=stats)


def run_recipe(data: dict[str, Any], store: Store, source: str) -> Manifest:
    return merge_adapter(parse_config(MergeConfig, data, source), store)
