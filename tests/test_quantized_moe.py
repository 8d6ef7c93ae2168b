"""The quantized expert MLP and the RMSNorm fused with the activations' quantization: quantization round trips,
kernels against their torch references (under Triton's interpreter on the CPU), the error quantization costs
against the unquantized MoE, the clamp, the custom ops' fake impls, MACs and exported graphs."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module defines its kernels

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

pytest.importorskip("triton", reason="Triton is not installed; the kernel tests need it (pip install triton)")

from moebench.evaluation.flops import graph_macs  # noqa: E402
from moebench.kernels import interpret  # noqa: E402
from moebench.kernels.fused_moe import fused_moe_ref  # noqa: E402
from moebench.kernels.quantized_moe import (  # noqa: E402
    quantize_rows, quantize_weights, quantized_moe, quantized_moe_macs, quantized_moe_ref, rms_norm_quantize,
    rms_norm_quantize_ref)
from moebench.kernels.registry import KERNELS  # noqa: E402
from moebench.model.moe import route  # noqa: E402

# Legend: T tokens, D hidden, I expert intermediate, E experts, k experts per token.
DEVICE = "cuda" if torch.cuda.is_available() and not interpret.interpreting() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
DTYPES = [torch.float32, torch.bfloat16]
FP8 = torch.float8_e4m3fn
# fp8 runs in the interpreter (stored as uint8 there) and on GPUs from sm89 (Ada, Hopper) on.
FP8_RUNS = DEVICE == "cpu" or torch.cuda.get_device_capability() >= (8, 9)
NEEDS_FP8 = pytest.mark.skipif(not FP8_RUNS, reason="fp8 e4m3 needs sm89+")
QDTYPES = [torch.int8, pytest.param(FP8, marks=NEEDS_FP8)]
BOUND = 1200.0  # NxDI's default --quantized-kernel-lower-bound
EPS = 1e-6


def randn(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)


def bits(q):
    """A quantized tensor's bytes, for exact comparisons (torch compares no fp8 tensors)."""
    return q.view(torch.uint8)


def moe_inputs(T, qdtype, D=48, E=6, k=2, I=40, dtype=torch.float32, seed=6):
    """(x, norm weight, unquantized w_gate_up and w_down, their quantized (wq, scale) pairs, routing of x)."""
    x = randn(T, D, dtype=dtype, seed=seed)
    norm = 1 + randn(D, dtype=dtype, scale=0.1, seed=seed + 1)  # near 1, as trained RMSNorm weights are
    w_gate_up = randn(E, 2 * I, D, dtype=dtype, scale=D**-0.5, seed=seed + 2)
    w_down = randn(E, D, I, dtype=dtype, scale=I**-0.5, seed=seed + 3)
    ids, weights = route(randn(T, E, seed=seed + 4), k, True)
    return x, norm, w_gate_up, w_down, quantize_weights(w_gate_up, qdtype), quantize_weights(w_down, qdtype), \
        ids, weights.to(dtype)


def rel_err(out, want):
    return ((out.float() - want.float()).norm() / want.float().norm()).item()


# ---------------------------------------------------------------------------------------------------------------
# Quantization in plain torch


@pytest.mark.parametrize("qdtype", QDTYPES)
def test_quantize_weights_round_trip_and_one_byte_storage(qdtype):
    w = randn(4, 40, 48, scale=0.2)
    w[1, 7] = 0  # an all-zero channel
    wq, scale = quantize_weights(w, qdtype)
    assert wq.dtype == qdtype and wq.shape == w.shape and scale.shape == (4, 40) and scale.dtype == torch.float32
    assert wq.element_size() == 1  # the weights' bytes really shrink
    assert wq.nbytes * 4 == w.nbytes and wq.nbytes * 2 == w.to(torch.bfloat16).nbytes
    assert scale[1, 7] == 1 and not bits(wq[1, 7]).any()
    deq = wq.float() * scale[..., None]
    err = (deq - w).abs()
    if qdtype == torch.int8:  # a uniform grid: off by half a step at most
        assert (err <= scale[..., None] / 2 * (1 + 1e-5)).all()
    else:  # 3 mantissa bits: 2^-4 relative; e4m3's subnormals (below 2^-6 · 448 steps): 2^-10 steps absolute
        assert (err <= torch.maximum(w.abs() * 2**-4, scale[..., None] * 2**-10) * (1 + 1e-5)).all()
    torch.testing.assert_close(deq.abs().amax(-1), w.abs().amax(-1))  # the largest weight of each channel is kept
    assert rel_err(deq, w) < (0.01 if qdtype == torch.int8 else 0.03)


