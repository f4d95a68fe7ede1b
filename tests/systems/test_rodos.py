import dataclasses

import pytest
import torch

from moerm.config import ModelConfig, RunConfig, TrainConfig
from moerm.eval.metrics import evaluate_system
from moerm.systems import build_system, load_system
from moerm.systems.base import FitContext
from moerm.systems.rodos import GENERAL

from conftest import BACKBONES, toy_pairs

PREFIX = {"alpha": "tell me about the topic", "beta": "please explain why", "gamma": "what is this and that"}


def domain_pairs(domain, n, seed):
    return [dataclasses.replace(p, prompt=f"{PREFIX[domain]} {p.prompt}") for p in toy_pairs(n, seed, domain)]


def _cfg(backbone, cache, **options):
    """The paper's routing (hard top-1, no confidence gate) unless a test asks otherwise; the default is gated."""
    return RunConfig(system="rodos", model=ModelConfig(backbone=backbone, max_length=48, feature_cache=str(cache)),
                     train=TrainConfig(lr=5e-4, batch_size=8, epochs=4, save_every=0),
                     options={"routing": "hard", "min_confidence": 0.0, **options},
                     components={"router": {"train": {"epochs": 15, "lr": 2e-2}}})


def test_rodos_routes_gated_by_default():
    from moerm.systems.rodos import RODOSOptions

    opts = RODOSOptions()
    assert (opts.routing, opts.min_confidence, opts.routing_top_k) == ("gated", 0.6, 2)


# Frozen random tiny bases other than BERT separate the domains' prompts imperfectly (a decoder's last token says
# little about the first words): their routers tune LoRA.
ROUTER_TUNING = {"tiny_deberta": "lora", "tiny_gpt2": "lora", "tiny_llama": "lora"}


@pytest.fixture(scope="module", params=BACKBONES)
def trained(request, tmp_path_factory):
    """RODOS fitted on alpha + beta, on each backbone of the table."""
    tmp = tmp_path_factory.mktemp("rodos")
    train = domain_pairs("alpha", 48, 1) + domain_pairs("beta", 48, 2)
    system = build_system(_cfg(request.getfixturevalue(request.param), tmp / "cache",
                               router_tuning=ROUTER_TUNING.get(request.param, "frozen")))
    result = system.fit(train, None, FitContext(tmp / "run", progress=False))
    system.save(tmp / "run" / "model")
    return system, result, tmp


def test_router_routes_each_example_to_its_domains_rm(trained):
    system, result, _ = trained
    assert set(result.seconds_per_component) == {"rm:alpha", "rm:beta", "router"}
    test = domain_pairs("alpha", 16, 3) + domain_pairs("beta", 16, 4)
    rep = evaluate_system(system, test)
    assert rep["router_accuracy"] == 1.0 and rep["fallback_rate"] == 0.0
    assert rep["router_confusion"] == {"alpha": {"alpha": 16}, "beta": {"beta": 16}}
    assert rep["accuracy"] >= 0.85  # chosen above rejected
    # each example's reward is exactly its own domain RM's reward
    out = system.score([p.prompt for p in test], [p.chosen for p in test])
    for dom in ("alpha", "beta"):
        rows = [i for i, p in enumerate(test) if p.domain == dom]
        alone = system.calibration(dom, torch.tensor(  # the routed reward is its RM's, on the common scale
            system.rms[dom].score([test[i].prompt for i in rows], [test[i].chosen for i in rows]).rewards)).tolist()
        torch.testing.assert_close(torch.tensor([out.rewards[i] for i in rows]), torch.tensor(alone))
        assert all(out.details[i]["routed_domain"] == dom for i in rows)


