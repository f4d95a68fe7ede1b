"""Best-of-N against human gold, by hand: candidate sets rebuilt from pairs, exact expectations, random and oracle
curves, a perfect RM on the oracle, bootstrap intervals, skipped domains and the errors that name the field."""

import itertools
import json
import math
from statistics import correlation, mean

import numpy as np
import pytest

from moerm.data.schema import PreferencePair
from moerm.errors import UserError
from moerm.eval.bon import (
    bon_markdown, bon_results, build_candidate_sets, expected_pick, n_grid, plot_bon, prompt_draws, score_candidates,
)
from moerm.systems.base import ScoreOutput

PNG = b"\x89PNG\r\n\x1a\n"


class Fake:
    """A hand-built reward system: reward = a table lookup by response text (default: its length)."""

    name = "fake"

    def __init__(self, table=None):
        self.table = table or {}
        self.calls = 0

    def score(self, prompts, responses, domains=None, batch_size=32):
        self.calls += 1
        return ScoreOutput([float(self.table.get(r, len(r))) for r in responses], [{} for _ in responses])


def all_pairs(domain, prompt, cands, aspects, start=0):
    """Every pair of candidates whose gold differs, the better one chosen (how SOURCES.md formed summeval's)."""
    out = []
    for i, (a, b) in enumerate(itertools.combinations(cands, 2)):
        if aspects[a] == aspects[b]:
            continue
        hi, lo = (a, b) if mean(aspects[a].values()) > mean(aspects[b].values()) else (b, a)
        out.append(PreferencePair(id=f"{domain}-{start + i}", domain=domain, prompt=prompt, chosen=hi, rejected=lo,
                                  aspects_chosen=aspects[hi], aspects_rejected=aspects[lo]))
    return out


# 4 candidates of one prompt, 2 aspects each; gold (the mean) 4.5, 3.0, 2.0, 1.0
ASPECTS = {"aaaa": {"coh": 5.0, "flu": 4.0}, "bbb": {"coh": 3.0, "flu": 3.0}, "cc": {"coh": 2.0, "flu": 2.0},
           "d": {"coh": 1.0, "flu": 1.0}}
GOLD = {"aaaa": 4.5, "bbb": 3.0, "cc": 2.0, "d": 1.0}


def summ_pairs():
    return all_pairs("summ", "article one", list(ASPECTS), ASPECTS)


def test_four_candidates_give_six_pairs_and_back_four_candidates_with_their_gold():
    pairs = summ_pairs()
    assert len(pairs) == 6
    domains, skipped = build_candidate_sets(pairs)
    assert skipped == {}
    ds = domains["summ"]
    assert len(ds.sets) == 1 and ds.pairs == 6 and ds.pairs_scored == 6 and ds.pair_agreement == 1.0
    cs = ds.sets[0]
    assert sorted(cs.responses) == sorted(GOLD)  # deduplicated by text: 4 candidates, not 12 sides
    assert {r: g for r, g in zip(cs.responses, cs.gold)} == GOLD
    assert ds.criterion == "mean" and "coh, flu" in ds.criterion_text and ds.conflicts == 0


def test_known_domains_use_their_pairing_criterion_and_others_can_be_chosen():
    # topical_chat was paired by `overall`: the mean of its 6 aspects would be another (and wrong) gold
    tc = {"x": {"overall": 5.0, "understandability": 0.0}, "y": {"overall": 2.0, "understandability": 1.0}}
    pairs = [PreferencePair(id="t0", domain="topical_chat", prompt="ctx", chosen="x", rejected="y",
                            aspects_chosen=tc["x"], aspects_rejected=tc["y"])]
    ds = build_candidate_sets(pairs)[0]["topical_chat"]
    assert ds.criterion == "overall" and dict(zip(ds.sets[0].responses, ds.sets[0].gold)) == {"x": 5.0, "y": 2.0}
    # another aspect as the gold: the pair then disagrees with it (agreement 0%)
    ds = build_candidate_sets(pairs, {"topical_chat": "understandability"})[0]["topical_chat"]
    assert ds.sets[0].gold == [0.0, 1.0] and ds.pair_agreement == 0.0
    with pytest.raises(UserError, match="pair 't0'.*aspects_chosen has no aspect 'quality'"):
        build_candidate_sets(pairs, {"topical_chat": "quality"})
    with pytest.raises(UserError, match="'nowhere', which is not in the data"):
        build_candidate_sets(pairs, {"nowhere": "mean"})


