"""ARLISS with `options.router_tuning=frozen`: a linear head on the mean of the prompt's pretrained states after the
first `options.router_layer` blocks (adapters off), so only those blocks run for the router; for every backbone of
the table under `top` tuning, and under `lora` tuning (adapters in every block) on BERT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import BACKBONES
from moerm.config import ConfigError, ModelConfig, RunConfig, TrainConfig
from moerm.data.schema import PreferencePair
from moerm.encoding import load_backbone
from moerm.errors import UserError
from moerm.encoding.blocks import transformer_blocks
from moerm.systems.arliss import ROUTER, ARLISSSystem, adapter_name
from moerm.systems.base import FitContext, load_system

from test_arliss import _mixed, _pairs

ROWS = [(b, "top") for b in BACKBONES] + [("tiny_bert", "lora")]


def _cfg(backbone: str, tuning: str, cache: Path, **options: object) -> RunConfig:
    return RunConfig(system="arliss",
                     model=ModelConfig(backbone=backbone, max_length=48, tuning=tuning, trainable_layers=1,
                                       trunk_cache=str(cache)),
                     train=TrainConfig(lr=1e-2 if tuning == "top" else 5e-3, batch_size=8, epochs=6, save_every=0),
                     options={"router_tuning": "frozen", **options},
                     components={"router": {"train": {"lr": 1e-2, "epochs": 30}}})


@pytest.fixture(scope="module", params=ROWS, ids=[f"{b.removeprefix('tiny_')}-{t}" for b, t in ROWS])
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[ARLISSSystem, Path, dict[str, float]]:
    backbone, tuning = request.param
    root = tmp_path_factory.mktemp("arliss-frozen")
    torch.manual_seed(0)
    system = ARLISSSystem(_cfg(request.getfixturevalue(backbone), tuning, root / "trunk"))
    train = _pairs("alpha", 64, 1) + _pairs("beta", 64, 2)
    result = system.fit(train, _pairs("alpha", 16, 3) + _pairs("beta", 16, 4), FitContext(root / "run", progress=False))
    system.save(root / "model")
    return system, root / "model", result.metrics


@pytest.fixture(scope="module")
def test_set() -> list[PreferencePair]:
    return _pairs("alpha", 24, 11) + _pairs("beta", 24, 12)


def test_routes_and_ranks_each_domain_right_without_a_router_adapter(trained, test_set):
    system, _, metrics = trained
    assert metrics["router:eval_accuracy"] >= 0.9  # held-out prompts
    assert ROUTER not in system.model.peft.peft_config
    prompts, responses = _mixed(test_set)
    out = system.score(prompts, responses)
    n = len(test_set)
    assert [d["routed_domain"] for d in out.details[:n]] == [p.domain for p in test_set]
    for domain in ("alpha", "beta"):
        rows = [i for i, p in enumerate(test_set) if p.domain == domain]
        acc = sum(out.rewards[i] > out.rewards[n + i] for i in rows) / len(rows)
        assert acc >= 0.75, (domain, acc)


def test_router_reads_the_pretrained_states_after_its_blocks_and_runs_only_those(trained, test_set):
    system, _, _ = trained
    prompts = [p.prompt for p in test_set[::5]]
    # By hand: the pretrained model's hidden states after block `router_layer` (hidden_states[k] is block k's
    # input), the mean over each prompt's first router_max_length tokens, through the router head.
    fresh = load_backbone(system.config.model.backbone).eval()
    encs = [system.router_encoder.encode_single(p) for p in prompts]
    with torch.no_grad():
        expected = []
        for e in encs:
            b = system.router_encoder.pad([e])
            out = fresh.model(**fresh._inputs(b["input_ids"], b["attention_mask"], b.get("token_type_ids")),
                              output_hidden_states=True)
            feats = out.hidden_states[system.opts.router_layer].mean(1)  # (1, H)
            expected.append(torch.softmax(system.model.router_head(feats), -1)[0])
    _, blocks = transformer_blocks(system.model.peft)
    calls = [0] * len(blocks)
    hooks = [blk.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, blk in enumerate(blocks)]
    try:
        probs = system.router.probs(prompts, batch_size=len(prompts))  # (N, D)
    finally:
        for h in hooks:
            h.remove()
    assert calls[0] == 1 and calls[1:] == [0] * (len(blocks) - 1)  # one batch, block 0 only
    torch.testing.assert_close(probs, torch.stack(expected), atol=1e-5, rtol=0)


def test_batched_equals_unbatched_equals_switch_equals_each_adapter_alone(trained, test_set):
    system, _, _ = trained
    prompts, responses = _mixed(test_set[::3])
    batched = system.score(prompts, responses, batch_size=5)
    one = system.score(prompts, responses, batch_size=1)
    switch = system.score(prompts, responses, mode="switch")
    routed = [d["routed_domain"] for d in batched.details]
    assert routed == [d["routed_domain"] for d in one.details] == [d["routed_domain"] for d in switch.details]
    for other in (one, switch):
        torch.testing.assert_close(torch.tensor(batched.rewards), torch.tensor(other.rewards), atol=1e-5, rtol=0)
    model = system.model
    with torch.no_grad():
        for i, domain in enumerate(routed):
            b = system.encoder.pad([system.encoder.encode(prompts[i], responses[i])])
            model.peft.set_adapter(adapter_name(domain))
            alone = model.heads[adapter_name(domain)](model.backbone(b["input_ids"], b["attention_mask"],
                                                                     b.get("token_type_ids")))
            assert abs(float(system.calibration(domain, alone.reshape(1))) - batched.rewards[i]) < 1e-5


def test_save_load_same_scores_and_no_router_adapter(trained, test_set, tmp_path):
    system, path, _ = trained
    index = json.loads((path / "arliss.json").read_text())
    assert index["router_tuning"] == "frozen" and "router_adapter" not in index
    assert not (path / "adapters" / ROUTER).exists()
    loaded = load_system(path)
    assert loaded.describe()["router_tuning"] == "frozen"
    assert "adapter:router" not in loaded.describe(path)["components"]
    prompts, responses = _mixed(test_set[:10])
    a, b = system.score(prompts, responses), loaded.score(prompts, responses)
    torch.testing.assert_close(torch.tensor(a.rewards), torch.tensor(b.rewards), atol=1e-6, rtol=0)
    # A folder whose index says another router than its config is refused, not loaded with a missing router.
    copy = tmp_path / "model"
    shutil.copytree(path, copy)
    index["router_tuning"] = "lora"
    (copy / "arliss.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="router_tuning=lora"):
        load_system(copy)


def test_add_domain_retrains_the_head_for_the_new_domain(trained, tmp_path):
    _, path, _ = trained
    model_dir = tmp_path / "model"
    shutil.copytree(path, model_dir)
    system = load_system(model_dir)
    result = system.add_domain(_pairs("gamma x", 64, 7), FitContext(tmp_path / "add", progress=False), model_dir)
    assert set(result.seconds_per_component) == {"rm:gamma x", "router"}
    assert load_file(str(model_dir / "heads" / f"{ROUTER}-v1.safetensors"))["weight"].shape[0] == 3
    test = _pairs("alpha", 8, 21) + _pairs("beta", 8, 22) + _pairs("gamma x", 8, 23)
    for s in (system, load_system(model_dir)):
        out = s.score([p.prompt for p in test], [p.chosen for p in test])
        right = [d["routed_domain"] == p.domain for d, p in zip(out.details, test)]
        assert sum(right) >= 0.9 * len(test) and any(d["routed_domain"] == "gamma x" for d in out.details)


def test_options_are_checked(tiny_bert, tmp_path):
    with pytest.raises(ConfigError, match="lora or frozen"):
        ARLISSSystem(_cfg(tiny_bert, "top", tmp_path, router_tuning="trunk"))
    with pytest.raises(ConfigError, match="router_layer: expected an integer"):
        ARLISSSystem(_cfg(tiny_bert, "top", tmp_path, router_layer=None))
    with pytest.raises(UserError, match="router_layer must be an integer"):
        ARLISSSystem(_cfg(tiny_bert, "top", tmp_path, router_layer=0))
    system = ARLISSSystem(_cfg(tiny_bert, "top", tmp_path, router_layer=2))  # the tiny models have 2 blocks
    with pytest.raises(UserError, match=r"router_layer must be within 1\.\.1"):
        system.fit(_pairs("alpha", 8, 1) + _pairs("beta", 8, 2), None, FitContext(tmp_path / "run", progress=False))
