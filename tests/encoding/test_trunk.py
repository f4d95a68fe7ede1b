"""`top` tuning: the cached trunk feeds the top blocks exactly, the cache is keyed and robust, and training is cheaper."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moerm.config import ModelConfig
from moerm.encoding import load_backbone, make_encoder
from moerm.encoding.trunk import TrunkCache, attach_trunk, row_key
from moerm.encoding.tuning import apply_tuning, top_parameter_names
from moerm.errors import UserError
from moerm.modules.heads import RewardHead
from moerm.modules.reward_model import RewardModel
from moerm.train.pairwise import TokenPairs

from tests.conftest import BACKBONES, tiny_model, toy_pairs


def _model_cfg(path: str, tmp_path: Path, layers: int = 1, tuning: str = "top") -> ModelConfig:
    return ModelConfig(backbone=path, tuning=tuning, trainable_layers=layers, trunk_cache=str(tmp_path / "trunk"),
                       max_length=48)


def _three_layer(kind: str, tmp_path: Path, tokenizer_from: str) -> str:
    """A 3-block model of `kind` with the tokenizer of the 2-block fixture (so trunks of 1 and 2 blocks exist)."""
    from moerm.encoding.backbone import load_tokenizer

    path = tmp_path / f"three-{kind}"
    tok = load_tokenizer(tokenizer_from)
    tiny_model(kind, vocab_size=len(tok), layers=3).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


KINDS = {"tiny_bert": "bert", "tiny_deberta": "deberta-v3", "tiny_gpt2": "gpt2", "tiny_llama": "llama"}


@pytest.mark.parametrize("fixture", BACKBONES)
@pytest.mark.parametrize("style", ["full", "lora"])
def test_trunk_fed_forward_equals_the_whole_forward(fixture: str, style: str, request: pytest.FixtureRequest,
                                                    tmp_path: Path) -> None:
    path = _three_layer(KINDS[fixture], tmp_path, request.getfixturevalue(fixture))
    m = _model_cfg(path, tmp_path, layers=2)
    torch.manual_seed(0)
    backbone = load_backbone(path)
    apply_tuning(backbone, "top", m, style=style)
    if style == "lora":  # non-zero adapters, so the top blocks' LoRA really acts
        for n, p in backbone.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.2)
    model = RewardModel(backbone, RewardHead(backbone.hidden_size)).eval()
    enc = make_encoder(path, m.max_length)
    data = TokenPairs.build(toy_pairs(6), enc)
    assert attach_trunk(model, [data], batch_size=4, progress=False) == 12  # 6 chosen + 6 rejected computed
    batch = data.collate([data[i] for i in range(6)])
    assert batch["trunk_states"].shape[:2] == batch["input_ids"].shape
    with torch.no_grad():
        fed = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), trunk_states=batch["trunk_states"])
        whole = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
    # fp16 rounding of the cached states is the only difference
        other = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                      trunk_states=torch.randn_like(batch["trunk_states"]))
    # fp16 rounding of the cached states is the only difference; and the fed states are really what the top reads
    torch.testing.assert_close(fed, whole, atol=2e-3, rtol=2e-3)
    assert (other - whole).abs().max() > 1e-2


def test_only_the_top_blocks_train_and_change(tiny_bert: str, tmp_path: Path) -> None:
    path = _three_layer("bert", tmp_path, tiny_bert)
    m = _model_cfg(path, tmp_path, layers=1)
    backbone = load_backbone(path)
    apply_tuning(backbone, "top", m, style="full")
    trainable = {n for n, p in backbone.model.named_parameters() if p.requires_grad}
    assert trainable == set(top_parameter_names(backbone, m)) and all(n.startswith("encoder.layer.2.") for n in trainable)
    model = RewardModel(backbone, RewardHead(backbone.hidden_size))
    enc = make_encoder(path, m.max_length)
    data = TokenPairs.build(toy_pairs(8), enc)
    attach_trunk(model, [data], progress=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = data.collate([data[i] for i in range(8)])
    rewards = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), trunk_states=batch["trunk_states"])
    (-torch.nn.functional.logsigmoid(rewards[:8] - rewards[8:]).mean()).backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("backbone.model.encoder.layer.2.", "head.")) for n in changed)
    assert any(n.startswith("backbone.model.encoder.layer.2.") for n in changed)


def test_cache_is_shared_reused_and_keyed_by_backbone(tiny_bert: str, tmp_path: Path) -> None:
    path = _three_layer("bert", tmp_path, tiny_bert)
    m = _model_cfg(path, tmp_path, layers=1)
    enc = make_encoder(path, m.max_length)

    def fresh() -> tuple[RewardModel, TokenPairs]:
        backbone = load_backbone(path)
        apply_tuning(backbone, "top", m)
        return RewardModel(backbone, RewardHead(backbone.hidden_size)), TokenPairs.build(toy_pairs(5), enc)

    model, data = fresh()
    assert attach_trunk(model, [data], progress=False) == 10
    model2, data2 = fresh()
    assert attach_trunk(model2, [data2], progress=False) == 0  # a second system/seed reads the cache
    a = data.collate([data[0]])["trunk_states"]
    assert torch.equal(a, data2.collate([data2[0]])["trunk_states"])
    # another backbone (other weights) never reads these rows
    other = tmp_path / "other"
    tiny = tiny_model("bert", vocab_size=len(enc.tokenizer), layers=3)
    with torch.no_grad():
        tiny.encoder.layer[0].output.dense.weight.add_(1.0)
    tiny.save_pretrained(other, safe_serialization=True)
    enc.tokenizer.save_pretrained(other)
    m3 = _model_cfg(str(other), tmp_path, layers=1)
    b3 = load_backbone(str(other))
    apply_tuning(b3, "top", m3)
    assert attach_trunk(RewardModel(b3, RewardHead(b3.hidden_size)), [TokenPairs.build(toy_pairs(5), make_encoder(str(other), 48))],
                        progress=False) == 10


def test_truncated_or_foreign_shards_are_recomputed_never_read(tiny_bert: str, tmp_path: Path) -> None:
    path = _three_layer("bert", tmp_path, tiny_bert)
    m = _model_cfg(path, tmp_path, layers=1)
    enc = make_encoder(path, m.max_length)
    backbone = load_backbone(path)
    apply_tuning(backbone, "top", m)
    model = RewardModel(backbone, RewardHead(backbone.hidden_size))
    data = TokenPairs.build(toy_pairs(4), enc)
    attach_trunk(model, [data], progress=False)
    good = data.collate([data[0]])["trunk_states"]
    cache_dir = next((tmp_path / "trunk").iterdir())
    shard = next(cache_dir.glob("shard-*.f16"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    cache = TrunkCache(tmp_path / "trunk", backbone.trunk.ident, backbone.trunk.first, backbone.hidden_size)
    assert cache.skipped and not cache.index
    meta = next(cache_dir.glob("shard-*.json"))
    info = json.loads(meta.read_text())
    info["backbone"] = "someone-else@0"
    meta.write_text(json.dumps(info))
    data2 = TokenPairs.build(toy_pairs(4), enc)
    assert attach_trunk(model, [data2], progress=False) == 8  # recomputed into a new shard
    torch.testing.assert_close(data2.collate([data2[0]])["trunk_states"], good)


def test_read_only_cache_folder_is_a_clear_error(tiny_bert: str, tmp_path: Path) -> None:
    import os

    if os.geteuid() == 0:  # root ignores permissions: make the cache root a file instead
        blocker = tmp_path / "ro"
        blocker.write_text("not a folder")
        root = blocker / "trunk"
    else:
        root = tmp_path / "ro"
        root.mkdir()
        root.chmod(0o500)
    path = _three_layer("bert", tmp_path, tiny_bert)
    m = ModelConfig(backbone=path, tuning="top", trainable_layers=1, trunk_cache=str(root), max_length=48)
    backbone = load_backbone(path)
    apply_tuning(backbone, "top", m)
    with pytest.raises(UserError, match="trunk cache"):
        attach_trunk(RewardModel(backbone, RewardHead(backbone.hidden_size)),
                     [TokenPairs.build(toy_pairs(2), make_encoder(path, 48))], progress=False)


@pytest.mark.parametrize("layers", [0, 2, 7])
def test_trainable_layers_must_leave_a_trunk(tiny_bert: str, tmp_path: Path, layers: int) -> None:
    from moerm.config import ConfigError

    if layers == 0:
        with pytest.raises(ConfigError, match="trainable_layers"):
            ModelConfig(backbone=tiny_bert, tuning="top", trainable_layers=0)
        return
    backbone = load_backbone(tiny_bert)  # 2 blocks: 1 is the most that can train
    with pytest.raises(UserError, match=r"trainable_layers must be within 1\.\.1"):
        apply_tuning(backbone, "top", _model_cfg(tiny_bert, tmp_path, layers=layers))


def test_row_key_depends_on_tokens_only() -> None:
    a = {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1]}
    assert row_key(a) == row_key({"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "trunk": None})
    assert row_key(a) != row_key({"input_ids": [1, 2, 4], "attention_mask": [1, 1, 1]})
    assert row_key(a) != row_key({**a, "token_type_ids": [0, 0, 1]})
