"""Metrics: each a name, what it needs from the model, per-sample statistics and an aggregate.

Per sample a metric returns a vector of additive statistics (see ``eval/stats.py``) and the value
shown for that sample in the records; the aggregate turns summed statistics into the number in the
report, so bootstrap intervals never recompute anything from text.

=====================  ==============  =====================================================  ========
metric                 needs           per sample → aggregate                                 better
=====================  ==============  =====================================================  ========
perplexity             loglikelihood   [nll, tokens] → exp(Σnll / Σtokens) over every         lower
                                       assistant turn (labelled as SFT labels them)
exact_match            generation      the verifiers' ``exact`` (normalised) on the first     higher
numeric, math, regex   generation      the verifiers of ``synth cot`` (``synth/verify.py``)   higher
unit_tests             generation      the answer's code run with the row's tests (sandbox)   higher
pass@k                 generation      unbiased 1 - C(n-c, k) / C(n, k) of n samples          higher
bleu                   generation      sacrebleu corpus BLEU from summed n-gram statistics    higher
chrf                   generation      mean sentence chrF (sacrebleu)                         higher
rouge1, rouge2, rougeL generation      mean F-measure (rouge-score, stemmed)                  higher
reward_accuracy        reward          chosen scored above rejected by a reward model         higher
win_rate               judge           1 win, ½ tie or split verdict, 0 loss (LLM judge)      higher
top1_agreement         teacher         teacher's and student's argmax agree, per token        higher
kl_teacher_student     teacher         mean KL(teacher ‖ student) per answer token            lower
=====================  ==============  =====================================================  ========
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np

from eval.stats import Aggregate
from manifests.errors import DistilleryError

Needs = Literal["generation", "loglikelihood", "reward", "judge", "teacher"]

_VERIFIER_METHOD = {"exact_match": "exact", "numeric": "numeric", "math": "math", "regex": "regex",
                    "unit_tests": "tests"}  # fmt: skip
_PASS_AT = re.compile(r"^pass@(\d+)$")


def _mean(sums: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums[..., 0] / sums[..., 1]


def _perplexity(sums: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        return np.exp(sums[..., 0] / sums[..., 1])


def _corpus_bleu(sums: np.ndarray) -> np.ndarray:
    from sacrebleu.metrics import BLEU

    flat = sums.reshape(-1, sums.shape[-1])
    scores = [
        BLEU.compute_bleu([int(round(x)) for x in row[0:4]], [int(round(x)) for x in row[4:8]],
                          int(round(row[8])), int(round(row[9])), smooth_method="exp").score
        for row in flat
    ]  # fmt: skip
    return np.asarray(scores, dtype=np.float64).reshape(sums.shape[:-1])


@dataclass(frozen=True)
class Metric:
    name: str
    needs: Needs
    aggregate: Aggregate = _mean
    higher_is_better: bool = True
    binary: bool = False
    """Per sample right or wrong (or a win): records get ``correct`` and comparisons list flips."""
    k: int = 0
    """For ``pass@k``."""
    pooled: bool = False
    """The aggregate pools statistics across samples (tokens, n-gram counts) instead of averaging
    the per-sample values the records keep, so records alone cannot redo it (``eval compare``)."""

    @property
    def verifier_method(self) -> str | None:
        return _VERIFIER_METHOD.get(self.name)


METRICS: dict[str, Metric] = {
    "perplexity": Metric("perplexity", "loglikelihood", _perplexity, higher_is_better=False, pooled=True),
    **{name: Metric(name, "generation", binary=True) for name in _VERIFIER_METHOD},
    "bleu": Metric("bleu", "generation", _corpus_bleu, pooled=True),
    "chrf": Metric("chrf", "generation"),
    "rouge1": Metric("rouge1", "generation"),
    "rouge2": Metric("rouge2", "generation"),
    "rougeL": Metric("rougeL", "generation"),
    "reward_accuracy": Metric("reward_accuracy", "reward", binary=True),
    "win_rate": Metric("win_rate", "judge", binary=True),
    "top1_agreement": Metric("top1_agreement", "teacher", pooled=True),
    "kl_teacher_student": Metric("kl_teacher_student", "teacher", higher_is_better=False, pooled=True),
}


def metric_named(name: str) -> Metric:
    """The metric called ``name`` (``pass@k`` for any k ≥ 1); an unknown one names the nearest."""
    match = _PASS_AT.match(name)
    if match:
        k = int(match.group(1))
        if k < 1:
            raise DistilleryError(f"metric {name!r}: k must be at least 1 (pass@1, pass@5, …)")
        return Metric(name, "generation", binary=True, k=k)
    if name in METRICS:
        return METRICS[name]
    known = [*METRICS, "pass@k"]
    near = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f"did you mean {near[0]!r}? " if near else ""
    raise DistilleryError(f"unknown metric {name!r}; {hint}known metrics: {', '.join(known)}")


# ------------------------------------------------------------------------------- per-sample values


def pass_at_k(n: int, correct: int, k: int) -> float:
    """The unbiased estimator of pass@k from n samples of which ``correct`` passed (Chen et al., 2021)."""
    if n - correct < k:
        return 1.0
    # 1 - C(n-c, k) / C(n, k) as a product, stable for large n.
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - correct + 1, n + 1)))


@dataclass
class TextScorers:
    """The reference implementations, built once per eval (rouge-score's scorer stems with Porter)."""

    rouge_types: tuple[str, ...] = ("rouge1", "rouge2", "rougeL")
    _cache: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def bleu(self):
        from sacrebleu.metrics import BLEU

        return BLEU(effective_order=True)

    @cached_property
    def chrf(self):
        from sacrebleu.metrics import CHRF

        return CHRF()

    @cached_property
    def rouge(self):
        from rouge_score import rouge_scorer

        return rouge_scorer.RougeScorer(list(self.rouge_types), use_stemmer=True)

    def text_metric(self, name: str, output: str, target: str) -> tuple[list[float], float]:
        """(statistics, shown value) of one generation against its reference."""
        if name == "bleu":
            s = self.bleu.sentence_score(output, [target])
            return [*s.counts, *s.totals, s.sys_len, s.ref_len], s.score
        if name == "chrf":
            value = self.chrf.sentence_score(output, [target]).score
            return [value, 1.0], value
        scores = self._cache.get((output, target))
        if scores is None:
            scores = self.rouge.score(target, output)
            self._cache.clear()  # only the last pair: rouge1/2/L of one sample share one call
            self._cache[(output, target)] = scores
        value = scores[name].fmeasure
        return [value, 1.0], value


def mean_stats(value: float) -> list[float]:
    return [float(value), 1.0]


def is_right(metric: Metric, value: float | None) -> bool | None:
    """Whether a sample counts as right under a binary metric: a pass, a win, or pass@k above ½."""
    if not metric.binary or value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value > 0.5
