"""A system registered later runs through `moerm bench` with no bench edit: its extra inference mode gets its own
row, its bench plan restricts its data (with the options it adds), and the report and results.json show it beside
the others. The bench records data paths as the user gave them, never this machine's absolute paths."""

import json
import os
from pathlib import Path

import pytest
import yaml

from moerm.bench.data import synthetic_pairs
from moerm.bench.grid import run_bench
from moerm.bench.presets import all_systems, load_bench_config
from moerm.data.readers import write_jsonl
from moerm.systems.base import REGISTRY, BenchPlan
from moerm.systems.more import MoRESystem

KEEP = ("chat", "qa")


class TwiceMoRE(MoRESystem):
    """MoRE with a second inference mode (scores twice) and a plan that keeps two domains and sets an option."""

    name = "twicemore"
    inference_modes = ("default", "twice")

    def score(self, prompts, responses, domains=None, batch_size=32, mode=None):
        if self.check_mode(mode) == "twice":
            super().score(prompts, responses, domains, batch_size)
        return super().score(prompts, responses, domains, batch_size)

    @classmethod
    def bench_plan(cls, options, train, test, seeds, out_dir):
        return BenchPlan(train=[p for p in train if p.domain in KEEP], test=[p for p in test if p.domain in KEEP],
                         options={"num_experts": 2}, left_out={"summary": "twicemore keeps chat and qa"},
                         report=["Keeps chat and qa (a test plan)."], info={"seeds": list(seeds)})


@pytest.fixture
def twicemore():
    REGISTRY[TwiceMoRE.name] = TwiceMoRE
    yield TwiceMoRE
    del REGISTRY[TwiceMoRE.name]


def test_a_registered_system_runs_through_the_bench_unedited(twicemore, tmp_path, monkeypatch):
    assert all_systems()[-1] == "twicemore"  # the default grid takes it from the registry
    monkeypatch.chdir(tmp_path)  # relative data and output paths, as a user types them
    data = Path("mydata")
    write_jsonl(synthetic_pairs(32, 0, "train"), data / "train.jsonl")
    write_jsonl(synthetic_pairs(8, 0, "test"), data / "test.jsonl")
    cfg = load_bench_config("smoke", overrides=[
        "systems=[baseline, twicemore]", "seeds=[0]", "synthetic_data=false", "data=[mydata]", "inference.pairs=4",
        "inference.repeats=1", "inference.all_modes=true"])
    result = run_bench(cfg, Path("out"), progress=False)
    assert not result["failed"]
    out = tmp_path / "out"
    res = json.loads((out / "results.json").read_text())

    # the plan: its own files, its options in the run config, its domains only
    plan = res["plans"]["twicemore"]
    assert set(res["plans"]) == {"twicemore"} and plan["status"] == "ok" and plan["domains"] == ["chat", "qa"]
    assert plan["left_out"] == {"summary": "twicemore keeps chat and qa"} and plan["info"] == {"seeds": [0]}
    assert plan["train"] == "data/twicemore/train.jsonl.gz" and (out / plan["test"]).exists()
    run_cfg = yaml.safe_load((out / "runs" / "twicemore" / "seed-0" / "config.yaml").read_text())
    assert run_cfg["options"]["num_experts"] == 2 and run_cfg["data"]["train"][0].endswith("twicemore/train.jsonl.gz")
    assert set(res["accuracy"]["twicemore"]["per_domain"]) == {"chat", "qa"}
    assert set(res["accuracy"]["baseline"]["per_domain"]) == {"chat", "qa", "summary"}
    assert set(res["accuracy_on_plan_domains"]["twicemore"]["systems"]) == {"baseline", "twicemore"}
    assert len(next(iter(res["expert_utilisation"]["twicemore"].values()))) <= 2  # the plan's 2 experts
    # a row per inference mode
    rows = res["inference"]["rows"]
    assert list(rows) == ["baseline", "twicemore", "twicemore (twice)"]
    assert rows["twicemore (twice)"]["mode"] == "twice" and rows["twicemore"]["mode"] == "default"

    md = (out / "report.md").read_text()
    assert "#### twicemore" in md and "Keeps chat and qa (a test plan)." in md
    assert "- summary: twicemore keeps chat and qa" in md
    assert "Average over twicemore's domains only (chat, qa" in md and "| twicemore (twice) | twice |" in md
    assert "twicemore (2 of 3 domains)" in md

    # data paths as given (relative); no absolute path of this machine anywhere in results.json or report.md
    assert res["data"]["source"] == {"train": ["mydata"], "eval": ["mydata"]}
    assert res["cells"] == {"baseline/seed-0": "runs/baseline/seed-0", "twicemore/seed-0": "runs/twicemore/seed-0"}
    assert res["plots"]["pairs_per_second"] == "plots/pairs_per_second.png"
    assert res["sizes"]["twicemore"]["backbone"] == "tiny-random-bert"
    assert "Training data: mydata; held-out: mydata." in md
    for text in ((out / "results.json").read_text(), md):
        for absolute in {str(tmp_path), str(tmp_path.resolve()), os.path.realpath(tmp_path)}:
            assert absolute not in text


def test_a_plan_can_skip_its_system_with_the_reason(twicemore, tmp_path, monkeypatch):
    monkeypatch.setattr(TwiceMoRE, "bench_plan", classmethod(lambda cls, *a: BenchPlan(skipped="nothing it can use")))
    cfg = load_bench_config("smoke", overrides=["systems=[baseline, twicemore]", "seeds=[0]", "inference.pairs=2",
                                                "inference.repeats=1"])
    result = run_bench(cfg, tmp_path / "out", progress=False)
    res = result["results"]
    assert not result["failed"] and res["skipped"] == {"twicemore": "nothing it can use"}
    assert res["systems"]["twicemore"] == {"status": "skipped", "seeds": [], "reason": "nothing it can use"}
    assert list(res["accuracy"]) == ["baseline"] and not (tmp_path / "out" / "runs" / "twicemore").exists()
    assert "twicemore skipped: nothing it can use." in (tmp_path / "out" / "report.md").read_text()
