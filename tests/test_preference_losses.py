"""The preference losses against direct float64 computations, pair by pair in plain ``math``.

The references never call the module's formulas: each pair's log-ratios, f-divergence scores and loss
are written out from the papers' equations (``f'(t)`` at ``t = exp(log-ratio)``, ``σ(x) = 1 / (1 + e^-x)``,
AOT's sorted lists), so a wrong sign, a swapped side or a missing β shows up as a number that does not
match.
"""

from __future__ import annotations

import math

import pytest
import torch

from train.preference_losses import (
    F_DIVERGENCES,
    PREFERENCE_LOSSES,
    REVERSE_KL_ONLY,
    PairLogps,
    check_divergence,
    divergence_scores,
    implicit_rewards,
    preference_loss,
    preference_losses,
    reward_metrics,
)

PAIRS = 7
BETAS = [0.05, 0.5, 2.0]
SMOOTHING = {
    "robust": [0.0, 0.1, 0.35],
    "exo_pair": [1e-3, 0.2],
    "aot": [0.0, 0.1],
    "aot_unpaired": [0.0, 0.25],
}


def _pairs(seed: int = 0, dtype: torch.dtype = torch.float64, spread: float = 3.0) -> PairLogps:
    """Summed log-probs of a plausible size, the reference ``spread`` nats around the policy."""
    g = torch.Generator().manual_seed(seed)
    chosen = -torch.rand(PAIRS, generator=g, dtype=torch.float64) * 60 - 2
    rejected = -torch.rand(PAIRS, generator=g, dtype=torch.float64) * 60 - 2
    ref_chosen = chosen + torch.randn(PAIRS, generator=g, dtype=torch.float64) * spread
    ref_rejected = rejected + torch.randn(PAIRS, generator=g, dtype=torch.float64) * spread
    chosen_tokens = torch.randint(1, 40, (PAIRS,), generator=g)
    rejected_tokens = torch.randint(1, 40, (PAIRS,), generator=g)
    return PairLogps(
        chosen.to(dtype),
        rejected.to(dtype),
        ref_chosen.to(dtype),
        ref_rejected.to(dtype),
        chosen_tokens,
        rejected_tokens,
    )


def _close(got: torch.Tensor, expected: list[float], rtol: float = 1e-10, atol: float = 1e-12) -> None:
    torch.testing.assert_close(
        got.double(), torch.tensor(expected, dtype=torch.float64), rtol=rtol, atol=atol
    )


# --- float64 references ---------------------------------------------------------------------------


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def _log_sigmoid(x: float) -> float:
    return math.log(_sigmoid(x)) if x > -30 else x - math.log1p(math.exp(x))


def _score(logratio: float, divergence: str, alpha: float) -> float:
    """f'(t) of the f-DPO paper, written in t = exp(log-ratio) as the paper writes it."""
    t = math.exp(logratio)
    if divergence == "reverse_kl" or (divergence == "alpha_divergence" and alpha == 1):
        return math.log(t)
    if divergence == "forward_kl":
        return 1 - 1 / t
    if divergence == "js_divergence":
        return math.log(2 * t / (1 + t))
    return (t ** (alpha - 1) - 1) / (alpha - 1)


def _rows(pairs: PairLogps) -> list[tuple[float, float, float, float, int, int]]:
    fields = (pairs.chosen, pairs.rejected, pairs.ref_chosen, pairs.ref_rejected)
    values = [t.double().tolist() for t in fields]
    tokens = [max(int(n), 1) for n in pairs.chosen_tokens], [max(int(n), 1) for n in pairs.rejected_tokens]
    return list(zip(*values, *tokens, strict=True))


def _smoothed(margin: float, eps: float) -> float:
    return -(1 - eps) * _log_sigmoid(margin) - eps * _log_sigmoid(-margin)


