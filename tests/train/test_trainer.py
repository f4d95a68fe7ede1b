import json

import pytest
import torch

from moerm.config import TrainConfig
from moerm.train.checkpoint import list_checkpoints
from moerm.train.trainer import Trainer, TrainingInterrupted

from conftest import toy_pairs, reward_trainer


def _setup(tiny_bert, out, cfg, stop=None):
    return reward_trainer(tiny_bert, out, cfg, toy_pairs(40, seed=3), 48, toy_pairs(16, seed=4), stop)


def test_resume_after_interruption_matches_uninterrupted_run(tiny_bert, tmp_path):
    cfg = TrainConfig(lr=5e-4, batch_size=8, grad_accum=2, epochs=3, save_every=2, log_every=1, seed=5)
    ref_model, ref = _setup(tiny_bert, tmp_path / "ref", cfg)
    ref_result = ref.train()

    _, killed = _setup(tiny_bert, tmp_path / "run", cfg, stop=4)
    with pytest.raises(TrainingInterrupted):
        killed.train()
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-0000002", "step-0000004"]

    model, resumed = _setup(tiny_bert, tmp_path / "run", cfg)  # a new process would rebuild from scratch
    result = resumed.train(resume=True)
    assert result.resumed_from == 4 and result.steps == ref_result.steps == 9  # 3 epochs x ceil(5 batches / 2)
    for (n, a), (_, b) in zip(ref_model.state_dict().items(), model.state_dict().items()):
        torch.testing.assert_close(a, b, msg=f"{n} differs after resume")
    assert result.final_metrics == ref_result.final_metrics
    steps = [json.loads(l)["step"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ref_steps = [json.loads(l)["step"] for l in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert steps == ref_steps  # lines written after the last checkpoint of the killed run were dropped


def test_training_changes_parameters_and_learns_direction(tiny_bert, tmp_path):
    cfg = TrainConfig(lr=5e-4, batch_size=8, epochs=4, save_every=0)
    model, trainer = _setup(tiny_bert, tmp_path, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = trainer.train()
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert "head.net.1.weight" in changed and any(n.startswith("backbone.") for n in changed)
    assert result.final_metrics["eval_accuracy"] >= 0.9
    assert result.final_metrics["eval_margin_mean"] > 0  # chosen above rejected, not the reverse


def test_checkpoints_are_atomic_and_pruned(tiny_bert, tmp_path):
    cfg = TrainConfig(lr=1e-4, batch_size=8, epochs=2, save_every=1, keep_checkpoints=2)
    _, trainer = _setup(tiny_bert, tmp_path, cfg)
    (tmp_path / "checkpoints").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-0000099").mkdir()  # a half-written folder (no trainer_state.json)
    trainer.train()
    names = [p.name for p in list_checkpoints(tmp_path / "checkpoints")]
    assert names == ["step-0000009", "step-0000010"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


class _Scalar(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))


def _grads_per_step(tmp_path, n_batches: int, accum: int) -> list[float]:
    """Each micro-batch's loss is w * 1, so a step's accumulated gradient is the sum of its micro-batch weights."""
    model = _Scalar()
    cfg = TrainConfig(lr=1e-3, batch_size=1, grad_accum=accum, epochs=1, save_every=0, max_grad_norm=0.0,
                      weight_decay=0.0, warmup_ratio=0.0)
    trainer = Trainer(model, lambda m, b: (m.w * 1.0, {}), list(range(n_batches)), lambda b: {}, cfg, tmp_path,
                      progress=False)
    grads: list[float] = []
    real_step = trainer.optimizer.step

    def step(*a, **k):
        grads.append(float(model.w.grad))
        return real_step(*a, **k)

    trainer.optimizer.step = step
    trainer.train()
    return grads


def test_grad_accumulation_weights_a_short_last_group_like_a_full_one(tmp_path):
    # 6 micro-batches, accumulation 4: groups of 4 and 2; each step averages its own micro-batches (weights sum to 1)
    assert _grads_per_step(tmp_path / "a", 6, 4) == pytest.approx([1.0, 1.0])
    assert _grads_per_step(tmp_path / "b", 5, 2) == pytest.approx([1.0, 1.0, 1.0])


def test_fp16_grad_scaler_state_survives_resume(tiny_bert, tmp_path):
    """accelerate makes a GradScaler only for fp16 on a GPU; here a CPU one stands in for it."""
    cfg = TrainConfig(lr=5e-4, batch_size=8, epochs=2, save_every=2, log_every=1, seed=5)
    _, killed = _setup(tiny_bert, tmp_path / "run", cfg, stop=2)
    killed.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=77.0, growth_interval=1000)
    with pytest.raises(TrainingInterrupted):
        killed.train()
    state = json.loads((list_checkpoints(tmp_path / "run" / "checkpoints")[-1] / "trainer_state.json").read_text())
    assert state["grad_scaler"]["scale"] == 77.0
    _, resumed = _setup(tiny_bert, tmp_path / "run", cfg, stop=4)
    resumed.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    with pytest.raises(TrainingInterrupted):
        resumed.train(resume=True)
    assert resumed.accelerator.scaler.get_scale() == 77.0
