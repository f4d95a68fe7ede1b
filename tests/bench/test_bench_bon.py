"""`moerm bench` with human-scored and subset-labelled held-out pairs: the Best-of-N section, table and plot, the
accuracy-per-subset table, and a rerun that scores nothing again."""

import json
import random
from pathlib import Path

import pytest

from moerm.bench import bon as bench_bon
from moerm.bench.bon import REWARDS_FILE, bench_best_of_n
from moerm.bench.grid import run_bench
from moerm.bench.presets import load_bench_config
from moerm.data.readers import write_jsonl
from moerm.data.schema import PreferencePair

from conftest import TOY_WORDS

PNG = b"\x89PNG\r\n\x1a\n"
POS, NEG, FILLER = TOY_WORDS[:6], TOY_WORDS[6:12], TOY_WORDS[12:]


def _scored(n_prompts, seed):
    """Domain `summ`: 4 candidates per prompt with 0..3 positive words, aspect scores = that count; all 6 pairs."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n_prompts):
        prompt = "summarize " + " ".join(rng.choice(FILLER) for _ in range(4)) + f" {seed}-{i}"
        body = [rng.choice(FILLER) for _ in range(3)]
        cands = [" ".join(body + [rng.choice(POS)] * k + [rng.choice(NEG)] * (3 - k)) for k in range(4)]
        for a in range(4):
            for b in range(a):
                pairs.append(PreferencePair(id=f"s{seed}-{i}-{a}-{b}", domain="summ", prompt=prompt, chosen=cands[a],
                                            rejected=cands[b], aspects_chosen={"x": float(a), "y": float(a)},
                                            aspects_rejected={"x": float(b), "y": float(b)}))
    return pairs


def _subsets(n, seed):
    """Domain `rm`: RM-Bench-like subsets `<source>/style<i>`, no human scores."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        body = [rng.choice(FILLER) for _ in range(3)]
        out.append(PreferencePair(id=f"r{seed}-{i}", domain="rm", prompt="chat " + " ".join(body),
                                  chosen=" ".join(body + [rng.choice(POS)]), rejected=" ".join(body + [rng.choice(NEG)]),
                                  subset=f"{'ab'[i % 2]}/style{i % 3}"))
    return out


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-bon")
    data = root / "mydata"
    write_jsonl(_scored(6, 1) + _subsets(36, 1), data / "train.jsonl")
    write_jsonl(_scored(4, 2) + _subsets(24, 2), data / "test.jsonl")
    cfg = load_bench_config("smoke", overrides=[
        "systems=[baseline]", "seeds=[0, 1]", "synthetic_data=false", f"data=[{data}]", "inference.pairs=4",
        "max_eval_pairs_per_domain=24",
        "inference.repeats=1"])
    out = root / "out"
    result = run_bench(cfg, out, progress=False)
    assert not result["failed"]
    return cfg, out, result


def test_best_of_n_section_table_and_plot(bench):
    cfg, out, result = bench
    res = json.loads((out / "results.json").read_text())
    bon = res["best_of_n"]
    assert set(bon["domains"]) == {"summ"} and "no human scores" in bon["skipped"]["rm"]
    rec = bon["domains"]["summ"]
    assert rec["prompts"] == 4 and rec["candidates"] == 16 and rec["n"] == [1, 2, 4] and rec["criterion"] == "mean"
    assert rec["oracle"]["mean"][-1] == 3.0 and rec["random"]["mean"] == [1.5] * 3
    base = rec["systems"]["baseline"]
    assert base["runs"] == 2 and base["gold"]["mean"][0] == pytest.approx(1.5)
    # the seed average, from the cached rewards of each cell
    cells = [json.loads((out / "runs" / "baseline" / f"seed-{s}" / REWARDS_FILE).read_text())["rewards"] for s in (0, 1)]
    from moerm.eval.bon import build_candidate_sets, bon_results
    from moerm.data.readers import load_pairs

    domains, _ = build_candidate_sets(load_pairs([out / "data" / "test.jsonl.gz"])[0])
    again = bon_results(domains, {"baseline": cells})["domains"]["summ"]["systems"]["baseline"]["gold"]["mean"]
    assert base["gold"]["mean"] == pytest.approx(again)
    assert res["plots"]["best_of_n"] == "plots/best_of_n.png"
    assert (out / "plots" / "best_of_n.png").read_bytes()[:8] == PNG
    md = (out / "report.md").read_text()
    assert "## Best-of-N against human gold" in md and "| N | prompts with ≥ N | random | oracle | baseline |" in md
    assert "#### summ: gold = mean of the 2 aspect scores (x, y)" in md and "![best_of_n](plots/best_of_n.png)" in md
    assert "- rm: no human scores" in md and "at most 24 pairs per domain" in bon["note"]


def test_accuracy_per_subset_in_results_and_report(bench):
    _, out, _ = bench
    res = json.loads((out / "results.json").read_text())
    subs = res["accuracy_per_subset"]["baseline"]
    assert set(subs["per_subset"]) == {"rm"}  # summ has no subsets
    rows = subs["per_subset"]["rm"]
    assert sorted(rows) == ["a/style0", "a/style1", "a/style2", "b/style0", "b/style1", "b/style2"]
    assert sum(v["pairs"] for v in rows.values()) == 24 and all(v["n"] == 2 for v in rows.values())
    cells = [json.loads((out / "runs" / "baseline" / f"seed-{s}" / "cell.json").read_text())["eval"] for s in (0, 1)]
    for name, v in rows.items():
        assert v["mean"] == pytest.approx(sum(c["per_subset"]["rm"][name]["accuracy"] for c in cells) / 2)
    groups = subs["per_subset_group"]["rm"]
    assert groups["*/style0"]["subsets"] == 2 and groups["a/*"]["subsets"] == 3
    md = (out / "report.md").read_text()
    assert "## Accuracy per subset" in md and f"| rm | a/style0 | {rows['a/style0']['pairs']} |" in md
    assert "| rm | _*/style0_ (2 subsets) |" in md


def test_rerun_scores_nothing_again_and_no_scores_means_no_section(bench, monkeypatch):
    cfg, out, _ = bench

    def refuse(*a, **k):
        raise AssertionError("a finished cell was scored again")

    monkeypatch.setattr(bench_bon, "score_candidates", refuse)
    before = json.loads((out / "results.json").read_text())["best_of_n"]
    result = run_bench(cfg, out, progress=False)
    assert not result["failed"] and result["results"]["best_of_n"]["domains"] == before["domains"]
    assert not result["results"]["best_of_n"]["errors"]
    assert bench_best_of_n(cfg, _subsets(4, 3), {"baseline": [Path(out / "runs" / "baseline" / "seed-0")]}, {}) is None
