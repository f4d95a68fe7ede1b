"""benchmarks/reward_scale.py on a tiny calibrated RODOS: each route's calibrated mean and spread are its raw ones
through the route's own map, and --scale-only skips the routing modes."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import load_benchmark, toy_pairs
from routedutil import PREFIX, tiny_rodos

from moerm.data.readers import write_jsonl
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
