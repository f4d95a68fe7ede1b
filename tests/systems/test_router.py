"""The prompt router RODOS and DMoERM share: LoRA tuning that really is LoRA, and accuracy on held-out prompts."""

import dataclasses

import torch

from moerm.config import ModelConfig, RunConfig, TrainConfig
from moerm.systems import build_system, load_system
from moerm.systems.base import FitContext

from conftest import toy_pairs

PREFIX = {"alpha": "tell me about the topic", "beta": "please explain why"}


def domain_pairs(domain, n, seed):
    return [dataclasses.replace(p, prompt=f"{PREFIX[domain]} {p.prompt}") for p in toy_pairs(n, seed, domain)]


def _fit(tiny_bert, tmp_path, eval_pairs=None, **options):
    cfg = RunConfig(system="rodos", model=ModelConfig(backbone=tiny_bert, max_length=40, lora_dropout=0.0,
                                                      feature_cache=str(tmp_path / "cache")),
                    train=TrainConfig(lr=5e-4, batch_size=8, epochs=1, save_every=0),
                    options={**options}, components={"router": {"train": {"epochs": 3, "lr": 1e-2}}})
    train = domain_pairs("alpha", 24, 1) + domain_pairs("beta", 24, 2)
    system = build_system(cfg)
    result = system.fit(train, eval_pairs, FitContext(tmp_path / "run", progress=False))
    return system, result


def test_router_tuning_lora_trains_and_saves_only_the_adapter(tiny_bert, tmp_path):
    system, _ = _fit(tiny_bert, tmp_path, router_tuning="lora")
    router = system.router
    params = dict(router.model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("classifier.") for n in trainable)
    assert sum(params[n].numel() for n in trainable) < 0.2 * sum(p.numel() for p in params.values())
    system.save(tmp_path / "model")
    saved = tmp_path / "model" / "router"
    assert (saved / "adapter" / "adapter_config.json").exists() and not (saved / "backbone").exists()
    prompts = [p.prompt for p in domain_pairs("alpha", 4, 9) + domain_pairs("beta", 4, 9)]
    again = load_system(tmp_path / "model")
    torch.testing.assert_close(again.router.probs(prompts), router.probs(prompts), atol=1e-5, rtol=1e-5)


def test_router_accuracy_is_measured_on_held_out_prompts(tiny_bert, tmp_path):
    held_out = domain_pairs("alpha", 6, 7) + domain_pairs("beta", 10, 8)
    system, result = _fit(tiny_bert, tmp_path, held_out)
    probs = system.router.probs([p.prompt for p in held_out])
    index = {d: i for i, d in enumerate(system.router.domains)}
    by_hand = float((probs.argmax(-1) == torch.tensor([index[p.domain] for p in held_out])).float().mean())
    assert result.metrics["router:eval_accuracy"] == by_hand
    _, no_eval = _fit(tiny_bert, tmp_path / "b")
    assert "router:eval_accuracy" not in no_eval.metrics  # no held-out prompts: no (training-set) number