def _reference(
    kind: str,
    pairs: PairLogps,
    beta: float,
    eps: float = 0.0,
    divergence: str = "reverse_kl",
    alpha: float = 0.5,
    tau: float = 0.05,
) -> list[float]:
    rows = _rows(pairs)
    if kind == "aot":
        policy = sorted(c - r for c, r, *_ in rows)
        ref = sorted(rc - rr for _, _, rc, rr, *_ in rows)
        return [_smoothed(beta * (p - q), eps) for p, q in zip(policy, ref, strict=True)]
    if kind == "aot_unpaired":
        chosen = sorted(c - rc for c, _, rc, *_ in rows)
        rejected = sorted(r - rr for _, r, _, rr, *_ in rows)
        return [_smoothed(beta * (w - lo), eps) for w, lo in zip(chosen, rejected, strict=True)]
    losses = []
    for c, r, rc, rr, nc, nr in rows:
        wl, ll = c - rc, r - rr  # the winner's and the loser's log-ratio
        ws, ls = _score(wl, divergence, alpha), _score(ll, divergence, alpha)
        m = beta * (ws - ls)
        if kind == "sigmoid":
            loss = -_log_sigmoid(m)
        elif kind == "hinge":
            loss = max(0.0, 1 - m)
        elif kind == "ipo":
            loss = (ws / nc - ls / nr - 1 / (2 * beta)) ** 2
        elif kind == "sigmoid_norm":
            loss = -_log_sigmoid(beta * (ws / nc - ls / nr))
        elif kind == "exo_pair":
            # KL(q || p) with q = softmax(β·scores) over {winner, loser} and p = [1 - ε, ε].
            qw = math.exp(beta * ws) / (math.exp(beta * ws) + math.exp(beta * ls))
            ql = 1 - qw
            loss = qw * math.log(qw / (1 - eps)) + ql * math.log(ql / eps)
        elif kind == "robust":
            loss = ((1 - eps) * -_log_sigmoid(m) - eps * -_log_sigmoid(-m)) / (1 - 2 * eps)
        elif kind == "discopop":
            mix = _sigmoid(m / tau)
            loss = (1 - mix) * -_log_sigmoid(m) + mix * math.exp(-m)
        elif kind == "sft":
            loss = -c / nc
        elif kind == "nca_pair":
            loss = -_log_sigmoid(beta * wl) - 0.5 * _log_sigmoid(-beta * wl) - 0.5 * _log_sigmoid(-beta * ll)
        elif kind == "bco_pair":
            loss = -_log_sigmoid(beta * wl) - _log_sigmoid(-beta * ll)
        elif kind == "sppo_hard":
            loss = (wl - 1 / (2 * beta)) ** 2 + (ll + 1 / (2 * beta)) ** 2
        elif kind == "apo_zero":
            loss = (1 - _sigmoid(beta * wl)) + _sigmoid(beta * ll)
        elif kind == "apo_down":
            loss = _sigmoid(beta * wl) + (1 - _sigmoid(beta * (wl - ll)))
        else:
            raise AssertionError(kind)
        losses.append(loss)
    return losses


def _cases() -> list[tuple[str, float, float]]:
    return [
        (kind, beta, eps)
        for kind in PREFERENCE_LOSSES
        for beta in BETAS
        for eps in SMOOTHING.get(kind, [0.0])
    ]


# --- every loss against its reference -------------------------------------------------------------


@pytest.mark.parametrize(("kind", "beta", "eps"), _cases())
def test_every_loss_matches_its_float64_reference(kind, beta, eps):
    for seed in (0, 1):
        pairs = _pairs(seed)
        got = preference_loss(kind, pairs, beta=beta, label_smoothing=eps)
        assert got.shape == (PAIRS,) and got.dtype == torch.float64
        _close(got, _reference(kind, pairs, beta, eps))


