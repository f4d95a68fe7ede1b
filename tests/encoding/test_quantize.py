"""int8 dynamic quantization after load (`encoding/quantize.py`, `load_system(quantize=...)`): rewards stay close to
fp32, only backbone Linear layers (LoRA: only their base_layer) become int8, heads stay fp32, CPU only."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn
from typer.testing import CliRunner

from conftest import toy_pairs
from moerm.config import ConfigError, ModelConfig, RunConfig, TrainConfig
from moerm.encoding.backbone import Backbone
from moerm.encoding.quantize import find_backbones, is_quantized_linear, quantize_system
from moerm.errors import UserError
from moerm.eval.metrics import evaluate_system
from moerm.systems.base import FitContext, build_system, load_system

PREFIX = {"alpha": "tell me about the topic", "beta": "please explain why"}


def _domain_pairs(domain: str, n: int, seed: int):
    return [dataclasses.replace(p, prompt=f"{PREFIX[domain]} {p.prompt}") for p in toy_pairs(n, seed, domain)]


def _fit_save(cfg: RunConfig, train, root: Path) -> Path:
    torch.manual_seed(0)
    system = build_system(cfg)
    system.fit(train, None, FitContext(root / "run", progress=False))
    system.save(root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def baseline_dir(tiny_bert, tmp_path_factory) -> Path:
    cfg = RunConfig(system="baseline", model=ModelConfig(backbone=tiny_bert, tuning="full", max_length=48),
                    train=TrainConfig(lr=5e-4, batch_size=8, epochs=4, save_every=0))
    return _fit_save(cfg, toy_pairs(96, seed=1), tmp_path_factory.mktemp("q-baseline"))


@pytest.fixture(scope="module")
def baselora_dir(tiny_bert, tmp_path_factory) -> Path:
    cfg = RunConfig(system="baselora", model=ModelConfig(backbone=tiny_bert, max_length=48),
                    train=TrainConfig(lr=5e-3, batch_size=8, epochs=4, save_every=0))
    return _fit_save(cfg, toy_pairs(96, seed=1), tmp_path_factory.mktemp("q-baselora"))


@pytest.fixture(scope="module")
def rodos_dir(tiny_bert, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("q-rodos")
    cfg = RunConfig(system="rodos", model=ModelConfig(backbone=tiny_bert, max_length=48,
                                                      feature_cache=str(root / "cache")),
                    train=TrainConfig(lr=5e-4, batch_size=8, epochs=4, save_every=0),
                    options={"router_tuning": "frozen"}, components={"router": {"train": {"epochs": 15, "lr": 2e-2}}})
    return _fit_save(cfg, _domain_pairs("alpha", 48, 1) + _domain_pairs("beta", 48, 2), root)


@pytest.fixture(scope="module")
def arliss_dir(tiny_bert, tmp_path_factory) -> Path:
    cfg = RunConfig(system="arliss", model=ModelConfig(backbone=tiny_bert, max_length=48),
                    train=TrainConfig(lr=5e-3, batch_size=8, epochs=4, save_every=0),
                    components={"router": {"train": {"lr": 1e-2, "epochs": 6}}})
    return _fit_save(cfg, _domain_pairs("alpha", 48, 1) + _domain_pairs("beta", 48, 2),
                     tmp_path_factory.mktemp("q-arliss"))


def _held_out(routed: bool):
    return (_domain_pairs("alpha", 13, 11) + _domain_pairs("beta", 12, 12)) if routed else toy_pairs(25, seed=2)


def _inputs(pairs):
    return [p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs]


def _backbone_linears(system) -> tuple[list[nn.Module], list[nn.Module]]:
    """(quantized, still-float Linear) modules inside the system's backbones."""
    mods = [m for b in find_backbones(system) for m in b.modules()]
    return [m for m in mods if is_quantized_linear(m)], [m for m in mods if type(m) is nn.Linear]


@pytest.mark.parametrize("which, routed", [("baseline_dir", False), ("baselora_dir", False), ("rodos_dir", True),
                                           ("arliss_dir", True)])
def test_int8_rewards_rank_like_fp32_and_accuracy_agrees(request, which, routed):
    path = request.getfixturevalue(which)
    fp32, int8 = load_system(path), load_system(path, quantize="int8")
    pairs = _held_out(routed)
    prompts, responses = _inputs(pairs)  # 50 inputs
    r32 = fp32.score(prompts, responses).rewards
    r8 = int8.score(prompts, responses).rewards
    assert r32 != r8  # really a different computation
    rho = spearmanr(r32, r8).statistic
    assert rho >= 0.99, rho
    acc32, acc8 = evaluate_system(fp32, pairs)["accuracy"], evaluate_system(int8, pairs)["accuracy"]
    assert acc32 >= 0.85 and abs(acc32 - acc8) <= 0.04, (acc32, acc8)  # at most one pair of 25 flips
    assert int8.describe()["quantized"] == "int8" and "quantized" not in fp32.describe()
    quantized, float_linears = _backbone_linears(int8)
    assert quantized and all(m.weight().dtype == torch.qint8 for m in quantized)  # int8 packed weights
    if which == "baseline_dir":
        assert not float_linears  # a fully tuned backbone: every Linear is int8
    # heads (and routers) stay fp32: no quantized module outside a backbone
    in_backbones = {id(m) for b in find_backbones(int8) for m in b.modules()}
    heads = [m for c in int8.components().values() for m in c.modules() if id(m) not in in_backbones]
    assert not any(is_quantized_linear(m) for m in heads)


