"""`moerm data` sub-commands through typer's CliRunner on `data_app`."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from moerm.cli.data import data_app

runner = CliRunner()


def rec(i: int, domain: str = "d", **over: Any) -> dict[str, Any]:
    r: dict[str, Any] = {"id": f"r{i}", "domain": domain, "prompt": f"p {i}", "chosen": f"good {i}", "rejected": "bad"}
    r.update(over)
    return r


def write(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_validate_ok_prints_domains_and_counts(tmp_path: Path) -> None:
    write(tmp_path / "a" / "train.jsonl", [rec(1, "alpha"), rec(2, "beta"), rec(3, "beta")])
    write(tmp_path / "a" / "test.jsonl", [rec(4, "alpha")])
    res = runner.invoke(data_app, ["validate", str(tmp_path), "--split", "train"])
    assert res.exit_code == 0, res.output
    assert "alpha: 1" in res.stdout and "beta: 2" in res.stdout and "3 valid, 0 invalid" in res.stdout


def test_validate_error_mode_exits_1_with_location(tmp_path: Path) -> None:
    path = write(tmp_path / "x.jsonl", [rec(1), rec(2, chosen="bad")])
    res = runner.invoke(data_app, ["validate", str(path), "--on-invalid", "error"])
    assert res.exit_code == 1
    assert f"{path}:2: field 'rejected': chosen and rejected are identical" in res.stderr
    assert "Traceback" not in res.output


def test_validate_lists_every_invalid_record_by_default_and_exits_1(tmp_path: Path) -> None:
    path = write(tmp_path / "x.jsonl", [rec(1), rec(2, chosen="bad"), rec(3), rec(4, chosen="")])
    res = runner.invoke(data_app, ["validate", str(path)])
    assert res.exit_code == 1
    assert f"{path}:2: field 'rejected'" in res.stdout and f"{path}:4: field 'chosen': empty text" in res.stdout
    assert "2 valid, 2 invalid" in res.stdout and "2 invalid record(s)" in res.stderr


def test_validate_skip_mode_reports_and_exits_0(tmp_path: Path) -> None:
    path = write(tmp_path / "x.jsonl", [rec(1), rec(2, chosen=""), rec(3)])
    res = runner.invoke(data_app, ["validate", str(path), "--on-invalid", "skip"])
    assert res.exit_code == 0, res.output
    assert "2 valid, 1 invalid" in res.stdout and f"{path}:2: field 'chosen': empty text" in res.stdout


def test_validate_skip_mode_nothing_valid_exits_1(tmp_path: Path) -> None:
    path = write(tmp_path / "x.jsonl", [rec(1, chosen="")])
    assert runner.invoke(data_app, ["validate", str(path), "--on-invalid", "skip"]).exit_code == 1


def test_data_error_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "x.jsonl.gz"
    bad.write_bytes(b"not gzip")
    for args in (["validate", str(tmp_path / "missing")], ["validate", str(bad)]):
        res = runner.invoke(data_app, args)
        assert res.exit_code == 1
        assert len(res.stderr.strip().splitlines()) == 1 and res.stderr.startswith("error: ")
        assert res.exception is None or isinstance(res.exception, SystemExit)  # no traceback


@pytest.mark.skipif(importlib.util.find_spec("moerm.encoding") is None, reason="moerm.encoding not written yet")
def test_stats_json_with_embedded_tokenizer(tmp_path: Path) -> None:
    path = write(tmp_path / "x.jsonl", [rec(1, "alpha"), rec(2, "beta", chosen="a much longer good answer")])
    res = runner.invoke(data_app, ["stats", str(path), "--json"])
    assert res.exit_code == 0, res.output
    stats = json.loads(res.stdout)
    assert stats["overall"]["n_pairs"] == 2 and sorted(stats["domains"]) == ["alpha", "beta"]
    assert stats["domains"]["beta"]["chosen_longer"] == 1.0
    table = runner.invoke(data_app, ["stats", str(path)])
    assert table.exit_code == 0 and "alpha" in table.stdout


@pytest.mark.skipif(importlib.util.find_spec("moerm.data.converters") is None, reason="converters not written yet")
def test_convert_dahoas(tmp_path: Path) -> None:
    src = tmp_path / "raw.jsonl"
    src.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    out = tmp_path / "out.jsonl.gz"
    res = runner.invoke(data_app, ["convert", "--format", "dahoas", str(src), str(out), "--domain", "syn"])
    assert res.exit_code == 0, res.output
    assert "1" in res.stdout
    rows = [json.loads(x) for x in gzip.decompress(out.read_bytes()).splitlines()]
    assert rows[0]["domain"] == "syn" and rows[0]["chosen"] == "a"


def test_convert_missing_input_is_one_line(tmp_path: Path) -> None:
    res = runner.invoke(data_app, ["convert", "--format", "hh", str(tmp_path / "no.jsonl"), str(tmp_path / "o.jsonl")])
    assert res.exit_code == 1 and res.stderr.startswith("error: ") and "no.jsonl" in res.stderr
