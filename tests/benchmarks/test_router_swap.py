"""benchmarks/router_swap.py on a tiny RODOS run: the own-router row is what the saved system scores, a variant router
is trained with the options given, and its paired difference is the difference of the two rows."""

from __future__ import annotations

import pytest
import torch

from conftest import load_benchmark
from moerm.data.readers import write_jsonl
from moerm.systems import load_system

from test_routing_variants import rodos_run


def test_own_router_row_is_the_saved_system_and_a_variant_differs_by_its_paired_point(tiny_bert, tmp_path):
    _, inside = rodos_run(tiny_bert, tmp_path)
    script = load_benchmark("router_swap")
    out = script.main([str(tmp_path / "run"), "--data", str(tmp_path / "data"),
                       "--set", "options.router_layer=null", "--set", "options.router_tuning=lora"])
    saved = load_system(tmp_path / "run")
    assert saved.opts.router_layer == 1  # this release's default, saved with the run
    n = len(inside)
    r = saved.score([p.prompt for p in inside] * 2, [p.chosen for p in inside] + [p.rejected for p in inside]).rewards
    per = {}
    for p, ok in zip(inside, [r[i] > r[n + i] for i in range(n)]):
        per.setdefault(p.domain, []).append(ok)
    macro = sum(sum(v) / len(v) for v in per.values()) / len(per)
    rows = out["rows"]
    assert rows["own router (gated)"]["macro"]["point"] == pytest.approx(macro)
    assert set(rows) == {f"{name} ({mode})" for name in ("own router", "options.router_layer=null",
                                                         "options.router_tuning=lora") for mode in ("gated", "hard")}
    for name in ("options.router_layer=null (hard)", "options.router_tuning=lora (gated)"):
        own = rows[f"own router ({name.rsplit('(', 1)[1]}"]["macro"]["point"]
        assert rows[name]["vs_own_router"]["point"] == pytest.approx(rows[name]["macro"]["point"] - own)
        assert 0.0 <= rows[name]["router_accuracy"]["point"] <= 1.0
