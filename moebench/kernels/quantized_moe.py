"""The quantized MoE expert MLP (int8 / fp8 e4m3 weights, per-output-channel scales, dequantized in the kernel) and
the RMSNorm fused with the activations' quantization: references, Triton kernels, custom ops, MAC formulas."""

import torch
import torch.nn.functional as F

from moebench.kernels.interpret import check_device, ensure_interpreter_on_cpu
from moebench.kernels.registry import register_kernel

INTERPRETED = ensure_interpreter_on_cpu()  # before any @triton.jit is defined, here or in common

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from moebench.kernels.common import cast, device_function, dot  # noqa: E402
from moebench.kernels.fused_moe import combine, moe_align, sorted_tiles  # noqa: E402
from moebench.kernels.rmsnorm import rms_norm_ref  # noqa: E402

# Legend: T tokens, D hidden size, I expert intermediate size, E experts, k experts per token, N = T·k (token, expert)
# pairs, P rows of the sorted and padded pair list, BM rows per block (one expert each). A quantized tensor q (int8
# or fp8 e4m3, one byte an element) stands for q·scale, one float32 scale per output channel (weights) or per row
# (activations): symmetric, scale = amax / QMAX. `bound` clamps activations to [-bound, bound] before they are
# quantized or meet a quantized weight (NxDI's --quantized-kernel-lower-bound).

QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}  # the largest magnitude each quantized dtype holds


def _check_qdtype(what: str, qdtype) -> None:
    if qdtype not in QMAX:
        raise ValueError(f"{what}: qdtype {qdtype} is not supported; use torch.int8 or torch.float8_e4m3fn")


