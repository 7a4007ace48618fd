"""The loss functions of preference optimisation (DPO and its variants): tensors in, tensors out.

The dpo recipe computes, for each preference pair, the summed log-probabilities of the chosen and the
rejected completion under the policy and under the frozen reference, and hands them here as a
``PairLogps``; nothing here knows about models, batches or the Trainer, so each formula can be checked
against a direct computation in the tests. A batch of one pair, each field a tensor of one value::

    PairLogps(chosen=[-41.2], rejected=[-57.9], ref_chosen=[-43.0], ref_rejected=[-55.1],
              chosen_tokens=[18], rejected_tokens=[23])

Conventions: a log-prob is the *sum* over the completion's tokens (the prompt is not counted), natural
log; ``ref`` is the frozen reference policy; the log-ratio of a completion is ``logp - ref_logp`` and its
implicit reward ``beta * (logp - ref_logp)``. Losses are per pair ``[pairs]`` and the caller averages, the
way TRL's ``DPOTrainer`` does (whose names, defaults and numbers these follow, since users compare with
it). Everything is computed in float32, or float64 when the input is float64.

The variants (``beta`` is each paper's regularisation strength: IPO's τ, SPPO's η⁻¹ ...):

- ``sigmoid``: DPO, Rafailov et al. 2023 (arXiv 2305.18290), ``-log σ(β Δ)``.
- ``hinge``: SLiC-HF's calibration loss (Zhao et al. 2023, 2305.10425) as used by RSO (2309.06657).
- ``ipo``: IPO, Azar et al. 2023 (2310.12036), squared distance to ``1 / 2β`` of per-token log-ratios.
- ``exo_pair``: EXO, Ji et al. 2024 (2402.00856), reverse KL to the ``[1 - ε, ε]`` label distribution.
- ``nca_pair``: NCA, Chen et al. 2024 (2402.05369), absolute rather than relative likelihoods.
- ``robust``: Robust DPO, Chowdhury et al. 2024 (2403.00409), unbiased under labels flipped with prob. ε.
- ``bco_pair``: BCO, Jung et al. 2024 (2404.04656), each completion a binary classification.
- ``sppo_hard``: SPPO, Wu et al. 2024 (2405.00675), with the win probability hard-set to 1 and 0.
- ``aot``, ``aot_unpaired``: AOT, Melnyk et al. 2024 (2406.05882), stochastic dominance over the batch.
- ``apo_zero``, ``apo_down``: APO, D'Oosterlinck et al. 2024 (2408.06266), anchored to the reference.
- ``discopop``: DiscoPOP, Lu et al. 2024 (2406.08414), a log-ratio modulated logistic/exponential blend.
- ``sigmoid_norm``: DPO on per-token mean log-ratios (length-normalised, as in SimPO, reference kept).
- ``sft``: the chosen completion's mean NLL per token, mixed in as in RPO (2404.19733) or MPO (2411.10442).

``divergence`` swaps DPO's reverse-KL regulariser for another f-divergence (f-DPO, Wang et al. 2023,
2309.16240): each log-ratio goes through ``f'`` before the chosen − rejected difference is taken.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

PreferenceLoss = Literal[
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "sft",
]
FDivergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]

PREFERENCE_LOSSES: tuple[str, ...] = get_args(PreferenceLoss)
F_DIVERGENCES: tuple[str, ...] = get_args(FDivergence)

REVERSE_KL_ONLY: frozenset[str] = frozenset(
    {"nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down"}
)
"""Losses not built on the chosen − rejected score difference. f-DPO's reparameterisation leaves a
``β log Z(x)`` term that cancels only in that difference, so these have no f-divergence version."""

LABEL_SMOOTHED: frozenset[str] = frozenset({"robust", "exo_pair", "aot", "aot_unpaired"})
"""The losses that read ``label_smoothing``."""

_EXP_CLAMP = 80.0
"""Largest exponent of an f-divergence score: e^80 ≈ 5.5e34 leaves float32 (max 3.4e38) room for the
differences and the β that follow, where a policy far from its reference would otherwise give inf."""


@dataclass(frozen=True)
class PairLogps:
    """The summed log-probs of a batch of preference pairs, each a 1-D tensor ``[pairs]``.

    ``chosen``/``rejected`` come from the policy (they carry the gradient), ``ref_chosen``/``ref_rejected``
    from the frozen reference. ``chosen_tokens``/``rejected_tokens`` count each completion's tokens; only
    ``ipo``, ``sigmoid_norm`` and ``sft`` read them, and a count of 0 is taken as 1.
    """

    chosen: Tensor
    rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor

    def __post_init__(self) -> None:
        shapes = {name: tuple(getattr(self, name).shape) for name in self.__dataclass_fields__}
        if len(set(shapes.values())) != 1 or len(shapes["chosen"]) != 1:
            described = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
            raise ValueError(f"PairLogps: every field must be 1-D [pairs] of one length; got {described}")

    def logratios(self) -> tuple[Tensor, Tensor]:
        """``logp - ref_logp`` of the chosen and the rejected completions, in the computation dtype."""
        dtype = self._dtype()
        return (
            self.chosen.to(dtype) - self.ref_chosen.to(dtype),
            self.rejected.to(dtype) - self.ref_rejected.to(dtype),
        )

    def token_counts(self) -> tuple[Tensor, Tensor]:
        """The completions' token counts as floats, at least 1 (an empty completion is not a division by 0)."""
        dtype = self._dtype()
        return self.chosen_tokens.to(dtype).clamp_min(1.0), self.rejected_tokens.to(dtype).clamp_min(1.0)

    def _dtype(self) -> torch.dtype:
        logps = (self.chosen, self.rejected, self.ref_chosen, self.ref_rejected)
        return torch.float64 if any(t.dtype == torch.float64 for t in logps) else torch.float32


