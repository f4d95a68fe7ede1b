"""ARLISS: LoRA adapters per domain + a router adapter on one frozen tiny base, for every backbone of the table."""

from __future__ import annotations

import json
import dataclasses
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from conftest import BACKBONES, DEFAULT_LORA_TARGETS, lora_sites, toy_pairs
from moerm.encoding import load_backbone
from moerm.config import ModelConfig, RunConfig, TrainConfig
from moerm.data.schema import PreferencePair
from moerm.modules.heads import RewardHead
from moerm.systems.arliss import ROUTER, ARLISSSystem, adapter_name
from moerm.systems.base import FitContext, load_system

# Each domain's prompts start with distinctive words (in every tiny tokenizer's vocabulary), so the router can tell
# the domains apart.
PREFIX = {"alpha": "tell me about the topic", "beta": "please explain why", "gamma x": "what is this and that"}


def _pairs(domain: str, n: int, seed: int) -> list[PreferencePair]:
    return [dataclasses.replace(p, prompt=f"{PREFIX[domain]} {p.prompt}") for p in toy_pairs(n, seed, domain)]


def _cfg(backbone: str, **options: object) -> RunConfig:
    return RunConfig(system="arliss", model=ModelConfig(backbone=backbone, max_length=48),
                     train=TrainConfig(lr=5e-3, batch_size=8, epochs=4, save_every=0),
                     options={**options}, components={"router": {"train": {"lr": 1e-2, "epochs": 6}}})


def _mixed(pairs: list[PreferencePair]) -> tuple[list[str], list[str]]:
    return [p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs]


@pytest.fixture(scope="module", params=BACKBONES)
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[ARLISSSystem, Path]:
    """One system fitted on alpha + beta on each backbone of the table, and its saved folder."""
    root = tmp_path_factory.mktemp("arliss")
    torch.manual_seed(0)
    system = ARLISSSystem(_cfg(request.getfixturevalue(request.param)))
    train = _pairs("alpha", 64, 1) + _pairs("beta", 64, 2)
    result = system.fit(train, _pairs("alpha", 16, 3) + _pairs("beta", 16, 4), FitContext(root / "run", progress=False))
    assert set(result.seconds_per_component) == {"rm:alpha", "rm:beta", "router"}
    assert (root / "run" / "components" / "rm-alpha" / "metrics.jsonl").exists()
    system.save(root / "model")
    return system, root / "model"


@pytest.fixture(scope="module")
def test_set() -> list[PreferencePair]:
    return _pairs("alpha", 24, 11) + _pairs("beta", 24, 12)


def test_router_routes_and_each_domain_ranks_right(trained, test_set):
    system, _ = trained
    prompts, responses = _mixed(test_set)
    out = system.score(prompts, responses)
    n = len(test_set)
    assert [d["routed_domain"] for d in out.details[:n]] == [p.domain for p in test_set]
    assert all(d["adapter"] == d["routed_domain"] and d["inference"] == "batched" and not d["fallback"]
               for d in out.details)
    for domain in ("alpha", "beta"):
        rows = [i for i, p in enumerate(test_set) if p.domain == domain]
        acc = sum(out.rewards[i] > out.rewards[n + i] for i in rows) / len(rows)
        assert acc >= 0.75, (domain, acc)


def test_batched_equals_switch_equals_each_adapter_alone(trained, test_set):
    system, path = trained
    prompts, responses = _mixed(test_set[::3])  # mixed domains, different lengths
    batched = system.score(prompts, responses, batch_size=5)
    switch = system.score(prompts, responses, mode="switch")
    assert switch.details[0]["inference"] == "switch"
    assert [d["adapter"] for d in batched.details] == [d["adapter"] for d in switch.details]
    torch.testing.assert_close(torch.tensor(batched.rewards), torch.tensor(switch.rewards), atol=1e-5, rtol=0)
    # A fresh PeftModel carrying only one domain's adapter, and that domain's head, read from the saved folder.
    for domain in ("alpha", "beta"):
        name = adapter_name(domain)
        backbone = load_backbone(system.config.model.backbone)
        backbone.model = PeftModel.from_pretrained(backbone.model, str(path / "adapters" / name)).eval()
        head = RewardHead(backbone.hidden_size)
        head.load_state_dict(load_file(str(path / "heads" / f"{name}.safetensors")))
        rows = [i for i, d in enumerate(batched.details) if d["adapter"] == domain]
        assert rows
        with torch.no_grad():
            for i in rows:
                b = system.encoder.pad([system.encoder.encode(prompts[i], responses[i])])
                alone = float(head(backbone(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))))
                assert abs(float(system.calibration(domain, torch.tensor([alone]))) - batched.rewards[i]) < 1e-5


def test_adapters_sit_on_the_default_targets_of_every_block(trained):
    system, _ = trained
    peft = system.model.peft
    targets = DEFAULT_LORA_TARGETS[peft.config.model_type]
    assert lora_sites(peft) == {(i, name) for i in range(2) for name in targets}
    assert set(peft.peft_config) == {"alpha", "beta", ROUTER}


def test_only_the_active_adapter_and_its_head_train(trained, tmp_path):
    _, path = trained
    system = load_system(path)
    system.config = dataclasses.replace(system.config, train=dataclasses.replace(system.config.train, max_steps=3))
    model = system.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    system._activate("alpha")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".alpha." in n or n.startswith("heads.alpha.") for n in trainable)
    system._train_rm("alpha", _pairs("alpha", 16, 5), None, FitContext(tmp_path, progress=False))
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert any("lora_B.alpha." in n for n in changed) and "heads.alpha.net.1.weight" in changed
    assert all((".alpha." in n and "lora_" in n) or n.startswith("heads.alpha.") for n in changed), changed


