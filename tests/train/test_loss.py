import math

import pytest

import torch
from torch.testing import assert_close

from moerm.train.loss import bradley_terry_loss, pairwise_accuracy


def nls(x: float) -> float:  # -log sigmoid(x), by hand
    return math.log1p(math.exp(-x))


def test_bradley_terry_matches_hand_computed_value():
    rc, rr = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert_close(bradley_terry_loss(rc, rr), torch.tensor((nls(1.0) + nls(-1.0)) / 2))
    assert abs((nls(1.0) + nls(-1.0)) / 2 - 0.813262) < 1e-6


def test_margin_is_subtracted_from_the_reward_gap():
    rc, rr, m = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.0])
    assert_close(bradley_terry_loss(rc, rr, m), torch.tensor((nls(0.5) + nls(-1.0)) / 2))


def test_centering_term_as_trl():
    rc, rr = torch.tensor([1.0, 2.0]), torch.tensor([0.0, -1.0])
    base = (nls(1.0) + nls(3.0)) / 2
    center = 0.1 * ((1.0 + 0.0) ** 2 + (2.0 - 1.0) ** 2) / 2
    assert_close(bradley_terry_loss(rc, rr, center_coef=0.1), torch.tensor(base + center))


def test_loss_direction_prefers_chosen_above_rejected():
    good = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([-2.0]))
    bad = bradley_terry_loss(torch.tensor([-2.0]), torch.tensor([2.0]))
    assert good < bad
    assert float(pairwise_accuracy(torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.0, 1.0, 0.5]))) == pytest.approx(1 / 3)
