"""The math of policy-gradient RL for language models (PPO, GRPO, RLOO): tensors in, tensors out.

The ppo and grpo recipes call these on the response tokens of a rollout batch; nothing here knows about
models, generation or the Trainer, so each formula can be checked against a hand computation in the tests.

Conventions: a batch is ``[B, T]`` over response tokens, with a ``mask`` ``[B, T]`` (bool or 0/1 float;
1 = a real response token, not a weight). Log-probabilities are per token, natural logs, of the sampled
token. Positions the mask leaves out may hold anything, even ``-inf`` or NaN: every function selects the
real tokens before computing, so padding reaches neither a result nor a gradient. Group methods take
one score per completion, ``[B]``, with the completions of one prompt consecutive::

    scores = [p0a0, p0a1, p0a2, p0a3, p1a0, p1a1, ...]      # group_size = 4

Results are float32 whatever the input dtype. The formulas and where they come from:

- PPO clipped surrogate: ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``, ``r = pi / pi_old``
  (Schulman et al. 2017, "Proximal Policy Optimization Algorithms"; ``eps_high > eps_low`` is DAPO's
  clip-higher, Yu et al. 2025).
- GAE: ``A_t = sum_l (gamma lam)^l delta_{t+l}``, ``delta_t = r_t + gamma V_{t+1} - V_t``
  (Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation").
- Value clipping: ``1/2 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)`` (OpenAI baselines' PPO2;
  not in the PPO paper).
- Reward shaping: ``r_t = -kl_coef KL_t``, plus the sequence score on the last token; the adaptive
  coefficient (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences").
- KL estimators ``k1 = log pi - log pi_ref``, ``k2 = 1/2 (log pi - log pi_ref)^2``,
  ``k3 = pi_ref/pi - log(pi_ref/pi) - 1`` (Schulman 2020, "Approximating KL Divergence"; k3 is GRPO's).
- GRPO advantage: ``(s - mean_group) / (std_group + eps)``, per-sequence loss mean (Shao et al. 2024,
  "DeepSeekMath").
- Dr. GRPO: ``s - mean_group``, loss summed and divided by a constant length (Liu et al. 2025,
  "Understanding R1-Zero-Like Training: A Critical Perspective").
- DAPO: loss summed over tokens and divided by the number of tokens (Yu et al. 2025, "DAPO").
- RLOO: ``s_i - mean_{j != i} s_j`` (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style
  Optimization for Learning from Human Feedback in LLMs").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3"]
AdvantageMethod = Literal["grpo", "dr_grpo", "rloo"]
RewardScale = Literal["group", "batch", "none"]
Aggregation = Literal["token_mean", "sequence_mean", "constant_length"]

KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)
ADVANTAGE_METHODS: tuple[str, ...] = get_args(AdvantageMethod)
REWARD_SCALES: tuple[str, ...] = get_args(RewardScale)
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)

LOSS_TYPES: dict[str, Aggregation] = {
    "grpo": "sequence_mean",
    "bnpo": "token_mean",
    "dapo": "token_mean",
    "dr_grpo": "constant_length",
}
"""TRL's ``GRPOConfig.loss_type`` names (trl 1.16) as aggregations of ``policy_loss``. ``bnpo`` and
``dapo`` differ only in the token count they divide by: bnpo's is the micro-batch's own (the default
here), dapo's that of the whole batch of one optimizer step, across accumulation steps and processes
(pass it as ``token_count``). ``dr_grpo`` divides by ``B * max_length``, TRL's ``max_completion_length``."""

GROUP_STD_EPS = 1e-4
"""Added to the std before dividing, as TRL does: a group whose scores are all equal gets advantages
0 instead of 0/0."""

WHITEN_EPS = 1e-8


# --- masked statistics ----------------------------------------------------------------------------


