"""Atomic, pickle-free training checkpoints: safetensors for tensors, JSON for everything else."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from moerm.atomic import atomic_save_safetensors, atomic_write_text  # noqa: F401 - re-exported
from moerm.errors import UserError

STEP_DIR = re.compile(r"^step-(\d+)$")


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors as `<param>.<key>` (param: an index, or a parameter name for a name-keyed state), the rest as JSON."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    keys = "name" if any(isinstance(pid, str) for pid in state["state"]) else "index"
    meta = {"param_groups": state["param_groups"], "scalars": scalars, "keys": keys}
    if "local" in state:  # a process's shards (`distributed.local_optimizer_state`): which entries were shards
        meta["local"] = state["local"]
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    by_name = meta.get("keys") == "name"
    state: dict[Any, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.rsplit(".", 1)  # a state key (exp_avg, step) has no dot; a parameter name may
        state.setdefault(pid if by_name else int(pid), {})[key] = value
    for pid, values in meta["scalars"].items():
        state.setdefault(pid if by_name else int(pid), {}).update(values)
    out = {"state": state, "param_groups": meta["param_groups"]}
    if "local" in meta:
        out["local"] = meta["local"]
    return out


def optimizer_state_keys(path: Path) -> str:
    """How a checkpoint's optimizer state is keyed: `index` (torch's own state dict) or `name` (gathered shards)."""
    return json.loads((path / "optimizer.json").read_text()).get("keys", "index")


def save_checkpoint(
    root: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler: Any,
    trainer_state: dict[str, Any],
    keep: int = 2,
    rng: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `root/step-N/` via a temporary folder and a rename; keep the newest `keep` checkpoints.

    `optimizer_state` is an optimizer's `state_dict()`, or (sharded training) the whole state keyed by parameter
    name, as `distributed.full_optimizer_state` gathers it."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        _write_checkpoint(tmp, step, model_state, optimizer_state, scheduler, trainer_state, rng)
    except BaseException as e:  # a failed save leaves no half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise UserError(f"could not write checkpoint {final}: {e.strerror or e} (is {root} writable, "
                            "with free space?)") from None
        raise
    _commit(tmp, final, root, keep)
    return final


def _commit(tmp: Path, final: Path, root: Path, keep: int) -> None:
    """Make a complete temporary checkpoint folder the step folder (one rename), then keep the newest `keep`."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def save_sharded_checkpoint(
    root: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler: Any,
    trainer_state: dict[str, Any],
    keep: int = 2,
    rng: dict[str, torch.Tensor] | None = None,
) -> Path:
    """A sharded run's checkpoint, written by every process (each calls this): its own shards as
    `model.rank<r>.safetensors` and `optimizer.rank<r>.{safetensors,json}` (`distributed.local_trainable_state`,
    `local_optimizer_state`), into one temporary folder; the main process then writes the rest, trainer_state.json
    last, and renames the folder. A kill at any point leaves the temporary folder, never a step folder that looks
    complete. Resumable on the same number of processes only (`load_checkpoint` says so otherwise)."""
    from moerm.train import distributed

    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}-sharded"
    main, rank = distributed.is_main(), distributed.rank()
    if main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    distributed.barrier()
    try:
        save_file({k: v.contiguous() for k, v in model_state.items()}, str(tmp / f"model.rank{rank}.safetensors"))
        opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
        save_file({k: v.contiguous() for k, v in opt_tensors.items()}, str(tmp / f"optimizer.rank{rank}.safetensors"))
        (tmp / f"optimizer.rank{rank}.json").write_text(json.dumps(opt_meta))
    except OSError as e:
        raise UserError(f"could not write checkpoint {final}: {e.strerror or e} (is {root} writable, with free "
                        "space?)") from None
    distributed.barrier()  # every process's shards are on disk
    if main:
        save_file(rng if rng is not None else rng_state(), str(tmp / "rng.safetensors"))
        (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        state = {"step": step, **trainer_state, "checkpoint": "sharded", "processes": distributed.world_size()}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))  # last: the folder is complete
        _commit(tmp, final, root, keep)
    return final


