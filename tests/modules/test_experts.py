import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

from moerm.backbone import Backbone
from moerm.modules.aggregator import CapabilityAggregator
from moerm.modules.experts import ExpertBank, expert_layer_indices, transformer_blocks


def _bank(kind: str, expert_layers: int, experts=("cap_a", "cap_b", "cap_c")) -> ExpertBank:
    torch.manual_seed(0)
    if kind == "bert":
        model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                     intermediate_size=32))
        targets, pooling = ["query", "value"], "mean"
    else:
        model = GPT2Model(GPT2Config(vocab_size=50, n_embd=16, n_layer=3, n_head=2, bos_token_id=1, eos_token_id=1))
        targets, pooling = ["c_attn"], "last"
    layers = expert_layer_indices(model, expert_layers)
    pattern = transformer_blocks(model)[0].rsplit(".", 1)[-1]
    for i, name in enumerate(experts):
        # init_lora_weights=False: B is random, so every expert really differs from the base and from each other
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, layers_to_transform=layers,
                         layers_pattern=pattern, init_lora_weights=False)
        model = get_peft_model(model, cfg, adapter_name=name) if i == 0 else (model.add_adapter(name, cfg) or model)
    bank = ExpertBank(Backbone(model, pooling), list(experts), layers[0])
    return bank.eval()


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
@pytest.mark.parametrize("expert_layers", [1, 3])
def test_batched_expert_states_equal_sequential_set_adapter_passes(kind, expert_layers):
    bank = _bank(kind, expert_layers)
    ids = torch.randint(2, 50, (5, 9))
    mask = torch.ones(5, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[4, 2:] = 0  # right padding of different lengths
    with torch.no_grad():
        batched = bank.states(ids, mask, mode="batched")
        sequential = bank.states(ids, mask, mode="sequential")
    assert batched.shape == (5, 3, 16)
    torch.testing.assert_close(batched, sequential, atol=1e-5, rtol=1e-5)
    assert (sequential[:, 0] - sequential[:, 1]).abs().max() > 1e-3  # the experts are not all the same model


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
