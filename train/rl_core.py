"""The loop pieces every on-policy RL method (GRPO, PPO) shares: which prompts a step takes, the work
folder, sums over processes, and the RL guard rails. Each method's module keeps its own loop."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from pydantic import Field

from manifests.errors import DistilleryError, RunFailed
from manifests.hashing import canonical_json
from manifests.store import Store, claim_work_folder
from train import checkpoint
from train.data import load_mixture, resolve_datasets
from train.launch import Dist
from train.monitor import GuardConfig
from train.rollouts import drop_after


class RLGuard(GuardConfig):
    """The core's guards (NaN) and RL's own: entropy collapse, KL blow-up, answers running away."""

    entropy_floor: float | None = Field(default=None, ge=0)
    """Mean token entropy below this for ``entropy_patience`` steps in a row is a collapse."""
    entropy_patience: int = Field(default=3, ge=1)
    kl_ceiling: float | None = Field(default=None, gt=0)
    """A mean per-token KL to the reference above this (needs ``beta`` > 0)."""
    length_ceiling: float | None = Field(default=None, gt=0)
    """A mean answer length (tokens) above this."""


def _order(rows: int, epoch: int, seed: int) -> list[int]:
    import random

    order = list(range(rows))
    random.Random(f"{seed} {epoch}").shuffle(order)
    return order


def step_prompts(rows: int, step: int, per_step: int, seed: int) -> list[int]:
    """The prompt indexes of ``step`` (1-based): a seeded shuffle per pass over the data."""
    first = (step - 1) * per_step
    return [_order(rows, p // rows, seed)[p % rows] for p in range(first, first + per_step)]


def all_reduce(dist: Dist, tensor):
    if dist.world > 1:
        import torch.distributed as td

        td.all_reduce(tensor)
    return tensor


def reduce_gradients(dist: Dist, params) -> None:
    """Sum every gradient over the processes (each loss was already divided by the global count)."""
    if dist.world == 1:
        return
    import torch.distributed as td

    for p in params:
        if p.grad is not None:
            td.all_reduce(p.grad)


def rl_work_folder(store: Store, cfg, plan: dict[str, Any], main: bool):
    """(work folder, its plan key, checkpoint to resume from or None) of an RL run; a fresh run clears it."""
    key = hashlib.sha256(canonical_json(plan).encode()).hexdigest()[:16]
    work = store.name_dir("run", cfg.name) / f".work-{key}"
    if not cfg.resume and main:
        shutil.rmtree(work, ignore_errors=True)
    last = checkpoint.latest(work / "checkpoints") if cfg.resume else None
    if cfg.resume and last is None and main:
        print(f"note: no checkpoint of this recipe to resume from in {work.parent}; training from the start",
              file=sys.stderr)  # fmt: skip
    claim_work_folder(work)
    return work, key, last


def mean_over_processes(dist: Dist, values: dict[str, float]) -> dict[str, float]:
    if dist.world == 1:
        return values
    import torch

    keys = sorted(values)
    summed = all_reduce(dist, torch.tensor([values[k] for k in keys], dtype=torch.float64)) / dist.world
    out = dict(zip(keys, summed.tolist(), strict=True))
    out["loss"] = values["loss"]  # (already the whole step's)
    return out


def nan_reason(guard: RLGuard, loss: float, grad_norm: float) -> str | None:
    if not math.isfinite(loss):
        return "nan_loss"
    if not math.isfinite(grad_norm):
        return "nan_grad"
    return None


def rl_reason(guard: RLGuard, values: dict[str, float], low_entropy: int) -> str | None:
    if (
        guard.entropy_floor is not None
        and values["entropy"] < guard.entropy_floor
        and low_entropy + 1 >= guard.entropy_patience
    ):
        return "entropy_collapse"
    if guard.kl_ceiling is not None and values["kl"] > guard.kl_ceiling:
        return "kl_blowup"
    if guard.length_ceiling is not None and values["length_mean"] > guard.length_ceiling:
        return "length_explosion"
    return None


def resume_state(last, model, optimizer, scheduler, rollouts: Path, metrics: Path, main: bool) -> int:
    """The step to continue after: a checkpoint's (restored into the model, optimizer and scheduler), or
    0; the rollouts and metrics of later steps are forgotten (they are made again)."""
    start = checkpoint.load(last, model, optimizer, scheduler)["step"] if last is not None else 0
    if main:
        drop_after(rollouts, start)
        if metrics.is_file():
            kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= start]
            metrics.write_text("".join(line + "\n" for line in kept))
    return start


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def guard_acts(cfg, reason: str, step: int, prompt_ids: list[str], triggers: list[dict[str, Any]], work: Path,
               metrics: Path, main: bool, model, optimizer, scheduler) -> bool:  # fmt: skip
    """Record a guard's trigger with the step's prompts and act: ``stop`` raises, ``rollback`` restores the
    last checkpoint (True), ``skip`` goes on (the step's update was not applied)."""
    action = "stop" if len(triggers) >= cfg.guard.max_triggers else cfg.guard.action
    trigger = {"step": step, "reason": reason, "action": action, "prompts": prompt_ids}
    triggers.append(trigger)
    if main:
        append_metrics(metrics, {"step": step, "guard": trigger})
    what = reason.replace("_", " ")
    if action == "stop":
        raise RunFailed(
            f"{cfg.name}: {what} at step {step}; stopped as guard.action says -- the step's prompts are in "
            f"{metrics} ('guard: {{action: rollback}}' goes back to the last checkpoint)"
        )
    if action == "rollback":
        good = checkpoint.latest(work / "checkpoints")
        if good is None:
            raise RunFailed(f"{cfg.name}: {what} at step {step} and no checkpoint to roll back to")
        checkpoint.load(good, model, optimizer, scheduler)
        return True
    return False


def save_every(
    cfg, step: int, work: Path, model, optimizer, scheduler, state: dict[str, Any], main: bool
) -> None:
    """A checkpoint every ``cfg.save_every`` steps (not at the last: the run is published then)."""
    if step % cfg.save_every or step >= cfg.max_steps:
        return
    checkpoint.save(work / "checkpoints", step, model, optimizer, scheduler, state, write=main)
    if main and os.environ.get("DISTILLERY_FAULT_EXIT_AFTER_STEP") == str(step):
        os._exit(137)  # fault injection for tests: killed right after this step's checkpoint


def prompt_rows(cfg, store: Store, method: str):
    """The prompt datasets (checked for the columns the reward functions read) and their rows."""
    needs_reference = any(f.verifier and f.verifier != "tests" for f in cfg.rewards)
    needs_tests = any(f.verifier == "tests" for f in cfg.rewards)
    columns = [
        "id",
        "prompt",
        *([cfg.reference_column] if needs_reference else []),
        *(["tests"] if needs_tests else []),
    ]
    manifests = resolve_datasets(
        cfg.datasets, store, columns, f"{method} (prompts with what the verifiers check)"
    )
    rows = load_mixture(cfg.datasets, manifests, columns, cfg.seed).to_list()
    if not rows:
        raise DistilleryError("datasets: the prompt datasets have no rows")
    return manifests, rows
