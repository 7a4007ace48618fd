"""The RL losses against hand computations: explicit Python loops over small fixed tensors.

The references never call the module: GAE is the backward recursion written out row by row, a clipped
token loss is ``-min(r * A, clip(r) * A)`` with Python's ``min``, a group's std is the n - 1 formula.
Padding holds NaN or -inf wherever it can, so a formula that multiplies by the mask instead of
selecting shows up as a NaN.
"""

from __future__ import annotations

import math

import pytest
import torch

from train.rl_losses import (
    LOSS_TYPES,
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    explained_variance,
    gae,
    group_advantages,
    kl_estimate,
    masked_mean,
    masked_var,
    policy_loss,
    token_rewards,
    value_loss,
    whiten,
    zero_spread_groups,
)

NAN = math.nan

# Two responses of 4 and 2 tokens, right-padded to T = 4.
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
LENGTHS = [4, 2]


def _close(actual: torch.Tensor, expected, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    torch.testing.assert_close(
        actual.double(), torch.as_tensor(expected, dtype=torch.float64), rtol=rtol, atol=atol
    )


def _mean(xs: list[float]) -> float:
    return math.fsum(xs) / len(xs)


def _std(xs: list[float]) -> float:
    m = _mean(xs)
    return math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _real(rows: list[list[float]]) -> list[float]:
    return [rows[b][t] for b in range(len(LENGTHS)) for t in range(LENGTHS[b])]


# --- masked statistics ----------------------------------------------------------------------------


X = torch.tensor([[1.0, 2.0, 4.0, 8.0], [3.0, -1.0, NAN, math.inf]])


def test_masked_mean_and_var_see_only_real_tokens():
    real = _real(X.tolist())
    _close(masked_mean(X, MASK), _mean(real))
    _close(masked_mean(X, MASK, dim=-1), [_mean([1, 2, 4, 8]), _mean([3, -1])])
    _close(masked_mean(X, MASK, dim=0), [2.0, 0.5, 4.0, 8.0])
    m = _mean(real)
    squares = math.fsum((x - m) ** 2 for x in real)
    _close(masked_var(X, MASK), squares / (len(real) - 1))
    _close(masked_var(X, MASK, unbiased=False), squares / len(real))
    _close(masked_mean(X, torch.zeros_like(MASK)), 0.0)  # no tokens: 0, not NaN
    with pytest.raises(ValueError, match="1 real tokens"):
        masked_var(X, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]))


def test_whiten_gives_mean_0_and_variance_1_over_real_tokens():
    white = whiten(X, MASK)
    assert torch.isfinite(white).all()
    assert white[1, 2:].tolist() == [0.0, 0.0]
    real = _real(white.tolist())
    assert _mean(real) == pytest.approx(0.0, abs=1e-6)
    assert _std(real) == pytest.approx(1.0, abs=1e-6)
    kept = _real(whiten(X, MASK, shift_mean=False).tolist())
    assert _mean(kept) == pytest.approx(_mean(_real(X.tolist())), abs=1e-5)
    assert _std(kept) == pytest.approx(1.0, abs=1e-6)


# --- GAE ------------------------------------------------------------------------------------------


def _gae_reference(rewards: list[float], values: list[float], gamma: float, lam: float):
    """The backward recursion on one unpadded row; the value after the last token is 0."""
    advantages = [0.0] * len(rewards)
    running = 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    return advantages, [a + v for a, v in zip(advantages, values, strict=True)]


REWARDS = torch.tensor([[0.1, -0.2, 0.05, 1.0], [0.3, 2.0, NAN, NAN]])
VALUES = torch.tensor([[0.5, 0.4, 0.6, 0.7], [-0.3, 0.2, NAN, 9.0]])


def test_gae_matches_the_backward_recursion_on_rows_of_different_lengths():
    gamma, lam = 0.9, 0.8
    advantages, returns = gae(REWARDS, VALUES, MASK, gamma, lam)
    assert advantages.shape == returns.shape == (2, 4) and advantages.dtype == torch.float32
    for b, length in enumerate(LENGTHS):
        rewards, values = REWARDS[b, :length].tolist(), VALUES[b, :length].tolist()
        expected_adv, expected_ret = _gae_reference(rewards, values, gamma, lam)
        _close(advantages[b, :length], expected_adv)
        _close(returns[b, :length], expected_ret)
        assert advantages[b, length:].tolist() == returns[b, length:].tolist() == [0.0] * (4 - length)
    # By hand for the short row: delta_1 = 2.0 - 0.2, delta_0 = 0.3 + 0.9 * 0.2 + 0.3.
    _close(advantages[1, :2], [0.78 + 0.72 * 1.8, 1.8])


