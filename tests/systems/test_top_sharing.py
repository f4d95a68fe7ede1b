"""`top` tuning in routed systems: RODOS's domain RMs share one trunk, on disk and in memory."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from moerm.config import ModelConfig, RunConfig, TrainConfig
from moerm.encoding.backbone import load_tokenizer
from moerm.encoding.tuning import TOP_FILE
from moerm.systems.base import FitContext, build_system, count_params, load_system

from conftest import tiny_model, toy_pairs


def _pairs(domain: str, prefix: str, n: int, seed: int):
    return [dataclasses.replace(p, prompt=f"{prefix} {p.prompt}") for p in toy_pairs(n, seed, domain)]


def test_rodos_domain_rms_share_the_trunk_on_disk_and_in_memory(tiny_bert: str, tmp_path: Path) -> None:
    path = tmp_path / "three"
    tok = load_tokenizer(tiny_bert)
    tiny_model("bert", vocab_size=len(tok), layers=3).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    cfg = RunConfig(system="rodos", model=ModelConfig(backbone=str(path), max_length=32, tuning="top", trainable_layers=1,
                                                      trunk_cache=str(tmp_path / "trunk")),
                    train=TrainConfig(lr=1e-2, epochs=2, batch_size=8, save_every=0, log_every=1000))
    train = _pairs("alpha", "tell me about", 24, 1) + _pairs("beta", "what is this", 24, 2) + _pairs("gamma", "why so", 24, 3)
    torch.manual_seed(0)
    system = build_system(cfg)
    system.fit(train, None, FitContext(tmp_path / "run", progress=False))
    rms = list(system.rms.values())
    emb = [rm.backbone.model.embeddings.word_embeddings.weight for rm in rms]
    assert all(e is emb[0] for e in emb)  # one trunk in memory
    low = [rm.backbone.model.encoder.layer[0].attention.self.query.weight for rm in rms]
    assert all(w is low[0] for w in low)
    tops = [rm.backbone.model.encoder.layer[2].output.dense.weight for rm in rms]
    assert tops[0] is not tops[1] and not torch.equal(tops[0], tops[1])  # each domain its own top block
    one = count_params(rms[0].model)["params_total"]
    top_block = sum(p.numel() for p in rms[0].backbone.model.encoder.layer[2].parameters())
    head = sum(p.numel() for p in rms[0].head.parameters())
    total = count_params(torch.nn.ModuleList([rm.model for rm in rms]))["params_total"]
    assert total == one + 2 * (top_block + head)
    out = system.save(tmp_path / "model")
    for d in system.rms:
        folder = next((out / "rms").glob(f"*{d}*"))
        assert (folder / TOP_FILE).is_file() and not (folder / "backbone").exists()
    prompts = [p.prompt for p in train[::6]]
    replies = [p.chosen for p in train[::6]]
    again = load_system(out)
    torch.testing.assert_close(torch.tensor(again.score(prompts, replies).rewards),
                               torch.tensor(system.score(prompts, replies).rewards), atol=1e-5, rtol=0)
    loaded = [rm.backbone.model.embeddings.word_embeddings.weight for rm in again.rms.values()]
    assert all(e is loaded[0] for e in loaded)
