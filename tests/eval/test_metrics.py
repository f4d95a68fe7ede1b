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
