"""``train`` (method ``grpo``): group relative policy optimisation with verifiable or learned rewards.

    stage: train
    method: grpo
    name: arith-grpo
    model: student-base
    datasets: [{ref: arith-prompts}]          # prompt (+ reference, tests)
    rewards: [{verifier: numeric}]            # synth cot's verifiers and/or reward-model runs, weighted
    group_size: 8                             # answers sampled per prompt
    prompts_per_step: 4
    loss_type: dapo                           # grpo | dr_grpo | dapo (TRL's names and meanings)
    beta: 0.0                                 # KL to the reference in the loss (0: no reference model)
    peft: {method: lora, r: 8}

Each step takes ``prompts_per_step`` prompts (a seeded shuffle, or a ``curriculum:``'s order), samples
``group_size`` answers to each from the policy (transformers' ``generate``; seeded per prompt and step,
so the answers do not depend on how prompts are split over processes, and a resumed run samples what the
killed one did), scores them with the reward functions (``train/rollouts.py``), and turns each group's
rewards into advantages (GRPO: reward minus the group mean, over the group's standard deviation;
``advantage: rloo``: minus the mean of the others).
The policy then takes ``updates_per_batch`` optimizer steps on the clipped surrogate
(``train/rl_losses.py``), with the KL to the reference -- the base with the adapter disabled under PEFT,
or a frozen copy -- when ``beta`` > 0. This is the project's own loop, not TRL's GRPOTrainer: it owns the
rollouts, which are published as a dataset (``<name>-rollouts``) whose parents are the prompts and the run.

Logged per step in ``metrics.jsonl``: reward mean and std (and each function's mean), the share of
groups whose rewards were all equal (nothing to learn), KL, clip ratio, entropy, answer lengths and
truncation rate, seconds generating vs training. RL guard rails (``guard:``) stop or roll back on a
NaN, on entropy below ``entropy_floor`` for ``entropy_patience`` steps (collapse), on a KL above
``kl_ceiling``, and on a mean answer length above ``length_ceiling``; every trigger is kept with the
ids of that step's prompts.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import Field, model_validator

from manifests.models import checkpoint_path, load_causal_lm
from manifests.recipes import parse_config
from manifests.schema import Manifest
from manifests.store import Store
from train.data import pinned
from train.launch import Dist, setup, teardown
from train.peft_config import build_peft_config, model_load_kwargs
from train.rl_core import (
    RLInputs,
    RLRecipe,
    all_reduce,
    append_metrics,
    guard_acts,
    mean_over_processes,
    nan_reason,
    publish_rl_run,
    reduce_gradients,
    resume_state,
    reward_means,
    rl_inputs,
    rl_reason,
    rl_work_folder,
    sample_groups,
    save_every,
    step_prompts,
    write_rollouts,
)
from train.rl_losses import LOSS_TYPES, KLEstimator, group_advantages, policy_loss, zero_spread_groups
from train.rollouts import (
    answer_logps,
    without_dropout,
)


class GRPORecipe(RLRecipe):
    """Group relative policy optimisation of a causal LM on prompts with reward functions."""

    method: Literal["grpo"] = "grpo"
    group_size: int = Field(default=4, ge=1)
    """Answers sampled per prompt (at least 2: the advantages compare a group's answers)."""
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "dapo"
    """How token losses are averaged: ``grpo`` per answer then over answers, ``dapo`` over every token of the
    step, ``dr_grpo`` summed and divided by answers x ``max_new_tokens``."""
    advantage: Literal["grpo", "rloo"] = "grpo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Where GRPO's reward standard deviation comes from (``none``: Dr. GRPO's unscaled advantages)."""
    beta: float = Field(default=0.0, ge=0)
    """The KL-to-reference term's weight in the loss (0: no reference model)."""
    kl_estimator: KLEstimator = "k3"
    updates_per_batch: int = Field(default=1, ge=1)
    """Optimizer steps on each batch of rollouts (μ); after the first, the ratio to the sampling policy clips."""
    warmup_steps: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> GRPORecipe:
        if self.group_size < 2:
            raise ValueError(
                f"group_size {self.group_size}: GRPO compares the answers of a group, so it needs at least 2"
            )
        if self.guard.kl_ceiling is not None and self.beta == 0:
            raise ValueError(
                "guard.kl_ceiling watches the KL to the reference, which beta: 0 does not compute"
            )
        if self.loss_type == "dr_grpo" and self.scale_rewards != "none":
            self.__dict__["scale_rewards"] = "none"  # Dr. GRPO's advantages are never scaled
        return self


def train_grpo(cfg: GRPORecipe, store: Store) -> Manifest | None:
    inputs = rl_inputs(cfg, store, "GRPO")  # every check before a model loads
    dist = setup()
    try:
        return _train(cfg, store, inputs, dist)
    finally:
        teardown(dist)


def _train(cfg: GRPORecipe, store: Store, inputs: RLInputs, dist: Dist) -> Manifest | None:
    import torch

    base, rows = inputs.base, inputs.rows
    recipe = {k: v for k, v in cfg.resolved().items() if k != "resume"}  # (resuming changes nothing)
    recipe |= {"model": base.id, "datasets": pinned(cfg.datasets, inputs.prompts),
                               "reward_functions": inputs.rewards.lineage}  # fmt: skip
    work, plan_key, last = rl_work_folder(store, cfg, recipe, dist.main)
    metrics_path, rollouts = work / "metrics.jsonl", work / "rollouts"
    torch.manual_seed(cfg.seed)
    model, _ = load_causal_lm(base, store, **model_load_kwargs(cfg.peft))
    model.to(dist.device)
    peft_config = build_peft_config(cfg.peft, model, str(checkpoint_path(base)))
    reference = None
    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    elif cfg.beta > 0:
        reference = load_causal_lm(base, store)[0].to(dist.device).eval().requires_grad_(False)
    without_dropout(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    warmup = max(1, cfg.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    start = resume_state(last, model, optimizer, scheduler, rollouts, metrics_path, dist.main)
    vocab = model.config.get_text_config().vocab_size
    aggregation = LOSS_TYPES[cfg.loss_type]
    method = "rloo" if cfg.advantage == "rloo" else ("dr_grpo" if cfg.scale_rewards == "none" else "grpo")
    scale = None if method != "grpo" else cfg.scale_rewards
    triggers: list[dict[str, Any]] = []
    low_entropy = 0
    started = time.time()
    for step in range(start + 1, cfg.max_steps + 1):
        # --- rollouts: this process's share of the step's prompts, each group sampled and scored
        t0 = time.time()
        chosen = step_prompts(len(rows), step, cfg.prompts_per_step, cfg.seed, shuffle=cfg.curriculum is None)
        groups = sample_groups(cfg, inputs, model, chosen[dist.rank :: dist.world], step, cfg.group_size)
        generation_s = time.time() - t0
        # --- advantages per group, and the batch's sequences
        t1 = time.time()
        scores = torch.tensor([s for g in groups for s in g.rewards], dtype=torch.float32)
        if scale == "batch" and dist.world > 1:  # the std of the whole step's rewards, over every process
            import torch.distributed as td

            everyone = [torch.zeros_like(scores) for _ in range(dist.world)]
            td.all_gather(
                everyone, scores
            )  # (every process has as many prompts: prompts_per_step / processes)
            batch_std = torch.cat(everyone).std()
            advantages = (
                scores - scores.view(-1, cfg.group_size).mean(1).repeat_interleave(cfg.group_size)
            ) / (batch_std + 1e-4)
        else:
            advantages = group_advantages(scores, cfg.group_size, method, scale=scale)
        zero = zero_spread_groups(scores, cfg.group_size)
        sequences = [(g.prompt_ids, a) for g in groups for a, _ in g.answers]
        answer_tokens = torch.tensor([len(a) for _, a in sequences], dtype=torch.float32)
        counts = all_reduce(dist, torch.tensor([float(len(sequences)), float(answer_tokens.sum())]))
        total_sequences, total_tokens = counts.tolist()
        model.train()
        old: list[Any] = []
        ref_sums: list[float] | None = None
        logged: dict[str, float] = {"loss": 0.0, "kl": 0.0, "clip_ratio": 0.0, "entropy": 0.0}
        grad_norm = 0.0
        for update in range(cfg.updates_per_batch):
            optimizer.zero_grad(set_to_none=True)
            sums = {k: 0.0 for k in logged}
            logp_sums: list[float] = []
            refs: list[float] = []
            for first in range(0, len(sequences), cfg.per_device_batch_size):
                part = sequences[first : first + cfg.per_device_batch_size]
                logps, mask, entropy, _ = answer_logps(
                    model, part, vocab, entropy=update == 0, temperature=cfg.temperature
                )
                if update == 0:
                    old.append(logps.detach())
                ref_logps = None
                if cfg.beta > 0:
                    with torch.no_grad():
                        if reference is not None:
                            ref_logps = answer_logps(reference, part, vocab, temperature=cfg.temperature)[0]
                        else:
                            with model.disable_adapter():
                                ref_logps = answer_logps(model, part, vocab, temperature=cfg.temperature)[0]
                    refs += (ref_logps * mask).sum(1).tolist()
                adv = advantages[first : first + len(part)].to(logps.device)
                loss, stats = policy_loss(
                    logps, old[first // cfg.per_device_batch_size], adv, mask, clip_low=cfg.clip_low,
                    clip_high=cfg.clip_high, aggregation=aggregation, max_length=cfg.max_new_tokens,
                    token_count=total_tokens if aggregation == "token_mean" else None,
                    ref_logps=ref_logps, beta=cfg.beta, kl_estimator=cfg.kl_estimator,
                )  # fmt: skip
                if aggregation != "token_mean":  # a mean over this part's answers -> its share of the step's
                    loss = loss * len(part) / total_sequences
                loss.backward()  # (summed over parts and processes: the step's loss)
                weight = len(part) / max(1, len(sequences))
                sums["loss"] += float(loss.detach())
                sums["kl"] += float(stats.get("kl", torch.tensor(0.0))) * weight
                sums["clip_ratio"] += float(stats["clip_fraction"]) * weight
                if update == 0:
                    sums["entropy"] += float((entropy * mask).sum() / mask.sum().clamp(min=1)) * weight
                logp_sums += (logps.detach() * mask).sum(1).tolist()
            reduce_gradients(dist, params)
            sums["loss"] = float(all_reduce(dist, torch.tensor(sums["loss"], dtype=torch.float64)))
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            if update == 0:
                logged = dict(sums)
                first_logp_sums, ref_sums = logp_sums, (refs if cfg.beta > 0 else None)
            reason = nan_reason(cfg.guard, float(sums["loss"]), grad_norm)
            if reason is not None:
                break
            optimizer.step()
        scheduler.step()
        training_s = time.time() - t1
        # --- metrics, guards, rollouts
        lengths = answer_tokens
        truncated = sum(t for g in groups for _, t in g.answers)
        values = {"reward_mean": float(scores.mean()), "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
                  "zero_spread": float(zero.float().mean()), "kl": logged["kl"], "clip_ratio": logged["clip_ratio"],
                  "entropy": logged["entropy"], "loss": logged["loss"], "grad_norm": grad_norm,
                  "length_mean": float(lengths.mean()), "length_max": float(lengths.max()),
                  "truncated": truncated / max(1, len(lengths)), "generation_s": round(generation_s, 3),
                  "training_s": round(training_s, 3), "lr": scheduler.get_last_lr()[0]}  # fmt: skip
        values = mean_over_processes(dist, values | reward_means(cfg, groups))
        reason = reason or rl_reason(cfg.guard, values, low_entropy)
        low_entropy = (
            low_entropy + 1
            if cfg.guard.entropy_floor is not None and values["entropy"] < cfg.guard.entropy_floor
            else 0
        )
        if dist.main:
            record = {
                "step": step,
                **{k: round(v, 6) for k, v in values.items()},
                "elapsed_s": round(time.time() - started, 3),
            }
            append_metrics(metrics_path, record)
            write_rollouts(rollouts, plan_key, step, groups, first_logp_sums, ref_sums, advantages.tolist(),
                           zero.tolist())  # fmt: skip
        if reason is not None:
            prompt_ids = [rows[i]["id"] for i in chosen]
            if guard_acts(cfg, reason, step, prompt_ids, triggers, work, metrics_path, dist.main, model, optimizer,
                          scheduler):  # fmt: skip
                low_entropy = 0
                continue  # rolled back: the next step takes the next prompts
        save_every(cfg, step, work, model, optimizer, scheduler, {}, dist.main)
    if not dist.main:
        return None
    stats = {"method": "grpo", "loss_type": cfg.loss_type, "processes": dist.world, "started": started}
    return publish_rl_run(cfg, store, "train.grpo", inputs, recipe, model, work, stats)


def run_recipe(data: dict[str, Any], store: Store, source: str) -> Manifest | None:
    return train_grpo(parse_config(GRPORecipe, data, source), store)