# --- f-divergences --------------------------------------------------------------------------------


def divergence_scores(logratios: Tensor, kind: FDivergence, alpha: float = 0.5) -> Tensor:
    """``f'(t)`` of the f-DPO paper at ``t = exp(logratios)``: what replaces a log-ratio in the loss.

    - ``reverse_kl``: ``log t``, the log-ratio itself (plain DPO).
    - ``forward_kl``: ``1 - 1/t``.
    - ``js_divergence``: ``log(2t / (1 + t)) = log 2 + log σ(log t)``.
    - ``alpha_divergence``: ``(t^(α-1) - 1) / (α - 1)``; ``α = 1`` is the limit ``log t``, reverse KL.
      ``alpha`` is TRL's ``f_alpha_divergence_coef``; the paper writes ``f'(u) = (1 - u^-a) / a``, the
      same function with ``a = 1 - alpha`` (the two agree at the default 0.5).

    Exponents are clamped at 80 so a policy far from its reference gives a large score, not inf.
    """
    if kind not in F_DIVERGENCES:
        raise ValueError(f"f-divergence {kind!r}: expected one of {', '.join(F_DIVERGENCES)}")
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return logratios
    if kind == "forward_kl":
        return 1 - torch.exp((-logratios).clamp_max(_EXP_CLAMP))
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    power = ((alpha - 1.0) * logratios).clamp_max(_EXP_CLAMP)
    return (torch.exp(power) - 1.0) / (alpha - 1.0)


def check_divergence(losses: Sequence[str], kind: str) -> None:
    """Raise ``ValueError`` unless every loss in ``losses`` has a version under f-divergence ``kind``."""
    if kind not in F_DIVERGENCES:
        raise ValueError(f"f-divergence {kind!r}: expected one of {', '.join(F_DIVERGENCES)}")
    unsupported = [loss for loss in losses if loss in REVERSE_KL_ONLY]
    if kind != "reverse_kl" and unsupported:
        supported = [loss for loss in PREFERENCE_LOSSES if loss not in REVERSE_KL_ONLY]
        raise ValueError(
            f"f-divergence {kind!r} does not apply to {', '.join(unsupported)}: those losses are not built on "
            f"the chosen - rejected reward difference, so only 'reverse_kl' is valid for them; "
            f"{kind!r} works with {', '.join(supported)}"
        )


# --- losses ---------------------------------------------------------------------------------------


def check_options(
    kinds: Sequence[str],
    beta: float,
    label_smoothing: float,
    divergence: str,
    alpha: float,
    discopop_tau: float,
) -> None:
    """Raise ``ValueError`` naming the first option that the losses ``kinds`` cannot take (a recipe calls
    this when it is read, so that a mistake costs no model load)."""
    unknown = [kind for kind in kinds if kind not in PREFERENCE_LOSSES]
    if unknown:
        raise ValueError(f"preference loss {unknown[0]!r}: expected one of {', '.join(PREFERENCE_LOSSES)}")
    if not kinds:
        raise ValueError(f"no preference loss given: expected one or more of {', '.join(PREFERENCE_LOSSES)}")
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta {beta}: must be a finite number > 0")
    check_divergence(kinds, divergence)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha {alpha}: the alpha-divergence coefficient must be finite")
    if "discopop" in kinds and not (math.isfinite(discopop_tau) and discopop_tau > 0):
        raise ValueError(f"discopop_tau {discopop_tau}: must be a finite number > 0")
    if "robust" in kinds and not 0 <= label_smoothing < 0.5:
        raise ValueError(
            f"label_smoothing {label_smoothing}: for 'robust' it is the probability that a preference label "
            "is flipped and must lie in [0, 0.5) (the Robust DPO paper suggests 0.1)"
        )
    if "exo_pair" in kinds and not 0 < label_smoothing < 1:
        raise ValueError(
            f"label_smoothing {label_smoothing}: for 'exo_pair' it is EXO's ε, the probability the target "
            "puts on the rejected completion; it enters as log ε and log(1 - ε), so it must lie in (0, 1) "
            "(the EXO paper suggests 1e-3)"
        )
    if not 0 <= label_smoothing <= 1:
        raise ValueError(f"label_smoothing {label_smoothing}: must lie in [0, 1]")
    if label_smoothing != 0 and not LABEL_SMOOTHED & set(kinds):
        # Older TRL releases smoothed 'sigmoid' (conservative DPO); today it ignores label_smoothing, and so
        # does this module: a recipe carried over would silently train without it.
        raise ValueError(
            f"label_smoothing {label_smoothing} is read only by {', '.join(sorted(LABEL_SMOOTHED))}; "
            f"{', '.join(kinds)} would ignore it"
        )


