"""How a run spreads over its processes: the recipe's ``strategy`` → DDP, FSDP or DeepSpeed ZeRO.

    strategy: deepspeed-zero2      # ddp | fsdp | deepspeed-zero1 | deepspeed-zero2 | deepspeed-zero3
    offload: true                  # ZeRO-Offload: optimizer states (ZeRO-3: parameters too) in CPU memory

- ``ddp``: a whole model per process, gradients averaged (the default, and what one process runs).
- ``fsdp``: torch FSDP2, each decoder layer a unit; parameters, gradients and optimizer states are
  sharded over the processes and gathered layer by layer (what ZeRO-3 does, in torch itself).
- ``deepspeed-zero1/2/3``: DeepSpeed's ZeRO -- optimizer states (1), and gradients (2), and
  parameters (3) partitioned over the processes.

The Trainer-based methods (SFT) hand these to the transformers Trainer, which runs them through
accelerate: ``trainer_arguments`` gives its ``fsdp``/``deepspeed`` settings, and
``accelerate_config`` writes the same choice as an accelerate config file for ``accelerate launch``
(``distillery train run RECIPE --emit-accelerate FILE``), with the DeepSpeed config beside it
(``auto`` where the recipe decides: batch sizes, clipping, precision). A run started with
``accelerate launch`` on those files uses the DeepSpeed file as it is then (edits take effect; the
run's manifest keeps the config it trained with).

Pretraining runs its own loop: ``ddp`` and ``fsdp`` on torch, the DeepSpeed strategies through
DeepSpeed's engine under that loop (``train/zero.py``), with the same ``deepspeed_config``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Literal

from manifests.errors import DistilleryError

Strategy = Literal["ddp", "fsdp", "deepspeed-zero1", "deepspeed-zero2", "deepspeed-zero3"]


def zero_stage(strategy: str) -> int | None:
    """The ZeRO stage of a DeepSpeed strategy (None for ddp and fsdp)."""
    return int(strategy[-1]) if strategy.startswith("deepspeed-zero") else None


def strategy_problem(strategy: str, guard_action: str) -> str | None:
    """What a recipe asks that ``strategy`` cannot do here, in one line (None: nothing)."""
    if zero_stage(strategy) is None:
        return None
    if guard_action == "skip":
        return (
            f"guard.action skip cannot be done under {strategy}: DeepSpeed applies a step before the guards see it "
            "(its gradients are partitioned out of reach); use guard.action stop (pretraining: rollback too)"
        )
    if importlib.util.find_spec("deepspeed") is None:
        return (
            f"strategy {strategy} needs DeepSpeed: pip install 'distillery[deepspeed]' (on a machine without CUDA "
            "build tools: DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed)"
        )
    return None


def deepspeed_config(
    stage: int, *, micro_batch: int | str = "auto", accumulation: int | str = "auto",
    clipping: float | str = "auto", bf16: bool | str = "auto", offload: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """A DeepSpeed config for ZeRO ``stage``; ``auto`` values are filled in by the Trainer."""
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
    if stage == 3:
        # The published checkpoint must be whole: gather the 16-bit weights when saving.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": "auto",
        "gradient_clipping": clipping,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
    }


def layer_classes(model) -> list[str]:
    """The model's decoder layer classes: FSDP's wrapping units."""
    names = list(getattr(model, "_no_split_modules", None) or [])
    if not names:
        raise ValueError(f"{type(model).__name__} does not name its decoder layers (_no_split_modules)")
    return names


def trainer_arguments(strategy: str, model, *, processes: int, offload: bool = False) -> dict[str, Any]:
    """Keyword arguments of the transformers ``TrainingArguments`` (TRL's configs) for ``strategy``.

    Under ``accelerate launch`` with a DeepSpeed config file (``--emit-accelerate``), that file is
    used, so edits to it take effect; its ZeRO stage must be the recipe's.
    """
    stage = zero_stage(strategy)
    if stage is not None:
        launched_with = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if launched_with:
            return {"deepspeed": _checked_file(launched_with, stage, strategy)}
        return {"deepspeed": deepspeed_config(stage, offload=offload)}
    if strategy == "fsdp" and processes > 1:  # one process: nothing to shard
        config = {"version": 2, "transformer_layer_cls_to_wrap": layer_classes(model), "reshard_after_forward": True,
                  "state_dict_type": "FULL_STATE_DICT", "cpu_offload": offload}  # fmt: skip
        return {"fsdp": True, "fsdp_config": config}
    return {}


def _checked_file(path: str, stage: int, strategy: str) -> str:
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DistilleryError(f"DeepSpeed config {path}: cannot be read as JSON ({e})") from None
    found = config.get("zero_optimization", {}).get("stage") if isinstance(config, dict) else None
    if found != stage:
        raise DistilleryError(
            f"DeepSpeed config {path} has ZeRO stage {found}, the recipe's strategy is {strategy}; make them agree "
            "(write both again with --emit-accelerate)"
        )
    return path


def accelerate_config(
    strategy: str, *, processes: int, machines: int, layers: list[str], bf16: bool,
    deepspeed_file: str | None = None, offload: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """An accelerate config (the YAML of ``accelerate config``) for ``strategy`` on ``machines`` nodes
    of ``processes`` processes in all; DeepSpeed strategies point at ``deepspeed_file``."""
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "num_processes": processes,
        "num_machines": machines,
        "machine_rank": 0,
        "main_training_function": "main",
        "mixed_precision": "bf16" if bf16 else "no",
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
    }
    if zero_stage(strategy) is not None:
        del config["mixed_precision"]  # accelerate refuses it beside a DeepSpeed file (whose bf16 says it)
        config["distributed_type"] = "DEEPSPEED"
        config["deepspeed_config"] = {
            "deepspeed_config_file": deepspeed_file,
            "zero3_init_flag": strategy.endswith("3"),
        }
    elif strategy == "fsdp":
        config["distributed_type"] = "FSDP"
        config["fsdp_config"] = {
            "fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": ",".join(layers), "fsdp_reshard_after_forward": True,
            "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_offload_params": offload,
        }  # fmt: skip
    else:
        config["distributed_type"] = "MULTI_GPU" if processes > 1 else "NO"
    return config
