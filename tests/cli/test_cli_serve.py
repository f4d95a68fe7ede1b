"""`moerm serve`: options reach the server's settings; a wrong folder fails before anything listens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from moerm.cli import app

runner = CliRunner()


def test_serve_rejects_a_folder_without_a_saved_system(tmp_path: Path) -> None:
    res = runner.invoke(app, ["serve", str(tmp_path)])
    assert res.exit_code == 1 and "no saved reward system" in res.output


def test_serve_passes_its_options_to_the_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "system.json").write_text("{}")
    seen: dict[str, Any] = {}
    monkeypatch.setattr("moerm.serve.server.run_server",
                        lambda source, cfg, log_level: seen.update(source=source, cfg=cfg, log_level=log_level))
    res = runner.invoke(app, ["serve", str(tmp_path), "--port", "9123", "--max-batch", "8", "--max-wait-ms", "2",
                              "--no-batching", "--max-queue", "100", "--max-items", "10", "--api-key", "k",
                              "--query-template", "hh", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    cfg = seen["cfg"]
    assert seen["source"] == str(tmp_path)
    assert (cfg.port, cfg.max_batch, cfg.max_wait_ms, cfg.batching, cfg.max_queue, cfg.max_items_per_request,
            cfg.api_key, cfg.query_template, cfg.device) == (9123, 8, 2.0, False, 100, 10, "k", "hh", "cpu")
    bad = runner.invoke(app, ["serve", str(tmp_path), "--max-items", "5000"])
    assert bad.exit_code == 1 and "must not exceed max_queue" in bad.output


def test_serve_ray_replicas_token_budget_and_reload_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "system.json").write_text("{}")
    seen: dict[str, Any] = {}
    monkeypatch.setattr("moerm.serve.ray_serve.run_ray",
                        lambda source, cfg, spec: seen.update(source=source, cfg=cfg, spec=spec))
    res = runner.invoke(app, ["serve", str(tmp_path), "--ray", "--replicas", "3", "--replica-cpus", "2",
                              "--replica-gpus", "0.5", "--max-batch-tokens", "8192", "--reload-poll-s", "0",
                              "--model-name", "rm"])
    assert res.exit_code == 0, res.output
    cfg, spec = seen["cfg"], seen["spec"]
    assert (spec.replicas, spec.cpus, spec.gpus) == (3, 2.0, 0.5)
    assert (cfg.max_batch_tokens, cfg.reload_poll_s, cfg.model_name) == (8192, 0.0, "rm")
    alone = runner.invoke(app, ["serve", str(tmp_path), "--replicas", "2"])
    assert alone.exit_code == 1 and "--replicas needs --ray" in alone.output
    bad = runner.invoke(app, ["serve", str(tmp_path), "--max-batch-tokens", "0"])
    assert bad.exit_code == 1 and "max_batch_tokens must be >= 1" in bad.output
