"""``train`` (method ``ppo``): proximal policy optimisation with a value model, from prompt datasets.

    stage: train
    method: ppo
    name: arith-ppo
    model: demo-sft-run                       # the policy's start, and its frozen reference
    datasets: [{ref: arith-prompts}]
    rewards: [{reward_model: demo-rm}]        # and/or synth cot's verifiers, weighted (train/rollouts.py)
    value: {model: demo-rm}                   # a separate value model (a reward model's head is a good start),
                                              # or {model: null}: a value head on the policy
    kl: {coef: 0.05, target: 6.0, horizon: 10000, placement: reward}
    ppo_epochs: 4
    minibatches: 2
    peft: {method: lora, r: 8}

TRL has no PPO any more; this is the project's own, on the loop GRPO uses (``train/rl_core.py``,
``train/rollouts.py``). Each step samples answers to ``prompts_per_step`` prompts, scores them (an answer
cut at ``max_new_tokens`` loses ``truncation_penalty``), and scores every answer token with the policy as
it sampled, the frozen reference (the base with the adapter disabled under PEFT, or a frozen copy) and
the value model. The KL to the reference is a per-token penalty in the reward (``placement: reward``,
InstructGPT's) or a term in the loss (``placement: loss``); its coefficient is fixed or adaptive
(Ziegler et al. 2019: steered toward ``target`` nats per answer). Advantages are GAE (``gamma``,
``lam``), whitened over the step's tokens; then ``ppo_epochs`` passes over ``minibatches`` minibatches
train the clipped policy loss (``clip_low``/``clip_high``: asymmetric allowed) plus ``value.coef`` times
the clipped value loss. Every loss is a token mean over the minibatch of all processes, so 2 processes
train what 1 trains.

Logged per step: reward (and each function's), KL and its coefficient, policy and value loss, clip
fractions, entropy, the value's explained variance, answer length and truncation rate, seconds generating
vs training. The rollouts are published as ``<name>-rollouts`` (advantage: each answer's mean token
advantage); the value model is saved beside the policy in ``value/``.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import Field, model_validator

from manifests.errors import DistilleryError
from manifests.model_runs import require_causal_lm, require_sequence_classifier
from manifests.models import checkpoint_path, is_adapter, load_causal_lm, load_tokenizer
from manifests.recipes import RecipeConfig, parse_config
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
from train.rl_losses import (
    WHITEN_EPS,
    AdaptiveKLController,
    FixedKLController,
    KLEstimator,
    explained_variance,
    gae,
    policy_loss,
    token_rewards,
    value_loss,
)
from train.rollouts import (
    answer_logps,
    packed,
    without_dropout,
)


class KLSettings(RecipeConfig):
    coef: float = Field(default=0.05, ge=0)
    """The KL coefficient (the adaptive controller's start)."""
    target: float | None = Field(default=None, gt=0)
    """Nats of KL per answer to steer toward (adaptive controller); None keeps ``coef`` fixed."""
    horizon: int = Field(default=10000, ge=1)
    placement: Literal["reward", "loss"] = "reward"
    """``reward``: a per-token penalty in the reward (before GAE); ``loss``: a term of the policy loss."""
    estimator: KLEstimator = "k1"

    def used(self) -> bool:
        """Whether the reference is run at all (a coefficient that is, or may become, above 0)."""
        return self.coef > 0 or self.target is not None


class ValueSettings(RecipeConfig):
    model: str | None = None
    """A run whose weights start the value model (a reward model's score head is kept); None: a value head
    on the policy's last hidden state (shared trunk)."""
    coef: float = Field(default=0.1, gt=0)
    """The value loss's weight in the total loss."""
    clip: float = Field(default=0.2, gt=0)
    """How far a value may move from the one it had when the rollout was made (clipped value loss)."""


class PPORecipe(RLRecipe):
    """PPO of a causal LM on prompts with reward functions, a value model and a frozen reference."""

    method: Literal["ppo"] = "ppo"
    value: ValueSettings = Field(default_factory=ValueSettings)
    kl: KLSettings = Field(default_factory=KLSettings)
    prompts_per_step: int = Field(default=8, ge=1)
    samples_per_prompt: int = Field(default=1, ge=1)
    truncation_penalty: float = Field(default=0.0, ge=0)
    """Subtracted from the reward of an answer cut at ``max_new_tokens`` (no end of sequence)."""
    gamma: float = Field(default=1.0, ge=0, le=1)
    lam: float = Field(default=0.95, ge=0, le=1)
    whiten_advantages: bool = True
    ppo_epochs: int = Field(default=4, ge=1)
    minibatches: int = Field(default=1, ge=1)
    """Minibatches each epoch splits the step's answers into (an optimizer step each)."""
    value_learning_rate: float | None = Field(default=None, gt=0)
    """The value model's (or head's) learning rate; by default ``learning_rate``."""

    @model_validator(mode="after")
    def _consistent(self) -> PPORecipe:
        if self.guard.kl_ceiling is not None and self.kl.coef == 0 and self.kl.target is None:
            raise ValueError(
                "guard.kl_ceiling watches the KL to the reference; kl.coef 0 does not compute it"
            )
        return self


def value_run_of(cfg: PPORecipe, store: Store, policy_tokenizer) -> Manifest | None:
    """The run that starts a separate value model, checked (None: a value head on the policy)."""
    if cfg.value.model is None:
        return None
    from manifests.models import tokenizer_fingerprint

    run = store.resolve(cfg.value.model, kind="run")
    try:  # a reward model (its trained head starts the values) or a causal LM (a fresh head)
        require_sequence_classifier(run)
    except DistilleryError:
        require_causal_lm(run, store)
    if is_adapter(run):
        raise DistilleryError(
            f"value model {run.ref} is an adapter; merge it first (distillery train merge {run.ref})"
        )
    if tokenizer_fingerprint(load_tokenizer(run)) != tokenizer_fingerprint(policy_tokenizer):
        raise DistilleryError(
            f"value model {run.ref} has another tokenizer than the policy; give one of the policy's"
        )
    return run


def value_model(run: Manifest | None, policy):
    """A value head on the policy's last hidden state (``run`` None), or a separate value model from ``run``."""
    import torch

    if run is None:
        head = torch.nn.Linear(policy.config.get_text_config().hidden_size, 1)
        torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)  # values start at 0: no early bias
        return head
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(checkpoint_path(run), num_labels=1)