def _smoothed_logistic(margin: Tensor, label_smoothing: float) -> Tensor:
    """``-(1 - ε) log σ(m) - ε log σ(-m)``: a logistic loss whose label is right with probability 1 - ε."""
    return -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)


def _per_pair_loss(
    kind: str,
    pairs: PairLogps,
    beta: float,
    label_smoothing: float,
    divergence: FDivergence,
    alpha: float,
    discopop_tau: float,
) -> Tensor:
    """One loss per pair; the options were checked by the caller."""
    chosen_ratio, rejected_ratio = pairs.logratios()
    if kind in REVERSE_KL_ONLY:
        return _reward_loss(kind, pairs, chosen_ratio, rejected_ratio, beta, label_smoothing)
    if kind == "sft":
        chosen_tokens, _ = pairs.token_counts()
        return -pairs.chosen.to(chosen_tokens.dtype) / chosen_tokens
    chosen_score = divergence_scores(chosen_ratio, divergence, alpha)
    rejected_score = divergence_scores(rejected_ratio, divergence, alpha)
    if kind in ("ipo", "sigmoid_norm"):
        # IPO's paper writes sequence log-ratios; its authors' results are per token (as TRL notes), and
        # without the division the squared loss would grow with completion length.
        chosen_tokens, rejected_tokens = pairs.token_counts()
        per_token = chosen_score / chosen_tokens - rejected_score / rejected_tokens
        if kind == "ipo":
            return (per_token - 1 / (2 * beta)) ** 2
        return -F.logsigmoid(beta * per_token)
    margin = beta * (chosen_score - rejected_score)
    if kind == "sigmoid":
        return -F.logsigmoid(margin)
    if kind == "hinge":
        return torch.relu(1 - margin)
    if kind == "exo_pair":
        # KL(softmax over {chosen, rejected} of the implicit rewards || [1 - ε, ε]), EXO's Eq. 16 for K = 2.
        log_chosen_target, log_rejected_target = math.log1p(-label_smoothing), math.log(label_smoothing)
        chosen_share = torch.sigmoid(margin) * (F.logsigmoid(margin) - log_chosen_target)
        return chosen_share + torch.sigmoid(-margin) * (F.logsigmoid(-margin) - log_rejected_target)
    if kind == "robust":
        # Chowdhury et al.'s unbiased estimator: averaged over labels flipped with probability ε, it equals
        # the logistic loss on the true labels; hence the flipped term's minus sign and the 1 - 2ε.
        clean = -(1 - label_smoothing) * F.logsigmoid(margin)
        flipped = -label_smoothing * F.logsigmoid(-margin)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    # discopop, Eq. 5 of the paper: σ(m / τ) moves the weight from the logistic to the exponential loss as m
    # grows. exp(-m) σ(m / τ) is taken as one exponent, since apart, a very negative m gives inf * 0 = nan.
    mix = torch.sigmoid(margin / discopop_tau)
    exponential = torch.exp(F.logsigmoid(margin / discopop_tau) - margin)
    return -F.logsigmoid(margin) * (1 - mix) + exponential


