"""The fused MoE expert MLP: tokens sorted by expert, grouped GEMMs with SiLU·up fused and the weighted combine."""

import torch
import torch.nn.functional as F

from moebench.kernels.interpret import check_device, ensure_interpreter_on_cpu
from moebench.kernels.registry import register_kernel
from moebench.kernels.tuning import tuned

INTERPRETED = ensure_interpreter_on_cpu()  # before any @triton.jit is defined, here or in common

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from moebench.kernels.common import cast, dot, pdl, wait_for_inputs  # noqa: E402

# Legend: T tokens, D hidden size, I expert intermediate size, E experts, k experts per token,
# N = T·k (token, expert) pairs, P rows of the sorted and padded pair list, BM rows per block (one expert each).


def fused_moe_ref(x, w_gate_up, w_down, topk_ids, topk_weights, residual=None):
    """x [T, D], w_gate_up [E, 2I, D] (gate rows first), w_down [E, D, I], topk_ids/topk_weights [T, k],
    residual [T, D] or None -> [T, D].

    out[t] = sum_j topk_weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = topk_ids[t, j]:
    a loop over every (token, chosen expert) pair: the readable spec of moebench.model.moe.experts_forward.
    With a residual: residual + out, both rounded to x's dtype (the layer's `h + mlp(...)`)."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(topk_ids[t].tolist(), topk_weights[t]):
            gate, up = F.linear(x[t], w_gate_up[e]).chunk(2, dim=-1)
            out[t] += F.linear(F.silu(gate) * up, w_down[e]) * w
    return out if residual is None else residual + out


def moe_align(topk_ids: torch.Tensor, E: int, BM: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the N = T·k pairs by expert and pad each expert's run to a multiple of BM (vLLM's moe_align_block_size).

    Returns pairs [P], the pair index t·k + j at each sorted row (N on padding rows), and block_expert [P // BM],
    the expert of each block of BM rows (-1 for the unused blocks at the end). P is a bound known from the shapes
    alone, cdiv(N, BM) + min(E, N) blocks, so nothing here waits for the device."""
    flat = topk_ids.flatten()  # [N]
    N = flat.numel()
    n_blocks = triton.cdiv(N, BM) + min(E, N)
    # [E] pairs per expert; not torch.bincount, which on CUDA reads the largest id back to the host (no CUDA graph)
    counts = torch.zeros(E, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + BM - 1) // BM * BM  # [E]
    padded_end = padded.cumsum(0)  # [E]
    order = flat.argsort(stable=True)  # [N] pair indices, sorted by expert
    expert = flat[order]
    rank = torch.arange(N, device=flat.device) - (counts.cumsum(0) - counts)[expert]  # place within its expert's run
    pairs = torch.full((n_blocks * BM,), N, dtype=torch.int64, device=flat.device)
    pairs[(padded_end - padded)[expert] + rank] = order
    block_start = torch.arange(n_blocks, device=flat.device) * BM
    block_expert = torch.searchsorted(padded_end, block_start, right=True)  # [n_blocks]; E past the last used block
    block_expert = torch.where(block_expert < E, block_expert, -1).to(torch.int32)
    return pairs, block_expert


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, h_ptr, pairs_ptr, block_expert_ptr, N, D, I, k,
                    stride_xt, stride_we, stride_wi, stride_hp,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, USE_GDC: tl.constexpr):
    # Program (m, n): h[rows of block m, columns n] = silu(x W_gate^T) * (x W_up^T), for the block's expert.
    wait_for_inputs(USE_GDC)
    e = tl.load(block_expert_ptr + tl.program_id(0))
    if e < 0:
        return
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
        w_mask = col_ok[None, :] & d_ok[:, None]
        w_gate = tl.load(w_e + cols[None, :] * stride_wi + d[:, None], mask=w_mask, other=0.0)  # [BK, BN]
        w_up = tl.load(w_e + (I + cols)[None, :] * stride_wi + d[:, None], mask=w_mask, other=0.0)
        gate = dot(a, w_gate, gate)
        up = dot(a, w_up, up)
    # Round where the reference rounds (each product in the activations' dtype), compute in float32.
    dtype = h_ptr.dtype.element_ty
    gate = cast(gate, dtype).to(tl.float32)
    up = cast(up, dtype).to(tl.float32)
    act = cast(gate / (1.0 + tl.exp(-gate)), dtype).to(tl.float32)  # silu
    tl.store(h_ptr + rows[:, None] * stride_hp + cols[None, :], cast(act * up, dtype),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(h_ptr, w_ptr, y_ptr, pairs_ptr, block_expert_ptr, topk_w_ptr, N, D, I,
                 stride_hp, stride_we, stride_wd, stride_yp,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, USE_GDC: tl.constexpr):
    # Program (m, n): y[pair, columns n] = topk_weight[pair] * (h W_down^T), written at each row's own pair.
    wait_for_inputs(USE_GDC)
    e = tl.load(block_expert_ptr + tl.program_id(0))
    if e < 0:
        return
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
        acc = dot(a, b, acc)
    dtype = y_ptr.dtype.element_ty
    weight = tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)  # [BM]
    y = cast(acc, dtype).to(tl.float32) * weight[:, None]
    tl.store(y_ptr + pair[:, None] * stride_yp + cols[None, :], cast(y, dtype), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _pair_gate_up_kernel(x_ptr, w_ptr, h_ptr, ids_ptr, D, I, k, stride_xt, stride_we, stride_wi, stride_hp,
                         BN: tl.constexpr, BK: tl.constexpr, USE_GDC: tl.constexpr):
    # Program (p, n): pair p = t·k + j, unsorted: h[p, columns n] = silu(x[t] W_gate^T) * (x[t] W_up^T) for expert
    # ids[p], products summed along D without tl.dot (one row). For a few pairs (decode) each with its own expert:
    # no sort, and every program streams weights. (The router, just before, writes ids: nothing before the wait.)
    wait_for_inputs(USE_GDC)
    p = tl.program_id(0)
    e = tl.load(ids_ptr + p).to(tl.int64)
    token = p // k
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    col_ok = cols < I
    w_e = w_ptr + e * stride_we
    gate = tl.zeros((BN,), dtype=tl.float32)
    up = tl.zeros((BN,), dtype=tl.float32)
    for d0 in range(0, D, BK):
        d = d0 + tl.arange(0, BK)
        d_ok = d < D
        a = tl.load(x_ptr + token * stride_xt + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]  # [1, BK]
        w_mask = col_ok[:, None] & d_ok[None, :]
        w_gate = tl.load(w_e + cols[:, None] * stride_wi + d[None, :], mask=w_mask, other=0.0)  # [BN, BK]
        w_up = tl.load(w_e + (I + cols)[:, None] * stride_wi + d[None, :], mask=w_mask, other=0.0)
        gate += tl.sum(w_gate.to(tl.float32) * a, axis=1)
        up += tl.sum(w_up.to(tl.float32) * a, axis=1)
    dtype = h_ptr.dtype.element_ty  # rounded where the reference rounds, as _gate_up_kernel
    gate = cast(gate, dtype).to(tl.float32)
    up = cast(up, dtype).to(tl.float32)
    act = cast(gate / (1.0 + tl.exp(-gate)), dtype).to(tl.float32)
    tl.store(h_ptr + p * stride_hp + cols, cast(act * up, dtype), mask=col_ok)


@triton.jit
def _pair_down_kernel(h_ptr, w_ptr, y_ptr, ids_ptr, topk_w_ptr, D, I, stride_hp, stride_we, stride_wd, stride_yp,
                      BN: tl.constexpr, BK: tl.constexpr, USE_GDC: tl.constexpr):
    # Program (p, n): y[p, columns n] = topk_weight[p] * (h[p] W_down^T) for expert ids[p]. With programmatic
    # dependent launch, ids and the first tile of weights are read before the wait (common.py): the router wrote ids
    # two launches back, the gate/up kernel lies between.
    p = tl.program_id(0)
    e = tl.load(ids_ptr + p).to(tl.int64)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    col_ok = cols < D
    w_rows = w_ptr + e * stride_we + cols[:, None] * stride_wd  # [BN, 1]
    h_row = h_ptr + p * stride_hp
    acc = tl.zeros((BN,), dtype=tl.float32)
    start = 0
    if USE_GDC:
        i = tl.arange(0, BK)
        w = tl.load(w_rows + i[None, :], mask=col_ok[:, None] & (i < I)[None, :], other=0.0)
        wait_for_inputs(USE_GDC)
        a = tl.load(h_row + i, mask=i < I, other=0.0).to(tl.float32)[None, :]
        acc += tl.sum(w.to(tl.float32) * a, axis=1)
        start = BK
    for i0 in range(start, I, BK):
        i = i0 + tl.arange(0, BK)
        i_ok = i < I
        a = tl.load(h_row + i, mask=i_ok, other=0.0).to(tl.float32)[None, :]
        w = tl.load(w_rows + i[None, :], mask=col_ok[:, None] & i_ok[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * a, axis=1)
    dtype = y_ptr.dtype.element_ty
    y = cast(acc, dtype).to(tl.float32) * tl.load(topk_w_ptr + p).to(tl.float32)
    tl.store(y_ptr + p * stride_yp + cols, cast(y, dtype), mask=col_ok)


@triton.jit
def _token_down_kernel(h_ptr, w_ptr, out_ptr, r_ptr, ids_ptr, topk_w_ptr, D, I, stride_hp, stride_we, stride_wd,
                       K: tl.constexpr, BLOCK_K: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BN: tl.constexpr,
                       BK: tl.constexpr, USE_GDC: tl.constexpr):
    # Program (t, n): out[t, columns n] = sum over token t's K pairs of topk_weight * (h[pair] W_down^T) (+ residual):
    # _pair_down_kernel and the combine in one, with the same roundings and the same order of the sum. The K experts'
    # [BN, BK] weight tiles are loaded together, one [BLOCK_K, BN, BK] load a step. Before the wait: as
    # _pair_down_kernel.
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    col_ok = cols < D
    j = tl.arange(0, BLOCK_K)
    j_ok = j < K
    pair = t * K + j  # [BLOCK_K]
    e = tl.load(ids_ptr + pair, mask=j_ok, other=0).to(tl.int64)
    w_rows = w_ptr + e[:, None, None] * stride_we + cols[None, :, None] * stride_wd  # [BLOCK_K, BN, 1]
    row_ok = j_ok[:, None, None] & col_ok[None, :, None]
    h_rows = h_ptr + pair[:, None] * stride_hp  # [BLOCK_K, 1]
    acc = tl.zeros((BLOCK_K, BN), dtype=tl.float32)
    start = 0
    if USE_GDC:
        i = tl.arange(0, BK)
        w = tl.load(w_rows + i[None, None, :], mask=row_ok & (i < I)[None, None, :], other=0.0)
        wait_for_inputs(USE_GDC)
        a = tl.load(h_rows + i[None, :], mask=j_ok[:, None] & (i < I)[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w.to(tl.float32) * a[:, None, :], axis=2)
        start = BK
    for i0 in range(start, I, BK):
        i = i0 + tl.arange(0, BK)
        i_ok = i < I
        a = tl.load(h_rows + i[None, :], mask=j_ok[:, None] & i_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_K, BK]
        w = tl.load(w_rows + i[None, None, :], mask=row_ok & i_ok[None, None, :], other=0.0)  # [BLOCK_K, BN, BK]
        acc += tl.sum(w.to(tl.float32) * a[:, None, :], axis=2)
    dtype = out_ptr.dtype.element_ty
    weight = tl.load(topk_w_ptr + pair, mask=j_ok, other=0.0).to(tl.float32)
    y = cast(cast(acc, dtype).to(tl.float32) * weight[:, None], dtype).to(tl.float32)  # [BLOCK_K, BN]
    total = tl.zeros((BN,), dtype=tl.float32)
    for jj in tl.static_range(K):  # pair order, as _combine_kernel (a sum with zeros picks one row exactly)
        total += tl.sum(tl.where(j[:, None] == jj, y, 0.0), axis=0)
    if HAS_RESIDUAL:
        total = cast(total, dtype).to(tl.float32) + tl.load(r_ptr + t * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * D + cols, cast(total, dtype), mask=col_ok)


@triton.jit
def _combine_kernel(y_ptr, r_ptr, out_ptr, D, K: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr,
                    USE_GDC: tl.constexpr):
    # Program (t, d): out[t] = sum of token t's K expert rows of y, in float32 (+ residual[t]).
    wait_for_inputs(USE_GDC)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = cols < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j in tl.static_range(K):
        acc += tl.load(y_ptr + (t * K + j) * D + cols, mask=ok, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    if HAS_RESIDUAL:  # round the MoE output first, as the reference adds two tensors of x's dtype
        acc = cast(acc, dtype).to(tl.float32) + tl.load(r_ptr + t * D + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * D + cols, cast(acc, dtype), mask=ok)


def _tiles(N: int, E: int) -> dict:
    """The expert kernels' launch options: BM, BN, BK (rows, output columns and reduction depth of one program's tile;
    tl.dot needs 16 at least), and num_warps / num_stages where Triton's defaults are not kept. BM = 1 launches the
    pair kernels instead (no sort, no tl.dot); their `down` dict, when given, holds the down kernel's own options,
    and SUM_K=True in it has one program sum a token's k experts (_token_down_kernel: no combine).
    bench/gpu_kernels.py --sweep times other choices on a GPU."""
    if N <= 16 and not INTERPRETED:
        # A token or two (decode): the pair kernels, no sort. On the H200 every tile of the sorted kernels took
        # 83-94 µs for one token's 8 experts (75 MB: 0.9 TB/s), the time outside the products, in the ~20 small
        # kernels of moe_align; the pair kernels 34.2 µs with these options (2.2 TB/s; 512 deep: 45.9 µs), and with
        # 16-wide, 128-deep down tiles 32.7 (the fastest of 33 choices; the down kernel summing a token's 8 experts
        # itself, no combine: 33.3).
        return tuned("fused_moe", (N, E), dict(BM=1, BN=8, BK=256, num_warps=8, down=dict(BN=16, BK=128, num_warps=8)))
    return sorted_tiles(N, E)


def sorted_tiles(N: int, E: int) -> dict:
    """Launch options of the kernels over pairs sorted by expert (_gate_up_kernel, _down_kernel; quantized_moe's)."""
    if INTERPRETED:
        return dict(BM=16, BN=64, BK=128)  # the interpreter pays per program and per loop step: few, large tiles
    if N <= 4 * E:  # few rows per expert: small blocks pad less; deeper pipelining (H200,
        return dict(BM=16, BN=32, BK=64, num_stages=5)  # bench/gpu_kernels.py --sweep: 91.2 -> 83.5 µs at T = 1)
    return dict(BM=64, BN=64, BK=64)


def fused_moe_triton(x, w_gate_up, w_down, topk_ids, topk_weights, residual=None):
    """Launch wrapper: same arguments and result as fused_moe_ref."""
    (T, D), (E, I2, D2), k = x.shape, w_gate_up.shape, topk_ids.shape[1]
    I = I2 // 2
    if D2 != D or I2 != 2 * I or w_down.shape != (E, D, I):
        raise ValueError(f"fused_moe: x {tuple(x.shape)}, w_gate_up {tuple(w_gate_up.shape)} and w_down "
                         f"{tuple(w_down.shape)} do not fit [T, D], [E, 2I, D], [E, D, I]")
    if topk_ids.shape != (T, k) or topk_weights.shape != (T, k):
        raise ValueError(f"fused_moe: topk_ids {tuple(topk_ids.shape)} and topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [T={T}, k]")
    if not x.dtype == w_gate_up.dtype == w_down.dtype:
        raise ValueError(f"fused_moe: x, w_gate_up and w_down must share one dtype; got {x.dtype}, "
                         f"{w_gate_up.dtype}, {w_down.dtype}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"fused_moe: residual {tuple(residual.shape)} and x {tuple(x.shape)} differ")
    check_device(INTERPRETED, x, w_gate_up, w_down, topk_ids, topk_weights)
    out = torch.empty_like(x)
    N = T * k
    if N == 0:
        return out.zero_() if residual is None else out.copy_(residual)
    x, w_gate_up, w_down = x.contiguous(), w_gate_up.contiguous(), w_down.contiguous()
    tiles = _tiles(N, E)
    BM, BN = tiles["BM"], tiles["BN"]
    if BM == 1:  # one program per (token, expert) pair and column block: no sort
        return _pairs(x, w_gate_up, w_down, topk_ids, topk_weights, out, residual, tiles)
    pairs, block_expert = moe_align(topk_ids, E, BM)
    n_blocks = block_expert.numel()
    h = torch.empty(pairs.numel(), I, dtype=x.dtype, device=x.device)  # [P, I] activations, sorted rows
    _gate_up_kernel[(n_blocks, triton.cdiv(I, BN))](
        x, w_gate_up, h, pairs, block_expert, N, D, I, k,
        x.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), h.stride(0), **tiles, **pdl())
    y = torch.empty(N, D, dtype=x.dtype, device=x.device)  # [N, D] weighted expert outputs, pair order
    _down_kernel[(n_blocks, triton.cdiv(D, BN))](
        h, w_down, y, pairs, block_expert, topk_weights.contiguous().flatten(), N, D, I,
        h.stride(0), w_down.stride(0), w_down.stride(1), y.stride(0), **tiles, **pdl())
    return combine(y, out, k, residual)


def _pairs(x, w_gate_up, w_down, topk_ids, topk_weights, out, residual, tiles):
    """fused_moe_triton with BM = 1: the pair kernels, then the combine (or the down kernel summing each token's k)."""
    (T, D), I, k = x.shape, w_down.shape[2], topk_ids.shape[1]
    N = T * k
    options = {key: v for key, v in tiles.items() if key not in ("BM", "down")}
    down = dict(tiles.get("down", options))
    ids = topk_ids.contiguous().flatten()
    h = torch.empty(N, I, dtype=x.dtype, device=x.device)  # [N, I] activations, pair order
    _pair_gate_up_kernel[(N, triton.cdiv(I, options["BN"]))](
        x, w_gate_up, h, ids, D, I, k, x.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), h.stride(0), **options,
        **pdl())
    weights = topk_weights.contiguous().flatten()
    if down.pop("SUM_K", False):
        _token_down_kernel[(T, triton.cdiv(D, down["BN"]))](
            h, w_down, out, residual.contiguous() if residual is not None else out, ids, weights, D, I, h.stride(0),
            w_down.stride(0), w_down.stride(1), K=k, BLOCK_K=triton.next_power_of_2(k),
            HAS_RESIDUAL=residual is not None, **down, **pdl())
        return out
    y = torch.empty(N, D, dtype=x.dtype, device=x.device)  # [N, D] weighted expert outputs, pair order
    _pair_down_kernel[(N, triton.cdiv(D, down["BN"]))](
        h, w_down, y, ids, weights, D, I, h.stride(0), w_down.stride(0), w_down.stride(1), y.stride(0), **down, **pdl())
    return combine(y, out, k, residual)


def combine(y: torch.Tensor, out: torch.Tensor, k: int, residual: torch.Tensor | None = None) -> torch.Tensor:
    """y [T·k, D] weighted expert rows in pair order -> out [T, D]: each token's k rows summed in float32, rounded
    to out's dtype, plus residual when given (--mlp-kernel-fuse-residual-add). Shared with quantized_moe.py."""
    T, D = out.shape
    BLOCK_D = min(1024, triton.next_power_of_2(D))
    _combine_kernel[(T, triton.cdiv(D, BLOCK_D))](y, residual.contiguous() if residual is not None else y, out, D,
                                                  K=k, HAS_RESIDUAL=residual is not None, BLOCK_D=BLOCK_D, **pdl())
    return out


@torch.library.custom_op("moebench::fused_moe", mutates_args=())
def _fused_moe_op(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    return fused_moe_triton(x, w_gate_up, w_down, topk_ids, topk_weights, residual)


@_fused_moe_op.register_fake
def _(x, w_gate_up, w_down, topk_ids, topk_weights, residual=None):
    return torch.empty_like(x)


def fused_moe(x, w_gate_up, w_down, topk_ids, topk_weights, residual=None):
    """The kernel as a model calls it: the MoE block's expert output [T, D], plus residual when given
    (--mlp-kernel-fuse-residual-add)."""
    return torch.ops.moebench.fused_moe(x, w_gate_up, w_down, topk_ids, topk_weights, residual)


def fused_moe_macs(x, w_gate_up, w_down, topk_ids, *_) -> int:
    return x.shape[0] * topk_ids.shape[1] * 3 * x.shape[1] * w_down.shape[2]  # T·k·3·D·I: gate+up 2DI, down DI


register_kernel("moebench::fused_moe", fused_moe_macs, reference=fused_moe_ref, flag="mlp_kernel_enabled")
