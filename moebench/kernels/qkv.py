"""The QKV projection with the input RMSNorm, the per-head q/k RMSNorms and RoPE fused in: reference, Triton kernel,
custom op, MAC formula."""

import torch
import torch.nn.functional as F

from moebench.kernels.interpret import check_device, ensure_interpreter_on_cpu
from moebench.kernels.registry import register_kernel
from moebench.kernels.tuning import tuned

INTERPRETED = ensure_interpreter_on_cpu()  # before any @triton.jit is defined, here or in common

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from moebench.kernels.common import cast, device_function, dot, pdl, wait_for_inputs  # noqa: E402
from moebench.kernels.rmsnorm import rms_norm_ref  # noqa: E402

# Legend: T tokens, D hidden size, H query heads, Hkv key/value heads, hd head size (even), h = hd/2 half a head,
# N = (H + 2·Hkv)·hd rows of w_qkv, BT tokens per program, BK reduction depth, BH columns of one half head.


def _rope_ref(x, cos, sin):
    """x [T, heads, hd], cos/sin [T, hd]: moebench.model.rope.apply_rope's ops, on the token-major layout."""
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def qkv_rope_ref(x, norm_weight, w_qkv, bias, q_norm_weight, k_norm_weight, cos, sin, n_heads: int,
                 n_kv_heads: int, eps: float):
    """x [T, D], norm_weight [D] or None, w_qkv [N, D] (q heads, then k, then v), bias [N] or None,
    q_norm_weight/k_norm_weight [hd], cos/sin [T, hd] -> q [T, H, hd], k [T, Hkv, hd], v [T, Hkv, hd].

    Exactly the model's input_layernorm then Attention with fused_qkv up to RoPE, every op in x's dtype:
    h = RMSNorm(x) (skipped when norm_weight is None), qkv = h W^T + bias, split, q and k normalised per head,
    then rotate-half RoPE on q and k. One eps for the three norms, as the model's config has one."""
    T, hd = x.shape[0], w_qkv.shape[0] // (n_heads + 2 * n_kv_heads)
    h = x if norm_weight is None else rms_norm_ref(x, norm_weight, eps)
    q, k, v = F.linear(h, w_qkv, bias).split([n_heads * hd, n_kv_heads * hd, n_kv_heads * hd], dim=-1)
    q = rms_norm_ref(q.view(T, n_heads, hd), q_norm_weight, eps)  # [T, H, hd]
    k = rms_norm_ref(k.view(T, n_kv_heads, hd), k_norm_weight, eps)  # [T, Hkv, hd]
    return _rope_ref(q, cos, sin), _rope_ref(k, cos, sin), v.reshape(T, n_kv_heads, hd)