@pytest.mark.parametrize("qdtype", QDTYPES)
def test_quantize_rows_clamps_first(qdtype):
    x = randn(3, 48)
    x[0, 5], x[2] = 1e5, 0  # an outlier beyond the bound; an all-zero row
    xq, x_scale = quantize_rows(x, qdtype, bound=8.0)
    qmax = 127 if qdtype == torch.int8 else 448
    torch.testing.assert_close(x_scale, torch.tensor([8.0 / qmax, x[1].abs().max().item() / qmax, 1.0],
                                                     device=x.device))
    torch.testing.assert_close(xq[0, 5].float(), torch.tensor(float(qmax), device=x.device))


def test_quantize_rejects_unsupported_dtypes():
    with pytest.raises(ValueError, match="qdtype torch.float16 is not supported"):
        quantize_weights(randn(2, 4, 8), torch.float16)
    with pytest.raises(ValueError, match="qdtype"):
        rms_norm_quantize(randn(2, 8), randn(8), EPS, BOUND, torch.uint8)
    with pytest.raises(ValueError, match=r"\[E, N, K\]"):
        quantize_weights(randn(4, 8), torch.int8)


# ---------------------------------------------------------------------------------------------------------------
# The Triton kernels against their references


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("T", [1, 5, 127, 129])
def test_rms_norm_quantize_matches_reference(dtype, qdtype, T):
    x, norm = randn(T, 48, dtype=dtype, seed=1), randn(48, dtype=dtype, seed=2)
    h, xq, x_scale = rms_norm_quantize(x, norm, EPS, BOUND, qdtype)
    want_h, want_xq, want_scale = rms_norm_quantize_ref(x, norm, EPS, BOUND, qdtype)
    assert (h.dtype, xq.dtype, x_scale.dtype) == (dtype, qdtype, torch.float32) and x_scale.shape == (T,)
    torch.testing.assert_close(h, want_h, **TOL[dtype])
    torch.testing.assert_close(x_scale, want_scale, **TOL[torch.float32])
    # Exactly the quantization of the kernel's own h (an h one ulp off may move a value across a rounding edge).
    own_xq, own_scale = quantize_rows(h, qdtype, BOUND)
    torch.testing.assert_close(bits(xq), bits(own_xq), atol=0, rtol=0)
    torch.testing.assert_close(x_scale, own_scale, atol=0, rtol=0)


