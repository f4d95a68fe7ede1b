"""Shared fixtures: tiny randomly initialised backbones built from a config, and an easy toy preference task."""

from __future__ import annotations

import importlib.util
import os

# huggingface_hub reads these once, at import: set them before anything imports it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import random
import types
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModel, BertConfig, BertModel, DebertaV2Config, GPT2Config, GPT2Model, LlamaConfig, PretrainedConfig,
    PreTrainedModel, PreTrainedTokenizerFast, Qwen2Config,
)

from moerm.encoding import load_tokenizer
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


# The backbone table: every equivalence and system test runs on each of these fixtures (`request.getfixturevalue`).
BACKBONES = ["tiny_bert", "tiny_deberta", "tiny_gpt2", "tiny_llama"]
# peft's default LoRA targets by model type: what lands in the model when `model.lora_target_modules` is unset.
DEFAULT_LORA_TARGETS = {"bert": {"query", "value"}, "deberta-v2": {"query_proj", "value_proj"}, "gpt2": {"c_attn"},
                        "llama": {"q_proj", "v_proj"}, "qwen2": {"q_proj", "v_proj"}}


def lora_sites(model: torch.nn.Module) -> set[tuple[int, str]]:
    """(block index, module name) of every LoRA layer inside the model's transformer blocks."""
    from peft.tuners.lora import LoraLayer

    from moerm.encoding.blocks import transformer_blocks

    _, blocks = transformer_blocks(model)
    return {(i, name.rsplit(".", 1)[-1]) for i, block in enumerate(blocks) for name, m in block.named_modules()
            if isinstance(m, LoraLayer)}

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_config(kind: str, vocab_size: int = 50, layers: int = 2, width: int = 32) -> PretrainedConfig:
    """A tiny config per architecture; `deberta-v3` is DeBERTa-v3's attention (shared keys, relative positions)."""
    common = dict(vocab_size=vocab_size, hidden_size=width, num_hidden_layers=layers, num_attention_heads=2,
                  intermediate_size=2 * width, max_position_embeddings=128)
    if kind == "bert":
        return BertConfig(**common)
    if kind in ("deberta-v3", "deberta-v2"):
        # v3: shared attention keys, log-bucketed relative positions, both disentangled terms, no absolute positions.
        # v2 (share_att_key False) projects the relative embeddings with its own pos_key_proj/pos_query_proj.
        return DebertaV2Config(**common, relative_attention=True, position_buckets=4, pos_att_type=["p2c", "c2p"],
                               share_att_key=kind == "deberta-v3", norm_rel_ebd="layer_norm",
                               position_biased_input=False, type_vocab_size=0)
    if kind == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=width, n_layer=layers, n_head=2, n_positions=128,
                          bos_token_id=1, eos_token_id=1, pad_token_id=1)
    if kind in ("llama", "qwen2"):
        cls = LlamaConfig if kind == "llama" else Qwen2Config
        return cls(**common, num_key_value_heads=1, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                   tie_word_embeddings=False)
    raise ValueError(f"unknown tiny kind {kind!r}")


def tiny_model(kind: str, vocab_size: int = 50, layers: int = 2, width: int = 32) -> PreTrainedModel:
    """A bare (headless) randomly initialised model of `tiny_config(kind, ...)`, seeded."""
    torch.manual_seed(0)
    return AutoModel.from_config(tiny_config(kind, vocab_size, layers, width))


@pytest.fixture(scope="session")
def tiny_deberta(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer, 32-wide DeBERTa-v3-style encoder (shared keys, relative positions) with MiniLM's WordPiece tokenizer."""
    path = tmp_path_factory.mktemp("tiny-deberta")
    tiny_model("deberta-v3", vocab_size=30522).save_pretrained(path, safe_serialization=True)
    load_tokenizer("minilm").save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer, 32-wide Llama decoder; its WordLevel tokenizer adds <s>, has </s> and <pad>, and a ChatML template."""
    path = tmp_path_factory.mktemp("tiny-llama")
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    words = ["system", "user", "assistant", *TOY_WORDS]
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHATML
    fast.save_pretrained(path)
    tiny_model("llama", vocab_size=len(vocab)).save_pretrained(path, safe_serialization=True)
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


def reward_trainer(backbone_path: str, out: Path, cfg, train_pairs: list[PreferencePair], max_length: int,
                   eval_pairs: list[PreferencePair] | None = None, stop: int | None = None):
    """A seeded tiny reward model (backbone + linear head) and its Trainer on `train_pairs`: what the trainer,
    grouping and reliability tests train. Returns (model, trainer)."""
    from moerm.encoding import load_backbone, make_encoder
    from moerm.modules.heads import RewardHead
    from moerm.modules.reward_model import RewardModel
    from moerm.train.pairwise import TokenPairs, make_pairwise_step, pairwise_eval
    from moerm.train.trainer import Trainer

    torch.manual_seed(0)
    backbone = load_backbone(backbone_path)
    model = RewardModel(backbone, RewardHead(backbone.hidden_size))
    enc = make_encoder(backbone_path, max_length)
    data = TokenPairs.build(train_pairs, enc)
    ev = TokenPairs.build(eval_pairs, enc) if eval_pairs else None
    return model, Trainer(model, make_pairwise_step(), data, data.collate, cfg, out,
                          eval_fn=(lambda m: pairwise_eval(m, ev)) if ev is not None else None, progress=False,
                          stop_after_steps=stop)


def load_benchmark(name: str) -> types.ModuleType:
    """A script of benchmarks/ (they are not a package) loaded as a module, so tests can call its functions."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
