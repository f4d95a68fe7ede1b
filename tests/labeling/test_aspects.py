"""Capability pairs from aspect scores: orientation by score, flips, ties and missing aspects, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from moerm.cli.label import label_app
from moerm.data.readers import load_pairs
from moerm.data.schema import PreferencePair
from moerm.labeling.aspects import available_aspects, capability_pairs


def _pair(pid: str, a_chosen: dict[str, float] | None, a_rejected: dict[str, float] | None) -> PreferencePair:
    return PreferencePair(id=pid, domain="chat", prompt=f"prompt {pid}", chosen=f"good {pid}", rejected=f"bad {pid}",
                          subset="overall", margin=2.0, aspects_chosen=a_chosen, aspects_rejected=a_rejected)


PAIRS = [
    _pair("agree", {"coherence": 4, "safety": 1}, {"coherence": 2, "safety": 1}),
    _pair("flip", {"coherence": 1}, {"coherence": 3.5}),
    _pair("tie", {"coherence": 2}, {"coherence": 2}),
    _pair("one-side", {"coherence": 2}, {"safety": 2}),
    _pair("none", None, None),
]


def test_higher_score_wins_and_flips_against_overall_label() -> None:
    kept, report = capability_pairs(PAIRS, "coherence")
    assert report == {"total": 5, "kept": 2, "flipped": 1, "ties": 1, "missing": 2}
    agree, flip = kept
    assert (agree.id, agree.subset, agree.margin) == ("agree:coherence", "coherence", None)
    assert (agree.chosen, agree.rejected, agree.prompt) == ("good agree", "bad agree", "prompt agree")
    # The rejected reply scores higher on coherence, so it becomes `chosen`, and its aspects move with it.
    assert (flip.id, flip.chosen, flip.rejected) == ("flip:coherence", "bad flip", "good flip")
    assert flip.aspects_chosen == {"coherence": 3.5} and flip.aspects_rejected == {"coherence": 1}


def test_ties_and_missing_for_another_aspect() -> None:
    kept, report = capability_pairs(PAIRS, "safety")
    assert kept == [] and report == {"total": 5, "kept": 0, "flipped": 0, "ties": 1, "missing": 4}


def test_available_aspects_counts_pairs_scored_on_both_sides() -> None:
    assert available_aspects(PAIRS) == {"coherence": 3, "safety": 1}


def test_cli_aspects(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in PAIRS), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    runner = CliRunner()
    result = runner.invoke(label_app, ["aspects", str(src), "--capability", "coherence", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "kept 2 of 5 pairs (1 flipped" in result.output
    written, _ = load_pairs([out])
    assert [p.id for p in written] == ["agree:coherence", "flip:coherence"]

    result = runner.invoke(label_app, ["aspects", str(src), "--capability", "humour", "--out", str(out)])
    assert result.exit_code == 1
    assert "aspects available: coherence (3), safety (1)" in result.output

    result = runner.invoke(label_app, ["aspects", str(tmp_path / "nope.jsonl"), "--capability", "x", "--out", str(out)])
    assert result.exit_code == 1 and "no such file" in result.output
