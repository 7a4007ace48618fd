"""The loss functions of white-box knowledge distillation: tensors in, tensors out.

The distill recipe calls these on the positions that carry labels; nothing here knows about models,
batches or the Trainer, so each formula can be checked against a direct computation in the tests.

A teacher reaches the loss in one of two shapes. Online, its logits are at hand (``topk_log_probs`` can
still cut them to the top-k, to train exactly as from a stored teacher). Offline, a teacher run stored
the top-k of every position, e.g. one position of a ``k = 4`` record::

    {"ids": [464, 383, 317, 2], "logprobs": [-0.21, -1.94, -3.02, -4.5]}

and ``teacher_log_probs_from_topk`` turns it back into a dense distribution over the vocabulary.

Conventions: ``p`` is the teacher, ``q`` the student; logs are natural; a token the teacher dropped has
log-probability ``-inf`` and contributes ``0 * log 0 = 0``. Everything is computed in float32 whatever
the input dtype, since bf16 logits lose the small probabilities that KL terms are made of.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tv"]
Leftover = Literal["drop", "spread"]
LayerMapSpec = str | dict[str, Any] | Sequence[Sequence[int]]

DIVERGENCES: tuple[str, ...] = get_args(Divergence)
LEFTOVERS: tuple[str, ...] = get_args(Leftover)

_LEFTOVER_FLOOR = 1e-12
"""Smallest leftover mass ``spread`` keeps, relative to the top-k's own mass: a stored top-k that sums
to 1 up to rounding (or a little over, after bf16 storage) still leaves the other tokens finite."""

_TINY = torch.finfo(torch.float32).tiny
"""Floor of an attention probability under a log: a student zero where the teacher has mass (a mask
mismatch) then costs about 87 nats instead of turning the whole loss into inf."""


# --- teachers -------------------------------------------------------------------------------------


def teacher_log_probs_from_topk(ids: Tensor, logprobs: Tensor, vocab_size: int, leftover: Leftover) -> Tensor:
    """A stored top-k teacher ``ids``/``logprobs`` ``[n, k]`` as dense float32 log-probs ``[n, vocab_size]``.

    ``logprobs`` are log-probabilities at temperature 1 over the teacher's full vocabulary. ``drop``
    renormalises the top-k and gives every other token ``-inf``: the student is taught only the
    teacher's ranking among its candidates. ``spread`` keeps the top-k's log-probs and spreads the mass
    they miss uniformly over the other tokens, so the student is not pushed to zero on the tail the
    teacher never showed. With ``k == vocab_size`` there is no tail and both just renormalise.
    """
    if ids.shape != logprobs.shape:
        raise ValueError(f"top-k ids {tuple(ids.shape)} and logprobs {tuple(logprobs.shape)} differ in shape")
    if leftover not in LEFTOVERS:
        raise ValueError(f"leftover {leftover!r}: expected one of {', '.join(LEFTOVERS)}")
    k = ids.shape[-1]
    if not 1 <= k <= vocab_size:
        raise ValueError(f"top-k of {k} tokens does not fit a vocabulary of {vocab_size}")
    top = logprobs.float()
    index = ids.long()
    dense = top.new_full((*top.shape[:-1], vocab_size), float("-inf"))
    if leftover == "drop" or k == vocab_size:
        return dense.scatter_(-1, index, top.log_softmax(-1))
    # float64 for the mass: 1 - mass cancels badly in float32 when the top-k holds nearly everything.
    mass = logprobs.double().logsumexp(-1, keepdim=True).exp()
    rest = (1.0 - mass).clamp_min(_LEFTOVER_FLOOR * mass)
    log_total = (mass + rest).log()  # 0 unless rounding pushed the top-k's sum past 1
    log_other = rest.log() - math.log(vocab_size - k) - log_total
    dense.copy_(log_other.float().expand_as(dense))
    return dense.scatter_(-1, index, top - log_total.float())


def topk_log_probs(teacher_logits: Tensor, k: int, leftover: Leftover) -> Tensor:
    """An online teacher cut to its top-k, exactly as a stored top-k of it would be read back.

    Training online with the same ``k`` and ``leftover`` as an offline run makes the two comparable:
    the only difference left is the teacher's sampling, not the shape of its distribution.
    """
    vocab_size = teacher_logits.shape[-1]
    if not 1 <= k <= vocab_size:
        raise ValueError(f"top-k of {k} tokens does not fit a vocabulary of {vocab_size}")
    log_probs = teacher_logits.float().log_softmax(-1)
    values, ids = log_probs.topk(k, dim=-1)
    return teacher_log_probs_from_topk(ids, values, vocab_size, leftover)


def mix_teachers(log_probs: list[Tensor], weights: list[float]) -> Tensor:
    """Several teachers' dense log-probs ``[n, V]`` mixed per position: ``log(sum_j w_j p_j)``.

    The weights are normalised to sum to 1, so a recipe can write them as ratios (``[2, 1]``). A token
    every teacher dropped stays ``-inf``; one some teacher kept gets that teacher's share.
    """
    if not log_probs or len(log_probs) != len(weights):
        raise ValueError(f"mix_teachers: {len(log_probs)} teachers but {len(weights)} weights")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"mix_teachers: weights {list(weights)} must be finite, >= 0 and not all 0")
    shapes = {tuple(lp.shape) for lp in log_probs}
    if len(shapes) != 1:
        raise ValueError(f"mix_teachers: the teachers' log-probs differ in shape: {sorted(shapes)}")
    total = sum(weights)
    # A zero-weight teacher is left out rather than added as log(0): its -inf would only cost a NaN
    # gradient in logsumexp where every teacher is -inf.
    kept = [(lp, w) for lp, w in zip(log_probs, weights, strict=True) if w > 0]
    if len(kept) == 1:
        return kept[0][0].float()
    stacked = torch.stack([lp.float() + math.log(w / total) for lp, w in kept])
    return stacked.logsumexp(0)


# --- logit divergences ----------------------------------------------------------------------------


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) over the last dimension from log-probabilities, with ``0 * log(0 / b) = 0``."""
    a = log_a.exp()
    # Select before multiplying: where a == 0 the difference may be -inf - -inf, and 0 * nan (or the
    # 0 * inf of its gradient) would poison the result even if torch.where discarded it afterwards.
    gap = torch.where(a > 0, log_a - log_b, torch.zeros_like(log_a))
    return (a * gap).sum(-1)