def test_rms_norm_quantize_any_leading_dims():
    x, norm = randn(2, 3, 40, dtype=torch.bfloat16, seed=3), randn(40, dtype=torch.bfloat16, seed=4)
    h, xq, x_scale = rms_norm_quantize(x, norm, EPS, BOUND, torch.int8)
    assert h.shape == xq.shape == x.shape and x_scale.shape == (2, 3)
    for got, want in zip((h, xq, x_scale), rms_norm_quantize_ref(x, norm, EPS, BOUND, torch.int8)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("T", [1, 5, 127, 129])
@pytest.mark.parametrize("prequantized", [False, True], ids=["x_model_dtype", "x_quantized"])
def test_quantized_moe_matches_reference(dtype, qdtype, T, prequantized):
    x, norm, _, _, (wq_gu, s_gu), (wq_d, s_d), ids, weights = moe_inputs(T, qdtype, dtype=dtype)
    x_scale = None
    if prequantized:  # the decoder layer's path: the norm hands the quantized rows straight to the experts
        _, x, x_scale = rms_norm_quantize(x, norm, EPS, BOUND, qdtype)
    args = (x, wq_gu, s_gu, wq_d, s_d, ids, weights, BOUND, x_scale)
    out = quantized_moe(*args)
    assert out.shape == x.shape and out.dtype == dtype
    torch.testing.assert_close(out, quantized_moe_ref(*args), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantized_moe_with_the_residual_fused(dtype):
    x, _, _, _, (wq_gu, s_gu), (wq_d, s_d), ids, weights = moe_inputs(17, torch.int8, dtype=dtype)
    r = randn(17, 48, dtype=dtype, seed=9)
    args = (x, wq_gu, s_gu, wq_d, s_d, ids, weights, BOUND, None)
    out = quantized_moe(*args, r)
    torch.testing.assert_close(out, quantized_moe_ref(*args, r), **TOL[dtype])
    torch.testing.assert_close(out, r + quantized_moe(*args), atol=0, rtol=0)  # the sum rounded first, as unfused


ERROR_BOUNDS = {torch.int8: (0.015, 0.02), FP8: (0.06, 0.07)}  # relative error: weights only, activations too


@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("prequantized", [False, True], ids=["weights_only", "activations_too"])
def test_quantized_moe_is_close_to_the_unquantized_moe(qdtype, prequantized):
    """What quantization costs, against fused_moe_ref on the very same (unquantized) weights, float32, 129 tokens."""
    x, norm, w_gate_up, w_down, (wq_gu, s_gu), (wq_d, s_d), ids, weights = moe_inputs(129, qdtype)
    moe_in, x_scale = x, None
    if prequantized:  # against the unquantized MoE of the norm's unquantized output h
        x, moe_in, x_scale = rms_norm_quantize(x, norm, EPS, BOUND, qdtype)
    err = rel_err(quantized_moe(moe_in, wq_gu, s_gu, wq_d, s_d, ids, weights, BOUND, x_scale),
                  fused_moe_ref(x, w_gate_up, w_down, ids, weights))
    print(f"\nquantized_moe {qdtype} {'activations too' if prequantized else 'weights only'}: "
          f"relative error {err:.4f} against the unquantized MoE")
    assert err < ERROR_BOUNDS[qdtype][prequantized], f"relative error {err:.4f}"


def test_clamp_holds_huge_activations_at_the_bound():
    T, bound = 5, 3.0
    x, norm, _, _, (wq_gu, s_gu), (wq_d, s_d), ids, weights = moe_inputs(T, torch.int8)
    huge = x.clone()
    huge[0, 3], huge[2, 10], huge[4, 0] = 1e6, -1e6, 50.0
    w = (wq_gu, s_gu, wq_d, s_d, ids, weights)
    out = quantized_moe(huge, *w, bound)
    torch.testing.assert_close(out, quantized_moe(huge.clamp(-bound, bound), *w, bound), atol=0, rtol=0)
    torch.testing.assert_close(out, quantized_moe_ref(huge, *w, bound), **TOL[torch.float32])
    assert out.isfinite().all() and not torch.allclose(out, quantized_moe(x, *w, bound))
    # The quantized path: one outlier sets its row's scale to bound / 127 and no more.
    _, xq, x_scale = rms_norm_quantize(huge, norm, EPS, bound, torch.int8)
    torch.testing.assert_close(x_scale[[0, 2]], torch.full((2,), bound / 127, device=x.device))
    torch.testing.assert_close(quantized_moe(xq, *w, bound, x_scale),
                               quantized_moe_ref(xq, *w, bound, x_scale), **TOL[torch.float32])


def test_clamp_of_the_intermediate_activations():
    """A bound small enough to clip silu(gate)·up changes the output, and the kernel clips as the reference does."""
    x, _, _, _, (wq_gu, s_gu), (wq_d, s_d), ids, weights = moe_inputs(5, torch.int8, seed=8)
    x = x * 4  # |x| < 16, |silu(gate)·up| up to a few units
    w = (wq_gu, s_gu, wq_d, s_d, ids, weights)
    out = quantized_moe(x, *w, 16.0)
    clipped = quantized_moe(x, *w, 0.5)  # h clipped, x not (its bound is the same one: only |x| > 0.5 move)
    torch.testing.assert_close(clipped, quantized_moe_ref(x, *w, 0.5), **TOL[torch.float32])
    assert not torch.allclose(out, clipped)


def test_quantized_moe_rejects_bad_arguments():
    x, norm, w_gate_up, _, (wq_gu, s_gu), (wq_d, s_d), ids, weights = moe_inputs(3, torch.int8)
    with pytest.raises(ValueError, match="quantize it with quantize_weights"):
        quantized_moe(x, w_gate_up, s_gu, wq_d, s_d, ids, weights, BOUND)
    with pytest.raises(ValueError, match="s_down"):
        quantized_moe(x, wq_gu, s_gu, wq_d, s_d[:, :-1], ids, weights, BOUND)
    with pytest.raises(ValueError, match="wq_down"):
        quantized_moe(x, wq_gu, s_gu, wq_d[:, :, :-1], s_d, ids, weights, BOUND)
    _, xq, x_scale = rms_norm_quantize(x, norm, EPS, BOUND, torch.int8)
    with pytest.raises(ValueError, match="x_scale given"):
        quantized_moe(xq, wq_gu, s_gu, wq_d, s_d, ids, weights, BOUND)
    with pytest.raises(ValueError, match=r"x_scale float32 \[T=3\]"):
        quantized_moe(xq, wq_gu, s_gu, wq_d, s_d, ids, weights, BOUND, x_scale[:2])
    with pytest.raises(ValueError, match="bound must be positive"):
        quantized_moe(x, wq_gu, s_gu, wq_d, s_d, ids, weights, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# As custom ops: the fake impls, the registry, exported graphs, MAC counting


def small_moe_args(prequantized, qdtype=torch.int8):
    x, norm, _, _, (wq_gu, s_gu), (wq_d, s_d), ids, weights = moe_inputs(5, qdtype, D=32, E=4, I=16,
                                                                         dtype=torch.bfloat16)
    x_scale = None
    if prequantized:
        _, x, x_scale = rms_norm_quantize(x, norm, EPS, BOUND, qdtype)
    return (x, wq_gu, s_gu, wq_d, s_d, ids, weights, BOUND, x_scale)


OPCHECKS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("op,args,checks", [
    ("quantized_moe", lambda: small_moe_args(prequantized=False), OPCHECKS),
    ("quantized_moe", lambda: small_moe_args(prequantized=True), OPCHECKS),
    # opcheck's own schema check multiplies the inputs, which torch does not do for fp8 ("mul_cpu_reduced_float").
    pytest.param("quantized_moe", lambda: small_moe_args(prequantized=True, qdtype=FP8), OPCHECKS[1:],
                 marks=NEEDS_FP8),
    ("rms_norm_quantize", lambda: (randn(5, 48, dtype=torch.bfloat16), randn(48, dtype=torch.bfloat16), EPS, BOUND,
                                   torch.int8), OPCHECKS),
    pytest.param("rms_norm_quantize", lambda: (randn(5, 48, dtype=torch.bfloat16), randn(48, dtype=torch.bfloat16),
                                               EPS, BOUND, FP8), OPCHECKS, marks=NEEDS_FP8),
], ids=["quantized_moe", "quantized_moe_x_int8", "quantized_moe_x_fp8", "rms_norm_quantize_int8",
        "rms_norm_quantize_fp8"])
def test_fake_impls_agree_with_the_kernels(op, args, checks):
    """Schema, fake tensor (shapes, dtypes, devices of the fake impl against the real run) and AOT dispatch."""
    torch.library.opcheck(getattr(torch.ops.moebench, op), args(), test_utils=checks)


def test_registry_entries_and_macs():
    moe, norm = KERNELS["moebench::quantized_moe"], KERNELS["moebench::rms_norm_quantize"]
    assert moe.flag == "quantized_mlp_kernel_enabled" and norm.flag == "rmsnorm_quantize_kernel_enabled"
    assert moe.reference is quantized_moe_ref and norm.reference is rms_norm_quantize_ref
    args = small_moe_args(prequantized=False)
    assert moe.macs(*args) == quantized_moe_macs(*args) == 5 * 2 * 3 * 32 * 16  # T·k·3·D·I
    assert norm.macs(randn(5, 32), randn(32), EPS, BOUND, torch.int8) == 0


class TinyQuantizedMoeBlock(nn.Module):
    """RMSNorm fused with the quantization, router, quantized experts: NxDI's quantized MoE block in small."""

    def __init__(self, D=32, E=4, I=16, k=2, qdtype=torch.int8):
        super().__init__()
        _, norm, _, _, (wq_gu, s_gu), (wq_d, s_d), _, _ = moe_inputs(1, qdtype, D=D, E=E, I=I)
        self.norm = nn.Parameter(norm)
        self.gate = nn.Parameter(randn(E, D, scale=D**-0.5, seed=10))
        for name, t in (("wq_gate_up", wq_gu), ("s_gate_up", s_gu), ("wq_down", wq_d), ("s_down", s_d)):
            self.register_buffer(name, t)
        self.k, self.qdtype = k, qdtype

    def forward(self, x, ops=None):
        norm_quantize, moe = ops or (rms_norm_quantize, quantized_moe)
        h, xq, x_scale = norm_quantize(x, self.norm, EPS, BOUND, self.qdtype)
        ids, weights = route(F.linear(h, self.gate), self.k, True)
        return moe(xq, self.wq_gate_up, self.s_gate_up, self.wq_down, self.s_down, ids, weights, BOUND, x_scale)


def test_ops_are_nodes_of_an_exported_graph_and_count_as_kernel_macs():
    T, D, E, I, k = 5, 32, 4, 16, 2
    block = TinyQuantizedMoeBlock(D, E, I, k).eval()
    x = randn(T, D, seed=11)
    with torch.no_grad():
        ep = torch.export.export(block, (x,))
        targets = {n.target for n in ep.graph_module.graph.nodes if n.op == "call_function"}
        assert {torch.ops.moebench.rms_norm_quantize.default, torch.ops.moebench.quantized_moe.default} <= targets
        macs = graph_macs(ep.graph_module)
        assert macs.by_op["moebench.quantized_moe.default"] == T * k * 3 * D * I
        assert macs.by_op["moebench.rms_norm_quantize.default"] == 0
        torch.testing.assert_close(ep.module()(x), block(x, ops=(rms_norm_quantize_ref, quantized_moe_ref)),
                                   **TOL[torch.float32])
