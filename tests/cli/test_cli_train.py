"""The CLI end to end on a tiny backbone: train, resume guard, eval (one run and seeds), info, score."""

import json
import math

import pytest
from typer.testing import CliRunner

from moerm.cli import app
from moerm.data.readers import write_jsonl

from conftest import toy_pairs

runner = CliRunner()


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    for dom, seed in (("alpha", 1), ("beta", 2)):
        write_jsonl(toy_pairs(40, seed=seed, domain=dom), d / dom / "train.jsonl")
        write_jsonl(toy_pairs(16, seed=seed + 10, domain=dom), d / dom / "test.jsonl")
    return d


def _train(tmp_path, data_dir, tiny_bert, out, *extra):
    return runner.invoke(app, ["train", "--system", "baseline", "--tuning", "full", "--backbone", tiny_bert,
                               "--data", str(data_dir), "--out", str(out), "--no-progress",
                               "--set", "train.lr=5e-4", "--set", "train.epochs=3", "--set", "train.batch_size=8",
                               "--set", "model.max_length=48", *extra])


def test_train_eval_info_score(tmp_path, data_dir, tiny_bert):
    run = tmp_path / "run"
    res = _train(tmp_path, data_dir, tiny_bert, run)
    assert res.exit_code == 0, res.output
    for f in ("config.yaml", "command.txt", "metrics.jsonl", "data.json", "train_summary.json", "model/system.json"):
        assert (run / f).exists(), f
    assert "moerm train" in (run / "command.txt").read_text()
    data_info = json.loads((run / "data.json").read_text())
    assert data_info["train_pairs"] == {"alpha": 40, "beta": 40} and data_info["eval_pairs"] == {"alpha": 16, "beta": 16}

    again = _train(tmp_path, data_dir, tiny_bert, run)
    assert again.exit_code == 1 and "--resume" in again.output

    res = runner.invoke(app, ["eval", str(run), "--data", str(data_dir)])
    assert res.exit_code == 0, res.output
    report = json.loads((run / "eval" / "eval.json").read_text())[str(run)]
    assert set(report["per_domain"]) == {"alpha", "beta"} and report["pairs"] == 32
    assert report["accuracy"] >= 0.8
    assert "macro average" in (run / "eval" / "eval.md").read_text()

    res = runner.invoke(app, ["info", str(run), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["total"]["params_trainable"] == info["total"]["params_total"] > 0
    assert info["components"]["backbone"]["bytes_on_disk"] > 0

    res = runner.invoke(app, ["score", str(run), "--prompt", "tell me", "--response", "a good answer"])
    assert res.exit_code == 0, res.output
    good = json.loads(res.output)["reward"]
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "x", "prompt": "tell me", "response": "a bad answer"}) + "\n")
    res = runner.invoke(app, ["score", str(run), "-i", str(inp), "-o", str(tmp_path / "out.jsonl")])
    assert res.exit_code == 0, res.output
    row = json.loads((tmp_path / "out.jsonl").read_text())
    assert row["id"] == "x" and row["reward"] < good


def test_seeds_are_aggregated(tmp_path, data_dir, tiny_bert):
    run = tmp_path / "seeds"
    res = _train(tmp_path, data_dir, tiny_bert, run, "--seeds", "1,2", "--set", "train.epochs=1")
    assert res.exit_code == 0, res.output
    assert (run / "seed-1" / "model").exists() and (run / "seed-2" / "model").exists()
    res = runner.invoke(app, ["eval", str(run), "--data", str(data_dir), "--json"])
    assert res.exit_code == 0, res.output
    agg = json.loads((run / "eval" / "eval.json").read_text())[str(run)]["aggregate"]
    assert agg["runs"] == 2 and set(agg["per_domain"]) == {"alpha", "beta"}
    runs = json.loads((run / "eval" / "eval.json").read_text())[str(run)]["runs"]
    accs = [r["accuracy"] for r in runs.values()]
    assert len(accs) == 2
    assert agg["accuracy"]["mean"] == pytest.approx(sum(accs) / 2)
    assert agg["accuracy"]["std"] == pytest.approx(abs(accs[0] - accs[1]) / math.sqrt(2))  # sample std of two
    # prompts beside pairs, and the 95% interval of the seed mean (prompts resampled within each domain)
    assert agg["per_domain"]["alpha"]["prompts"] >= 1 and agg["per_domain"]["alpha"]["pairs"] == 16
    assert agg["macro_accuracy_ci"]["low"] <= agg["macro_accuracy"]["mean"] <= agg["macro_accuracy_ci"]["high"]
    md = (run / "eval" / "eval.md").read_text()
    assert "| domain | pairs | prompts |" in md and "95% interval" in md