def test_a_text_scored_differently_in_two_pairs_gets_the_mean_and_is_counted():
    # "same" was written by two systems with different human scores: one candidate (one RM score), gold averaged
    pairs = [PreferencePair(id="0", domain="summ", prompt="p", chosen="same", rejected="low",
                            aspects_chosen={"a": 4.0}, aspects_rejected={"a": 1.0}),
             PreferencePair(id="1", domain="summ", prompt="p", chosen="high", rejected="same",
                            aspects_chosen={"a": 5.0}, aspects_rejected={"a": 3.0}),
             PreferencePair(id="2", domain="summ", prompt="p", chosen="same", rejected="low",
                            aspects_chosen={"a": 4.0}, aspects_rejected={"a": 1.0})]  # a repeat is no conflict
    ds = build_candidate_sets(pairs)[0]["summ"]
    assert dict(zip(ds.sets[0].responses, ds.sets[0].gold)) == {"same": 3.5, "low": 1.0, "high": 5.0}
    assert ds.conflicts == 1


def test_domains_without_scores_are_skipped_and_mixed_aspects_are_refused():
    plain = PreferencePair(id="h0", domain="chat", prompt="p", chosen="a", rejected="b")
    domains, skipped = build_candidate_sets(summ_pairs() + [plain])
    assert set(domains) == {"summ"} and "no human scores" in skipped["chat"] and "1 pairs" in skipped["chat"]
    # a single scored pair per prompt where one side lacks scores: no set of two scored candidates
    half = PreferencePair(id="h1", domain="half", prompt="p", chosen="a", rejected="b", aspects_chosen={"x": 1.0})
    assert "no prompt has two candidates" in build_candidate_sets([half])[1]["half"]
    mixed = [PreferencePair(id="m0", domain="mine", prompt="p", chosen="a", rejected="b",
                            aspects_chosen={"x": 2.0}, aspects_rejected={"x": 1.0}),
             PreferencePair(id="m1", domain="mine", prompt="q", chosen="a", rejected="b",
                            aspects_chosen={"x": 2.0, "y": 1.0}, aspects_rejected={"x": 1.0, "y": 1.0})]
    with pytest.raises(UserError, match=r"pair 'm1' \(domain 'mine'\).*--gold mine=ASPECT"):
        build_candidate_sets(mixed)


def _brute(keys, values, n):
    """The expectation by enumerating every subset of size n (ties split evenly)."""
    subs = list(itertools.combinations(range(len(keys)), n))
    total = 0.0
    for sub in subs:
        top = max(keys[i] for i in sub)
        tied = [values[i] for i in sub if keys[i] == top]
        total += sum(tied) / len(tied)
    return total / len(subs)


def test_expected_pick_is_exact():
    gold = [4.5, 3.0, 2.0, 1.0]
    # a perfect RM: the expected best gold of n random candidates, by hand for n = 2: each of the 6 subsets' max
    assert expected_pick(gold, gold, 2) == pytest.approx((4.5 * 3 + 3.0 * 2 + 2.0 * 1) / 6)
    assert expected_pick(gold, gold, 4) == 4.5 and expected_pick(gold, gold, 9) == 4.5  # n past k: all of them
    assert expected_pick(gold, gold, 1) == pytest.approx(mean(gold))
    # an RM that ranks them upside down picks the worst of the n
    assert expected_pick([-g for g in gold], gold, 4) == 1.0
    # ties: all keys equal -> a random pick, the mean, for every n
    for n in (1, 2, 3, 4):
        assert expected_pick([0.0] * 4, gold, n) == pytest.approx(mean(gold))
    keys, values = [3.0, 1.0, 3.0, 2.0, 1.0, 0.5], [1.0, 7.0, 2.0, 5.0, 3.0, 4.0]
    for n in range(1, 7):
        assert expected_pick(keys, values, n) == pytest.approx(_brute(keys, values, n))