@pytest.mark.parametrize("kind", PREFERENCE_LOSSES)
def test_float32_input_is_computed_in_float32_and_agrees(kind):
    eps = SMOOTHING.get(kind, [0.0])[-1]
    pairs64 = _pairs(2)
    pairs = PairLogps(*(t.float() if t.is_floating_point() else t for t in vars(pairs64).values()))
    got = preference_loss(kind, pairs, beta=0.1, label_smoothing=eps)
    assert got.dtype == torch.float32
    _close(got, _reference(kind, pairs, 0.1, eps), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("divergence", F_DIVERGENCES)
@pytest.mark.parametrize("kind", [k for k in PREFERENCE_LOSSES if k not in REVERSE_KL_ONLY])
def test_losses_on_the_score_difference_follow_each_f_divergence(kind, divergence):
    eps = SMOOTHING.get(kind, [0.0])[-1]
    alphas = [0.5, 0.3, 1.0, 1.7] if divergence == "alpha_divergence" else [0.5]
    for alpha in alphas:
        for beta in BETAS:
            pairs = _pairs(3)
            options = {"label_smoothing": eps, "divergence": divergence, "alpha": alpha}
            got = preference_loss(kind, pairs, beta=beta, **options)
            _close(got, _reference(kind, pairs, beta, eps, divergence, alpha))


def test_divergence_scores_are_f_prime_of_the_ratio():
    logratios = [-4.0, -0.7, 0.0, 0.3, 2.5, 6.0]
    for kind in F_DIVERGENCES:
        for alpha in (0.5, 0.2, 1.0, 3.0):
            got = divergence_scores(torch.tensor(logratios, dtype=torch.float64), kind, alpha)
            _close(got, [_score(x, kind, alpha) for x in logratios])
    for kind in F_DIVERGENCES:  # f'(1) = 0 for all four: a policy equal to its reference scores 0
        assert divergence_scores(torch.tensor([0.0]), kind).item() == 0.0


@pytest.mark.parametrize("kind", F_DIVERGENCES)
def test_divergence_scores_stay_finite_far_from_the_reference(kind):
    far = torch.tensor([-2000.0, -200.0, 200.0, 2000.0], requires_grad=True)
    for alpha in (0.5, 3.0):
        scores = divergence_scores(far, kind, alpha)
        assert torch.isfinite(scores).all()
        scores.sum().backward()
        assert torch.isfinite(far.grad).all()


def test_sigmoid_at_a_zero_margin_is_log_2():
    logps = torch.tensor([-12.0, -40.0, -3.0], dtype=torch.float64)
    tokens = torch.tensor([4, 9, 2])
    # Both completions moved by the same amount from the reference: no preference either way.
    pairs = PairLogps(logps, logps - 5, logps + 1.5, logps - 3.5, tokens, tokens)
    for beta in BETAS:
        for divergence in F_DIVERGENCES:
            got = preference_loss("sigmoid", pairs, beta=beta, divergence=divergence)
            _close(got, [math.log(2)] * 3, rtol=1e-12, atol=1e-14)


def test_token_counts_of_zero_count_as_one():
    pairs = _pairs(4)
    empty = PairLogps(
        *(vars(pairs)[name] for name in ("chosen", "rejected", "ref_chosen", "ref_rejected")),
        torch.zeros(PAIRS, dtype=torch.long),
        torch.ones(PAIRS, dtype=torch.long),
    )
    got = preference_loss("sft", empty, beta=0.1)
    _close(got, [-c for c in empty.chosen.tolist()])
    assert torch.isfinite(preference_loss("ipo", empty, beta=0.1)).all()


def test_aot_depends_on_the_batch_not_on_the_order_of_its_pairs():
    pairs = _pairs(5)
    order = torch.randperm(PAIRS, generator=torch.Generator().manual_seed(0))
    shuffled = PairLogps(*(t[order] for t in vars(pairs).values()))
    for kind in ("aot", "aot_unpaired"):
        torch.testing.assert_close(
            preference_loss(kind, shuffled, beta=0.5), preference_loss(kind, pairs, beta=0.5)
        )


# --- properties -----------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", F_DIVERGENCES)
def test_dpo_loss_falls_as_the_chosen_completion_becomes_likelier(divergence):
    pairs = _pairs(6)
    previous = None
    for step in range(8):
        lifted = PairLogps(pairs.chosen + 0.5 * step, *list(vars(pairs).values())[1:])
        loss = preference_loss("sigmoid", lifted, beta=0.5, divergence=divergence)
        if previous is not None:
            assert (loss < previous).all()
        previous = loss
    rejected_up = PairLogps(pairs.chosen, pairs.rejected + 1.0, *list(vars(pairs).values())[2:])
    assert (
        preference_loss("sigmoid", rejected_up, beta=0.5) > preference_loss("sigmoid", pairs, beta=0.5)
    ).all()


@pytest.mark.parametrize("kind", PREFERENCE_LOSSES)
def test_gradients_reach_the_policy_logps_and_are_finite(kind):
    pairs = _pairs(7, dtype=torch.float32)
    chosen, rejected = pairs.chosen.requires_grad_(), pairs.rejected.requires_grad_()
    eps = SMOOTHING.get(kind, [0.0])[-1]
    preference_loss(kind, pairs, beta=0.1, label_smoothing=eps).mean().backward()
    assert torch.isfinite(chosen.grad).all() and chosen.grad.abs().sum() > 0
    if kind == "sft":
        assert rejected.grad is None  # SFT trains on the chosen completions only
    else:
        assert torch.isfinite(rejected.grad).all() and rejected.grad.abs().sum() > 0
    assert pairs.ref_chosen.grad is None and pairs.ref_rejected.grad is None


@pytest.mark.parametrize("kind", PREFERENCE_LOSSES)
def test_a_policy_far_from_its_reference_gives_finite_losses_and_gradients(kind):
    pairs = _pairs(8, dtype=torch.float32)
    # Thousands of nats apart, both ways: discopop's exp(-m) and the logistic tails must not overflow.
    far = PairLogps(
        (pairs.chosen - 3000).requires_grad_(),
        (pairs.rejected + 3000).requires_grad_(),
        pairs.ref_chosen,
        pairs.ref_rejected,
        pairs.chosen_tokens,
        pairs.rejected_tokens,
    )
    eps = SMOOTHING.get(kind, [0.0])[-1]
    for beta in (0.1, 2.0):
        loss = preference_loss(kind, far, beta=beta, label_smoothing=eps)
        assert torch.isfinite(loss).all()
        far.chosen.grad = far.rejected.grad = None
        loss.sum().backward()
        assert torch.isfinite(far.chosen.grad).all()


def test_a_weighted_combination_is_the_sum_of_its_weighted_parts():
    pairs = _pairs(9)
    kinds, weights = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]  # MPO's mix
    got = preference_losses(kinds, weights, pairs, beta=0.3)
    assert got.shape == (PAIRS,)
    parts = [_reference(kind, pairs, 0.3) for kind in kinds]
    _close(got, [math.fsum(w * p[i] for w, p in zip(weights, parts, strict=True)) for i in range(PAIRS)])
    unweighted = preference_losses(["robust", "aot"], None, pairs, beta=0.3, label_smoothing=0.1)
    robust, aot = _reference("robust", pairs, 0.3, 0.1), _reference("aot", pairs, 0.3, 0.1)
    _close(unweighted, [a + b for a, b in zip(robust, aot, strict=True)])