def test_invalid_training_data_is_reported_with_file_line_field(tmp_path, tiny_bert):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "1", "domain": "d", "prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                   + json.dumps({"id": "2", "domain": "d", "prompt": "p", "chosen": "same", "rejected": "same"}) + "\n")
    res = runner.invoke(app, ["train", "--backbone", tiny_bert, "--data", str(bad), "--out", str(tmp_path / "r"), "--no-progress"])
    assert res.exit_code == 1
    assert "bad.jsonl:2" in res.output and "rejected" in res.output


def test_resume_flag_continues_a_killed_run(tmp_path, data_dir, tiny_bert):
    from moerm.config import load_config
    from moerm.runs import train_run
    from moerm.train.trainer import TrainingInterrupted

    cfg = load_config(None, [f"model.backbone={tiny_bert}", "model.tuning=full", f"data.train=[{data_dir}]",
                             "train.epochs=2", "train.batch_size=8", "train.save_every=3", "model.max_length=48"])
    with pytest.raises(TrainingInterrupted):
        train_run(cfg, tmp_path / "r", progress=False, stop_after_steps=3)
    assert not (tmp_path / "r" / "model").exists()
    summary = train_run(cfg, tmp_path / "r", resume=True, progress=False)
    assert summary["metrics"]["train_steps"] == 20.0
    assert (tmp_path / "r" / "model" / "system.json").exists()


def _with_prefix(d, domain, n, seed, prefix):
    import dataclasses

    pairs = [dataclasses.replace(p, prompt=f"{prefix} {p.prompt}") for p in toy_pairs(n, seed=seed, domain=domain)]
    write_jsonl(pairs, d)


@pytest.mark.parametrize("system", ["more", "rodos", "arliss"])
def test_routed_and_moe_systems_end_to_end(tmp_path, tiny_bert, system):
    data = tmp_path / "data"
    for dom, seed, prefix in (("alpha", 1, "tell me about"), ("beta", 2, "please explain why")):
        _with_prefix(data / dom / "train.jsonl", dom, 40, seed, prefix)
        _with_prefix(data / dom / "test.jsonl", dom, 12, seed + 10, prefix)
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", "--system", system, "--backbone", tiny_bert, "--data", str(data), "--out", str(run),
                              "--no-progress", "--set", "train.lr=5e-4", "--set", "train.epochs=3",
                              "--set", "train.batch_size=8", "--set", "model.max_length=48",
                              "--set", "options.num_experts=4" if system == "more" else "components.router.train.epochs=15",
                              "--set", "options.top_k=2" if system == "more" else "components.router.train.lr=0.02"])
    assert res.exit_code == 0, res.output
    summary = json.loads((run / "train_summary.json").read_text())
    res = runner.invoke(app, ["eval", str(run), "--data", str(data)])
    assert res.exit_code == 0, res.output
    md = (run / "eval" / "eval.md").read_text()
    res = runner.invoke(app, ["score", str(run), "--prompt", "tell me about it", "--response", "a good answer"])
    assert res.exit_code == 0, res.output
    details = json.loads(res.output)["details"]
    res = runner.invoke(app, ["info", str(run)])
    assert res.exit_code == 0, res.output
    if system in ("rodos", "arliss"):
        assert set(summary["seconds_per_component"]) == {"rm:alpha", "rm:beta", "router"}
        assert "router accuracy" in md and details["routed_domain"] == "alpha" and "router_probs" in details
        assert "router" in res.output and ("rm:alpha" in res.output or "adapter:alpha" in res.output)
        _with_prefix(tmp_path / "gamma.jsonl", "gamma", 30, 7, "what is this")
        res = runner.invoke(app, ["add-domain", str(run), "--data", str(tmp_path / "gamma.jsonl"), "--no-progress"])
        assert res.exit_code == 0, res.output
        assert "added domain 'gamma'" in res.output
    else:
        assert "expert utilisation" in md and len(details["experts"]) == 2
        res = runner.invoke(app, ["add-domain", str(run), "--data", str(tmp_path / "data" / "alpha" / "train.jsonl")])
        assert res.exit_code == 1 and "cannot add a domain" in res.output
