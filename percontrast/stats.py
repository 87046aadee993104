"""Confidence intervals for evaluation results: t-intervals over seeds, a paired bootstrap
over test examples, and a two-level bootstrap over seeds and test examples.

The Student-t quantile is computed here (written before scipy came in with scikit-learn; kept: tested,
and it keeps this module free of it): the CDF via
the regularized incomplete beta function (continued fraction, Lentz's method), inverted
by bisection. Accurate to ~1e-10, which is far below anything we report.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import UserError


# ---------------------------------------------------------------- Student t

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction for the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(lbeta) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbeta) * _betacf(b, a, 1 - x) / b


def t_cdf(t: float, df: float) -> float:
    x = df / (df + t * t)
    tail = 0.5 * _betainc(df / 2, 0.5, x)
    return 1 - tail if t > 0 else tail


def t_ppf(q: float, df: float) -> float:
    """Quantile of Student's t with ``df`` degrees of freedom (bisection on the CDF)."""
    if not 0 < q < 1 or df <= 0:
        raise ValueError(f"t_ppf needs 0 < q < 1 and df > 0, got q={q}, df={df}")
    if q == 0.5:
        return 0.0
    if q < 0.5:
        return -t_ppf(1 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2


# ---------------------------------------------------------------- intervals

@dataclass(frozen=True)
class Interval:
    mean: float
    lo: float      # NaN when the interval is undefined (one seed)
    hi: float
    n: int

    def as_dict(self) -> dict:
        f = lambda v: None if math.isnan(v) else v  # JSON has no NaN
        return {"mean": self.mean, "lo": f(self.lo), "hi": f(self.hi), "n": self.n}


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """mean +- t_{(1+c)/2, n-1} * s / sqrt(n), s the sample standard deviation (ddof=1).
    With one value the interval is undefined (NaN bounds): one seed says nothing about
    seed variance."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise UserError("t_interval: no values")
    mean = float(x.mean())
    if x.size == 1:
        return Interval(mean, math.nan, math.nan, 1)
    half = t_ppf((1 + confidence) / 2, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return Interval(mean, mean - half, mean + half, int(x.size))


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, n_resamples: int = 10_000,
                     confidence: float = 0.95, seed: int = 0) -> dict:
    """Percentile bootstrap interval of mean(a - b) over paired examples.

    Resamples example indices with replacement (``numpy.random.default_rng(seed)``), the
    same indices for both systems, so the pairing is kept. Returns the observed mean
    difference, the interval, and ``share_boot_le_0``: the share of resampled mean
    differences <= 0. That share is a description of the bootstrap distribution, not a
    p-value (no null hypothesis was resampled).
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise UserError(f"paired_bootstrap: need two equal-length non-empty lists, got {x.shape} and {y.shape}")
    d = x - y
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(n_resamples, d.size))
    means = d[idx].mean(axis=1)
    return {"diff": float(d.mean()), **_percentiles(means, confidence), "n": int(d.size),
            "resamples": n_resamples, "seed": seed}


def two_level_bootstrap(diffs: Sequence[Sequence[float]], *, n_resamples: int = 10_000,
                        confidence: float = 0.95, seed: int = 0) -> dict:
    """Percentile bootstrap interval of the mean paired difference over seeds AND examples.

    ``diffs[s][i]`` is method minus reference on test example i, both trained with seed s
    (shape [seeds, examples]). Each replicate draws the examples with replacement, then the
    seeds with replacement, and averages ``diffs`` over the drawn seeds x drawn examples.
    The test examples are the same for every seed (crossed, not nested), so one example
    draw per replicate serves all drawn seeds; drawing examples anew per seed would
    divide the example variance by the number of seeds.

    The example draw comes first from ``default_rng(seed)``, as in ``paired_bootstrap``: with
    one seed the result is exactly ``paired_bootstrap`` of that seed's scores (the seed
    level is degenerate, ``seed_level`` False). With few seeds the seed level is coarse (3
    seeds give 10 distinct seed multisets) and, like any bootstrap, it understates the
    seed variance by a factor (S - 1) / S.
    """
    d = np.asarray(diffs, dtype=float)
    if d.ndim != 2 or d.size == 0:
        raise UserError(f"two_level_bootstrap: need a non-empty [seeds, examples] table, got shape {d.shape}")
    n_seeds, n_ex = d.shape
    rng = np.random.default_rng(seed)
    ex = rng.integers(0, n_ex, size=(n_resamples, n_ex))          # [R, I]
    sd = rng.integers(0, n_seeds, size=(n_resamples, n_seeds))    # [R, S]
    per_seed = np.stack([row[ex].mean(axis=1) for row in d], axis=1)  # [R, S]: each seed on the drawn examples
    means = np.take_along_axis(per_seed, sd, axis=1).mean(axis=1)     # [R]
    return {"diff": float(d.mean()), **_percentiles(means, confidence), "n": int(n_ex), "n_seeds": int(n_seeds),
            "seed_level": n_seeds > 1, "resamples": n_resamples, "seed": seed}


def _percentiles(means: np.ndarray, confidence: float) -> dict:
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return {"lo": float(lo), "hi": float(hi), "share_boot_le_0": float((means <= 0).mean())}


def share_boot_le_0(result: dict) -> float | None:
    """The share of bootstrap replicates with a difference <= 0; reads results written
    before the rename, where the same number was called ``p_le_0``."""
    return result.get("share_boot_le_0", result.get("p_le_0"))


def relative_gain(new: float, base: float) -> float | None:
    """Percent gain of ``new`` over ``base`` (the paper's headline); None when base is 0."""
    return None if base == 0 else 100.0 * (new - base) / base


# ---------------------------------------------------------------- ranking and thresholds
# Token classifiers (``percontrast identify``): a score per item, higher = more likely positive.

def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])  # start index of each run of equal values
    ends = np.r_[starts[1:], len(xs)]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auroc(scores, labels) -> float:
    """Area under the ROC curve: P(score of a random positive > that of a random negative), ties
    counting 1/2 (the Mann-Whitney U statistic over n_pos x n_neg). NaN when either class is empty."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = _average_ranks(s)
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def f1_curve(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """(thresholds, F1) for the rule "positive iff score >= t", t over the distinct scores, descending.

    Tied scores are always on the same side of a threshold.
    """
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[s[1:] != s[:-1], True]  # last index of each tie group
    tp = np.cumsum(y)[last]
    fp = np.cumsum(~y)[last]
    n_pos = y.sum()
    f1 = np.where(tp > 0, 2 * tp / (tp + fp + n_pos), 0.0)  # 2PR/(P+R) = 2TP/(2TP+FP+FN)
    return s[last], f1


def best_f1(scores, labels) -> tuple[float, float]:
    """(best F1 over all thresholds "positive iff score >= t", that threshold); the highest
    threshold wins ties. (NaN, NaN) without positives."""
    y = np.asarray(labels).astype(bool)
    if y.sum() == 0 or len(y) == 0:
        return float("nan"), float("nan")
    t, f1 = f1_curve(scores, labels)
    i = int(np.argmax(f1))
    return float(f1[i]), float(t[i])


def f1_at(scores, labels, threshold: float) -> float:
    """F1 of the rule "positive iff score >= threshold" (a threshold chosen elsewhere, e.g. on dev).
    NaN without positives or with a non-finite threshold."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    if y.sum() == 0 or not np.isfinite(threshold):
        return float("nan")
    pred = s >= threshold
    tp = int((pred & y).sum())
    return 2 * tp / (int(pred.sum()) + int(y.sum()))
