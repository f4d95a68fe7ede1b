"""The clustered (prompt-resampling) bootstrap: hand-computed cases."""

import numpy as np
import pytest

from moerm.eval.intervals import (
    Interval, bootstrap_replicates, clustered_accuracy_ci, clustered_mean_std_ci, paired_clustered_diff_ci,
)


def test_all_correct_is_a_point_and_identical_systems_differ_by_zero():
    correct = [1] * 12
    clusters = [i // 3 for i in range(12)]  # 4 prompts of 3 pairs
    ci = clustered_accuracy_ci(correct, clusters)
    assert (ci.point, ci.low, ci.high, ci.prompts, ci.pairs) == (1.0, 1.0, 1.0, 4, 12)
    mixed = [1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 0]
    diff = paired_clustered_diff_ci(mixed, mixed, clusters)
    assert (diff.point, diff.low, diff.high) == (0.0, 0.0, 0.0)


def test_two_clusters_follow_the_exact_bootstrap_distribution():
    # one prompt whose pair is right, one whose pair is wrong: a replicate draws 2 prompts with replacement, so its
    # accuracy is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4; the 95% interval is [0, 1]
    point, reps = bootstrap_replicates([1, 0], ["a", "b"], resamples=20000, seed=3)
    assert point == 0.5
    freq = {v: float(np.mean(reps == v)) for v in (0.0, 0.5, 1.0)}
    assert freq[0.0] == pytest.approx(0.25, abs=0.015) and freq[0.5] == pytest.approx(0.5, abs=0.015)
    assert sum(freq.values()) == pytest.approx(1.0)
    ci = clustered_accuracy_ci([1, 0], ["a", "b"])
    assert (ci.low, ci.high) == (0.0, 1.0)


def test_interval_widens_when_pairs_are_clustered():
    # 16 pairs, half right. In 4 prompts of 4 pairs each, all right or all wrong, the replicate mean is a mean of 4
    # cluster means: sd = sqrt(0.25 / 4) = 0.25. Each pair its own prompt: sd = sqrt(0.25 / 16) = 0.125.
    correct = [1] * 8 + [0] * 8
    _, clustered = bootstrap_replicates(correct, [i // 4 for i in range(16)], resamples=20000)
    _, independent = bootstrap_replicates(correct, list(range(16)), resamples=20000)
    assert clustered.std() == pytest.approx(0.25, abs=0.01)
    assert independent.std() == pytest.approx(0.125, abs=0.006)
    wide = clustered_accuracy_ci(correct, [i // 4 for i in range(16)])
    narrow = clustered_accuracy_ci(correct, list(range(16)))
    assert wide.point == narrow.point == 0.5
    assert wide.high - wide.low > 1.6 * (narrow.high - narrow.low)
    assert (wide.prompts, narrow.prompts) == (4, 16)


def test_macro_resamples_within_each_domain():
    # domain x: every pair right (3 prompts), domain y: every pair wrong (3 prompts). Resampling within each domain
    # keeps both, so the macro is 0.5 in every replicate; pooled, the pair-weighted accuracy varies.
    correct = [1] * 6 + [0] * 6
    clusters = [f"p{i // 2}" for i in range(12)]
    domains = ["x"] * 6 + ["y"] * 6
    macro = clustered_accuracy_ci(correct, clusters, domains, macro=True)
    assert (macro.point, macro.low, macro.high, macro.prompts) == (0.5, 0.5, 0.5, 6)
    pooled = clustered_accuracy_ci(correct, clusters)
    assert pooled.point == 0.5 and pooled.high - pooled.low > 0.3
    # unequal domain sizes: macro (1 + 0.25) / 2 differs from the pair-weighted 3 / 6
    rep = clustered_accuracy_ci([1, 1, 1, 0, 0, 0], list("abcdef"), ["x", "x", "y", "y", "y", "y"], macro=True)
    assert rep.point == pytest.approx(0.625)
    assert clustered_accuracy_ci([1, 1, 1, 0, 0, 0], list("abcdef"), ["x", "x", "y", "y", "y", "y"]).point == 0.5


def test_paired_difference_is_narrower_than_the_accuracies_it_compares():
    # two systems that agree on every pair but one: each accuracy is uncertain (prompts all right or all wrong),
    # their difference barely (only the one pair moves it)
    clusters = [i // 4 for i in range(16)]
    a = [1] * 8 + [0] * 8
    b = list(a)
    b[0] = 0
    diff = paired_clustered_diff_ci(a, b, clusters)
    assert diff.point == pytest.approx(1 / 16)
    # the difference is k/16 for k = how often the prompt holding that pair is drawn, k ~ Binomial(4, 1/4):
    # P(k = 0) = 0.32 and P(k <= 2) = 0.95 < 0.975, so the interval is [0, 3/16]
    assert (diff.low, diff.high) == (0.0, pytest.approx(3 / 16))
    single = clustered_accuracy_ci(a, clusters)
    assert single.high - single.low > 0.5
    # and a difference that flips sign with the prompts drawn is not resolved either way
    c = [1] * 4 + [0] * 4 + [1] * 4 + [0] * 4
    assert paired_clustered_diff_ci(a, c, clusters).verdict(0.0) == "not resolved"


def test_runs_are_averaged_with_the_same_prompt_draws():
    runs = [[1, 1, 0, 0], [1, 0, 0, 0]]
    ci = clustered_accuracy_ci(runs, ["a", "a", "b", "b"])
    assert ci.point == pytest.approx(0.375) and ci.pairs == 4 and ci.prompts == 2
    # a with 2 runs vs b with 1: the difference of their mean accuracies
    d = paired_clustered_diff_ci(runs, [0, 0, 0, 0], ["a", "a", "b", "b"])
    assert d.point == pytest.approx(0.375)


def test_seeded_and_checked():
    correct = [1, 0, 1, 1, 0, 1, 0, 1]
    clusters = [0, 0, 1, 1, 2, 2, 3, 3]
    assert clustered_accuracy_ci(correct, clusters, seed=1) == clustered_accuracy_ci(correct, clusters, seed=1)
    with pytest.raises(ValueError, match="one entry per pair"):
        clustered_accuracy_ci(correct, clusters[:-1])
    assert Interval(0.6, 0.55, 0.7, 0.95, 10, 40, 2000).verdict(0.5) == "met"
    assert Interval(0.6, 0.45, 0.7, 0.95, 10, 40, 2000).verdict(0.5) == "not resolved"
    assert Interval(0.4, 0.3, 0.45, 0.95, 10, 40, 2000).verdict(0.5) == "missed"


def test_mean_and_std_of_two_prompts_follow_the_exact_bootstrap_distribution():
    # prompt a's two texts score -1, prompt b's +1. A replicate draws 2 prompts with replacement: aa (1/4) gives mean
    # -1 and std 0, bb (1/4) mean +1 and std 0, ab or ba (1/2) mean 0 and the std of [-1, -1, 1, 1], sqrt(4/3)
    values, clusters = [-1.0, -1.0, 1.0, 1.0], ["a", "a", "b", "b"]
    mean, std = clustered_mean_std_ci(values, clusters, resamples=20000)
    assert (mean.point, mean.low, mean.high, mean.prompts, mean.pairs) == (0.0, -1.0, 1.0, 2, 4)
    assert std.point == pytest.approx(np.sqrt(4 / 3)) and std.low == 0.0 and std.high == pytest.approx(np.sqrt(4 / 3))
    # with each prompt its own stratum, every replicate keeps both prompts: the interval is the point
    mean, std = clustered_mean_std_ci(values, clusters, ["x", "x", "y", "y"])
    assert mean.low == mean.high == 0.0 and std.low == pytest.approx(std.high) == pytest.approx(np.sqrt(4 / 3))


def test_mean_and_std_points_are_the_plain_statistics_inside_their_intervals():
    rng = np.random.default_rng(0)
    values = rng.normal(3.0, 2.0, 90)  # 90 texts of 15 prompts in 2 domains
    clusters, strata = [i % 15 for i in range(90)], ["d1" if i % 15 < 6 else "d2" for i in range(90)]
    mean, std = clustered_mean_std_ci(values, clusters, strata)
    assert mean.point == pytest.approx(values.mean(), abs=1e-12)
    assert std.point == pytest.approx(values.std(ddof=1), abs=1e-12)
    assert mean.low < mean.point < mean.high and std.low < std.point < std.high
    assert (mean.prompts, mean.pairs) == (15, 90)
    # the draws are the accuracy intervals' draws: the mean's replicates equal bootstrap_replicates' on the same values
    _, reps = bootstrap_replicates(values, clusters, strata)
    assert (mean.low, mean.high) == pytest.approx(tuple(np.quantile(reps, [0.025, 0.975])), abs=1e-12)