def test_n_grid():
    assert n_grid(2) == [1, 2] and n_grid(16) == [1, 2, 4, 8, 16] and n_grid(13) == [1, 2, 4, 8, 13]
    assert n_grid(1) == [1]


def _two_prompt_pairs():
    """Two prompts: the 4 of ASPECTS, and 2 more (gold 2.0 and 4.0) whose longer text is worse."""
    extra = {"long bad": {"coh": 2.0, "flu": 2.0}, "ok": {"coh": 4.0, "flu": 4.0}}
    return summ_pairs() + all_pairs("summ", "article two", list(extra), extra, start=10)


def test_curves_by_hand_for_a_length_rm_a_perfect_rm_and_random():
    domains, _ = build_candidate_sets(_two_prompt_pairs())
    sets = domains["summ"].sets
    length = Fake()  # reward = length: right on prompt one, wrong on prompt two
    perfect = Fake({**GOLD, "long bad": 2.0, "ok": 4.0})
    rewards = {"length": [score_candidates(length, domains)], "perfect": [score_candidates(perfect, domains)]}
    assert length.calls == 1  # every candidate in one call
    res = bon_results(domains, rewards, resamples=200, seed=1)
    rec = res["domains"]["summ"]
    assert rec["n"] == [1, 2, 4] and rec["prompts_with_at_least_n"] == [2, 2, 1] and rec["prompts"] == 2
    mean_gold = (mean(GOLD.values()) + 3.0) / 2
    assert rec["random"]["mean"] == pytest.approx([mean_gold] * 3)  # a random pick: the mean gold, any N
    # oracle: the best gold of N; at N = set size the max gold of each prompt
    o2 = ((4.5 * 3 + 3.0 * 2 + 2.0) / 6 + 4.0) / 2
    assert rec["oracle"]["mean"] == pytest.approx([mean_gold, o2, (4.5 + 4.0) / 2])
    assert rec["systems"]["perfect"]["gold"]["mean"] == pytest.approx(rec["oracle"]["mean"])
    assert rec["systems"]["perfect"]["oracle_gain_share"][1:] == pytest.approx([1.0, 1.0])
    # length picks "aaaa" (the best) on prompt one, "long bad" (the worst) on prompt two
    got = rec["systems"]["length"]["gold"]["mean"]
    assert got == pytest.approx([mean_gold, (o2 * 2 - 4.0 + 2.0) / 2, (4.5 + 2.0) / 2])
    assert rec["systems"]["length"]["gold"]["mean"][0] == pytest.approx(mean_gold)  # N = 1: no choice yet
    # the proxy of the pick: its own reward, rising with N (here: the longest text's length at N = 4 on prompt one)
    assert rec["systems"]["length"]["proxy"][-1] == pytest.approx((4 + len("long bad")) / 2)
    assert rec["systems"]["length"]["proxy_z"] == sorted(rec["systems"]["length"]["proxy_z"])
    for curve in [rec["random"], rec["oracle"]] + [v["gold"] for v in rec["systems"].values()]:
        for lo, m, hi in zip(curve["low"], curve["mean"], curve["high"]):
            assert lo - 1e-12 <= m <= hi + 1e-12  # the bootstrap interval holds the estimate
    # the interval is a real one: with two prompts of different gold it has width where the prompts differ
    assert rec["oracle"]["high"][2] - rec["oracle"]["low"][2] == pytest.approx(0.5)
    assert len(sets) == 2


