"""benchmarks/reward_scale.py on a tiny calibrated RODOS: each route's calibrated mean and spread are its raw ones
through the route's own map, with prompt-clustered intervals judged against the target band, and --scale-only skips
the routing modes; the intervals and verdicts on hand-built rewards."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import load_benchmark, toy_pairs
from routedutil import PREFIX, tiny_rodos

from moerm.data.grouping import pair_keys
from moerm.data.readers import write_jsonl
from moerm.data.schema import PreferencePair
from moerm.eval.intervals import Interval
from moerm.eval.metrics import evaluate_system
from moerm.systems import load_system


def test_route_scale_of_a_tiny_rodos(tmp_path, tiny_bert):
    run = tiny_rodos(tiny_bert, tmp_path)
    test = [dataclasses.replace(p, prompt=f"{PREFIX[d]} {p.prompt}")
            for d, seed in (("alpha", 11), ("beta", 12)) for p in toy_pairs(6, seed, d)]
    write_jsonl(test, tmp_path / "data" / "test.jsonl")
    out = tmp_path / "scale.json"
    res = load_benchmark("reward_scale").main([str(run), "--data", str(tmp_path / "data"), "--scale-only",
                                               "--out", str(out)])
    assert json.loads(out.read_text())["route_scale"] == res["route_scale"] and res["accuracy"] == {}
    maps = load_system(run).calibration.scales
    for route in ("alpha", "beta"):
        raw, cal = res["route_scale"]["raw"][route], res["route_scale"]["calibrated"][route]
        assert raw["texts"] == cal["texts"] == 12  # both replies of the route's 6 held-out pairs
        assert cal["mean"] == pytest.approx((raw["mean"] - maps[route].mean) / maps[route].std, abs=1e-5)
        assert cal["std"] == pytest.approx(raw["std"] / maps[route].std, rel=1e-5)
        iv = res["calibrated_intervals"][route]
        assert iv["mean"]["point"] == pytest.approx(cal["mean"], abs=1e-6)
        assert iv["std"]["point"] == pytest.approx(cal["std"], rel=1e-5)
        prompts = len(set(pair_keys([p for p in test if p.domain == route])))
        assert (iv["mean"]["prompts"], iv["mean"]["pairs"]) == (prompts, 12)
        for q in ("mean", "std"):
            assert iv[q]["low"] <= iv[q]["point"] + 1e-9 and iv[q]["point"] <= iv[q]["high"] + 1e-9
        assert iv["verdict"] in ("met", "missed", "not resolved")
    assert res["target"]["mean_band"] == [-0.15, 0.15] and res["target"]["std_band"] == [0.85, 1.15]

    # the routing modes (each route scoring each text once across them): hard routing with the run's own options is
    # what `moerm eval` gives, and a monotone map cannot change a top-1 comparison
    full = load_benchmark("reward_scale").main([str(run), "--data", str(tmp_path / "data")])
    assert full["route_scale"] == res["route_scale"] and set(full["accuracy"]) == {"hard", "gated", "soft",
                                                                                   "mixture fallback"}
    hard = full["accuracy"]["hard"]
    assert hard["raw"] == hard["calibrated"] == evaluate_system(load_system(run), test)["macro_accuracy"]


def texts(prompts: list[str], per_prompt: int, domain: str = "d") -> list[PreferencePair]:
    return [PreferencePair(id=f"{q}-{i}", domain=domain, prompt=q, chosen="a", rejected="b")
            for q in prompts for i in range(per_prompt)]


def test_texts_of_one_prompt_give_a_degenerate_interval_judged_by_the_point():
    bench = load_benchmark("reward_scale")
    on_target = torch.tensor([-1.0, 1.0, -1.0, 1.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    on_target = on_target / (4 / 7) ** 0.5  # mean 0, sample std 1: inside the band
    iv = bench.scale_intervals(on_target, texts(["only"], 8))
    for q, point in (("mean", 0.0), ("std", 1.0)):
        assert iv[q]["low"] == pytest.approx(point, abs=1e-9) and iv[q]["high"] == pytest.approx(point, abs=1e-9)
        assert iv[q]["prompts"] == 1 and iv[q]["pairs"] == 8
    assert (iv["mean_verdict"], iv["std_verdict"], iv["verdict"], iv["point_in_band"]) == ("met", "met", "met", True)
    shifted = bench.scale_intervals(on_target + 0.5, texts(["only"], 8))  # mean 0.5: outside, and resolved
    assert (shifted["mean_verdict"], shifted["std_verdict"], shifted["verdict"]) == ("missed", "met", "missed")
    assert shifted["mean"]["low"] == pytest.approx(0.5)


def test_two_prompts_far_apart_leave_the_mean_not_resolved():
    # prompt a's texts score -1, prompt b's +1: the mean's interval is [-1, +1] (a replicate can draw a twice), which
    # covers the band without lying inside it; the std's replicates are 0 or sqrt(4/3) = 1.155: [0, 1.155]
    bench = load_benchmark("reward_scale")
    iv = bench.scale_intervals(torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64), texts(["a", "b"], 2))
    assert (iv["mean"]["low"], iv["mean"]["point"], iv["mean"]["high"]) == (-1.0, 0.0, 1.0)
    assert iv["std"]["low"] == 0.0 and iv["std"]["high"] == pytest.approx((4 / 3) ** 0.5)
    assert (iv["mean_verdict"], iv["std_verdict"], iv["verdict"], iv["point_in_band"]) == (
        "not resolved", "not resolved", "not resolved", False)
    # the same texts in two domains: each domain keeps its one prompt in every replicate, so the interval is the point
    two = texts(["a"], 2, "d1") + texts(["b"], 2, "d2")
    iv = bench.scale_intervals(torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64), two)
    assert iv["mean"]["low"] == iv["mean"]["high"] == 0.0 and iv["mean_verdict"] == "met"


@pytest.mark.parametrize(("low", "high", "verdict"), [
    (-0.15, 0.15, "met"), (-0.1, 0.2, "not resolved"), (0.16, 0.4, "missed"), (-0.5, -0.151, "missed"),
    (-0.5, 0.5, "not resolved")])
def test_band_verdict(low, high, verdict):
    iv = Interval((low + high) / 2, low, high, 0.95, 1, 1, 1)
    assert load_benchmark("reward_scale").band_verdict(iv, (-0.15, 0.15)) == verdict
