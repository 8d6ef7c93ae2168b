"""moebench.model.onednn: the CPU's eager products through oneDNN's packed weights equal torch's, and a packed copy
follows its weight when the weight changes in place."""

import pytest
import torch
import torch.nn.functional as F

from moebench.model import onednn
from moebench.model.moe import experts_forward, linear

pytestmark = pytest.mark.skipif(not onednn.AVAILABLE, reason="this torch build has no oneDNN")


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_linear_equals_torch_in_float32(rows):
    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 80)
    x = torch.randn(2, rows, 96)
    assert onednn.usable(x, x.dtype)
    torch.testing.assert_close(linear(layer, x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_packed_copy_follows_in_place_changes_of_its_weight():
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 16, bias=False)
    x = torch.randn(5, 32)
    first = linear(layer, x)
    with torch.no_grad():
        layer.weight.mul_(2)  # as load_state_dict's copy_ would: the packed copy must not go stale
    torch.testing.assert_close(linear(layer, x), 2 * first)
    layer.weight.data = torch.zeros(16, 32)  # new storage under the same parameter
    assert linear(layer, x).abs().max() == 0
    assert onednn.packed(layer.weight, torch.float32) is onednn.packed(layer.weight, torch.float32)  # packed once


def test_experts_through_packed_weights_equal_the_exported_batched_products():
    """The eager CPU loop (oneDNN) against the same multiply-accumulates written as gathered batched products."""
    torch.manual_seed(0)
    T, D, I, E, k = 40, 32, 16, 6, 2
    x = torch.randn(T, D)
    w1, w2 = torch.randn(E, 2 * I, D) / D**0.5, torch.randn(E, D, I) / I**0.5
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    weights = torch.softmax(torch.randn(T, k), -1)
    gate, up = torch.einsum("tkid,td->tki", w1[ids], x).chunk(2, dim=-1)
    expected = torch.einsum("tkdi,tki,tk->td", w2[ids], F.silu(gate) * up, weights)
    torch.testing.assert_close(experts_forward(x, w1, w2, ids, weights), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(experts_forward(x[:1], w1, w2, ids[:1], weights[:1]), expected[:1],
                               rtol=1e-5, atol=1e-5)  # one token: its k experts only


def test_not_used_inside_compiled_graphs():
    seen = []

    def f(x):
        seen.append(onednn.usable(x, x.dtype))
        return x + 1

    torch.compile(f, backend="eager")(torch.ones(3))
    assert seen == [False]