def _quantize(xf: torch.Tensor, qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [..., K] -> (q [..., K] in qdtype, scale [...] float32), one symmetric scale per row of K."""
    qmax = QMAX[qdtype]
    amax = xf.abs().amax(dim=-1)  # [...]
    # A tensor divisor: CUDA divides by a Python number as a product with its reciprocal (1 ulp off at times),
    # by a tensor exactly, as the CPU always does and the kernels do (div_rn).
    scale = torch.where(amax > 0, amax / torch.full_like(amax, qmax), torch.ones_like(amax))  # 0 row: scale 1
    q = (xf / scale.unsqueeze(-1)).clamp(-qmax, qmax)
    return (q.round() if qdtype == torch.int8 else q).to(qdtype), scale  # int8: nearest, ties to even


def quantize_weights(w: torch.Tensor, qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w [E, N, K] float (N output channels, K the reduction) -> (wq [E, N, K] in qdtype, scale [E, N] float32).

    Symmetric per output channel, as NxDI stores --quantized-mlp-kernel-enabled weights: w ≈ wq.float() · scale."""
    _check_qdtype("quantize_weights", qdtype)
    if w.dim() != 3 or not w.is_floating_point():
        raise ValueError(f"quantize_weights: w must be a float tensor [E, N, K]; got {w.dtype} {tuple(w.shape)}")
    pieces = [_quantize(w[e:e + 16].float(), qdtype) for e in range(0, w.shape[0], 16)]  # float32 copies stay small
    return torch.cat([q for q, _ in pieces]), torch.cat([s for _, s in pieces])


def quantize_rows(x: torch.Tensor, qdtype: torch.dtype, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, D] (any leading dims) -> (xq [T, D] in qdtype, x_scale [T] float32): per-token dynamic quantization of
    the activations, clamped to [-bound, bound] first so that one outlier cannot flatten its whole row."""
    _check_qdtype("quantize_rows", qdtype)
    return _quantize(x.float().clamp(-bound, bound), qdtype)


def quantized_moe_ref(x, wq_gate_up, s_gate_up, wq_down, s_down, topk_ids, topk_weights, bound: float,
                      x_scale=None, residual=None):
    """x [T, D], wq_gate_up [E, 2I, D] (gate rows first) with s_gate_up [E, 2I], wq_down [E, D, I] with s_down [E, D],
    topk_ids/topk_weights [T, k] -> [T, D] in topk_weights' dtype.

    The model's dtype is topk_weights' dtype (the router returns its weights in the activations' dtype), so that
    a pre-quantized x needs no extra argument. x is either activations in that dtype (x_scale None: clamped to
    ±bound) or int8/fp8 rows from rms_norm_quantize with x_scale [T] (dequantized: x·x_scale in the model's dtype).
    The weights are dequantized to the model's dtype, then it is fused_moe_ref's math: silu(gate)·up, clamped to
    ±bound, down, times the routing weight, summed over the k experts. A loop over the experts, each taking the
    tokens that chose it (a loop over tokens is as readable, and far slower in bfloat16 on the CPU).
    With a residual [T, D]: residual + out, as fused_moe_ref."""
    dtype = topk_weights.dtype
    a = x.clamp(-bound, bound) if x_scale is None else (x.float() * x_scale[:, None]).to(dtype)  # [T, D]
    w_gate_up = (wq_gate_up.float() * s_gate_up[..., None]).to(dtype)  # [E, 2I, D]
    w_down = (wq_down.float() * s_down[..., None]).to(dtype)  # [E, D, I]
    out = torch.zeros(x.shape, dtype=dtype, device=x.device)
    for e in range(w_gate_up.shape[0]):
        t, j = (topk_ids == e).nonzero(as_tuple=True)  # the tokens that chose e, and in which of their k slots
        gate, up = F.linear(a[t], w_gate_up[e]).chunk(2, dim=-1)  # [n, I] each
        h = (F.silu(gate) * up).clamp(-bound, bound)
        out.index_add_(0, t, F.linear(h, w_down[e]) * topk_weights[t, j, None])
    return out if residual is None else residual + out


def rms_norm_quantize_ref(x, weight, eps: float, bound: float, qdtype: torch.dtype):
    """x [T, D] (any leading dims), weight [D] -> (h [T, D], xq [T, D] in qdtype, x_scale [T] float32).

    h is the model's RMSNorm (rms_norm_ref: in x's dtype when weight shares it); the router still reads it. The
    expert MLP reads xq, h quantized per row by quantize_rows (NxDI's --rmsnorm-quantize-kernel-enabled)."""
    h = rms_norm_ref(x, weight, eps)
    return (h, *quantize_rows(h, qdtype, bound))


@device_function
def _round_half_even(x):
    # torch.round of float32 x, exactly (the interpreter has no libdevice.rint): the fraction x - floor(x) is exact.
    r = tl.floor(x)
    frac = x - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where((frac > 0.5) | ((frac == 0.5) & odd), r + 1.0, r)


if INTERPRETED:
    @device_function
    def _round_e4m3(x):
        """float32 x (|x| <= 448) rounded to e4m3's grid, ties to even. The interpreter's float32 -> fp8 cast loses
        the carry when rounding up crosses a power of two (127.9 becomes 64, not 128): hand it exact values."""
        bits = x.to(tl.uint32, bitcast=True)
        e = tl.maximum(((bits >> 23) & 0xFF).to(tl.int32) - 127, -6)  # below 2^-6, e4m3's subnormals: spacing 2^-9
        quantum = ((e + 124) << 23).to(tl.float32, bitcast=True)  # 2^(e - 3): three mantissa bits
        r = _round_half_even(tl.abs(x) / quantum) * quantum
        return tl.where((bits >> 31) != 0, -r, r)  # the sign kept, -0 included, as torch's cast keeps it

    @device_function
    def _operand(x, dtype: tl.constexpr):
        """A tile of the dot, its values exact in float32: the interpreter's dot computes in float32 anyway."""
        return x.to(tl.float32)
else:
    @device_function
    def _round_e4m3(x):
        return x  # the compiled cast rounds to nearest even itself

    @device_function
    def _operand(x, dtype: tl.constexpr):
        """A tile of the dot in the model's dtype (int8 and e4m3 values are exact in it): its tensor-core dot."""
        return x.to(dtype)


@triton.jit
def _gate_up_kernel(x_ptr, x_scale_ptr, w_ptr, w_scale_ptr, h_ptr, pairs_ptr, block_expert_ptr, N, D, I, k, bound,
                    stride_xt, stride_we, stride_wi, stride_se, stride_hp,
                    X_QUANTIZED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # Program (m, n): h[rows of block m, columns n] = silu(x W_gate^T) * (x W_up^T) for the block's expert, with
    # W = Wq·scale. The scales are constant along the reduction, so they multiply the accumulator once, after it.
    e = tl.load(block_expert_ptr + tl.program_id(0))
    if e < 0:
        return
    dtype = h_ptr.dtype.element_ty  # the model's dtype; int8 and e4m3 values are exact in it, so are the operands
    rows = tl.program_id(0) * BM + tl.arange(0, BM)  # [BM] sorted rows
    pair = tl.load(pairs_ptr + rows)  # [BM]
    row_ok = pair < N
    token = pair // k
    cols = tl.program_id(1) * BN + tl.arange(0, BN)  # [BN] columns of I
    col_ok = cols < I
    w_e = w_ptr + e.to(tl.int64) * stride_we
    gate = tl.zeros((BM, BN), dtype=tl.float32)
    up = tl.zeros((BM, BN), dtype=tl.float32)
    for d0 in range(0, D, BK):
        d = d0 + tl.arange(0, BK)
        d_ok = d < D
        a = tl.load(x_ptr + token[:, None] * stride_xt + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        a = a.to(tl.float32)
        if not X_QUANTIZED:
            a = tl.minimum(tl.maximum(a, -bound), bound)  # exact: the wrapper rounds bound to the model's dtype
        a = _operand(a, dtype)
        w_mask = col_ok[None, :] & d_ok[:, None]
        w_gate = tl.load(w_e + cols[None, :] * stride_wi + d[:, None], mask=w_mask, other=0.0)  # [BK, BN], 1 byte
        w_up = tl.load(w_e + (I + cols)[None, :] * stride_wi + d[:, None], mask=w_mask, other=0.0)
        gate = dot(a, _operand(w_gate, dtype), gate)
        up = dot(a, _operand(w_up, dtype), up)
    s_e = w_scale_ptr + e.to(tl.int64) * stride_se
    gate *= tl.load(s_e + cols, mask=col_ok, other=0.0)[None, :]
    up *= tl.load(s_e + I + cols, mask=col_ok, other=0.0)[None, :]
    if X_QUANTIZED:
        x_scale = tl.load(x_scale_ptr + token, mask=row_ok, other=0.0)[:, None]  # [BM, 1]
        gate *= x_scale
        up *= x_scale
    # Round where the reference rounds (each product in the model's dtype), compute in float32.
    gate = cast(gate, dtype).to(tl.float32)
    up = cast(up, dtype).to(tl.float32)
    act = cast(gate / (1.0 + tl.exp(-gate)), dtype).to(tl.float32)  # silu
    h = tl.minimum(tl.maximum(act * up, -bound), bound)  # clamped before it meets the quantized W_down
    tl.store(h_ptr + rows[:, None] * stride_hp + cols[None, :], cast(h, dtype), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(h_ptr, w_ptr, w_scale_ptr, y_ptr, pairs_ptr, block_expert_ptr, topk_w_ptr, N, D, I,
                 stride_hp, stride_we, stride_wd, stride_se, stride_yp,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # Program (m, n): y[pair, columns n] = topk_weight[pair] * (h W_down^T), W_down = Wq·scale, at each row's pair.
    e = tl.load(block_expert_ptr + tl.program_id(0))
    if e < 0:
        return
    dtype = y_ptr.dtype.element_ty
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    pair = tl.load(pairs_ptr + rows)
    row_ok = pair < N
    cols = tl.program_id(1) * BN + tl.arange(0, BN)  # [BN] columns of D
    col_ok = cols < D
    w_e = w_ptr + e.to(tl.int64) * stride_we
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for i0 in range(0, I, BK):
        i = i0 + tl.arange(0, BK)
        i_ok = i < I
        a = tl.load(h_ptr + rows[:, None] * stride_hp + i[None, :], mask=row_ok[:, None] & i_ok[None, :], other=0.0)
        b = tl.load(w_e + cols[None, :] * stride_wd + i[:, None], mask=col_ok[None, :] & i_ok[:, None], other=0.0)
        acc = dot(a, _operand(b, dtype), acc)
    acc *= tl.load(w_scale_ptr + e.to(tl.int64) * stride_se + cols, mask=col_ok, other=0.0)[None, :]
    weight = tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)  # [BM]
    y = cast(acc, dtype).to(tl.float32) * weight[:, None]
    tl.store(y_ptr + pair[:, None] * stride_yp + cols[None, :], cast(y, dtype), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _rms_norm_quantize_kernel(x_ptr, w_ptr, h_ptr, q_ptr, scale_ptr, D, eps, bound,
                              QMAX: tl.constexpr, IS_INT: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per row: the norm as rmsnorm's kernel computes it, then the row quantized; float32 throughout.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    xf = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)
    y = cast(xf * inv_rms, x_ptr.dtype.element_ty).to(tl.float32)  # cast back before the weight, as the reference
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    h = cast(w * y, h_ptr.dtype.element_ty)
    tl.store(h_ptr + row * D + cols, h, mask=mask)
    hf = tl.minimum(tl.maximum(h.to(tl.float32), -bound), bound)  # the rounded h, as quantize_rows reads it
    amax = tl.max(tl.abs(hf), axis=0)  # the padding lanes hold 0
    # div_rn: a compiled `/` may be 2 ulp off (the interpreter's is exact), and q must round as torch's does
    scale = tl.where(amax > 0, tl.div_rn(amax, tl.full(amax.shape, QMAX, tl.float32)), 1.0)
    q = tl.minimum(tl.maximum(tl.div_rn(hf, tl.broadcast_to(scale, hf.shape)), -QMAX), QMAX)
    if IS_INT:
        q = _round_half_even(q)  # a float -> int cast truncates
    else:
        q = _round_e4m3(q)
    tl.store(q_ptr + row * D + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


def _check_moe_args(x, wq_gate_up, s_gate_up, wq_down, s_down, topk_ids, topk_weights, bound, x_scale):
    """One ValueError line for each way the arguments can fail to fit; returns (T, D, E, I, k)."""
    if x.dim() != 2 or wq_gate_up.dim() != 3 or wq_down.dim() != 3:
        raise ValueError(f"quantized_moe: x {tuple(x.shape)}, wq_gate_up {tuple(wq_gate_up.shape)} and wq_down "
                         f"{tuple(wq_down.shape)} must be [T, D], [E, 2I, D], [E, D, I]")
    (T, D), (E, I2, D2), k = x.shape, wq_gate_up.shape, topk_ids.shape[-1]
    I = I2 // 2
    if D2 != D or I2 != 2 * I or wq_down.shape != (E, D, I):
        raise ValueError(f"quantized_moe: x {tuple(x.shape)}, wq_gate_up {tuple(wq_gate_up.shape)} and wq_down "
                         f"{tuple(wq_down.shape)} do not fit [T, D], [E, 2I, D], [E, D, I]")
    for name, w in (("wq_gate_up", wq_gate_up), ("wq_down", wq_down)):
        if w.dtype not in QMAX:
            raise ValueError(f"quantized_moe: {name} is {w.dtype}; quantize it with quantize_weights(w, torch.int8 "
                             f"or torch.float8_e4m3fn)")
    for name, s, shape in (("s_gate_up", s_gate_up, (E, 2 * I)), ("s_down", s_down, (E, D))):
        if s.shape != shape or s.dtype != torch.float32:
            raise ValueError(f"quantized_moe: {name} is {s.dtype} {tuple(s.shape)}, expected float32 {shape} "
                             f"(the scales quantize_weights returns)")
    if topk_ids.shape != (T, k) or topk_weights.shape != (T, k) or not topk_weights.is_floating_point():
        raise ValueError(f"quantized_moe: topk_ids {tuple(topk_ids.shape)} and topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [T={T}, k], the weights in the model's dtype")
    if x_scale is None and x.dtype != topk_weights.dtype:
        raise ValueError(f"quantized_moe: x is {x.dtype} but topk_weights is {topk_weights.dtype}; activations "
                         f"must be in the model's dtype, or quantized (int8 / fp8) with x_scale given")
    if x_scale is not None and (x.dtype not in QMAX or x_scale.shape != (T,) or x_scale.dtype != torch.float32):
        raise ValueError(f"quantized_moe: with x_scale, x must be int8 or float8_e4m3fn [T, D] and x_scale float32 "
                         f"[T={T}] (as rms_norm_quantize returns them); got {x.dtype} x and {x_scale.dtype} "
                         f"{tuple(x_scale.shape)} x_scale")
    if not bound > 0:
        raise ValueError(f"quantized_moe: bound must be positive, got {bound}")
    return T, D, E, I, k


def quantized_moe_triton(x, wq_gate_up, s_gate_up, wq_down, s_down, topk_ids, topk_weights, bound: float,
                         x_scale=None, residual=None):
    """Launch wrapper: same arguments and result as quantized_moe_ref."""
    T, D, E, I, k = _check_moe_args(x, wq_gate_up, s_gate_up, wq_down, s_down, topk_ids, topk_weights, bound, x_scale)
    check_device(INTERPRETED, x, wq_gate_up, s_gate_up, wq_down, s_down, topk_ids, topk_weights,
                 *([] if x_scale is None else [x_scale]))
    dtype = topk_weights.dtype
    if residual is not None and (residual.shape != (T, D) or residual.dtype != dtype):
        raise ValueError(f"quantized_moe: residual must be [T={T}, D={D}] in {dtype}, got {tuple(residual.shape)} "
                         f"{residual.dtype}")
    out = torch.empty(T, D, dtype=dtype, device=x.device)
    N = T * k
    if N == 0:
        return out.zero_() if residual is None else out.copy_(residual)
    bound = torch.tensor(bound, dtype=dtype).item()  # as torch clamps a tensor of dtype: at the bound in dtype
    x, wq_gate_up, wq_down = x.contiguous(), wq_gate_up.contiguous(), wq_down.contiguous()
    s_gate_up, s_down = s_gate_up.contiguous(), s_down.contiguous()
    tiles = sorted_tiles(N, E)  # the unquantized sorted kernels' launch options
    BM, BN = tiles["BM"], tiles["BN"]
    pairs, block_expert = moe_align(topk_ids, E, BM)
    n_blocks = block_expert.numel()
    h = torch.empty(pairs.numel(), I, dtype=dtype, device=x.device)  # [P, I] activations, sorted rows
    _gate_up_kernel[(n_blocks, triton.cdiv(I, BN))](
        x, x_scale if x_scale is not None else s_gate_up, wq_gate_up, s_gate_up, h, pairs, block_expert,
        N, D, I, k, bound, x.stride(0), wq_gate_up.stride(0), wq_gate_up.stride(1), s_gate_up.stride(0),
        h.stride(0), X_QUANTIZED=x_scale is not None, **tiles)
    y = torch.empty(N, D, dtype=dtype, device=x.device)  # [N, D] weighted expert outputs, pair order
    _down_kernel[(n_blocks, triton.cdiv(D, BN))](
        h, wq_down, s_down, y, pairs, block_expert, topk_weights.contiguous().flatten(), N, D, I,
        h.stride(0), wq_down.stride(0), wq_down.stride(1), s_down.stride(0), y.stride(0), **tiles)
    return combine(y, out, k, residual)


def rms_norm_quantize_triton(x, weight, eps: float, bound: float, qdtype: torch.dtype):
    """Launch wrapper: same arguments and results as rms_norm_quantize_ref."""
    _check_qdtype("rms_norm_quantize", qdtype)
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"rms_norm_quantize: weight has shape {tuple(weight.shape)}, expected ({D},)")
    if not bound > 0:
        raise ValueError(f"rms_norm_quantize: bound must be positive, got {bound}")
    check_device(INTERPRETED, x, weight)
    rows = x.reshape(-1, D).contiguous()  # [T, D]
    T = rows.shape[0]
    h = torch.empty(T, D, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    xq = torch.empty(T, D, dtype=qdtype, device=x.device)
    x_scale = torch.empty(T, dtype=torch.float32, device=x.device)
    if T:
        _rms_norm_quantize_kernel[(T,)](rows, weight.contiguous(), h, xq, x_scale, D, eps, float(bound),
                                        QMAX=QMAX[qdtype], IS_INT=qdtype == torch.int8,
                                        BLOCK_D=triton.next_power_of_2(D))
    return h.view(x.shape), xq.view(x.shape), x_scale.view(x.shape[:-1])


# The ops that models call, visible as nodes in exported and compiled graphs.
@torch.library.custom_op("moebench::quantized_moe", mutates_args=())
def _quantized_moe_op(x: torch.Tensor, wq_gate_up: torch.Tensor, s_gate_up: torch.Tensor, wq_down: torch.Tensor,
                      s_down: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, bound: float,
                      x_scale: torch.Tensor | None, residual: torch.Tensor | None = None) -> torch.Tensor:
    return quantized_moe_triton(x, wq_gate_up, s_gate_up, wq_down, s_down, topk_ids, topk_weights, bound, x_scale,
                                residual)


@_quantized_moe_op.register_fake
def _(x, wq_gate_up, s_gate_up, wq_down, s_down, topk_ids, topk_weights, bound, x_scale, residual=None):
    return x.new_empty(x.shape, dtype=topk_weights.dtype)


@torch.library.custom_op("moebench::rms_norm_quantize", mutates_args=())
def _rms_norm_quantize_op(x: torch.Tensor, weight: torch.Tensor, eps: float, bound: float,
                          qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return rms_norm_quantize_triton(x, weight, eps, bound, qdtype)


@_rms_norm_quantize_op.register_fake
def _(x, weight, eps, bound, qdtype):
    h = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))
    return h, x.new_empty(x.shape, dtype=qdtype), x.new_empty(x.shape[:-1], dtype=torch.float32)


def quantized_moe(x, wq_gate_up, s_gate_up, wq_down, s_down, topk_ids, topk_weights, bound: float, x_scale=None,
                  residual=None):
    """The kernel as a model calls it: the MoE block's expert output [T, D] in topk_weights' dtype, plus residual
    when given (--mlp-kernel-fuse-residual-add)."""
    return torch.ops.moebench.quantized_moe(x, wq_gate_up, s_gate_up, wq_down, s_down, topk_ids, topk_weights,
                                            bound, x_scale, residual)


def rms_norm_quantize(x, weight, eps: float, bound: float, qdtype: torch.dtype):
    """The kernel as a model calls it: (h for the router, xq and x_scale for quantized_moe)."""
    return torch.ops.moebench.rms_norm_quantize(x, weight, eps, bound, qdtype)


def quantized_moe_macs(x, wq_gate_up, s_gate_up, wq_down, s_down, topk_ids, *_) -> int:
    return x.shape[0] * topk_ids.shape[1] * 3 * x.shape[1] * wq_down.shape[2]  # T·k·3·D·I: gate+up 2DI, down DI


def rms_norm_quantize_macs(*args) -> int:
    return 0  # element-wise, as rms_norm_macs


register_kernel("moebench::quantized_moe", quantized_moe_macs, reference=quantized_moe_ref,
                flag="quantized_mlp_kernel_enabled")
register_kernel("moebench::rms_norm_quantize", rms_norm_quantize_macs, reference=rms_norm_quantize_ref,
                flag="rmsnorm_quantize_kernel_enabled")
