"""Experiment trackers for training (`train.report_to`), through accelerate's trackers.

    train:
      report_to: tensorboard          # or wandb, mlflow, several comma-separated ("tensorboard,wandb"), or none

Every line the trainer writes to a component's `metrics.jsonl` also goes to the trackers, from the main process
only: `train/loss`, `train/accuracy`, `train/lr` (and token counts) every `log_every` steps, `eval/<metric>` (held-out
accuracy, margins, ...) at each evaluation, at the step they belong to. Each component (`rm:math`, `router`, ...) is
its own tracker run, named `<run folder>/<component>`, so its curves stay apart; the trackers write under the
component's folder (`<component out>/tracking/`; TensorBoard: `tensorboard --logdir runs/X`). wandb and mlflow read
their own settings from the environment (WANDB_MODE=offline, MLFLOW_TRACKING_URI, ...) and must be installed
(`pip install wandb` / `mlflow`); TensorBoard needs `tensorboard`.

A resumed run logs the steps after its checkpoint again: metrics.jsonl drops the killed run's later lines, but
trackers keep what they were sent (TensorBoard shows the later value of a step twice logged).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moerm.errors import UserError

TRACKERS = ("tensorboard", "wandb", "mlflow")
TRACKING_DIR = "tracking"
_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def parse_report_to(value: str | None) -> list[str]:
    """`train.report_to` as a list of tracker names ([] for none).

    Raises:
        UserError: an unknown name.
    """
    names = [n.strip().lower() for n in (value or "none").split(",") if n.strip()]
    names = [n for n in names if n != "none"]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise UserError(f"train.report_to: unknown tracker {unknown[0]!r}; use none or {', '.join(TRACKERS)} "
                        "(comma-separated for several)")
    return list(dict.fromkeys(names))


def check_installed(names: list[str]) -> None:
    """Fail before training, not at its first log line, when a tracker's package is missing."""
    import importlib.util

    for name in names:
        if importlib.util.find_spec(_PACKAGE[name]) is None and not (
                name == "tensorboard" and importlib.util.find_spec("tensorboardX") is not None):
            raise UserError(f"train.report_to: {name} needs the {_PACKAGE[name]} package (pip install "
                            f"{_PACKAGE[name]})")


def accelerator_kwargs(report_to: str | None, out_dir: Path) -> dict[str, Any]:
    """What `Accelerator(...)` takes to log to `report_to`'s trackers under `out_dir/tracking`."""
    names = parse_report_to(report_to)
    if not names:
        return {}
    check_installed(names)
    return {"log_with": names, "project_dir": str(Path(out_dir) / TRACKING_DIR)}


def run_name(out_dir: Path, component: str) -> str:
    """`<run folder>/<component>` with characters trackers dislike replaced (`rm:math` -> `rm-math`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{Path(out_dir).name}-{component}").strip("-")


def start(accelerator: Any, out_dir: Path, component: str, config: Mapping[str, Any]) -> None:
    """Open the trackers' run for one component (a no-op without trackers)."""
    if getattr(accelerator, "log_with", None):
        scalars = {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool)) and v is not None}
        accelerator.init_trackers(run_name(out_dir, component), config=scalars)


def values(record: Mapping[str, Any]) -> dict[str, float]:
    """A metrics.jsonl line as tracker scalars: `eval_<m>` -> `eval/<m>`, other numbers -> `train/<name>`."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in ("step", "epoch", "component") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"] = float(value)
    return out


def log(accelerator: Any, record: Mapping[str, Any]) -> None:
    """Send one metrics line to the trackers at its step (main process; a no-op without trackers)."""
    if getattr(accelerator, "log_with", None) and accelerator.is_main_process:
        scalars = values(record)
        if scalars:
            accelerator.log(scalars, step=int(record.get("step", 0)))


def finish(accelerator: Any) -> None:
    """Flush and close the trackers (a no-op without trackers)."""
    if getattr(accelerator, "log_with", None):
        accelerator.end_training()
