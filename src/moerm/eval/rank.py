"""Spearman rank correlation between rewards and human gold, on the data and on bootstrap replicates of it.

A reward an RL loop optimises is used across prompts, not only within one pair: a PPO batch, a rejection-sampling
threshold and a reward dashboard compare rewards of different prompts and domains. The rank correlation of the
rewards with the human gold over all scored candidates measures that; pooled across domains it also measures whether
the rewards share one scale (a routed system whose routes have different offsets ranks one domain's candidates
above another's whatever their gold).

The bootstrap resamples prompts (clusters of candidates), so a replicate is the data with each candidate repeated as
often as its prompt was drawn. `spearman` takes those counts as frequency weights and computes exactly the Spearman
correlation of the expanded sample (midranks for ties, then Pearson of the ranks), for every replicate at once,
without building the expanded samples. The draws themselves come from the caller (`moerm.eval.bon.prompt_draws`), so
the rank correlation and the Best-of-N curves of one domain rest on the same resampled prompts.
"""

from __future__ import annotations

import numpy as np


def weighted_midranks(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The midrank of each value of `x` in the sample that holds value i `weights[b, i]` times, per row b.

    x: (M,); weights: (B, M) non-negative integers (counts). Returns (B, M); a value with weight 0 gets the rank it
    would have were it added, which weighs nothing in `spearman`.
    """
    order = np.argsort(x, kind="stable")  # (M,)
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]]  # (M,) the first of each group of tied values
    starts = np.flatnonzero(new)  # (G,)
    group = np.cumsum(new) - 1  # (M,) each sorted value's group
    w = weights[:, order].astype(float)  # (B, M)
    per_group = np.add.reduceat(w, starts, axis=1)  # (B, G) how many copies of each distinct value
    below = np.cumsum(per_group, axis=1) - per_group  # (B, G) copies of smaller values
    ranks_sorted = (below + (per_group + 1) / 2)[:, group]  # (B, M)
    ranks = np.empty_like(ranks_sorted)
    ranks[:, order] = ranks_sorted
    return ranks


def spearman(x: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Spearman's rho of x and y (each (M,)) for every row of frequency weights (B, M); None: one row of ones.

    Returns (B,); NaN where x or y is constant in a replicate (no ranking to correlate).
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or x.size < 2:
        raise ValueError("x and y must be 1-d of the same length, at least 2")
    w = np.ones((1, x.size)) if weights is None else np.asarray(weights, dtype=float)  # (B, M)
    if w.ndim != 2 or w.shape[1] != x.size:
        raise ValueError("weights must be (replicates, len(x))")
    rx, ry = weighted_midranks(x, w), weighted_midranks(y, w)  # (B, M)
    total = w.sum(axis=1, keepdims=True)  # (B, 1)
    dx = rx - (w * rx).sum(axis=1, keepdims=True) / total
    dy = ry - (w * ry).sum(axis=1, keepdims=True) / total
    cov = (w * dx * dy).sum(axis=1)  # (B,)
    var = (w * dx * dx).sum(axis=1) * (w * dy * dy).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(var > 1e-18, cov / np.sqrt(np.where(var > 1e-18, var, 1.0)), np.nan)
