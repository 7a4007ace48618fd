"""DeepSpeed ZeRO under the pretraining loop (``strategy: deepspeed-zero1/2/3`` with ``--nproc``).

The loop stays the project's own (``train/pretrain.py``); DeepSpeed's engine takes the model, the
same AdamW and the same schedule, and does what torch does in the other strategies: it averages
and partitions the gradients, clips them, steps the optimizer (whose states -- and with ZeRO-3 the
parameters -- are partitioned over the processes) and the schedule at the end of each gradient
accumulation. The engine applies a step as soon as its last micro-batch is backpropagated, so the
guards see the step's loss and gradient norm after it was applied: ``stop`` and ``rollback`` work
(a rollback reloads the last checkpoint), ``skip`` cannot and is refused.

Checkpoints are DeepSpeed's own (each process writes its partitions) in ``.tmp-step-N/``, renamed
into ``step-N/`` by the first process once every process has written, with a ``COMPLETE`` marker;
the loop's state (data position, losses, guard triggers, RNG) rides along as DeepSpeed's client
state. The published weights are gathered from the last checkpoint in fp32 with DeepSpeed's
``zero_to_fp32``, so they do not depend on the number of processes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from train.checkpoint import COMPLETE, fsync_tree, rng_state, set_rng_state
from train.strategy import deepspeed_config

TAG = "state"


class ZeroEngine:
    """The DeepSpeed engine of one process, with the calls the pretraining loop makes."""

    def __init__(self, model, optimizer, scheduler, *, stage: int, per_device: int, accumulation: int,
                 max_grad_norm: float, precision: str, processes: int):  # fmt: skip
        import deepspeed

        config = deepspeed_config(stage, micro_batch=per_device, accumulation=accumulation,
                                  clipping=max_grad_norm, bf16=precision == "bf16")  # fmt: skip
        config |= {"train_batch_size": per_device * accumulation * processes, "steps_per_print": 2**31 - 1,
                   "fp16": {"enabled": precision == "fp16"}}  # fmt: skip
        self.accumulation = accumulation
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
        )

    def micro_step(self, ids, poison: bool = False) -> float:
        """Forward and backward one micro-batch (the last one of an accumulation also steps);
        returns its share of the step's loss."""
        loss = self.engine(input_ids=ids, labels=ids).loss
        if poison:
            loss = loss * float("nan")
        self.engine.backward(loss)
        self.engine.step()  # a no-op except at the end of an accumulation
        return float(loss.detach()) / self.accumulation

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def save(self, folder: Path, step: int, state: dict[str, Any], main: bool) -> Path:
        """Every process writes its partitions; the first renames the finished folder into place."""
        import torch.distributed as dist

        final, tmp = folder / f"step-{step:06d}", folder / f".tmp-step-{step:06d}"
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        client = {"state": state | {"step": step}, "rng": rng_state()}
        self.engine.save_checkpoint(str(tmp), tag=TAG, client_state=client, save_latest=False)
        dist.barrier()
        if main:
            fsync_tree(tmp)
            (tmp / COMPLETE).write_text(str(step))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in sorted(folder.glob("step-*"))[:-2]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return final

    def load(self, path: Path) -> dict[str, Any]:
        _, client = self.engine.load_checkpoint(str(path), tag=TAG)
        set_rng_state(client["rng"])
        return client["state"]

    def full_weights(self, path: Path) -> dict:
        """The whole model in fp32, from checkpoint ``path`` (on one process)."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(path), tag=TAG)