def _log_mixture(log_a: Tensor, log_b: Tensor, weight: float) -> Tensor:
    """``log(weight * a + (1 - weight) * b)``; the endpoints return a side as is (log 0 has no float)."""
    if weight == 0:
        return log_b
    if weight == 1:
        return log_a
    return torch.logaddexp(log_a + math.log(weight), log_b + math.log1p(-weight))


def divergence(
    student_logits: Tensor,
    teacher_log_probs: Tensor,
    kind: Divergence,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> Tensor:
    """Per-position divergence ``[n]`` between teacher ``p`` and student ``q``, both at ``temperature``.

    ``student_logits`` are raw logits ``[n, V]``; ``teacher_log_probs`` are log-probs at temperature 1
    and may hold ``-inf`` (dropped tokens). Both sides are tempered (``log_softmax(x / T)``) and the
    result is multiplied by ``T**2``, Hinton's factor that keeps the gradient's scale independent of T.

    - ``forward_kl``: KL(p || q), mean-seeking: the student covers all the teacher's mass.
    - ``reverse_kl``: KL(q || p), mode-seeking; +inf where the teacher has ``-inf`` and the student mass.
    - ``jsd``: the generalised JSD of GKD: ``beta * KL(p || m) + (1 - beta) * KL(q || m)`` with
      ``m = beta * p + (1 - beta) * q``; ``beta = 0`` is forward KL and ``beta = 1`` reverse KL.
    - ``skew_forward_kl`` (DistiLLM): KL(p || alpha * p + (1 - alpha) * q), bounded where q is tiny.
    - ``skew_reverse_kl``: KL(q || alpha * q + (1 - alpha) * p), finite on dropped tokens for alpha > 0.
    - ``tv``: total variation ``0.5 * sum |p - q|``, in ``[0, T**2]``.
    """
    if student_logits.shape != teacher_log_probs.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher log-probs "
            f"{tuple(teacher_log_probs.shape)} differ in shape (do the two models share a vocabulary?)"
        )
    if kind not in DIVERGENCES:
        raise ValueError(f"divergence {kind!r}: expected one of {', '.join(DIVERGENCES)}")
    if not temperature > 0:
        raise ValueError(f"temperature {temperature}: must be > 0")
    if not 0 <= beta <= 1 or not 0 <= alpha <= 1:
        raise ValueError(f"beta {beta} and alpha {alpha} must both lie in [0, 1]")
    log_q = (student_logits.float() / temperature).log_softmax(-1)
    log_p = (teacher_log_probs.float() / temperature).log_softmax(-1)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        loss = _kl(log_p, log_q)
    elif kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        loss = _kl(log_q, log_p)
    elif kind == "jsd":
        log_m = _log_mixture(log_p, log_q, beta)
        loss = beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    elif kind == "skew_forward_kl":
        loss = _kl(log_p, _log_mixture(log_p, log_q, alpha))
    elif kind == "skew_reverse_kl":
        loss = _kl(log_q, _log_mixture(log_q, log_p, alpha))
    else:
        loss = 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    return loss * temperature**2


# --- intermediate representations -----------------------------------------------------------------


