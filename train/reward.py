"""``train`` (method ``reward``): a reward model -- a sequence-classification head on a base run --
trained on preference pairs with TRL's RewardTrainer.

    stage: train
    method: reward
    name: demo-rm
    model: demo-sft-run                 # a full run (merge an adapter run first: train merge)
    datasets: [{ref: demo-prefs}]       # prompt / chosen / rejected, optional margin
    peft: {method: lora, r: 8}
    eval_split: test

The head is one linear layer on the last token's hidden state; the loss is Bradley-Terry,
``-log σ(r(chosen) - r(rejected) - margin)``, with the dataset's ``margin`` column when every dataset has
one and ``margin: true`` (``synth preferences`` writes the score difference there), and optionally
``center_rewards`` (Eisenstein et al. 2023: keeps rewards near zero). Pairs longer than ``max_length`` are
left out by TRL (counted in the stats).

The run's checkpoint is a whole ``AutoModelForSequenceClassification`` with one label -- a LoRA is merged
into it before saving -- so ``synth preferences`` (``score: {method: reward_model}``) and PPO load it as any
reward model. The held-out pairwise accuracy (the share of pairs whose chosen answer scores higher) and
mean margin are in the run's stats.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from typing import Any, Literal

from pydantic import Field

from manifests.errors import DistilleryError
from manifests.model_runs import require_causal_lm
from manifests.models import CHECKPOINT_DIR, checkpoint_path, is_adapter, load_tokenizer
from manifests.publish import Publisher
from manifests.recipes import parse_config
from manifests.schema import Manifest
from manifests.store import Store
from train.checkpoint import trainer_work_folder
from train.data import load_mixture, pinned, resolve_datasets
from train.launch import as_a_job_of_one
from train.peft_config import build_peft_config, check_target_modules
from train.preference_data import PAIR_COLUMNS, has_margin
from train.sft import (
    REPORTING_FIELDS,
    SFTRecipe,
    architecture,
    chat_template_text,
    check_trainer_recipe,
    count_parameters,
    deepspeed_contradictions,
    sft_arguments,
    train_watched,
    trainer_watch,
)
from train.strategy import zero_stage


class RewardRecipe(SFTRecipe):
    """A reward model (one-logit sequence classifier) from preference pairs."""

    method: Literal["reward"] = "reward"  # type: ignore[assignment]
    margin: bool = True
    """Subtract each pair's ``margin`` column (when every dataset has one) inside the loss."""
    center_rewards: float | None = Field(default=None, gt=0)
    """Coefficient of the mean squared reward added to the loss (rewards centred near zero)."""
    max_length: int = Field(default=1024, ge=8)
    """Tokens of prompt + answer; longer pairs are left out."""


def _sequence_classifier(base: Manifest, tokenizer):
    """The base run's weights under a fresh one-logit score head, its pad token set."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(checkpoint_path(base), num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _seq_cls_peft(cfg: RewardRecipe, model, base: Manifest):
    """The recipe's adapter, for a classifier: the score head is new, so it trains in full beside it."""
    peft_config = build_peft_config(cfg.peft, model, str(checkpoint_path(base)))
    if peft_config is not None:
        peft_config.task_type = "SEQ_CLS"
        peft_config.modules_to_save = ["score"]
    return peft_config


