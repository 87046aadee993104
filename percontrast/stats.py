"""Confidence intervals for evaluation results: t-intervals over seeds, a paired bootstrap
over test examples, and a two-level bootstrap over seeds and test examples; and, for a review
that asks for more (test examples cluster by user, 3-5 seeds), a seed-level t-interval of
paired differences with its p-value, a user-clustered interval that adds seed and user
variance, Holm's step-down adjustment and a per-user (macro) mean.

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


# ---------------------------------------------------------------- intervals over seeds and users
# The bootstraps above are percentile intervals: over 3-5 seeds they cannot reach past the observed
# seeds, and resampling test examples one by one treats 40 mails of one sender as 40 independent
# draws. The functions below use t-quantiles (small-sample correct) and resample nothing: each is a
# closed formula, so each can be checked by hand.

def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for T ~ Student t(df): I_{df/(df+t^2)}(df/2, 1/2), the regularized incomplete
    beta function; computed directly, not as 1 - cdf, so that small p-values keep their digits."""
    if math.isinf(t):
        return 0.0
    return _betainc(df / 2, 0.5, df / (df + t * t))


def _t_result(diff: float, var: float, df: float | None, level: float) -> dict:
    """diff +- t_{(1+level)/2, df} sqrt(var) and its two-sided p; a zero variance gives the point and
    p 0 (1 when diff is 0 too): every seed and user agrees exactly."""
    se = math.sqrt(var)
    if se == 0:
        return {"diff": diff, "lo": diff, "hi": diff, "p": 1.0 if diff == 0 else 0.0, "se": 0.0, "df": df}
    half = t_ppf((1 + level) / 2, df) * se
    return {"diff": diff, "lo": diff - half, "hi": diff + half, "p": t_two_sided_p(diff / se, df),
            "se": se, "df": df}


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise UserError(f"level must be in (0, 1), got {level}")


def seed_t_interval(diffs_per_seed, level: float = 0.95) -> dict:
    """Mean paired difference over training seeds, with a Student-t interval on S - 1 degrees of freedom.

    ``diffs_per_seed``: one value per seed, D_s = the mean over test examples of (A - B) for the
    models trained with seed s; or a [seeds, examples] table of per-example differences, averaged
    over the examples first. With D = (1/S) sum_s D_s and s^2 = sum_s (D_s - D)^2 / (S - 1):

        D +- t_{(1+level)/2, S-1} * s / sqrt(S),      p = P(|T_{S-1}| >= |D| / (s / sqrt(S)))

    The test set is held fixed: this is the uncertainty that comes from training seeds ("would
    other seeds change the result on these test examples?"), not from which users were tested.
    Unlike a percentile bootstrap over 3 seeds, t_{0.975, 2} = 4.30 reaches past the observed seeds.
    One seed: no interval and no p-value (None; ``note`` says why). All seeds equal (s = 0): the
    interval is the point, p is 0 (1 when D = 0).
    """
    _check_level(level)
    d = np.asarray(diffs_per_seed, dtype=float)
    if d.ndim == 2:
        d = d.mean(axis=1)
    if d.ndim != 1 or d.size == 0:
        raise UserError(f"seed_t_interval: need one value per seed or a [seeds, examples] table, got shape {d.shape}")
    n = int(d.size)
    out = {"diff": float(d.mean()), "n_seeds": n, "level": level}
    if n == 1:
        return {**out, "lo": None, "hi": None, "p": None, "se": None, "df": None,
                "note": "one seed: seed variance cannot be estimated, no interval"}
    return {**out, **_t_result(out["diff"], float(d.var(ddof=1)) / n, n - 1, level), "note": None}


def _groups(users, n: int) -> tuple[np.ndarray, int]:
    """(group index of each example, number of groups) for a list of n user ids."""
    u = np.asarray(users, dtype=object)
    if u.shape != (n,):
        raise UserError(f"need one user id per example: {n} examples, {u.size} user ids")
    _, inv = np.unique(u.astype(str), return_inverse=True)
    return inv.reshape(-1), int(inv.max()) + 1


