"""`train.group_by_length`: batches of similar length (less padding), reproducible, resumable, multi-process exact;
and the real/padded token counts the trainer logs."""

import dataclasses
import json
import random

import pytest
import torch
from conftest import toy_pairs, reward_trainer

from moerm.config import ConfigError, TrainConfig
from moerm.encoding import make_encoder
from moerm.train.pairwise import (
    FeaturePairs,
    TokenPairs,
)
from moerm.train.trainer import Trainer, TrainingInterrupted, epoch_batches


def _lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(5, 500) for _ in range(n)]


def _pad_waste(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)


def _old_epoch_batches(n, seed, epoch, bs, world=1, rank=0):
    """The trainer's batch order before grouping existed, verbatim."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if world > 1:
        usable = len(order) // world * world
        order = order[rank:usable:world]
    return [order[i : i + bs] for i in range(0, len(order), bs)]


def test_grouped_batches_have_far_less_padding_than_random_ones():
    lengths = _lengths(2000)
    grouped = epoch_batches(2000, seed=0, epoch=0, batch_size=8, lengths=lengths)
    plain = epoch_batches(2000, seed=0, epoch=0, batch_size=8)
    assert _pad_waste(grouped, lengths) < 0.05 * _pad_waste(plain, lengths)
    assert all(len(b) == 8 for b in grouped)


def test_ungrouped_order_is_exactly_the_old_one():
    for n, bs, world in ((40, 8, 1), (37, 4, 1), (41, 4, 2), (50, 3, 3)):
        for rank in range(world):
            for epoch in (0, 1):
                assert epoch_batches(n, 5, epoch, bs, world, rank) == _old_epoch_batches(n, 5, epoch, bs, world, rank)


def test_grouped_order_is_a_pure_function_of_seed_and_epoch():
    lengths = _lengths(300)
    a = epoch_batches(300, seed=3, epoch=0, batch_size=4, lengths=lengths)
    assert a == epoch_batches(300, seed=3, epoch=0, batch_size=4, lengths=list(lengths))
    assert a != epoch_batches(300, seed=3, epoch=1, batch_size=4, lengths=lengths)
    assert a != epoch_batches(300, seed=4, epoch=0, batch_size=4, lengths=lengths)


@pytest.mark.parametrize("n,bs", [(300, 4), (301, 7), (5, 8), (1000, 3)])
def test_every_example_appears_exactly_once_per_epoch(n, bs):
    lengths = _lengths(n, seed=n)
    for epoch in range(3):
        batches = epoch_batches(n, seed=1, epoch=epoch, batch_size=bs, lengths=lengths, mega_factor=2)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(n))
        assert all(len(b) == bs for b in batches[:-1]) and 1 <= len(batches[-1]) <= bs  # a short one only last


@pytest.mark.parametrize("world", [2, 3])
def test_processes_split_each_global_batch_of_one_process_with_the_global_batch(world):
    n, bs = 203, 4
    lengths = _lengths(n, seed=7)
    for grouped in (None, lengths):  # n not divisible by world: the tail is dropped
        ranks = [epoch_batches(n, seed=2, epoch=1, batch_size=bs, world=world, rank=r, lengths=grouped)
                 for r in range(world)]
        assert len({len(r) for r in ranks}) == 1  # every process runs as many steps
        steps = list(zip(*ranks))
        assert all(len({len(b) for b in step}) == 1 for step in steps)  # of equal size, so the mean of means is global
        seen = [i for step in steps for b in step for i in b]
        assert len(seen) == len(set(seen)) == n // world * world  # disjoint, the tail dropped
    # one process with the global batch sees, step by step, the pairs the processes see together
    n = 204  # divisible by every world here: no tail to drop
    lengths = _lengths(n, seed=8)
    one = epoch_batches(n, seed=2, epoch=0, batch_size=world * bs, lengths=lengths)
    ranks = [epoch_batches(n, seed=2, epoch=0, batch_size=bs, world=world, rank=r, lengths=lengths)
             for r in range(world)]
    assert [sorted(i for b in step for i in b) for step in zip(*ranks)] == [sorted(b) for b in one]
    assert [list(step) for step in zip(*ranks)] == [[b[r::world] for r in range(world)] for b in one]


def test_group_by_length_config():
    assert TrainConfig().group_by_length is False
    with pytest.raises(ConfigError, match="group_by_length"):
        TrainConfig(group_by_length="yes")


# ---------------------------------------------------------------------------------------- token counts, by hand


class _Scalar(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))


class _Lengths(list):
    """Items are their own lengths; collate pads them into an attention mask, as a tokenised batch would be."""

    def lengths(self) -> list[int]:
        return list(self)


def _mask_collate(batch: list[int]) -> dict[str, torch.Tensor]:
    width = max(batch)
    return {"attention_mask": torch.tensor([[1] * n + [0] * (width - n) for n in batch])}


def _scalar_run(tmp_path, data, **cfg_kw):
    cfg = TrainConfig(**{"lr": 1e-3, "max_grad_norm": 0.0, "warmup_ratio": 0.0, "save_every": 0, "log_every": 1,
                         **cfg_kw})
    trainer = Trainer(_Scalar(), lambda m, b: (m.w * 1.0, {}), data, _mask_collate, cfg, tmp_path, progress=False)
    result = trainer.train()
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return trainer, result, lines


def test_token_counts_logged_are_right_by_hand(tmp_path):
    # one batch of all four per epoch: real 1+2+3+6 = 12, padded 4 rows x 6 = 24
    _, result, lines = _scalar_run(tmp_path / "a", _Lengths([1, 2, 3, 6]), batch_size=4, epochs=2)
    assert [(ln["tokens_real"], ln["tokens_padded"]) for ln in lines] == [(12, 24), (12, 24)]
    assert result.final_metrics["tokens_real"] == 24 and result.final_metrics["tokens_padded"] == 48
    assert result.final_metrics["padding_fraction"] == pytest.approx(0.5)

    # grouped, batches of two: {5, 5} and {1, 1} whatever the shuffle: no padding at all
    _, result, lines = _scalar_run(tmp_path / "b", _Lengths([1, 5, 1, 5]), batch_size=2, epochs=3,
                                   group_by_length=True)
    assert sorted((ln["tokens_real"], ln["tokens_padded"]) for ln in lines) == [(2, 2)] * 3 + [(10, 10)] * 3
    assert result.final_metrics["padding_fraction"] == 0.0

    # log every 2 steps: a line counts the tokens since the previous one (here across an epoch boundary)
    _, result, lines = _scalar_run(tmp_path / "c", _Lengths([1, 2, 3, 6]), batch_size=4, epochs=3, log_every=2)
    assert [(ln["step"], ln["tokens_real"], ln["tokens_padded"]) for ln in lines] == [(2, 24, 48), (3, 12, 24)]


def test_datasets_without_lengths_or_masks_train_ungrouped_and_log_no_tokens(tmp_path):
    feats = FeaturePairs(torch.randn(10, 3), torch.randn(10, 3), torch.zeros(10))
    cfg = TrainConfig(batch_size=4, group_by_length=True, save_every=0)
    trainer = Trainer(torch.nn.Linear(3, 1), lambda m, b: (m(b["features"]).sum(), {}), feats, feats.collate, cfg,
                      tmp_path, progress=False)
    assert trainer.lengths is None
    assert trainer._epoch_batches(0) == _old_epoch_batches(10, 0, 0, 4)
    result = trainer.train()
    assert "padding_fraction" not in result.final_metrics
    assert all("tokens_real" not in json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines())


# ------------------------------------------------------------------------------------- real model, grouped


def _varied_pairs(n: int, seed: int):
    rng = random.Random(seed)
    return [dataclasses.replace(p, prompt=" ".join([p.prompt] * rng.choice([1, 1, 2, 4, 6])))
            for p in toy_pairs(n, seed=seed)]


def _setup(tiny_bert, out, cfg, stop=None):
    return reward_trainer(tiny_bert, out, cfg, _varied_pairs(40, seed=3), 96, toy_pairs(16, seed=4), stop)


def test_token_pairs_lengths_are_the_longer_side(tiny_bert):
    data = TokenPairs.build(_varied_pairs(12, seed=1), make_encoder(tiny_bert, 96))
    assert data.lengths() == [max(len(it["chosen"]["input_ids"]), len(it["rejected"]["input_ids"]))
                              for it in data.items]
    assert len(set(data.lengths())) > 3  # the data really varies in length


def test_grouped_resume_after_interruption_matches_uninterrupted_run(tiny_bert, tmp_path):
    cfg = TrainConfig(lr=5e-4, batch_size=8, grad_accum=2, epochs=3, save_every=2, log_every=1, seed=5,
                      group_by_length=True)
    ref_model, ref = _setup(tiny_bert, tmp_path / "ref", cfg)
    assert ref.lengths is not None
    ref_result = ref.train()

    _, killed = _setup(tiny_bert, tmp_path / "run", cfg, stop=4)
    with pytest.raises(TrainingInterrupted):
        killed.train()
    model, resumed = _setup(tiny_bert, tmp_path / "run", cfg)
    result = resumed.train(resume=True)
    assert result.resumed_from == 4 and result.steps == ref_result.steps == 9
    for (n, a), (_, b) in zip(ref_model.state_dict().items(), model.state_dict().items()):
        torch.testing.assert_close(a, b, msg=f"{n} differs after resume")
    assert result.final_metrics == ref_result.final_metrics  # the token counts included
    def tokens(run):
        return [(ln["step"], ln.get("tokens_real"), ln.get("tokens_padded"))
                for ln in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())]

    assert tokens("run") == tokens("ref")  # the window counted before the kill survives in the checkpoint
    assert sum(t[1] or 0 for t in tokens("ref")) == ref_result.final_metrics["tokens_real"]

    # and grouping really cut the padding of this data, against the same run ungrouped
    _, plain = _setup(tiny_bert, tmp_path / "plain", dataclasses.replace(cfg, group_by_length=False))
    plain_result = plain.train()
    assert plain_result.final_metrics["tokens_real"] == ref_result.final_metrics["tokens_real"]
    assert ref_result.final_metrics["padding_fraction"] < 0.6 * plain_result.final_metrics["padding_fraction"]
