"""benchmarks/arliss_router.py on a tiny ARLISS run: its saved-router row is what `moerm eval` gives, and a frozen
router after one block routes the toy domains (their prompts' first words tell them apart)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import load_benchmark
from moerm.config import ModelConfig, RunConfig, TrainConfig
from moerm.data.readers import write_jsonl
from moerm.eval.metrics import evaluate_system
from moerm.systems import load_system
from moerm.systems.arliss import ARLISSSystem
from moerm.systems.base import FitContext

from test_routing_variants import domain_pairs

def _load_script():
    return load_benchmark("arliss_router")


def test_rows_match_eval_and_a_one_block_router_routes(tiny_bert, tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    system = ARLISSSystem(RunConfig(system="arliss", model=ModelConfig(backbone=tiny_bert, max_length=40),
                                    train=TrainConfig(lr=5e-3, batch_size=8, epochs=4, save_every=0),
                                    components={"router": {"train": {"lr": 1e-2, "epochs": 6}}}))
    system.fit(domain_pairs("alpha", 48, 1) + domain_pairs("beta", 48, 2), None,
               FitContext(tmp_path / "run", progress=False))
    system.save(tmp_path / "model")
    test = domain_pairs("alpha", 16, 3) + domain_pairs("beta", 16, 4)
    write_jsonl(test[:16], tmp_path / "data" / "alpha" / "test.jsonl")
    write_jsonl(test[16:], tmp_path / "data" / "beta" / "test.jsonl")

    out = tmp_path / "rows.json"
    monkeypatch.setattr(sys, "argv", ["arliss_router.py", str(tmp_path / "model"), "--data", str(tmp_path / "data"),
                                      "--layers", "1", "--router-epochs", "30", "--out", str(out)])
    _load_script().main()
    rows = json.loads(out.read_text())["rows"]
    assert [r["router"] for r in rows] == ["saved (lora)", "frozen"] and rows[1]["blocks"] == 1
    assert "| frozen | 1 of 2 |" in capsys.readouterr().out
    loaded = load_system(tmp_path / "model")
    report = evaluate_system(loaded, test)
    assert rows[0]["macro_accuracy"] == pytest.approx(report["macro_accuracy"], abs=1e-9)
    assert rows[1]["router_accuracy"] >= 0.9