def _select(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` in float32 with 0 at padding; selecting (not multiplying) keeps a NaN there out of the
    result and out of the gradient."""
    x = x.float()
    return torch.where(mask.bool(), x, torch.zeros_like(x))


def _check_like(mask: Tensor, **tensors: Tensor) -> None:
    for name, tensor in tensors.items():
        if tensor.shape != mask.shape:
            raise ValueError(f"{name} {tuple(tensor.shape)} and mask {tuple(mask.shape)} differ in shape")


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the real tokens, over everything or along ``dim``; 0 where there are none
    (a row without response tokens adds nothing rather than a NaN)."""
    _check_like(mask, x=x)
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    total = _select(x, mask).sum() if dim is None else _select(x, mask).sum(dim)
    return total / count.clamp_min(1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all real tokens; ``unbiased`` applies Bessel's correction ``n / (n - 1)``."""
    count, needed = int(mask.bool().sum()), 2 if unbiased else 1
    if count < needed:
        raise ValueError(f"masked_var: {count} real tokens, fewer than the {needed} the variance needs")
    x = _select(x, mask)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return var * count / (count - 1) if unbiased else var


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """``x`` scaled to unit (unbiased) variance over the real tokens, and centred unless ``shift_mean`` is
    False (whitening rewards keeps their mean; whitening advantages does not); 0 at padding."""
    x = _select(x, mask)
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    white = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        white = white + mean
    return _select(white, mask)


# --- PPO: rewards, advantages, KL ---------------------------------------------------------------


def kl_estimate(logps: Tensor, ref_logps: Tensor, kind: KLEstimator) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs, float32.

    ``k1`` is unbiased but often negative; ``k2`` is low-variance, biased, >= 0; ``k3`` is unbiased and
    >= 0 (GRPO's). All three are 0 where the two models agree.
    """
    if logps.shape != ref_logps.shape:
        raise ValueError(f"logps {tuple(logps.shape)} and ref_logps {tuple(ref_logps.shape)} differ in shape")
    log_ratio = logps.float() - ref_logps.float()
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio  # exp(ref - logp) - 1 - (ref - logp), exact near 0
    raise ValueError(f"KL estimator {kind!r}: expected one of {', '.join(KL_ESTIMATORS)}")


def last_token_index(mask: Tensor) -> Tensor:
    """Index ``[B]`` of the last real token of each row; a row without one raises ValueError."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    last = torch.where(mask.bool(), positions, -1).amax(-1)
    if bool((last < 0).any()):
        raise ValueError(f"rows {(last < 0).nonzero().flatten().tolist()} have no response token")
    return last


def token_rewards(
    scores: Tensor,
    logps: Tensor,
    ref_logps: Tensor,
    mask: Tensor,
    kl_coef: float,
    kl_estimator: KLEstimator = "k1",
) -> tuple[Tensor, Tensor]:
    """PPO's per-token rewards ``[B, T]`` and the KL ``[B, T]`` they were shaped with (0 at padding).

    Every real token gets ``-kl_coef * KL_t``; the last real token of each row also gets the row's
    sequence score (the reward model judges the whole response, which ends there).
    """
    _check_like(mask, logps=logps, ref_logps=ref_logps)
    if scores.shape != mask.shape[:1]:
        raise ValueError(f"scores {tuple(scores.shape)}: expected one per row, [{mask.shape[0]}]")
    kl = _select(kl_estimate(_select(logps, mask), _select(ref_logps, mask), kl_estimator), mask)
    rewards = -kl_coef * kl
    last = last_token_index(mask)
    rewards = rewards.scatter_add(1, last[:, None], scores.float()[:, None])
    return rewards, kl


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimates and returns ``(advantages, returns)``, each ``[B, T]``, 0 at padding.

    ``values[:, t]`` is the value of the state before token ``t``. The episode ends at the last real
    token, so the value after it is 0. Tokens the mask leaves out are skipped as if absent: right or
    left padding, or tool output inside a response, which the policy did not choose. ``returns =
    advantages + values``, the value head's target.
    """
    _check_like(mask, rewards=rewards, values=values)
    real = mask.bool()
    r, v = _select(rewards, mask), _select(values, mask)
    next_value = torch.zeros_like(r[:, 0])
    running = torch.zeros_like(r[:, 0])
    advantages = []
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        step = delta + gamma * lam * running
        running = torch.where(real[:, t], step, running)
        next_value = torch.where(real[:, t], v[:, t], next_value)
        advantages.append(torch.where(real[:, t], step, torch.zeros_like(step)))
    adv = torch.stack(advantages[::-1], dim=1)
    return adv, _select(adv + v, mask)


@dataclass
class FixedKLController:
    """A constant KL coefficient, with the adaptive controller's interface."""

    coef: float

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al.'s KL coefficient, steered towards a target KL.

    ``coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon``: the clip keeps one noisy KL
    estimate from moving the coefficient by more than 20 % of ``n_steps / horizon``.
    """

    def __init__(self, init_coef: float, target: float, horizon: int):
        if not (init_coef >= 0 and target > 0 and horizon > 0):
            raise ValueError(
                f"adaptive KL: init_coef {init_coef} must be >= 0, target {target} and horizon {horizon} > 0"
            )
        self.coef, self.target, self.horizon = float(init_coef), float(target), horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.coef *= 1 + error * n_steps / self.horizon


# --- group advantages (GRPO, Dr. GRPO, RLOO) ------------------------------------------------------


def _groups(scores: Tensor, group_size: int) -> Tensor:
    """``scores`` ``[B]`` as float32 ``[B / group_size, group_size]``."""
    if scores.dim() != 1:
        raise ValueError(f"scores {tuple(scores.shape)}: expected one score per completion, [B]")
    if group_size < 2:
        raise ValueError(f"group_size {group_size}: a group needs at least 2 completions to compare")
    if scores.numel() == 0 or scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    return scores.float().view(-1, group_size)


def group_advantages(
    scores: Tensor,
    group_size: int,
    method: AdvantageMethod = "grpo",
    scale: RewardScale | None = None,
) -> Tensor:
    """One advantage per completion ``[B]`` from its score against the other completions of its prompt.

    - ``grpo``: ``(s - group mean) / (std + 1e-4)``.
    - ``dr_grpo``: ``s - group mean``; ``grpo`` with ``scale="none"``.
    - ``rloo``: ``s - mean of the other n - 1``, i.e. ``n / (n - 1) * (s - group mean)``.

    ``scale`` says where the std comes from, as TRL's ``scale_rewards``: ``group`` (GRPO's default),
    ``batch`` (the std of all B scores, PPO-Lite; the baseline stays the group mean) or ``none``
    (the default of dr_grpo and rloo). The std is unbiased (n - 1), as TRL computes it.
    """
    if method not in ADVANTAGE_METHODS:
        raise ValueError(f"advantage method {method!r}: expected one of {', '.join(ADVANTAGE_METHODS)}")
    if scale is None:
        scale = "group" if method == "grpo" else "none"
    if scale not in REWARD_SCALES:
        raise ValueError(f"reward scale {scale!r}: expected one of {', '.join(REWARD_SCALES)}")
    if method == "dr_grpo" and scale != "none":
        raise ValueError(f"dr_grpo does not scale advantages; for scale={scale!r} use method='grpo'")
    grouped = _groups(scores, group_size)
    n = group_size
    centred = grouped - grouped.mean(1, keepdim=True)
    if method == "rloo":
        centred = centred * n / (n - 1)
    if scale == "group":
        centred = centred / (grouped.std(1, keepdim=True) + GROUP_STD_EPS)
    elif scale == "batch":
        centred = centred / (grouped.std() + GROUP_STD_EPS)
    return centred.flatten()


def zero_spread_groups(scores: Tensor, group_size: int) -> Tensor:
    """Bool ``[B / group_size]``: groups whose scores are all equal, so every advantage is 0 and GRPO
    learns nothing from them (DAPO's dynamic sampling drops and refills them). Equality is exact."""
    grouped = _groups(scores, group_size)
    return grouped.amax(1) == grouped.amin(1)


# --- losses ---------------------------------------------------------------------------------------


def policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    aggregation: Aggregation = "token_mean",
    max_length: int | None = None,
    token_count: float | Tensor | None = None,
    ref_logps: Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: KLEstimator = "k3",
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped surrogate loss (scalar) and detached statistics.

    Per token: ``-min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) + beta * KL(pi || pi_ref)``, where
    ``r = exp(logps - old_logps)`` and ``advantages`` are ``[B]`` (one per sequence, as GRPO and RLOO)
    or ``[B, T]`` (per token, as GAE). ``clip_high`` defaults to ``clip_low``. The tokens are then
    aggregated (see ``LOSS_TYPES`` for TRL's names):

    - ``sequence_mean``: mean over each sequence's tokens, then over sequences (GRPO);
    - ``token_mean``: sum over all tokens / ``token_count``, by default the number of real tokens (DAPO);
    - ``constant_length``: sum over all tokens / ``(B * max_length)`` (Dr. GRPO).

    Statistics, token means over real tokens: ``clip_fraction`` (tokens whose gradient the clip cut,
    split into ``clip_fraction_low`` and ``_high``), ``ratio_mean``, ``approx_kl`` (KL(pi_old || pi),
    the k3 estimate, to watch the policy move), and ``kl`` to the reference when ``ref_logps`` is given.
    """
    _check_like(mask, logps=logps, old_logps=old_logps)
    clip_high = clip_low if clip_high is None else clip_high
    if not (0 <= clip_low < 1 and clip_high >= 0):
        raise ValueError(f"clip range: clip_low {clip_low} must lie in [0, 1), clip_high {clip_high} be >= 0")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation {aggregation!r}: expected one of {', '.join(AGGREGATIONS)}")
    if beta != 0 and ref_logps is None:
        raise ValueError(f"beta {beta} adds a KL to the reference: ref_logps are needed")
    if advantages.shape == mask.shape[:1]:
        advantages = advantages[:, None]
    elif advantages.shape != mask.shape:
        raise ValueError(
            f"advantages {tuple(advantages.shape)}: expected [B] or [B, T] as mask {tuple(mask.shape)}"
        )

    log_ratio = _select(logps, mask) - _select(old_logps, mask)
    ratio = log_ratio.exp()
    adv = _select(advantages.expand_as(ratio), mask)
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    stats: dict[str, Tensor] = {}
    if ref_logps is not None:
        _check_like(mask, ref_logps=ref_logps)
        kl = kl_estimate(_select(logps, mask), _select(ref_logps, mask), kl_estimator)
        if beta != 0:
            per_token = per_token + beta * kl
        stats["kl"] = masked_mean(kl.detach(), mask)

    loss = _aggregate(per_token, mask, aggregation, max_length, token_count)
    with torch.no_grad():
        low = (ratio < 1 - clip_low) & (adv < 0)
        high = (ratio > 1 + clip_high) & (adv > 0)
        stats["clip_fraction"] = masked_mean((low | high).float(), mask)
        stats["clip_fraction_low"] = masked_mean(low.float(), mask)
        stats["clip_fraction_high"] = masked_mean(high.float(), mask)
        stats["ratio_mean"] = masked_mean(ratio, mask)
        stats["approx_kl"] = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return loss, stats


def _aggregate(
    per_token: Tensor,
    mask: Tensor,
    aggregation: Aggregation,
    max_length: int | None,
    token_count: float | Tensor | None,
) -> Tensor:
    if aggregation == "sequence_mean":
        return masked_mean(per_token, mask, dim=-1).mean()
    total = _select(per_token, mask).sum()
    if aggregation == "token_mean":
        count = mask.bool().sum() if token_count is None else torch.as_tensor(token_count)
        return total / count.clamp_min(1)
    if max_length is None or max_length < 1:
        raise ValueError(f"constant_length aggregation needs a max_length >= 1, got {max_length}")
    longest = int(mask.bool().sum(-1).max())
    if longest > max_length:
        raise ValueError(f"a response of {longest} tokens is longer than max_length {max_length}")
    return total / (mask.shape[0] * max_length)


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float | None = 0.2
) -> tuple[Tensor, Tensor]:
    """PPO's value loss ``1/2 max((V - R)^2, (V_clipped - R)^2)``, token mean, and its clip fraction.

    ``V_clipped = V_old + clip(V - V_old, -clip, clip)`` keeps one update from moving the value far
    from the one the advantages were computed with; ``clip=None`` is the plain squared error. The clip
    fraction is the share of real tokens where the clipped term was the larger (detached).
    """
    _check_like(mask, values=values, old_values=old_values, returns=returns)
    v, v_old, ret = _select(values, mask), _select(old_values, mask), _select(returns, mask)
    plain = (v - ret) ** 2
    if clip is None:
        return 0.5 * masked_mean(plain, mask), plain.new_zeros(())
    clipped = (v_old + (v - v_old).clamp(-clip, clip) - ret) ** 2
    loss = 0.5 * masked_mean(torch.max(plain, clipped), mask)
    return loss, masked_mean((clipped > plain).float(), mask).detach()


# --- diagnostics ----------------------------------------------------------------------------------


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy ``-sum p log p`` of the softmax over the last dimension, float32, ``[..., T]`` from
    ``[..., T, V]``. A ``-inf`` logit (a token ruled out) contributes 0. The float32 copy of the logits
    is the caller's memory to budget: chunk the batch for a large vocabulary."""
    log_p = logits.float().log_softmax(-1)
    p = log_p.exp()
    return -(p * torch.where(p > 0, log_p, torch.zeros_like(log_p))).sum(-1)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 - Var[R - V] / Var[R]`` over the real tokens: 1 for a perfect value head, 0 for one that only
    knows the mean, negative for worse; NaN when the returns do not vary."""
    _check_like(mask, values=values, returns=returns)
    ret, v = _select(returns, mask), _select(values, mask)
    var_returns = masked_var(ret, mask, unbiased=False)
    var_error = masked_var(ret - v, mask, unbiased=False)
    return torch.where(var_returns > 0, 1 - var_error / var_returns, math.nan)