def _reward_loss(
    kind: str,
    pairs: PairLogps,
    chosen_ratio: Tensor,
    rejected_ratio: Tensor,
    beta: float,
    label_smoothing: float,
) -> Tensor:
    """The losses built on each completion's own log-ratio rather than on their difference."""
    chosen_reward, rejected_reward = beta * chosen_ratio, beta * rejected_ratio
    if kind == "nca_pair":
        return (
            -F.logsigmoid(chosen_reward)
            - 0.5 * F.logsigmoid(-chosen_reward)
            - 0.5 * F.logsigmoid(-rejected_reward)
        )
    if kind == "bco_pair":
        return -F.logsigmoid(chosen_reward) - F.logsigmoid(-rejected_reward)
    if kind == "sppo_hard":
        return (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
    if kind == "apo_zero":
        return (1 - torch.sigmoid(chosen_reward)) + torch.sigmoid(rejected_reward)
    if kind == "apo_down":
        return torch.sigmoid(chosen_reward) + (1 - torch.sigmoid(chosen_reward - rejected_reward))
    # AOT compares the batch's sorted quantities, not pair i with pair i: the i-th loss belongs to the i-th
    # smallest, so per-pair weights (WPO-style) cannot be applied to it.
    if kind == "aot":
        dtype = chosen_ratio.dtype
        policy_gap = (pairs.chosen.to(dtype) - pairs.rejected.to(dtype)).sort().values
        ref_gap = (pairs.ref_chosen.to(dtype) - pairs.ref_rejected.to(dtype)).sort().values
        return _smoothed_logistic(beta * (policy_gap - ref_gap), label_smoothing)
    # aot_unpaired: the chosen and the rejected log-ratios sorted separately, as if drawn independently.
    gap = chosen_ratio.sort().values - rejected_ratio.sort().values
    return _smoothed_logistic(beta * gap, label_smoothing)


def preference_loss(
    kind: PreferenceLoss,
    pairs: PairLogps,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    divergence: FDivergence = "reverse_kl",
    alpha: float = 0.5,
    discopop_tau: float = 0.05,
) -> Tensor:
    """The per-pair loss ``[pairs]`` of preference loss ``kind``; the caller takes the mean.

    ``label_smoothing`` is Robust DPO's flip probability (in [0, 0.5)), EXO's ε (in (0, 1)) or AOT's
    smoothing, and is refused where no loss reads it. ``divergence`` and ``alpha`` choose the f-DPO
    regulariser (``alpha`` only for ``alpha_divergence``); ``discopop_tau`` is DiscoPOP's temperature.

    ``sft`` is each pair's own mean NLL per chosen token, ``-chosen / chosen_tokens``; TRL instead averages
    over all the chosen tokens of the batch, which weighs long completions more. The two agree when the
    chosen completions are of one length.
    """
    check_options([kind], beta, label_smoothing, divergence, alpha, discopop_tau)
    return _per_pair_loss(kind, pairs, beta, label_smoothing, divergence, alpha, discopop_tau)


def preference_losses(
    kinds: Sequence[str],
    weights: Sequence[float] | None,
    pairs: PairLogps,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    divergence: FDivergence = "reverse_kl",
    alpha: float = 0.5,
    discopop_tau: float = 0.05,
) -> Tensor:
    """The weighted sum ``[pairs]`` of several losses' per-pair values; the caller takes the mean.

    ``weights`` default to 1 each; MPO, for one, mixes ``["sigmoid", "bco_pair", "sft"]`` at ``[0.8, 0.2,
    1.0]``. The options are shared by all ``kinds``, as in TRL, and ``label_smoothing`` only needs one of
    them to read it.
    """
    weights = [1.0] * len(kinds) if weights is None else list(weights)
    if len(weights) != len(kinds):
        raise ValueError(f"{len(kinds)} preference losses ({', '.join(kinds)}) but {len(weights)} weights")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"preference loss weights {weights} must be finite")
    check_options(kinds, beta, label_smoothing, divergence, alpha, discopop_tau)
    parts = [
        weight * _per_pair_loss(kind, pairs, beta, label_smoothing, divergence, alpha, discopop_tau)
        for kind, weight in zip(kinds, weights, strict=True)
    ]
    return torch.stack(parts).sum(0)


# --- metrics --------------------------------------------------------------------------------------


def implicit_rewards(pairs: PairLogps, beta: float) -> tuple[Tensor, Tensor]:
    """DPO's implicit rewards ``β (logp - ref_logp)`` ``[pairs]`` of the chosen and the rejected completions.

    They are the plain reverse-KL rewards whatever loss trained the policy, as TRL logs them.
    """
    chosen_ratio, rejected_ratio = pairs.logratios()
    return beta * chosen_ratio, beta * rejected_ratio


def reward_metrics(pairs: PairLogps, beta: float) -> dict[str, float]:
    """The batch means TRL logs, under TRL's names: rewards, their margin and accuracy, and the policy logps.

    ``rewards/accuracies`` is the share of pairs whose chosen reward is strictly above the rejected one.
    """
    with torch.no_grad():
        chosen, rejected = implicit_rewards(pairs, beta)
        dtype = chosen.dtype
        return {
            "rewards/chosen": chosen.mean().item(),
            "rewards/rejected": rejected.mean().item(),
            "rewards/margins": (chosen - rejected).mean().item(),
            "rewards/accuracies": (chosen > rejected).to(dtype).mean().item(),
            "logps/chosen": pairs.chosen.to(dtype).mean().item(),
            "logps/rejected": pairs.rejected.to(dtype).mean().item(),
        }