def train_reward(cfg: RewardRecipe, store: Store) -> Manifest | None:
    import torch

    check_trainer_recipe(cfg)
    if cfg.packing:
        raise DistilleryError("packing: reward-model pairs are scored one sequence each; set packing: false")
    if cfg.peft.is_prompt_learning:
        raise DistilleryError(f"peft.method {cfg.peft.method}: a reward model takes lora, ia3 or none")
    if cfg.guard.action == "rollback":
        raise DistilleryError(
            "guard.action rollback needs method pretrain; for a reward model use skip or stop"
        )
    if zero_stage(cfg.strategy) == 3 or cfg.strategy == "fsdp":
        raise DistilleryError(
            f"strategy {cfg.strategy}: a reward model is saved whole from one process; use ddp or deepspeed-zero1/2"
        )
    base = require_causal_lm(store.resolve(cfg.model, kind="run"), store)
    if is_adapter(base):
        raise DistilleryError(
            f"model {base.ref} is an adapter; a reward model starts from whole weights -- merge it first "
            f"(distillery train merge {base.ref})"
        )
    datasets = resolve_datasets(cfg.datasets, store, PAIR_COLUMNS, "a reward model", cfg.curriculum)
    margin = cfg.margin and has_margin(datasets)
    columns = [*PAIR_COLUMNS, *(["margin"] if margin else [])]
    tokenizer = load_tokenizer(base)
    if cfg.chat_template:
        tokenizer.chat_template = chat_template_text(cfg.chat_template)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.peft.target_modules:
        check_target_modules(cfg.peft.target_modules, architecture(base, store), base.ref)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    cfg.check_launch(processes, torch.cuda.is_available())
    train_rows = load_mixture(cfg.datasets, datasets, columns, cfg.seed, curriculum=cfg.curriculum)
    train_rows = train_rows.remove_columns("id")
    if len(train_rows) == 0:
        raise DistilleryError("datasets: the preference datasets have no rows (in this split)")
    eval_rows = None
    if cfg.eval_split:
        held_out = [d.model_copy(update={"split": cfg.eval_split, "weight": None}) for d in cfg.datasets]
        sets = resolve_datasets(held_out, store, PAIR_COLUMNS, "reward-model evaluation")
        eval_rows = load_mixture(held_out, sets, columns, cfg.seed).remove_columns("id")
    conversational = isinstance(train_rows[0]["prompt"], list)
    if conversational and not tokenizer.chat_template:
        raise DistilleryError(
            f"model {base.ref} has no chat template and the pairs are chats; set chat_template: in the recipe"
        )

    recipe = {k: v for k, v in cfg.resolved().items() if k != "resume"}
    recipe |= {"model": base.id, "datasets": pinned(cfg.datasets, datasets), "margin": margin}
    plan = {k: v for k, v in recipe.items() if k not in REPORTING_FIELDS}
    main = int(os.environ.get("RANK", "0")) == 0
    work, last, metrics = trainer_work_folder(store, cfg.name, plan, cfg.resume, main)
    publisher = Publisher(store, kind="run", name=cfg.name, stage="train.reward", recipe=recipe,
                          parents=[*datasets, base], parent_roles={base.id: "base_model"}, seed=cfg.seed,
                          execution={"resume": cfg.resume})  # fmt: skip
    alone = as_a_job_of_one(zero_stage(cfg.strategy) is not None)
    with publisher if main else contextlib.nullcontext() as pub, alone:
        from trl import RewardConfig, RewardTrainer

        torch.manual_seed(cfg.seed)  # the score head's initial weights
        model = _sequence_classifier(base, tokenizer)
        peft_config = _seq_cls_peft(cfg, model, base)
        args = sft_arguments(cfg, work, model, processes, RewardConfig, disable_dropout=True,
                             center_rewards_coefficient=cfg.center_rewards)  # fmt: skip
        watch = trainer_watch(cfg, model, metrics, processes)
        with deepspeed_contradictions():
            trainer = RewardTrainer(model=model, args=args, train_dataset=train_rows, eval_dataset=eval_rows,
                                    processing_class=tokenizer, peft_config=peft_config, callbacks=watch.callbacks)  # fmt: skip
        trainable = count_parameters(p for p in trainer.model.parameters() if p.requires_grad)
        started = time.time()
        result = train_watched(trainer, last, watch, cfg.name, main)
        if result is None:
            return None
        held_out = trainer.evaluate() if eval_rows is not None else {}
        if not main:
            return None
        trained = trainer.accelerator.unwrap_model(trainer.model)
        if peft_config is not None:  # one whole classifier: what every reward-model reader loads
            trained = trained.merge_and_unload()
        trained.save_pretrained(pub.dir / CHECKPOINT_DIR)
        tokenizer.save_pretrained(pub.dir / CHECKPOINT_DIR)
        shutil.copy(metrics, pub.dir / "metrics.jsonl")
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        logged = [r for r in records if "loss" in r] or [{"loss": None}]
        stats = {
            "method": "reward", "peft": cfg.peft.method, "margin": margin, "steps": result.global_step,
            "train_pairs": len(train_rows), "kept_pairs": len(trainer.train_dataset),
            "first_loss": logged[0]["loss"], "final_loss": logged[-1]["loss"], "train_loss": result.training_loss,
            "train_accuracy": logged[-1].get("accuracy"), "wall_s": round(time.time() - started, 2),
            "trainable_parameters": trainable, "guard_triggers": watch.monitor.triggers,
            "processes": trainer.accelerator.num_processes,
            "eval_accuracy": held_out.get("eval_accuracy"), "eval_margin": held_out.get("eval_margin"),
            "eval_loss": held_out.get("eval_loss"), "eval_pairs": len(trainer.eval_dataset) if eval_rows else None,
        }  # fmt: skip
        manifest = pub.publish(stats=stats)
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def run_recipe(data: dict[str, Any], store: Store, source: str) -> Manifest | None:
    return train_reward(parse_config(RewardRecipe, data, source), store)
