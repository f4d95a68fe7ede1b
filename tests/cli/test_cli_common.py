"""What the commands share: `moerm train --help` lists the registry's systems and the tuning modes, and train and
bench write the same kind of reproducible command line to command.txt."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from moerm.cli import app
from moerm.cli.common import OnInvalid, command_line, on_invalid_option, set_option

runner = CliRunner()


def _flat(text: str) -> str:
    return " ".join(text.replace("│", " ").split())  # rich wraps help at the terminal width, inside boxes


def test_train_help_lists_every_registered_system_and_tuning_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    import moerm.systems  # noqa: F401 - registers the built-in systems
    from moerm.encoding.tuning import TUNING_MODES
    from moerm.systems.base import REGISTRY

    class PluginSystem:  # a system registered from outside shows up too: the help reads the registry
        """A plugged-in system."""

        tunings = ("frozen",)
        default_tuning = "frozen"

    monkeypatch.setitem(REGISTRY, "plugin", PluginSystem)
    res = runner.invoke(app, ["train", "--help"])
    assert res.exit_code == 0, res.output
    out = _flat(res.output)
    assert "--system" in out and "baseline | baselora | ..." not in out
    assert len(REGISTRY) >= 7
    for name, cls in REGISTRY.items():
        assert f"{name}: {' | '.join(cls.tunings)}, default {cls.default_tuning}" in out, name
    assert "plugin: frozen, default frozen - A plugged-in system." in out
    assert f"backbone tuning: {' | '.join(TUNING_MODES)} | auto" in out


def _summary(**_: Any) -> dict[str, Any]:
    return {"seconds_per_component": {}, "model_dir": "m", "train_seconds": 0.0}


def test_train_writes_the_options_given_as_one_shell_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[Path, str]] = []
    monkeypatch.setattr("moerm.runs.train_run",
                        lambda cfg, run_dir, command="", **k: seen.append((run_dir, command)) or _summary())
    out = tmp_path / "my runs" / "r"
    res = runner.invoke(app, ["train", "--no-progress", "--data", "a b", "--data", "c", "--out", str(out),
                              "--system", "rodos", "--seeds", "1,2", "--set", "train.lr=1e-4", "--on-invalid", "skip",
                              "--resume", "--set", "train.epochs=2"])
    assert res.exit_code == 0, res.output
    assert [d for d, _ in seen] == [out / "seed-1", out / "seed-2"]
    command = seen[0][1]
    assert shlex.split(command) == ["moerm", "train", "--data", "a b", "--data", "c", "--out", str(out),
                                    "--system", "rodos", "--set", "train.lr=1e-4", "--set", "train.epochs=2",
                                    "--seeds", "1,2", "--resume", "--on-invalid", "skip"]


def test_bench_writes_its_command_line_the_same_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_bench(cfg: Any, out: Path, command: str = "", **k: Any) -> dict[str, Any]:
        seen.update(cfg=cfg, command=command)
        return {"report": out / "report.md", "failed": []}

    monkeypatch.setattr("moerm.bench.grid.run_bench", fake_bench)
    out = tmp_path / "b"
    res = runner.invoke(app, ["bench", "--preset", "smoke", "--out", str(out), "--seeds", "3, 4", "--no-progress",
                              "--set", "train.lr=1e-3"])
    assert res.exit_code == 0, res.output
    assert shlex.split(seen["command"]) == ["moerm", "bench", "--out", str(out), "--preset", "smoke", "--seeds", "3, 4",
                                            "--set", "train.lr=1e-3"]
    assert seen["cfg"].seeds == [3, 4]


def test_command_line_covers_arguments_flags_and_enums() -> None:
    demo = typer.Typer()
    lines: list[str] = []

    @demo.command()
    def go(ctx: typer.Context, paths: list[str] = typer.Argument(...), on_invalid: OnInvalid = on_invalid_option(),
           set_: list[str] | None = set_option(), fast: bool = typer.Option(True, "--fast/--slow"),
           n: int = typer.Option(1, "--n", "-n")) -> None:
        lines.append(command_line(ctx, exclude=()))

    @demo.command()
    def other() -> None:  # two commands: `go` is a sub-command, as in moerm
        pass

    res = runner.invoke(demo, ["go", "x", "y z", "--slow", "-n", "3", "--on-invalid", "skip"])
    assert res.exit_code == 0, res.output
    assert lines == ["moerm go x 'y z' --on-invalid skip --slow --n 3"]