def cluster_variance(values, users) -> float:
    """Cluster-robust variance of the mean of ``values`` whose examples cluster by ``users`` (CR1: the
    sandwich of an intercept-only regression with the small-sample factor G/(G-1); Stata's
    (n-1)/(n-k) factor is 1 for one coefficient):

        V = G / (G - 1) * sum_g ( sum_{i in g} (x_i - xbar) )^2 / n^2

    n values from G users. With one value per user it is s^2 / n, the plain variance of a mean;
    values of one user that move together add their covariances. Needs G >= 2."""
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise UserError(f"cluster_variance: need a non-empty list of values, got shape {x.shape}")
    inv, g = _groups(users, x.size)
    if g < 2:
        raise UserError("cluster_variance: needs examples from at least 2 users")
    totals = np.bincount(inv, weights=x - x.mean(), minlength=g)
    return float(g / (g - 1) * (totals ** 2).sum() / x.size ** 2)


def user_clustered_interval(diffs, users, level: float = 0.95) -> dict:
    """Mean paired difference with an interval for new training seeds AND new users.

    ``diffs[s][i]`` is A - B on test example i, both models trained with seed s (shape [S, n]);
    ``users[i]`` the user (author) of example i, G users. The test examples are the same for every
    seed (crossed, not nested). The estimate is the grand mean D = mean_{s,i} d_si, the number the
    bootstrap columns report. Read d_si = mu + a_s + b_i + c_si: a seed effect a_s (variance
    sigma_a^2), an example effect b_i with any covariance inside a user and none between users, and
    a seed x example interaction c_si (independent, variance sigma_c^2). Then

        Var(D) = sigma_a^2 / S + Var(mean_i b_i) + sigma_c^2 / (S n)

    and three pieces estimate it without fitting a mixed model (E[.] under that model):

        V_seed = sum_s (D_s - D)^2 / ((S - 1) S)          D_s = mean_i d_si    E = sigma_a^2/S + sigma_c^2/(S n)
        V_user = cluster_variance(dbar_i, users)            dbar_i = mean_s d_si E = Var(mean b) + sigma_c^2/(S n)
        V_int  = sum_{s,i} r_si^2 / ((S-1)(n-1)) / (S n)   r_si = d_si - D_s - dbar_i + D   E = sigma_c^2/(S n)

    (V_user is exact in expectation when the users have equally many examples, the usual
    cluster-robust approximation otherwise; r_si is the two-way ANOVA residual, which the clustering
    of b_i does not reach). V_seed and V_user each hold the interaction once, so

        V = V_seed + V_user - V_int,     E[V] = Var(D);   df = V^2 / (V_seed^2/(S-1) + V_user^2/(G-1)
                                                                    + V_int^2/((S-1)(n-1)))  (Welch-Satterthwaite)

    The interval is the widest of three t-intervals around D, and p the largest of their p-values:

        combined:   D +- t_{(1+level)/2, df}  sqrt(V)          (left out when V <= 0)
        seeds only: D +- t_{(1+level)/2, S-1} sqrt(V_seed)     (= seed_t_interval)
        users only: D +- t_{(1+level)/2, G-1} sqrt(V_user)

    "Excludes 0" then means each of the three excludes 0 (p is the p-value of that intersection-union
    test), so the coverage is at least that of whichever one is right: the combined one when its
    Satterthwaite df holds; the seeds-only one when the seed variance, estimated from 3-5 seeds, is
    what matters; the users-only one when the subtraction of V_int is off (an interaction that is
    itself clustered by user, a seed that suits one sender, makes V_int too small for it: V errs
    wide; within-seed dependence between examples can make it too large). Adding a source of
    variance never gives a narrower interval than leaving it out. ``width_from`` names the widest.

    One seed: users only, ``seed_level`` False. That is exact for a pair of untrained greedy arms
    (no seed variance exists); otherwise the seed variance is missing (the caller says so). With
    one example per user and one seed it is the plain t-interval over examples (stats.t_interval).
    Fewer than 2 users: no interval (None).
    """
    _check_level(level)
    d = np.asarray(diffs, dtype=float)
    if d.ndim == 1:
        d = d[None, :]
    if d.ndim != 2 or d.size == 0:
        raise UserError(f"user_clustered_interval: need a non-empty [seeds, examples] table, got shape {d.shape}")
    n_seeds, n = d.shape
    _, g = _groups(users, n)
    grand = float(d.mean())
    out = {"diff": grand, "n_seeds": int(n_seeds), "n_users": g, "n": int(n), "level": level,
           "seed_level": n_seeds > 1, "v_seed": None, "v_user": None, "v_int": None, "v_combined": None,
           "df_combined": None}
    if g < 2:
        return {**out, "lo": None, "hi": None, "p": None, "width_from": None}
    out["v_user"] = v_user = cluster_variance(d.mean(axis=0), users)
    pieces = []   # (name, variance, df); ties in width go to the first
    if n_seeds > 1:
        per_seed = d.mean(axis=1)
        out["v_seed"] = v_seed = float(per_seed.var(ddof=1)) / n_seeds
        v_int, den_int = 0.0, 0.0
        if n > 1:
            resid = d - per_seed[:, None] - d.mean(axis=0)[None, :] + grand
            v_int = float((resid ** 2).sum()) / ((n_seeds - 1) * (n - 1)) / (n_seeds * n)
            den_int = v_int ** 2 / ((n_seeds - 1) * (n - 1))
        out["v_int"] = v_int
        v = v_seed + v_user - v_int
        if v > 0:
            out["v_combined"] = v
            out["df_combined"] = v ** 2 / (v_seed ** 2 / (n_seeds - 1) + v_user ** 2 / (g - 1) + den_int)
            pieces.append(("combined", v, out["df_combined"]))
        pieces.append(("seeds", v_seed, n_seeds - 1))
    pieces.append(("users", v_user, g - 1))
    ivs = [(name, _t_result(grand, v, df, level)) for name, v, df in pieces]
    name, widest = max(ivs, key=lambda x: x[1]["hi"] - x[1]["lo"])
    return {**out, "lo": widest["lo"], "hi": widest["hi"], "p": max(iv["p"] for _, iv in ivs), "width_from": name}


