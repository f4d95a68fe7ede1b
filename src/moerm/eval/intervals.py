"""95% intervals for pairwise accuracies from a bootstrap that resamples prompts (clusters of pairs), not pairs.

Pairs that share a prompt are not independent (16 summaries of one summeval article, many model pairs per AlpacaEval
instruction): resampling pairs would give intervals that are too narrow. Here each replicate draws, within each
stratum (a domain), as many clusters as the stratum has, with replacement, and keeps all pairs of every drawn cluster.

- `clustered_accuracy_ci(correct, clusters)`: one accuracy. `correct` is one 0/1 row per pair, or one row per run
  (training seeds) over the same pairs: the statistic is then the mean over runs, and every replicate resamples
  the prompts once for all runs (the seed spread is not in the interval; reports show it beside it).
- `paired_clustered_diff_ci(correct_a, correct_b, clusters)`: a - b on the same pairs, both resampled with the same
  draws (the paired bootstrap): what decides whether one system beats another.
- `clustered_mean_std_ci(values, clusters)`: the mean and the standard deviation of any per-item values (a reward
  per text, its prompt as the cluster), both from the same draws.
- `strata` (each pair's domain): resample within each domain, so every replicate keeps each domain; `macro=True`
  then gives the mean over domains of the per-domain accuracy (the reports' macro average).

A stratum's draws depend only on (seed, stratum name, its number of clusters), so a domain's interval, the macro
interval and every paired difference that involves it use the same replicates of that domain. The interval is the
percentile interval of the replicates; the point is the statistic on the data itself.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Hashable, Sequence

import numpy as np

RESAMPLES = 2000


def sample_std(values: Sequence[float]) -> float:
    """The sample standard deviation (n - 1 in the denominator); 0.0 for fewer than two values."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap interval; `prompts`/`pairs`: how many clusters and pairs it rests on."""

    point: float
    low: float
    high: float
    level: float
    prompts: int
    pairs: int
    resamples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def verdict(self, line: float) -> str:
        """"met" when the whole interval is at or above `line`, "missed" when it is below, else "not resolved"."""
        if self.low >= line - 1e-12:
            return "met"
        if self.high < line - 1e-12:
            return "missed"
        return "not resolved"


def _rows(correct: Sequence[Any]) -> np.ndarray:
    arr = np.asarray(correct, dtype=float)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError("correct must be one 0/1 value per pair, or one row of them per run")
    return arr  # (runs, N)


@dataclass
class _Stratum:
    name: str
    sums: list[np.ndarray]  # per input: (runs, C) correct pairs per cluster
    sizes: np.ndarray  # (C,) pairs per cluster
    weights: np.ndarray  # (B, C) how often each cluster is drawn in each replicate


def _strata(inputs: Sequence[np.ndarray], clusters: Sequence[Hashable], strata: Sequence[Hashable] | None,
            resamples: int, seed: int) -> list[_Stratum]:
    n = inputs[0].shape[1]
    if len(clusters) != n or (strata is not None and len(strata) != n) or any(x.shape[1] != n for x in inputs):
        raise ValueError("correct, clusters and strata must have one entry per pair")
    if n == 0:
        raise ValueError("no pairs")
    labels = [""] * n if strata is None else [str(s) for s in strata]
    by: dict[str, list[int]] = {}
    for i, s in enumerate(labels):
        by.setdefault(s, []).append(i)
    out = []
    for name in sorted(by):
        idx = np.asarray(by[name])
        _, inverse = np.unique(np.asarray([str(clusters[i]) for i in idx], dtype=object), return_inverse=True)
        c = int(inverse.max()) + 1
        sizes = np.bincount(inverse, minlength=c).astype(float)
        sums = [np.stack([np.bincount(inverse, weights=row[idx], minlength=c) for row in x]) for x in inputs]
        rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8")), c])
        weights = rng.multinomial(c, np.full(c, 1.0 / c), size=resamples).astype(float)
        out.append(_Stratum(name, sums, sizes, weights))
    return out


def _statistic(strata: list[_Stratum], which: int, macro: bool) -> tuple[float, np.ndarray]:
    """(point, (B,) replicates) of the mean over runs of the accuracy (pair-weighted, or macro over strata)."""
    points, reps, totals, rep_totals = [], [], [], []
    for s in strata:
        sums = s.sums[which]  # (runs, C)
        correct = sums.mean(0)  # (C,) mean over runs
        rep_correct = s.weights @ correct  # (B,)
        rep_size = s.weights @ s.sizes  # (B,)
        if macro:
            points.append(correct.sum() / s.sizes.sum())
            reps.append(rep_correct / rep_size)
        else:
            totals.append((correct.sum(), s.sizes.sum()))
            rep_totals.append((rep_correct, rep_size))
    if macro:
        return float(np.mean(points)), np.mean(reps, axis=0)
    point = sum(c for c, _ in totals) / sum(n for _, n in totals)
    return float(point), sum(c for c, _ in rep_totals) / sum(n for _, n in rep_totals)


def _interval(point: float, reps: np.ndarray, level: float, strata: list[_Stratum], n: int,
              resamples: int) -> Interval:  # reps: (B,)
    lo, hi = np.quantile(reps, [(1 - level) / 2, 1 - (1 - level) / 2])
    prompts = sum(len(s.sizes) for s in strata)
    return Interval(point, float(lo), float(hi), level, prompts, n, resamples)


