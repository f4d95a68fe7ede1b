"""Killed for real: `kill -9` a training process after a checkpoint, resume it, and reach the weights of a run that
was never interrupted; a checkpoint write cut short leaves folders that resume ignores."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from moerm.data.readers import write_jsonl

from conftest import toy_pairs


def _cmd(tiny_bert: str, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "moerm.cli", "train", "--backbone", tiny_bert, "--data", str(data), "--out",
            str(out), "--no-progress", "--no-eval", "--set", "model.max_length=32", "--set", "train.batch_size=2",
            "--set", "train.epochs=3", "--set", "train.save_every=2", "--set", "train.log_every=1", *extra]


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MOERM_CACHE": str(tmp / "cache")}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((run / "model").rglob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return out


def test_kill_9_during_training_then_resume_gives_the_uninterrupted_weights(tmp_path, tiny_bert):
    data = tmp_path / "data"
    write_jsonl(toy_pairs(40, seed=1, domain="alpha"), data / "alpha" / "train.jsonl")
    ref = tmp_path / "ref"
    subprocess.run(_cmd(tiny_bert, data, ref), env=_env(tmp_path), check=True, capture_output=True, timeout=300)

    run = tmp_path / "run"
    proc = subprocess.Popen(_cmd(tiny_bert, data, run), env=_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpts = run / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # wait for a second complete checkpoint, then kill -9
        done = [p for p in ckpts.glob("step-*") if (p / "trainer_state.json").exists()] if ckpts.exists() else []
        if len(done) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be killed: make the run longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (run / "model").exists()
    res = subprocess.run(_cmd(tiny_bert, data, run, "--resume"), env=_env(tmp_path), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = _weights(ref), _weights(run)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


def test_a_checkpoint_write_cut_short_is_ignored_on_resume(tmp_path):
    from moerm.train.checkpoint import latest_checkpoint, list_checkpoints

    root = tmp_path / "checkpoints"
    (root / "step-0000002").mkdir(parents=True)
    (root / "step-0000002" / "trainer_state.json").write_text('{"step": 2}')
    (root / ".tmp-step-0000004-123").mkdir()  # killed while writing: the temporary folder
    (root / "step-0000006").mkdir()  # a folder without trainer_state.json: never completed
    (root / "step-0000006" / "model.safetensors").write_bytes(b"half")
    assert [p.name for p in list_checkpoints(root)] == ["step-0000002"]
    assert latest_checkpoint(root) == root / "step-0000002"
