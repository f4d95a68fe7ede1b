import pytest
import torch

from moerm.train import distributed
from safetensors.torch import load_file

from moerm.config import ConfigError, ModelConfig, RunConfig, TrainConfig
from moerm.systems import build_system, load_system
from moerm.systems.base import FitContext


def _cfg(backbone, system="baseline", tuning="auto", **train):
    t = dict(lr=5e-4, batch_size=8, epochs=4, save_every=0, head_lr=None)
    t.update(train)
    return RunConfig(system=system, model=ModelConfig(backbone=backbone, tuning=tuning, max_length=48),
                     train=TrainConfig(**t))


def _scores(system, pairs):
    out = system.score([p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs])
    n = len(pairs)
    return torch.tensor(out.rewards[:n]), torch.tensor(out.rewards[n:])


@pytest.mark.parametrize("system_name, tuning, train", [
    ("baseline", "full", {}),
    ("baselora", "auto", {"lr": 5e-3}),
    ("baseline", "frozen", {"head_lr": 5e-2, "epochs": 20}),
])
def test_each_tuning_learns_the_right_direction_and_round_trips(tiny_bert, toy_train, toy_test, tmp_path,
                                                                 system_name, tuning, train):
    system = build_system(_cfg(tiny_bert, system_name, tuning, **train))
    before = {n: p.detach().clone() for n, p in system.model.named_parameters()}
    system.fit(toy_train, toy_test, FitContext(tmp_path / "run", progress=False))
    changed = {n for n, p in system.model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert "head.net.1.weight" in changed  # (the bias cancels in r_c - r_r: BT gives it no gradient)
    backbone_changed = {n for n in changed if n.startswith("backbone.")}
    if system.config.model.tuning == "full":
        assert backbone_changed
    elif system.config.model.tuning == "lora":
        assert backbone_changed and all("lora_" in n for n in backbone_changed)  # base weights stay frozen
    else:
        assert not backbone_changed

    rc, rr = _scores(system, toy_test)
    assert (rc > rr).float().mean() >= 0.85  # chosen ranks above rejected on held-out pairs

    saved = system.save(tmp_path / "model")
    assert (saved / "head.safetensors").exists()
    if system.config.model.tuning == "lora":
        assert (saved / "adapter" / "adapter_model.safetensors").exists()
        torch.testing.assert_close(load_file(str(saved / "head.safetensors"))["net.1.weight"], system.head.net[1].weight.detach())
    assert not list(saved.rglob("*.bin")) and not list(saved.rglob("*.pt"))  # safetensors only
    again = load_system(saved)
    rc2, rr2 = _scores(again, toy_test)
    torch.testing.assert_close(rc2, rc, atol=1e-6, rtol=0)
    torch.testing.assert_close(rr2, rr, atol=1e-6, rtol=0)
    info = again.describe(saved)
    trainable = info["total"]["params_trainable"]
    if system.config.model.tuning == "frozen":
        assert trainable == info["components"]["head"]["params_total"]
    elif system.config.model.tuning == "lora":
        assert 0 < trainable < info["total"]["params_total"] / 10


def test_batched_scores_equal_unbatched(tiny_gpt2, toy_test):
    system = build_system(_cfg(tiny_gpt2))
    system.model.eval()
    prompts, responses = [p.prompt for p in toy_test[:10]], [p.chosen for p in toy_test[:10]]
    batched = system.score(prompts, responses, batch_size=10).rewards
    single = [system.score([p], [r], batch_size=1).rewards[0] for p, r in zip(prompts, responses)]
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(single), atol=1e-5, rtol=1e-5)


def test_decoder_backbone_learns(tiny_gpt2, toy_train, toy_test, tmp_path):
    system = build_system(_cfg(tiny_gpt2, lr=2e-3, epochs=6))
    system.fit(toy_train, None, FitContext(tmp_path, progress=False))
    rc, rr = _scores(system, toy_test)
    assert (rc > rr).float().mean() >= 0.85


def test_baselora_rejects_other_tuning(tiny_bert):
    with pytest.raises(ConfigError, match="baselora"):
        build_system(_cfg(tiny_bert, "baselora", "full"))


def test_frozen_features_are_cached_on_disk(tiny_bert, toy_train, tmp_path, monkeypatch):
    from moerm.encoding import cache as features

    cfg = _cfg(tiny_bert, tuning="frozen", head_lr=1e-2, epochs=1)
    cfg.model.feature_cache = str(tmp_path / "cache")
    build_system(cfg).fit(toy_train, None, FitContext(tmp_path / "a", progress=False))
    assert list((tmp_path / "cache").rglob("shard-*.safetensors"))
    calls = []
    original = features.Backbone.forward
    monkeypatch.setattr(features.Backbone, "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    build_system(cfg).fit(toy_train, None, FitContext(tmp_path / "b", progress=False))
    assert calls == []  # the second run reads every feature from the cache


def test_frozen_features_are_extracted_on_the_training_device(tiny_bert, toy_train, tmp_path, monkeypatch):
    """With a GPU the training device is cuda: the frozen backbone must run there, not on the CPU it loaded on."""
    from moerm.encoding import cache

    seen = []

    def fake_encode(backbone, encoder, prompts, responses, *a, **k):
        seen.append(next(backbone.parameters()).device)
        return torch.zeros(len(prompts), backbone.hidden_size)

    monkeypatch.setattr(distributed, "device", lambda: torch.device("meta"))  # stands in for "cuda:0"
    monkeypatch.setattr(cache, "encode_features", fake_encode)
    system = build_system(_cfg(tiny_bert, tuning="frozen", epochs=1))
    system.fit(toy_train, None, FitContext(tmp_path / "run", progress=False))  # the head trains on the fake features
    assert seen and seen[0] == torch.device("meta")
