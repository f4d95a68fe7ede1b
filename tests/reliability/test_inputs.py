"""Bad input and faults against configs, data, training and saved runs: each case a clear error naming the field
(or file and line), an exit code, and nothing written or lost. (The server's table is tests/reliability/test_server.py.)
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertModel
from typer.testing import CliRunner

from moerm.cli import app
from moerm.cli.train import finite_or_none
from moerm.config import ConfigError, load_config
from moerm.data.readers import load_pairs, write_jsonl
from moerm.data.schema import InvalidRecord
from moerm.encoding import load_tokenizer
from moerm.errors import UserError
from moerm.systems import build_system, load_system

from conftest import toy_pairs, reward_trainer

runner = CliRunner()

BAD_CONFIGS = [  # override -> the field the message must name
    ("train.max_steps=-5", "train.max_steps"),
    ("train.epochs=0", "train.epochs"),
    ("train.epochs=-1", "train.epochs"),
    ("train.warmup_ratio=2", "train.warmup_ratio"),
    ("train.lr=0", "train.lr"),
    ("train.log_every=0", "train.log_every"),
    ("train.eval_batch_size=0", "train.eval_batch_size"),
    ("model.lora_dropout=1.5", "model.lora_dropout"),
    ("data.max_train_pairs_per_domain=0", "data.max_train_pairs_per_domain"),
]


@pytest.mark.parametrize("override,field", BAD_CONFIGS)
def test_nonsense_numbers_are_config_errors_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("overrides,needle", [
    (["system=baseline", "options.num_experts=3"], "unknown config key 'options.num_experts'"),
    (["system=rodos", "components.aggregator.train.lr=1e-3"], "components.aggregator"),
    (["system=rodos", "options.router_lr=1e-2"], "components.router.train.lr"),
    (["system=arliss", "model.tuning=frozen"], "cannot honour model.tuning='frozen'"),
])
def test_what_a_system_cannot_take_is_refused_when_it_is_built(tiny_bert, overrides, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        build_system(load_config(None, [f"model.backbone={tiny_bert}", *overrides]))


def test_max_length_past_the_backbones_positions_is_refused_at_build(tiny_bert):
    with pytest.raises(ConfigError, match="128 positions"):  # the tiny BERT has 128 position embeddings
        build_system(load_config(None, [f"model.backbone={tiny_bert}", "model.max_length=100000"]))
    with pytest.raises(ConfigError, match="128 positions"):
        build_system(load_config(None, [f"model.backbone={tiny_bert}", "system=rodos",
                                        "options.router_max_length=4096"]))


@pytest.mark.parametrize("domain", ["../../../../X", "/abs/path", "a/b", "a\\b", "..", " padded "])
def test_domain_names_that_would_become_paths_are_invalid_records(tmp_path, domain):
    rec = {"id": "1", "domain": domain, "prompt": "p", "chosen": "good", "rejected": "bad"}
    (tmp_path / "d.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(InvalidRecord) as e:
        load_pairs([str(tmp_path / "d.jsonl")])
    assert e.value.field == "domain" and e.value.line == 1 and str(tmp_path / "d.jsonl") in str(e.value)


def _data(tmp_path):
    d = tmp_path / "data"
    write_jsonl(toy_pairs(16, seed=1, domain="alpha"), d / "alpha" / "train.jsonl")
    return d


def test_a_diverged_run_is_an_error_and_saves_no_model(tmp_path, tiny_bert):
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", "--backbone", tiny_bert, "--data", str(_data(tmp_path)), "--out", str(run),
                              "--no-progress", "--set", "train.lr=1e9", "--set", "train.max_grad_norm=0",
                              "--set", "model.max_length=32", "--set", "train.batch_size=4"])
    assert res.exit_code == 1, res.output
    assert "diverged" in res.output and "step" in res.output and "train.lr" in res.output
    assert not (run / "model").exists() and not (run / "train_summary.json").exists()


def test_score_never_prints_nan(tmp_path, tiny_bert):
    assert finite_or_none({"reward": float("nan"), "details": {"p": [float("inf"), 1.0]}}) == \
        {"reward": None, "details": {"p": [None, 1.0]}}
    cfg = load_config(None, [f"model.backbone={tiny_bert}", "model.tuning=frozen", "model.max_length=32"])
    system = build_system(cfg)
    system.head.net[-1].weight.data.fill_(float("nan"))  # a broken model
    system.save(tmp_path / "model")
    res = runner.invoke(app, ["score", str(tmp_path / "model"), "--prompt", "hi", "--response", "good"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.output.strip().splitlines()[-1])  # strict JSON: a bare NaN would not parse as null
    assert row["reward"] is None


def test_a_swapped_backbone_is_refused_with_what_changed(tmp_path, tiny_bert):
    base = tmp_path / "base"
    shutil.copytree(tiny_bert, base)
    system = build_system(load_config(None, [f"model.backbone={base}", "model.tuning=frozen", "model.max_length=32"]))
    system.save(tmp_path / "model")
    load_system(tmp_path / "model")  # unchanged: loads
    torch.manual_seed(123)  # another model of the same shape in the same folder
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(base, safe_serialization=True)
    load_tokenizer("minilm").save_pretrained(base)
    with pytest.raises(UserError, match="not the one this system was trained on"):
        load_system(tmp_path / "model")


def test_a_pickled_adapter_is_refused_before_peft_reads_it(tmp_path, tiny_bert):
    system = build_system(load_config(None, [f"model.backbone={tiny_bert}", "system=baselora", "model.max_length=32"]))
    system.save(tmp_path / "model")
    adapter = tmp_path / "model" / "adapter"
    state = load_file(str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(b"not really a pickle, but it must never be opened")
    assert state
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        load_system(tmp_path / "model")


@pytest.mark.parametrize("field,value,needle", [
    ("response_pair", ("good  answer", "good answer\n"), r"identical \(up to whitespace\)"),
    ("chosen", "good \ud800 answer", "lone surrogate"),
    ("prompt", "\udfff", "lone surrogate"),
])
def test_records_no_model_can_learn_from_are_invalid(tmp_path, field, value, needle):
    rec = {"id": "1", "domain": "d", "prompt": "p", "chosen": "good", "rejected": "bad"}
    if field == "response_pair":
        rec["chosen"], rec["rejected"] = value
    else:
        rec[field] = value
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(rec) + "\n")  # json.dumps writes a lone surrogate as the escape \ud800
    with pytest.raises(InvalidRecord, match=needle) as e:
        load_pairs([str(path)])
    assert e.value.line == 1 and e.value.field == ("rejected" if field == "response_pair" else field)


@pytest.mark.parametrize("system", ["rodos", "arliss"])
def test_a_routed_system_on_one_domain_is_an_error_not_a_one_class_router(tmp_path, tiny_bert, system):
    from moerm.systems.base import FitContext

    built = build_system(load_config(None, [f"model.backbone={tiny_bert}", f"system={system}", "model.max_length=32"]))
    with pytest.raises(UserError, match="needs at least two"):
        built.fit(toy_pairs(8, seed=1, domain="only"), None, FitContext(tmp_path / "run", progress=False))
    assert not (tmp_path / "run" / "components").exists()  # refused before anything trained


def _trainer(tiny_bert, out, stop=None, **train):
    from moerm.config import TrainConfig

    cfg = TrainConfig(**{"lr": 5e-4, "batch_size": 8, "epochs": 2, "save_every": 2, "log_every": 1, "seed": 5, **train})
    return reward_trainer(tiny_bert, out, cfg, toy_pairs(24, seed=3), 32, stop=stop)


def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before(tmp_path, tiny_bert):
    from moerm.train.trainer import TrainingInterrupted

    ref_model, ref = _trainer(tiny_bert, tmp_path / "ref")
    ref.train()
    _, killed = _trainer(tiny_bert, tmp_path / "run", stop=4)
    with pytest.raises(TrainingInterrupted):
        killed.train()
    latest = tmp_path / "run" / "checkpoints" / "step-0000004" / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[:100])  # truncated, as a kill during a copy would leave it
    model, resumed = _trainer(tiny_bert, tmp_path / "run")
    result = resumed.train(resume=True)
    assert result.resumed_from == 2
    for (name, a), b in zip(ref_model.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_a_failed_checkpoint_write_leaves_no_temporary_folder(tmp_path, tiny_bert, monkeypatch):
    from moerm.train import checkpoint

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    _, trainer = _trainer(tiny_bert, tmp_path / "run")
    with pytest.raises(UserError, match="No space left on device"):
        trainer.train()
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir()]  # no .tmp-step-* left


@pytest.mark.parametrize("damage", ["empty system.json", "garbage system.json", "truncated head", "edited size"])
def test_a_damaged_saved_system_is_a_clear_error_naming_the_folder(tmp_path, tiny_bert, damage):
    system = build_system(load_config(None, [f"model.backbone={tiny_bert}", "model.tuning=frozen", "model.max_length=32"]))
    model = tmp_path / "model"
    system.save(model)
    meta = model / "system.json"
    if damage == "empty system.json":
        meta.write_text("")
    elif damage == "garbage system.json":
        meta.write_text("[1, 2")
    elif damage == "truncated head":
        head = model / "head.safetensors"
        head.write_bytes(head.read_bytes()[:40])
    else:  # the config says another head width than the saved weights have
        d = json.loads(meta.read_text())
        d["config"]["model"]["head"] = "mlp"
        meta.write_text(json.dumps(d))
    with pytest.raises(UserError, match=str(model)):
        load_system(model)


@pytest.mark.parametrize("content,needle", [
    (b'{"prompt": "p", "response": "r"}\n\xff\xfe bad bytes\n', r"in\.jsonl:2: not UTF-8"),
    (b'[{"prompt": "p", "response": "r"}]\n', r"in\.jsonl:1: .*JSON array"),
    (b'{"prompt": "p"}\n', r"in\.jsonl:1: field 'response'"),
    (None, "is a folder"),
])
def test_score_input_errors_name_the_file_and_line(tmp_path, tiny_bert, content, needle):
    system = build_system(load_config(None, [f"model.backbone={tiny_bert}", "model.tuning=frozen", "model.max_length=32"]))
    system.save(tmp_path / "model")
    inp = tmp_path / "in.jsonl"
    if content is None:
        inp.mkdir()
    else:
        inp.write_bytes(content)
    res = runner.invoke(app, ["score", str(tmp_path / "model"), "-i", str(inp)])
    assert res.exit_code == 1, res.output
    import re
    assert re.search(needle, res.output), res.output
    assert "Traceback" not in res.output


def test_resume_refuses_changed_data_and_warns_only_about_real_changes(tmp_path, tiny_bert):
    data = _data(tmp_path)
    run = tmp_path / "run"
    base = ["train", "--backbone", tiny_bert, "--data", str(data), "--out", str(run), "--no-progress",
            "--set", "model.max_length=32", "--set", "train.batch_size=8", "--set", "train.epochs=1"]
    assert runner.invoke(app, base).exit_code == 0
    res = runner.invoke(app, base + ["--resume"])  # the same command: no "command-line changes ignored"
    assert res.exit_code == 0 and "changes ignored" not in res.output, res.output
    write_jsonl(toy_pairs(16, seed=7, domain="alpha"), data / "alpha" / "train.jsonl")  # other pairs, same count
    res = runner.invoke(app, base + ["--resume"])
    assert res.exit_code == 1 and "data changed" in res.output and "--allow-data-change" in res.output
    assert runner.invoke(app, base + ["--resume", "--allow-data-change"]).exit_code == 0


@pytest.mark.parametrize("system,index", [("rodos", "rodos.json"), ("arliss", "arliss.json")])
def test_add_domain_killed_before_its_index_leaves_a_loadable_run_and_can_run_again(tmp_path, tiny_bert, monkeypatch,
                                                                                   system, index):
    import dataclasses

    from moerm.systems.base import FitContext

    prefix = {"alpha": "tell me about the topic", "beta": "please explain why", "gamma": "what is this and that"}

    def pairs(domain, n, seed):
        return [dataclasses.replace(p, prompt=f"{prefix[domain]} {p.prompt}") for p in toy_pairs(n, seed, domain)]

    cfg = load_config(None, [f"model.backbone={tiny_bert}", f"system={system}", "model.max_length=32",
                             "train.epochs=1", "train.batch_size=8", "components.router.train.epochs=2"])
    built = build_system(cfg)
    built.fit(pairs("alpha", 16, 1) + pairs("beta", 16, 2), None, FitContext(tmp_path / "run", progress=False))
    model = tmp_path / "model"
    built.save(model)
    module = __import__("moerm.systems.routing.store", fromlist=["atomic_write_text"])  # writes every router index
    real = module.atomic_write_text

    def killed(path, text):
        if path.name == index:
            raise KeyboardInterrupt("killed before the index was written")
        real(path, text)

    monkeypatch.setattr(module, "atomic_write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        load_system(model).add_domain(pairs("gamma", 16, 3), FitContext(tmp_path / "add1", progress=False), model)
    monkeypatch.setattr(module, "atomic_write_text", real)
    survivor = load_system(model)  # the old system, whole: its index still names the old router
    assert survivor.domains == ["alpha", "beta"]
    assert len(survivor.score(["tell me about the topic a"], ["good"]).rewards) == 1
    survivor.add_domain(pairs("gamma", 16, 3), FitContext(tmp_path / "add2", progress=False), model)
    again = load_system(model)
    assert again.domains == ["alpha", "beta", "gamma"]
    assert json.loads((model / index).read_text())["router_version"] == 1


def test_resume_between_log_lines_logs_the_same_losses(tmp_path, tiny_bert):
    from moerm.train.trainer import TrainingInterrupted

    _, ref = _trainer(tiny_bert, tmp_path / "ref", save_every=3, log_every=2, epochs=3)
    ref.train()
    _, killed = _trainer(tiny_bert, tmp_path / "run", stop=3, save_every=3, log_every=2, epochs=3)
    with pytest.raises(TrainingInterrupted):
        killed.train()  # killed at step 3: the loss of step 3 belongs to the line logged at step 4
    _, resumed = _trainer(tiny_bert, tmp_path / "run", save_every=3, log_every=2, epochs=3)
    resumed.train(resume=True)
    lines = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    for a, b in zip(lines(tmp_path / "ref"), lines(tmp_path / "run"), strict=True):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-6) for k in a if k != "component")


def test_a_json_array_in_a_jsonl_file_gets_a_hint(tmp_path):
    from moerm.data.readers import DataError

    recs = [{"id": str(i), "domain": "d", "prompt": "p", "chosen": "good", "rejected": "bad"} for i in range(2)]
    one_line = tmp_path / "a.jsonl"
    one_line.write_text(json.dumps(recs) + "\n")
    with pytest.raises(InvalidRecord, match="should be named .json"):
        load_pairs([str(one_line)])
    pretty = tmp_path / "b.jsonl"
    pretty.write_text(json.dumps(recs, indent=1) + "\n")
    with pytest.raises(InvalidRecord, match="looks like a JSON array"):
        load_pairs([str(pretty)])
    lines = tmp_path / "c.json"
    lines.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(DataError, match="name the file .jsonl"):
        load_pairs([str(lines)])


def test_a_held_out_set_that_repeats_the_training_set_is_warned_about(tmp_path, tiny_bert):
    d = tmp_path / "data"
    pairs = toy_pairs(16, seed=1, domain="alpha")
    write_jsonl(pairs, d / "alpha" / "train.jsonl")
    write_jsonl(pairs[:6], d / "alpha" / "test.jsonl")
    res = runner.invoke(app, ["train", "--backbone", tiny_bert, "--data", str(d), "--out", str(tmp_path / "run"),
                              "--no-progress", "--set", "model.max_length=32", "--set", "train.epochs=1"])
    assert res.exit_code == 0, res.output
    assert "6 of 6 held-out pairs also appear in the training data" in res.output


def test_a_finished_component_resumed_logs_no_second_eval_line(tmp_path, tiny_bert):
    from moerm.train.pairwise import TokenPairs, pairwise_eval
    from moerm.encoding import make_encoder

    ev = TokenPairs.build(toy_pairs(8, seed=9), make_encoder(tiny_bert, 32))
    _, done = _trainer(tiny_bert, tmp_path / "run")
    done.eval_fn = lambda m: pairwise_eval(m, ev)
    done.train()
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    _, again = _trainer(tiny_bert, tmp_path / "run")
    again.eval_fn = lambda m: pairwise_eval(m, ev)
    result = again.train(resume=True)
    assert "eval_accuracy" in result.final_metrics  # still reported
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before  # but not logged twice
