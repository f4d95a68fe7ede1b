"""Atomic, pickle-free training checkpoints: safetensors for tensors, JSON for everything else."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from moerm.atomic import atomic_save_safetensors, atomic_write_text  # noqa: F401 - re-exported
from moerm.errors import UserError

STEP_DIR = re.compile(r"^step-(\d+)$")


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    root: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write `root/step-N/` via a temporary folder and a rename; keep the newest `keep` checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        _write_checkpoint(tmp, step, model_state, optimizer, scheduler, trainer_state)
    except BaseException as e:  # a failed save leaves no half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise UserError(f"could not write checkpoint {final}: {e.strerror or e} (is {root} writable, "
                            "with free space?)") from None
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_checkpoint(tmp: Path, step: int, model_state: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                      scheduler: Any, trainer_state: dict[str, Any]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    save_file({k: v.contiguous().cpu() for k, v in opt_tensors.items()}, str(tmp / "optimizer.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = s
    save_file(rng, str(tmp / "rng.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
    (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
    # trainer_state.json is written last: a folder without it is incomplete and ignored.
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=2))


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.exists():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "trainer_state.json").exists()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def latest_checkpoint(root: Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def load_latest_checkpoint(root: Path, optimizer: torch.optim.Optimizer, scheduler: Any, device: torch.device,
                           warn: Any = None) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest checkpoint that reads back whole; a corrupt one (truncated file, garbage JSON) is skipped with a
    warning and the one before it is used. None when there is none; an error naming them when none reads."""
    ckpts = list_checkpoints(root)
    errors = []
    for ckpt in reversed(ckpts):
        try:
            state, tstate = load_checkpoint(ckpt, optimizer, scheduler, device)
        except Exception as e:  # noqa: BLE001 - safetensors, json and torch raise many types for a broken file
            errors.append(f"{ckpt}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            if warn is not None:
                warn(f"checkpoint {ckpt} is unreadable ({errors[-1]}); trying the one before it")
            continue
        return ckpt, state, tstate
    if errors:
        raise UserError("no checkpoint under " + str(root) + " reads back whole: " + "; ".join(errors)
                        + ". Start the run again without --resume (into a new --out)")
    return None


def load_checkpoint(path: Path, optimizer: torch.optim.Optimizer, scheduler: Any, device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restore optimizer, scheduler and RNG in place; return the model state and the trainer state."""
    model_state = load_file(str(path / "model.safetensors"), device=str(device))
    opt = _unflatten_optimizer(load_file(str(path / "optimizer.safetensors"), device=str(device)),
                               json.loads((path / "optimizer.json").read_text()))
    optimizer.load_state_dict(opt)
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
        if states:
            torch.cuda.set_rng_state_all(states)
    return model_state, json.loads((path / "trainer_state.json").read_text())
