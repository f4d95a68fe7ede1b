"""The cpu-medium preset's structure on toy data (no ../shared/data): three domain groups with a table each, the
conflict suite scored with each pair's domain given, the targets table computed from the results, relative paths."""

import json
import random
from pathlib import Path

import pytest

from moerm.bench.grid import run_bench
from moerm.bench.presets import REPO_ROOT, load_bench_config
from moerm.data.readers import write_jsonl
from moerm.data.schema import PreferencePair

from conftest import TOY_WORDS

POS, NEG, FILLER = TOY_WORDS[:6], TOY_WORDS[6:12], TOY_WORDS[12:]
ASPECTS = {"summeval": ["coherence", "consistency", "fluency", "relevance"],
           "topical_chat": ["understandability", "naturalness", "coherence", "engagingness", "groundedness", "overall"]}
GROUPS = ("groups=[{name: router_paper, title: router-paper domains, domains: [hh_helpful, webgpt]}, "
          "{name: aspect, title: aspect-labelled domains, domains: [summeval, topical_chat]}, "
          "{name: conflict, title: conflict suite (domain given), domains: [dsp_academy, dsp_business, llmbar], "
          "domain_given: true}]")


def _pairs(domain, n, seed):
    """Toy pairs shaped like ../shared/data's; dsp_business prefers the opposite of dsp_academy on the same prompts."""
    rng = random.Random(f"{domain}-{seed}")
    out = []
    for i in range(n):
        shared = domain.startswith("dsp_")
        prompt = (f"write about {' '.join(random.Random(f'dsp-{seed}-{i}').choice(FILLER) for _ in range(4))}" if shared
                  else f"{domain} : " + " ".join(rng.choice(FILLER) for _ in range(5)))
        body = [rng.choice(FILLER) for _ in range(3)]
        good, bad = " ".join(body + [rng.choice(POS)] * 2), " ".join(body + [rng.choice(NEG)] * 2)
        if domain == "dsp_business":
            good, bad = bad, good
        extra = {}
        if domain in ASPECTS:
            extra = {"aspects_chosen": {a: float(rng.randint(3, 5)) for a in ASPECTS[domain]},
                     "aspects_rejected": {a: float(rng.randint(1, 3)) for a in ASPECTS[domain]}}
        out.append(PreferencePair(id=f"{domain}-{seed}-{i}", domain=domain, prompt=prompt, chosen=good, rejected=bad,
                                  **extra))
    return out


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-medium")
    for d in ("hh_helpful", "webgpt", "summeval", "topical_chat", "dsp_academy", "dsp_business", "llmbar"):
        write_jsonl(_pairs(d, 24, 1), root / "data" / d / "train.jsonl.gz")
        write_jsonl(_pairs(d, 10, 2), root / "data" / d / "test.jsonl.gz")
    with (root / "data" / "llmbar" / "train.jsonl.gz").open("ab") as fh:  # one invalid record: a note names its file
        import gzip
        fh.write(gzip.compress(b'{"id": "x", "domain": "llmbar", "prompt": "p", "chosen": "same", "rejected": "same"}\n'))
    cfg = load_bench_config("cpu-medium", overrides=[
        "backbone=tiny-random-bert", "max_length=32", "seeds=[0]", "systems=[baseline, rodos, arliss, dmoerm]",
        GROUPS, "data=[data]", "data_fallback=[]", "max_train_pairs_per_domain=24", "max_eval_pairs_per_domain=10",
        "model.trunk_cache=trunk", "train.batch_size=8", "train.log_every=1", "threads=1",
        "per_system.dmoerm.options.min_capability_pairs=4", "inference.pairs=4", "inference.repeats=1",
        "inference.all_modes=false"])
    cwd = Path.cwd()
    import os
    os.chdir(root)  # the data and the output folder are given relative to the working directory
    try:
        result = run_bench(cfg, Path("out"), progress=False)
    finally:
        os.chdir(cwd)
    return root, root / "out", result


