"""DMoERM on tiny models (every backbone of the table): two tasks, an easy overall preference, and capability labels from aspect scores.

Task `alpha` has capabilities `quality` (agrees with the overall label) and `contrary` (the *rejected* reply is
better on it), so phase 2 must learn each capability's own direction, not the overall one.
"""

import copy
import dataclasses
import json

import pytest
import torch

from moerm.config import ConfigError, ModelConfig, RunConfig, TrainConfig
from moerm.data.readers import write_jsonl
from moerm.eval.metrics import evaluate_system
from moerm.labeling.aspects import oriented_pair
from moerm.systems import build_system, load_system
from moerm.systems.calibration import hold_back, reference_texts
from moerm.systems.base import FitContext
from moerm.systems.dmoerm import adapter_of, split_ab

from conftest import BACKBONES, DEFAULT_LORA_TARGETS, lora_sites, toy_pairs

PREFIX = {"a1": "tell me about the topic", "a2": "tell me why the answer", "b1": "what is this and that"}
TASKS = {"alpha": {"domains": ["a1", "a2"], "capabilities": ["quality", "contrary"]},
         "beta": {"domains": ["b1"], "capabilities": ["quality", "judged"]}}


def task_pairs(domain, n, seed):
    out = []
    for i, p in enumerate(toy_pairs(n, seed, domain)):
        ties = i % 5 == 0  # every fifth pair ties on quality: dropped from its labels
        out.append(dataclasses.replace(
            p, prompt=f"{PREFIX[domain]} {p.prompt}",
            aspects_chosen={"quality": 3.0 if ties else 5.0, "contrary": 1.0},
            aspects_rejected={"quality": 3.0, "contrary": 4.0}))
    return out


def _cfg(backbone, tmp, **options):
    return RunConfig(system="dmoerm", model=ModelConfig(backbone=backbone, max_length=48, feature_cache=str(tmp / "cache")),
                     train=TrainConfig(lr=5e-4, batch_size=8, epochs=4, save_every=0, eval_batch_size=16),
                     options={"tasks": TASKS, "min_capability_pairs": 8, **options},
                     components={"router": {"train": {"epochs": 15, "lr": 2e-2}}, "expert": {"train": {"lr": 1e-2, "epochs": 4}},
                                 "aggregator": {"train": {"epochs": 20, "lr": 1e-2}}})


# A frozen random tiny decoder's last token says little about the prompt's first words: its router tunes LoRA.
ROUTER_TUNING = {"tiny_gpt2": "lora", "tiny_llama": "lora"}


@pytest.fixture(scope="module", params=BACKBONES)
def trained(request, tmp_path_factory):
    tiny = request.getfixturevalue(request.param)
    tmp = tmp_path_factory.mktemp("dmoerm")
    train = task_pairs("a1", 40, 1) + task_pairs("a2", 40, 2) + task_pairs("b1", 60, 3)
    # LLM-judge labels for `judged` (no aspect score carries it): here the overall order, as `moerm label` writes it
    judged = [oriented_pair(p, "judged", True) for p in train if p.domain == "b1"]
    write_jsonl(judged, tmp / "judged.jsonl")
    test = task_pairs("a1", 16, 11) + task_pairs("a2", 16, 12) + task_pairs("b1", 24, 13)
    system = build_system(_cfg(tiny, tmp, capability_labels=[str(tmp / "judged.jsonl")],
                               router_tuning=ROUTER_TUNING.get(request.param, "frozen")))
    result = system.fit(train, test, FitContext(tmp / "run", progress=False))
    system.save(tmp / "run" / "model")
    return system, result, train, test, tmp


