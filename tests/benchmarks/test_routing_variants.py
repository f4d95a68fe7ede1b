"""benchmarks/routing_variants.py on a tiny RODOS run: its rows are what `moerm eval` gives for the same router and
routing options, and the OOD columns separate a left-out domain from the trained ones."""

from __future__ import annotations

import dataclasses
import json
import random

import torch

from conftest import load_benchmark, toy_pairs
from moerm.config import ModelConfig, RunConfig, TrainConfig
from moerm.data.readers import write_jsonl
from moerm.eval.metrics import evaluate_system
from moerm.systems import build_system, load_system
from moerm.systems.base import FitContext

PREFIX = {"alpha": "tell me about the topic", "beta": "please explain why"}
FOREIGN = "quantum zebra orchestra volcano saxophone glacier pyramid lantern meadow comet harbor violin".split()


def _load_script():
    return load_benchmark("routing_variants")


def domain_pairs(domain, n, seed):
    """alpha prefers the positive words, beta the negative ones: routing errors cost accuracy."""
    flip = domain == "beta"
    return [dataclasses.replace(p, prompt=f"{PREFIX[domain]} {p.prompt}", chosen=p.rejected if flip else p.chosen,
                                rejected=p.chosen if flip else p.rejected) for p in toy_pairs(n, seed, domain)]


def foreign_pairs(n, seed):
    rng = random.Random(seed)
    return [dataclasses.replace(p, prompt=" ".join(rng.choice(FOREIGN) for _ in range(rng.randint(4, 9))))
            for p in toy_pairs(n, seed, "zeta")]


def rodos_run(tiny_bert, tmp_path, lr=5e-4, router_epochs=3, trainable_layers=2):
    """A tiny RODOS run in tmp_path/run, and the in-domain held-out pairs written to tmp_path/data."""
    torch.manual_seed(0)
    cfg = RunConfig(system="rodos", model=ModelConfig(backbone=tiny_bert, max_length=40, trainable_layers=trainable_layers,
                                                      feature_cache=str(tmp_path / "cache")),
                    train=TrainConfig(lr=lr, batch_size=8, epochs=3, save_every=0),
                    components={"router": {"train": {"epochs": router_epochs, "lr": 1e-2}}})
    system = build_system(cfg)
    system.fit(domain_pairs("alpha", 32, 1) + domain_pairs("beta", 32, 2), None,
               FitContext(tmp_path / "run", progress=False))
    system.save(tmp_path / "run" / "model")
    inside = domain_pairs("alpha", 16, 3) + domain_pairs("beta", 16, 4)
    write_jsonl(inside[:16], tmp_path / "data" / "alpha" / "test.jsonl")
    write_jsonl(inside[16:], tmp_path / "data" / "beta" / "test.jsonl")
    return system, inside


def test_rows_match_moerm_eval_and_ood_separates_the_left_out_domain(tiny_bert, tmp_path):
    _, inside = rodos_run(tiny_bert, tmp_path)
    data, left = tmp_path / "data", tmp_path / "left"
    write_jsonl(foreign_pairs(16, 5), left / "zeta" / "test.jsonl")
    out = tmp_path / "variants.json"
    mod = _load_script()
    result = mod.main([str(tmp_path / "run"), "--data", str(data), "--left-out", str(left), "--lengths", "32,8",
                       "--modes", "hard,soft,gated", "--min-confidence", "0.9", "--ood", "none,knn,entropy",
                       "--baseline", str(tmp_path / "run" / "model" / "rms" / "alpha"), "--out", str(out)])
    assert json.loads(out.read_text())["pairs"] == {"in_domain": 32, "left_out": 16}
    assert len(result["rows"]) == 2 * 3 * 3

    loaded = load_system(tmp_path / "run")
    oracle = evaluate_system(loaded, inside, oracle_domains=True)
    assert abs(result["oracle_domain"]["macro_accuracy"] - oracle["macro_accuracy"]) < 1e-9
    # the benchmark's router for length 32 (seeded), used by the system itself: `moerm eval` gives the same figures
    router, _, _ = mod.train_router(loaded, 32, "frozen", 0, tmp_path / "again")
    loaded.router = router
    for mode, mc in (("hard", 0.0), ("soft", 0.0), ("gated", 0.9)):
        row = next(r for r in result["rows"] if (r["router_max_length"], r["routing"], r["ood"]) == (32, mode, "none"))
        loaded.opts = router.opts = dataclasses.replace(router.opts, routing=mode, min_confidence=mc, routing_top_k=2)
        rep = evaluate_system(loaded, inside)
        assert abs(row["in_domain"]["macro_accuracy"] - rep["macro_accuracy"]) < 1e-9, mode
        assert abs(row["router_accuracy"] - rep["router_accuracy"]) < 1e-9
        assert row["left_out"]["fallback_rate"] == 0.0 and row["in_domain"]["fallback_rate"] == 0.0
    by = {(r["router_max_length"], r["routing"], r["ood"]): r for r in result["rows"]}
    assert by[(32, "hard", "none")]["in_domain"]["load"] == 1.0 and by[(32, "soft", "none")]["in_domain"]["load"] == 2.0
    knn = by[(32, "hard", "knn")]
    assert knn["left_out"]["fallback_rate"] >= 0.8 and knn["in_domain"]["fallback_rate"] <= 0.25
    assert knn["left_out"]["load"] >= 1.8  # a mixture fallback runs every domain RM (2 here)
    assert set(result["baseline"]) == {"in_domain", "left_out"}


def test_trunk_router_rows(tiny_bert, tmp_path):
    system, _ = rodos_run(tiny_bert, tmp_path, router_epochs=20, trainable_layers=1)  # the trunk: block 0
    mod = _load_script()
    result = mod.main([str(tmp_path / "run"), "--data", str(tmp_path / "data"), "--lengths", "16",
                       "--tunings", "frozen,trunk", "--router-epochs", "20,1", "--modes", "hard", "--ood", "none"])
    rows = {(r["router_tuning"], r["router_epochs"]): r for r in result["rows"]}
    assert set(rows) == {("frozen", 20), ("frozen", 1), ("trunk", 20), ("trunk", 1)}
    assert rows[("trunk", 20)]["router_accuracy"] >= 0.9  # the two domains' prompt prefixes differ
    router, _, feats = mod.train_router(load_system(tmp_path / "run"), 16, "trunk", 0, tmp_path / "again")
    assert router.opts.router_tuning == "trunk" and feats.shape[0] == len(system.router_examples)
