"""TRL's four preference layouts read directly (JSON Lines and a `datasets` save_to_disk folder), and
`moerm data convert --format trl` / `--format to-trl` both ways."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moerm.cli import app
from moerm.data.readers import load_pairs
from moerm.data.schema import PreferencePair
from moerm.data.trl import from_trl, is_trl_record, to_trl

SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "What colour is the sky?"}
LAYOUTS = {
    "standard_explicit": {"prompt": "What colour is the sky?", "chosen": "Blue.", "rejected": "Green."},
    "standard_implicit": {"chosen": "What colour is the sky? Blue.", "rejected": "What colour is the sky? Green."},
    "conversational_explicit": {"prompt": [SYSTEM, USER], "chosen": [{"role": "assistant", "content": "Blue."}],
                                "rejected": [{"role": "assistant", "content": "Green."}]},
    "conversational_implicit": {"chosen": [USER, {"role": "assistant", "content": "Blue."}],
                                "rejected": [USER, {"role": "assistant", "content": "Green."}]},
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_trl_layout_reads_as_the_same_pair(layout: str, tmp_path: Path) -> None:
    path = tmp_path / "sky.jsonl"
    path.write_text(json.dumps(LAYOUTS[layout]) + "\n")
    pairs, report = load_pairs([path])
    assert report.n_invalid == 0
    assert [(p.domain, p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("sky", "What colour is the sky?", "Blue.", "Green.")]  # no domain: the file's name


def test_moerm_records_are_left_alone_and_multi_turn_reads_as_hh() -> None:
    ours = {"prompt": "p", "chosen": "a", "rejected": "b", "domain": "d"}
    assert not is_trl_record(ours) and from_trl(ours) == ours
    turns = [USER, {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "At night?"}]
    rec = from_trl({"prompt": turns, "chosen": [{"role": "assistant", "content": "Black."}],
                    "rejected": [{"role": "assistant", "content": "Blue."}]})
    assert rec["prompt"] == "Human: What colour is the sky?\n\nAssistant: Blue.\n\nHuman: At night?"


def test_save_to_disk_folder_and_convert_both_ways(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = [dict(LAYOUTS["conversational_explicit"]),
            {"prompt": [USER], "chosen": [{"role": "assistant", "content": "Grey, today."}],
             "rejected": [{"role": "assistant", "content": "Purple."}]}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "weather"))
    pairs, _ = load_pairs([tmp_path / "weather"])
    assert [(p.domain, p.prompt, p.chosen) for p in pairs] == [("weather", USER["content"], "Blue."),
                                                               ("weather", USER["content"], "Grey, today.")]
    runner = CliRunner()
    done = runner.invoke(app, ["data", "convert", str(tmp_path / "weather"), str(tmp_path / "ours.jsonl"),
                               "--format", "trl", "--domain", "sky"])
    assert done.exit_code == 0, done.output
    ours, _ = load_pairs([tmp_path / "ours.jsonl"])
    assert [p.domain for p in ours] == ["sky", "sky"]
    for conversational in (False, True):
        out = tmp_path / f"trl-{conversational}.jsonl"
        args = ["data", "convert", str(tmp_path / "ours.jsonl"), str(out), "--format", "to-trl"]
        done = runner.invoke(app, args + (["--conversational"] if conversational else []))
        assert done.exit_code == 0, done.output
        first = json.loads(out.read_text().splitlines()[0])
        assert isinstance(first["prompt"], list) == conversational
        back, _ = load_pairs([out])
        assert back == ours  # the round trip keeps every field


def test_to_trl_keeps_domain_and_id() -> None:
    pair = PreferencePair(id="x-1", domain="math", prompt="Human: a\n\nAssistant: b\n\nHuman: c", chosen="d",
                          rejected="e")
    rec = to_trl(pair, conversational=True)
    assert rec["prompt"] == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                             {"role": "user", "content": "c"}]
    assert (rec["domain"], rec["id"]) == ("math", "x-1")
    assert from_trl(rec)["prompt"] == pair.prompt