# --- metrics --------------------------------------------------------------------------------------


def test_reward_metrics_on_a_hand_made_batch():
    pairs = PairLogps(
        chosen=torch.tensor([-10.0, -20.0, -5.0, -8.0]),
        rejected=torch.tensor([-12.0, -18.0, -7.0, -8.0]),
        ref_chosen=torch.tensor([-11.0, -20.0, -6.0, -9.0]),
        ref_rejected=torch.tensor([-11.0, -19.0, -4.0, -8.0]),
        chosen_tokens=torch.tensor([3, 4, 2, 2]),
        rejected_tokens=torch.tensor([3, 4, 2, 2]),
    )
    # Log-ratios: chosen [1, 0, 1, 1], rejected [-1, 1, -3, 0]; at β = 0.5 the rewards are half of them.
    chosen, rejected = implicit_rewards(pairs, beta=0.5)
    _close(chosen, [0.5, 0.0, 0.5, 0.5], rtol=0, atol=1e-7)
    _close(rejected, [-0.5, 0.5, -1.5, 0.0], rtol=0, atol=1e-7)
    metrics = reward_metrics(pairs, beta=0.5)
    assert metrics == pytest.approx(
        {
            "rewards/chosen": 0.375,
            "rewards/rejected": -0.375,
            "rewards/margins": 0.75,
            "rewards/accuracies": 0.75,  # the second pair prefers the rejected completion
            "logps/chosen": -10.75,
            "logps/rejected": -11.25,
        }
    )
    assert all(isinstance(value, float) for value in metrics.values())


