"""Bad input and faults against configs, data, training and saved runs: each case a clear error naming the field
(or file and line), an exit code, and nothing written or lost. (The server's table is tests/reliability/test_server.py.)
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel
from typer.testing import CliRunner

from moerm.cli import app
from moerm.cli.train import finite_or_none
from moerm.config import ConfigError, load_config
from moerm.data.readers import load_pairs, write_jsonl
from moerm.data.schema import InvalidRecord
from moerm.encoding import load_tokenizer
from moerm.errors import UserError
from moerm.systems import build_system, load_system

from conftest import toy_pairs

runner = CliRunner()

BAD_CONFIGS = [  # override -> the field the message must name
    ("train.max_steps=-5", "train.max_steps"),
    ("train.epochs=0", "train.epochs"),
    ("train.epochs=-1", "train.epochs"),
    ("train.warmup_ratio=2", "train.warmup_ratio"),
    ("train.lr=0", "train.lr"),
    ("train.log_every=0", "train.log_every"),
    ("train.eval_batch_size=0", "train.eval_batch_size"),
    ("model.lora_dropout=1.5", "model.lora_dropout"),
    ("data.max_train_pairs_per_domain=0", "data.max_train_pairs_per_domain"),
]


@pytest.mark.parametrize("override,field", BAD_CONFIGS)
def test_nonsense_numbers_are_config_errors_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("overrides,needle", [
    (["system=baseline", "options.num_experts=3"], "takes no options"),
    (["system=rodos", "components.aggregator.train.lr=1e-3"], "components.aggregator"),
    (["system=rodos", "options.router_lr=1e-2"], "components.router.train.lr"),
    (["system=arliss", "model.tuning=frozen"], "cannot honour model.tuning='frozen'"),
])
def test_what_a_system_cannot_take_is_refused_when_it_is_built(tiny_bert, overrides, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        build_system(load_config(None, [f"model.backbone={tiny_bert}", *overrides]))


def test_max_length_past_the_backbones_positions_is_refused_at_build(tiny_bert):
    with pytest.raises(ConfigError, match="128 positions"):  # the tiny BERT has 128 position embeddings
        build_system(load_config(None, [f"model.backbone={tiny_bert}", "model.max_length=100000"]))
    with pytest.raises(ConfigError, match="128 positions"):
        build_system(load_config(None, [f"model.backbone={tiny_bert}", "system=rodos",
                                        "options.router_max_length=4096"]))


@pytest.mark.parametrize("domain", ["../../../../X", "/abs/path", "a/b", "a\\b", "..", " padded "])
def test_domain_names_that_would_become_paths_are_invalid_records(tmp_path, domain):
    rec = {"id": "1", "domain": domain, "prompt": "p", "chosen": "good", "rejected": "bad"}
    (tmp_path / "d.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(InvalidRecord) as e:
        load_pairs([str(tmp_path / "d.jsonl")])
    assert e.value.field == "domain" and e.value.line == 1 and str(tmp_path / "d.jsonl") in str(e.value)


def _data(tmp_path):
    d = tmp_path / "data"
    write_jsonl(toy_pairs(16, seed=1, domain="alpha"), d / "alpha" / "train.jsonl")
    return d


def test_a_diverged_run_is_an_error_and_saves_no_model(tmp_path, tiny_bert):
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", "--backbone", tiny_bert, "--data", str(_data(tmp_path)), "--out", str(run),
                              "--no-progress", "--set", "train.lr=1e9", "--set", "train.max_grad_norm=0",
                              "--set", "model.max_length=32", "--set", "train.batch_size=4"])
    assert res.exit_code == 1, res.output
    assert "diverged" in res.output and "step" in res.output and "train.lr" in res.output
    assert not (run / "model").exists() and not (run / "train_summary.json").exists()


def test_score_never_prints_nan(tmp_path, tiny_bert):
    assert finite_or_none({"reward": float("nan"), "details": {"p": [float("inf"), 1.0]}}) == \
        {"reward": None, "details": {"p": [None, 1.0]}}
    cfg = load_config(None, [f"model.backbone={tiny_bert}", "model.tuning=frozen", "model.max_length=32"])
    system = build_system(cfg)
    system.head.net[-1].weight.data.fill_(float("nan"))  # a broken model
    system.save(tmp_path / "model")
    res = runner.invoke(app, ["score", str(tmp_path / "model"), "--prompt", "hi", "--response", "good"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.output.strip().splitlines()[-1])  # strict JSON: a bare NaN would not parse as null
    assert row["reward"] is None


def test_a_swapped_backbone_is_refused_with_what_changed(tmp_path, tiny_bert):
    base = tmp_path / "base"
    shutil.copytree(tiny_bert, base)
    system = build_system(load_config(None, [f"model.backbone={base}", "model.tuning=frozen", "model.max_length=32"]))
    system.save(tmp_path / "model")
    load_system(tmp_path / "model")  # unchanged: loads
    torch.manual_seed(123)  # another model of the same shape in the same folder
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(base, safe_serialization=True)
    load_tokenizer("minilm").save_pretrained(base)
    with pytest.raises(UserError, match="not the one this system was trained on"):
        load_system(tmp_path / "model")


def test_a_pickled_adapter_is_refused_before_peft_reads_it(tmp_path, tiny_bert):
    system = build_system(load_config(None, [f"model.backbone={tiny_bert}", "system=baselora", "model.max_length=32"]))
    system.save(tmp_path / "model")
    adapter = tmp_path / "model" / "adapter"
    state = load_file(str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(b"not really a pickle, but it must never be opened")
    assert state
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        load_system(tmp_path / "model")
    save_file(state, str(adapter / "adapter_model.safetensors"))


@pytest.mark.parametrize("field,value,needle", [
    ("response_pair", ("good  answer", "good answer\n"), r"identical \(up to whitespace\)"),
    ("chosen", "good \ud800 answer", "lone surrogate"),
    ("prompt", "\udfff", "lone surrogate"),
])
def test_records_no_model_can_learn_from_are_invalid(tmp_path, field, value, needle):
    rec = {"id": "1", "domain": "d", "prompt": "p", "chosen": "good", "rejected": "bad"}
    if field == "response_pair":
        rec["chosen"], rec["rejected"] = value
    else:
        rec[field] = value
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(rec) + "\n")  # json.dumps writes a lone surrogate as the escape \ud800
    with pytest.raises(InvalidRecord, match=needle) as e:
        load_pairs([str(path)])
    assert e.value.line == 1 and e.value.field == ("rejected" if field == "response_pair" else field)


@pytest.mark.parametrize("system", ["rodos", "arliss"])
def test_a_routed_system_on_one_domain_is_an_error_not_a_one_class_router(tmp_path, tiny_bert, system):
    from moerm.systems.base import FitContext

    built = build_system(load_config(None, [f"model.backbone={tiny_bert}", f"system={system}", "model.max_length=32"]))
    with pytest.raises(UserError, match="needs at least two"):
        built.fit(toy_pairs(8, seed=1, domain="only"), None, FitContext(tmp_path / "run", progress=False))
    assert not (tmp_path / "run" / "components").exists()  # refused before anything trained