def test_gae_skips_tokens_the_mask_leaves_out():
    # Left padding and a hole inside the row give the same estimates as the compacted row.
    mask = torch.tensor([[0, 1, 1, 0, 1, 1]], dtype=torch.bool)
    rewards = torch.tensor([[NAN, 0.1, -0.2, NAN, 0.05, 1.0]])
    values = torch.tensor([[NAN, 0.5, 0.4, NAN, 0.6, 0.7]])
    advantages, returns = gae(rewards, values, mask, 0.9, 0.8)
    expected_adv, expected_ret = _gae_reference([0.1, -0.2, 0.05, 1.0], [0.5, 0.4, 0.6, 0.7], 0.9, 0.8)
    _close(advantages[0, [1, 2, 4, 5]], expected_adv)
    _close(returns[0, [1, 2, 4, 5]], expected_ret)
    assert advantages[0, [0, 3]].tolist() == [0.0, 0.0]


def test_gae_with_gamma_and_lambda_1_is_reward_to_go_minus_value():
    advantages, returns = gae(REWARDS, VALUES, MASK, 1.0, 1.0)
    for b, length in enumerate(LENGTHS):
        rewards = REWARDS[b, :length].tolist()
        to_go = [math.fsum(rewards[t:]) for t in range(length)]
        _close(returns[b, :length], to_go)
        _close(
            advantages[b, :length], [g - v for g, v in zip(to_go, VALUES[b, :length].tolist(), strict=True)]
        )


# --- KL and reward shaping ------------------------------------------------------------------------


LOGPS = torch.tensor([[-1.0, -0.5, -2.0, -0.1], [-0.7, -3.0, -math.inf, NAN]])
REF_LOGPS = torch.tensor([[-1.2, -0.5, -1.0, -0.4], [-0.2, -2.5, NAN, -math.inf]])


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimators_match_their_formulas(kind):
    logps, ref = LOGPS[0], REF_LOGPS[0]
    got = kl_estimate(logps, ref, kind)
    expected = []
    for lp, rl in zip(logps.tolist(), ref.tolist(), strict=True):
        if kind == "k1":
            expected.append(lp - rl)
        elif kind == "k2":
            expected.append(0.5 * (lp - rl) ** 2)
        else:
            expected.append(math.exp(rl - lp) - (rl - lp) - 1)
    assert got.dtype == torch.float32
    _close(got, expected)
    assert got[1].item() == 0.0  # equal log-probs: no divergence
    with pytest.raises(ValueError, match="'k4'"):
        kl_estimate(logps, ref, "k4")


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_token_rewards_put_the_score_on_the_last_real_token(kind):
    scores = torch.tensor([2.0, -1.0])
    kl_coef = 0.05
    rewards, kl = token_rewards(scores, LOGPS, REF_LOGPS, MASK, kl_coef, kind)
    assert torch.isfinite(rewards).all() and torch.isfinite(kl).all()
    for b, length in enumerate(LENGTHS):
        for t in range(4):
            if t >= length:
                assert rewards[b, t].item() == kl[b, t].item() == 0.0
                continue
            d = LOGPS[b, t].item() - REF_LOGPS[b, t].item()
            expected_kl = d if kind == "k1" else math.exp(-d) + d - 1
            expected = -kl_coef * expected_kl + (scores[b].item() if t == length - 1 else 0.0)
            assert kl[b, t].item() == pytest.approx(expected_kl, abs=1e-6)
            assert rewards[b, t].item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match=r"rows \[1\] have no response token"):
        token_rewards(scores, LOGPS, REF_LOGPS, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]), kl_coef)


def test_adaptive_kl_controller_follows_ziegler():
    controller = AdaptiveKLController(init_coef=0.2, target=6.0, horizon=10_000)
    expected = 0.2
    for current_kl, n_steps in [(12.0, 256), (3.0, 256), (6.6, 512), (6.0, 512)]:
        error = current_kl / 6.0 - 1
        error = 0.2 if error > 0.2 else -0.2 if error < -0.2 else error
        expected *= 1 + error * n_steps / 10_000
        controller.update(current_kl, n_steps)
        assert controller.coef == pytest.approx(expected, rel=1e-12)
    # 12 is clipped to +20 %, 3 to -20 %, 6.6 is +10 %, the target itself changes nothing.
    assert controller.coef == pytest.approx(0.2 * 1.00512 * 0.99488 * 1.00512, rel=1e-12)
    fixed = FixedKLController(0.1)
    fixed.update(100.0, 256)
    assert fixed.coef == 0.1
    with pytest.raises(ValueError, match="target 0"):
        AdaptiveKLController(0.2, target=0, horizon=10_000)


