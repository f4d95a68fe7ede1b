"""benchmarks/gated_threshold.py on a tiny RODOS run: hard routing is one RM pass per text, a threshold mixes exactly
the texts whose router confidence is below it, and each row's accuracy is what the system scores in that setting."""

from __future__ import annotations

import pytest

from conftest import load_benchmark
from moerm.systems import load_system

from test_routing_variants import rodos_run


def test_rows_count_the_mixed_texts_and_score_as_the_system_does(tiny_bert, tmp_path):
    _, inside = rodos_run(tiny_bert, tmp_path)
    out = load_benchmark("gated_threshold").main([str(tmp_path / "run"), "--data", str(tmp_path / "data"),
                                                  "--thresholds", "0.55,0.8,1.0"])
    rows = out["rows"]
    assert list(rows) == ["hard", "gated 0.55", "gated 0.8", "gated 1"]
    assert rows["hard"]["passes_per_text"] == 1.0 and rows["hard"]["mixed"] == 0.0
    assert rows["gated 1"]["mixed"] == 1.0 and rows["gated 1"]["passes_per_text"] == 2.0  # top-2 everywhere

    saved = load_system(tmp_path / "run")
    prompts = [p.prompt for p in inside] * 2
    responses = [p.chosen for p in inside] + [p.rejected for p in inside]
    conf = [d["router_confidence"] for d in saved.score(prompts, responses).details]
    for t in (0.55, 0.8):
        row = rows[f"gated {t:g}"]
        assert row["mixed"] == pytest.approx(sum(c < t for c in conf) / len(conf))
        assert row["passes_per_text"] == pytest.approx(1 + row["mixed"])
        assert row["bound_vs_hard"] == pytest.approx(1 / row["passes_per_text"])
    assert rows["gated 0.55"]["mixed"] <= rows["gated 0.8"]["mixed"]

    saved.opts.routing, saved.opts.min_confidence = "gated", 0.8
    r = saved.score(prompts, responses).rewards
    n = len(inside)
    per: dict[str, list[bool]] = {}
    for p, ok in zip(inside, [r[i] > r[n + i] for i in range(n)]):
        per.setdefault(p.domain, []).append(ok)
    assert rows["gated 0.8"]["macro"]["point"] == pytest.approx(sum(sum(v) / len(v) for v in per.values()) / len(per))
    diff = rows["gated 0.8"]["macro"]["point"] - rows["hard"]["macro"]["point"]
    assert rows["gated 0.8"]["vs_hard"]["point"] == pytest.approx(diff)