def hidden_state_loss(student: Tensor, teacher: Tensor, kind: Literal["mse", "cosine"]) -> Tensor:
    """Per-position ``[n]`` distance between hidden states ``[n, H]`` of equal width, in float32.

    ``mse`` is the mean over the hidden dimension (so its scale does not grow with the width);
    ``cosine`` is ``1 - cosine similarity``, which ignores the norm when the two models' scales differ.
    A projection to a common width, if any, is the caller's (it has parameters; this has none).
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"hidden states differ in shape: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}"
        )
    s, t = student.float(), teacher.float()
    if kind == "mse":
        return (s - t).pow(2).mean(-1)
    if kind == "cosine":
        return 1 - F.cosine_similarity(s, t, dim=-1)
    raise ValueError(f"hidden state loss {kind!r}: expected 'mse' or 'cosine'")


def _kl_probs(a: Tensor, b: Tensor) -> Tensor:
    """KL(a || b) over the last dimension from probabilities; zeros of ``a`` contribute 0."""
    gap = torch.where(a > 0, a.clamp_min(_TINY).log() - b.clamp_min(_TINY).log(), torch.zeros_like(a))
    return (a * gap).sum(-1)


def attention_loss(student: Tensor, teacher: Tensor, query_mask: Tensor) -> Tensor:
    """Scalar KL(teacher row || student row) between attention maps, summed over valid query rows.

    Maps are ``[B, heads, L, L]``, each query row a distribution over keys (zeros where masked);
    ``query_mask`` ``[B, L]`` says which rows count. With equal head counts the loss is per head, then
    averaged over heads; with different counts each side is first averaged over its heads, since there
    is no head-to-head correspondence between two models with different head counts.
    """
    if student.dim() != 4 or teacher.dim() != 4:
        raise ValueError(
            f"attention maps must be [B, heads, L, L], got {tuple(student.shape)}, {tuple(teacher.shape)}"
        )
    batch, _, length, keys = student.shape
    if length != keys or teacher.shape[0] != batch or teacher.shape[2:] != student.shape[2:]:
        raise ValueError(
            f"attention maps do not match: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}"
        )
    if tuple(query_mask.shape) != (batch, length):
        raise ValueError(f"query mask {tuple(query_mask.shape)} does not match [B, L] = [{batch}, {length}]")
    mask = query_mask.bool()
    # Gather the valid rows first: a padded row may hold NaN (a fully masked softmax), which multiplying
    # by a 0/1 mask would keep, in the loss and in the gradient.
    s = student.float().transpose(1, 2)[mask]  # [rows, Hs, L]
    t = teacher.float().transpose(1, 2)[mask]  # [rows, Ht, L]
    if s.shape[1] != t.shape[1]:
        s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
    return _kl_probs(t, s).sum(0).mean()


def layer_map(spec: LayerMapSpec, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Pairs ``(student index, teacher index)`` of hidden states to match.

    Index ``i`` is the output of decoder layer ``i`` (1-based; 0 is the embeddings), as in transformers'
    ``output_hidden_states`` tuples. ``"uniform"`` pairs every student layer ``i`` with teacher layer
    ``round(i * T / S)`` (Python's round: halves go to the even layer); ``{"last": n}`` aligns the last
    ``n`` layers of both at the end; a list of ``[s, t]`` pairs is taken as given. A bad spec raises
    ValueError naming the offending value and the layer counts, since it usually comes from a recipe
    written for another pair of models.
    """
    n_s, n_t = student_layers, teacher_layers
    if not (_is_int(n_s) and _is_int(n_t) and n_s >= 1 and n_t >= 1):
        raise ValueError(
            f"layer map: layer counts must be positive integers, got student {n_s!r}, teacher {n_t!r}"
        )
    counts = f"the student has {n_s} layers, the teacher {n_t}"
    if isinstance(spec, str) and spec == "uniform":
        return [(i, round(i * n_t / n_s)) for i in range(1, n_s + 1)]
    if isinstance(spec, dict):
        n = spec.get("last")
        if set(spec) != {"last"} or not _is_int(n):
            raise ValueError(f"layer map {spec!r}: expected {{'last': n}} with an integer n ({counts})")
        if not 1 <= n <= min(n_s, n_t):
            raise ValueError(f"layer map {{'last': {n}}}: n must be 1-{min(n_s, n_t)} ({counts})")
        return [(n_s - n + j, n_t - n + j) for j in range(1, n + 1)]
    if isinstance(spec, (list, tuple)) and spec:
        return [_layer_pair(pair, n_s, n_t, counts) for pair in spec]
    raise ValueError(
        f"layer map {spec!r}: expected 'uniform', {{'last': n}} or a list of [student, teacher] pairs ({counts})"
    )


def _layer_pair(pair: Any, n_s: int, n_t: int, counts: str) -> tuple[int, int]:
    if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(_is_int(x) for x in pair)):
        raise ValueError(f"layer map pair {pair!r}: expected [student, teacher] layer indices ({counts})")
    s, t = pair
    if not 0 <= s <= n_s:
        raise ValueError(f"layer map pair [{s}, {t}]: the student has {n_s} layers (0-{n_s})")
    if not 0 <= t <= n_t:
        raise ValueError(f"layer map pair [{s}, {t}]: the teacher has {n_t} layers (0-{n_t})")
    return s, t


def _is_int(value: Any) -> bool:
    # bool is an int to Python, but `true` in a recipe is a typo, not layer 1.
    return isinstance(value, int) and not isinstance(value, bool)
