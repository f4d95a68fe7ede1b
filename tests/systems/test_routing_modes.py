"""Routing modes (options.routing: hard | soft | gated) in the one place they live, `decide_routes` +
`combine_rewards`: exact against hand computations, batch-independent, and the same in RODOS and ARLISS."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import toy_pairs
from moerm.config import ModelConfig, RunConfig, TrainConfig
from moerm.errors import UserError
from moerm.systems import build_system
from moerm.systems.base import FitContext
from moerm.systems.routing import FallbackOptions as RouterOptions, combine_rewards, decide_routes, rm_passes, top_k_weights

DOMAINS = ["a", "b", "c"]
PROBS = torch.tensor([[0.70, 0.20, 0.10],   # confident in a
                      [0.30, 0.45, 0.25],   # unsure, b first then a
                      [0.10, 0.40, 0.50]])  # unsure, c first then b
# a fixed reward per (row, domain): domain RM d gives row i the reward SCORES[d][i]
SCORES = {"a": torch.tensor([1.0, -2.0, 0.5]), "b": torch.tensor([3.0, 0.25, -1.0]), "c": torch.tensor([-0.5, 4.0, 2.0])}


def per_domain(d, rows):
    return SCORES[d][torch.tensor(rows)]


def route(mode="hard", k=2, min_confidence=0.0, hints=None, fallback="mixture", probs=PROBS):
    opts = RouterOptions(routing=mode, routing_top_k=k, min_confidence=min_confidence, fallback=fallback)
    return decide_routes(probs, DOMAINS, hints, opts)


def test_hard_is_the_top_domain_rm_exactly():
    routes = route("hard")
    assert [r.domain for r in routes] == ["a", "b", "c"] and [r.weights for r in routes] == [{"a": 1.0}, {"b": 1.0},
                                                                                            {"c": 1.0}]
    rewards = combine_rewards(routes, per_domain, 3)
    assert torch.equal(rewards, torch.tensor([1.0, 0.25, 2.0]))
    assert rm_passes(routes) == 1.0 and not any(r.details()["fallback"] for r in routes)


def test_soft_is_the_renormalised_top_k_mix():
    P, S = PROBS.tolist(), {d: v.tolist() for d, v in SCORES.items()}
    routes = route("soft", k=2)
    assert all(r.domain is None and r.source == "router" for r in routes)
    w = routes[1].weights
    assert list(w) == ["b", "a"] and w == {"b": P[1][1] / (P[1][1] + P[1][0]), "a": P[1][0] / (P[1][1] + P[1][0])}
    rewards = combine_rewards(routes, per_domain, 3)
    by_hand = [(P[0][0] * S["a"][0] + P[0][1] * S["b"][0]) / (P[0][0] + P[0][1]),
               (P[1][1] * S["b"][1] + P[1][0] * S["a"][1]) / (P[1][1] + P[1][0]),
               (P[2][2] * S["c"][2] + P[2][1] * S["b"][2]) / (P[2][2] + P[2][1])]
    torch.testing.assert_close(rewards, torch.tensor(by_hand), atol=0, rtol=1e-6)
    assert rm_passes(routes) == 2.0
    details = routes[2].details()
    assert details["routing"] == "soft" and details["weights"] == routes[2].weights and details["routed_domain"] is None
    every = combine_rewards(route("soft", k=0), per_domain, 3)  # k=0: every domain RM, by the router's probabilities
    torch.testing.assert_close(every, torch.tensor([sum(P[i][j] * S[d][i] for j, d in enumerate(DOMAINS)) / sum(P[i])
                                                    for i in range(3)]), atol=0, rtol=1e-6)
    one = route("soft", k=1)  # k=1 is hard routing
    assert [r.domain for r in one] == ["a", "b", "c"]


def test_gated_is_top1_above_the_threshold_and_the_mix_below():
    routes = route("gated", k=2, min_confidence=0.6)
    assert routes[0].domain == "a" and routes[0].weights == {"a": 1.0}
    assert routes[1].domain is None and routes[1].weights == top_k_weights(routes[1].probs, 2)
    assert all(r.source == "router" and not r.details()["fallback"] for r in routes)
    assert "confidence" in routes[1].reason
    P, S = PROBS.tolist(), {d: v.tolist() for d, v in SCORES.items()}
    rewards = combine_rewards(routes, per_domain, 3)
    torch.testing.assert_close(rewards, torch.tensor([S["a"][0],
                                                      (P[1][1] * S["b"][1] + P[1][0] * S["a"][1]) / (P[1][1] + P[1][0]),
                                                      (P[2][2] * S["c"][2] + P[2][1] * S["b"][2]) / (P[2][2] + P[2][1])]),
                               atol=0, rtol=1e-6)
    assert rm_passes(routes) == (1 + 2 + 2) / 3


def test_hard_below_min_confidence_falls_back_to_every_rm_or_the_general_rm():
    routes = route("hard", min_confidence=0.6)
    assert routes[0].domain == "a" and [r.source for r in routes[1:]] == ["fallback", "fallback"]
    rewards = combine_rewards(routes, per_domain, 3)
    assert float(rewards[1]) == pytest.approx(sum(float(PROBS[1, j]) * float(SCORES[d][1])
                                                  for j, d in enumerate(DOMAINS)), abs=0, rel=1e-6)
    general = route("hard", min_confidence=0.6, fallback="general")
    assert general[1].general and general[1].weights == {}
    out = combine_rewards(general, per_domain, 3, general=lambda rows: torch.tensor([10.0 * i for i in rows]))
    assert torch.equal(out, torch.tensor([1.0, 10.0, 20.0]))
    with pytest.raises(RuntimeError, match="general RM"):
        combine_rewards(general, per_domain, 3)


def test_a_given_domain_wins_in_every_mode_and_an_unknown_one_falls_back():
    for mode, mc in (("hard", 0.0), ("soft", 0.0), ("gated", 0.9)):
        routes = route(mode, min_confidence=mc, hints=["c", None, "zzz"])
        assert routes[0].weights == {"c": 1.0} and routes[0].source == "given"
        assert routes[2].source == "fallback" and "no reward model" in routes[2].reason


@pytest.mark.parametrize("mode,mc", [("hard", 0.5), ("soft", 0.0), ("gated", 0.5)])
def test_each_input_is_scored_the_same_alone_or_in_a_batch(mode, mc):
    torch.manual_seed(0)
    probs = torch.softmax(3 * torch.randn(17, 3), -1)
    scores = {d: torch.randn(17) for d in DOMAINS}
    opts = RouterOptions(routing=mode, routing_top_k=2, min_confidence=mc)
    routes = decide_routes(probs, DOMAINS, None, opts)
    together = combine_rewards(routes, lambda d, rows: scores[d][torch.tensor(rows)], 17)
    for i in range(17):
        (alone,) = decide_routes(probs[i : i + 1], DOMAINS, None, opts)
        assert alone.weights == routes[i].weights
        r = combine_rewards([alone], lambda d, rows: scores[d][torch.tensor([i])], 1)
        assert torch.equal(r[0], together[i])


def test_options_are_checked():
    with pytest.raises(UserError, match="routing must be"):
        RouterOptions(routing="sometimes")
    with pytest.raises(UserError, match="min_confidence > 0"):
        RouterOptions(routing="gated")
    with pytest.raises(UserError, match="routing_top_k"):
        RouterOptions(routing_top_k=-1)
    with pytest.raises(UserError, match="options.ood must be"):
        RouterOptions(ood="vibes")


# -- the modes inside the systems

PREFIX = {"alpha": "tell me about the topic", "beta": "please explain why"}


def domain_pairs(domain, n, seed):
    return [dataclasses.replace(p, prompt=f"{PREFIX[domain]} {p.prompt}") for p in toy_pairs(n, seed, domain)]


@pytest.fixture(scope="module")
def rodos(tiny_bert, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rodos-modes")
    torch.manual_seed(0)
    cfg = RunConfig(system="rodos", model=ModelConfig(backbone=tiny_bert, max_length=40, feature_cache=str(tmp / "c")),
                    train=TrainConfig(lr=5e-4, batch_size=8, epochs=1, save_every=0),
                    components={"router": {"train": {"epochs": 2, "lr": 1e-2}}})
    system = build_system(cfg)
    system.fit(domain_pairs("alpha", 16, 1) + domain_pairs("beta", 16, 2), None, FitContext(tmp / "run", progress=False))
    return system


@pytest.mark.parametrize("mode", ["soft", "gated"])
def test_rodos_mixes_its_domain_rms_as_the_route_says(rodos, mode):
    test = domain_pairs("alpha", 5, 3) + domain_pairs("beta", 5, 4)
    prompts, responses = [p.prompt for p in test], [p.chosen for p in test]
    probs = rodos.router.probs(prompts)
    tops = sorted(probs.max(-1).values.tolist())
    mc = (tops[4] + tops[5]) / 2 if mode == "gated" else 0.0  # half the inputs above the gate, half below
    assert mode == "soft" or tops[4] < mc < tops[5]
    saved = rodos.opts
    rodos.opts = rodos.router.opts = dataclasses.replace(saved, routing=mode, min_confidence=mc, routing_top_k=2)
    try:
        out = rodos.score(prompts, responses, batch_size=3)
        alone = [rodos.score([p], [r]).rewards[0] for p, r in zip(prompts, responses)]
    finally:
        rodos.opts = rodos.router.opts = saved
    per = {d: rodos.calibration(d, torch.tensor(rodos.rms[d].score(prompts, responses).rewards)).tolist()
           for d in rodos.domains}  # each route's reward on the common scale
    for i, det in enumerate(out.details):
        p = {d: float(probs[i, j]) for j, d in enumerate(rodos.router.domains)}
        top = max(p, key=p.get)
        weights = {top: 1.0} if mode == "gated" and p[top] >= mc else {d: v / sum(p.values()) for d, v in p.items()}
        assert det["weights"] == pytest.approx(weights, abs=1e-6) and det["routing"] == mode and not det["fallback"]
        assert out.rewards[i] == pytest.approx(sum(w * per[d][i] for d, w in weights.items()), abs=1e-5)
        assert out.rewards[i] == pytest.approx(alone[i], abs=1e-5)  # batched == one input at a time
    assert {len(d["weights"]) for d in out.details} == ({1, 2} if mode == "gated" else {2})


def test_arliss_soft_routing_batched_equals_switch_equals_hand(tiny_bert, tmp_path):
    from moerm.systems.arliss import ARLISSSystem

    torch.manual_seed(0)
    cfg = RunConfig(system="arliss", model=ModelConfig(backbone=tiny_bert, max_length=40, lora_dropout=0.0),
                    train=TrainConfig(lr=5e-3, batch_size=8, epochs=1, save_every=0),
                    options={"routing": "soft", "routing_top_k": 0},
                    components={"router": {"train": {"lr": 1e-2, "epochs": 1}}})
    system = ARLISSSystem(cfg)
    system.fit(domain_pairs("alpha", 16, 1) + domain_pairs("beta", 16, 2), None, FitContext(tmp_path, progress=False))
    test = domain_pairs("alpha", 4, 3) + domain_pairs("beta", 4, 4)
    prompts, responses = [p.prompt for p in test], [p.rejected for p in test]
    batched = system.score(prompts, responses, batch_size=3)
    switch = system.score(prompts, responses, mode="switch")
    torch.testing.assert_close(torch.tensor(batched.rewards), torch.tensor(switch.rewards), atol=1e-5, rtol=0)
    per = {d: system.score(prompts, responses, [d] * len(prompts)).rewards for d in system.domains}
    for i, det in enumerate(batched.details):
        assert det["adapter"] is None and set(det["weights"]) == {"alpha", "beta"}
        expected = sum(det["router_probs"][d] * per[d][i] for d in system.domains)
        assert abs(batched.rewards[i] - expected) < 1e-5
    with pytest.raises(UserError, match="arliss supports options.ood=none only"):
        build_system(dataclasses.replace(cfg, options={"ood": "knn"}))