# --- group advantages -----------------------------------------------------------------------------


SCORES = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 2.0, 3.0, 0.5])
GROUPS = [[1.0, 0.0, 0.0, 1.0], [0.5, 2.0, 3.0, 0.5]]


def test_grpo_advantages_divide_by_the_unbiased_group_std():
    got = group_advantages(SCORES, 4, "grpo")
    expected = [(s - _mean(g)) / (_std(g) + 1e-4) for g in GROUPS for s in g]
    _close(got, expected)
    for group in got.view(2, 4):
        assert group.sum().item() == pytest.approx(0.0, abs=1e-6)
    # By hand, group 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3).
    assert got[0].item() == pytest.approx(0.5 / (math.sqrt(1 / 3) + 1e-4), rel=1e-6)


def test_batch_scale_divides_by_the_std_of_all_scores():
    got = group_advantages(SCORES, 4, "grpo", scale="batch")
    std = _std([s for g in GROUPS for s in g])
    _close(got, [(s - _mean(g)) / (std + 1e-4) for g in GROUPS for s in g])


def test_dr_grpo_advantages_only_subtract_the_group_mean():
    got = group_advantages(SCORES, 4, "dr_grpo")
    _close(got, [s - _mean(g) for g in GROUPS for s in g])
    torch.testing.assert_close(got, group_advantages(SCORES, 4, "grpo", scale="none"))


def test_rloo_advantages_use_the_mean_of_the_others():
    got = group_advantages(SCORES, 4, "rloo")
    expected = []
    for g in GROUPS:
        for i, s in enumerate(g):
            others = [x for j, x in enumerate(g) if j != i]
            expected.append(s - _mean(others))
    _close(got, expected)
    _close(group_advantages(torch.tensor([3.0, 1.0]), 2, "rloo"), [2.0, -2.0])


def test_zero_spread_groups_are_found_and_get_zero_advantages():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 2.5, 2.5, 2.5])
    assert zero_spread_groups(scores, 3).tolist() == [True, False, True]
    for method in ["grpo", "dr_grpo", "rloo"]:
        advantages = group_advantages(scores, 3, method).view(3, 3)
        assert advantages[[0, 2]].abs().max().item() == 0.0
        assert advantages[1].abs().min().item() > 0


