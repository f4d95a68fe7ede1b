"""The router's out-of-distribution detector (options.ood): scores against hand computations, calibration, the
fallback it triggers in RODOS, and that it is saved with (and versioned like) the router."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil

import pytest
import torch

from conftest import toy_pairs
from moerm.config import ModelConfig, RunConfig, TrainConfig
from moerm.errors import UserError
from moerm.systems import build_system, load_system
from moerm.systems.base import FitContext
from moerm.systems.routing import OOD_FILES, OODDetector


def test_knn_score_is_one_minus_the_nearest_cosine_and_leave_one_out_skips_itself():
    torch.manual_seed(0)
    train, query = torch.randn(6, 4), torch.randn(3, 4)
    det = OODDetector.fit("knn", train, torch.tensor([0, 0, 0, 1, 1, 1]), 2)
    by_hand = [1 - max(float(torch.dot(q, t) / (q.norm() * t.norm())) for t in train) for q in query]
    torch.testing.assert_close(det.scores(query, torch.empty(3, 2)), torch.tensor(by_hand), atol=1e-6, rtol=0)
    assert torch.allclose(det.scores(train, torch.empty(6, 2)), torch.zeros(6), atol=1e-6)  # each finds itself
    loo = det.scores(train, torch.empty(6, 2), leave_one_out=True)
    others = [1 - max(float(torch.dot(a, b) / (a.norm() * b.norm())) for j, b in enumerate(train) if j != i)
              for i, a in enumerate(train)]
    torch.testing.assert_close(loo, torch.tensor(others), atol=1e-6, rtol=0)


def test_mahalanobis_and_entropy_scores_by_hand():
    torch.manual_seed(1)
    feats, labels = torch.randn(40, 3), torch.tensor([0] * 20 + [1] * 20)
    feats[20:] += 3.0
    det = OODDetector.fit("mahalanobis", feats, labels, 2)
    means = torch.stack([feats[:20].mean(0), feats[20:].mean(0)]).double()
    centred = feats.double() - means[labels]
    cov = centred.T @ centred / 39
    cov += 0.1 * torch.trace(cov) / 3 * torch.eye(3, dtype=torch.float64)
    x = torch.tensor([[0.5, -1.0, 2.0]])
    by_hand = min(float((x[0].double() - m) @ torch.linalg.inv(cov) @ (x[0].double() - m)) for m in means)
    assert float(det.scores(x, torch.empty(1, 2))[0]) == pytest.approx(by_hand, rel=1e-4)
    ent = OODDetector.fit("entropy", feats, labels, 2)
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.9, 0.1]])
    expected = [1.0, 0.0, -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2)]
    torch.testing.assert_close(ent.scores(torch.empty(3, 3), probs), torch.tensor(expected), atol=1e-6, rtol=0)


def test_calibration_flags_the_quantile_and_survives_save_load(tmp_path):
    torch.manual_seed(2)
    det = OODDetector.fit("knn", torch.randn(50, 8), torch.zeros(50, dtype=torch.long), 1)
    cal = torch.randn(200, 8)
    det.calibrate(det.scores(cal, torch.empty(0)), 0.05, "held-out prompts")
    flags = det.check(cal, torch.empty(0)).flags
    assert int(flags.sum()) == 10 and det.info["calibration_flagged"] == float(flags.float().mean())  # 5% of 200
    det.save(tmp_path)
    again = OODDetector.load(tmp_path)
    assert again.kind == "knn" and again.threshold == det.threshold and again.info == det.info
    q = torch.randn(30, 8)
    assert torch.equal(again.check(q, torch.empty(0)).flags, det.check(q, torch.empty(0)).flags)
    assert OODDetector.load(tmp_path / "nothing") is None


# -- in RODOS

PREFIX = {"alpha": "tell me about the topic", "beta": "please explain why"}
FOREIGN = "quantum zebra orchestra volcano saxophone glacier pyramid lantern meadow comet harbor violin".split()


def domain_pairs(domain, n, seed):
    return [dataclasses.replace(p, prompt=f"{PREFIX[domain]} {p.prompt}") for p in toy_pairs(n, seed, domain)]


def foreign_pairs(n, seed):
    """A domain the router never saw: prompts of other words altogether."""
    rng = random.Random(seed)
    return [dataclasses.replace(p, prompt=" ".join(rng.choice(FOREIGN) for _ in range(rng.randint(4, 9))))
            for p in toy_pairs(n, seed, "zeta")]


@pytest.fixture(scope="module")
def trained(tiny_bert, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rodos-ood")
    torch.manual_seed(0)
    cfg = RunConfig(system="rodos", model=ModelConfig(backbone=tiny_bert, max_length=40, feature_cache=str(tmp / "c")),
                    train=TrainConfig(lr=5e-4, batch_size=8, epochs=1, save_every=0),
                    options={"ood": "knn", "ood_quantile": 0.05},
                    components={"router": {"train": {"epochs": 3, "lr": 1e-2}}})
    system = build_system(cfg)
    held_out = domain_pairs("alpha", 20, 5) + domain_pairs("beta", 20, 6)
    system.fit(domain_pairs("alpha", 32, 1) + domain_pairs("beta", 32, 2), held_out,
               FitContext(tmp / "run", progress=False))
    system.save(tmp / "model")
    return system, tmp


def test_left_out_prompts_fall_back_to_every_rm_equally_flagged_ood(trained):
    system, _ = trained
    assert system.router.detector.info["calibration"] == "held-out prompts"
    inside = domain_pairs("alpha", 12, 7) + domain_pairs("beta", 12, 8)
    outside = foreign_pairs(12, 9)
    out_in = system.score([p.prompt for p in inside], [p.chosen for p in inside])
    assert sum(d["ood"] for d in out_in.details) / len(inside) <= 0.25
    assert all(d["ood_score"] is not None and d["ood_threshold"] == system.router.detector.threshold
               for d in out_in.details)
    prompts, responses = [p.prompt for p in outside], [p.chosen for p in outside]
    out = system.score(prompts, responses)
    flagged = [i for i, d in enumerate(out.details) if d["ood"]]
    assert len(flagged) >= 10, [d["ood_score"] for d in out.details]
    per = {d: system.calibration(d, torch.tensor(system.rms[d].score(prompts, responses).rewards)).tolist()
           for d in system.domains}  # each route's reward on the common scale
    for i in flagged:
        det = out.details[i]
        assert det["fallback"] and det["fallback_to"] == "mixture" and "out of distribution" in det["fallback_reason"]
        assert det["weights"] == {"alpha": 0.5, "beta": 0.5} and det["routed_domain"] is None
        assert out.rewards[i] == pytest.approx(0.5 * per["alpha"][i] + 0.5 * per["beta"][i], abs=1e-5)
    given = system.score([prompts[0]], [responses[0]], domains=["beta"])  # a caller's known domain still wins
    assert given.details[0]["route_source"] == "given" and given.details[0]["ood"]


def test_the_detector_is_saved_with_the_router_and_load_decides_the_same(trained):
    system, tmp = trained
    router_dir = tmp / "model" / "router"
    meta = json.loads((router_dir / OOD_FILES["json"]).read_text())
    assert meta["kind"] == "knn" and meta["threshold"] == system.router.detector.threshold
    assert (router_dir / OOD_FILES["tensors"]).exists()
    again = load_system(tmp / "model")
    pairs = domain_pairs("alpha", 6, 11) + foreign_pairs(6, 12)
    a = system.score([p.prompt for p in pairs], [p.rejected for p in pairs])
    b = again.score([p.prompt for p in pairs], [p.rejected for p in pairs])
    assert [d["ood"] for d in a.details] == [d["ood"] for d in b.details]
    assert [d["weights"] for d in a.details] == [d["weights"] for d in b.details]
    torch.testing.assert_close(torch.tensor(a.rewards), torch.tensor(b.rewards), atol=1e-6, rtol=0)


def test_add_domain_refits_the_detector_in_the_new_router_version(trained):
    _, tmp = trained
    model = tmp / "added"
    shutil.copytree(tmp / "model", model)
    system = load_system(model)
    system.add_domain([dataclasses.replace(p, domain="gamma") for p in foreign_pairs(32, 13)],
                      FitContext(tmp / "add", progress=False), model)
    assert (model / "router-v1" / OOD_FILES["json"]).exists() and not (model / "router").exists()
    again = load_system(model)
    assert again.router.detector.info["calibration"] == "training prompts (leave-one-out)"
    assert len(again.router.detector.tensors["train"]) == len(again.router_examples)
    out = again.score([p.prompt for p in foreign_pairs(8, 14)], [p.chosen for p in foreign_pairs(8, 14)])
    assert sum(d["ood"] for d in out.details) <= 3  # gamma's words are in distribution now


def test_a_router_without_the_detector_refuses_ood_scoring(trained):
    system, _ = trained
    saved, system.router.detector = system.router.detector, None
    try:
        with pytest.raises(UserError, match="retrain the router"):
            system.score(["tell me"], ["ok"])
    finally:
        system.router.detector = saved
