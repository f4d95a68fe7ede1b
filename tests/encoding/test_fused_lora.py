"""The fused mixed-adapter LoRA step: exactly peft's mixed pass and each adapter alone, a fixed op count, a fresh cache."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import load_benchmark, tiny_model
from moerm.encoding import Backbone
from moerm.encoding.adapters import encode_through, lora_parameters
from moerm.encoding.fused_lora import fused_step

ALL = {"bert": ["query", "key", "value", "dense"],
       "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
DECODERS = ("llama",)


def _config(kind: str, r: int, alpha: int, everywhere: bool = False, **kw) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=ALL[kind] if everywhere else None,
                      init_lora_weights=False, **kw)


def _backbone(kind: str) -> Backbone:
    """Adapters of different ranks and alphas; c also adapts layers a and b leave alone (zero slots there)."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_model(kind), _config(kind, 2, 3), adapter_name="a")
    model.add_adapter("b", _config(kind, 4, 8))
    model.add_adapter("c", _config(kind, 8, 4, everywhere=True))
    return Backbone(model.eval(), "last" if kind in DECODERS else "mean")


def _batch(rows: int, padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(4, 50, (rows, 7))  # (B, T)
    mask = torch.ones(rows, 7, dtype=torch.long)
    if padded:
        mask[1, 4:] = 0
        mask[3, 2:] = 0
    return ids, mask


def _alone(backbone: Backbone, ids: torch.Tensor, mask: torch.Tensor, names: list[str]) -> torch.Tensor:
    """Row i of the batch run through adapter names[i] alone (the whole batch once per adapter, rows picked)."""
    peft, out = backbone.model, {}
    active = peft.active_adapter
    for name in sorted(set(names)):
        peft.set_adapter(name)
        out[name] = backbone(ids, mask)  # (B, H)
    peft.set_adapter(active)
    return torch.stack([out[n][i] for i, n in enumerate(names)])


def _check(backbone: Backbone, ids: torch.Tensor, mask: torch.Tensor, names: list[str], fused: bool = True) -> torch.Tensor:
    """encode_through == peft's mixed pass == each adapter alone, to 1e-5; returns encode_through's features."""
    with torch.no_grad():
        assert (fused_step(backbone.model, names) is not None) is fused
        got = encode_through(backbone, ids, mask, None, names)  # (B, H)
        peft_mixed = backbone(ids, mask, adapter_names=names)
        alone = _alone(backbone, ids, mask, names)
    torch.testing.assert_close(got, peft_mixed, atol=1e-5, rtol=0)
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)
    return got


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("names, padded", [
    (["c", "a", "b", "a", "c"], True),
    (["c", "a", "b", "a", "c"], False),
    (["b", "b", "b", "b", "b"], True),  # one adapter only
])
def test_fused_rows_equal_peft_mixed_and_each_adapter_alone(kind, names, padded):
    backbone = _backbone(kind)
    ids, mask = _batch(len(names), padded)
    got = _check(backbone, ids, mask, names)
    if len(set(names)) > 1:  # the adapters differ, so a wrong slot would show
        with torch.no_grad():
            other = _alone(backbone, ids, mask, ["a"] * len(names))
        assert (got - other).abs().max() > 1e-3
    peft = backbone.model  # the call leaves peft's layers as they were: the active adapter applies again
    with torch.no_grad():
        torch.testing.assert_close(backbone(ids, mask), _alone(backbone, ids, mask, [peft.active_adapter] * len(names)))
    assert all(not m._disable_adapters and not m._forward_hooks for m in peft.modules() if hasattr(m, "lora_A"))


def _matmuls(backbone: Backbone, names: list[str], fused: bool) -> int:
    ids, mask = _batch(len(names), False)
    count = load_benchmark("lora_mixing_ops").counted  # (matmuls, operators) dispatched
    if fused:
        return count(lambda: encode_through(backbone, ids, mask, None, names))[0]
    return count(lambda: backbone(ids, mask, adapter_names=names))[0]


def test_the_fused_step_runs_the_same_matmuls_however_many_adapters_mix():
    backbone = _backbone("bert")
    one, three = ["c"] * 6, ["a", "b", "c", "a", "b", "c"]
    assert _matmuls(backbone, one, fused=True) == _matmuls(backbone, three, fused=True)
    # peft's mixed pass runs two GEMMs per adapter of the batch in each LoRA layer carrying it: a and b add
    # 2 adapters x 2 GEMMs in each of the 4 query/value layers (2 blocks) that carry them
    assert _matmuls(backbone, three, fused=False) - _matmuls(backbone, one, fused=False) == 4 * 2 * 2