def separate_values(model, sequences, device):
    """Values of the state before every answer token from a separate sequence-classification model: its
    trunk over the padding-free row, its score head at the answers' positions."""
    row = packed(sequences, device)
    hidden = model.base_model(input_ids=row.input_ids, position_ids=row.position_ids).last_hidden_state[0]
    return row.place(model.score(hidden[row.mask]).squeeze(-1).float())


def whiten_everywhere(dist: Dist, x, mask):
    """``x`` whitened over the real tokens of every process (so 2 processes whiten what 1 does)."""
    import torch

    count = all_reduce(dist, mask.sum().double().reshape(1))
    mean = all_reduce(dist, (x * mask).sum().double().reshape(1)) / count
    var = all_reduce(dist, (((x - mean) ** 2) * mask).sum().double().reshape(1)) / (count - 1).clamp(min=1)
    return ((x - mean) * torch.rsqrt(var + WHITEN_EPS) * mask).float()


def train_ppo(cfg: PPORecipe, store: Store) -> Manifest | None:
    inputs = rl_inputs(cfg, store, "PPO")  # every check before a model loads
    value_run = value_run_of(cfg, store, inputs.tokenizer)
    dist = setup()
    try:
        return _train(cfg, store, inputs, value_run, dist)
    finally:
        teardown(dist)