def test_fallback_is_the_probability_weighted_mixture(trained):
    system, _, _ = trained
    p = domain_pairs("alpha", 3, 5)
    system.opts.min_confidence = 1.0  # nothing is that sure: every input falls back
    try:
        out = system.score([x.prompt for x in p], [x.chosen for x in p])
    finally:
        system.opts.min_confidence = 0.0
    probs = system.router.probs([x.prompt for x in p])
    per = {d: system.calibration(d, torch.tensor(system.rms[d].score([x.prompt for x in p], [x.chosen for x in p]).rewards)
                                 ).tolist() for d in ("alpha", "beta")}
    for i, d in enumerate(out.details):
        assert d["fallback"] and d["routed_domain"] is None and "confidence" in d["fallback_reason"]
        expected = sum(float(probs[i, j]) * per[dom][i] for j, dom in enumerate(system.router.domains))
        assert abs(out.rewards[i] - expected) < 1e-5
    unknown = system.score([p[0].prompt], [p[0].chosen], domains=["zeta"])
    assert unknown.details[0]["fallback"] and "no reward model" in unknown.details[0]["fallback_reason"]
    given = system.score([p[0].prompt], [p[0].chosen], domains=["beta"])
    assert given.details[0]["routed_domain"] == "beta" and given.details[0]["route_source"] == "given"


def test_save_load_scores_identically(trained):
    system, _, tmp = trained
    again = load_system(tmp / "run" / "model")
    test = domain_pairs("alpha", 6, 7) + domain_pairs("beta", 6, 8)
    a = system.score([p.prompt for p in test], [p.rejected for p in test])
    b = again.score([p.prompt for p in test], [p.rejected for p in test])
    torch.testing.assert_close(torch.tensor(a.rewards), torch.tensor(b.rewards), atol=1e-6, rtol=0)
    info = again.describe(tmp / "run" / "model")
    assert set(info["components"]) == {"rm:alpha", "rm:beta", "router"}
    assert info["components"]["rm:alpha"]["bytes_on_disk"] > 0


def test_add_domain_leaves_other_rms_byte_identical(trained):
    _, _, tmp = trained
    import shutil

    model = tmp / "added"
    shutil.copytree(tmp / "run" / "model", model)
    before = {p: p.read_bytes() for p in (model / "rms").rglob("*") if p.is_file()}
    system = load_system(model)
    result = system.add_domain(domain_pairs("gamma", 48, 9), FitContext(tmp / "add", progress=False), model)
    assert set(result.seconds_per_component) == {"rm:gamma", "router"}
    for path, data in before.items():
        assert path.read_bytes() == data, f"{path} changed"
    again = load_system(model)
    assert again.domains == ["alpha", "beta", "gamma"]
    test = domain_pairs("gamma", 8, 10) + domain_pairs("alpha", 8, 11)
    rep = evaluate_system(again, test)
    assert rep["router_accuracy"] >= 0.9  # a frozen tiny random backbone: near-perfect, not always perfect
    with pytest.raises(ValueError, match="already has a reward model"):
        again.add_domain(domain_pairs("gamma", 4, 12), FitContext(tmp / "add2", progress=False), model)


def test_general_fallback_rm(tiny_bert, tmp_path):
    train = domain_pairs("alpha", 24, 1) + domain_pairs("beta", 24, 2)
    system = build_system(_cfg(tiny_bert, tmp_path / "cache", fallback="general", min_confidence=1.0))
    result = system.fit(train, None, FitContext(tmp_path / "run", progress=False))
    assert "rm:general" in result.seconds_per_component
    test = domain_pairs("alpha", 4, 3)
    out = system.score([p.prompt for p in test], [p.chosen for p in test])
    general = system.calibration(GENERAL, torch.tensor(
        system.general.score([p.prompt for p in test], [p.chosen for p in test]).rewards)).tolist()
    torch.testing.assert_close(torch.tensor(out.rewards), torch.tensor(general))
    assert all(d["fallback"] and d["fallback_to"] == "general" for d in out.details)
    system.save(tmp_path / "model")
    again = load_system(tmp_path / "model")
    torch.testing.assert_close(torch.tensor(again.score([p.prompt for p in test], [p.chosen for p in test]).rewards),
                               torch.tensor(out.rewards), atol=1e-6, rtol=0)
    assert "rm:general" in again.describe(tmp_path / "model")["components"]
