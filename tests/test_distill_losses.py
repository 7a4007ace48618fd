"""The distillation losses against direct float64 computations: explicit sums over explicit probabilities.

The references below never call the module's formulas: they build each distribution element by element
(``p_i ** (1 / T) / sum_j p_j ** (1 / T)`` for a tempered teacher, shifted exponentials for a student)
and sum ``a_i * log(a_i / b_i)`` term by term, so a wrong sign, a swapped side or a missing ``T**2``
shows up as a number that does not match.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from train.distill_losses import (
    DIVERGENCES,
    attention_loss,
    divergence,
    hidden_state_loss,
    layer_map,
    mix_teachers,
    teacher_log_probs_from_topk,
    topk_log_probs,
)

N, V = 5, 11
INF = math.inf


def _randn(*shape: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# --- float64 references ---------------------------------------------------------------------------


def _student_probs(logits: torch.Tensor, temperature: float) -> list[list[float]]:
    rows = []
    for row in logits.double().tolist():
        top = max(row)
        weights = [math.exp((z - top) / temperature) for z in row]
        total = math.fsum(weights)
        rows.append([w / total for w in weights])
    return rows


def _teacher_probs(log_probs: torch.Tensor, temperature: float) -> list[list[float]]:
    """Tempering as powers of the probabilities: p_i^(1/T) / sum_j p_j^(1/T)."""
    rows = []
    for row in log_probs.double().tolist():
        powered = [math.exp(lp) ** (1 / temperature) for lp in row]
        total = math.fsum(powered)
        rows.append([x / total for x in powered])
    return rows


def _kl(a: list[float], b: list[float]) -> float:
    terms = []
    for ai, bi in zip(a, b, strict=True):
        if ai == 0:
            continue
        if bi == 0:
            return INF
        terms.append(ai * math.log(ai / bi))
    return math.fsum(terms)


def _mix(w: float, a: list[float], b: list[float]) -> list[float]:
    return [w * ai + (1 - w) * bi for ai, bi in zip(a, b, strict=True)]


def _reference(kind: str, p: list[float], q: list[float], beta: float, alpha: float) -> float:
    if kind == "forward_kl":
        return _kl(p, q)
    if kind == "reverse_kl":
        return _kl(q, p)
    if kind == "jsd":
        m = _mix(beta, p, q)
        return beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    if kind == "skew_forward_kl":
        return _kl(p, _mix(alpha, p, q))
    if kind == "skew_reverse_kl":
        return _kl(q, _mix(alpha, q, p))
    assert kind == "tv"
    return 0.5 * math.fsum(abs(pi - qi) for pi, qi in zip(p, q, strict=True))


def _teacher(style: str, seed: int = 1) -> torch.Tensor:
    """Teacher log-probs at T=1: a full softmax, or one with 7 of the 11 tokens dropped (-inf)."""
    logits = _randn(N, V, seed=seed).double().numpy()
    if style == "drop":
        keep = np.argsort(-logits, axis=1)[:, :4]
        masked = np.full_like(logits, -np.inf)
        np.put_along_axis(masked, keep, np.take_along_axis(logits, keep, axis=1), axis=1)
        logits = masked
    return torch.from_numpy(_log_softmax64(logits)).float()


def _log_softmax64(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _close(actual: torch.Tensor, expected, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    torch.testing.assert_close(
        actual.double(), torch.as_tensor(expected, dtype=torch.float64), rtol=rtol, atol=atol
    )


# --- divergences ----------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["dense", "drop"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_divergence_matches_direct_formula(kind, temperature, style):
    student, teacher = _randn(N, V), _teacher(style)
    beta, alpha = 0.3, 0.2  # asymmetric, so swapping p and q in a mixture shows
    got = divergence(student, teacher, kind, temperature=temperature, beta=beta, alpha=alpha)
    p, q = _teacher_probs(teacher, temperature), _student_probs(student, temperature)
    expected = [temperature**2 * _reference(kind, pi, qi, beta, alpha) for pi, qi in zip(p, q, strict=True)]
    assert got.shape == (N,) and got.dtype == torch.float32
    _close(got, expected)


def test_divergence_computes_in_float32_from_bf16():
    student, teacher = _randn(N, V).bfloat16(), _teacher("dense")
    got = divergence(student, teacher, "forward_kl")
    expected = [
        _kl(pi, qi) for pi, qi in zip(_teacher_probs(teacher, 1), _student_probs(student, 1), strict=True)
    ]
    assert got.dtype == torch.float32
    _close(got, expected)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_endpoints_are_forward_and_reverse_kl(temperature):
    student, teacher = _randn(N, V), _teacher("dense")
    forward = divergence(student, teacher, "forward_kl", temperature)
    reverse = divergence(student, teacher, "reverse_kl", temperature)
    assert not torch.allclose(forward, reverse)
    torch.testing.assert_close(divergence(student, teacher, "jsd", temperature, beta=0.0), forward)
    torch.testing.assert_close(divergence(student, teacher, "jsd", temperature, beta=1.0), reverse)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_at_one_half_is_symmetric_and_bounded_by_log_2(temperature):
    a, b = _randn(N, V, seed=3), _randn(N, V, seed=4)
    ab = divergence(a, b.log_softmax(-1), "jsd", temperature, beta=0.5)
    ba = divergence(b, a.log_softmax(-1), "jsd", temperature, beta=0.5)
    torch.testing.assert_close(ab, ba, rtol=1e-5, atol=1e-6)
    assert (ab > 0).all() and (ab <= math.log(2) * temperature**2).all()


@pytest.mark.parametrize(
    ("skew", "plain"), [("skew_forward_kl", "forward_kl"), ("skew_reverse_kl", "reverse_kl")]
)
def test_skew_with_alpha_zero_is_plain_kl_and_alpha_one_is_zero(skew, plain):
    student, teacher = _randn(N, V), _teacher("dense")
    plain_kl = divergence(student, teacher, plain, 2.0)
    torch.testing.assert_close(divergence(student, teacher, skew, 2.0, alpha=0.0), plain_kl)
    skewed = divergence(student, teacher, skew, 2.0, alpha=0.1)
    assert (skewed < plain_kl).all()
    torch.testing.assert_close(divergence(student, teacher, skew, 2.0, alpha=1.0), torch.zeros(N))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_tv_lies_between_zero_and_t_squared(temperature):
    bound = temperature**2
    tv = divergence(_randn(N, V), _teacher("drop"), "tv", temperature)
    assert (tv > 0).all() and (tv <= bound).all()
    same = _teacher("dense")
    torch.testing.assert_close(divergence(same, same, "tv", temperature), torch.zeros(N), atol=1e-6, rtol=0)
    # The teacher all on token 0, the student nowhere near it: as far apart as two distributions get.
    one_hot = torch.full((1, V), -INF)
    one_hot[0, 0] = 0.0
    elsewhere = torch.zeros(1, V)
    elsewhere[0, 0] = -50.0
    far = divergence(elsewhere, one_hot, "tv", temperature)
    assert bound * (1 - 1e-6) <= far.item() <= bound * (1 + 1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", [k for k in DIVERGENCES if k != "reverse_kl"])
def test_gradients_are_finite_with_dropped_teacher_tokens(kind, temperature):
    student = _randn(N, V).requires_grad_()
    teacher = _teacher("drop")
    assert torch.isinf(teacher).any()
    loss = divergence(student, teacher, kind, temperature)
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0


def test_reverse_kl_is_inf_where_the_teacher_dropped_student_mass():
    teacher = torch.cat([_teacher("drop")[:3], _teacher("dense")[3:]])
    got = divergence(_randn(N, V), teacher, "reverse_kl")
    assert not torch.isnan(got).any()
    assert torch.isposinf(got[:3]).all()
    assert torch.isfinite(got[3:]).all()


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_extreme_student_logits_give_no_nan(kind):
    # ×1000: most student probabilities underflow to exactly 0, the case 0 * log 0 must cover.
    student = (_randn(N, V) * 1000).requires_grad_()
    loss = divergence(student, _teacher("drop"), kind)
    assert not torch.isnan(loss).any()
    if kind != "reverse_kl":
        assert torch.isfinite(loss).all()
        loss.sum().backward()
        assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"kind": "kl"}, "divergence 'kl'"),
        ({"kind": "jsd", "temperature": 0.0}, "temperature"),
        ({"kind": "jsd", "beta": 1.5}, "beta"),
        ({"kind": "skew_forward_kl", "alpha": -0.1}, "alpha"),
    ],
)
def test_divergence_rejects_bad_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        divergence(_randn(N, V), _teacher("dense"), **kwargs)
    with pytest.raises(ValueError, match="differ in shape"):
        divergence(_randn(N, V + 1), _teacher("dense"), "forward_kl")


# --- top-k teachers -------------------------------------------------------------------------------


def _full_log_probs(seed: int = 2) -> np.ndarray:
    return _log_softmax64(_randn(N, V, seed=seed).double().numpy())


def _top(log_probs: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = np.argsort(-log_probs, axis=1)[:, :k]
    return torch.from_numpy(ids).int(), torch.from_numpy(np.take_along_axis(log_probs, ids, axis=1)).float()


def test_from_topk_drop_renormalises_the_top_k_and_drops_the_rest():
    ids, logprobs = _top(_full_log_probs(), k=4)
    dense = teacher_log_probs_from_topk(ids, logprobs, V, "drop")
    assert dense.shape == (N, V) and dense.dtype == torch.float32
    for row in range(N):
        kept = set(ids[row].tolist())
        values = dense[row].double().tolist()
        assert all(values[t] == -INF for t in range(V) if t not in kept)
        assert math.fsum(math.exp(v) for v in values) == pytest.approx(1.0, abs=1e-6)
        for j, token in enumerate(ids[row].tolist()):  # ratios to the top-1 are the teacher's
            assert values[token] - values[ids[row, 0]] == pytest.approx(
                float(logprobs[row, j] - logprobs[row, 0]), abs=1e-6
            )


def test_from_topk_spread_keeps_the_top_k_and_spreads_the_leftover_uniformly():
    ids, logprobs = _top(_full_log_probs(), k=4)
    dense = teacher_log_probs_from_topk(ids, logprobs, V, "spread")
    for row in range(N):
        kept = ids[row].tolist()
        values = dense[row].double().tolist()
        for j, token in enumerate(kept):
            assert values[token] == pytest.approx(float(logprobs[row, j]), abs=1e-6)
        leftover = 1 - math.fsum(math.exp(float(lp)) for lp in logprobs[row])
        others = [values[t] for t in range(V) if t not in kept]
        assert len(others) == V - 4
        for value in others:
            assert math.exp(value) == pytest.approx(leftover / (V - 4), rel=1e-5)
        assert math.fsum(math.exp(v) for v in values) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("excess", [0.0, 1e-3])
def test_spread_stays_finite_when_the_top_k_holds_all_the_mass(excess):
    # A top-k that sums to 1, or a little over (bf16 storage rounds up as well as down).
    logprobs = torch.log_softmax(_randn(N, 4), -1).double() + excess
    ids = torch.arange(4).expand(N, 4)
    dense = teacher_log_probs_from_topk(ids, logprobs, V, "spread")
    assert torch.isfinite(dense).all()
    _close(dense.double().exp().sum(-1), [1.0] * N, rtol=0, atol=1e-5)
    others = dense[:, 4:].double().exp()
    assert (others.sum(-1) < 1e-6).all()  # only what float32 rounding left over, or the floor
    assert (others == others[:, :1]).all()
    _close(dense[:, 1:4] - dense[:, :1], logprobs[:, 1:4] - logprobs[:, :1], atol=1e-6)


@pytest.mark.parametrize("leftover", ["drop", "spread"])
def test_top_k_of_the_whole_vocabulary_just_renormalises(leftover):
    full = _full_log_probs()
    permutation = np.stack([np.random.default_rng(row).permutation(V) for row in range(N)])
    ids = torch.from_numpy(permutation)
    logprobs = torch.from_numpy(np.take_along_axis(full, permutation, axis=1) + 0.3).float()  # sums to e^0.3
    dense = teacher_log_probs_from_topk(ids, logprobs, V, leftover)
    assert torch.isfinite(dense).all()
    _close(dense, full, atol=1e-6)


@pytest.mark.parametrize("id_dtype", [torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("lp_dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_from_topk_accepts_any_int_and_float_dtype(id_dtype, lp_dtype):
    ids, logprobs = _top(_full_log_probs(), k=3)
    ids, logprobs = ids.to(id_dtype), logprobs.to(lp_dtype)
    dense = teacher_log_probs_from_topk(ids, logprobs, V, "drop")
    assert dense.dtype == torch.float32
    stored = logprobs.double()
    expected = stored - torch.log(torch.exp(stored).sum(-1, keepdim=True))
    _close(dense.gather(-1, ids.long()), expected, atol=1e-6)


@pytest.mark.parametrize(
    ("ids", "logprobs", "leftover", "fragment"),
    [
        (torch.zeros(2, 12, dtype=torch.long), torch.zeros(2, 12), "drop", "does not fit"),
        (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4), "drop", "differ in shape"),
        (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), "uniform", "leftover 'uniform'"),
    ],
)
def test_from_topk_rejects_bad_input(ids, logprobs, leftover, fragment):
    with pytest.raises(ValueError, match=fragment):
        teacher_log_probs_from_topk(ids, logprobs, V, leftover)


@pytest.mark.parametrize("k", [1, 4, V])
@pytest.mark.parametrize("leftover", ["drop", "spread"])
def test_topk_log_probs_equals_from_topk_of_the_gathered_top_k(leftover, k):
    logits = _randn(N, V, seed=5)
    ids, values = _top(_log_softmax64(logits.double().numpy()), k)
    expected = teacher_log_probs_from_topk(ids, values, V, leftover)
    got = topk_log_probs(logits, k, leftover)
    assert got.dtype == torch.float32
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    _close(got, expected, atol=1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        topk_log_probs(logits, V + 1, leftover)


# --- hidden states and attention ------------------------------------------------------------------


def test_hidden_state_loss_matches_direct_sums():
    student, teacher = _randn(N, 7, seed=6).bfloat16(), _randn(N, 7, seed=7)
    mse, cosine = hidden_state_loss(student, teacher, "mse"), hidden_state_loss(student, teacher, "cosine")
    assert mse.dtype == cosine.dtype == torch.float32 and mse.shape == cosine.shape == (N,)
    expected_mse, expected_cos = [], []
    for s, t in zip(student.double().tolist(), teacher.double().tolist(), strict=True):
        expected_mse.append(math.fsum((a - b) ** 2 for a, b in zip(s, t, strict=True)) / len(s))
        dot = math.fsum(a * b for a, b in zip(s, t, strict=True))
        norms = math.sqrt(math.fsum(a * a for a in s)) * math.sqrt(math.fsum(b * b for b in t))
        expected_cos.append(1 - dot / norms)
    _close(mse, expected_mse, atol=1e-5)
    _close(cosine, expected_cos, atol=1e-6)


def test_cosine_ignores_scale_where_mse_does_not():
    teacher = _randn(N, 7, seed=8)
    assert (hidden_state_loss(3 * teacher, teacher, "mse") > 0.1).all()
    _close(hidden_state_loss(3 * teacher, teacher, "cosine"), [0.0] * N, atol=1e-6)
    with pytest.raises(ValueError, match="'l1'"):
        hidden_state_loss(teacher, teacher, "l1")
    with pytest.raises(ValueError, match="differ in shape"):
        hidden_state_loss(teacher, teacher[:, :6], "mse")


B, L = 2, 5
QUERY_MASK = torch.tensor([[True] * L, [True, True, True, False, False]])


def _attention(heads: int, seed: int) -> torch.Tensor:
    """Causal attention maps: each query row a softmax over keys up to itself, exact zeros after it."""
    scores = _randn(B, heads, L, L, seed=seed)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, -INF).softmax(-1)


def _row_kl(t_row: list[float], s_row: list[float]) -> float:
    return math.fsum(t * math.log(t / s) for t, s in zip(t_row, s_row, strict=True) if t > 0)


def _valid_rows():
    return [(b, q) for b in range(B) for q in range(L) if QUERY_MASK[b, q]]


def test_attention_loss_with_equal_heads_is_per_head_then_mean():
    student, teacher = _attention(3, seed=9), _attention(3, seed=10)
    got = attention_loss(student, teacher, QUERY_MASK)
    s, t = student.double().tolist(), teacher.double().tolist()
    per_head = [math.fsum(_row_kl(t[b][h][q], s[b][h][q]) for b, q in _valid_rows()) for h in range(3)]
    assert got.dim() == 0 and got.dtype == torch.float32
    _close(got, sum(per_head) / 3)


def test_attention_loss_with_different_head_counts_averages_each_side_first():
    student, teacher = _attention(2, seed=11), _attention(4, seed=12)
    got = attention_loss(student, teacher, QUERY_MASK)
    s, t = student.double().tolist(), teacher.double().tolist()
    expected = 0.0
    for b, q in _valid_rows():
        s_row = [math.fsum(s[b][h][q][k] for h in range(2)) / 2 for k in range(L)]
        t_row = [math.fsum(t[b][h][q][k] for h in range(4)) / 4 for k in range(L)]
        expected += _row_kl(t_row, s_row)
    _close(got, expected)


def test_attention_loss_ignores_padded_rows_even_when_they_hold_nan():
    student, teacher = _attention(2, seed=13), _attention(2, seed=14)
    clean = attention_loss(student, teacher, QUERY_MASK)
    student, teacher = student.clone(), teacher.clone()
    student[1, :, 3:], teacher[1, :, 3:] = math.nan, math.nan
    student.requires_grad_()
    loss = attention_loss(student, teacher, QUERY_MASK)
    torch.testing.assert_close(loss, clean)
    loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert (student.grad[1, :, 3:] == 0).all()


# --- layer maps -----------------------------------------------------------------------------------


def test_uniform_layer_map():
    # 30 / 8 = 3.75 per student layer; 7.5 and 22.5 are halves, which round() sends to the even layer.
    assert layer_map("uniform", 8, 30) == [
        (1, 4),
        (2, 8),
        (3, 11),
        (4, 15),
        (5, 19),
        (6, 22),
        (7, 26),
        (8, 30),
    ]
    assert layer_map("uniform", 4, 4) == [(1, 1), (2, 2), (3, 3), (4, 4)]
    assert layer_map("uniform", 4, 2) == [(1, 0), (2, 1), (3, 2), (4, 2)]


def test_last_n_and_explicit_layer_maps():
    assert layer_map({"last": 3}, 8, 30) == [(6, 28), (7, 29), (8, 30)]
    assert layer_map({"last": 8}, 8, 30) == [(i, 22 + i) for i in range(1, 9)]
    assert layer_map([[0, 0], [4, 15], (8, 30)], 8, 30) == [(0, 0), (4, 15), (8, 30)]


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ([[9, 12]], "layer map pair [9, 12]: the student has 8 layers (0-8)"),
        ([[4, 31]], "layer map pair [4, 31]: the teacher has 30 layers (0-30)"),
        ([[-1, 3]], "layer map pair [-1, 3]: the student has 8 layers (0-8)"),
        ([[2, -1]], "layer map pair [2, -1]: the teacher has 30 layers (0-30)"),
        ({"last": 0}, "{'last': 0}: n must be 1-8 (the student has 8 layers, the teacher 30)"),
        ({"last": 9}, "{'last': 9}: n must be 1-8"),
        ({"last": "2"}, "the student has 8 layers, the teacher 30"),
        ({"first": 2}, "{'first': 2}"),
        ("unifrom", "'unifrom'"),
        ([], "layer map []"),
        ([[1]], "layer map pair [1]"),
        ([[1, 2.0]], "layer map pair [1, 2.0]"),
        ([[True, 2]], "layer map pair [True, 2]"),
        (None, "layer map None"),
    ],
)
def test_layer_map_errors_name_the_value_and_the_layer_counts(spec, fragment):
    with pytest.raises(ValueError) as error:
        layer_map(spec, 8, 30)
    message = str(error.value)
    assert fragment in message
    assert "\n" not in message and " layers" in message


# --- several teachers -----------------------------------------------------------------------------


def test_mix_teachers_matches_the_log_of_the_weighted_sum():
    teachers = [_teacher("drop", seed=15), _teacher("dense", seed=16), _teacher("drop", seed=17)]
    for teacher in teachers:
        teacher[:, 0] = -INF  # every teacher drops token 0: the mixture must give -inf, not NaN
    weights = [1.0, 2.0, 5.0]
    got = mix_teachers(teachers, weights)
    probs = [t.double().exp().tolist() for t in teachers]
    expected = []
    for row in range(N):
        mixed = [math.fsum(w / 8 * p[row][v] for w, p in zip(weights, probs, strict=True)) for v in range(V)]
        expected.append([math.log(x) if x > 0 else -INF for x in mixed])
    assert any(x == -INF for row in expected for x in row)
    assert not torch.isnan(got).any()
    _close(got, expected, atol=1e-6)


def test_mix_teachers_normalises_weights_and_passes_a_single_teacher_through():
    a, b = _teacher("drop", seed=18), _teacher("dense", seed=19)
    torch.testing.assert_close(mix_teachers([a, b], [2, 6]), mix_teachers([a, b], [0.25, 0.75]))
    assert torch.equal(mix_teachers([a], [3.0]), a)
    assert torch.equal(mix_teachers([a, b], [0.0, 1.0]), b)


@pytest.mark.parametrize(
    ("count", "weights", "fragment"),
    [
        (2, [1.0], "2 teachers but 1 weights"),
        (2, [1.0, -1.0], "must be finite"),
        (2, [0.0, 0.0], "not all 0"),
    ],
)
def test_mix_teachers_rejects_bad_weights(count, weights, fragment):
    with pytest.raises(ValueError, match=fragment):
        mix_teachers([_teacher("dense")] * count, weights)
    with pytest.raises(ValueError, match="differ in shape"):
        mix_teachers([_teacher("dense"), _teacher("dense")[:, :4]], [1.0, 1.0])