def bootstrap_replicates(correct: Sequence[Any], clusters: Sequence[Hashable], strata: Sequence[Hashable] | None = None,
                         *, macro: bool = False, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, np.ndarray]:
    """The statistic of `clustered_accuracy_ci` and its (resamples,) bootstrap replicates."""
    x = _rows(correct)
    return _statistic(_strata([x], clusters, strata, resamples, seed), 0, macro)


def clustered_accuracy_ci(correct: Sequence[Any], clusters: Sequence[Hashable],
                          strata: Sequence[Hashable] | None = None, *, macro: bool = False,
                          resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> Interval:
    """Accuracy (share of 1s; with several runs, the mean of their accuracies) and its clustered bootstrap interval.

    correct: (N,) or (runs, N) 0/1; clusters: (N,) each pair's prompt key; strata: (N,) each pair's domain (None: one
    stratum); macro: the mean over strata of their accuracies instead of the pair-weighted accuracy.
    """
    x = _rows(correct)
    st = _strata([x], clusters, strata, resamples, seed)
    point, reps = _statistic(st, 0, macro)
    return _interval(point, reps, level, st, x.shape[1], resamples)


def paired_clustered_diff_ci(correct_a: Sequence[Any], correct_b: Sequence[Any], clusters: Sequence[Hashable],
                             strata: Sequence[Hashable] | None = None, *, macro: bool = False,
                             resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> Interval:
    """Accuracy of a minus accuracy of b on the same pairs (each (N,) or (runs, N); the run counts may differ), with
    the interval of the paired clustered bootstrap: both resampled with the same prompt draws."""
    a, b = _rows(correct_a), _rows(correct_b)
    st = _strata([a, b], clusters, strata, resamples, seed)
    pa, ra = _statistic(st, 0, macro)
    pb, rb = _statistic(st, 1, macro)
    return _interval(pa - pb, ra - rb, level, st, a.shape[1], resamples)


def accuracy_intervals(correct: Sequence[Any], clusters: Sequence[Hashable], domains: Sequence[str], *,
                       resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> dict[str, Any]:
    """Every interval an accuracy report shows, from the same prompt draws: `overall` (pair-weighted) and `macro`
    (mean over domains), both resampling prompts within each domain, and `per_domain` (domain -> Interval)."""
    x = _rows(correct)
    st = _strata([x], clusters, domains, resamples, seed)
    n = x.shape[1]
    out: dict[str, Any] = {"overall": _interval(*_statistic(st, 0, False), level, st, n, resamples),
                           "macro": _interval(*_statistic(st, 0, True), level, st, n, resamples), "per_domain": {}}
    for s in st:
        out["per_domain"][s.name] = _interval(*_statistic([s], 0, False), level, [s], int(s.sizes.sum()), resamples)
    return out


def paired_differences(correct_a: Sequence[Any], correct_b: Sequence[Any], clusters: Sequence[Hashable],
                       domains: Sequence[str], *, resamples: int = RESAMPLES, level: float = LEVEL,
                       seed: int = 0) -> dict[str, Any]:
    """a - b on the same pairs, as `accuracy_intervals` reports accuracies: `overall`, `macro`, `per_domain`, each
    an Interval of the paired clustered bootstrap (the same prompt draws for both, within each domain)."""
    a, b = _rows(correct_a), _rows(correct_b)
    st = _strata([a, b], clusters, domains, resamples, seed)
    n = a.shape[1]

    def diff(strata: list[_Stratum], macro: bool, pairs: int) -> Interval:
        (pa, ra), (pb, rb) = _statistic(strata, 0, macro), _statistic(strata, 1, macro)
        return _interval(pa - pb, ra - rb, level, strata, pairs, resamples)

    return {"overall": diff(st, False, n), "macro": diff(st, True, n),
            "per_domain": {s.name: diff([s], False, int(s.sizes.sum())) for s in st}}


def clustered_mean_std_ci(values: Sequence[float], clusters: Sequence[Hashable],
                          strata: Sequence[Hashable] | None = None, *, resamples: int = RESAMPLES,
                          level: float = LEVEL, seed: int = 0) -> tuple[Interval, Interval]:
    """The mean and the sample standard deviation (n - 1) of `values` pooled over all strata (e.g. one reward per
    text; clusters: each text's prompt key; strata: its domain), each with its clustered bootstrap interval, both from
    the same prompt draws as the accuracy intervals. A single cluster gives a degenerate interval (low = high = point).
    """
    x = np.asarray(values, dtype=float)  # (N,)
    if x.ndim != 1 or x.size < 2:
        raise ValueError("values must be one number per item, at least two")
    centred = x - x.mean()  # the variance is shift-invariant: centring keeps the sums of squares exact
    st = _strata([centred[None, :], (centred ** 2)[None, :]], clusters, strata, resamples, seed)
    n, rep_n = sum(s.sizes.sum() for s in st), sum(s.weights @ s.sizes for s in st)  # scalar, (B,)
    s1, rep_s1 = sum(s.sums[0][0].sum() for s in st), sum(s.weights @ s.sums[0][0] for s in st)
    s2, rep_s2 = sum(s.sums[1][0].sum() for s in st), sum(s.weights @ s.sums[1][0] for s in st)
    point_std = math.sqrt(max(s2 - s1 * s1 / n, 0.0) / (n - 1))
    rep_std = np.sqrt(np.maximum(rep_s2 - rep_s1 * rep_s1 / rep_n, 0.0) / (rep_n - 1))
    mean = _interval(float(x.mean() + s1 / n), x.mean() + rep_s1 / rep_n, level, st, x.size, resamples)
    return mean, _interval(point_std, rep_std, level, st, x.size, resamples)
