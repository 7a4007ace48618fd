"""``stage: train``: the recipe's ``method`` picks the module that runs it (one module per method)."""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from manifests.errors import DistilleryError
from manifests.schema import Manifest
from manifests.store import Store

METHODS = {
    "sft": "train.sft:SFTRecipe",
    "pretrain": "train.pretrain:PretrainRecipe",
    "distill": "train.distill:DistillRecipe",
    "proxy": "train.proxy:ProxyRecipe",
    "dpo": "train.dpo:DPORecipe",
    "reward": "train.reward:RewardRecipe",
    "grpo": "train.grpo:GRPORecipe",
    "ppo": "train.ppo:PPORecipe",
}
"""``method:`` → the recipe class of its module (the module's ``run_recipe`` runs it)."""


def method_of(data: dict[str, Any], source: str) -> str:
    method = data.get("method", "sft")
    if not isinstance(method, str) or method not in METHODS:
        near = difflib.get_close_matches(str(method), list(METHODS), n=1, cutoff=0.5)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise DistilleryError(
            f"{source}: unknown train method {method!r}{hint}; methods: {', '.join(METHODS)}"
        )
    return method


def recipe_class(data: dict[str, Any], source: str = "recipe"):
    module, name = METHODS[method_of(data, source)].split(":")
    return getattr(importlib.import_module(module), name)


def run_recipe(data: dict[str, Any], store: Store, source: str) -> Manifest | None:
    module = METHODS[method_of(data, source)].split(":")[0]
    return importlib.import_module(module).run_recipe(data, store, source)
