"""Killed for real under a 2-process CPU launch (`ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2`), with DDP and
with sharded training (train.fsdp): `kill -9` the whole launch after a checkpoint, leave what a kill during the next
checkpoint write leaves, resume, and reach bit for bit the weights and log of a run that was never interrupted.
A sharded run's gathered checkpoint also resumes on another number of processes when the pairs per step stay the
same, and says clearly that it cannot otherwise; a sharded checkpoint (train.fsdp.checkpoint=sharded, each process's
own shards) resumes bit-exact on as many processes, and says clearly that it cannot on another number."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from moerm.cli import app
from moerm.data.readers import write_jsonl

from conftest import toy_pairs

TORCHRUN = Path(sys.executable).with_name("torchrun")
FSDP = ["--set", "train.fsdp.enabled=true"]


def _cmd(tiny_bert: str, data: Path, out: Path, nproc: int, batch: int, *extra: str) -> list[str]:
    launcher = [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    return [*launcher, "-m", "moerm.cli", "train", "--backbone", tiny_bert, "--data", str(data), "--out", str(out),
            "--no-progress", "--no-eval", "--set", "model.max_length=32", "--set", f"train.batch_size={batch}",
            "--set", "train.epochs=3", "--set", "train.save_every=2", "--set", "train.log_every=1", *extra]


def _one_process(tiny_bert: str, data: Path, out: Path, batch: int, *extra: str):
    """The 1-process command of `_cmd`, run in this process (a fresh interpreter would only add its imports): its
    exit code and output (stdout and stderr)."""
    launcher = [sys.executable, "-m", "moerm.cli"]
    cmd = _cmd(tiny_bert, data, out, 1, batch, *extra)
    assert cmd[: len(launcher)] == launcher
    return CliRunner().invoke(app, cmd[len(launcher):])


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true",
            "MOERM_CACHE": str(tmp / "cache")}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((run / "model").rglob("*.safetensors")):
        out.update({f"{f.relative_to(run / 'model')}:{k}": v for k, v in load_file(str(f)).items()})
    assert out
    return out


def _losses(run: Path) -> list[tuple[int, float]]:
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [(ln["step"], ln["loss"]) for ln in lines if "loss" in ln]


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun's workers run in sessions of their own, out of reach of its group)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _killed_run(tiny_bert: str, data: Path, run: Path, tmp: Path, extra: list[str]) -> None:
    """Start a 2-process run, kill -9 the launcher and both workers once two checkpoints are complete, then leave what
    a kill during the next checkpoint write leaves: a temporary folder, and a step folder without its last file."""
    proc = subprocess.Popen(_cmd(tiny_bert, data, run, 2, 2, *extra), env=_env(tmp), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    ckpts = run / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in ckpts.glob("step-*") if (p / "trainer_state.json").exists()] if ckpts.exists() else []
        if len(done) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be killed: make the run longer"
    workers = _descendants(proc.pid)
    for pid in [proc.pid, *workers]:  # the launcher and every worker at once, as an OOM kill or a power cut would
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    while any(_alive(pid) for pid in workers):
        time.sleep(0.05)
    assert not (run / "model").exists()
    latest = max(p for p in ckpts.glob("step-*") if (p / "trainer_state.json").exists())
    step = int(latest.name.split("-")[1])
    half = ckpts / f"step-{step + 1:07d}"  # a later step folder cut short: no trainer_state.json
    shutil.copytree(latest, half)
    (half / "trainer_state.json").unlink()
    for f in half.glob("optimizer*.safetensors"):  # gathered: optimizer.safetensors; sharded: one per process
        f.write_bytes(b"\0" * 10)
    tmp = ckpts / f".tmp-step-{step + 2:07d}-sharded"  # what a sharded save killed after the shards leaves
    tmp.mkdir(exist_ok=True)
    for f in latest.glob("*.rank*"):
        shutil.copy(f, tmp / f.name)
    shutil.copytree(latest, ckpts / f".tmp-step-{step + 3:07d}-12345")


SHARDED = ["--set", "train.fsdp.checkpoint=sharded"]
MODES = {"ddp": [], "fsdp": FSDP, "fsdp-sharded": [*FSDP, *SHARDED]}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, tiny_bert: str):
    """The training data, and `reference(extra)`: the run never interrupted, trained once per setup. The checkpoint
    layout does not change training, so fsdp-sharded is held to the fsdp run (gathered checkpoints), bit for bit."""
    root = tmp_path_factory.mktemp("uninterrupted")
    data = root / "data"
    write_jsonl(toy_pairs(40, seed=1, domain="alpha"), data / "alpha" / "train.jsonl")
    made: dict[tuple[str, ...], Path] = {}

    def reference(extra: list[str]) -> Path:
        key = tuple(extra)
        if key not in made:
            made[key] = root / f"ref-{len(made)}"
            subprocess.run(_cmd(tiny_bert, data, made[key], 2, 2, *key), env=_env(root), check=True,
                           capture_output=True, timeout=600)
        return made[key]

    return data, reference


@pytest.mark.parametrize("mode", list(MODES))
def test_two_process_run_killed_resumes_bit_exact(tmp_path, tiny_bert, uninterrupted, mode, monkeypatch):
    """Before the fix the resume failed: 'SafetensorError: device cpu:0 is invalid' (each CPU process's device).
    fsdp-sharded: each process wrote its own shards; they resume on 2 processes and refuse 1, saying why."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # as `_env` gives the launches (the 1-process runs are in here)
    extra = MODES[mode]
    data, reference = uninterrupted
    ref = reference(FSDP if mode == "fsdp-sharded" else extra)  # the same training, gathered checkpoints
    run = tmp_path / "run"
    _killed_run(tiny_bert, data, run, tmp_path, extra)
    if mode == "fsdp":
        ckpt = max(p for p in (run / "checkpoints").glob("step-*") if (p / "trainer_state.json").exists())
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["sharded"] and state["processes"] == 2
        assert json.loads((ckpt / "optimizer.json").read_text())["keys"] == "name"  # gathered, keyed by name
        moved = tmp_path / "moved"  # a copy to resume on one process below
        shutil.copytree(run, moved)
    if mode == "fsdp-sharded":
        ckpt = max(p for p in (run / "checkpoints").glob("step-*") if (p / "trainer_state.json").exists())
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["checkpoint"] == "sharded" and state["processes"] == 2
        assert not (ckpt / "model.safetensors").exists()
        shards = [load_file(str(ckpt / f"model.rank{r}.safetensors")) for r in (0, 1)]
        assert shards[0].keys() == shards[1].keys()
        assert any(shards[0][k].shape != shards[1][k].shape or not torch.equal(shards[0][k], shards[1][k])
                   for k in shards[0])  # each process's own shard, not the whole weights twice
        moved = tmp_path / "moved"
        shutil.copytree(run, moved)
    res = subprocess.run(_cmd(tiny_bert, data, run, 2, 2, *extra, "--resume"), env=_env(tmp_path),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    a, b = _weights(ref), _weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _losses(run) == _losses(ref)
    if mode == "fsdp-sharded":  # 2 -> 1 process: refused with what to do, whatever the batch; nothing changed
        before = sorted(p.relative_to(moved) for p in moved.rglob("*"))
        bad = _one_process(tiny_bert, data, moved, 4, *extra, "--resume")
        assert bad.exit_code == 1, bad.output[-3000:]
        said = " ".join(bad.output.split())
        assert "is sharded over 2 processes" in said and "Resume on 2 processes" in said, said[-1500:]
        assert sorted(p.relative_to(moved) for p in moved.rglob("*")) == before
    if mode == "fsdp":
        # N=2 -> M=1: one process with batch 4 sees the same pairs per step; batch 2 would not, and says so
        bad = _one_process(tiny_bert, data, moved, 2, *extra, "--resume")
        assert bad.exit_code == 1, bad.output[-3000:]
        assert "written by 2 processes x batch 2" in bad.output
        assert "train.batch_size: 4" in bad.output
        saved = yaml.safe_load((moved / "config.yaml").read_text())  # a resume reads the run's config
        saved["train"]["batch_size"] = 4
        (moved / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
        ok = _one_process(tiny_bert, data, moved, 4, *extra, "--resume")
        assert ok.exit_code == 0, ok.output[-3000:]
        # it continued from the checkpoint to the same end (dropout draws differ per process, so not the same bits)
        resumed = _losses(moved)
        assert [s for s, _ in resumed] == [s for s, _ in _losses(ref)]
        assert resumed[: state["step"]] == _losses(ref)[: state["step"]]
        assert _weights(moved).keys() == a.keys()
