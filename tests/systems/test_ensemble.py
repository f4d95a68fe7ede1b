import pytest
import torch

from moerm.config import ConfigError, ModelConfig, RunConfig, TrainConfig
from moerm.errors import UserError
from moerm.eval.metrics import evaluate_system
from moerm.systems import build_system, load_system
from moerm.systems.base import FitContext
from moerm.systems.ensemble import combine


def test_combine_by_hand():
    r = torch.tensor([[1.0, -2.0], [3.0, 0.0]])  # (K=2, N=2)
    torch.testing.assert_close(combine(r, "mean"), torch.tensor([2.0, -1.0]))
    torch.testing.assert_close(combine(r, "wco"), torch.tensor([1.0, -2.0]))
    # population variance: [1, 1]; mean - 0.5 * var
    torch.testing.assert_close(combine(r, "uwo", 0.5), torch.tensor([1.5, -1.5]))


def test_wco_and_uwo_standardise_each_member_first():
    # member 1 is member 0 shifted by +10 and scaled by 2: the same ranking, an arbitrary offset and scale
    r0 = torch.tensor([1.0, -1.0, 0.5])
    r = torch.stack([r0, 2 * r0 + 10])  # (K=2, N=3)
    norm = torch.tensor([[0.0, 1.0], [10.0, 2.0]])  # (K, 2): each member's (mean, std)
    # raw: the minimum is always member 0 and the variance is dominated by the offset
    torch.testing.assert_close(combine(r, "wco"), r0)
    # standardised: both members agree exactly, so the minimum is r0 and the variance is 0
    torch.testing.assert_close(combine(r, "wco", norm=norm), r0)
    torch.testing.assert_close(combine(r, "uwo", 1.0, norm=norm), r0)
    shifted = torch.stack([r0, r0 + 100])
    torch.testing.assert_close(combine(shifted, "uwo", 1.0, norm=torch.tensor([[0.0, 1.0], [100.0, 1.0]])), r0)
    assert not torch.allclose(combine(shifted, "uwo", 1.0), r0)  # raw variance (2500) swamps the reward


def test_members_differ_train_and_reload(tiny_bert, tmp_path, toy_train, toy_test):
    cfg = RunConfig(system="ensemble", model=ModelConfig(backbone=tiny_bert, max_length=48),
                    train=TrainConfig(lr=5e-4, batch_size=8, epochs=3, save_every=0), options={"members": 2})
    system = build_system(cfg)
    result = system.fit(toy_train, None, FitContext(tmp_path / "run", progress=False))
    assert set(result.seconds_per_component) == {"member:0", "member:1"}
    assert [m.config.train.seed for m in system.members] == [cfg.train.seed, cfg.train.seed + 1]
    out = system.score([p.prompt for p in toy_test], [p.chosen for p in toy_test])
    member = torch.tensor([d["member_rewards"] for d in out.details])  # (N, K)
    assert (member[:, 0] - member[:, 1]).abs().max() > 1e-4  # independently trained: not the same model
    torch.testing.assert_close(torch.tensor(out.rewards), member.mean(1))
    assert evaluate_system(system, toy_test)["accuracy"] >= 0.85
    system.save(tmp_path / "model")
    again = load_system(tmp_path / "model")
    assert system.norm is not None and system.norm.shape == (2, 2) and (system.norm[:, 1] > 0).all()
    torch.testing.assert_close(again.norm, system.norm)
    torch.testing.assert_close(torch.tensor(again.score([toy_test[0].prompt], [toy_test[0].chosen]).rewards),
                               torch.tensor(out.rewards[:1]), atol=1e-5, rtol=1e-5)


def test_bad_combine_is_a_config_error():
    with pytest.raises((ConfigError, ValueError), match="combine"):
        build_system(RunConfig(system="ensemble", options={"combine": "median"}))


def test_member_runs_combine_trained_baselines_without_training(tiny_bert, tmp_path, toy_train, toy_test):
    model = ModelConfig(backbone=tiny_bert, max_length=48)
    runs = []
    for seed in (3, 4):
        rm = build_system(RunConfig(system="baseline", model=model, train=TrainConfig(lr=5e-4, batch_size=8, epochs=1,
                                                                                     save_every=0, seed=seed)))
        rm.fit(toy_train, None, FitContext(tmp_path / f"rm-{seed}", progress=False))
        rm.save(tmp_path / f"rm-{seed}" / "model")
        runs.append(str(tmp_path / f"rm-{seed}"))
    (tmp_path / "rm-3" / "train_summary.json").write_text('{"train_seconds": 12.5, "epochs_per_component": {"reward_model": 1}}')
    cfg = RunConfig(system="ensemble", model=model, options={"members": 2, "member_runs": runs})
    system = build_system(cfg)
    result = system.fit(toy_train, None, FitContext(tmp_path / "ens", progress=False))
    assert result.seconds_per_component == {"member:0": 12.5, "member:1": 0.0}  # theirs, from the run's summary
    prompts, replies = [p.prompt for p in toy_test], [p.chosen for p in toy_test]
    expected = torch.tensor([load_system(r).score(prompts, replies).rewards for r in runs]).mean(0)
    torch.testing.assert_close(torch.tensor(system.score(prompts, replies).rewards), expected)
    assert system.norm is not None and system.norm.shape == (2, 2)


def test_member_runs_are_checked(tiny_bert, tmp_path):
    with pytest.raises(UserError, match="names 1 runs but options.members is 2"):
        build_system(RunConfig(system="ensemble", options={"members": 2, "member_runs": ["a"]}))
    with pytest.raises(UserError, match="names a run twice"):
        build_system(RunConfig(system="ensemble", options={"members": 2, "member_runs": ["a", "a"]}))
    system = build_system(RunConfig(system="ensemble", model=ModelConfig(backbone=tiny_bert, max_length=48),
                                    options={"members": 1, "member_runs": [str(tmp_path / "nowhere")]}))
    with pytest.raises(UserError, match="nowhere does not exist"):
        system.fit([], None, FitContext(tmp_path / "ens", progress=False))