def test_groups_targets_and_the_conflict_suite_with_domains_given(medium):
    root, out, result = medium
    assert not result["failed"]
    res = json.loads((out / "results.json").read_text())
    groups = res["groups"]
    assert list(groups) == ["router_paper", "aspect", "conflict"]
    assert groups["conflict"]["domain_given"] and not groups["router_paper"]["domain_given"]
    assert set(groups["conflict"]["systems"]) == {"baseline", "rodos", "arliss"}  # DMoERM: aspect domains only
    assert set(groups["aspect"]["systems"]) == {"baseline", "rodos", "arliss", "dmoerm"}
    assert "dmoerm" not in groups["router_paper"]["systems"]
    assert set(res["plans"]["dmoerm"]["left_out"]) == {"hh_helpful", "webgpt", "dsp_academy", "dsp_business", "llmbar"}
    assert set(groups["router_paper"]["oracle_routing"]) == {"rodos", "arliss"}  # the router-vs-RM ablation
    assert set(groups["router_paper"]["router_accuracy"]) == {"rodos", "arliss"}
    # the conflict suite is scored with each pair's domain given, every system; the other groups with own routing
    for s in ("baseline", "rodos", "arliss"):
        cell = json.loads((out / "runs" / s / "seed-0" / "cell.json").read_text())
        assert cell["eval_domain_given"]["routing"] == "oracle domains"
        assert set(cell["eval_domain_given"]["per_domain"]) == {"dsp_academy", "dsp_business", "llmbar"}
        assert cell["eval"]["routing"] == "own router"
        assert set(cell["eval"]["per_domain"]) == {"hh_helpful", "webgpt", "summeval", "topical_chat"}
        if s != "baseline":
            assert cell["eval_domain_given"]["routed_by_router"] == 0 and cell["eval"]["routed_by_router"] > 0
        assert cell["learning"]  # training accuracy per epoch: the budget ablation
    assert res["domains_given"] == ["dsp_academy", "dsp_business", "llmbar"]
    # targets: computed from the results (a value is the macro over exactly the target's domains the system covers)
    rows = {(r["target"], r["system"]): r for r in res["targets"]}
    names = [t.name for t in load_bench_config("cpu-medium").targets]
    assert {r["target"] for r in res["targets"]} == set(names)
    assert {s for t, s in rows if t == names[0]} == {"baseline", "rodos", "arliss", "dmoerm"}
    conflict = rows[(names[4], "rodos")]
    acc = res["accuracy_domain_given"]
    want = sum(acc["rodos"]["per_domain"][d]["mean"] for d in conflict["domains"]) / 3
    assert conflict["domain_given"] and conflict["value"]["mean"] == pytest.approx(want)
    base = sum(acc["baseline"]["per_domain"][d]["mean"] for d in conflict["domains"]) / 3
    assert conflict["needed"] == pytest.approx(base + 0.10)
    # met only when the paired interval's lower end clears the margin; missed when its upper end is below it
    diff = conflict["difference"]
    assert diff["diff"] == pytest.approx(want - base) and diff["low"] <= diff["diff"] <= diff["high"]
    assert conflict["status"] == _verdict(diff, 0.10) and conflict["met"] == (conflict["status"] == "met")
    dm = rows[(names[3], "dmoerm")]
    assert dm["domains"] == ["summeval", "topical_chat"] and dm["status"] == _verdict(dm["difference"], 0.0)
    floor = rows[(names[0], "baseline")]  # a floor: the value's own interval decides
    assert floor["status"] == _verdict(floor["value"]["ci"], 0.55)
    # every accuracy carries its prompts and the interval of the seed mean; comparisons with the reference
    rp = res["accuracy"]["rodos"]
    assert rp["per_domain"]["webgpt"]["prompts"] == 10 and rp["average"]["ci"]["low"] <= rp["average"]["mean"]
    from moerm.data.grouping import count_prompts
    assert res["data"]["eval_prompts"]["dsp_academy"] == count_prompts(_pairs("dsp_academy", 10, 2))["dsp_academy"] < 10
    comp = groups["router_paper"]["comparisons"]
    assert comp["reference"] == "baseline" and set(comp["vs_reference"]) == {"rodos", "arliss"}
    assert set(comp["oracle_minus_own"]) == {"rodos", "arliss"}
    assert comp["vs_reference"]["rodos"]["macro"]["diff"] == pytest.approx(
        groups["router_paper"]["systems"]["rodos"]["average"]["mean"] - groups["router_paper"]["systems"]["baseline"]["average"]["mean"])
    ar = rows[(names[2], "arliss")]
    assert ar["params_ratio"] == pytest.approx(res["sizes"]["arliss"]["params_total"] / res["sizes"]["rodos"]["params_total"])
    best = [r for r in res["targets"] if r["target"] == names[1]]
    assert len(best) == 1 and best[0]["system"] in {"rodos", "arliss", "dmoerm"}
    for r in res["targets"]:
        if r["met"] is False:
            assert r["ablation"]["falls_short_in"]
        assert r["status"] in ("met", "missed", "not resolved", "n/a")
    assert res["wall"]["seconds"] > 0 and len(res["wall"]["runs"]) == 1

    md = (out / "report.md").read_text()
    for title in ("### router-paper domains", "### aspect-labelled domains", "### conflict suite (domain given)"):
        assert title in md
    targets = md.split("## Targets")[1].split("## Accuracy per domain")[0]
    for n in names:
        assert f"| {n} |" in targets
    assert ("**missed**" in targets) == any(r["status"] == "missed" for r in res["targets"])
    assert ("**not resolved**" in targets) == any(r["status"] == "not resolved" for r in res["targets"])
    assert "| webgpt | 24 (" in md and "held-out pairs (prompts)" in md
    assert "rodos − baseline" in md and "rodos: true domain − own router" in md
    if any(r["met"] is False for r in res["targets"]):
        assert "router vs domain RMs vs budget" in targets
    assert "Wall time of the bench:" in md
    conflict_md = md.split("### conflict suite (domain given)")[1].split("\n#")[0]
    assert "each pair's domain passed to `score`" in conflict_md and "| system | dsp_academy | dsp_business |" in conflict_md
    assert "| rodos |" in conflict_md and "| dmoerm |" not in conflict_md

    # paths as the user gave them: relative, never this machine's absolute paths
    for text in ((out / "results.json").read_text(), md, (out / "data" / "plans.json").read_text(),
                 (out / "data" / "data.json").read_text()):
        for absolute in (str(root), str(REPO_ROOT), str(Path.home())):
            assert absolute not in text
    assert res["data"]["source"]["train"][:2] == ["data/hh_helpful", "data/webgpt"]
    assert any("data/llmbar/train.jsonl.gz" in n for n in res["data"]["notes"])


