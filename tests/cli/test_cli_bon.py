"""`moerm bon` end to end: a hand-built saved system whose reward is the response length (its pick is known), and a
tiny trained baseline run; outputs only under --out, clear errors for data without human scores and bad --gold."""

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moerm.cli import app
from moerm.config import RunConfig, from_dict
from moerm.data.readers import write_jsonl
from moerm.data.schema import PreferencePair
from moerm.systems.base import REGISTRY, FitResult, RewardSystem, ScoreOutput

from conftest import TOY_WORDS

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"
POS, NEG, FILLER = TOY_WORDS[:6], TOY_WORDS[6:12], TOY_WORDS[12:]


class LengthRM(RewardSystem):
    """Reward = number of characters of the response: nothing to train, nothing to save."""

    name = "lengthrm"

    def fit(self, train, eval, ctx):
        return FitResult({})

    def score(self, prompts, responses, domains=None, batch_size=32, mode=None):
        return ScoreOutput([float(len(r)) for r in responses], [{} for _ in responses])

    def save_components(self, path):
        pass

    @classmethod
    def load_components(cls, path, config, device=None):
        return cls(config)

    def components(self):
        return {}


@pytest.fixture
def length_run(tmp_path, tiny_bert):
    REGISTRY[LengthRM.name] = LengthRM
    run = tmp_path / "length-run"
    cfg = from_dict(RunConfig, {"system": "lengthrm", "model": {"backbone": tiny_bert}})
    LengthRM(cfg).save(run / "model")
    yield run
    del REGISTRY[LengthRM.name]


def _pairs(domain, prompt, gold_by_text, start=0):
    """Every pair of candidates (better one chosen), each text with its human scores `{"quality": g}`."""
    texts = list(gold_by_text)
    out = []
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            a, b = texts[i], texts[j]
            hi, lo = (a, b) if gold_by_text[a] > gold_by_text[b] else (b, a)
            out.append(PreferencePair(id=f"{domain}-{start}-{i}-{j}", domain=domain, prompt=prompt, chosen=hi,
                                      rejected=lo, aspects_chosen={"quality": gold_by_text[hi]},
                                      aspects_rejected={"quality": gold_by_text[lo]}))
    return out


