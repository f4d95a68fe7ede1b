"""One reward scale: each route's affine map is exact on a hand-built case, is fitted on held-back pairs the route did
not train on, is applied before any mix, survives save/load, and add-domain calibrates the new route only."""

import dataclasses
import json
import math

import pytest
import torch

from moerm.config import ModelConfig, RunConfig, TrainConfig
from moerm.data.grouping import prompt_key
from moerm.systems import build_system, load_system
from moerm.systems.base import FitContext
from moerm.systems.calibration import Calibration, RewardScale, fit_calibration, hold_back, reference_texts
from moerm.systems.routing import FallbackOptions, Route, combine_rewards, decide_routes

from conftest import toy_pairs

PREFIX = {"alpha": "tell me about the topic", "beta": "please explain why", "gamma": "what is this and that"}


def domain_pairs(domain, n, seed):
    return [dataclasses.replace(p, prompt=f"{PREFIX[domain]} {p.prompt}") for p in toy_pairs(n, seed, domain)]


def test_scale_is_the_hand_computed_zscore():
    scale = RewardScale.of(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    mean, std = 3.0, math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + (6 - 3) ** 2) / 3)  # sample std: n - 1
    assert (scale.mean, scale.texts) == (mean, 4) and scale.std == pytest.approx(std)
    torch.testing.assert_close(scale.apply(torch.tensor([3.0, 6.0])), torch.tensor([0.0, 3.0 / std]))
    assert RewardScale.of(torch.tensor([2.0, 2.0, 2.0])).std == 1.0  # a constant route keeps its scale


def test_a_mix_of_two_routes_on_one_scale_is_the_hand_computed_mix():
    cal = Calibration("zscore", {"a": RewardScale(10.0, 2.0, 8), "b": RewardScale(-1.0, 0.5, 8)})
    raw = {"a": torch.tensor([12.0, 10.0]), "b": torch.tensor([-1.5, 0.0])}
    opts = FallbackOptions(routing="soft", routing_top_k=0)
    routes = decide_routes(torch.tensor([[0.75, 0.25], [0.5, 0.5]]), ["a", "b"], None, opts)
    mixed = combine_rewards(routes, lambda d, rows: cal(d, raw[d][rows]), 2)
    # by hand: a -> (12 - 10) / 2 = 1, (10 - 10) / 2 = 0;  b -> (-1.5 + 1) / 0.5 = -1, (0 + 1) / 0.5 = 2
    torch.testing.assert_close(mixed, torch.tensor([0.75 * 1 + 0.25 * -1, 0.5 * 0 + 0.5 * 2]))
    none = Calibration()
    torch.testing.assert_close(none("a", raw["a"]), raw["a"])
    assert isinstance(routes[0], Route)


def test_held_back_pairs_share_no_prompt_with_training():
    pairs = domain_pairs("alpha", 40, 1) + domain_pairs("beta", 40, 2)
    train, reference = hold_back(pairs, "zscore", 0.1, seed=3)
    held = [p for ps in reference.values() for p in ps]
    assert set(reference) == {"alpha", "beta"} and all(reference.values())
    assert {prompt_key(p.prompt) for p in held}.isdisjoint({prompt_key(p.prompt) for p in train})
    assert len(train) + len(held) == len(pairs)
    assert hold_back(pairs, "none", 0.1, seed=3) == (pairs, {})


def test_fit_calibration_maps_each_route_to_mean_0_std_1_on_its_reference():
    reference = {"a": domain_pairs("alpha", 6, 1), "b": domain_pairs("beta", 6, 2)}
    gen = torch.Generator().manual_seed(0)
    table = {}

    def raw(route, prompts, responses):
        key = (route, tuple(prompts), tuple(responses))
        table.setdefault(key, torch.randn(len(prompts), generator=gen) * (5 if route == "a" else 0.1) + 3)
        return table[key]

    cal = fit_calibration("zscore", reference, raw, "hand")
    for route, pairs in reference.items():
        out = cal(route, raw(route, *reference_texts(pairs)))
        assert abs(float(out.mean())) < 1e-6 and float(out.std()) == pytest.approx(1.0, abs=1e-6)


