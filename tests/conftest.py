"""Shared fixtures: tiny randomly initialised backbones built from a config, and an easy toy preference task."""

from __future__ import annotations

import os

# huggingface_hub reads these once, at import: set them before anything imports it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, PreTrainedTokenizerFast

from moerm.backbone import load_tokenizer
from moerm.data.schema import PreferencePair

TOY_WORDS = (
    "good great helpful correct clear kind bad awful wrong rude useless unclear the a answer question about "
    "topic please explain tell me how why what is it this that and of to in reply yes no maybe one two three"
).split()


@pytest.fixture(autouse=True)
def _offline_and_isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("MOERM_CACHE", str(tmp_path / "moerm-cache"))
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer, 32-wide BERT with MiniLM's WordPiece tokenizer, saved as a local HF folder."""
    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(path, safe_serialization=True)
    load_tokenizer("minilm").save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer GPT-2-style decoder whose tokenizer uses EOS as its pad token (pad == eos)."""
    path = tmp_path_factory.mktemp("tiny-gpt2")
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(TOY_WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                     eos_token_id=1, bos_token_id=1, pad_token_id=1)
    GPT2Model(cfg).save_pretrained(path, safe_serialization=True)
    return str(path)


def toy_pairs(n: int, seed: int = 0, domain: str = "toy") -> list[PreferencePair]:
    """An easy task: the chosen reply contains positive words, the rejected one negative words."""
    rng = random.Random(seed)
    pos, neg = TOY_WORDS[:6], TOY_WORDS[6:12]
    filler = TOY_WORDS[12:]
    pairs = []
    for i in range(n):
        prompt = " ".join(rng.choice(filler) for _ in range(rng.randint(3, 8)))
        body = [rng.choice(filler) for _ in range(rng.randint(2, 6))]
        chosen = " ".join(body + [rng.choice(pos), rng.choice(pos)])
        rejected = " ".join(body + [rng.choice(neg), rng.choice(neg)])
        pairs.append(PreferencePair(id=f"{domain}-{seed}-{i}", domain=domain, prompt=prompt, chosen=chosen, rejected=rejected))
    return pairs


@pytest.fixture
def toy_train() -> list[PreferencePair]:
    return toy_pairs(96, seed=1)


@pytest.fixture
def toy_test() -> list[PreferencePair]:
    return toy_pairs(48, seed=2)
