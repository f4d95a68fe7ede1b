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