def test_bon_of_a_length_rm_picks_the_longest(tmp_path, length_run):
    data = tmp_path / "data"
    # prompt one: longer is better (gold 1..4); prompt two: longer is worse
    good = _pairs("d2t_nlg", "one", {"a": 1.0, "bb": 2.0, "ccc": 3.0, "dddd": 4.0})
    bad = _pairs("d2t_nlg", "two", {"a": 4.0, "bb": 3.0, "ccc": 2.0, "dddd": 1.0}, start=1)
    write_jsonl(good + bad, data / "d2t_nlg" / "test.jsonl")
    write_jsonl([PreferencePair(id="h", domain="chat", prompt="p", chosen="x", rejected="y")],
                data / "chat" / "test.jsonl")
    out = tmp_path / "bon-out"
    res = runner.invoke(app, ["bon", str(length_run), "--data", str(data), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["bon.json", "bon.md", "bon.png"]
    assert not (length_run / "bon").exists()  # nothing written outside --out
    assert (out / "bon.png").read_bytes()[:8] == PNG
    got = json.loads((out / "bon.json").read_text())
    from moerm.eval.bon import picture_title
    title = picture_title(got, "test")  # the picture's title: what was measured, no path of this machine
    assert title == "Best-of-N against human gold, own router, test split: d2t_nlg" and str(tmp_path) not in title
    rec = got["domains"]["d2t_nlg"]
    assert rec["criterion"] == "quality" and rec["prompts"] == 2 and rec["candidates"] == 8 and rec["n"] == [1, 2, 4]
    curve = got["domains"]["d2t_nlg"]["systems"][str(length_run)]["gold"]["mean"]
    # N = 4 takes all 4: the longest, gold 4 on prompt one and 1 on prompt two; N = 2: the longer of a random pair
    # (prompt one: E[max of 2 of 1..4] = (2 + 3*2 + 4*3) / 6 = 10/3; prompt two: E[min] = (1*3 + 2*2 + 3) / 6 = 5/3)
    assert curve == pytest.approx([2.5, (10 / 3 + 5 / 3) / 2, 2.5])
    assert rec["oracle"]["mean"] == pytest.approx([2.5, 10 / 3, 4.0]) and rec["random"]["mean"] == [2.5] * 3
    assert "no human scores" in got["skipped"]["chat"]
    assert got["systems"][str(length_run)]["system"] == "lengthrm"
    md = (out / "bon.md").read_text()
    assert "### d2t_nlg: gold = aspect `quality`, scale 1-6" in md and "- chat: no human scores" in md
    assert "| 4 | 2 | 2.50 [" in md  # N = 4, both prompts have 4 candidates

    # the default --out is RUN/bon; --gold names another criterion; --json prints the results
    res = runner.invoke(app, ["bon", str(length_run), "--data", str(data / "d2t_nlg"), "--json", "--bootstrap", "50"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["bootstrap"]["resamples"] == 50 and (length_run / "bon" / "bon.json").exists()


def test_bon_errors_name_what_is_wrong(tmp_path, length_run):
    data = tmp_path / "plain"
    write_jsonl([PreferencePair(id="h", domain="chat", prompt="p", chosen="x", rejected="y")], data / "test.jsonl")
    res = runner.invoke(app, ["bon", str(length_run), "--data", str(data), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "no domain" in res.output and "chat: no human scores" in res.output
    assert not (tmp_path / "o").exists()
    scored = tmp_path / "scored"
    write_jsonl(_pairs("mine", "one", {"a": 1.0, "bb": 2.0}), scored / "test.jsonl")
    for gold, msg in (("mine", "expected DOMAIN=ASPECT"), ("mine=coherence", "has no aspect 'coherence'"),
                      ("other=mean", "'other', which is not in the data")):
        res = runner.invoke(app, ["bon", str(length_run), "--data", str(scored), "--gold", gold, "--out",
                                  str(tmp_path / "o")])
        assert res.exit_code == 1 and msg in res.output, res.output
    res = runner.invoke(app, ["bon", str(tmp_path / "nothing"), "--data", str(scored)])
    assert res.exit_code == 1 and "no saved reward system" in res.output


def _grouped(n_prompts, seed, domain="summ"):
    """Toy candidate pools: 4 replies per prompt with 0..3 positive words (the rest negative); gold = that count."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n_prompts):
        prompt = " ".join(rng.choice(FILLER) for _ in range(5)) + f" {i}"
        body = [rng.choice(FILLER) for _ in range(3)]
        gold = {}
        for k in range(4):
            words = [rng.choice(POS) for _ in range(k)] + [rng.choice(NEG) for _ in range(3 - k)]
            gold[" ".join(body + words)] = float(k)
        pairs += _pairs(domain, prompt, gold, start=i)
    return pairs


def test_bon_of_a_tiny_trained_baseline(tmp_path, tiny_bert):
    data = tmp_path / "data"
    write_jsonl(_grouped(20, 1), data / "summ" / "train.jsonl")
    write_jsonl(_grouped(8, 2), data / "summ" / "test.jsonl")
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", "--system", "baseline", "--tuning", "full", "--backbone", tiny_bert,
                              "--data", str(data), "--out", str(run), "--no-progress", "--no-eval",
                              "--set", "train.lr=5e-4", "--set", "train.epochs=3", "--set", "train.batch_size=8",
                              "--set", "model.max_length=48", "--set", "train.seed=0"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "bon"
    res = runner.invoke(app, ["bon", str(run), "--data", str(data), "--out", str(out)])
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "bon.json").read_text())["domains"]["summ"]
    assert rec["criterion"] == "mean" and rec["prompts"] == 8 and rec["candidates"] == 32 and rec["n"] == [1, 2, 4]
    gold = rec["systems"][str(run)]["gold"]
    assert gold["mean"][0] == pytest.approx(1.5)  # N = 1: no choice, the mean gold (0 + 1 + 2 + 3) / 4
    # trained to prefer positive words, its pick among all 4 is well above random (1.5) and at most the oracle (3)
    assert 2.0 < gold["mean"][-1] <= rec["oracle"]["mean"][-1] == 3.0
    assert all(lo <= m <= hi for lo, m, hi in zip(gold["low"], gold["mean"], gold["high"]))
    assert "summ" in (out / "bon.md").read_text() and Path(out / "bon.png").stat().st_size > 10_000


def test_bon_of_a_routed_system_own_router_and_oracle_domains(tmp_path, tiny_bert):
    """A tiny RODOS (calibrated routes, the routed systems' default) through `moerm bon`: pooled over its two domains,
    with its own router, and with --oracle-domains; each equals the curves of the system's own `score` that way."""
    from routedutil import PREFIX, tiny_rodos

    from moerm.eval.bon import bon_results, build_candidate_sets, score_candidates
    from moerm.systems.base import load_system

    run = tiny_rodos(tiny_bert, tmp_path)
    rng = random.Random(5)
    pairs = []
    for d in ("alpha", "beta"):
        for i in range(3):
            # beta's last prompt carries alpha's prefix: the router sends it to alpha's RM, --oracle-domains to beta's
            prefix = PREFIX["alpha" if (d, i) == ("beta", 2) else d]
            prompt = f"{prefix} " + " ".join(rng.choice(FILLER) for _ in range(4)) + f" {i}"
            gold = {" ".join([rng.choice(FILLER) for _ in range(2)] + [rng.choice(POS) for _ in range(k)]
                             + [rng.choice(NEG) for _ in range(2 - k)]): float(k + 1) for k in range(3)}
            pairs += _pairs(d, prompt, gold, start=10 * i)
    data = tmp_path / "data"
    write_jsonl(pairs, data / "test.jsonl")
    system = load_system(run)
    assert system.calibration.kind == "zscore"
    domains, _ = build_candidate_sets(pairs)
    for flag, oracle in (([], False), (["--oracle-domains"], True)):
        out = tmp_path / f"bon-{oracle}"
        res = runner.invoke(app, ["bon", str(run), "--data", str(data), "--out", str(out), "--bootstrap", "200",
                                  *flag])
        assert res.exit_code == 0, res.output
        got = json.loads((out / "bon.json").read_text())
        assert got["routing"] == ("oracle domains" if oracle else "own router")
        want = bon_results(domains, {str(run): [score_candidates(system, domains, oracle_domains=oracle)]},
                           resamples=200)
        mine, theirs = got["pooled"]["systems"][str(run)], want["pooled"]["systems"][str(run)]
        assert got["pooled"]["domains"] == ["alpha", "beta"] and got["pooled"]["prompts"] == 6
        assert mine["gold"]["mean"] == pytest.approx(theirs["gold"]["mean"])
        assert mine["spearman"]["point"] == pytest.approx(theirs["spearman"]["point"])
        for d in ("alpha", "beta"):
            assert got["domains"][d]["systems"][str(run)]["gold"]["mean"] == pytest.approx(
                want["domains"][d]["systems"][str(run)]["gold"]["mean"])
        assert "rank correlation with the human gold" in (out / "bon.md").read_text()
    # the two ways of routing really score differently (the mislabelled prompt's candidates)
    own = score_candidates(system, domains)["beta"][2]
    given = score_candidates(system, domains, oracle_domains=True)["beta"][2]
    assert max(abs(a - b) for a, b in zip(own, given)) > 1e-4
