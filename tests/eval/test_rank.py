"""Spearman's rho by hand, with ties, and with frequency weights equal to the expanded sample's."""

import math

import numpy as np
import pytest

from moerm.eval.rank import spearman, weighted_midranks


def test_spearman_by_hand_without_and_with_ties():
    # one swap in 4: rho = 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 2 / 60
    assert spearman([1, 2, 3, 4], [10, 30, 20, 40])[0] == pytest.approx(0.8)
    assert spearman([1, 2, 3], [3, 2, 1])[0] == pytest.approx(-1.0)
    # ties get midranks: x ranks (1, 2.5, 2.5, 4), y ranks (1, 2, 3, 4); Pearson of the ranks:
    # dx = (-1.5, 0, 0, 1.5), dy = (-1.5, -0.5, 0.5, 1.5): cov 4.5, var_x 4.5, var_y 5
    assert spearman([0, 5, 5, 9], [1, 2, 3, 4])[0] == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])[0])  # a constant reward ranks nothing


def test_weights_are_the_expanded_sample():
    x = np.array([0.3, -1.0, 2.0, 0.3, 5.0])
    y = np.array([1.0, 2.0, 2.0, 0.0, 4.0])
    weights = np.array([[1, 1, 1, 1, 1], [2, 0, 1, 3, 1], [0, 2, 2, 1, 0]])
    got = spearman(x, y, weights)
    for w, g in zip(weights, got):
        expanded_x, expanded_y = np.repeat(x, w), np.repeat(y, w)
        assert g == pytest.approx(spearman(expanded_x, expanded_y)[0])
    # the midranks themselves, weights (2, 0, 1, 3, 1): -1.0 drawn 0 times, 0.3 five times (2 + 3: ranks 1..5,
    # midrank 3), 2.0 once (rank 6), 5.0 once (rank 7)
    ranks = weighted_midranks(x, weights[1:2])[0]
    assert ranks[[0, 3, 2, 4]] == pytest.approx([3.0, 3.0, 6.0, 7.0])


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError):
        spearman([1, 2], [1, 2, 3])
    with pytest.raises(ValueError):
        spearman([1, 2, 3], [1, 2, 3], np.ones((2, 2)))
