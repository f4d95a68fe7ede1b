"""`moerm import-hf`, `moerm export`, `moerm add-domain --from-hf` and the `--backbone` guard, end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import toy_pairs
from moerm.cli import app
from moerm.data.readers import write_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hub"))
from hubutil import PAIRS, hf_logits, save_hf_rm  # noqa: E402

runner = CliRunner()


@pytest.fixture(autouse=True)
def _modules_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import transformers.dynamic_module_utils as dm

    monkeypatch.setattr(dm, "HF_MODULES_CACHE", str(tmp_path / "hf-modules"))


def test_import_score_export_round_trip(tiny_bert: str, tmp_path: Path) -> None:
    hf = save_hf_rm("bert", tmp_path / "rm", tiny_bert)
    r = runner.invoke(app, ["import-hf", hf, "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    assert "imported BertForSequenceClassification" in r.output
    requests = tmp_path / "req.jsonl"
    requests.write_text("".join(json.dumps({"prompt": p, "response": q}) + "\n" for p, q in PAIRS))
    r = runner.invoke(app, ["score", str(tmp_path / "run"), "-i", str(requests), "-o", str(tmp_path / "out.jsonl")])
    assert r.exit_code == 0, r.output
    rewards = torch.tensor([json.loads(x)["reward"] for x in (tmp_path / "out.jsonl").read_text().splitlines()])
    from moerm.systems.base import load_system

    torch.testing.assert_close(rewards, hf_logits(hf, load_system(tmp_path / "run").encoder), atol=1e-5, rtol=0)
    r = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")])
    assert r.exit_code == 0, r.output
    assert "native format" in r.output and "from_pretrained(DIR)" in r.output
    r = runner.invoke(app, ["import-hf", str(tmp_path / "nope"), "--out", str(tmp_path / "run2")])
    assert r.exit_code == 1 and "no such folder" in r.output


def test_backbone_that_is_a_reward_model_is_refused(tiny_bert: str, tmp_path: Path) -> None:
    hf = save_hf_rm("bert", tmp_path / "rm", tiny_bert)
    data = tmp_path / "train.jsonl"
    write_jsonl(toy_pairs(8), data)
    args = ["train", "--system", "baseline", "--backbone", hf, "--data", str(data), "--out", str(tmp_path / "run"),
            "--no-progress", "--set", "train.max_steps=1", "--set", "model.max_length=32"]
    r = runner.invoke(app, args)
    assert r.exit_code == 1 and "import-hf" in r.output and "--drop-hf-head" in r.output
    assert not (tmp_path / "run").exists()
    r = runner.invoke(app, args + ["--drop-hf-head"])
    assert r.exit_code == 0, r.output
    assert "warning:" in r.output and "score head is dropped" in r.output


def test_add_domain_from_hf(tiny_bert: str, tiny_llama: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(toy_pairs(12, seed=1, domain="a") + toy_pairs(12, seed=2, domain="b"), data / "train.jsonl")
    r = runner.invoke(app, ["train", "--system", "rodos", "--backbone", tiny_bert, "--data", str(data), "--out",
                            str(tmp_path / "run"), "--no-progress", "--set", "train.max_steps=1",
                            "--set", "model.max_length=32"])
    assert r.exit_code == 0, r.output
    hf = save_hf_rm("llama", tmp_path / "rm", tiny_llama)
    new = tmp_path / "new.jsonl"
    write_jsonl(toy_pairs(6, seed=3, domain="c"), new)
    r = runner.invoke(app, ["add-domain", str(tmp_path / "run"), "--from-hf", hf, "--data", str(new), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "added domain 'c'" in r.output
    r = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")])
    assert r.exit_code == 1 and "--domain D" in r.output
    r = runner.invoke(app, ["export", str(tmp_path / "run"), "--domain", "c", "--out", str(tmp_path / "hf")])
    assert r.exit_code == 0, r.output
    from moerm.systems.base import load_system

    enc = load_system(tmp_path / "run").rms["c"].encoder
    torch.testing.assert_close(hf_logits(str(tmp_path / "hf"), enc), hf_logits(hf, enc), atol=1e-5, rtol=0)
    r = runner.invoke(app, ["add-domain", str(tmp_path / "run"), "--from-hf", hf, "--data", str(new), "--no-progress"])
    assert r.exit_code == 1 and "already has a reward model" in r.output
