"""A tiled matmul for the model's projections (attention output with the residual add fused, LM head, dense MLP):
reference, Triton kernel, custom op, MAC formula."""

import torch
import torch.nn.functional as F

from moebench.kernels.interpret import check_device, ensure_interpreter_on_cpu
from moebench.kernels.registry import register_kernel
from moebench.kernels.tuning import tuned

INTERPRETED = ensure_interpreter_on_cpu()  # before any @triton.jit is defined, here or in common

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from moebench.kernels.common import cast, device_function, dot, pdl, wait_for_inputs  # noqa: E402

# Legend: M rows (tokens), K input features, N output features.


def linear_ref(x, weight, bias=None, residual=None):
    """x [..., K], weight [N, K], bias [N] or None, residual [..., N] or None -> [..., N] in x's dtype.

    F.linear, then residual + that when a residual is given: both rounded to x's dtype, as the model's
    `residual + o_proj(o)` rounds them."""
    out = F.linear(x, weight, bias)
    return out if residual is None else residual + out


@triton.jit
def _linear_kernel(x_ptr, w_ptr, b_ptr, r_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_rm, stride_om,
                   HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, USE_GDC: tl.constexpr):
    # Program (m, n): out[rows m, columns n] = x W^T (+ bias) (+ residual), float32 accumulation.
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    row_ok, col_ok = rows < M, cols < N
    rows64 = rows.to(tl.int64)  # M·N passes 2^31 for the LM head of a long prompt
    x_rows = x_ptr + rows64[:, None] * stride_xm  # [BM, 1]
    w_cols = w_ptr + cols[None, :].to(tl.int64) * stride_wn  # [1, BN]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    start = 0
    if USE_GDC:  # the first tile of weights before the wait for x (common.py: programmatic dependent launch)
        k = tl.arange(0, BK)
        b = tl.load(w_cols + k[:, None], mask=col_ok[None, :] & (k < K)[:, None], other=0.0)
        wait_for_inputs(USE_GDC)
        acc = dot(tl.load(x_rows + k[None, :], mask=row_ok[:, None] & (k < K)[None, :], other=0.0), b, acc)
        start = BK
    for k0 in range(start, K, BK):
        k = k0 + tl.arange(0, BK)
        k_ok = k < K
        a = tl.load(x_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        b = tl.load(w_cols + k[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)  # [BK, BN], W transposed
        acc = dot(a, b, acc)
    dtype = out_ptr.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if HAS_RESIDUAL:  # round the product first, as the reference adds two tensors of x's dtype
        r = tl.load(r_ptr + rows64[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc = cast(acc, dtype).to(tl.float32) + r
    tl.store(out_ptr + rows64[:, None] * stride_om + cols[None, :], cast(acc, dtype), mask=mask)


@triton.jit
def _rows_kernel(x_ptr, w_ptr, b_ptr, r_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_rm, stride_om,
                 HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr, USE_GDC: tl.constexpr):
    # Program (m, n): one row m, BN columns, without tl.dot (which pads a row to 16): products summed along K in
    # float32. For a few rows (decode), where the weights are read once whatever the tile and small BN gives the
    # GPU many programs to keep its reads in flight. BM is 1 (the launch options' mark of this kernel).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = _row_products(x_ptr, w_ptr, row, cols, 0, K, N, K, stride_xm, stride_wn, BN, BK, USE_GDC)
    _row_epilogue(acc, b_ptr, r_ptr, out_ptr, row, cols, N, stride_rm, stride_om, HAS_BIAS, HAS_RESIDUAL)


@triton.jit
def _rows_partial_kernel(x_ptr, w_ptr, part_ptr, N, K, stride_xm, stride_wn, SPLIT_K: tl.constexpr,
                         BN: tl.constexpr, BK: tl.constexpr, USE_GDC: tl.constexpr):
    # Program (m, n, s): _rows_kernel's products over the s-th SPLIT_K columns of K only, float32, into
    # part[m, s, columns n]: split over K, a matrix with few output columns (o_proj) still gets many programs.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    s = tl.program_id(2)
    acc = _row_products(x_ptr, w_ptr, row, cols, s * SPLIT_K, (s + 1) * SPLIT_K, N, K, stride_xm, stride_wn,
                         BN, BK, USE_GDC)
    tl.store(part_ptr + (row * tl.num_programs(2) + s) * N + cols, acc, mask=cols < N)


@triton.jit
def _rows_finish_kernel(part_ptr, b_ptr, r_ptr, out_ptr, N, stride_rm, stride_om, SPLITS: tl.constexpr,
                        HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BN: tl.constexpr,
                        USE_GDC: tl.constexpr):
    # Program (m, n): the SPLITS partial products of _rows_partial_kernel summed in a fixed order, then the epilogue.
    wait_for_inputs(USE_GDC)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BN,), dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        acc += tl.load(part_ptr + (row * SPLITS + s) * N + cols, mask=cols < N, other=0.0)
    _row_epilogue(acc, b_ptr, r_ptr, out_ptr, row, cols, N, stride_rm, stride_om, HAS_BIAS, HAS_RESIDUAL)


@device_function
def _row_products(x_ptr, w_ptr, row, cols, k_start, k_end, N, K, stride_xm, stride_wn, BN: tl.constexpr,
                  BK: tl.constexpr, USE_GDC: tl.constexpr):
    """[BN] float32: x[row, k_start:k_end] · W[cols, k_start:k_end]; columns past N or K count 0. With USE_GDC, the
    first tile of weights is loaded before the wait for x (common.py: programmatic dependent launch)."""
    col_ok = cols < N
    x_row = x_ptr + row * stride_xm
    w_rows = w_ptr + cols[:, None].to(tl.int64) * stride_wn  # [BN, 1]
    acc = tl.zeros((BN,), dtype=tl.float32)
    start = k_start
    if USE_GDC:
        k = k_start + tl.arange(0, BK)
        k_ok = (k < K) & (k < k_end)
        w_first = tl.load(w_rows + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        wait_for_inputs(USE_GDC)
        a = tl.load(x_row + k, mask=k_ok, other=0.0).to(tl.float32)
        acc += tl.sum(w_first.to(tl.float32) * a[None, :], axis=1)
        start = k_start + BK
    for k0 in range(start, k_end, BK):
        k = k0 + tl.arange(0, BK)
        k_ok = k < K
        a = tl.load(x_row + k, mask=k_ok, other=0.0).to(tl.float32)  # [BK]
        w = tl.load(w_rows + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # [BN, BK]
        acc += tl.sum(w * a[None, :], axis=1)
    return acc


@device_function
def _row_epilogue(acc, b_ptr, r_ptr, out_ptr, row, cols, N, stride_rm, stride_om, HAS_BIAS: tl.constexpr,
                  HAS_RESIDUAL: tl.constexpr):
    """Row `row`'s columns of out = acc (+ bias) (+ residual), rounded to out's dtype."""
    col_ok = cols < N
    dtype = out_ptr.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:  # round the product first, as the reference adds two tensors of x's dtype
        acc = cast(acc, dtype).to(tl.float32) + tl.load(r_ptr + row * stride_rm + cols, mask=col_ok,
                                                        other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + cols, cast(acc, dtype), mask=col_ok)


def _tiles(M: int, N: int, K: int) -> dict:
    """Launch options: BM, BN, BK, and num_warps / num_stages where Triton's defaults are not kept. tl.dot needs 16
    rows at least: decode (M = 1) pays for 16, but the weights, which dominate, are read once per column block
    whatever BM is. BM = 1 launches _rows_kernel instead (no tl.dot, one row a program), and with SPLIT_K (a
    multiple of BK) _rows_partial_kernel over slices of K then _rows_finish_kernel. bench/gpu_kernels.py --sweep
    times other choices on a GPU."""
    if INTERPRETED:  # the interpreter pays per program and per loop step, hardly per element: few, large tiles
        return dict(BM=16, BN=min(1024, max(16, triton.next_power_of_2(N))),
                    BK=min(256, max(16, triton.next_power_of_2(K))))
    if M <= 16:  # decode: narrow, deep tiles, twice the programs (H200, bench/gpu_kernels.py --sweep: o_proj
        return tuned("linear", (M, N, K), dict(BM=16, BN=32, BK=256))  # 30.3 -> 12.7 µs, LM head 153.7 -> 149.5)
    return dict(BM=64, BN=64, BK=64)


def linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  residual: torch.Tensor | None = None) -> torch.Tensor:
    """Launch wrapper: same arguments and result as linear_ref."""
    K, (N, K2) = x.shape[-1], weight.shape
    out_shape = (*x.shape[:-1], N)
    if K2 != K:
        raise ValueError(f"linear: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit [..., K], [N, K]")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"linear: bias has shape {tuple(bias.shape)}, expected ({N},)")
    if residual is not None and residual.shape != out_shape:
        raise ValueError(f"linear: residual has shape {tuple(residual.shape)}, expected {out_shape}")
    if x.dtype != weight.dtype:
        raise ValueError(f"linear: x is {x.dtype} but weight is {weight.dtype}; they must match")
    check_device(INTERPRETED, x, weight)
    rows = x.reshape(-1, K).contiguous()  # [M, K]
    M = rows.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M and N:
        res = residual.reshape(M, N).contiguous() if residual is not None else out
        early = pdl(early_reads=weight.is_contiguous())  # a copy just made is no weight to read before the wait
        weight = weight.contiguous()
        tiles = dict(_tiles(M, N, K))
        b = bias if bias is not None else weight
        epilogue = dict(HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None)
        split_k = tiles.pop("SPLIT_K", None)
        grid = (triton.cdiv(M, tiles["BM"]), triton.cdiv(N, tiles["BN"]))
        if split_k and (tiles["BM"] != 1 or split_k % tiles["BK"]):
            raise ValueError(f"linear: SPLIT_K={split_k} needs BM=1 and a multiple of BK; got {tiles}")
        if split_k and split_k < K:  # the products split over K, then summed with the epilogue
            splits = triton.cdiv(K, split_k)
            part = torch.empty(M, splits, N, dtype=torch.float32, device=x.device)
            tiles.pop("BM")
            _rows_partial_kernel[(*grid, splits)](rows, weight, part, N, K, rows.stride(0), weight.stride(0),
                                                  SPLIT_K=split_k, **tiles, **early)
            _rows_finish_kernel[(M, triton.cdiv(N, 256))](part, b, res, out, N, res.stride(0), out.stride(0),
                                                          SPLITS=splits, BN=256, **epilogue, **pdl())
        else:
            kernel = _rows_kernel if tiles["BM"] == 1 else _linear_kernel
            kernel[grid](rows, weight, b, res, out, M, N, K, rows.stride(0), weight.stride(0), res.stride(0),
                         out.stride(0), **epilogue, **tiles, **early)
    return out.view(out_shape)


@torch.library.custom_op("moebench::linear", mutates_args=())
def _linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               residual: torch.Tensor | None) -> torch.Tensor:
    return linear_triton(x, weight, bias, residual)


@_linear_op.register_fake
def _(x, weight, bias, residual):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel as a model calls it, in place of F.linear(x, weight, bias) (+ residual). With MOEBENCH_PDL=1 the
    weight must not be written by the kernel launched just before (moebench/kernels/common.py)."""
    return torch.ops.moebench.linear(x, weight, bias, residual)


def linear_macs(x, weight, *_) -> int:
    return x.numel() * weight.shape[0]  # M·K·N


register_kernel("moebench::linear", linear_macs, reference=linear_ref)