def test_each_phase_ranks_in_its_labels_direction(trained):
    system, result, _, test, _ = trained
    m = result.metrics
    for task in ("alpha", "beta"):
        assert m[f"{task}:phase1:eval_accuracy"] >= 0.85  # base RM: chosen above rejected
        assert m[f"{task}:aggregator:eval_accuracy"] >= 0.85  # phase 3: chosen above rejected
        assert m[f"{task}:expert:quality:eval_accuracy"] >= 0.85
    # `contrary` labels say the rejected reply is better: its expert must have learned the opposite direction
    # (0.8, not 0.85: the calibration slice holds back 10% of the training prompts, and 27 of 32 is 0.84)
    assert m["alpha:expert:contrary:eval_accuracy"] >= 0.8
    rep = evaluate_system(system, test)
    assert rep["accuracy"] >= 0.85
    assert rep["per_task"]["alpha"]["pairs"] == 32 and rep["per_task"]["beta"]["pairs"] == 24
    assert rep["task_router_accuracy"] >= 0.95
    caps = rep["capability_accuracy"]
    assert caps["a1"]["contrary"]["accuracy"] >= 0.85 and caps["a1"]["quality"]["accuracy"] >= 0.85
    assert caps["a1"]["quality"]["pairs"] == 16 - 4  # the 4 ties are not counted
    out = system.score([test[0].prompt], [test[0].rejected])
    sub = out.details[0]["capability_scores"]
    assert out.details[0]["routed_domain"] == "alpha" and set(sub) == {"quality", "contrary"}


def test_splits_and_components(trained):
    system, result, train, _, _ = trained
    fit, held = hold_back(train, "zscore", 0.1, system.config.train.seed)  # the calibration slice, held back first
    assert set(held) == {"a1", "a2", "b1"} and all(held.values())
    beta = [p for p in fit if p.domain == "b1"]
    a, b = split_ab(beta, 0.6, 0)
    assert len(a) + len(b) == len(beta) == 60 - len(held["b1"]) and not {p.id for p in a} & {p.id for p in b}
    assert result.metrics["beta:split_a_pairs"] == len(a) and result.metrics["beta:split_b_pairs"] == len(b)
    assert result.metrics["beta:expert:judged:train_pairs"] == len(a)  # judge labels from split A only
    # each task model's rewards on both replies of its domains' held-back pairs: mean 0, std 1 after its map
    for task, domains in (("alpha", ["a1", "a2"]), ("beta", ["b1"])):
        prompts, responses = reference_texts([p for d in domains for p in held[d]])
        r = system.calibration(task, system.score_task(task, prompts, responses)[0].float())
        assert abs(float(r.mean())) < 1e-5 and float(r.std()) == pytest.approx(1.0, abs=1e-5)
    assert {"router", "alpha:phase1", "alpha:expert:quality", "alpha:expert:contrary", "alpha:phase3"} <= set(
        result.seconds_per_component)
    info = system.describe()
    comps = info["components"]
    assert comps["alpha:aggregator"]["params_total"] == (2 * 32) * 32 + 32 + 1 + 32 + 1
    for task, caps in (("alpha", ["quality", "contrary"]), ("beta", ["quality", "judged"])):
        peft = system.models[task].bank.peft
        for cap in caps:  # LoRA B starts at zero: non-zero means phase 2 trained this expert
            b_weights = [p for n, p in peft.named_parameters() if f".{adapter_of(cap)}." in n and "lora_B" in n]
            assert b_weights and all(p.abs().sum() > 0 for p in b_weights)


def test_experts_sit_on_the_default_targets_of_the_top_blocks_only(trained):
    system = trained[0]
    for model in system.models.values():
        peft = model.bank.peft
        assert model.bank.first_expert_layer == 1  # the top third of 2 blocks, at least one
        # layers_to_transform/layers_pattern put LoRA in block 1 only, on peft's default targets for the model type
        assert lora_sites(peft) == {(1, name) for name in DEFAULT_LORA_TARGETS[peft.config.model_type]}