def test_seeds_average_and_results_are_reproducible_and_json_ready(tmp_path):
    domains, skipped = build_candidate_sets(_two_prompt_pairs())
    run_a = score_candidates(Fake(), domains)
    run_b = score_candidates(Fake({"long bad": 0.0}), domains)  # this run gets prompt two right
    res = bon_results(domains, {"two seeds": [run_a, run_b]}, skipped, {"two seeds": {"display": "length x2"}})
    one = bon_results(domains, {"a": [run_a]})["domains"]["summ"]["systems"]["a"]["gold"]["mean"]
    two = bon_results(domains, {"b": [run_b]})["domains"]["summ"]["systems"]["b"]["gold"]["mean"]
    got = res["domains"]["summ"]["systems"]["two seeds"]
    assert got["runs"] == 2 and got["gold"]["mean"] == pytest.approx([(x + y) / 2 for x, y in zip(one, two)])
    again = bon_results(domains, {"two seeds": [run_a, run_b]}, skipped, {"two seeds": {"display": "length x2"}})
    assert again == res  # the bootstrap is seeded
    json.dumps(res, allow_nan=False)
    md = bon_markdown(res)
    assert "| N | prompts with ≥ N | random | oracle | length x2 |" in md and "share of the oracle's gain" in md
    plot_bon(res, tmp_path / "bon.png", "title")
    assert (tmp_path / "bon.png").read_bytes()[:8] == PNG


def test_a_broken_rm_is_refused():
    domains, _ = build_candidate_sets(summ_pairs())
    with pytest.raises(UserError, match="non-finite"):
        score_candidates(Fake({"d": math.nan}), domains)


# ------------------------------------------------------------------------------------------- the pooled view, by hand

def _pooled_pairs():
    """summ: one prompt, gold 1, 2, 3 (z -1, 0, 1); d2t_nlg: two prompts, quality 2, 4 and 4, 6 (mean 4, sample std
    sqrt(8/3): z -s, 0 and 0, s with s = sqrt(3/2))."""
    summ = {"a1": {"q": 1.0}, "a2": {"q": 2.0}, "a3": {"q": 3.0}}
    one, two = {"b1": {"quality": 2.0}, "b2": {"quality": 4.0}}, {"c1": {"quality": 4.0}, "c2": {"quality": 6.0}}
    return (all_pairs("summ", "article", list(summ), summ) + all_pairs("d2t_nlg", "mr one", list(one), one, 10)
            + all_pairs("d2t_nlg", "mr two", list(two), two, 20))


OFFSET = {"a1": 11.0, "a2": 12.0, "a3": 13.0, "b1": 1.0, "b2": 2.0, "c1": 2.0, "c2": 3.0}  # right within each domain,
ONE_SCALE = {"a1": -1.0, "a2": 0.0, "a3": 1.0, "b1": -1.0, "b2": 0.0, "c1": 0.0, "c2": 1.0}  # summ 10 above d2t
WRONG_SUMM = {"a1": 3.0, "a2": 2.0, "a3": 1.0, "b1": 0.0, "b2": 1.0, "c1": 0.0, "c2": 1.0}


