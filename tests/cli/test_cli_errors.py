"""The CLI's error rule: a user's mistake is one red line and exit code 1; a bug of ours is not hidden: one line
naming it, the traceback saved to a log file (printed with --debug / MOERM_DEBUG=1), exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from moerm.cli import app
from moerm.cli.common import parse_seeds
from moerm.cli.data import data_app
from moerm.errors import UnsupportedError, UserError

runner = CliRunner()


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Internal-error logs land here, never in the real ~/.cache."""
    monkeypatch.setenv("MOERM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MOERM_DEBUG", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    return tmp_path / "cache"


def _boom(*args: Any, **kwargs: Any) -> Any:
    return {}["boom"]  # a genuine bug: KeyError deep in our code


def test_a_bug_exits_2_and_says_where_the_traceback_went(tmp_path: Path, cache: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("moerm.systems.base.find_model_dir", _boom)
    res = runner.invoke(app, ["info", str(tmp_path)])
    assert res.exit_code == 2
    log = cache / "last-error.log"
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 2 and "internal error" in lines[0] and "KeyError: 'boom'" in lines[0]
    assert str(log) in lines[1] and "--debug" in lines[1]
    assert "Traceback" not in res.output  # the console stays short ...
    text = log.read_text()  # ... and the log has all of it: where it happened and the argv
    assert "Traceback (most recent call last)" in text and "in _boom" in text and "KeyError: 'boom'" in text
    assert "argv:" in text


def test_debug_prints_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("moerm.systems.base.find_model_dir", _boom)
    res = runner.invoke(app, ["--debug", "info", str(tmp_path)])
    assert res.exit_code == 2 and "Traceback (most recent call last)" in res.stderr and "in _boom" in res.stderr
    monkeypatch.setenv("MOERM_DEBUG", "1")  # the sub-apps too, without the root's --debug
    monkeypatch.setattr("moerm.cli.data.load_pairs", lambda *a, **k: 1 / 0)
    res = runner.invoke(data_app, ["validate", str(tmp_path)])
    assert res.exit_code == 2 and "ZeroDivisionError" in res.stderr and "Traceback" in res.stderr


def test_a_training_bug_is_logged_in_the_run_folder(tmp_path: Path, cache: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    out.mkdir()
    monkeypatch.setattr("moerm.runs.train_run", lambda *a, **k: 1 / 0)
    res = runner.invoke(app, ["train", "--data", str(tmp_path), "--out", str(out), "--no-progress"])
    assert res.exit_code == 2 and "ZeroDivisionError: division by zero" in res.stderr
    assert "ZeroDivisionError" in (out / "last-error.log").read_text() and not cache.exists()


@pytest.mark.parametrize("error", [UserError("the training set is empty"), FileNotFoundError("no such file: x.jsonl"),
                                   UnsupportedError("system 'baseline' cannot add a domain")])
def test_a_user_error_stays_one_line_with_exit_1(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                 error: Exception) -> None:
    def raise_it(*a: Any, **k: Any) -> None:
        raise error

    monkeypatch.setattr("moerm.runs.train_run", raise_it)
    res = runner.invoke(app, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--no-progress"])
    assert res.exit_code == 1
    assert res.stderr.strip().splitlines() == [f"error: {error}"]
    assert not cache.exists() and not (tmp_path / "r").exists()


def test_messages_are_not_read_as_markup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def raise_it(*a: Any, **k: Any) -> None:
        raise UserError("data.train[0]: expected [bold]a string[/bold]")

    monkeypatch.setattr("moerm.runs.train_run", raise_it)
    res = runner.invoke(app, ["train", "--data", "x", "--out", str(tmp_path / "r")])
    assert res.exit_code == 1 and "data.train[0]: expected [bold]a string[/bold]" in res.stderr


def test_the_library_rejects_bad_input_with_user_errors() -> None:
    """The errors the library raises on purpose for bad input are UserErrors (still ValueErrors)."""
    from moerm.config import ConfigError
    from moerm.data.readers import DataError
    from moerm.data.schema import InvalidRecord
    from moerm.labeling.judge import JudgeConfigError
    from moerm.serve.config import ServeConfigError
    from moerm.systems.base import get_system_class
    from moerm.systems.ensemble import EnsembleOptions

    for cls in (ConfigError, DataError, InvalidRecord, JudgeConfigError, ServeConfigError, UnsupportedError):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError)
    with pytest.raises(UserError, match="unknown system 'nope'; available: .*baseline"):
        get_system_class("nope")
    with pytest.raises(UserError, match="options.members must be at least 1"):
        EnsembleOptions(members=0)


@pytest.mark.parametrize("cmd", [["train", "--data", "d", "--out", "o"], ["bench", "--preset", "smoke", "--out", "o"]])
def test_a_bad_seed_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cmd: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, [*cmd, "--seeds", "0,a", "--no-progress"])
    assert res.exit_code == 1
    assert res.stderr.strip() == ("error: --seeds: 'a' is not an integer seed; give comma-separated integers, "
                                  "e.g. --seeds 0,1,2")
    assert "invalid literal" not in res.output and not (tmp_path / "o").exists()


def test_parse_seeds() -> None:
    assert parse_seeds(None) is None
    assert parse_seeds("0") == [0] and parse_seeds(" 1, 2,") == [1, 2] and parse_seeds("4294967295") == [2**32 - 1]
    for bad, why in (("1,1", "seed 1 is given twice"), (",", "no seed"), ("1.5", "'1.5' is not an integer seed"),
                     ("-1", "outside 0..4294967295"), ("4294967296", "outside 0..4294967295")):
        with pytest.raises(UserError, match=why):
            parse_seeds(bad)


def test_python_dash_m_runs_the_cli_with_real_exit_codes(tmp_path: Path) -> None:
    """`python -m moerm.cli` (what torchrun launches) is the same CLI, exit codes included."""
    res = subprocess.run([sys.executable, "-m", "moerm.cli", "data", "validate", str(tmp_path / "missing.jsonl")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1


def test_a_malformed_config_file_is_a_user_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: [1e-4\n")
    res = runner.invoke(app, ["train", "--data", "d", "--out", str(tmp_path / "r"), "-c", str(bad), "--no-progress"])
    assert res.exit_code == 1 and f"{bad}: invalid YAML" in res.stderr and "internal error" not in res.stderr