def test_save_load_gives_identical_scores(trained, test_set):
    system, path = trained
    loaded = load_system(path)
    assert isinstance(loaded, ARLISSSystem) and loaded.domains == ["alpha", "beta"]
    prompts, responses = _mixed(test_set[:10])
    a, b = system.score(prompts, responses), loaded.score(prompts, responses)
    torch.testing.assert_close(torch.tensor(a.rewards), torch.tensor(b.rewards), atol=1e-6, rtol=0)
    assert [d["routed_domain"] for d in a.details] == [d["routed_domain"] for d in b.details]


@pytest.mark.parametrize("mode", ["batched", "switch"])
def test_low_confidence_falls_back_to_the_probability_mixture(trained, test_set, mode):
    _, path = trained
    system = load_system(path)
    system.opts.min_confidence = 1.0
    prompts, responses = _mixed(test_set[::6])
    out = system.score(prompts, responses, mode=mode)
    per_domain = {d: system.score(prompts, responses, [d] * len(prompts), mode=mode).rewards for d in system.domains}
    for i, det in enumerate(out.details):
        assert det["fallback"] and det["adapter"] is None and "confidence" in det["fallback_reason"]
        expected = sum(det["router_probs"][d] * per_domain[d][i] for d in system.domains)
        assert abs(out.rewards[i] - expected) < 1e-5


def test_unknown_given_domain_falls_back(trained, test_set):
    system, _ = trained
    p = test_set[0]
    out = system.score([p.prompt], [p.chosen], ["nope"])
    assert out.details[0]["fallback"] and out.details[0]["route_source"] == "fallback"
    given = system.score([p.prompt], [p.chosen], ["beta"])
    assert given.details[0]["route_source"] == "given" and given.details[0]["adapter"] == "beta"


def test_add_domain_leaves_existing_files_and_routes_the_new_domain(trained, tmp_path):
    _, path = trained
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(path, model_dir)
    system = load_system(model_dir)
    kept = [f for f in model_dir.rglob("*") if f.is_file() and f.parts[-2] in ("alpha", "beta")]
    kept += [model_dir / "heads" / "alpha.safetensors", model_dir / "heads" / "beta.safetensors"]
    before = {f: f.read_bytes() for f in kept}
    assert len([f for f in kept if f.suffix == ".safetensors"]) == 4

    with pytest.raises(ValueError, match="already"):
        system.add_domain(_pairs("alpha", 4, 9), FitContext(tmp_path / "x", progress=False), model_dir)
    with pytest.raises(ValueError, match="one new domain"):
        system.add_domain(_pairs("beta", 2, 9) + _pairs("gamma x", 2, 9), FitContext(tmp_path / "x"), model_dir)

    result = system.add_domain(_pairs("gamma x", 64, 7), FitContext(tmp_path / "add", progress=False), model_dir)
    assert set(result.seconds_per_component) == {"rm:gamma x", "router"}
    assert all(f.read_bytes() == b for f, b in before.items())
    name = adapter_name("gamma x")
    assert name != "gamma x" and (model_dir / "adapters" / name / "adapter_model.safetensors").exists()

    reloaded = load_system(model_dir)
    assert reloaded.domains == ["alpha", "beta", "gamma x"]
    version = json.loads((model_dir / "arliss.json").read_text())["router_version"]
    assert version == 1 and not (model_dir / "heads" / f"{ROUTER}.safetensors").exists()  # the old router is gone
    assert load_file(str(model_dir / "heads" / f"{ROUTER}-v1.safetensors"))["weight"].shape[0] == 3
    test = _pairs("alpha", 8, 21) + _pairs("beta", 8, 22) + _pairs("gamma x", 8, 23)
    for s in (system, reloaded):
        out = s.score([p.prompt for p in test], [p.chosen for p in test])
        assert [d["routed_domain"] for d in out.details] == [p.domain for p in test]


def test_describe_shows_adapters_are_a_small_fraction_of_the_base(trained):
    system, path = trained
    info = system.describe(path)
    comps = info["components"]
    assert set(comps) == {"base", "adapter:alpha", "adapter:beta", "adapter:router", "head:alpha", "head:beta",
                          "head:router"}
    base = comps["base"]["params_total"]
    assert comps["base"]["params_trainable"] == 0
    for key in ("adapter:alpha", "adapter:beta", "adapter:router"):
        assert 0 < comps[key]["params_total"] < 0.1 * base  # (the toy decoders' bases have tiny vocabularies)
        assert comps[key]["bytes_on_disk"] > 0
    assert comps["head:router"]["params_total"] == 2 * 32 + 2
    # Every parameter is in exactly one component: the counts add up to the whole model.
    assert info["total"]["params_total"] == sum(p.numel() for p in system.model.parameters())
    assert sum(c["params_total"] for c in comps.values()) == info["total"]["params_total"]


def test_options_are_checked(tiny_bert):
    with pytest.raises(ValueError, match="inference"):
        ARLISSSystem(_cfg(tiny_bert, inference="fast"))
    assert adapter_name("router") != "router" and adapter_name("a.b") != adapter_name("a_b")
