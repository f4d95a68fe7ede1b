"""`add-domain --from-hf`: an imported HF reward model as a ready-made RODOS domain RM (only the router trains)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from conftest import toy_pairs
from hubutil import hf_logits, make_hf_rms

from moerm.config import ModelConfig, RunConfig, TrainConfig
from moerm.data.schema import PreferencePair
from moerm.hub.hf_import import load_hf_reward_model
from moerm.systems.base import FitContext, build_system, load_system

NEW_WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()


@pytest.fixture(scope="module")
def hf_rms(tmp_path_factory: pytest.TempPathFactory, tiny_bert: str, tiny_llama: str) -> dict[str, str]:
    return make_hf_rms(tmp_path_factory.mktemp("hf-rms"), tiny_bert, tiny_llama)


def new_domain_pairs(n: int, seed: int = 0) -> list[PreferencePair]:
    """Prompts from words the toy domains never use, so a router can tell the new domain apart."""
    rng = random.Random(seed)
    return [PreferencePair(id=f"new-{i}", domain="new", prompt=" ".join(rng.choices(NEW_WORDS, k=5)),
                           chosen="good clear answer", rejected="bad answer") for i in range(n)]


def test_imported_rm_is_a_domain_of_rodos(tiny_bert: str, hf_rms: dict[str, str], tmp_path: Path) -> None:
    cfg = RunConfig(system="rodos", model=ModelConfig(backbone=tiny_bert, max_length=64),
                    train=TrainConfig(max_steps=2, batch_size=8, save_every=0, seed=0),
                    components={"router": {"train": {"epochs": 40.0, "lr": 5e-2}}})
    system = build_system(cfg)
    train = toy_pairs(16, seed=1, domain="a") + toy_pairs(16, seed=2, domain="b")
    system.fit(train, None, FitContext(tmp_path / "run", progress=False))
    model_dir = tmp_path / "run" / "model"
    system.save(model_dir)
    before = {p: p.read_bytes() for p in (model_dir / "rms").rglob("*") if p.is_file()}

    # a decoder with its own tokenizer and max_length beside the BERT domain RMs
    rm = load_hf_reward_model(hf_rms["llama"], max_length=48)
    pairs = new_domain_pairs(16)
    system.add_domain_rm(rm, pairs, FitContext(tmp_path / "run" / "add-domain" / "new", progress=False), model_dir)

    loaded = load_system(model_dir)
    assert loaded.domains == ["a", "b", "new"]
    assert {p: p.read_bytes() for p in before} == before  # the other RMs' files are untouched
    new_rm = loaded.rms["new"]
    assert new_rm.config.model.backbone != tiny_bert and new_rm.config.model.max_length == 48
    prompts, responses = [p.prompt for p in pairs[:4]], ["good answer", "bad", "clear kind reply", "no"]
    res = loaded.score(prompts, responses, domains=["new"] * 4)
    assert all(d["routed_domain"] == "new" and d["route_source"] == "given" for d in res.details)
    theirs = hf_logits(hf_rms["llama"], new_rm.encoder, list(zip(prompts, responses)))
    raw = torch.tensor([d["raw_rewards"]["new"] for d in res.details])  # the imported RM's own logit ...
    torch.testing.assert_close(raw, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(res.rewards), loaded.calibration("new", theirs), atol=1e-5, rtol=0)
    assert set(loaded.calibration.scales) == {"a", "b", "new"}  # ... on the run's common scale, its map fitted at add
    # without a domain the router sends the new domain's prompts to the imported RM
    routed = loaded.score([p.prompt for p in new_domain_pairs(8, seed=5)], ["good"] * 8)
    assert sum(d["routed_domain"] == "new" for d in routed.details) >= 7
    old = loaded.score([p.prompt for p in toy_pairs(8, seed=9, domain="a")], ["good"] * 8)
    assert sum(d["router_top"] in ("a", "b") for d in old.details) >= 7  # top-1 (gated routing may mix)
