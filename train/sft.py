"""``train`` (method ``sft``): supervised fine-tuning from dataset manifests with TRL, LoRA or full.

    stage: train
    method: sft
    name: demo-sft-run
    model: student-base            # run reference of the base checkpoint
    datasets: [{ref: demo-sft, split: train}]
    peft: {method: lora, r: 8, alpha: 16, target_modules: [q_proj, v_proj]}
    max_steps: 30

Rows need ``messages`` (a chat whose last turn is the assistant's answer); the loss is on the
answer only (TRL's prompt–completion format). The run publishes ``checkpoint/`` (the adapter, or
the full model), ``metrics.jsonl`` (loss per step) and a manifest whose parents are the datasets
and the base model.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from manifests.errors import DistilleryError
from manifests.models import CHECKPOINT_DIR, load_causal_lm
from manifests.publish import Publisher
from manifests.recipes import Name, RecipeConfig, parse_config
from manifests.schema import Manifest
from manifests.store import Store
from train.data import DatasetInput, load_mixture, pinned, resolve_datasets


class PeftSettings(RecipeConfig):
    """Parameter-efficient fine-tuning (``method: none`` trains every weight)."""

    method: Literal["lora", "none"] = "lora"
    r: int = Field(default=8, ge=1)
    alpha: int = Field(default=16, ge=1)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])


class SFTRecipe(RecipeConfig):
    """Supervised fine-tuning of a causal LM on chat data."""

    name: Name
    method: Literal["sft"] = "sft"
    model: str
    """Run reference of the base checkpoint (from ``train import-model`` or ``make-student``)."""
    datasets: list[DatasetInput] = Field(min_length=1)
    peft: PeftSettings = Field(default_factory=PeftSettings)
    max_steps: int = Field(default=30, ge=1)
    per_device_batch_size: int = Field(default=4, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    learning_rate: float = Field(default=2e-4, gt=0)
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    max_length: int = Field(default=512, ge=8)
    bf16: bool = False
    seed: int = 0


def _prompt_completion(row: dict[str, Any]) -> dict[str, Any]:
    messages = row["messages"]
    if not messages or messages[-1]["role"] != "assistant":
        raise DistilleryError(
            f"row {row['id']} does not end with an assistant message; SFT needs one to learn"
        )
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def _metrics_callback(path: Path):
    from transformers import TrainerCallback

    class MetricsWriter(TrainerCallback):
        """Appends every logged step (loss, learning rate, grad norm) to ``metrics.jsonl``."""

        def __init__(self) -> None:
            self.started = time.time()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            record = {"step": state.global_step, "elapsed_s": round(time.time() - self.started, 3)}
            record |= {k: float(v) for k, v in logs.items() if isinstance(v, int | float)}
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")

    return MetricsWriter()


def train_sft(cfg: SFTRecipe, store: Store) -> Manifest:
    datasets = resolve_datasets(cfg.datasets, store, ["id", "messages"], "SFT")
    base = store.resolve(cfg.model, kind="run")

    import torch
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    mixture = load_mixture(cfg.datasets, datasets, ["id", "messages"], cfg.seed)
    train_data = mixture.map(_prompt_completion, remove_columns=mixture.column_names)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_causal_lm(base, store)
    peft_config = None
    if cfg.peft.method == "lora":
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        unknown = [m for m in cfg.peft.target_modules if m not in names]
        if unknown:
            linear = sorted(
                {n.rsplit(".", 1)[-1] for n, mod in model.named_modules() if type(mod).__name__ == "Linear"}
            )
            raise DistilleryError(
                f"peft.target_modules: {', '.join(unknown)} not in model {base.ref}; its linear layers: {', '.join(linear)}"
            )
        peft_config = LoraConfig(
            r=cfg.peft.r, lora_alpha=cfg.peft.alpha, lora_dropout=cfg.peft.dropout,
            target_modules=cfg.peft.target_modules, task_type="CAUSAL_LM",
        )  # fmt: skip
    recipe = cfg.resolved() | {
        "model": base.id,
        "datasets": pinned(cfg.datasets, datasets),
    }
    roles = {base.id: "base_model"}
    with Publisher(store, kind="run", name=cfg.name, stage="train.sft", recipe=recipe, parents=[*datasets, base],
                   parent_roles=roles, seed=cfg.seed) as pub, tempfile.TemporaryDirectory() as work:  # fmt: skip
        args = SFTConfig(
            output_dir=work, max_steps=cfg.max_steps, per_device_train_batch_size=cfg.per_device_batch_size,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
            warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
            max_length=cfg.max_length, bf16=cfg.bf16, seed=cfg.seed, data_seed=cfg.seed, logging_steps=1,
            save_strategy="no", report_to="none", gradient_checkpointing=False, dataloader_num_workers=0,
            use_cpu=not torch.cuda.is_available(),
        )  # fmt: skip
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=train_data, processing_class=tokenizer, peft_config=peft_config,
            callbacks=[_metrics_callback(pub.dir / "metrics.jsonl")],
        )  # fmt: skip
        started = time.time()
        result = trainer.train()
        trainer.model.save_pretrained(pub.dir / CHECKPOINT_DIR)
        tokenizer.save_pretrained(pub.dir / CHECKPOINT_DIR)
        losses = [json.loads(line)["loss"] for line in (pub.dir / "metrics.jsonl").read_text().splitlines()]
        stats = {
            "method": "sft", "peft": cfg.peft.method, "steps": result.global_step, "train_rows": len(train_data),
            "first_loss": losses[0], "final_loss": losses[-1], "train_loss": result.training_loss,
            "wall_s": round(time.time() - started, 2),
            "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        }  # fmt: skip
        return pub.publish(stats=stats)


def run_recipe(data: dict[str, Any], store: Store, source: str) -> Manifest:
    return train_sft(parse_config(SFTRecipe, data, source), store)
