import torch

from moerm.modules.moe import NoisyTopKGate, SparseMoE, cv_squared


def test_gate_picks_exactly_k_experts_and_weights_sum_to_one():
    torch.manual_seed(0)
    gate = NoisyTopKGate(hidden=16, num_experts=8, k=2)
    torch.nn.init.normal_(gate.w_gate)
    torch.nn.init.normal_(gate.w_noise)
    x = torch.randn(32, 16)
    for training in (True, False):
        gate.train(training)
        g = gate(x)
        assert ((g.gates > 0).sum(-1) == 2).all()
        torch.testing.assert_close(g.gates.sum(-1), torch.ones(32))
        assert g.top_idx.shape == (32, 2)
        torch.testing.assert_close(g.gates.gather(1, g.top_idx), g.top_w)


def test_eval_gating_is_deterministic_and_uses_clean_logits():
    gate = NoisyTopKGate(hidden=4, num_experts=4, k=1).eval()
    with torch.no_grad():
        gate.w_gate.copy_(torch.eye(4))
    x = torch.tensor([[0.0, 3.0, 1.0, 0.0], [5.0, 0.0, 0.0, 1.0]])
    assert gate(x).top_idx.squeeze(-1).tolist() == [1, 0]


def test_aux_loss_is_positive_and_differentiable():
    torch.manual_seed(0)
    moe = SparseMoE(hidden=16, num_experts=8, k=2).train()
    torch.nn.init.normal_(moe.gate.w_gate)
    x = torch.randn(64, 16)
    y, g = moe(x)
    assert y.shape == x.shape
    assert g.aux_loss.item() > 0
    g.aux_loss.backward()
    assert moe.gate.w_gate.grad is not None and moe.gate.w_gate.grad.abs().sum() > 0
    assert moe.gate.w_noise.grad is not None and moe.gate.w_noise.grad.abs().sum() > 0  # via the load term


def test_cv_squared_by_hand():
    assert cv_squared(torch.tensor([2.0, 2.0, 2.0])).item() == 0.0
    x = torch.tensor([1.0, 3.0])  # var (unbiased) 2, mean 2 -> 2 / 4
    assert abs(cv_squared(x).item() - 0.5) < 1e-6


def test_output_is_the_weighted_sum_of_the_chosen_experts():
    torch.manual_seed(1)
    moe = SparseMoE(hidden=8, num_experts=4, k=2).eval()
    torch.nn.init.normal_(moe.gate.w_gate)
    x = torch.randn(5, 8)
    y, g = moe(x)
    expected = torch.stack([
        sum(g.gates[i, e] * moe.experts[f"expert_{e}"](x[i : i + 1])[0] for e in range(4) if g.gates[i, e] > 0)
        for i in range(5)
    ])
    torch.testing.assert_close(y, expected)