def _train(
    cfg: PPORecipe, store: Store, inputs: RLInputs, value_run: Manifest | None, dist: Dist
) -> Manifest | None:
    import torch

    base, rows = inputs.base, inputs.rows
    torch.manual_seed(cfg.seed)
    model, _ = load_causal_lm(base, store, **model_load_kwargs(cfg.peft))
    value = value_model(value_run, model)
    recipe = {k: v for k, v in cfg.resolved().items() if k != "resume"}  # (resuming changes nothing)
    recipe |= {"model": base.id, "datasets": pinned(cfg.datasets, inputs.prompts),
                               "reward_functions": inputs.rewards.lineage,
                               "value_model": value_run.id if value_run else None}  # fmt: skip
    work, plan_key, last = rl_work_folder(store, cfg, recipe, dist.main)
    metrics_path, rollouts = work / "metrics.jsonl", work / "rollouts"
    peft_config = build_peft_config(cfg.peft, model, str(checkpoint_path(base)))
    reference = None
    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    elif cfg.kl.used():
        reference = load_causal_lm(base, store)[0].eval().requires_grad_(False)
    without_dropout(model)
    trained = torch.nn.ModuleDict({"policy": model, "value": value}).to(dist.device)  # (saved as one)
    if reference is not None:
        reference.to(dist.device)
    groups_of_params = [
        {"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.learning_rate},
        {"params": list(value.parameters()), "lr": cfg.value_learning_rate or cfg.learning_rate},
    ]
    params = [p for g in groups_of_params for p in g["params"]]
    optimizer = torch.optim.AdamW(groups_of_params, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    controller = (
        AdaptiveKLController(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon)
        if cfg.kl.target
        else FixedKLController(cfg.kl.coef)
    )
    start = resume_state(last, trained, optimizer, scheduler, rollouts, metrics_path, dist.main)
    if last is not None:
        controller.coef = torch.load(last / "trainer.pt", weights_only=False)["state"]["kl_coef"]
    vocab = model.config.get_text_config().vocab_size
    shared = cfg.value.model is None
    triggers: list[dict[str, Any]] = []
    low_entropy = 0
    started = time.time()

    def score_tokens(part, grad: bool):
        """(logps, mask, entropy, values) of ``part`` under the policy and value model."""
        with torch.set_grad_enabled(grad):
            logps, mask, entropy, values = answer_logps(model, part, vocab, entropy=not grad, temperature=cfg.temperature,
                                                        value_head=value if shared else None)  # fmt: skip
            if not shared:
                values = separate_values(value, part, dist.device)
        return logps, mask, entropy, values

    for step in range(start + 1, cfg.max_steps + 1):
        t0 = time.time()
        chosen = step_prompts(len(rows), step, cfg.prompts_per_step, cfg.seed, shuffle=cfg.curriculum is None)
        groups = sample_groups(cfg, inputs, model, chosen[dist.rank :: dist.world], step, cfg.samples_per_prompt,
                               cfg.truncation_penalty)  # fmt: skip
        generation_s = time.time() - t0
        t1 = time.time()
        sequences = [(g.prompt_ids, a) for g in groups for a, _ in g.answers]
        scores = torch.tensor([s for g in groups for s in g.rewards], dtype=torch.float32, device=dist.device)
        # --- the rollout as sampled: policy, reference and value of every answer token (no gradients)
        width = max(len(a) for _, a in sequences)
        old_logps = torch.zeros(len(sequences), width, device=dist.device)
        ref_logps, old_values, mask, entropy = (torch.zeros_like(old_logps) for _ in range(4))
        for first in range(0, len(sequences), cfg.per_device_batch_size):
            part = sequences[first : first + cfg.per_device_batch_size]
            lp, m, ent, val = score_tokens(part, grad=False)
            span = slice(first, first + len(part))
            old_logps[span, : lp.size(1)], mask[span, : m.size(1)] = lp, m
            entropy[span, : ent.size(1)], old_values[span, : val.size(1)] = ent, val.detach()
            with torch.no_grad():
                if not cfg.kl.used():  # no KL anywhere: the reference is not run (its log-ratio is 0)
                    ref = lp
                elif reference is not None:
                    ref = answer_logps(reference, part, vocab, temperature=cfg.temperature)[0]
                else:
                    with model.disable_adapter():
                        ref = answer_logps(model, part, vocab, temperature=cfg.temperature)[0]
            ref_logps[span, : ref.size(1)] = ref
        in_reward = cfg.kl.placement == "reward"
        token_reward, kl = token_rewards(scores, old_logps, ref_logps, mask, controller.coef if in_reward else 0.0,
                                         cfg.kl.estimator)  # fmt: skip
        advantages, returns = gae(token_reward, old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = whiten_everywhere(dist, advantages, mask)
        # --- ppo_epochs x minibatches optimizer steps, each a token mean over every process's minibatch
        model.train()
        local = list(range(len(sequences)))
        split = [local[i :: cfg.minibatches] for i in range(cfg.minibatches)]
        sums = {"policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0, "value_clip_fraction": 0.0}
        reason, grad_norm, updates = None, 0.0, 0
        for _epoch in range(cfg.ppo_epochs):
            for batch in split:
                tokens = float(all_reduce(dist, mask[batch].sum().double().reshape(1)))
                if tokens == 0:
                    continue
                optimizer.zero_grad(set_to_none=True)
                total = torch.zeros((), device=dist.device, dtype=torch.float64)
                for first in range(0, len(batch), cfg.per_device_batch_size):
                    idx = batch[first : first + cfg.per_device_batch_size]
                    lp, m, _, val = score_tokens([sequences[i] for i in idx], grad=True)
                    t = lp.size(1)
                    pl, stats = policy_loss(
                        lp, old_logps[idx, :t], advantages[idx, :t], m, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                        aggregation="token_mean", token_count=tokens, ref_logps=None if in_reward else ref_logps[idx, :t],
                        beta=0.0 if in_reward else controller.coef, kl_estimator=cfg.kl.estimator,
                    )  # fmt: skip
                    vl, vclip = value_loss(val, old_values[idx, :t], returns[idx, :t], m, clip=cfg.value.clip)
                    share = float(m.sum()) / tokens
                    loss = pl + cfg.value.coef * vl * share
                    loss.backward()
                    total += loss.detach().double()
                    sums["policy_loss"] += float(pl.detach())
                    sums["value_loss"] += float(vl.detach()) * share
                    sums["clip_fraction"] += float(stats["clip_fraction"]) * share
                    sums["value_clip_fraction"] += float(vclip) * share
                reduce_gradients(dist, params)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
                reason = nan_reason(cfg.guard, float(all_reduce(dist, total.reshape(1))), grad_norm)
                if reason is not None:
                    break
                optimizer.step()
                updates += 1
            if reason is not None:
                break
        training_s = time.time() - t1
        sequence_kl = float(all_reduce(dist, kl.sum().double().reshape(1))) / max(
            1.0, float(all_reduce(dist, torch.tensor([float(len(sequences))], dtype=torch.float64)))
        )
        controller.update(sequence_kl, int(cfg.prompts_per_step * cfg.samples_per_prompt))
        n = max(1, updates)
        lengths = mask.sum(1)
        values = {
            "reward_mean": float(scores.mean()), "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
            "kl": float(kl.sum() / mask.sum().clamp(min=1)), "kl_per_answer": sequence_kl,
            "kl_coef": controller.coef, "policy_loss": sums["policy_loss"] / n, "value_loss": sums["value_loss"] / n,
            "loss": (sums["policy_loss"] + cfg.value.coef * sums["value_loss"]) / n,
            "clip_ratio": sums["clip_fraction"] / n, "value_clip_ratio": sums["value_clip_fraction"] / n,
            "entropy": float((entropy * mask).sum() / mask.sum().clamp(min=1)),
            "explained_variance": float(explained_variance(old_values, returns, mask)) if mask.sum() > 1 else 0.0,
            "grad_norm": grad_norm, "length_mean": float(lengths.float().mean()),
            "length_max": float(lengths.max()), "truncated": sum(c for g in groups for _, c in g.answers) / len(sequences),
            "generation_s": round(generation_s, 3), "training_s": round(training_s, 3),
        }  # fmt: skip
        values = mean_over_processes(
            dist, {k: v if v == v else 0.0 for k, v in (values | reward_means(cfg, groups)).items()}
        )
        reason = reason or rl_reason(cfg.guard, values, low_entropy)
        low_entropy = (low_entropy + 1
                       if cfg.guard.entropy_floor is not None and values["entropy"] < cfg.guard.entropy_floor else 0)  # fmt: skip
        if dist.main:
            append_metrics(metrics_path, {"step": step, **{k: round(v, 6) for k, v in values.items()},
                                          "elapsed_s": round(time.time() - started, 3)})  # fmt: skip
            logp_sums, ref_sums = (old_logps * mask).sum(1).tolist(), (ref_logps * mask).sum(1).tolist()
            answer_advantage = ((advantages * mask).sum(1) / lengths.clamp(min=1)).tolist()
            zero = [len(set(g.rewards)) == 1 and len(g.rewards) > 1 for g in groups]
            write_rollouts(rollouts, plan_key, step, groups, logp_sums, ref_sums, answer_advantage, zero)
        prompt_ids = [rows[i]["id"] for i in chosen]
        if reason is not None and guard_acts(cfg, reason, step, prompt_ids, triggers, work, metrics_path, dist.main,
                                             trained, optimizer, scheduler):  # fmt: skip
            low_entropy = 0
            continue
        save_every(cfg, step, work, trained, optimizer, scheduler, {"kl_coef": controller.coef}, dist.main)
    if not dist.main:
        return None

    def save_value(folder):
        if shared:
            from safetensors.torch import save_file

            (folder / "value").mkdir()
            save_file({k: v.detach().cpu().contiguous() for k, v in value.state_dict().items()},
                      str(folder / "value" / "value_head.safetensors"))  # fmt: skip
        else:
            value.save_pretrained(folder / "value")

    stats = {"method": "ppo", "value": "shared" if shared else "separate", "final_kl_coef": controller.coef,
             "processes": dist.world, "started": started}  # fmt: skip
    extra = [(value_run, "value_model")] if value_run else None
    return publish_rl_run(cfg, store, "train.ppo", inputs, recipe, model, work, stats, extra, save_value)


def run_recipe(data: dict[str, Any], store: Store, source: str) -> Manifest | None:
    return train_ppo(parse_config(PPORecipe, data, source), store)