@triton.jit
def _qkv_rope_kernel(x_ptr, nw_ptr, w_ptr, b_ptr, qn_ptr, kn_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr,
                     T, D, eps, H: tl.constexpr, HKV: tl.constexpr, HD: tl.constexpr,
                     HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BT: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr, USE_GDC: tl.constexpr):
    # Program (m, j): head j (q heads, then k, then v) of tokens block m. The head's two halves are accumulated
    # apart, so RoPE's rotate-half pairs column c with column c + hd/2 without moving data between lanes.
    wait_for_inputs(USE_GDC)
    dtype = x_ptr.dtype.element_ty
    HALF: tl.constexpr = HD // 2
    head = tl.program_id(1)
    rows = tl.program_id(0) * BT + tl.arange(0, BT)  # [BT] tokens
    row_ok = rows < T
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * D  # [BT, 1]
    c = tl.arange(0, BH)  # [BH] columns of one half head
    c_ok = c < HALF
    w1 = w_ptr + (head * HD + c).to(tl.int64)[None, :] * D  # [1, BH] first-half rows of w_qkv, transposed
    w2 = w1 + HALF * D  # second half

    if HAS_NORM:  # pass 1: each row's inverse RMS, float32
        ss = tl.zeros((BT,), dtype=tl.float32)
        for d0 in range(0, D, BK):
            d = d0 + tl.arange(0, BK)
            xf = tl.load(x_rows + d[None, :], mask=row_ok[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
            ss += tl.sum(xf * xf, axis=1)
        inv_rms = tl.rsqrt(ss / D + eps)  # [BT]

    # Pass 2: the projection, on the normalised activations rounded as the reference rounds them.
    acc1 = tl.zeros((BT, BH), dtype=tl.float32)
    acc2 = tl.zeros((BT, BH), dtype=tl.float32)
    for d0 in range(0, D, BK):
        d = d0 + tl.arange(0, BK)
        d_ok = d < D
        a = tl.load(x_rows + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BT, BK]
        if HAS_NORM:
            g = tl.load(nw_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
            y = cast(a.to(tl.float32) * inv_rms[:, None], dtype).to(tl.float32)  # cast back before the weight
            a = cast(y * g[None, :], dtype)
        w_mask = c_ok[None, :] & d_ok[:, None]
        acc1 = dot(a, tl.load(w1 + d[:, None], mask=w_mask, other=0.0), acc1)  # [BK, BH] weights
        acc2 = dot(a, tl.load(w2 + d[:, None], mask=w_mask, other=0.0), acc2)
    if HAS_BIAS:
        acc1 += tl.load(b_ptr + head * HD + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        acc2 += tl.load(b_ptr + head * HD + HALF + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    a1 = cast(acc1, dtype).to(tl.float32)  # the linear's output, in x's dtype; 0 on padding columns
    a2 = cast(acc2, dtype).to(tl.float32)

    _store_head(a1, a2, rows, c, row_ok, c_ok, head, qn_ptr, kn_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, eps,
                H, HKV, HD)


@device_function
def _store_head(a1, a2, rows, c, row_ok, c_ok, head, qn_ptr, kn_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, eps,
                H: tl.constexpr, HKV: tl.constexpr, HD: tl.constexpr):
    # a1, a2 [BT, BH]: the two halves of head `head` of the projection (float32 values of x's dtype). Stored in q, k
    # or v; q and k first normalised (RMSNorm over the head) and rotated (RoPE).
    dtype = q_ptr.dtype.element_ty
    HALF: tl.constexpr = HD // 2
    # Which output this head goes to: q [T, H, hd], k or v [T, Hkv, hd], all contiguous.
    is_q = head < H
    is_v = head >= H + HKV
    out_heads = HKV + (H - HKV) * is_q.to(tl.int32)
    out_head = head - H * (1 - is_q.to(tl.int32)) - HKV * is_v.to(tl.int32)
    if is_q:
        out_ptr = q_ptr
        n_ptr = qn_ptr
    elif is_v:
        out_ptr = v_ptr
        n_ptr = kn_ptr  # unused: v has no norm
    else:
        out_ptr = k_ptr
        n_ptr = kn_ptr
    out1 = out_ptr + rows.to(tl.int64)[:, None] * (out_heads * HD) + out_head * HD + c[None, :]  # [BT, BH]
    mask = row_ok[:, None] & c_ok[None, :]
    if is_v:
        tl.store(out1, cast(a1, dtype), mask=mask)
        tl.store(out1 + HALF, cast(a2, dtype), mask=mask)
    else:
        # The q/k RMSNorm over the whole head, both halves.
        inv = tl.rsqrt((tl.sum(a1 * a1, axis=1) + tl.sum(a2 * a2, axis=1)) / HD + eps)[:, None]  # [BT, 1]
        g1 = tl.load(n_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        g2 = tl.load(n_ptr + HALF + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        n1 = cast(cast(a1 * inv, dtype).to(tl.float32) * g1, dtype).to(tl.float32)
        n2 = cast(cast(a2 * inv, dtype).to(tl.float32) * g2, dtype).to(tl.float32)
        # RoPE: x·cos + rotate_half(x)·sin, each product rounded to x's dtype as torch rounds it.
        cs = rows.to(tl.int64)[:, None] * HD + c[None, :]  # [BT, BH]
        cos1 = tl.load(cos_ptr + cs, mask=mask, other=0.0).to(tl.float32)
        cos2 = tl.load(cos_ptr + cs + HALF, mask=mask, other=0.0).to(tl.float32)
        sin1 = tl.load(sin_ptr + cs, mask=mask, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_ptr + cs + HALF, mask=mask, other=0.0).to(tl.float32)
        r1 = cast(n1 * cos1, dtype).to(tl.float32) - cast(n2 * sin1, dtype).to(tl.float32)
        r2 = cast(n2 * cos2, dtype).to(tl.float32) + cast(n1 * sin2, dtype).to(tl.float32)
        tl.store(out1, cast(r1, dtype), mask=mask)
        tl.store(out1 + HALF, cast(r2, dtype), mask=mask)




@triton.jit
def _qkv_partial_kernel(x_ptr, nw_ptr, w_ptr, part_ptr, D, eps, HD: tl.constexpr, HAS_NORM: tl.constexpr,
                        SPLIT_D: tl.constexpr, BK: tl.constexpr, BHD: tl.constexpr, USE_GDC: tl.constexpr):
    # Program (t, j, s): token t's products for head j over the s-th SPLIT_D columns of D, float32, into
    # part[t, j, s, :hd]. For a few tokens (decode) the weights are read by (H + 2·Hkv)·D / SPLIT_D programs, not by
    # one per head. Without tl.dot (one row).
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.program_id(2)
    x_row = x_ptr + t * D
    cols = tl.arange(0, BHD)
    col_ok = cols < HD
    w_rows = w_ptr + (head * HD + cols).to(tl.int64)[:, None] * D  # [BHD, 1]
    start = s * SPLIT_D
    if USE_GDC:  # the first tile of weights before the wait for x (common.py: programmatic dependent launch)
        d = start + tl.arange(0, BK)
        w_first = tl.load(w_rows + d[None, :], mask=col_ok[:, None] & (d < D)[None, :], other=0.0)
        wait_for_inputs(USE_GDC)
    inv_rms = 1.0
    if HAS_NORM:  # the row's inverse RMS over all of D (the row is small and shared: from the L2 cache)
        ss = tl.zeros((BK,), dtype=tl.float32)
        for d0 in range(0, D, BK):
            d = d0 + tl.arange(0, BK)
            xf = tl.load(x_row + d, mask=d < D, other=0.0).to(tl.float32)
            ss += xf * xf
        inv_rms = tl.rsqrt(tl.sum(ss, axis=0) / D + eps)
    acc = tl.zeros((BHD,), dtype=tl.float32)
    if USE_GDC:
        a = _qkv_input(x_row, nw_ptr, start + tl.arange(0, BK), D, inv_rms, HAS_NORM)
        acc += tl.sum(w_first.to(tl.float32) * a[None, :], axis=1)
        start += BK
    for d0 in range(start, (s + 1) * SPLIT_D, BK):
        d = d0 + tl.arange(0, BK)
        a = _qkv_input(x_row, nw_ptr, d, D, inv_rms, HAS_NORM)
        w = tl.load(w_rows + d[None, :], mask=col_ok[:, None] & (d < D)[None, :], other=0.0)  # [BHD, BK]
        acc += tl.sum(w.to(tl.float32) * a[None, :], axis=1)
    tl.store(part_ptr + ((t * tl.num_programs(1) + head) * tl.num_programs(2) + s) * HD + cols, acc, mask=col_ok)


@device_function
def _qkv_input(x_row, nw_ptr, d, D, inv_rms, HAS_NORM: tl.constexpr):
    """[BK] float32: the row's columns d (0 past D), normalised and rounded as the reference rounds the norm's output
    when HAS_NORM."""
    dtype = x_row.dtype.element_ty
    d_ok = d < D
    a = tl.load(x_row + d, mask=d_ok, other=0.0)
    if HAS_NORM:
        g = tl.load(nw_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
        a = cast(cast(a.to(tl.float32) * inv_rms, dtype).to(tl.float32) * g, dtype)
    return a.to(tl.float32)


@triton.jit
def _qkv_finish_kernel(part_ptr, b_ptr, qn_ptr, kn_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, T, eps,
                       H: tl.constexpr, HKV: tl.constexpr, HD: tl.constexpr, HAS_BIAS: tl.constexpr,
                       SPLITS: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr, USE_GDC: tl.constexpr):
    # Program (m, j): head j of tokens block m from _qkv_partial_kernel's SPLITS partial products, summed in a fixed
    # order, then as _qkv_rope_kernel: bias, rounding, q/k norm, RoPE.
    wait_for_inputs(USE_GDC)
    dtype = q_ptr.dtype.element_ty
    HALF: tl.constexpr = HD // 2
    head = tl.program_id(1)
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    row_ok = rows < T
    c = tl.arange(0, BH)
    c_ok = c < HALF
    mask = row_ok[:, None] & c_ok[None, :]
    acc1 = tl.zeros((BT, BH), dtype=tl.float32)
    acc2 = tl.zeros((BT, BH), dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        base = part_ptr + ((rows.to(tl.int64)[:, None] * (H + 2 * HKV) + head) * SPLITS + s) * HD + c[None, :]
        acc1 += tl.load(base, mask=mask, other=0.0)
        acc2 += tl.load(base + HALF, mask=mask, other=0.0)
    if HAS_BIAS:
        acc1 += tl.load(b_ptr + head * HD + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        acc2 += tl.load(b_ptr + head * HD + HALF + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    a1 = cast(acc1, dtype).to(tl.float32)
    a2 = cast(acc2, dtype).to(tl.float32)
    _store_head(a1, a2, rows, c, row_ok, c_ok, head, qn_ptr, kn_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, eps,
                H, HKV, HD)


def _tiles(T: int) -> dict:
    """Launch options: BT, BK, and num_warps / num_stages where Triton's defaults are not kept (tl.dot needs 16 rows
    at least); or SPLIT_D and BK: the products in slices of D by _qkv_partial_kernel, then _qkv_finish_kernel.
    bench/gpu_kernels.py --sweep times other choices on a GPU."""
    if INTERPRETED:
        return dict(BT=16, BK=128)  # the interpreter pays per program and per loop step: few, large tiles
    if T <= 16:
        # Decode: one program per head left most of the GPU idle (40 programs: 27.4 µs on the H200 against 10.1 for
        # torch's bare product). Split over D (SPLIT_D a multiple of BK), 8x the programs: 13.4 µs on the H200, the
        # fastest of the sweep's 18 choices (BK=64: 23.8 µs; one program per head at best 16.1).
        return tuned("qkv", (T,), dict(SPLIT_D=256, BK=128, num_warps=4))
    return dict(BT=64, BK=64)


def _check(x, norm_weight, w_qkv, bias, q_norm_weight, k_norm_weight, cos, sin, n_heads, n_kv_heads) -> int:
    """Shapes and dtypes against the legend; returns hd."""
    heads = n_heads + 2 * n_kv_heads
    if (x.dim() != 2 or w_qkv.dim() != 2 or w_qkv.shape[1] != x.shape[1] or n_heads < 1 or n_kv_heads < 1
            or w_qkv.shape[0] % (2 * heads)):
        raise ValueError(f"qkv_rope: x {tuple(x.shape)} and w_qkv {tuple(w_qkv.shape)} with {n_heads} q and "
                         f"{n_kv_heads} kv heads do not fit [T, D], [(H + 2·Hkv)·hd, D] with hd even")
    (T, D), N = x.shape, w_qkv.shape[0]
    hd = N // heads
    expected = {"norm_weight": (D,), "bias": (N,), "q_norm_weight": (hd,), "k_norm_weight": (hd,),
                "cos": (T, hd), "sin": (T, hd)}
    given = dict(norm_weight=norm_weight, bias=bias, q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight,
                 cos=cos, sin=sin)
    for name, t in given.items():
        if t is not None and t.shape != expected[name]:
            raise ValueError(f"qkv_rope: {name} has shape {tuple(t.shape)}, expected {expected[name]}")
    wrong = [f"{name} {t.dtype}" for name, t in dict(w_qkv=w_qkv, **given).items()
             if t is not None and t.dtype != x.dtype]
    if wrong:
        raise ValueError(f"qkv_rope: every tensor must have x's dtype {x.dtype}; got {', '.join(wrong)}")
    return hd


def qkv_rope_triton(x, norm_weight, w_qkv, bias, q_norm_weight, k_norm_weight, cos, sin, n_heads: int,
                    n_kv_heads: int, eps: float):
    """Launch wrapper: same arguments and results as qkv_rope_ref."""
    hd = _check(x, norm_weight, w_qkv, bias, q_norm_weight, k_norm_weight, cos, sin, n_heads, n_kv_heads)
    check_device(INTERPRETED, *(t for t in (x, norm_weight, w_qkv, bias, q_norm_weight, k_norm_weight, cos, sin)
                                if t is not None))
    (T, D) = x.shape
    q = torch.empty(T, n_heads, hd, dtype=x.dtype, device=x.device)
    k = torch.empty(T, n_kv_heads, hd, dtype=x.dtype, device=x.device)
    v = torch.empty_like(k)
    if T == 0:
        return q, k, v
    early = pdl(early_reads=w_qkv.is_contiguous())  # a copy just made is no weight to read before the wait
    x, w_qkv = x.contiguous(), w_qkv.contiguous()
    tiles, heads = _tiles(T), n_heads + 2 * n_kv_heads
    nw, b = (norm_weight if norm_weight is not None else x).contiguous(), (bias if bias is not None else w_qkv)
    outputs = (q_norm_weight.contiguous(), k_norm_weight.contiguous(), cos.contiguous(), sin.contiguous(), q, k, v)
    shape = dict(H=n_heads, HKV=n_kv_heads, HD=hd)
    BH = max(16, triton.next_power_of_2(hd // 2))
    if "SPLIT_D" in tiles:  # the products split over D first, then the rest
        splits = triton.cdiv(D, tiles["SPLIT_D"])
        part = torch.empty(T, heads, splits, hd, dtype=torch.float32, device=x.device)
        _qkv_partial_kernel[(T, heads, splits)](x, nw, w_qkv, part, D, eps, HD=hd, HAS_NORM=norm_weight is not None,
                                                BHD=triton.next_power_of_2(hd), **tiles, **early)
        BT = min(16, triton.next_power_of_2(T))
        _qkv_finish_kernel[(triton.cdiv(T, BT), heads)](part, b.contiguous(), *outputs, T, eps, **shape,
                                                        HAS_BIAS=bias is not None, SPLITS=splits, BT=BT, BH=BH,
                                                        **pdl())
        return q, k, v
    _qkv_rope_kernel[(triton.cdiv(T, tiles["BT"]), heads)](
        x, nw, w_qkv, b.contiguous(), *outputs, T, D, eps, **shape, HAS_NORM=norm_weight is not None,
        HAS_BIAS=bias is not None, BH=BH, **tiles, **pdl())
    return q, k, v


# The op that models call, visible as a node in exported and compiled graphs.
@torch.library.custom_op("moebench::qkv_rope", mutates_args=())
def _qkv_rope_op(x: torch.Tensor, norm_weight: torch.Tensor | None, w_qkv: torch.Tensor, bias: torch.Tensor | None,
                 q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 n_heads: int, n_kv_heads: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return qkv_rope_triton(x, norm_weight, w_qkv, bias, q_norm_weight, k_norm_weight, cos, sin, n_heads,
                           n_kv_heads, eps)


@_qkv_rope_op.register_fake
def _(x, norm_weight, w_qkv, bias, q_norm_weight, k_norm_weight, cos, sin, n_heads, n_kv_heads, eps):
    T, hd = x.shape[0], w_qkv.shape[0] // (n_heads + 2 * n_kv_heads)
    return x.new_empty(T, n_heads, hd), x.new_empty(T, n_kv_heads, hd), x.new_empty(T, n_kv_heads, hd)


def qkv_rope(x: torch.Tensor, norm_weight: torch.Tensor | None, w_qkv: torch.Tensor, bias: torch.Tensor | None,
             q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             n_heads: int, n_kv_heads: int, eps: float):
    """The kernel as a model calls it: (q [T, H, hd], k [T, Hkv, hd], v [T, Hkv, hd]), q and k normalised and
    rotated, in place of input_layernorm, qkv_proj, the split, q_norm/k_norm and apply_rope. With MOEBENCH_PDL=1,
    w_qkv must not be written by the kernel launched just before (moebench/kernels/common.py)."""
    return torch.ops.moebench.qkv_rope(x, norm_weight, w_qkv, bias, q_norm_weight, k_norm_weight, cos, sin,
                                       n_heads, n_kv_heads, eps)


def qkv_rope_macs(x, norm_weight, w_qkv, *_) -> int:
    return x.shape[0] * x.shape[1] * w_qkv.shape[0]  # T·D·(H + 2·Hkv)·hd: the projection; norms and RoPE count 0


register_kernel("moebench::qkv_rope", qkv_rope_macs, reference=qkv_rope_ref, flag="qkv_kernel_enabled")