@pytest.mark.parametrize("which", ["baselora_dir", "arliss_dir"])
def test_lora_keeps_adapters_fp32_and_quantizes_only_the_base_layer(request, which):
    from peft.tuners.lora import LoraLayer

    system = load_system(request.getfixturevalue(which), quantize="int8")
    lora = [m for b in find_backbones(system) for m in b.modules() if isinstance(m, LoraLayer)]
    assert lora
    for layer in lora:
        assert is_quantized_linear(layer.base_layer)
        for name in layer.lora_A:
            assert type(layer.lora_A[name]) is nn.Linear and layer.lora_A[name].weight.dtype == torch.float32
            assert type(layer.lora_B[name]) is nn.Linear and layer.lora_B[name].weight.dtype == torch.float32
    # the other (non-adapted) Linear layers of the base are int8 too: none is left in fp32 outside the LoRA A/B
    _, float_linears = _backbone_linears(system)
    ab = {id(m) for layer in lora for d in (layer.lora_A, layer.lora_B) for m in d.values()}
    assert all(id(m) in ab for m in float_linears)


def test_config_key_quantizes_at_load_and_none_overrides(baseline_dir, tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(baseline_dir, copy)
    meta = json.loads((copy / "system.json").read_text())
    meta["config"]["model"]["quantize"] = "int8"
    (copy / "system.json").write_text(json.dumps(meta))
    assert load_system(copy).describe()["quantized"] == "int8"
    assert "quantized" not in load_system(copy, quantize="none").describe()
    with pytest.raises(ConfigError, match="model.quantize"):
        ModelConfig(quantize="int4")
    with pytest.raises(UserError, match="quantize"):
        load_system(copy, quantize="int4")


def test_cuda_is_refused_and_a_quantized_system_cannot_be_saved(baseline_dir, tmp_path):
    with pytest.raises(UserError, match="CPU-only|CUDA is not available"):  # no CUDA here: refused before that
        load_system(baseline_dir, device="cuda", quantize="int8")
    system = load_system(baseline_dir, quantize="int8")
    with pytest.raises(UserError, match="quantized"):
        system.save(tmp_path / "again")
    # a backbone found on another device is refused too (meta stands in for a GPU here)
    fp32 = load_system(baseline_dir)
    (backbone,) = find_backbones(fp32)
    assert isinstance(backbone, Backbone)
    backbone.to("meta")
    with pytest.raises(UserError, match="CPU-only"):
        quantize_system(fp32, "int8")


def test_cli_score_and_eval_take_quantize(baseline_dir, tmp_path):
    from moerm.cli import app

    runner = CliRunner()
    inp = tmp_path / "in.jsonl"
    pairs = toy_pairs(4, seed=5)
    inp.write_text("".join(json.dumps({"prompt": p.prompt, "response": p.chosen}) + "\n" for p in pairs))
    res = runner.invoke(app, ["score", str(baseline_dir), "-i", str(inp), "--quantize", "int8"])
    assert res.exit_code == 0, res.output
    assert len([ln for ln in res.output.splitlines() if ln.startswith("{")]) == 4
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"id": p.id, "domain": p.domain, "prompt": p.prompt, "chosen": p.chosen,
                                        "rejected": p.rejected}) + "\n" for p in pairs))
    res = runner.invoke(app, ["eval", str(baseline_dir), "--data", str(data), "--out", str(tmp_path / "ev"),
                              "--quantize", "int8", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())[str(baseline_dir)]["quantized"] == "int8"
    res = runner.invoke(app, ["score", str(baseline_dir), "--prompt", "a", "--response", "b", "--quantize", "int4"])
    assert res.exit_code == 1 and "quantize" in res.output


def test_serve_loads_the_system_quantized(baseline_dir):
    from moerm.serve.app import _loader, system_info
    from moerm.serve.config import ServeConfig, ServeConfigError

    system = _loader(str(baseline_dir), ServeConfig(quantize="int8"))()
    assert system_info(system)["quantized"] == "int8"
    assert "quantized" not in system_info(_loader(str(baseline_dir), ServeConfig())())
    with pytest.raises(ServeConfigError, match="quantize"):
        ServeConfig(quantize="int4")
    from moerm.cli import app

    assert "--quantize" in CliRunner().invoke(app, ["serve", "--help"]).output


def test_layers_matching_keep_fp32_stay_float(tiny_bert):
    from torch import nn

    from moerm.config import load_config
    from moerm.encoding.quantize import is_quantized_linear, quantize_system
    from moerm.systems import build_system

    system = build_system(load_config(None, [f"model.backbone={tiny_bert}", "model.max_length=32"]))
    quantize_system(system, "int8", keep_fp32=r"layer\.\d+\.output\.dense")
    mods = dict(system.backbone.model.named_modules())
    kept = [n for n in mods if n.endswith("output.dense") and "attention" not in n]
    assert kept and all(type(mods[n]) is nn.Linear for n in kept)  # the FFN down-projections: fp32
    assert is_quantized_linear(mods["encoder.layer.0.intermediate.dense"])
    assert is_quantized_linear(mods["encoder.layer.0.attention.output.dense"])