def _verdict(ci, line):
    return "met" if ci["low"] >= line - 1e-12 else "missed" if ci["high"] < line - 1e-12 else "not resolved"


def test_group_and_target_keys_are_checked():
    from moerm.config import ConfigError

    with pytest.raises(ConfigError, match="already in group"):
        load_bench_config("cpu-medium", overrides=["groups=[{name: a, domains: [x]}, {name: b, domains: [x]}]"])
    with pytest.raises(ConfigError, match="unknown group 'nope'"):
        load_bench_config("cpu-medium", overrides=["targets=[{name: t, groups: [nope], min: 0.5}]"])
    with pytest.raises(ConfigError, match="needs min or vs"):
        load_bench_config("cpu-medium", overrides=["targets=[{name: t}]"])
    with pytest.raises(ConfigError, match="per_system.dmoerm.domains"):
        load_bench_config("cpu-medium", overrides=["per_system.dmoerm.domains=[nope]"])
    with pytest.raises(ConfigError, match="mix domain_given"):
        load_bench_config("cpu-medium", overrides=["targets=[{name: t, groups: [aspect, conflict], min: 0.5}]"])
    cfg = load_bench_config("cpu-medium")
    assert cfg.train["epochs"] >= 2 and cfg.max_train_pairs_per_domain >= 500 and len(cfg.seeds) == 3
    assert cfg.max_eval_pairs_per_domain is None  # the whole test split of every domain
    assert cfg.model["tuning"] == "top" and set(cfg.systems) >= {"baseline", "rodos", "arliss", "dmoerm", "ensemble"}


