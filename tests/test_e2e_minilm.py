"""End to end on the real embedded MiniLM and the shipped examples/data (slower: about a minute on 2 cores)."""

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


@pytest.mark.slow
def test_minilm_frozen_train_eval_score_on_examples(tmp_path):
    run = tmp_path / "run"
    res = runner.invoke(app, [
        "train", "--system", "baseline", "--tuning", "frozen", "--data", str(EXAMPLES), "--out", str(run),
        "--no-progress", "--set", "model.max_length=128", "--set", "data.max_train_pairs_per_domain=60",
        "--set", "data.max_eval_pairs_per_domain=20", "--set", "train.epochs=30", "--set", "train.batch_size=32",
        "--set", "train.head_lr=3e-3",
    ])
    assert res.exit_code == 0, res.output
    summary = json.loads((run / "train_summary.json").read_text())
    assert 0.0 <= summary["metrics"]["eval_accuracy"] <= 1.0
    data_info = json.loads((run / "data.json").read_text())
    assert len(data_info["train_pairs"]) == 8 and all(v == 60 for v in data_info["train_pairs"].values())

    # the head fits what it was trained on: chosen above rejected on most training pairs of the real data
    cfg = from_dict(RunConfig, yaml.safe_load((run / "config.yaml").read_text()))
    train_pairs, _, _ = load_run_data(cfg)
    system = load_system(run)
    report = evaluate_system(system, train_pairs)
    assert report["accuracy"] > 0.6, report
    assert report["margin_mean"] > 0

    res = runner.invoke(app, ["eval", str(run), "--data", str(EXAMPLES / "hh_harmless"), "--data", str(EXAMPLES / "llmbar")])
    assert res.exit_code == 0, res.output
    assert "hh_harmless" in res.output and "llmbar" in res.output

    res = runner.invoke(app, ["score", str(run), "--prompt", "Human: How do I boil an egg?",
                              "--response", "Put it in boiling water for about nine minutes."])
    assert res.exit_code == 0, res.output
    assert isinstance(json.loads(res.output)["reward"], float)
