"""End to end on the real embedded MiniLM and the shipped examples/data (the slowest test: MiniLM forwards on CPU)."""

import gzip
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from moerm.cli import app
from moerm.config import RunConfig, from_dict
from moerm.eval.metrics import evaluate_system
from moerm.runs import load_run_data
from moerm.systems import load_system

EXAMPLES = Path(__file__).parents[1] / "examples" / "data"
runner = CliRunner()
# Every MiniLM forward costs on CPU: a few real pairs per domain train, evaluate and score (each of the 8 domains).
TRAIN_PER_DOMAIN, EVAL_PER_DOMAIN, HELD_OUT = 24, 8, 30


@pytest.mark.slow
def test_minilm_frozen_train_eval_score_on_examples(tmp_path):
    run = tmp_path / "run"
    res = runner.invoke(app, [
        "train", "--system", "baseline", "--tuning", "frozen", "--data", str(EXAMPLES), "--out", str(run),
        "--no-progress", "--set", "model.max_length=128",
        "--set", f"data.max_train_pairs_per_domain={TRAIN_PER_DOMAIN}",
        "--set", f"data.max_eval_pairs_per_domain={EVAL_PER_DOMAIN}", "--set", "train.epochs=30",
        "--set", "train.batch_size=32", "--set", "train.head_lr=3e-3",
    ])
    assert res.exit_code == 0, res.output
    summary = json.loads((run / "train_summary.json").read_text())
    assert 0.0 <= summary["metrics"]["eval_accuracy"] <= 1.0
    data_info = json.loads((run / "data.json").read_text())
    assert len(data_info["train_pairs"]) == 8 and all(v == TRAIN_PER_DOMAIN for v in data_info["train_pairs"].values())

    # the head fits what it was trained on: chosen above rejected on most training pairs of the real data
    cfg = from_dict(RunConfig, yaml.safe_load((run / "config.yaml").read_text()))
    train_pairs, _, _ = load_run_data(cfg)
    assert len(train_pairs) == 8 * TRAIN_PER_DOMAIN
    system = load_system(run)
    report = evaluate_system(system, train_pairs)
    assert report["accuracy"] > 0.6, report
    assert report["margin_mean"] > 0

    # held-out: the first HELD_OUT shipped test pairs of two domains, as test files in folders named after them
    held_out = []
    for domain in ("hh_harmless", "llmbar"):
        with gzip.open(EXAMPLES / domain / "test.jsonl.gz", "rt", encoding="utf-8") as f:
            lines = [ln for ln in f if ln.strip()][:HELD_OUT]
        (tmp_path / "held-out" / domain).mkdir(parents=True)
        (tmp_path / "held-out" / domain / "test.jsonl").write_text("".join(lines), encoding="utf-8")
        held_out += ["--data", str(tmp_path / "held-out" / domain)]
    res = runner.invoke(app, ["eval", str(run), *held_out])
    assert res.exit_code == 0, res.output
    assert "hh_harmless" in res.output and "llmbar" in res.output
    (written,) = json.loads((run / "eval" / "eval.json").read_text()).values()
    assert written["pairs"] == 2 * HELD_OUT and set(written["per_domain"]) == {"hh_harmless", "llmbar"}

    res = runner.invoke(app, ["score", str(run), "--prompt", "Human: How do I boil an egg?",
                              "--response", "Put it in boiling water for about nine minutes."])
    assert res.exit_code == 0, res.output
    assert isinstance(json.loads(res.output)["reward"], float)
