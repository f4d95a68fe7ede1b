"""Tiny Hugging Face sequence-classification reward models (num_labels 1), saved as local folders."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, RobertaConfig

from conftest import tiny_config

PAIRS = [("what is a good answer", "a clear and helpful answer"), ("tell me why", "no"),
         ("how is it", "it is good and kind and correct, please explain the topic to me in two or three words")]


def save_hf_rm(kind: str, out: Path, tokenizer_from: str, seed: int = 0) -> str:
    """A seeded tiny `*ForSequenceClassification` of `kind` with the tokenizer of `tokenizer_from`, in `out`."""
    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    if kind == "roberta":
        cfg = RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=130, pad_token_id=tok.pad_token_id)
    else:
        cfg = tiny_config(kind, vocab_size=len(tok))
    cfg.num_labels = 1
    if kind in ("llama", "qwen2", "gpt2"):
        cfg.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(cfg)
    with torch.no_grad():  # a visible head: HF initialises the classifier with small weights and a zero bias
        for name, p in model.named_parameters():
            if any(k in name for k in ("classifier", "score", "pooler")):
                p.normal_(0, 0.5)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out)


@torch.no_grad()
def hf_logits(path: str, encoder, pairs=PAIRS, **kw) -> torch.Tensor:
    """The HF model's own logits (N,) for `pairs`, on moerm's token ids for them, in one right-padded batch."""
    model = AutoModelForSequenceClassification.from_pretrained(path, **kw).eval()
    batch = encoder.pad([encoder.encode(p, r) for p, r in pairs])
    return model(**batch).logits[:, 0].float()


def make_hf_rms(root: Path, tiny_bert: str, tiny_llama: str) -> dict[str, str]:
    """kind -> folder of a tiny HF reward model: bert, deberta-v2, roberta (MiniLM's tokenizer), llama, qwen2."""
    return {kind: save_hf_rm(kind, root / kind, tok) for kind, tok in (
        ("bert", tiny_bert), ("deberta-v2", tiny_bert), ("roberta", tiny_bert), ("llama", tiny_llama),
        ("qwen2", tiny_llama))}
