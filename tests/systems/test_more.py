import pytest
import torch

from moerm.config import ModelConfig, RunConfig, TrainConfig
from moerm.eval.metrics import evaluate_system
from moerm.systems import build_system, load_system
from moerm.systems.base import FitContext

from conftest import BACKBONES, toy_pairs


def _cfg(backbone, **options):
    return RunConfig(system="more", model=ModelConfig(backbone=backbone, max_length=48),
                     train=TrainConfig(lr=5e-4, batch_size=8, epochs=4, save_every=0),
                     options={"num_experts": 4, "top_k": 2, **options})


@pytest.mark.parametrize("backbone", BACKBONES)
def test_more_learns_reports_experts_and_round_trips(backbone, request, tmp_path):
    train = toy_pairs(64, 1, "alpha") + toy_pairs(64, 2, "beta")
    test = toy_pairs(24, 3, "alpha") + toy_pairs(24, 4, "beta")
    system = build_system(_cfg(request.getfixturevalue(backbone)))
    gate_before = system.head.moe.gate.w_gate.detach().clone()
    system.fit(train, None, FitContext(tmp_path, progress=False))
    assert not torch.equal(gate_before, system.head.moe.gate.w_gate.detach())  # the router inside trains too
    rep = evaluate_system(system, test)
    assert rep["accuracy"] >= 0.85
    util = rep["expert_utilisation"]
    assert set(util) == {"alpha", "beta"}
    for shares in util.values():
        assert abs(sum(shares.values()) - 2.0) < 1e-6  # each input uses exactly k = 2 experts
    out = system.score([test[0].prompt], [test[0].chosen])
    d = out.details[0]
    assert len(d["experts"]) == 2 and abs(sum(d["expert_weights"]) - 1.0) < 1e-5
    system.save(tmp_path / "model")
    again = load_system(tmp_path / "model")
    a = system.score([p.prompt for p in test], [p.chosen for p in test]).rewards
    b = again.score([p.prompt for p in test], [p.chosen for p in test]).rewards
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-6, rtol=0)


def test_aux_loss_enters_the_training_loss(tiny_bert):
    from moerm.train.loss import bradley_terry_loss
    from moerm.train.pairwise import TokenPairs, make_pairwise_step

    system = build_system(_cfg(tiny_bert, w_importance=10.0, w_load=10.0))
    torch.nn.init.normal_(system.head.moe.gate.w_gate)
    data = TokenPairs.build(toy_pairs(8), system.encoder)
    batch = data.collate([data[i] for i in range(8)])
    system.model.train()
    torch.manual_seed(0)
    loss, _ = make_pairwise_step()(system.model, batch)
    torch.manual_seed(0)  # same noise and dropout again
    r = system.model(**{k: v for k, v in batch.items() if k != "margin"})
    aux = system.model.aux_loss
    assert aux is not None and aux.item() > 0
    torch.testing.assert_close(loss, bradley_terry_loss(r[:8], r[8:], batch["margin"]) + aux)


def test_default_recipe_gives_the_moe_head_its_own_rate(tiny_bert):
    from moerm.config import ModelConfig, RunConfig, TrainConfig
    from moerm.systems import build_system

    for tuning in ("top", "full"):
        cfg = RunConfig(system="more", model=ModelConfig(backbone=tiny_bert, max_length=32, tuning=tuning,
                                                          trainable_layers=1))
        t = build_system(cfg).config.train
        assert t.head_lr == 1e-4 and t.lr == {"top": 1e-3, "full": 1e-4}[tuning], (tuning, t.lr, t.head_lr)
    mine = RunConfig(system="more", model=ModelConfig(backbone=tiny_bert, max_length=32),
                     train=TrainConfig(head_lr=3e-3))
    assert build_system(mine).config.train.head_lr == 3e-3  # a rate the run sets is kept
    baseline = build_system(RunConfig(system="baseline", model=ModelConfig(backbone=tiny_bert, max_length=32)))
    assert baseline.config.train.head_lr is None  # the linear head trains at the backbone's rate
