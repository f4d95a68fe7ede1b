import pytest

from moerm.data.schema import PreferencePair
from moerm.eval.metrics import capability_accuracy, evaluate_system, pairwise_report, task_report
from moerm.systems.base import ScoreOutput


class _Recorder:
    """A fake system: reward = length of the response; remembers the domains it was handed."""

    def __init__(self):
        self.seen = "unset"

    def score(self, prompts, responses, domains=None, batch_size=32):
        self.seen = domains
        return ScoreOutput([float(len(r)) for r in responses], [{} for _ in responses])


def _pair(i, domain, chosen, rejected, **kw):
    return PreferencePair(id=str(i), domain=domain, prompt="p", chosen=chosen, rejected=rejected, **kw)


def test_routed_systems_route_themselves_unless_oracle_domains():
    pairs = [_pair(0, "a", "long reply", "short"), _pair(1, "b", "x", "longer")]
    sys_ = _Recorder()
    rep = evaluate_system(sys_, pairs)
    assert sys_.seen is None and rep["routing"] == "own router"
    assert rep["accuracy"] == 0.5 and rep["per_domain"]["a"]["accuracy"] == 1.0
    evaluate_system(sys_, pairs, oracle_domains=True)
    assert sys_.seen == ["a", "b", "a", "b"]


def test_pairwise_report_ties_count_as_wrong_and_macro_is_per_domain():
    rep = pairwise_report([1.0, 2.0, 0.0], [0.0, 2.0, 1.0], ["a", "a", "b"])
    assert rep["accuracy"] == pytest.approx(1 / 3)
    assert rep["macro_accuracy"] == pytest.approx((0.5 + 0.0) / 2)


def test_task_report_and_capability_accuracy_by_hand():
    details = [{"router_top": "t1"}, {"router_top": "t2"}, {"router_top": "t2"}]
    rep = task_report([1.0, 0.0, 3.0], [0.0, 1.0, 2.0], details, ["a", "b", "c"], {"a": "t1", "b": "t1", "c": "t2"})
    assert rep["per_task"] == {"t1": {"accuracy": 0.5, "pairs": 2}, "t2": {"accuracy": 1.0, "pairs": 1}}
    assert rep["task_router_accuracy"] == pytest.approx(2 / 3)
    assert rep["task_router_confusion"] == {"t1": {"t1": 1, "t2": 1}, "t2": {"t2": 1}}
    pairs = [_pair(0, "a", "c", "r", aspects_chosen={"flu": 5.0, "coh": 2.0}, aspects_rejected={"flu": 1.0, "coh": 2.0}),
             _pair(1, "a", "c", "r", aspects_chosen={"flu": 1.0}, aspects_rejected={"flu": 4.0})]
    chosen = [{"capability_scores": {"flu": 0.9, "coh": 0.0}}, {"capability_scores": {"flu": 0.9}}]
    rejected = [{"capability_scores": {"flu": 0.1, "coh": 1.0}}, {"capability_scores": {"flu": 0.1}}]
    # pair 0: flu right (chosen better, scored higher), coh tied -> dropped; pair 1: rejected better on flu, but
    # the expert scored chosen higher -> wrong
    assert capability_accuracy(pairs, chosen, rejected) == {"a": {"flu": {"accuracy": 0.5, "pairs": 2}}}


def _clustered_pairs():
    """Domain a: 2 prompts x 3 pairs; domain b: 3 prompts x 1 pair. Reward = response length."""
    out = []
    for i in range(6):
        out.append(PreferencePair(id=f"a{i}", domain="a", prompt=f"Human: question {i // 3}\n\nAssistant: hi\n\nHuman: {i}",
                                  chosen="long reply" if i < 4 else "x", rejected="short"))
    for i in range(3):
        out.append(PreferencePair(id=f"b{i}", domain="b", prompt=f"prompt {i}", chosen="long reply" if i else "x",
                                  rejected="short"))
    return out


def test_reports_count_prompts_and_carry_clustered_intervals():
    from moerm.eval.intervals import accuracy_intervals

    pairs = _clustered_pairs()
    rep = evaluate_system(_Recorder(), pairs)
    # the first Human turn is the prompt key: domain a has 2 prompts, not 6
    assert rep["per_domain"]["a"]["prompts"] == 2 and rep["per_domain"]["b"]["prompts"] == 3 and rep["prompts"] == 5
    assert rep["per_pair"] == {"ids": [p.id for p in pairs], "correct": "111100011"}
    want = accuracy_intervals([1, 1, 1, 1, 0, 0, 0, 1, 1], ["q0"] * 3 + ["q1"] * 3 + ["p0", "p1", "p2"], ["a"] * 6 + ["b"] * 3)
    assert rep["macro_accuracy"] == pytest.approx(want["macro"].point) == pytest.approx((4 / 6 + 2 / 3) / 2)
    assert rep["macro_accuracy_ci"]["low"] == want["macro"].low and rep["macro_accuracy_ci"]["high"] == want["macro"].high
    assert rep["per_domain"]["a"]["ci"]["low"] == want["per_domain"]["a"].low
    assert rep["accuracy_ci"]["low"] <= rep["accuracy"] <= rep["accuracy_ci"]["high"]


def test_seed_aggregate_and_paired_comparison_use_the_per_pair_results():
    from moerm.eval.intervals import clustered_accuracy_ci, paired_clustered_diff_ci
    from moerm.eval.metrics import aggregate_runs, compare_runs, pair_index

    pairs = _clustered_pairs()
    index = pair_index(pairs)
    one = evaluate_system(_Recorder(), pairs)
    other = {**one, "per_pair": {"ids": one["per_pair"]["ids"], "correct": "011100111"}, "accuracy": 6 / 9,
             "macro_accuracy": (3 / 6 + 3 / 3) / 2,
             "per_domain": {"a": {"accuracy": 3 / 6, "pairs": 6}, "b": {"accuracy": 1.0, "pairs": 3}}}
    agg = aggregate_runs([one, other], index)
    keys = [index[p.id][1] for p in pairs]
    doms = [p.domain for p in pairs]
    rows = [[1, 1, 1, 1, 0, 0, 0, 1, 1], [0, 1, 1, 1, 0, 0, 1, 1, 1]]
    want = clustered_accuracy_ci(rows, keys, doms, macro=True)
    assert agg["macro_accuracy"]["mean"] == pytest.approx(want.point)
    assert (agg["macro_accuracy_ci"]["low"], agg["macro_accuracy_ci"]["high"]) == (want.low, want.high)
    assert agg["per_domain"]["a"]["prompts"] == 2 and agg["pairs"] == 9
    diff = compare_runs([other], [one], index)
    ref = paired_clustered_diff_ci(rows[1], rows[0], keys, doms, macro=True)
    assert diff["macro"]["diff"] == pytest.approx(ref.point) == pytest.approx(((3 / 6 + 1) - (4 / 6 + 2 / 3)) / 2)
    assert (diff["macro"]["low"], diff["macro"]["high"]) == (ref.low, ref.high)
    assert diff["pairs"] == 9 and diff["prompts"] == 5 and diff["per_domain"]["b"]["diff"] == pytest.approx(1 / 3)
    # only on the domains asked for
    assert compare_runs([other], [one], index, domains=["b"])["pairs"] == 3