def test_reward_accuracy_counts_a_tie_as_a_miss():
    logps = torch.tensor([-4.0, -9.0])
    tokens = torch.tensor([2, 3])
    tie = PairLogps(logps, logps, logps - 1, logps - 1, tokens, tokens)
    assert reward_metrics(tie, beta=0.1)["rewards/accuracies"] == 0.0


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "options", "fragment"),
    [
        ("dpo", {}, "preference loss 'dpo': expected one of sigmoid, hinge, ipo"),
        ("sigmoid", {"beta": 0.0}, "beta 0.0: must be a finite number > 0"),
        ("sigmoid", {"beta": -0.1}, "beta -0.1"),
        ("robust", {"label_smoothing": 0.5}, r"must lie in \[0, 0.5\)"),
        ("exo_pair", {"label_smoothing": 0.0}, r"EXO's ε.*log ε.*\(0, 1\)"),
        ("exo_pair", {"label_smoothing": 1.0}, r"\(0, 1\)"),
        ("aot", {"label_smoothing": 1.5}, r"must lie in \[0, 1\]"),
        ("sigmoid", {"label_smoothing": 0.1}, "read only by aot, aot_unpaired, exo_pair, robust; sigmoid"),
        ("nca_pair", {"divergence": "forward_kl"}, "does not apply to nca_pair.*only 'reverse_kl'"),
        ("aot", {"divergence": "js_divergence"}, "does not apply to aot"),
        ("sigmoid", {"divergence": "kl"}, "f-divergence 'kl': expected one of reverse_kl"),
        ("discopop", {"discopop_tau": 0.0}, "discopop_tau 0.0"),
        ("sigmoid", {"divergence": "alpha_divergence", "alpha": math.inf}, "alpha inf"),
    ],
)
def test_bad_options_are_refused_with_a_message_that_names_them(kind, options, fragment):
    options = {"beta": 0.1, **options}
    with pytest.raises(ValueError, match=fragment):
        preference_loss(kind, _pairs(), **options)


def test_preference_losses_refuses_bad_weights_and_mixes():
    pairs = _pairs()
    with pytest.raises(ValueError, match=r"2 preference losses \(sigmoid, sft\) but 3 weights"):
        preference_losses(["sigmoid", "sft"], [1.0, 1.0, 1.0], pairs, beta=0.1)
    with pytest.raises(ValueError, match="must be finite"):
        preference_losses(["sigmoid"], [math.nan], pairs, beta=0.1)
    with pytest.raises(ValueError, match="no preference loss given"):
        preference_losses([], None, pairs, beta=0.1)
    with pytest.raises(ValueError, match="does not apply to bco_pair"):
        preference_losses(["sigmoid", "bco_pair"], None, pairs, beta=0.1, divergence="forward_kl")
    # Smoothing read by one loss of the mix is allowed; the others ignore it, as in TRL.
    preference_losses(["sigmoid", "robust"], None, pairs, beta=0.1, label_smoothing=0.1)


def test_check_divergence_accepts_reverse_kl_for_everything():
    check_divergence(PREFERENCE_LOSSES, "reverse_kl")
    check_divergence(["sigmoid", "ipo", "sft"], "alpha_divergence")
    for kind in REVERSE_KL_ONLY:
        with pytest.raises(ValueError, match=kind):
            check_divergence(["sigmoid", kind], "forward_kl")


def test_pair_logps_refuses_fields_of_different_shapes():
    pairs = _pairs()
    with pytest.raises(ValueError, match=r"1-D \[pairs\] of one length.*rejected \(6,\)"):
        PairLogps(
            pairs.chosen,
            pairs.rejected[:6],
            pairs.ref_chosen,
            pairs.ref_rejected,
            pairs.chosen_tokens,
            pairs.rejected_tokens,
        )
    with pytest.raises(ValueError, match="1-D"):
        PairLogps(*(t[None] for t in vars(pairs).values()))