def holm(pvalues) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the order given. With the m p-values sorted,
    p_(1) <= ... <= p_(m):

        p~_(k) = min(1, max_{j <= k} (m - j + 1) p_(j))

    Step-down; the running max keeps the adjusted values in the order of the raw ones (monotone).
    Rejecting every hypothesis with p~ <= alpha keeps the family-wise error rate <= alpha under any
    dependence between the tests (they share test examples and seeds here)."""
    p = np.asarray(pvalues, dtype=float)
    if p.ndim != 1 or np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise UserError(f"holm: need a list of p-values in [0, 1], got {list(pvalues)!r}")
    m = p.size
    order = np.argsort(p, kind="mergesort")   # stable: tied p-values get the same adjusted value anyway
    adj_sorted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    adj = np.empty(m)
    adj[order] = adj_sorted
    return adj.tolist()


def length_adjusted(diffs, length_diffs) -> tuple[np.ndarray, float]:
    """A paired difference at equal output length: the per-example differences d (A - B, [seeds,
    examples] or [examples]) minus beta x the length differences l (A's output length - B's, same
    shape), beta the least-squares slope of d on l pooled over every cell,

        beta = sum (l - mean l)(d - mean d) / sum (l - mean l)^2,    d_adj = d - beta l,

    so mean(d_adj) = mean d - beta mean l is the regression's intercept: the difference predicted
    for two outputs of the same length. An overlap score rises with length up to the gold's, so an
    arm that writes shorter loses F1 for its length alone; d_adj keeps the rest. Returns (d_adj,
    beta); beta 0 when every length difference is the same (nothing to regress on). The intervals
    of d_adj treat beta as known (its own error is not propagated: with hundreds of pairs it is
    small beside the seed and user variance, but the interval is that much optimistic)."""
    d = np.asarray(diffs, dtype=float)
    l = np.asarray(length_diffs, dtype=float)
    if d.shape != l.shape or d.size < 2 or not (np.isfinite(d).all() and np.isfinite(l).all()):
        raise UserError(f"length_adjusted: need finite differences and length differences of one shape "
                        f"(>= 2 values), got {d.shape} and {l.shape}")
    lc = l - l.mean()
    ss = float((lc * lc).sum())
    beta = float((lc * (d - d.mean())).sum() / ss) if ss > 0 else 0.0
    return d - beta * l, beta


def macro_mean(values, users) -> float:
    """Per-user (macro) mean: (1/G) sum_g mean_{i in g} x_i. Each user weighs the same however many
    examples they wrote; for a 0/1 value (an attribution hit) it is the share per user averaged over
    the users. The plain mean weighs each user by their number of examples."""
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise UserError(f"macro_mean: need a non-empty list of values, got shape {x.shape}")
    inv, g = _groups(users, x.size)
    return float((np.bincount(inv, weights=x, minlength=g) / np.bincount(inv, minlength=g)).mean())

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
