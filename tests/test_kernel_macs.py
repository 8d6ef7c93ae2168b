"""Each built-in kernel's MAC formula equals the multiply-accumulates its tl.dot calls really do in Triton's
interpreter, counted on the operands: a product counts when both of its factors are real data (padding lanes of a
tile are loaded as zeros, so random inputs, which have no exact zeros, tell real work from padding)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module defines its kernels

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="the kernels need Triton (its interpreter on the CPU)")

from moebench.kernels import interpret  # noqa: E402
from moebench.kernels.registry import KERNELS, load_builtin_kernels  # noqa: E402

if not interpret.interpreting():
    pytest.skip("counts the work of Triton's interpreter (TRITON_INTERPRET=1)", allow_module_level=True)

from triton.runtime.interpreter import InterpreterBuilder  # noqa: E402

load_builtin_kernels()
from moebench.kernels.quantized_moe import quantize_weights  # noqa: E402


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def moe(T=5, D=40, E=5, I=24, k=2):
    x, w_gate_up, w_down = randn(T, D, seed=1), randn(E, 2 * I, D, seed=2), randn(E, D, I, seed=3)
    ids = torch.stack([torch.randperm(E, generator=torch.Generator().manual_seed(t))[:k] for t in range(T)])
    return x, w_gate_up, w_down, ids, torch.rand(T, k, generator=torch.Generator().manual_seed(4))


def away_from_zero(w):
    """Values of magnitude 0.5 to 1.5: none quantizes to an int8 zero, which would look like padding."""
    return torch.sign(w) * (0.5 + torch.rand(w.shape, generator=torch.Generator().manual_seed(5)))


def quantized(x_quantized: bool):
    x, w_gate_up, w_down, ids, weights = moe()
    qgu, sgu = quantize_weights(away_from_zero(w_gate_up), torch.int8)
    qd, sd = quantize_weights(away_from_zero(w_down), torch.int8)
    x_scale = None
    if x_quantized:
        x, x_scale = (away_from_zero(x) * 80).round().to(torch.int8), torch.full((x.shape[0],), 0.01)
    return x, qgu, sgu, qd, sd, ids, weights, 1200.0, x_scale


T, D, H, HKV, HD, S = 5, 40, 4, 2, 16, 21
CASES = {
    "moebench::linear": lambda: (randn(T, D), randn(70, D, seed=1), randn(70, seed=2), randn(T, 70, seed=3)),
    "moebench::qkv_rope": lambda: (randn(T, D), randn(D, seed=1), randn((H + 2 * HKV) * HD, D, seed=2), None,
                                   randn(HD, seed=3), randn(HD, seed=4), randn(T, HD, seed=5), randn(T, HD, seed=6),
                                   H, HKV, 1e-6),
    "moebench::attention": lambda: (randn(2, H, 3, HD), randn(2, HKV, S, HD, seed=1), randn(2, HKV, S, HD, seed=2),
                                    torch.ones(2, 1, 3, S, dtype=torch.bool), HD**-0.5),
    "moebench::flash_decode": lambda: (randn(2, H, 1, HD), randn(2, HKV, S, HD, seed=1),
                                       randn(2, HKV, S, HD, seed=2), torch.ones(2, 1, 1, S, dtype=torch.bool),
                                       HD**-0.5),
    "moebench::moe_router": lambda: (randn(T, D), randn(6, D, seed=1), 2, True),
    "moebench::fused_moe": lambda: moe(),
    "moebench::quantized_moe": lambda: quantized(x_quantized=False),
    "moebench::quantized_moe[x quantized]": lambda: quantized(x_quantized=True),
    "moebench::rms_norm": lambda: (randn(T, D), randn(D, seed=1), 1e-6),
    "moebench::add_rms_norm": lambda: (randn(T, D), randn(T, D, seed=1), randn(D, seed=2), 1e-6),
    "moebench::rms_norm_quantize": lambda: (randn(T, D), randn(D, seed=1), 1e-6, 1200.0, torch.int8),
}


def test_every_builtin_kernel_has_a_case():
    builtin = {name for name in KERNELS if name.startswith("moebench::")}
    assert builtin == {name.split("[")[0] for name in CASES}


@pytest.mark.parametrize("case", CASES)
def test_mac_formula_equals_the_interpreters_dot_work(case, monkeypatch):
    done = []
    create_dot = InterpreterBuilder.create_dot

    def counting_dot(self, a, b, d, *args):
        done.append(int(np.matmul((a.data != 0).astype(np.int64), (b.data != 0).astype(np.int64)).sum()))
        return create_dot(self, a, b, d, *args)

    monkeypatch.setattr(InterpreterBuilder, "create_dot", counting_dot)
    name = case.split("[")[0]
    args = CASES[case]()
    getattr(torch.ops.moebench, name.split("::")[1])(*args)
    assert sum(done) == KERNELS[name].macs(*args)
