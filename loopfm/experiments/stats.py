"""Summaries across seeds and paired tests of "A beats B".

Two tests, because they answer different questions:
- a paired t-test over seeds (scipy.stats.ttest_rel) on the per-seed metric: does A beat B
  when the world, the FM and the VM initialisation are all redrawn? With 3 seeds it has 2
  degrees of freedom, so p < 0.01 needs a very consistent effect.
- a paired bootstrap over eval impressions: the same resampled impressions score A and B
  (stratified by seed, the difference averaged over seeds): is the difference larger than
  the eval window's sampling noise?
Both are two-sided.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from loopfm.eval.metrics import EPS, rate_entropy


def summary(values: list[float]) -> dict:
    """Mean, sample standard deviation (ddof=1) and the per-seed values themselves (so any other
    paired test can be run on results.json)."""
    a = np.asarray(values, dtype=np.float64)
    std = float(a.std(ddof=1)) if a.size > 1 else 0.0
    return {"mean": float(a.mean()), "std": std, "n": int(a.size), "values": [float(v) for v in a]}


def ratio_of_means(a: list[float], b: list[float]) -> float:
    """mean(a) / mean(b); NaN (and no warning) when mean(b) is 0."""
    denominator = float(np.mean(b))
    return float(np.mean(a)) / denominator if denominator != 0 else float("nan")


def paired_ttest(a: list[float], b: list[float]) -> float:
    """Two-sided p of a paired t-test over seeds; 1.0 when the differences are all zero."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.size < 2 or np.allclose(d, d[0]) and d[0] == 0:
        return 1.0
    if np.allclose(d, d[0]):  # constant nonzero difference: t is infinite
        return 0.0
    return float(stats.ttest_rel(a, b).pvalue)


def weighted_auc(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUC under per-row weights [R, n] (bootstrap counts), ties counted half. O(R n)."""
    order = np.argsort(p, kind="stable")
    y, p, w = y[order], p[order], w[:, order]
    starts = np.flatnonzero(np.r_[True, np.diff(p) != 0])  # groups of tied scores
    pos = np.add.reduceat(w * y, starts, axis=1)
    neg = np.add.reduceat(w * (1 - y), starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    return (pos * (neg_below + 0.5 * neg)).sum(1) / (pos.sum(1) * neg.sum(1))


def weighted_ne(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Normalized entropy under per-row weights [R, n]."""
    p = np.clip(p, EPS, 1 - EPS)
    n = w.sum(1)
    logloss = -(w * (y * np.log(p) + (1 - y) * np.log(1 - p))).sum(1) / n
    return logloss / rate_entropy((w * y).sum(1) / n)


METRICS = {"auc": weighted_auc, "ne": weighted_ne}


def paired_bootstrap(
    y: list[np.ndarray], terms: list[tuple[float, list[np.ndarray]]], metric: str, reps: int = 1000, seed: int = 0
) -> dict:
    """Resample eval impressions within each seed, the same draw for every model; the statistic
    is sum(coef * metric(model)) averaged over seeds (A - B is [(1, A), (-1, B)]). Returns the
    two-sided p of "statistic = 0" (resolution 1/reps) and a 95% interval."""
    rng = np.random.default_rng(seed)
    fn = METRICS[metric]
    stat = np.zeros(reps)
    for i, ys in enumerate(y):
        for lo in range(0, reps, 100):  # chunks bound memory: [100, n] weights at a time
            r = min(100, reps - lo)
            w = np.stack([np.bincount(rng.integers(0, ys.size, ys.size), minlength=ys.size) for _ in range(r)])
            w = w.astype(np.float64)
            stat[lo : lo + r] += sum(coef * fn(ys, preds[i], w) for coef, preds in terms) / len(y)
    p = 2 * min((stat <= 0).mean(), (stat >= 0).mean())
    return {"p": float(min(1.0, max(p, 1 / reps))), "ci95": [float(np.quantile(stat, 0.025)), float(np.quantile(stat, 0.975))]}