@pytest.mark.parametrize(
    ("scores", "group_size", "kwargs", "fragment"),
    [
        (SCORES, 3, {}, "8 scores do not split into groups of 3"),
        (SCORES, 1, {"method": "rloo"}, "group_size 1"),
        (SCORES, 1, {"method": "grpo"}, "group_size 1"),
        (SCORES[:0], 2, {}, "0 scores"),
        (SCORES.view(2, 4), 4, {}, r"expected one score per completion"),
        (SCORES, 4, {"method": "ppo"}, "'ppo'"),
        (SCORES, 4, {"scale": "prompt"}, "'prompt'"),
        (SCORES, 4, {"method": "dr_grpo", "scale": "group"}, "dr_grpo does not scale"),
    ],
)
def test_group_advantages_reject_bad_groups(scores, group_size, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        group_advantages(scores, group_size, **kwargs)
    if "method" not in kwargs and "scale" not in kwargs:
        with pytest.raises(ValueError, match=fragment):
            zero_spread_groups(scores, group_size)


# --- policy loss ----------------------------------------------------------------------------------

# Ratios on both sides of the clip range, for both advantage signs. Row 0 (A = +1): 1.5 is above the
# range (clipped), 0.5 below (min keeps r A, not clipped), 1.25 is clipped at 0.2 but not at 0.28.
# Row 1 (A = -2): 0.5 below the range (clipped), 1.5 above (min keeps r A, not clipped).
RATIOS = [[1.5, 0.5, 1.25, 1.0], [0.5, 1.5, 1.0, 1.0]]
ADVANTAGES = [1.0, -2.0]
OLD_LOGPS = torch.tensor([[-1.0, -2.0, -0.5, -0.3], [-1.5, -0.8, -math.inf, NAN]])


def _logps() -> torch.Tensor:
    logps = OLD_LOGPS + torch.tensor(RATIOS).log()
    logps[1, 2:] = torch.tensor([NAN, -math.inf])
    return logps.requires_grad_()


def _token_losses(clip_low: float, clip_high: float) -> list[list[float]]:
    rows = []
    for b, length in enumerate(LENGTHS):
        row = []
        for t in range(length):
            r, a = RATIOS[b][t], ADVANTAGES[b]
            clipped = min(max(r, 1 - clip_low), 1 + clip_high)
            row.append(-min(r * a, clipped * a))
        rows.append(row)
    return rows


def _aggregate(rows: list[list[float]], aggregation: str, max_length: int = 6) -> float:
    if aggregation == "sequence_mean":
        return _mean([_mean(row) for row in rows])
    total = math.fsum(x for row in rows for x in row)
    if aggregation == "token_mean":
        return total / sum(len(row) for row in rows)
    return total / (len(rows) * max_length)


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "constant_length"])
@pytest.mark.parametrize(("clip_low", "clip_high"), [(0.2, None), (0.2, 0.28)])
def test_policy_loss_matches_the_clipped_surrogate(aggregation, clip_low, clip_high):
    high = clip_low if clip_high is None else clip_high
    rows = _token_losses(clip_low, high)
    for advantages in (torch.tensor(ADVANTAGES), torch.tensor([[1.0] * 4, [-2.0, -2.0, NAN, NAN]])):
        logps = _logps()
        loss, stats = policy_loss(
            logps,
            OLD_LOGPS,
            advantages,
            MASK,
            clip_low=clip_low,
            clip_high=clip_high,
            aggregation=aggregation,
            max_length=6,
        )
        assert loss.dim() == 0 and loss.dtype == torch.float32
        assert loss.item() == pytest.approx(_aggregate(rows, aggregation), abs=1e-6)
        clipped = 3 if high < 0.25 else 2  # 1.5 (A > 0), 0.5 (A < 0), and 1.25 under a 0.2 clip
        assert stats["clip_fraction"].item() == pytest.approx(clipped / 6)
        assert stats["clip_fraction_low"].item() == pytest.approx(1 / 6)
        ratios = _real(RATIOS)
        assert stats["ratio_mean"].item() == pytest.approx(_mean(ratios), abs=1e-6)
        assert stats["approx_kl"].item() == pytest.approx(
            _mean([r - 1 - math.log(r) for r in ratios]), abs=1e-6
        )
        assert "kl" not in stats
        loss.backward()
        assert torch.isfinite(logps.grad).all() and logps.grad[1, 2:].tolist() == [0.0, 0.0]


def test_policy_loss_gradient_is_zero_exactly_where_the_clip_binds():
    logps = _logps()
    loss, _ = policy_loss(logps, OLD_LOGPS, torch.tensor(ADVANTAGES), MASK, clip_high=0.28)
    loss.backward()
    # d(-r A)/d logp = -r A on an unclipped token; the loss is a mean over 6 tokens.
    expected = [[0.0, -0.5 / 6, -1.25 / 6, -1.0 / 6], [0.0, 2 * 1.5 / 6, 0.0, 0.0]]
    _close(logps.grad, expected)


def test_policy_loss_adds_beta_times_the_reference_kl():
    ref = torch.tensor([[-1.1, -1.5, -0.5, -0.6], [-1.0, -1.0, NAN, -math.inf]])
    beta = 0.04
    logps = _logps()
    loss, stats = policy_loss(logps, OLD_LOGPS, torch.tensor(ADVANTAGES), MASK, ref_logps=ref, beta=beta)
    rows = _token_losses(0.2, 0.2)
    kls = []
    for b, length in enumerate(LENGTHS):
        for t in range(length):
            d = ref[b, t].item() - logps[b, t].item()
            kls.append(math.exp(d) - d - 1)
            rows[b][t] += beta * kls[-1]
    assert loss.item() == pytest.approx(_aggregate(rows, "token_mean"), abs=1e-6)
    assert stats["kl"].item() == pytest.approx(_mean(kls), abs=1e-6)
    # With beta = 0 the KL is only reported, and k1 is available for it.
    loss0, stats0 = policy_loss(
        logps, OLD_LOGPS, torch.tensor(ADVANTAGES), MASK, ref_logps=ref, kl_estimator="k1"
    )
    assert loss0.item() == pytest.approx(_aggregate(_token_losses(0.2, 0.2), "token_mean"), abs=1e-6)
    k1 = [logps[b, t].item() - ref[b, t].item() for b, n in enumerate(LENGTHS) for t in range(n)]
    assert stats0["kl"].item() == pytest.approx(_mean(k1), abs=1e-6)