def rng_state() -> dict[str, torch.Tensor]:
    """This process's random generators: the CPU one, and its current GPU's."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def per_rank_rng(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Every process's generators (`states[r]` from rank r) as one file's tensors: `torch.rank<r>`, `cuda.rank<r>`.
    Processes draw different dropout masks, so each must get its own state back for a bit-exact resume."""
    return {f"{k}.rank{r}": v for r, state in enumerate(states) for k, v in state.items()}


def _restore_rng(rng: dict[str, torch.Tensor], rank: int) -> None:
    """Set this process's generators from a checkpoint: its own rank's, or (an older or a 1-process checkpoint, or a
    rank the writer did not have) the main process's."""
    cpu = rng.get(f"torch.rank{rank}", rng.get("torch.rank0", rng.get("torch")))
    if cpu is not None:
        torch.set_rng_state(cpu)
    if torch.cuda.is_available():
        gpu = rng.get(f"cuda.rank{rank}", rng.get("cuda.rank0", rng.get("cuda")))
        if gpu is not None:
            torch.cuda.set_rng_state(gpu)
        else:  # written before per-rank states: every device's state from the main process
            states = [rng[k] for k in sorted(rng) if k.startswith("cuda") and k[4:].isdigit()]
            if states:
                torch.cuda.set_rng_state_all(states)


def _write_checkpoint(tmp: Path, step: int, model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                      scheduler: Any, trainer_state: dict[str, Any], rng: dict[str, torch.Tensor] | None) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
    opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
    save_file({k: v.contiguous().cpu() for k, v in opt_tensors.items()}, str(tmp / "optimizer.safetensors"))
    save_file(rng if rng is not None else rng_state(), str(tmp / "rng.safetensors"))
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


def load_latest_checkpoint(root: Path, load_optimizer: Callable[[dict[str, Any]], None], scheduler: Any,
                           device: torch.device, warn: Any = None, rank: int = 0,
                           world: int = 1) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest checkpoint that reads back whole; a corrupt one (truncated file, garbage JSON) is skipped with a
    warning and the one before it is used. None when there is none; an error naming them when none reads."""
    ckpts = list_checkpoints(root)
    errors = []
    for ckpt in reversed(ckpts):
        try:
            state, tstate = load_checkpoint(ckpt, load_optimizer, scheduler, device, rank, world)
        except UserError:  # readable, but not resumable here (a sharded checkpoint of another number of processes)
            raise
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


def _load_tensors(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors on `device`. Read on the CPU, then moved: safetensors names devices its own way
    and refuses an indexed CPU device ("cpu:0", which a multi-process CPU launch gives every process)."""
    return {k: v.to(device) for k, v in load_file(str(path), device="cpu").items()}


def load_checkpoint(path: Path, load_optimizer: Callable[[dict[str, Any]], None], scheduler: Any, device: torch.device,
                    rank: int = 0, world: int = 1) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restore optimizer (`load_optimizer` applies its state dict), scheduler and RNG; return the model state and the
    trainer state. A sharded checkpoint (`save_sharded_checkpoint`) gives this process's shards, and only on as many
    processes as wrote it."""
    tstate = json.loads((path / "trainer_state.json").read_text())
    if tstate.get("checkpoint") == "sharded":
        n = tstate["processes"]
        if n != world:
            raise UserError(f"checkpoint {path} is sharded over {n} processes (train.fsdp.checkpoint: sharded) and "
                            f"this run has {world}: a sharded checkpoint resumes on the same number of processes "
                            f"only. Resume on {n} processes, or start again without --resume (a gathered "
                            "checkpoint, train.fsdp.checkpoint: gathered, resumes on any number)")
        model_state = _load_tensors(path / f"model.rank{rank}.safetensors", device)
        opt = _unflatten_optimizer(_load_tensors(path / f"optimizer.rank{rank}.safetensors", device),
                                   json.loads((path / f"optimizer.rank{rank}.json").read_text()))
    else:
        model_state = _load_tensors(path / "model.safetensors", device)
        opt = _unflatten_optimizer(_load_tensors(path / "optimizer.safetensors", device),
                                   json.loads((path / "optimizer.json").read_text()))
    load_optimizer(opt)
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    _restore_rng(load_file(str(path / "rng.safetensors")), rank)
    return model_state, tstate