def test_pooled_best_of_n_and_rank_correlation_by_hand(tmp_path):
    domains, _ = build_candidate_sets(_pooled_pairs())
    assert list(domains) == ["d2t_nlg", "summ"]
    rewards = {name: [score_candidates(Fake(table), domains)]
               for name, table in (("offset", OFFSET), ("one scale", ONE_SCALE), ("wrong summ", WRONG_SUMM))}
    res = bon_results(domains, rewards, resamples=300, seed=3)
    pooled = res["pooled"]
    assert pooled["domains"] == ["d2t_nlg", "summ"] and pooled["prompts"] == 3 and pooled["candidates"] == 7
    assert pooled["n"] == [1, 2, 3] and pooled["prompts_with_at_least_n"] == [3, 3, 1]
    s = math.sqrt(1.5)
    # per prompt in gold z: mr one (-s, 0), mr two (0, s), article (-1, 0, 1); every prompt weighs the same
    assert pooled["random"]["mean"] == pytest.approx([0.0, 0.0, 0.0])
    oracle = [0.0, (0 + s + 2 / 3) / 3, (0 + s + 1) / 3]  # E[max of 2 of (-1, 0, 1)] = (0 + 1 + 1) / 3
    assert pooled["oracle"]["mean"] == pytest.approx(oracle)
    assert pooled["systems"]["offset"]["gold"]["mean"] == pytest.approx(oracle)  # right within every prompt
    assert pooled["systems"]["offset"]["oracle_gain_share"][1:] == pytest.approx([1.0, 1.0])
    # wrong on the article: the worse of 2 of (-1, 0, 1) is (-1 - 1 + 0) / 3, of all 3 is -1
    assert pooled["systems"]["wrong summ"]["gold"]["mean"] == pytest.approx([0.0, (0 + s - 2 / 3) / 3, (s - 1) / 3])

    # pooled Spearman, ranks by hand over (b1, b2, c1, c2, a1, a2, a3): gold z (-s, 0, 0, s, -1, 0, 1) ranks
    # (1, 4, 4, 7, 2, 4, 6); OFFSET's rewards rank (1, 2.5, 2.5, 4, 5, 6, 7), ONE_SCALE's (1.5, 4, 4, 6.5, 1.5, 4, 6.5)
    gold_ranks = [1, 4, 4, 7, 2, 4, 6]
    offset = pooled["systems"]["offset"]["spearman"]
    one = pooled["systems"]["one scale"]["spearman"]
    assert offset["point"] == pytest.approx(correlation([1, 2.5, 2.5, 4, 5, 6, 7], gold_ranks))  # 0.486
    assert one["point"] == pytest.approx(correlation([1.5, 4, 4, 6.5, 1.5, 4, 6.5], gold_ranks))  # 0.981
    assert offset["candidates"] == 7 and offset["low"] <= offset["point"] <= offset["high"]
    # per domain the offset does not matter: both order every domain's candidates as its gold does
    for name in ("offset", "one scale"):
        for d in domains:
            assert res["domains"][d]["systems"][name]["spearman"]["point"] == pytest.approx(1.0)
    assert res["domains"]["summ"]["systems"]["wrong summ"]["spearman"]["point"] == pytest.approx(-1.0)

    # a pooled replicate is the domains' own replicates side by side: the random curve's interval from those draws
    d2t, summ = prompt_draws("d2t_nlg", 2, 300, 3), prompt_draws("summ", 1, 300, 3)
    per_prompt = np.array([-s / 2, s / 2, 0.0])
    reps = (per_prompt[d2t].sum(1) + per_prompt[2 + summ].sum(1)) / 3
    assert [pooled["random"]["low"][0], pooled["random"]["high"][0]] == pytest.approx(
        np.percentile(reps, [2.5, 97.5]).tolist())

    md = bon_markdown(res)
    assert "### pooled over d2t_nlg, summ: gold = each domain's gold as a z-score" in md
    assert "| offset | 0.486 [" in md and "| one scale | 0.981 [" in md
    json.dumps(res, allow_nan=False)
    plot_bon(res, tmp_path / "bon.png", "pooled")
    assert (tmp_path / "bon.png").read_bytes()[:8] == PNG

    # a system without rewards for one domain has no pooled figure (other prompts), and the report says so
    part = bon_results(domains, {"offset": rewards["offset"],
                                 "summ only": [{"summ": rewards["offset"][0]["summ"]}]}, resamples=50)
    assert set(part["pooled"]["systems"]) == {"offset"} and "no rewards for d2t_nlg" in part["pooled"]["left_out"][
        "summ only"]
    assert "pooled" not in bon_results({"summ": domains["summ"]}, {"offset": rewards["offset"]}, resamples=50)
