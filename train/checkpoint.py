"""Training checkpoints that a kill never half-writes, and that resume a run exactly.

A checkpoint is a folder ``step-000120/`` holding the model weights, the optimizer and scheduler
states, every RNG state (Python, NumPy, torch CPU and CUDA) and the data position (FSDP shards are
gathered into whole states first, so a checkpoint does not depend on the number of processes).
It is written into ``.tmp-step-000120/`` and renamed into place after an fsync, so the newest
complete folder is always a checkpoint a run can resume from; the oldest beyond ``keep`` are
removed. Resuming loads all of it, so a run killed and resumed ends with the same weights as one
that ran through (tested in ``tests/test_train_pretrain.py``).

The transformers Trainer (SFT) writes its own ``checkpoint-N/`` folders in place; there a marker
file written last, once every process has saved its part, tells a complete checkpoint from one a
kill cut short (``trainer_checkpoint_marker``, ``latest_trainer_checkpoint``).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np


def fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def rng_state() -> dict[str, Any]:
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def full_states(model, optimizer, sharded: bool) -> tuple[dict, dict]:
    """Whole (unsharded) model and optimizer states. With FSDP this is a collective: every process
    calls it, and each gets the full states on the CPU."""
    if not sharded:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(
        model, optimizer, options=options
    )


def save(folder: Path, step: int, model, optimizer, scheduler, state: dict[str, Any], keep: int = 2,
         sharded: bool = False, write: bool = True) -> Path:  # fmt: skip
    """Write checkpoint ``step`` under ``folder`` atomically; keep the newest ``keep``. Every process
    calls it (the states are gathered collectively when ``sharded``); only ``write`` ones write."""
    import torch

    weights, optim = full_states(model, optimizer, sharded)
    final = folder / f"step-{step:06d}"
    if not write:
        return final
    tmp = folder / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # torch.save keeps tied weights tied (one tensor under two names), as the model has them.
    torch.save({"model": weights, "optimizer": optim, "scheduler": scheduler.state_dict(), "rng": rng_state(),
                "state": state | {"step": step}}, tmp / "trainer.pt")  # fmt: skip
    fsync_tree(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(folder: Path) -> Path | None:
    """The newest complete checkpoint (a ``.tmp-`` folder never counts)."""
    done = sorted(p for p in folder.glob("step-*") if (p / "trainer.pt").is_file() or (p / COMPLETE).is_file()) \
        if folder.is_dir() else []  # fmt: skip
    return done[-1] if done else None


def load(path: Path, model, optimizer, scheduler, sharded: bool = False) -> dict[str, Any]:
    """Restore a checkpoint into ``model``, ``optimizer`` and ``scheduler``; returns the saved state."""
    import torch

    saved = torch.load(path / "trainer.pt", weights_only=False)
    if sharded:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, saved["model"], options=options)
        set_optimizer_state_dict(model, optimizer, saved["optimizer"], options=options)
    else:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    set_rng_state(saved["rng"])
    return saved["state"]


COMPLETE = "COMPLETE"
"""The marker the last step of saving a Trainer checkpoint writes into it."""


def trainer_checkpoint_marker():
    """A Trainer callback that marks each ``checkpoint-N`` complete once every process has saved it.

    The transformers Trainer writes a checkpoint's files straight into ``checkpoint-N``; a kill in
    the middle leaves a folder that looks like a checkpoint. The marker, written after every file
    is synced (and, under torchrun, after every process has written its part), tells a complete one
    from a partial one; ``latest_trainer_checkpoint`` resumes only from marked ones.
    """
    from transformers import TrainerCallback

    class MarkComplete(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()  # every process's shards (ZeRO, FSDP) are on disk
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                fsync_tree(folder)
                (folder / COMPLETE).write_text(str(state.global_step))
            return control

    return MarkComplete()


def latest_trainer_checkpoint(folder: Path, remove_partial: bool = True) -> Path | None:
    """The newest ``checkpoint-N`` in ``folder`` marked complete; unmarked ones (a save cut short)
    are removed when ``remove_partial`` (by one process only)."""
    if not folder.is_dir():
        return None
    found = sorted((int(p.name.rsplit("-", 1)[1]), p) for p in folder.glob("checkpoint-*")
                   if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit())  # fmt: skip
    complete = [p for _, p in found if (p / COMPLETE).is_file()]
    if remove_partial:
        for _, p in found:
            if not (p / COMPLETE).is_file():
                shutil.rmtree(p, ignore_errors=True)
    return complete[-1] if complete else None


def trainer_work_folder(store, name: str, plan: dict[str, Any], resume: bool, main: bool):
    """(work folder, checkpoint to resume from or None, its ``metrics.jsonl``) of a Trainer-based run.

    The folder is named by a hash of ``plan`` (the recipe minus what only reports), so a resume finds
    the checkpoints of the same training only. A fresh run clears it; a resumed one keeps the metrics
    logged up to its checkpoint (the steps after it are trained again). Under torchrun only the first
    process (``main``) writes.
    """
    import hashlib
    import json
    import sys

    from manifests.hashing import canonical_json
    from manifests.store import claim_work_folder

    work = (
        store.name_dir("run", name)
        / f".work-{hashlib.sha256(canonical_json(plan).encode()).hexdigest()[:16]}"
    )
    if not resume and main:
        shutil.rmtree(work, ignore_errors=True)
    last = latest_trainer_checkpoint(work, remove_partial=main) if resume else None
    if resume and last is None and main:
        print(f"note: no checkpoint of this recipe to resume from in {work.parent}; training from the start",
              file=sys.stderr)  # fmt: skip
    claim_work_folder(work)
    metrics = work / "metrics.jsonl"
    if main and last is not None and metrics.is_file():
        done = int(last.name.rsplit("-", 1)[-1])
        kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= done]
        metrics.write_text("".join(line + "\n" for line in kept))
    elif main and metrics.is_file():
        metrics.unlink()
    return work, last, metrics