def _cfg(backbone, cache, system="rodos", **options):
    return RunConfig(system=system, model=ModelConfig(backbone=backbone, max_length=48, feature_cache=str(cache)),
                     train=TrainConfig(lr=5e-4, batch_size=8, epochs=2, save_every=0),
                     options={"routing": "gated", "min_confidence": 0.9, **options},
                     components={"router": {"train": {"epochs": 10, "lr": 2e-2}}})


@pytest.fixture(scope="module")
def rodos(tiny_bert, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("calibrated")
    train = domain_pairs("alpha", 40, 1) + domain_pairs("beta", 40, 2)
    system = build_system(_cfg(tiny_bert, tmp / "cache"))
    system.fit(train, None, FitContext(tmp / "run", progress=False))
    system.save(tmp / "run" / "model")
    return system, train, tmp


def test_rodos_routes_score_on_one_scale_and_the_map_is_saved(rodos):
    system, train, tmp = rodos
    assert system.calibration.kind == "zscore" and set(system.calibration.scales) == {"alpha", "beta"}
    _, reference = hold_back(train, "zscore", 0.1, system.config.train.seed)
    for domain, pairs in reference.items():  # on its reference texts, each route is exactly mean 0, std 1
        prompts, responses = reference_texts(pairs)
        out = torch.tensor(system.score(prompts, responses, [domain] * len(prompts)).rewards)
        assert abs(float(out.mean())) < 1e-5 and float(out.std()) == pytest.approx(1.0, abs=1e-5)
    test = domain_pairs("alpha", 6, 7) + domain_pairs("beta", 6, 8)
    prompts, responses = [p.prompt for p in test], [p.chosen for p in test]
    out = system.score(prompts, responses)
    for r, det in zip(out.rewards, out.details):  # the reward is the weighted mix of the routes' mapped raw rewards
        expected = sum(w * float(system.calibration(d, torch.tensor([det["raw_rewards"][d]])))
                       for d, w in det["weights"].items())
        assert r == pytest.approx(expected, abs=1e-5)
    saved = json.loads((tmp / "run" / "model" / "router" / "calibration.json").read_text())
    assert saved["kind"] == "zscore" and set(saved["routes"]) == {"alpha", "beta"}
    again = load_system(tmp / "run" / "model")
    torch.testing.assert_close(torch.tensor(again.score(prompts, responses).rewards), torch.tensor(out.rewards))
    assert again.describe()["calibration"]["routes"]["alpha"]["mean"] == pytest.approx(
        system.calibration.scales["alpha"].mean)


def test_add_domain_calibrates_the_new_route_and_keeps_the_others(rodos, tmp_path):
    import shutil

    system, _, tmp = rodos
    model = tmp_path / "model"
    shutil.copytree(tmp / "run" / "model", model)
    loaded = load_system(model)
    before = dict(loaded.calibration.scales)
    loaded.add_domain(domain_pairs("gamma", 40, 9), FitContext(tmp_path / "add", progress=False), model)
    again = load_system(model)
    assert set(again.calibration.scales) == {"alpha", "beta", "gamma"}
    assert {d: again.calibration.scales[d] for d in before} == before  # the old routes' maps are kept as they were
    assert (model / "router-v1" / "calibration.json").exists() and not (model / "router").exists()


def test_single_rm_calibration_is_opt_in_and_exact(tiny_bert, tmp_path):
    train = domain_pairs("alpha", 40, 1) + domain_pairs("beta", 40, 2)
    cfg = RunConfig(system="baseline", model=ModelConfig(backbone=tiny_bert, max_length=48),
                    train=TrainConfig(lr=5e-4, batch_size=8, epochs=1, save_every=0))
    plain = build_system(cfg)
    assert plain.options.calibration == "none"
    calibrated = build_system(dataclasses.replace(cfg, options={"calibration": "zscore"}))
    calibrated.fit(train, None, FitContext(tmp_path / "run", progress=False))
    _, reference = hold_back(train, "zscore", 0.1, cfg.train.seed)
    prompts, responses = reference_texts([p for ps in reference.values() for p in ps])
    out = torch.tensor(calibrated.score(prompts, responses).rewards)
    assert abs(float(out.mean())) < 1e-5 and float(out.std()) == pytest.approx(1.0, abs=1e-5)
    calibrated.save(tmp_path / "model")
    again = load_system(tmp_path / "model")
    torch.testing.assert_close(torch.tensor(again.score(prompts, responses).rewards), out)


def test_route_selection_keeps_a_domain_rm_only_where_it_beats_the_general_rm(tiny_bert, tmp_path):
    from moerm.systems.rodos import GENERAL

    train = domain_pairs("alpha", 40, 1) + domain_pairs("beta", 40, 2)
    system = build_system(_cfg(tiny_bert, tmp_path / "cache", fallback="general", select_routes=True,
                               select_min_prompts=3))  # 4 prompts held back per domain: the interval is computed
    system.fit(train, None, FitContext(tmp_path / "run", progress=False))
    _, reference = hold_back(train, "zscore", 0.1, system.config.train.seed)
    assert set(system.selection) == {"alpha", "beta"}
    assert all(sel["prompts"] >= 3 for sel in system.selection.values())
    for d, sel in system.selection.items():  # measured on the domain's held-back pairs, the evidence rule applied
        assert sel["pairs"] == len(reference[d]) and 0.0 <= sel["general_rm"] <= 1.0
        evidence = sel.get("general_minus_domain")
        assert (evidence is not None) == (sel["prompts"] >= system.opts.select_min_prompts)
        assert sel["served_by"] == ("general" if evidence is not None and evidence["low"] > 0 else d)
    system.selection["alpha"]["served_by"] = "general"  # whatever it chose: a route served by the general RM ...
    test = domain_pairs("alpha", 4, 7)
    prompts, responses = [p.prompt for p in test], [p.chosen for p in test]
    out = system.score(prompts, responses, ["alpha"] * len(test))
    general = system.calibration(GENERAL, system._raw(GENERAL, prompts, responses))
    torch.testing.assert_close(torch.tensor(out.rewards), general.float(), atol=1e-5, rtol=0)  # ... scores as it
    assert all(d["served_by_general"] == ["alpha"] for d in out.details)
    system.save(tmp_path / "model")
    assert load_system(tmp_path / "model").selection["alpha"]["served_by"] == "general"
    with pytest.raises(Exception, match="fallback=general"):
        build_system(_cfg(tiny_bert, tmp_path / "cache", select_routes=True))
    with pytest.raises(Exception, match="options.select_level must be within"):
        build_system(_cfg(tiny_bert, tmp_path / "cache", fallback="general", select_routes=True, select_level=1.5))
    with pytest.raises(Exception, match="options.select_min_prompts must be a whole number"):
        build_system(_cfg(tiny_bert, tmp_path / "cache", fallback="general", select_routes=True,
                          select_min_prompts=0))


def test_tune_confidence_picks_the_best_grid_value_on_the_held_back_slice(tiny_bert, tmp_path):
    from moerm.systems.rodos import CONFIDENCE_GRID

    train = domain_pairs("alpha", 40, 1) + domain_pairs("beta", 40, 2)
    system = build_system(_cfg(tiny_bert, tmp_path / "cache", tune_confidence=True))
    system.fit(train, None, FitContext(tmp_path / "run", progress=False))
    tuned = system.tuned
    scores = {float(c): v for c, v in tuned["validation_macro"].items()}
    assert set(scores) == {c for c in CONFIDENCE_GRID if c > 0}  # gated routing needs a threshold above 0
    best = max(scores.values())
    assert tuned["min_confidence"] == min(c for c, v in scores.items() if v == best)  # ties: the lower threshold
    assert system.opts.min_confidence == tuned["min_confidence"]
    system.save(tmp_path / "model")
    assert load_system(tmp_path / "model").opts.min_confidence == tuned["min_confidence"]