def test_phase3_trains_only_the_aggregator(trained, tmp_path):
    system, _, train, _, _ = trained
    model = system.models["alpha"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    agg_before = copy.deepcopy(model.aggregator.state_dict())
    torch.nn.init.normal_(model.aggregator.net[0].weight)  # a fresh start so training must move it
    pairs = [p for p in train if p.domain in ("a1", "a2")]
    system._phase3("alpha", model, pairs, [], tmp_path / "agg", FitContext(tmp_path, progress=False))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("aggregator.") for k in changed)
    model.aggregator.load_state_dict(agg_before)


def test_batched_experts_equal_sequential_and_unbatched(trained):
    system, _, _, test, _ = trained
    prompts = [p.prompt for p in test] * 2
    responses = [p.chosen for p in test] + [p.rejected for p in test]
    batched = system.score(prompts, responses, batch_size=8, mode="batched")
    sequential = system.score(prompts, responses, batch_size=8, mode="sequential")
    single = system.score(prompts[:6], responses[:6], batch_size=1)
    torch.testing.assert_close(torch.tensor(batched.rewards), torch.tensor(sequential.rewards), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(batched.rewards[:6]), torch.tensor(single.rewards), atol=1e-5, rtol=1e-5)
    for db, ds in zip(batched.details, sequential.details):
        torch.testing.assert_close(torch.tensor(list(db["capability_scores"].values())),
                                   torch.tensor(list(ds["capability_scores"].values())), atol=1e-5, rtol=1e-5)


def test_save_load_gives_the_same_scores_and_inline_tasks(trained):
    system, _, _, test, tmp = trained
    loaded = load_system(tmp / "run" / "model")
    prompts, responses = [p.prompt for p in test], [p.chosen for p in test]
    torch.testing.assert_close(torch.tensor(loaded.score(prompts, responses).rewards),
                               torch.tensor(system.score(prompts, responses).rewards), atol=1e-5, rtol=1e-5)
    saved = json.loads((tmp / "run" / "model" / "system.json").read_text())
    assert saved["config"]["options"]["tasks"]["alpha"]["domains"] == ["a1", "a2"]
    assert not list((tmp / "run" / "model").rglob("*.bin")) and not list((tmp / "run" / "model").rglob("*.pt"))


def test_domain_hint_and_unknown_domain_fall_back(trained):
    system, _, _, test, _ = trained
    p = test[0]
    given = system.score([p.prompt], [p.chosen], domains=["b1"])
    assert given.details[0]["routed_domain"] == "beta" and given.details[0]["route_source"] == "given"
    unknown = system.score([p.prompt], [p.chosen], domains=["nowhere"])
    d = unknown.details[0]
    assert d["fallback"] and "nowhere" in d["fallback_reason"]
    assert set(d["capability_scores_by_task"]) == {"alpha", "beta"}


def test_configuration_errors_are_clear(tiny_bert, tmp_path):
    with pytest.raises(ConfigError, match="belong to no task"):
        build_system(_cfg(tiny_bert, tmp_path)).fit(task_pairs("a1", 10, 1) + toy_pairs(4, 1, "zzz"), None,
                                                    FitContext(tmp_path / "r1", progress=False))
    with pytest.raises(ConfigError, match=r"too few capability labels in split A for \{'judged': 0\}"):
        build_system(_cfg(tiny_bert, tmp_path)).fit(task_pairs("a1", 20, 1) + task_pairs("b1", 20, 2), None,
                                                    FitContext(tmp_path / "r2", progress=False))
    with pytest.raises(ConfigError, match="needs tasks"):
        build_system(dataclasses.replace(_cfg(tiny_bert, tmp_path), options={})).fit(
            task_pairs("a1", 10, 1), None, FitContext(tmp_path / "r3", progress=False))
    with pytest.raises(ConfigError, match="dmoerm' cannot honour model.tuning='lora'"):
        build_system(dataclasses.replace(_cfg(tiny_bert, tmp_path),
                                         model=ModelConfig(backbone=tiny_bert, tuning="lora")))
