"""`moerm info --estimate`: exact parameter counts from a config (no weights), and the per-device arithmetic of DDP
and FSDP checked by hand on a tiny BERT."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertConfig, BertModel
from typer.testing import CliRunner

from moerm.cli import app
from moerm.train.memory import GIB, ModelCounts, activation_bytes, count_backbone, estimate

CFG = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
           max_position_embeddings=64)


@pytest.fixture()
def bert_config(tmp_path):
    BertConfig(**CFG).save_pretrained(tmp_path)  # a config alone: the estimate reads no weights
    return tmp_path


def test_counts_are_exact(bert_config):
    torch.manual_seed(0)
    real = BertModel(BertConfig(**CFG))
    c = count_backbone(str(bert_config))
    assert c.total == c.trainable == sum(p.numel() for p in real.parameters())
    assert c.block == sum(p.numel() for p in real.encoder.layer[0].parameters()) and c.blocks == 2
    lora = count_backbone(str(bert_config), "lora", lora_r=4)
    assert lora.trainable == 2 * 2 * 4 * (32 + 32)  # query and value, 2 blocks, r*(in+out)
    assert lora.total == c.total + lora.trainable


def test_ddp_and_fsdp_by_hand():
    c = ModelCounts(total=1000, trainable=1000, block=100, blocks=8, hidden=16, heads=2)
    d = estimate(c, 4, 2, 10, fsdp=False)
    assert (d.weights, d.gradients, d.optimizer) == (4000, 4000, 8000)
    f = estimate(c, 4, 2, 10, fsdp=True)
    assert f.weights == 4000 / 4 + 2 * 100 * 4  # a shard plus two gathered blocks
    assert f.gradients == 4000 / 4 + 2 * 100 * 4 and f.optimizer == 8000 / 4
    assert d.activations == f.activations == 2 * 2 * 10 * 8 * (34 * 16 + 5 * 2 * 10) * 2  # fp32: twice the 16-bit
    assert activation_bytes(c, 2, 10, 32, checkpointing=True) < d.activations
    lora = ModelCounts(total=1000, trainable=10, block=100, blocks=8, hidden=16, heads=2)
    e = estimate(lora, 1, 1, 8, fsdp=False, weight_bytes=2)
    assert (e.weights, e.gradients, e.optimizer) == (4 * 10 + 2 * 990, 40, 80)


def test_cli_prints_both_columns(bert_config):
    res = CliRunner().invoke(app, ["info", "--estimate", str(bert_config), "--devices", "2", "--batch-size", "3",
                                   "--max-length", "16", "--json"])
    assert res.exit_code == 0, res.output
    p = json.loads(res.output)
    c = count_backbone(str(bert_config))
    assert p["parameters"] == c.total and p["devices"] == 2
    assert p["ddp"]["optimizer"] == pytest.approx(8 * c.total / GIB)
    assert p["fsdp"]["optimizer"] == pytest.approx(4 * c.total / GIB)
    table = CliRunner().invoke(app, ["info", "--estimate", str(bert_config)])
    assert table.exit_code == 0 and "DDP" in table.output and "FSDP" in table.output
    bad = CliRunner().invoke(app, ["info", "--estimate", str(bert_config), "--tuning", "top"])
    assert bad.exit_code == 1 and "--tuning must be full or lora" in bad.output
