import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertModel

from conftest import tiny_model
from moerm.encoding import Backbone
from moerm.modules.aggregator import CapabilityAggregator
from moerm.encoding.blocks import expert_layer_indices, transformer_blocks
from moerm.encoding.experts import ExpertBank

# Every architecture family the bank must be exact on; deberta-v2 (no share_att_key) projects its relative
# embeddings with separate pos_* layers, deberta-v3 (share_att_key) with the adapted query_proj/key_proj.
KINDS = ["bert", "deberta-v3", "deberta-v2", "gpt2", "llama", "qwen2"]
DECODERS = {"gpt2", "llama", "qwen2"}


def _bank(kind: str, expert_layers: int, experts=("cap_a", "cap_b", "cap_c")) -> ExpertBank:
    model = tiny_model(kind, layers=3)
    layers = expert_layer_indices(model, expert_layers)
    pattern = transformer_blocks(model)[0].rsplit(".", 1)[-1]
    for i, name in enumerate(experts):
        # init_lora_weights=False: B is random, so every expert really differs from the base and from each other.
        # target_modules=None: peft's defaults for the model type (query/value, query_proj/value_proj, c_attn, ...)
        cfg = LoraConfig(r=4, lora_alpha=8, layers_to_transform=layers, layers_pattern=pattern, init_lora_weights=False)
        model = get_peft_model(model, cfg, adapter_name=name) if i == 0 else (model.add_adapter(name, cfg) or model)
    bank = ExpertBank(Backbone(model, "last" if kind in DECODERS else "mean"), list(experts), layers[0])
    return bank.eval()


def _inputs(n: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(4, 50, (n, t))
    mask = torch.ones(n, t, dtype=torch.long)
    mask[0, t // 2:] = 0  # right padding of different lengths
    if n > 2:
        mask[2, 2:] = 0
    return ids, mask


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("expert_layers", [1, 3])
# (5, 9): plain; (3, 3): n == T; (1, 9): n == 1; (8, 6): n == 2 * position_buckets, the rows of DeBERTa's
# relative-embedding table. A batch-size guess about which tensors to expand gets the last three wrong.
@pytest.mark.parametrize("n, t", [(5, 9), (3, 3), (1, 9), (8, 6)])
def test_batched_expert_states_equal_sequential_set_adapter_passes(kind, expert_layers, n, t):
    bank = _bank(kind, expert_layers)
    ids, mask = _inputs(n, t)
    with torch.no_grad():
        batched = bank.states(ids, mask, mode="batched")
        sequential = bank.states(ids, mask, mode="sequential")
    assert batched.shape == (n, 3, 32)
    # 1e-5: the batched mode's fused LoRA step (adapters.route_rows) sums the LoRA products in another order than
    # one adapter's pass does: float32 rounding of states of magnitude ~3 (a wrong expert differs by > 1e-3)
    torch.testing.assert_close(batched, sequential, atol=1e-5, rtol=0)
    assert (sequential[:, 0] - sequential[:, 1]).abs().max() > 1e-3  # the experts are not all the same model


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_batched_expert_states_equal_sequential_with_left_padding(kind):
    bank = _bank(kind, expert_layers=1)
    ids, mask = _inputs(4, 8)
    mask = mask.flip(1)  # left padding: positions must count real tokens, as the Backbone counts them
    with torch.no_grad():
        batched = bank.states(ids, mask, mode="batched")
        sequential = bank.states(ids, mask, mode="sequential")
    torch.testing.assert_close(batched, sequential, atol=1e-5, rtol=0)  # 1e-5: as above


@pytest.mark.parametrize("kind, top_calls", [("bert", [15]), ("deberta-v3", [5, 5, 5]), ("llama", [15])])
def test_lower_blocks_run_once_per_input_and_the_top_once_per_expert(kind, top_calls):
    bank = _bank(kind, expert_layers=1)
    _, blocks = transformer_blocks(bank.peft)
    calls: dict[int, list[int]] = {0: [], 1: [], 2: []}
    # forward (post) hooks: count only the block passes that really ran, and their batch size
    handles = [b.register_forward_hook(lambda m, a, kw, out, i=i: calls[i].append(
        (a[0] if a else kw["hidden_states"]).shape[0]), with_kwargs=True) for i, b in enumerate(blocks)]
    ids, mask = _inputs(5, 7)
    with torch.no_grad():
        bank.states(ids, mask, mode="batched")
    for h in handles:
        h.remove()
    assert calls[0] == [5] and calls[1] == [5]  # the shared trunk: each input once
    # one mixed-adapter pass over 5 inputs x 3 experts, or (DeBERTa-v3 cannot mix) one 5-row pass per expert
    assert calls[2] == top_calls
    assert all(type(b).__name__ != "_PassThrough" for b in blocks)  # the real lower blocks are back


def test_states_leave_the_active_adapter_and_trainable_flags_as_they_were():
    bank = _bank("deberta-v3", expert_layers=1)
    bank.peft.set_adapter("cap_b")
    bank.peft.requires_grad_(False)
    ids, mask = _inputs(2, 5)
    with torch.no_grad():
        for mode in ("batched", "sequential"):
            bank.states(ids, mask, mode=mode)
            assert bank.peft.active_adapter == "cap_b"
            assert not any(p.requires_grad for p in bank.peft.parameters())


def test_bank_refuses_lora_below_the_first_expert_layer():
    bank = _bank("bert", expert_layers=2)  # LoRA on blocks 1 and 2
    with pytest.raises(ValueError, match="below first_expert_layer=2 carry LoRA"):
        ExpertBank(bank.backbone, bank.experts, first_expert_layer=2)


def test_expert_layers_default_to_the_top_third_and_are_checked():
    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=6, num_attention_heads=2,
                                 intermediate_size=32))
    assert expert_layer_indices(model, None) == [4, 5]
    assert expert_layer_indices(model, 6) == list(range(6))
    with pytest.raises(ValueError, match="1..6"):
        expert_layer_indices(model, 7)


def test_aggregator_is_linear_prelu_linear_over_concatenated_states():
    torch.manual_seed(0)
    agg = CapabilityAggregator(num_experts=3, hidden_size=4)
    x = torch.randn(2, 3, 4)
    first, act, last = agg.net
    assert (first.in_features, first.out_features, last.in_features, last.out_features) == (12, 4, 4, 1)
    h = x.reshape(2, 12) @ first.weight.T + first.bias
    h = torch.where(h > 0, h, act.weight * h)  # PReLU
    expected = (h @ last.weight.T + last.bias).squeeze(-1)
    torch.testing.assert_close(agg(x), expected)
    with pytest.raises(ValueError, match="expert states"):
        agg(torch.randn(2, 2, 4))


def test_aggregator_warm_start_is_the_mean_of_the_expert_heads():
    torch.manual_seed(0)
    agg = CapabilityAggregator(num_experts=3, hidden_size=4)
    w, b = torch.randn(3, 4), torch.randn(3)
    agg.start_as_mean_of(w, b)
    x = torch.randn(5, 3, 4)
    expected = ((x * w).sum(-1) + b).mean(-1)  # (5,) mean over experts of w_k . x_k + b_k
    got = agg(x)
    # the other hidden units start at 1% scale, so the warm start is the mean up to a small perturbation
    torch.testing.assert_close(got, expected, atol=5e-3, rtol=0)
