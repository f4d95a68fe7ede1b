"""Smoke test of benchmarks/vs_trl.py on a tiny random BERT: both trainers run, see the same pairs and token ids."""

from __future__ import annotations

import json

import pytest
from conftest import load_benchmark, toy_pairs

from moerm.data.readers import write_jsonl

pytest.importorskip("trl")
pytest.importorskip("datasets")



def _load_script():
    return load_benchmark("vs_trl")


@pytest.mark.parametrize("trl_model", ["seqcls", "mean"])
def test_both_trainers_run_on_the_same_data_and_report(tiny_bert, tmp_path, trl_model):
    data = tmp_path / "data"
    for i, dom in enumerate(("a", "b")):
        write_jsonl(toy_pairs(8, seed=i, domain=dom), data / dom / "train.jsonl")
        write_jsonl(toy_pairs(4, seed=i + 10, domain=dom), data / dom / "test.jsonl")
    out = tmp_path / "vs_trl.json"
    result = _load_script().main([
        "--data", str(data), "--backbone", tiny_bert, "--pairs-per-domain", "8", "--eval-pairs-per-domain", "4",
        "--max-length", "32", "--batch-size", "8", "--trl-model", trl_model, "--in-process", "--out", str(out),
    ])
    assert json.loads(out.read_text())["summary"]["ours"]["train_pairs"] == 16
    s = result["summary"]
    assert s["ours"]["train_pairs"] == s["trl"]["train_pairs"] == 16
    assert s["ours"]["steps"] == s["trl"]["steps"] == 2
    assert s["ours"]["eval_pairs"] == s["trl"]["eval_pairs"] == 8
    trl_run = next(r for r in result["runs"] if r["side"] == "trl")
    assert trl_run["token_type_mismatches"] == 0  # TRL's batches carry exactly our segment ids
    for side in ("ours", "trl"):
        run = next(r for r in result["runs"] if r["side"] == side)
        assert run["optimizer_steps_seen"] == 2 and run["padded_tokens"] > 0 and len(run["heldout"]["correct"]) == 8
    p = s["paired"]
    assert p["only_ours_right"] + p["only_trl_right"] + p["both_right"] <= 8 and 0 <= p["sign_test_p"] <= 1
    assert s["ratio_train_pairs_per_s"] > 0 and "accuracy_diff_points" in s


def test_token_types_follow_the_first_sep():
    import torch

    mod = _load_script()
    ids = torch.tensor([[101, 7, 102, 8, 9, 102, 0], [101, 102, 5, 102, 0, 0, 0]])
    mask = (ids != 0).long()
    assert mod.token_types_after_first_sep(ids, mask, 102).tolist() == [[0, 0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0, 0]]
    assert mod.abba(3) == ["ours", "trl", "trl", "ours", "ours", "trl"]
    assert mod.sign_test_p(0, 0) == 1.0 and mod.sign_test_p(5, 5) == 1.0
    assert mod.sign_test_p(10, 0) == pytest.approx(2 / 1024)


def test_length_grouped_rows_of_both_trainers_pad_no_more(tiny_bert, tmp_path):
    data = tmp_path / "data"
    for i, dom in enumerate(("a", "b")):
        write_jsonl(toy_pairs(16, seed=i, domain=dom), data / dom / "train.jsonl")
        write_jsonl(toy_pairs(4, seed=i + 10, domain=dom), data / dom / "test.jsonl")
    common = ["--data", str(data), "--backbone", tiny_bert, "--pairs-per-domain", "16", "--eval-pairs-per-domain", "4",
              "--max-length", "32", "--batch-size", "4", "--in-process"]
    plain = _load_script().main(common)
    grouped = _load_script().main([*common, "--ours-group-by-length", "--trl-group-by-length"])
    assert grouped["spec"]["trl_group_by_length"] and grouped["spec"]["ours_group_by_length"]
    for side in ("ours", "trl"):
        g = grouped["summary"][side]
        assert g["steps"] == plain["summary"][side]["steps"] == 8
        assert g["padded_tokens"] < plain["summary"][side]["padded_tokens"], side