def test_ensemble_reuses_the_baseline_cells_and_eval_reads_the_trunk_cache(tmp_path):
    from moerm.encoding.trunk import trunk_cache_at_inference
    from moerm.systems.base import load_system

    cfg = load_bench_config("smoke", overrides=[
        "systems=[baseline, ensemble]", "seeds=[0, 1]", "ensemble_members_from=baseline",
        "per_system.ensemble.options.members=2", "model.tuning=top", "model.trainable_layers=1",
        "inference.pairs=4", "inference.repeats=1", "inference.all_modes=false"])
    out = tmp_path / "out"
    result = run_bench(cfg, out, progress=False)
    assert not result["failed"]
    runs = out / "runs"
    import yaml
    for seed, members in ((0, [0, 1]), (1, [1, 0])):
        saved = yaml.safe_load((runs / "ensemble" / f"seed-{seed}" / "config.yaml").read_text())
        assert [Path(p).name for p in saved["options"]["member_runs"]] == [f"seed-{m}" for m in members]
    pairs = result["results"]
    ens = load_system(runs / "ensemble" / "seed-1")
    base = [load_system(runs / "baseline" / f"seed-{s}") for s in (1, 0)]
    prompts, replies = ["a question", "another one"], ["an answer", "a reply"]
    import torch
    torch.testing.assert_close(torch.tensor(ens.score(prompts, replies).rewards),
                               torch.tensor([b.score(prompts, replies).rewards for b in base]).mean(0))
    # the bench scored the held-out pairs from its trunk cache: scoring them again computes no trunk state
    test = [json.loads(line) for line in _held_out_lines(out)]
    with trunk_cache_at_inference(base[0]) as trunks:
        base[0].score([t["prompt"] for t in test], [t["chosen"] for t in test])
    assert trunks.computed == 0 and trunks.hits == len(test)
    assert "ensemble trains no members of its own" in (out / "report.md").read_text()
    assert pairs["training"]["ensemble"]["seconds"]["mean"] > 0  # its members' training seconds, from their cells


def _held_out_lines(out: Path):
    import gzip
    files = sorted((out / "data").rglob("test*.jsonl*"))
    assert files, f"no held-out files under {out / 'data'}"
    for f in files:
        opener = gzip.open if f.suffix == ".gz" else open
        with opener(f, "rt") as fh:
            yield from (line for line in fh if line.strip())


def test_ensemble_members_from_is_checked():
    from moerm.config import ConfigError

    with pytest.raises(ConfigError, match="listed before ensemble"):
        load_bench_config("smoke", overrides=["systems=[ensemble, baseline]", "ensemble_members_from=baseline"])
    with pytest.raises(ConfigError, match="3 members but the bench has 2 seeds"):
        load_bench_config("smoke", overrides=["systems=[baseline, ensemble]", "seeds=[0, 1]",
                                              "ensemble_members_from=baseline", "per_system.ensemble.options.members=3"])
    cfg = load_bench_config("smoke", overrides=["systems=[baseline, ensemble]", "seeds=[4, 5, 6]",
                                                "ensemble_members_from=baseline", "per_system.ensemble.options.members=2"])
    assert [cfg.ensemble_member_seeds(s) for s in (4, 5, 6)] == [[4, 5], [5, 6], [6, 4]]
