"""The prompt router RODOS and DMoERM share: LoRA tuning that really is LoRA, and accuracy on held-out prompts."""

import dataclasses

import pytest
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


def test_trunk_router_routes_on_the_trunk_states_and_reloads(tiny_bert, tmp_path):
    """options.router_tuning=trunk: a classifier on the prompt's mean trunk states (the input of the first of the top
    model.trainable_layers blocks); it learns the easy prefix task, and the saved router gives the same probabilities."""
    from moerm.encoding.blocks import transformer_blocks, trunk_states
    from moerm.systems.routing import Router, RouterLayout, RouterOptions

    cfg = RunConfig(system="rodos", model=ModelConfig(backbone=tiny_bert, max_length=40, trainable_layers=1),
                    train=TrainConfig(lr=1e-2, batch_size=8, epochs=20, save_every=0))
    examples = [(f"tell me about the topic {i}", "alpha") for i in range(24)] + [
        (f"please explain why {i}", "beta") for i in range(24)]
    opts = RouterOptions(router_tuning="trunk", router_max_length=16)
    torch.manual_seed(0)
    router = Router(cfg, opts, ["alpha", "beta"])
    router.fit(examples, tmp_path / "router", FitContext(tmp_path, progress=False), cfg.train)
    prompts = ["tell me about the topic x", "please explain why y"]
    probs, feats = router.outputs(prompts)
    assert probs.argmax(-1).tolist() == [0, 1]
    enc = router.encoder.encode_single(prompts[0])
    _, blocks = transformer_blocks(router.backbone.model)
    router.backbone.eval()
    with torch.no_grad():
        hidden, _ = trunk_states(router.backbone.model, blocks, 1, {k: torch.tensor([v]) for k, v in enc.items()})
    torch.testing.assert_close(feats[0], hidden[0].mean(0), atol=1e-5, rtol=0)  # block 1's input, not the output
    paths = RouterLayout().paths(tmp_path / "saved", 0)
    router.save(paths)
    again = Router.load(paths, cfg, opts, ["alpha", "beta"])
    torch.testing.assert_close(again.outputs(prompts)[0], probs, atol=1e-6, rtol=0)


def test_frozen_router_after_k_blocks_reads_the_early_states_and_runs_only_those(tiny_bert, tmp_path):
    """options.router_layer=1: a frozen router on the mean of the prompt's pretrained states after block 0 (the
    model's hidden_states[1]); only block 0 runs for it; it learns the prefix task, reloads, and RODOS routes with it."""
    from moerm.encoding import load_backbone
    from moerm.errors import UserError
    from moerm.encoding.blocks import transformer_blocks
    from moerm.systems.routing import Router, RouterLayout, RouterOptions

    cfg = RunConfig(system="rodos", model=ModelConfig(backbone=tiny_bert, max_length=40),
                    train=TrainConfig(lr=1e-2, batch_size=8, epochs=20, save_every=0))
    examples = [(f"tell me about the topic {i}", "alpha") for i in range(24)] + [
        (f"please explain why {i}", "beta") for i in range(24)]
    opts = RouterOptions(router_tuning="frozen", router_layer=1, router_max_length=16)
    torch.manual_seed(0)
    router = Router(cfg, opts, ["alpha", "beta"])
    router.fit(examples, tmp_path / "router", FitContext(tmp_path, progress=False), cfg.train)
    prompts = ["tell me about the topic x", "please explain why y"]
    _, blocks = transformer_blocks(router.backbone.model)
    calls = [0] * len(blocks)
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, b in enumerate(blocks)]
    try:
        probs, feats = router.outputs(prompts)
    finally:
        for h in hooks:
            h.remove()
    assert calls == [1, 0] and probs.argmax(-1).tolist() == [0, 1]
    fresh = load_backbone(tiny_bert).eval()
    with torch.no_grad():
        for i, p in enumerate(prompts):
            enc = {k: torch.tensor([v]) for k, v in router.encoder.encode_single(p).items()}
            hidden = fresh.model(**enc, output_hidden_states=True).hidden_states[1]  # after block 0
            torch.testing.assert_close(feats[i], hidden[0].mean(0), atol=1e-5, rtol=0)
    paths = RouterLayout().paths(tmp_path / "saved", 0)
    router.save(paths)
    again = Router.load(paths, cfg, opts, ["alpha", "beta"])
    torch.testing.assert_close(again.outputs(prompts)[0], probs, atol=1e-6, rtol=0)
    with pytest.raises(UserError, match="router_layer is a frozen router's option"):
        Router(cfg, RouterOptions(router_tuning="lora", router_layer=1), ["alpha", "beta"])
    with pytest.raises(UserError, match="router_layer must be an integer"):
        RouterOptions(router_layer=0)
    # RODOS end to end: its router trains on these features and routes the held-out prompts.
    # (raw rewards: the router then trains on every training prompt, none held back for calibration maps)
    system, result = _fit(tiny_bert, tmp_path / "rodos", router_layer=1, calibration="none")
    test = domain_pairs("alpha", 8, 5) + domain_pairs("beta", 8, 6)
    out = system.score([p.prompt for p in test], [p.chosen for p in test])
    right = [d["router_top"] == p.domain for d, p in zip(out.details, test)]  # gated: low confidence mixes
    assert sum(right) >= 0.75 * len(test), right  # (its router trains only 3 epochs here)


def test_rodos_frozen_router_reads_one_block_by_default_and_older_runs_keep_every_block(tiny_bert, tmp_path):
    import json

    from moerm.systems.rodos import RODOSOptions

    assert RODOSOptions().router_layer == 1  # "auto" for the frozen router
    assert RODOSOptions(router_tuning="lora").router_layer is None  # other routers read their own backbone
    system, _ = _fit(tiny_bert, tmp_path, calibration="none")
    assert system.opts.router_layer == 1 and system.config.options["router_layer"] == 1  # saved with the run
    prompts = [p.prompt for p in domain_pairs("alpha", 6, 5)]
    system.save(tmp_path / "model")
    saved = json.loads((tmp_path / "model" / "system.json").read_text())
    assert saved["config"]["options"]["router_layer"] == 1
    torch.testing.assert_close(load_system(tmp_path / "model").router.probs(prompts), system.router.probs(prompts))
    # A run saved before the default changed has no router_layer: its router read the whole backbone. Retrain one
    # so, drop the key as that release wrote it, and it loads with the same (every-block) routing.
    old, _ = _fit(tiny_bert, tmp_path / "old", calibration="none", router_layer=None)
    old.save(tmp_path / "old-model")
    meta = json.loads((tmp_path / "old-model" / "system.json").read_text())
    del meta["config"]["options"]["router_layer"]
    (tmp_path / "old-model" / "system.json").write_text(json.dumps(meta))
    again = load_system(tmp_path / "old-model")
    assert again.opts.router_layer is None
    torch.testing.assert_close(again.router.probs(prompts), old.router.probs(prompts))
