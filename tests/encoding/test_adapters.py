"""Encoding through named adapters: one mixed-adapter batch where the architecture allows it, grouped passes where not."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import tiny_model
from moerm.encoding import Backbone
from moerm.encoding.adapters import can_mix_adapters, encode_through, lora_parameters

NAMES = ("a", "b", "c")


def _backbone(kind: str, targets: list[str] | None = None) -> Backbone:
    model = tiny_model(kind)
    for i, name in enumerate(NAMES):
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        model = get_peft_model(model, cfg, adapter_name=name) if i == 0 else (model.add_adapter(name, cfg) or model)
    return Backbone(model.eval(), "last" if kind in ("gpt2", "llama") else "mean")


@pytest.mark.parametrize("kind, targets, mixable", [
    ("bert", None, True),
    ("gpt2", None, True),
    ("llama", None, True),
    ("deberta-v2", None, True),  # query_proj/value_proj never see its relative table (pos_*_proj do, unadapted)
    ("deberta-v2", ["pos_key_proj"], False),
    ("deberta-v3", None, False),  # share_att_key: the adapted query_proj also projects the relative table
    ("deberta-v3", ["value_proj"], True),
])
def test_mixed_batches_are_refused_exactly_where_a_lora_layer_sees_a_shared_table(kind, targets, mixable):
    backbone = _backbone(kind, targets)
    assert can_mix_adapters(backbone.model, NAMES) is mixable
    ids = torch.randint(4, 50, (4, 6))
    mask = torch.ones(4, 6, dtype=torch.long)
    if not mixable:  # what the grouped path avoids: peft cannot route a batch-1 table through per-row adapters
        with pytest.raises(ValueError, match="adapter_names"), torch.no_grad():
            backbone(ids, mask, adapter_names=["a", "b", "a", "c"])


@pytest.mark.parametrize("kind", ["bert", "deberta-v3", "gpt2", "llama"])
def test_each_row_gets_exactly_its_own_adapters_features(kind):
    backbone = _backbone(kind)
    peft = backbone.model
    torch.manual_seed(1)
    ids = torch.randint(4, 50, (5, 7))
    mask = torch.ones(5, 7, dtype=torch.long)
    mask[1, 4:] = 0
    names = ["c", "a", "c", "b", "a"]
    peft.set_adapter("b")
    peft.requires_grad_(False)
    with torch.no_grad():
        routed = encode_through(backbone, ids, mask, None, names)  # (5, H)
        assert peft.active_adapter == "b" and not any(p.requires_grad for p in peft.parameters())
        alone = {}
        for name in NAMES:
            peft.set_adapter(name)
            alone[name] = backbone(ids, mask)  # (5, H): every row through this one adapter
    expected = torch.stack([alone[n][i] for i, n in enumerate(names)])
    torch.testing.assert_close(routed, expected, atol=1e-6, rtol=0)
    assert (alone["a"] - alone["b"]).abs().max() > 1e-3  # the adapters differ, so a wrong route would show


def test_lora_parameters_are_exactly_one_adapters_a_and_b():
    peft = _backbone("bert").model
    got = {id(p) for p in lora_parameters(peft, "a")}
    expected = {id(p) for n, p in peft.named_parameters() if ".lora_A.a." in n or ".lora_B.a." in n}
    assert got == expected and len(got) == 2 * 2 * 2  # 2 layers x (query, value) x (A, B)
    assert not got & {id(p) for p in lora_parameters(peft, "b")}
