"""`moerm bench` on the smoke preset (tiny random BERT, synthetic data): every system once, resume, reports, errors."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from moerm.bench import grid as grid_mod
from moerm.bench.data import synthetic_pairs
from moerm.bench.grid import check_bench_folder, run_bench
from moerm.bench.measure import inference_batch
from moerm.bench.presets import all_systems, load_bench_config
from moerm.bench.report import plans_markdown
from moerm.cli import app
from moerm.config import ConfigError
from moerm.systems.dmoerm import DMoERMSystem
from moerm.train.trainer import TrainingInterrupted

PNG = b"\x89PNG\r\n\x1a\n"


def _yaml(tmp_path, text):
    path = tmp_path / "my-bench.yaml"
    path.write_text(text)
    return path
# one seed and a tiny inference batch keep the grid fast; every inference mode on so every inference row is covered;
# DMoERM's tasks cover two of the three domains, as on real data where only some domains carry aspect scores
SMOKE = ["seeds=[0]", "inference.pairs=4", "inference.repeats=1", "inference.all_modes=true",
         "per_system.dmoerm.options.tasks={assist: {domains: [qa, chat], capabilities: [helpfulness, clarity]}}"]
SYSTEMS = ["baseline", "baselora", "more", "rodos", "arliss", "dmoerm"]  # the smoke preset's


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "smoke"
    cfg = load_bench_config("smoke", overrides=SMOKE)
    result = run_bench(cfg, out, progress=False)
    return cfg, out, result


def _mtimes(out):
    return {str(p.relative_to(out / "runs")): p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")}


def test_every_system_runs_and_is_reported(smoke):
    cfg, out, result = smoke
    assert not result["failed"]
    res = json.loads((out / "results.json").read_text())
    assert set(res["accuracy"]) == set(SYSTEMS) and res["domains"] == ["chat", "qa", "summary"]
    for s in SYSTEMS:
        acc = res["accuracy"][s]
        assert set(acc["average"]) >= {"mean", "std", "n"} and acc["average"]["n"] == 1
        assert set(acc["per_domain"]) == ({"chat", "qa"} if s == "dmoerm" else {"chat", "qa", "summary"})
        assert {"mean", "std"} <= set(acc["per_domain"]["qa"])
        size = res["sizes"][s]
        assert size["params_total"] > 0 and size["bytes_on_disk"] > 0 and 0 < size["params_trained"] <= size["params_total"]
        assert res["training"][s]["seconds_per_epoch"]["mean"] > 0
        assert (out / "runs" / s / "seed-0" / "cell.json").exists()
    # LoRA systems train a sliver of their parameters; RODOS holds one full RM per domain (+ the router)
    assert res["sizes"]["baselora"]["params_trained"] < 0.05 * res["sizes"]["baselora"]["params_total"]
    assert res["sizes"]["rodos"]["params_pct_of_baseline"] > 300
    assert {"rm:chat", "rm:qa", "rm:summary", "router"} <= set(res["training"]["rodos"]["components"])
    rows = res["inference"]["rows"]
    assert cfg.systems == SYSTEMS
    # each system in its default mode, then (inference.all_modes) a row per other mode of its inference_modes
    assert list(rows) == ["baseline", "baselora", "more", "rodos", "arliss", "arliss (switch)", "dmoerm",
                          "dmoerm (sequential)"]
    assert rows["arliss"]["mode"] == "batched" and rows["arliss (switch)"]["mode"] == "switch"
    assert rows["baseline"]["time_vs_baseline"] == 1.0 and all(r["pairs_per_second"] > 0 for r in rows.values())
    # routers: accuracy and a confusion matrix with every held-out chosen reply counted once
    for s in ("rodos", "arliss"):
        r = res["routing"][s]
        assert 0 <= r["router_accuracy"]["mean"] <= 1 and sum(map(sum, (v.values() for v in r["confusion"].values()))) == 48
    assert "task_router_accuracy" in res["routing"]["dmoerm"]
    assert set(res["expert_utilisation"]["more"]) == {"chat", "qa", "summary"}
    caps = res["capability_accuracy"]["dmoerm"]
    assert set(caps) == {"chat", "qa"} and set(caps["qa"]) == {"helpfulness", "clarity"}
    assert set(res["per_route"]) == {"dmoerm"} and set(res["per_route"]["dmoerm"]) == {"assist"}
    plan = res["plans"]["dmoerm"]  # DMoERM's bench plan: its tasks restricted to the aspect-labelled domains
    assert plan["status"] == "ok" and plan["domains"] == ["chat", "qa"] and set(plan["left_out"]) == {"summary"}
    assert plan["train"] == "data/dmoerm/train.jsonl.gz" and (out / plan["test"]).exists()
    assert set(res["plans"]) == {"dmoerm"}  # the other systems train on the shared pairs
    assert set(res["accuracy"]["dmoerm"]["per_domain"]) == {"chat", "qa"}
    assert set(res["accuracy_oracle_routing"]) == {"rodos", "arliss", "dmoerm"}  # smoke: oracle_routing on
    sub = res["accuracy_on_plan_domains"]["dmoerm"]
    assert sub["domains"] == ["chat", "qa"] and set(sub["systems"]) == set(SYSTEMS)
    # checkpoints pruned after each cell; the trained-parameter count survives in params_trained.json
    assert not list((out / "runs").rglob("checkpoints"))

    md = (out / "report.md").read_text()
    acc_table = md.split("## Accuracy per domain")[1].split("## Size")[0]
    size_table = md.split("## Size and training cost")[1].split("## Inference")[0]
    for s in SYSTEMS:
        assert f"| {s} | " in acc_table and f"| {s} | " in size_table
    assert "| arliss (switch) |" in md and "true \\ routed" in md and "domain \\ expert" in md
    assert "| qa | helpfulness |" in md and "¹ average over the domains it covers only: dmoerm (2 of 3" in md
    assert "Average over dmoerm's domains only (chat, qa" in md and "With oracle routing" in md
    assert "its bench plan left out (summary)" in md and "- summary: in none of the tasks of options.tasks" in md
    assert "| dmoerm (sequential) | sequential |" in md and "| assist | 32 |" in md  # per route: qa + chat pairs
    for name in ("accuracy_per_domain", "accuracy_vs_params", "pairs_per_second"):
        png = out / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5000
        assert f"plots/{name}.png" in md


def test_cli_reruns_nothing_and_fails_on_bad_keys(smoke, monkeypatch):
    cfg, out, _ = smoke
    before = _mtimes(out)
    calls = []
    monkeypatch.setattr(grid_mod, "train_run", lambda *a, **k: calls.append(a))
    args = ["bench", "--preset", "smoke", "--out", str(out), "--seeds", "0", "--no-progress"]
    res = CliRunner().invoke(app, args + [a for s in SMOKE[1:] for a in ("--set", s)])
    assert res.exit_code == 0, res.output
    assert "report.md" in res.output and not calls and _mtimes(out) == before
    res = CliRunner().invoke(app, args + ["--set", "trian.lr=1"])
    assert res.exit_code == 1 and "trian" in res.output
    res = CliRunner().invoke(app, args + ["--set", "max_length=40"])  # another budget: refused, names the key
    assert res.exit_code == 1 and "max_length" in res.output


def test_resume_redoes_only_the_missing_cells(smoke, monkeypatch):
    cfg, out, _ = smoke
    trained = []
    real = grid_mod.train_run
    monkeypatch.setattr(grid_mod, "train_run", lambda cfg_, d, **k: trained.append(d) or real(cfg_, d, **k))
    before = _mtimes(out)
    # 1. a lost cell.json: the finished training is kept, the cell is only evaluated again
    (out / "runs" / "baselora" / "seed-0" / "cell.json").unlink()
    # 2. a lost run folder: that cell trains again
    shutil.rmtree(out / "runs" / "more" / "seed-0")
    result = run_bench(cfg, out, progress=False)
    assert not result["failed"]
    assert trained == [out / "runs" / "more" / "seed-0"]
    after = _mtimes(out)
    changed = {k for k in after if after[k] != before.get(k)}
    assert {"baselora/seed-0/cell.json", "more/seed-0/cell.json", "more/seed-0/train_summary.json"} <= changed
    assert all(k.startswith("more/seed-0/") or k == "baselora/seed-0/cell.json" for k in changed), changed
    assert after["baselora/seed-0/train_summary.json"] == before["baselora/seed-0/train_summary.json"]
    res = json.loads((out / "results.json").read_text())
    assert set(res["accuracy"]) == set(SYSTEMS)


def test_killed_training_resumes_from_its_checkpoints(tmp_path):
    cfg = load_bench_config("smoke", overrides=["systems=more", "seeds=[0]", "train.save_every=1", "train.epochs=2",
                                                "inference.pairs=2", "inference.repeats=1"])
    out = tmp_path / "bench"
    with pytest.raises(TrainingInterrupted):
        run_bench(cfg, out, progress=False, stop_after_steps=2)
    cell = out / "runs" / "more" / "seed-0"
    assert not (cell / "cell.json").exists() and list(cell.rglob("step-*"))
    result = run_bench(cfg, out, progress=True)
    data = json.loads((cell / "cell.json").read_text())
    assert data["resumed_training"] and not result["failed"]
    steps = [json.loads(ln)["step"] for ln in (cell / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 12  # 96 pairs / batch 16 x 2 epochs, each logged step once
    assert "| more |" in (out / "report.md").read_text()


def test_config_errors_name_the_key(tmp_path):
    cases = {
        "trian.lr=1e-4": "trian",
        "train.lrr=1e-4": "train.lrr",
        "train.lr=fast": "train.lr",
        "systems=baseline,nosuch": r"systems\[1\]",
        "per_system.rodos.options.router_epoch=3": "per_system.rodos.options.router_epoch",
        "per_system.rodos.modle.lora_r=3": "per_system.rodos.modle",
        "per_system.arliss.options.inference=fast": "per_system.arliss.options",
        "per_system.rodos.train.seed=3": "per_system.rodos.train.seed",
        "inference.repeats=0": "inference.repeats",
        "inference.repaets=2": "inference.repaets",
        "model.backbone=x": "backbone",
        "max_train_pairs_per_domain=0": "max_train_pairs_per_domain",
        # keys of older bench configs say where their settings moved
        "dmoerm_tasks={t: {domains: [qa]}}": "dmoerm_tasks has moved: set per_system.dmoerm.options.tasks",
        "dmoerm_tasks_file=x.yaml": "dmoerm_tasks_file has moved: set per_system.dmoerm.options.tasks_file",
        "inference.arliss_switch=true": "inference.arliss_switch has moved: set inference.all_modes",
    }
    for override, key in cases.items():
        with pytest.raises(ConfigError, match=key):
            load_bench_config("smoke", overrides=[override])
    with pytest.raises(ConfigError, match="presets: smoke, cpu-small, cpu-medium, paper"):
        load_bench_config("nosuch")
    cfg = load_bench_config("smoke", overrides=["seeds=0,1", "systems=baseline,rodos"])
    assert cfg.seeds == [0, 1] and cfg.systems == ["baseline", "rodos"]
    for preset in ("cpu-small", "paper"):  # the presets list their systems; every one is registered
        cfg_p = load_bench_config(preset)
        assert cfg_p.systems == SYSTEMS and set(cfg_p.systems) <= set(all_systems()) and cfg_p.inference.all_modes
        assert cfg_p.per_system["dmoerm"]["options"]["tasks_file"] == "configs/tasks/aspect-domains.yaml"
    assert all_systems()[:6] == SYSTEMS and "ensemble" in all_systems()  # registration order
    assert load_bench_config(path=_yaml(tmp_path, "seeds: [0]")).systems == all_systems()  # no list: the registry
    check_bench_folder(cfg, tmp_path)
    check_bench_folder(load_bench_config("smoke", overrides=["seeds=[5]", "inference.repeats=9"]), tmp_path)  # same cells
    with pytest.raises(ConfigError, match="max_length, train"):
        check_bench_folder(load_bench_config("smoke", overrides=["max_length=40", "train.lr=0.5"]), tmp_path)
    old = tmp_path / "old"  # a folder of an older bench, with a key that has moved
    old.mkdir()
    (old / "bench.yaml").write_text(cfg.to_yaml() + "dmoerm_tasks_file: configs/tasks/aspect-domains.yaml\n")
    with pytest.raises(ConfigError, match="older moerm.*per_system.dmoerm.options.tasks_file"):
        check_bench_folder(cfg, old)


def test_dmoerm_plan_keeps_labelled_domains_or_says_why_it_skips(tmp_path):
    cfg = load_bench_config("smoke", overrides=["seeds=[0,1]"])
    opts = cfg.per_system["dmoerm"]["options"]
    train, test = synthetic_pairs(32, 0, "train"), synthetic_pairs(8, 0, "test")
    plan = DMoERMSystem.bench_plan(opts, train, test, cfg.seeds, tmp_path)
    assert plan is not None and plan.skipped is None and not plan.left_out
    assert sorted({p.domain for p in plan.train}) == ["chat", "qa", "summary"] and len(plan.test) == len(test)
    assert plan.options == {"tasks": {"assist": {"domains": ["qa", "chat"], "capabilities": ["helpfulness", "clarity"]},
                                      "summarise": {"domains": ["summary"], "capabilities": ["helpfulness", "clarity"]}},
                            "tasks_file": None}
    # no aspect scores: every capability falls short, DMoERM is skipped with the reason
    bare = [type(p)(p.id, p.domain, p.prompt, p.chosen, p.rejected) for p in train]
    plan = DMoERMSystem.bench_plan(opts, bare, test, cfg.seeds, tmp_path)
    assert plan.skipped and "no aspect labels" in plan.skipped
    assert any("helpfulness has 0 aspect-labelled pairs" in d for d in plan.info["dropped"])
    rec = {"status": "skipped", "reason": plan.skipped, "report": plan.report}
    assert "dmoerm skipped: the data has no aspect labels" in plans_markdown({"plans": {"dmoerm": rec}})
    # a task whose domains are absent is dropped, the rest is kept
    cfg = load_bench_config("smoke", overrides=["per_system.dmoerm.options.tasks.other={domains: [zzz], capabilities: [clarity]}"])
    plan = DMoERMSystem.bench_plan(cfg.per_system["dmoerm"]["options"], train, test, cfg.seeds, tmp_path)
    assert plan.skipped is None and "other" not in plan.options["tasks"]
    assert any("task other: none of its domains" in d for d in plan.info["dropped"])
    # bad or missing tasks fail before anything trains, naming DMoERM's own option
    tasks = "per_system.dmoerm.options.tasks"
    for overrides, key in (([f"{tasks}={{t: {{domains: [qa]}}}}"], "per_system.dmoerm: options.tasks.t.capabilities"),
                           ([f"{tasks}=null"], "per_system.dmoerm: options.tasks_file"),
                           ([f"{tasks}=null", f"{tasks}_file=nosuch.yaml"], "nosuch.yaml does not exist")):
        cfg = load_bench_config("smoke", overrides=["systems=baseline,dmoerm", *overrides])
        with pytest.raises(ConfigError, match=key):
            grid_mod.prepare(cfg, tmp_path / "bad")


def test_inference_batch_mixes_domains_evenly():
    pairs = synthetic_pairs(10, 0, "test")
    batch = inference_batch(pairs, 9, seed=0)
    assert len(batch) == 9 and {p.domain for p in batch} == {"chat", "qa", "summary"}
    assert sorted(p.domain for p in batch).count("qa") == 3
    assert [p.id for p in batch] == [p.id for p in inference_batch(pairs, 9, seed=0)]
    assert len(inference_batch(pairs, 1000, seed=0)) == 30
