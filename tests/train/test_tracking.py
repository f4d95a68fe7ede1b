"""train.report_to: the trainer's metrics lines reach accelerate's trackers; tested offline with TensorBoard's own
event files (read back with tensorboard's EventAccumulator)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import reward_trainer, toy_pairs
from moerm.config import TrainConfig
from moerm.errors import UserError
from moerm.train.tracking import parse_report_to, values


def test_report_to_names() -> None:
    assert parse_report_to("none") == [] and parse_report_to(None) == []
    assert parse_report_to("TensorBoard, wandb,tensorboard") == ["tensorboard", "wandb"]
    with pytest.raises(UserError, match="unknown tracker 'comet'"):
        TrainConfig(report_to="comet")
    assert values({"step": 3, "component": "rm:a", "epoch": 0, "loss": 0.5, "lr": 1e-4, "eval_accuracy": 0.75}) == {
        "train/loss": 0.5, "train/lr": 1e-4, "eval/accuracy": 0.75}


def test_tensorboard_event_files_hold_the_metrics_lines(tiny_bert: str, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = TrainConfig(lr=5e-4, batch_size=8, epochs=2, save_every=0, log_every=1, eval_every=2, seed=1,
                      report_to="tensorboard")
    _, trainer = reward_trainer(tiny_bert, tmp_path / "run", cfg, toy_pairs(24, seed=3), 48, toy_pairs(8, seed=4))
    trainer.train()
    lines = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    events = list((tmp_path / "run" / "tracking" / "run-train").glob("events.out.tfevents.*"))  # <run>-<component>
    assert len(events) == 1  # (the config's hparams go to a subfolder of their own)
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/accuracy", "train/lr", "eval/accuracy"} <= tags
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("eval/accuracy", "eval_accuracy")):
        logged = {(ln["step"], round(ln[key], 5)) for ln in lines if key in ln}
        seen = {(e.step, round(e.value, 5)) for e in acc.Scalars(tag)}
        assert seen == logged and logged, tag