def test_token_mean_divides_by_a_given_token_count():
    rows = _token_losses(0.2, 0.2)
    loss, _ = policy_loss(_logps(), OLD_LOGPS, torch.tensor(ADVANTAGES), MASK, token_count=24)
    assert loss.item() == pytest.approx(math.fsum(x for row in rows for x in row) / 24, abs=1e-6)


def test_loss_types_name_trl_aggregations():
    assert LOSS_TYPES == {
        "grpo": "sequence_mean",
        "bnpo": "token_mean",
        "dapo": "token_mean",
        "dr_grpo": "constant_length",
    }


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"aggregation": "constant_length"}, "needs a max_length"),
        ({"aggregation": "constant_length", "max_length": 3}, "4 tokens is longer than max_length 3"),
        ({"aggregation": "sum"}, "'sum'"),
        ({"beta": 0.1}, "ref_logps are needed"),
        ({"clip_low": 1.0}, "clip_low 1.0"),
        ({"advantages": torch.zeros(3)}, r"advantages \(3,\)"),
    ],
)
def test_policy_loss_rejects_bad_arguments(kwargs, fragment):
    advantages = kwargs.pop("advantages", torch.tensor(ADVANTAGES))
    with pytest.raises(ValueError, match=fragment):
        policy_loss(_logps(), OLD_LOGPS, advantages, MASK, **kwargs)


# --- value loss and diagnostics -------------------------------------------------------------------


def test_value_loss_takes_the_larger_of_the_plain_and_clipped_errors():
    values = torch.tensor([[1.0, 0.0, 0.5, 2.0], [-1.0, 0.3, NAN, NAN]], requires_grad=True)
    old_values = torch.tensor([[0.5, 0.5, 0.4, 1.0], [-0.2, 0.25, NAN, 0.0]])
    returns = torch.tensor([[1.2, 1.0, 0.0, 1.5], [-1.0, 0.0, 0.0, NAN]])
    clip = 0.2
    loss, clip_fraction = value_loss(values, old_values, returns, MASK, clip=clip)
    terms, larger = [], 0
    for b, length in enumerate(LENGTHS):
        for t in range(length):
            v, old, ret = values[b, t].item(), old_values[b, t].item(), returns[b, t].item()
            clipped = old + min(max(v - old, -clip), clip)
            plain_error, clipped_error = (v - ret) ** 2, (clipped - ret) ** 2
            larger += clipped_error > plain_error
            terms.append(0.5 * max(plain_error, clipped_error))
    assert 0 < larger < len(terms)  # both branches are exercised
    assert loss.item() == pytest.approx(_mean(terms), abs=1e-6)
    assert clip_fraction.item() == pytest.approx(larger / len(terms))
    loss.backward()
    assert torch.isfinite(values.grad).all()
    plain, _ = value_loss(values, old_values, returns, MASK, clip=None)
    expected = _mean(
        [
            0.5 * (values[b, t].item() - returns[b, t].item()) ** 2
            for b, n in enumerate(LENGTHS)
            for t in range(n)
        ]
    )
    assert plain.item() == pytest.approx(expected, abs=1e-6)


def test_entropy_is_minus_sum_p_log_p():
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0)).bfloat16()
    logits[0, 1, 2] = -math.inf  # a token ruled out contributes 0
    got = entropy_from_logits(logits)
    assert got.shape == (2, 3) and got.dtype == torch.float32
    for b in range(2):
        for t in range(3):
            row = logits[b, t].double().tolist()
            weights = [math.exp(z) for z in row]
            p = [w / math.fsum(weights) for w in weights]
            assert got[b, t].item() == pytest.approx(
                -math.fsum(x * math.log(x) for x in p if x > 0), abs=1e-5
            )
    _close(entropy_from_logits(torch.zeros(1, 7)), [math.log(7)])


def test_explained_variance():
    values = torch.tensor([[0.9, 2.1, 2.8, 4.2], [5.0, 6.5, NAN, NAN]])
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, NAN, 0.0]])
    ret, err = [], []
    for b, length in enumerate(LENGTHS):
        for t in range(length):
            ret.append(returns[b, t].item())
            err.append(returns[b, t].item() - values[b, t].item())
    got = explained_variance(values, returns, MASK)
    assert got.item() == pytest.approx(1 - _std(err) ** 2 / _std(ret) ** 2, abs=1e-6)
    assert explained_variance(returns, returns, MASK).item() == pytest.approx(1.0)
    assert math.isnan(explained_variance(values, torch.ones(2, 4), MASK).item())
