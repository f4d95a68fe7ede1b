"""Sharded training (train.fsdp, PyTorch FSDP2) for real: `torchrun --nproc_per_node 2` over gloo on tiny models.

2 sharded processes with per-device batch b reach the weights of 1 process with batch 2b and log the same global
metrics (the harness and the exceptions of the DDP test, `test_distributed.py`); full fine-tuning, LoRA on a sharded
base, and routed systems save once in the usual format (the same files as unsharded), load, and score as the
unsharded model does. In process: sharding starts from the main process's values, puts each block and the root under
FSDP, gives only trainable parameters optimizer state, and gives the model back whole (same Parameter objects, no
FSDP left), ready to shard again.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import test_distributed as ddp
from moerm.systems import load_system
from test_distributed import setup  # noqa: F401 - the session's tiny BERT, toy data and runs (`ddp.trained`)

from conftest import toy_pairs

FSDP = ["--set", "train.fsdp.enabled=true"]
# The reference: 1 process with batch 2b, within the DDP test's 1e-5 (baseline, LoRA), or within 1e-4 for ARLISS-top
# (three components; round-off grows with the steps). RODOS's router does not train the same on 2 DDP processes as
# on 1 (measured: 2.9e-3 apart, a DDP matter, not a sharding one), so RODOS is held to DDP on 2 processes, which it
# matched bit for bit when measured; 1e-6 is allowed.
ATOL = {"baseline": 1e-5, "baselora": 1e-5, "rodos": 1e-6, "arliss-top": 1e-4}
AGAINST_DDP = {"rodos"}
CASES = {
    "baseline": ["--system", "baseline"],
    "baselora": ["--system", "baselora", "--set", "train.lr=5e-3"],
    "rodos": ["--system", "rodos", "--set", "components.router.train.epochs=2"],
    # (raw rewards: every training pair trains, as when its 1e-4 was measured; calibration is not what this checks)
    "arliss-top": ["--system", "arliss", "--tuning", "top", "--set", "model.trainable_layers=1",
                   "--set", "components.router.train.epochs=2", "--set", "options.calibration=none"],
}


def _files(model_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(model_dir)) for p in model_dir.rglob("*") if p.is_file())


def _scores(run: Path) -> torch.Tensor:
    system = load_system(run)
    test = toy_pairs(8, seed=99, domain="alpha") + toy_pairs(8, seed=98, domain="beta")
    return torch.tensor(system.score([p.prompt for p in test], [p.chosen for p in test],
                                     [p.domain for p in test]).rewards)


@pytest.mark.parametrize("name", list(CASES))
def test_fsdp_two_processes_equal_one_process_with_the_global_batch_and_score_the_same(setup, name):  # noqa: F811
    """The reference run may be one test_distributed.py trained (`trained`: the same command)."""
    two = setup / f"fsdp2-{name}"
    args = [*CASES[name], "--set", "train.log_every=2"]
    if name in AGAINST_DDP:
        one, _ = ddp.trained(setup, [*args, "--set", "train.batch_size=4"], nproc=2)
    else:
        one, _ = ddp.trained(setup, [*args, "--set", "train.batch_size=8"], nproc=1)
    res = ddp._train(setup, two, [*args, *FSDP, "--set", "train.batch_size=4"], nproc=2)
    assert res.stdout.count("saved ") == 1 and "2 processes" in res.stdout
    assert _files(two / "model") == _files(one / "model")  # today's format: the same files
    w1, w2 = ddp._weights(one / "model"), ddp._weights(two / "model")
    assert w1.keys() == w2.keys()
    for k in w1:
        if not k.endswith(ddp.OFFSET_ONLY):
            torch.testing.assert_close(w2[k], w1[k], atol=ATOL[name], rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
    if name == "baseline":  # full tuning moved the (sharded) backbone, so the equality above means something
        start = load_file(str(setup / "bert" / "model.safetensors"))
        moved = [k for k in start if not k.startswith("pooler.")
                 and not torch.equal(start[k], w2[f"backbone/model.safetensors:{k}"])]
        assert len(moved) > len(start) // 2
    logs = sorted(str(p.relative_to(one)) for p in one.rglob("metrics.jsonl"))
    assert logs and logs == sorted(str(p.relative_to(two)) for p in two.rglob("metrics.jsonl"))
    for log in logs:  # every component's log
        m1, m2 = ddp._metric_lines((one / log).parent), ddp._metric_lines((two / log).parent)
        assert [(ln.get("component"), ln["step"]) for ln in m1] == [(ln.get("component"), ln["step"]) for ln in m2]
        for a, b in zip(m1, m2):  # the sharded log is the global one
            for key in ("loss", "accuracy", "eval_accuracy", "eval_margin_mean"):
                if key in a:
                    assert b[key] == pytest.approx(a[key], abs=max(1e-5, 10 * ATOL[name])), (log, key, a, b)
    s1, s2 = _scores(one), _scores(two)
    torch.testing.assert_close(s2 - s2.mean(), s1 - s1.mean(), atol=max(1e-5, 10 * ATOL[name]), rtol=1e-4)


WORKER = r'''
import json, sys, torch
from transformers import BertConfig, BertModel
from moerm.config import FSDPConfig, TrainConfig
from moerm.train import distributed
from moerm.train.trainer import Trainer
torch.manual_seed(0)
class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=32, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0), add_pooling_layer=False)
        self.head = torch.nn.Linear(16, 1)
    def forward(self, x):
        return self.head(self.bert(x).last_hidden_state[:, 0])[:, 0]
m = M()
m.bert.embeddings.requires_grad_(False)  # a frozen part: sharded, but no gradient and no optimizer state
before = {n: p for n, p in m.named_parameters()}
probe = m.bert.encoder.layer[1].intermediate.dense.weight  # (32, 16): half of its rows in each process's shard
probe0 = probe.detach().clone()
if distributed.rank() == 1:  # the processes disagree (as after dropout drew differently): the main one's values win
    probe.data.add_(1.0)
g = torch.Generator().manual_seed(1)
data = [torch.randint(0, 50, (6,), generator=g) for _ in range(8)]
cfg = TrainConfig(batch_size=2, epochs=1, lr=1e-3, save_every=0, fsdp=FSDPConfig(enabled=True))
step = lambda model, b: ((model(b["x"]) ** 2).mean(), {"accuracy": 0.0})
out = {}
for i in range(2):  # the second Trainer shards the model the first gave back
    tr = Trainer(m, step, data, lambda xs: {"x": torch.stack(xs)}, cfg, sys.argv[1] + f"/{i}", progress=False)
    if i == 0:
        sharded_probe = m.bert.encoder.layer[1].intermediate.dense.weight  # a DTensor now
        out["from_main"] = torch.equal(distributed.full_tensor(sharded_probe.detach()), probe0)
    out[f"sharded{i}"] = sorted({type(mod).__name__ for mod in m.modules() if type(mod).__name__.startswith("FSDP")})
    opt = tr._raw_optimizer()
    out[f"opt_params{i}"] = sum(len(gr["params"]) for gr in opt.param_groups)
    out[f"local_numel{i}"] = sum(p.to_local().numel() for p in m.parameters())
    tr.train()
    out[f"opt_state{i}"] = len(opt.state)
out["trainable"] = sum(p.requires_grad for p in m.parameters())
out["n_params"] = sum(1 for _ in m.parameters())
out["total_numel"] = sum(p.numel() for p in m.parameters())
out["same_objects"] = all(p is before[n] for n, p in m.named_parameters())
out["plain"] = all(type(p) is torch.nn.Parameter for p in m.parameters())
out["left"] = sorted({type(mod).__name__ for mod in m.modules() if type(mod).__name__.startswith("FSDP")})
out["hooks"] = sum(len(mod._forward_pre_hooks) + len(mod._forward_hooks) for mod in m.modules())
out["head"] = m.head.weight.detach().flatten().tolist()
if distributed.is_main():
    open(sys.argv[1] + "/out.json", "w").write(json.dumps(out))
'''


def test_shard_then_give_back_whole(tmp_path):
    (tmp_path / "w.py").write_text(WORKER)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([str(ddp.TORCHRUN), "--standalone", "--nproc_per_node=2", str(tmp_path / "w.py"),
                          str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    out = json.loads((tmp_path / "out.json").read_text())
    for i in range(2):
        assert out[f"sharded{i}"] == ["FSDPBertLayer", "FSDPM"]  # each block, then the root
        assert out[f"opt_params{i}"] == out["trainable"] < out["n_params"]  # trainable parameters only
        assert out[f"opt_state{i}"] == out["trainable"]
        assert out[f"local_numel{i}"] <= out["total_numel"] // 2 + 64  # each process holds about half
    assert out["from_main"]  # sharded from the main process's values, as DDP starts
    assert out["same_objects"] and out["plain"] and out["left"] == [] and out["hooks"] == 0
    assert len(out["head"]) == 16


def test_fsdp_options_bf16_cpu_offload_no_reshard_train_evaluate_checkpoint_and_save(setup):  # noqa: F811
    """bf16 gathers, CPU offload, reshard_after_forward off, gradient accumulation and evaluation between steps (a
    forward with no backward leaves blocks gathered: they are resharded before the next checkpoint)."""
    run = setup / "fsdp-options"
    ddp._train(setup, run, ["--system", "baseline", *FSDP, "--set", "train.fsdp.mixed_precision=bf16",
                            "--set", "train.fsdp.cpu_offload=true", "--set", "train.fsdp.reshard_after_forward=false",
                            "--set", "train.grad_accum=2", "--set", "train.eval_every=2", "--set", "train.save_every=4",
                            "--set", "train.log_every=2"], nproc=2)
    assert _files(run / "model") == ["backbone/config.json", "backbone/model.safetensors", "backbone/tokenizer.json",
                                     "backbone/tokenizer_config.json", "head.safetensors", "system.json"]
    evals = [ln for ln in ddp._metric_lines(run) if "eval_accuracy" in ln]
    assert len(evals) >= 2  # evaluated between steps, then trained on
    weights = ddp._weights(run / "model")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())  # fp32 masters
    assert torch.isfinite(_scores(run)).all()
