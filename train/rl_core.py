"""The loop pieces every on-policy RL method (GRPO, PPO) shares: which prompts a step takes, the work
folder, sums over processes, and the RL guard rails. Each method's module keeps its own loop."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from manifests.errors import DistilleryError, RunFailed
from manifests.hashing import canonical_json
from manifests.recipes import Name, RecipeConfig
from manifests.schema import Manifest
from manifests.store import Store, claim_work_folder
from train import checkpoint
from train.curriculum import Curriculum
from train.data import DatasetInput, load_mixture, resolve_datasets
from train.launch import Dist
from train.monitor import GuardConfig
from train.peft_config import PeftSettings
from train.rollouts import (
    RewardFunction,
    Rewards,
    drop_after,
    prompt_tokens,
    publish_rollouts,
    rollout_rows,
    sample_answers,
    write_step,
)


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


def step_prompts(rows: int, step: int, per_step: int, seed: int, shuffle: bool = True) -> list[int]:
    """The prompt indexes of ``step`` (1-based): a seeded shuffle per pass over the data, or with
    ``shuffle=False`` the rows' own order every pass (they are already in a curriculum's)."""
    first = (step - 1) * per_step
    if not shuffle:
        return [p % rows for p in range(first, first + per_step)]
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
        cfg.datasets, store, columns, f"{method} (prompts with what the verifiers check)", cfg.curriculum
    )
    rows = load_mixture(cfg.datasets, manifests, columns, cfg.seed, curriculum=cfg.curriculum).to_list()
    if not rows:
        raise DistilleryError("datasets: the prompt datasets have no rows")
    return manifests, rows


class RLRecipe(RecipeConfig):
    """What every on-policy RL recipe has: the policy, prompts and rewards, sampling, the clip, the
    optimizer, checkpoints and guards. A method's recipe adds its own."""

    name: Name
    model: str
    """Run reference of the policy's starting point (also its frozen reference)."""
    datasets: list[DatasetInput] = Field(min_length=1)
    """Prompt datasets: a ``prompt`` column (a chat or text), and what the verifiers check."""
    curriculum: Curriculum | None = None
    """Take the prompts in the order of a score (``train/curriculum.py``), ``prompts_per_step`` at a time
    (each process its share of a step's); without it, a seeded shuffle per pass."""
    rewards: list[RewardFunction] = Field(min_length=1)
    reference_column: str = "reference"
    """The prompts' column that holds the verifiers' reference answer."""
    chat_template: str | None = None
    peft: PeftSettings = Field(default_factory=PeftSettings)
    prompts_per_step: int = Field(default=4, ge=1)
    max_new_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    clip_low: float = Field(default=0.2, gt=0, lt=1)
    clip_high: float | None = Field(default=None, gt=0)
    """The upper clip of the policy ratio (DAPO's clip-higher); by default ``clip_low``."""
    per_device_batch_size: int = Field(default=8, ge=1)
    """Sequences per forward pass (an optimizer step's gradient is accumulated over them)."""
    max_steps: int = Field(default=20, ge=1)
    learning_rate: float = Field(default=1e-5, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    save_every: int = Field(default=10, ge=1)
    resume: bool = False
    guard: RLGuard = Field(default_factory=RLGuard)
    seed: int = 0

    @model_validator(mode="after")
    def _trainable(self) -> RLRecipe:
        if self.peft.is_prompt_learning:
            raise ValueError(f"peft.method {self.peft.method}: RL trains lora, ia3 or the full model")
        return self

    def resolved(self) -> dict[str, Any]:
        data = super().resolved()
        data["peft"] = {k: v for k, v in data["peft"].items() if v is not None}
        return data


@dataclass
class RLInputs:
    """Everything an RL run reads, checked before any model loads."""

    base: Manifest
    tokenizer: Any
    prompts: list[Manifest]
    rows: list[dict[str, Any]]
    rewards: Rewards


def rl_inputs(cfg: RLRecipe, store: Store, method: str) -> RLInputs:
    from manifests.model_runs import require_causal_lm
    from manifests.models import load_tokenizer
    from train.peft_config import check_target_modules
    from train.sft import architecture, chat_template_text

    base = require_causal_lm(store.resolve(cfg.model, kind="run"), store)
    tokenizer = load_tokenizer(base)
    if cfg.chat_template:
        tokenizer.chat_template = chat_template_text(cfg.chat_template)
    prompts, rows = prompt_rows(cfg, store, method)
    rewards = Rewards(cfg.rewards, store, tokenizer, cfg.reference_column)
    if cfg.peft.target_modules:
        check_target_modules(cfg.peft.target_modules, architecture(base, store), base.ref)
    return RLInputs(base, tokenizer, prompts, rows, rewards)


@dataclass
class Group:
    """One prompt's sampled answers, scored."""

    row: dict[str, Any]
    prompt_ids: list[int]
    answers: list[tuple[list[int], bool]]
    """(tokens through the end of sequence, truncated?) of each answer."""
    texts: list[str]
    rewards: list[float]
    parts: list[dict[str, float]]
    verdicts: list[list[dict]]


def sample_groups(cfg: RLRecipe, inputs: RLInputs, model, indexes: list[int], step: int, n: int,
                  truncation_penalty: float = 0.0) -> list[Group]:  # fmt: skip
    """``n`` answers to each prompt of ``indexes``, sampled (seeded by prompt and step) and scored; an
    answer cut at ``max_new_tokens`` loses ``truncation_penalty``."""
    tok = inputs.tokenizer
    eos = [tok.eos_token_id] if isinstance(tok.eos_token_id, int) else list(tok.eos_token_id)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    sampling = {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p}
    model.eval()
    groups = []
    for index in indexes:
        row = inputs.rows[index]
        ids = prompt_tokens(row["prompt"], tok)
        seed = int(hashlib.sha256(f"{cfg.seed} {step} {row['id']}".encode()).hexdigest()[:8], 16)
        answers = sample_answers(model, ids, n, seed, sampling, eos, pad)
        texts = [tok.decode(a, skip_special_tokens=True) for a, _ in answers]
        totals, parts, verdicts = inputs.rewards.score(row, texts)
        totals = [s - truncation_penalty * cut for s, (_, cut) in zip(totals, answers, strict=True)]
        groups.append(Group(row, ids, answers, texts, totals, parts, verdicts))
    return groups


def reward_means(cfg: RLRecipe, groups: list[Group]) -> dict[str, float]:
    """Each reward function's mean score over the step's answers (``reward/<name>``)."""
    answers = max(1, sum(len(g.answers) for g in groups))
    return {
        f"reward/{f.name}": sum(p[f.name] for g in groups for p in g.parts) / answers for f in cfg.rewards
    }


def write_rollouts(folder: Path, plan_key: str, step: int, groups: list[Group], logp_sums: list[float],
                   ref_sums: list[float] | None, advantages: list[float], zero_spread: list[bool]) -> None:  # fmt: skip
    """The step's rollout rows (one per answer, in the groups' order) as its Parquet file."""
    out, at = [], 0
    for g, zero in zip(groups, zero_spread, strict=True):
        k = len(g.answers)
        out += rollout_rows(plan_key, step, g.row, g.answers, g.texts, g.rewards, g.parts, g.verdicts,
                            logp_sums[at : at + k], ref_sums[at : at + k] if ref_sums is not None else None,
                            advantages[at : at + k], zero)  # fmt: skip
        at += k
    write_step(folder, step, out)


def publish_rl_run(cfg: RLRecipe, store: Store, stage: str, inputs: RLInputs, recipe: dict[str, Any], model,
                   work: Path, stats: dict[str, Any], extra_parents: list[tuple[Manifest, str]] | None = None,
                   save_extra=None) -> Manifest:  # fmt: skip
    """The run (policy checkpoint, metrics, ``save_extra(folder)``'s files) and then its rollouts dataset."""
    import time

    from manifests.models import CHECKPOINT_DIR
    from manifests.publish import Publisher

    metrics = work / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    steps = [r for r in records if "reward_mean" in r]
    roles = {inputs.base.id: "base_model"} | {r.id: "reward_model" for r in inputs.rewards.models}
    roles |= {m.id: role for m, role in extra_parents or []}
    parents = [*inputs.prompts, inputs.base, *inputs.rewards.models, *(m for m, _ in extra_parents or [])]
    publisher = Publisher(store, kind="run", name=cfg.name, stage=stage, recipe=recipe, parents=parents,
                          parent_roles=roles, seed=cfg.seed, execution={"resume": cfg.resume})  # fmt: skip
    with publisher as pub:
        model.save_pretrained(pub.dir / CHECKPOINT_DIR)
        inputs.tokenizer.save_pretrained(pub.dir / CHECKPOINT_DIR)
        if save_extra is not None:
            save_extra(pub.dir)
        shutil.copy(metrics, pub.dir / "metrics.jsonl")
        stats = {"peft": cfg.peft.method, "steps": cfg.max_steps,
                 "first_reward": steps[0]["reward_mean"] if steps else None,
                 "final_reward": steps[-1]["reward_mean"] if steps else None,
                 "guard_triggers": [r["guard"] for r in records if "guard" in r]} | stats  # fmt: skip
        stats["wall_s"] = round(time.time() - stats.pop("started"), 2)
        run = pub.publish(stats=stats)
    data = publish_rollouts(store, f"{cfg.name}-rollouts", work / "rollouts", inputs.prompts, run,
                            {"run": run.id, "reward_functions": inputs.rewards.lineage})  # fmt: skip
    print(f"published dataset {data.ref} (the rollouts of run {run.ref})")
    shutil.rmtree(work, ignore_errors=True)
    return run