def test_the_cache_follows_a_training_step_on_one_adapter():
    backbone = _backbone("bert")
    peft = backbone.model
    ids, mask = _batch(5, True)
    names = ["c", "a", "b", "a", "c"]
    before = _check(backbone, ids, mask, names)
    peft.set_adapter("a")  # one optimizer step on adapter a, as training does
    peft.train()
    opt = torch.optim.AdamW(lora_parameters(peft, "a"), lr=0.05)
    backbone(ids, mask).sum().backward()
    opt.step()
    peft.eval()
    after = _check(backbone, ids, mask, names)
    moved = (after - before).abs().amax(dim=1)  # (B,)
    assert moved[[1, 3]].min() > 1e-3 and moved[[0, 2, 4]].max() == 0  # only a's rows changed


def test_the_cache_follows_an_added_adapter_and_one_deleted_and_added_again():
    backbone = _backbone("llama")
    peft = backbone.model
    ids, mask = _batch(4, True)
    _check(backbone, ids, mask, ["a", "b", "c", "a"])
    peft.add_adapter("d", _config("llama", 6, 12, everywhere=True))
    with_d = _check(backbone, ids, mask, ["d", "b", "c", "d"])
    peft.delete_adapter("d")  # same name, new weights (what a retrained router adapter does)
    torch.manual_seed(5)
    peft.add_adapter("d", _config("llama", 6, 12, everywhere=True))
    again = _check(backbone, ids, mask, ["d", "b", "c", "d"])
    assert (again[[0, 3]] - with_d[[0, 3]]).abs().max() > 1e-3
    torch.testing.assert_close(again[[1, 2]], with_d[[1, 2]], atol=0, rtol=0)


def test_a_dora_adapter_in_the_batch_takes_peft_path_which_refuses_it():
    backbone = _backbone("bert")
    peft = backbone.model
    peft.add_adapter("dora", _config("bert", 4, 8, use_dora=True))
    ids, mask = _batch(4, True)
    _check(backbone, ids, mask, ["b", "a", "c", "b"], fused=True)  # the plain adapters beside it still fuse
    names = ["dora", "a", "c", "dora"]
    assert fused_step(peft, names) is None
    with pytest.raises(ValueError, match="DoRA"), torch.no_grad():
        backbone(ids, mask, adapter_names=names)
    with pytest.raises(ValueError, match="DoRA"), torch.no_grad():
        encode_through(backbone, ids, mask, None, names)


def test_training_mode_takes_peft_path_which_refuses_a_mixed_batch():
    backbone = _backbone("bert")
    backbone.model.train()
    ids, mask = _batch(3, False)
    names = ["a", "b", "c"]
    assert fused_step(backbone.model, names) is None
    with pytest.raises(ValueError, match="training mode"):
        backbone(ids, mask, adapter_names=names)
    with pytest.raises(ValueError, match="training mode"):
        encode_through(backbone, ids, mask, None, names)


def test_a_layer_only_an_unfusable_active_adapter_carries_adds_nothing():
    """The active adapter is a DoRA on `key`, which no adapter of the batch adapts: those layers stay the base's."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("bert"), _config("bert", 4, 8), adapter_name="a")
    model.add_adapter("b", _config("bert", 2, 2))
    model.add_adapter("dora", LoraConfig(r=4, target_modules=["key"], use_dora=True, init_lora_weights=False))
    model.set_adapter("dora")
    backbone = Backbone(model.eval(), "mean")
    ids, mask = _batch(4, True)
    _check(backbone, ids, mask, ["a", "b", "b", "a"])
    assert model.active_adapter == "dora"


def test_a_gradient_to_the_adapters_takes_peft_path():
    backbone = _backbone("bert")
    peft = backbone.model
    ids, mask = _batch(3, False)
    names = ["a", "b", "c"]
    lora_parameters(peft, "a")[0].requires_grad_(True)
    assert fused_step(peft, names) is None  # eval mode, grad enabled, an adapter weight trainable
    features = encode_through(backbone, ids, mask, None, names)
    features.sum().backward()
    assert all(p.grad is not None for p in lora_parameters(peft, "a") if p.requires_grad)
    with torch.no_grad():
        assert fused_step(peft, names) is not None
    peft.requires_grad_(False)
    assert fused_step(peft, names) is not None  # nothing to differentiate: fused even with grad enabled
