"""The MoE router fused in one kernel: logits matmul, float32 softmax, top-k, renormalisation (for a few tokens,
the logits first summed by many programs over slices of the hidden size)."""

import torch
import torch.nn.functional as F

from moebench.kernels.interpret import check_device, ensure_interpreter_on_cpu
from moebench.kernels.registry import register_kernel
from moebench.kernels.tuning import tuned

INTERPRETED = ensure_interpreter_on_cpu()  # before any @triton.jit is defined, here or in common

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from moebench.kernels.common import cast, dot, pdl, wait_for_inputs  # noqa: E402

# Legend: T tokens, D hidden size, E experts, k experts per token.
MAX_EXPERTS, MAX_K = 256, 16  # one program holds a whole [BLOCK_T, E] row block of logits


def moe_router_ref(x, w_gate, k: int, norm_topk_prob: bool):
    """x [T, D], w_gate [E, D] -> (topk_ids int64 [T, k], topk_weights [T, k] in x's dtype).

    As transformers: logits in x's dtype, softmax in float32 over all E experts, the k largest probabilities,
    renormalised to sum 1 when norm_topk_prob, then cast back to x's dtype."""
    probs = torch.softmax(F.linear(x, w_gate), dim=-1, dtype=torch.float32)  # [T, E]
    weights, ids = torch.topk(probs, k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights.to(x.dtype)


@triton.jit
def _router_partial_kernel(x_ptr, w_ptr, part_ptr, D, E, stride_xt, stride_we,
                           BLOCK_E: tl.constexpr, SPLIT_D: tl.constexpr, USE_GDC: tl.constexpr):
    # Program (t, s): token t's float32 logits over the s-th SPLIT_D columns of D, into part[t, s, :]. For a few
    # tokens (decode) the logits' weights are read by many programs, not by one; with programmatic dependent launch,
    # before the wait for x (common.py).
    t = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    experts = tl.arange(0, BLOCK_E)
    d = s * SPLIT_D + tl.arange(0, SPLIT_D)
    d_ok = d < D
    w = tl.load(w_ptr + experts[:, None] * stride_we + d[None, :], mask=(experts < E)[:, None] & d_ok[None, :],
                other=0.0).to(tl.float32)  # [BLOCK_E, SPLIT_D]
    wait_for_inputs(USE_GDC)
    x = tl.load(x_ptr + t * stride_xt + d, mask=d_ok, other=0.0).to(tl.float32)  # [SPLIT_D]
    tl.store(part_ptr + (t * tl.num_programs(1) + s) * BLOCK_E + experts, tl.sum(w * x[None, :], axis=1))


@triton.jit
def _router_kernel(x_ptr, w_ptr, part_ptr, ids_ptr, weights_ptr, T, D, E, stride_xt, stride_we,
                   K: tl.constexpr, NORM: tl.constexpr, SPLITS: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, USE_GDC: tl.constexpr):
    # One program per BLOCK_T tokens, holding all E logits of each: computed here, or with SPLITS the sum, in a fixed
    # order, of the SPLITS partial logits _router_partial_kernel wrote.
    wait_for_inputs(USE_GDC)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    experts = tl.arange(0, BLOCK_E)  # [BLOCK_E]
    row_ok, expert_ok = rows < T, experts < E

    logits = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    if SPLITS:
        for s in tl.static_range(SPLITS):
            logits += tl.load(part_ptr + (rows[:, None].to(tl.int64) * SPLITS + s) * BLOCK_E + experts[None, :],
                              mask=row_ok[:, None], other=0.0)
    else:
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(x_ptr + rows[:, None] * stride_xt + d[None, :],
                        mask=row_ok[:, None] & (d[None, :] < D), other=0.0)  # [BLOCK_T, BLOCK_D]
            w = tl.load(w_ptr + experts[None, :] * stride_we + d[:, None],
                        mask=expert_ok[None, :] & (d[:, None] < D), other=0.0)  # [BLOCK_D, BLOCK_E], w_gate^T
            logits = dot(x, w, logits)
    # The reference's logits are a matmul in x's dtype: round them the same way before the softmax.
    logits = cast(logits, x_ptr.dtype.element_ty).to(tl.float32)
    logits = tl.where(expert_ok[None, :], logits, float("-inf"))

    p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]  # [BLOCK_T, BLOCK_E] float32 probabilities, 0 on padded experts

    # Top-k by k rounds of arg-max; rank[t, e] = j when expert e is token t's j-th choice, K when not chosen.
    rank = tl.full((BLOCK_T, BLOCK_E), K, dtype=tl.int32)
    left = tl.where(expert_ok[None, :], p, -1.0)  # padded experts are never chosen
    total = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for j in tl.static_range(K):
        best = tl.max(left, axis=1)  # [BLOCK_T]
        # On a tie, the lowest expert index wins.
        pick = tl.min(tl.where(left == best[:, None], experts[None, :], BLOCK_E), axis=1)  # [BLOCK_T]
        chosen = experts[None, :] == pick[:, None]
        rank = tl.where(chosen, j, rank)
        left = tl.where(chosen, -1.0, left)
        total += best
    if not NORM:
        total = tl.full((BLOCK_T,), 1.0, dtype=tl.float32)
    for j in tl.static_range(K):
        chosen = rank == j
        expert = tl.sum(tl.where(chosen, experts[None, :], 0), axis=1)  # [BLOCK_T]
        weight = tl.sum(tl.where(chosen, p, 0.0), axis=1) / total
        tl.store(ids_ptr + rows * K + j, expert.to(tl.int64), mask=row_ok)
        tl.store(weights_ptr + rows * K + j, cast(weight, weights_ptr.dtype.element_ty), mask=row_ok)


def moe_router_triton(x: torch.Tensor, w_gate: torch.Tensor, k: int, norm_topk_prob: bool):
    """Launch wrapper: same arguments and results as moe_router_ref."""
    (T, D), E = x.shape, w_gate.shape[0]
    if w_gate.shape != (E, D):
        raise ValueError(f"moe_router: w_gate has shape {tuple(w_gate.shape)}, expected (E, {D})")
    if not 1 <= k <= min(E, MAX_K) or E > MAX_EXPERTS:
        raise ValueError(f"moe_router: needs 1 <= k <= min(E, {MAX_K}) and E <= {MAX_EXPERTS}; got k={k}, E={E}")
    if x.dtype != w_gate.dtype:
        raise ValueError(f"moe_router: x is {x.dtype} but w_gate is {w_gate.dtype}; they must match")
    check_device(INTERPRETED, x, w_gate)
    early = pdl(early_reads=w_gate.is_contiguous())  # a copy just made is no weight to read before the wait
    x, w_gate = x.contiguous(), w_gate.contiguous()
    ids = torch.empty(T, k, dtype=torch.int64, device=x.device)
    weights = torch.empty(T, k, dtype=x.dtype, device=x.device)
    BLOCK_E = max(16, triton.next_power_of_2(E))
    BLOCK_D = max(16, min(128, triton.next_power_of_2(D)))
    tiles = _tiles(T, D)
    split_d = tiles["SPLIT_D"]
    splits = triton.cdiv(D, split_d) if split_d else 0
    # Tokens a program: 16 for tl.dot's smallest tile; the sum of partial logits needs no tl.dot (fewer rows).
    BLOCK_T = tiles.get("BLOCK_T", 16) if splits else 16
    options = {"num_warps": tiles["num_warps"]} if "num_warps" in tiles else {}
    part = torch.empty(T, splits, BLOCK_E, dtype=torch.float32, device=x.device) if splits else ids
    if T and splits:
        _router_partial_kernel[(T, splits)](x, w_gate, part, D, E, x.stride(0), w_gate.stride(0), BLOCK_E=BLOCK_E,
                                            SPLIT_D=split_d, **early)
    if T:
        _router_kernel[(triton.cdiv(T, BLOCK_T),)](x, w_gate, part, ids, weights, T, D, E, x.stride(0),
                                                   w_gate.stride(0), K=k, NORM=norm_topk_prob, SPLITS=splits,
                                                   BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E, BLOCK_D=BLOCK_D, **options,
                                                   **pdl())
    return ids, weights


def _tiles(T: int, D: int) -> dict:
    """SPLIT_D: 0, one program per 16 tokens computes their logits (prompts); else the logits are first summed in
    slices of SPLIT_D columns of D by T x D / SPLIT_D programs (decode: one program alone would read all of w_gate,
    E x D, at the speed one GPU multiprocessor reads; 16.7 µs for Qwen3-30B-A3B's 0.5 MB on an H200; in slices of
    32 columns 12.0 µs, of 64 13.8), then _router_kernel adds them, BLOCK_T tokens a program, with num_warps warps.
    bench/gpu_kernels.py --sweep times other choices on a GPU."""
    if T > 16 or INTERPRETED:
        return dict(SPLIT_D=0)
    # The top-k program took 14.6 µs of a decode layer's ~72 on the H200 (torch.profiler, bench/gpu_decode.py) with
    # 16 rows (15 of them masked) and 4 warps: ~40 reductions over [16, E], each through shared memory and barriers.
    # One warp on one token's row reduces by shuffles alone. Not yet timed on a GPU.
    bt = triton.next_power_of_2(T)
    return tuned("router", (T, D), dict(SPLIT_D=32, BLOCK_T=bt, num_warps=1 if bt <= 2 else 4))


@torch.library.custom_op("moebench::moe_router", mutates_args=())
def _moe_router_op(x: torch.Tensor, w_gate: torch.Tensor, k: int,
                   norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return moe_router_triton(x, w_gate, k, norm_topk_prob)


@_moe_router_op.register_fake
def _(x, w_gate, k, norm_topk_prob):
    T = x.shape[0]
    return x.new_empty(T, k, dtype=torch.int64), x.new_empty(T, k)


def moe_router(x: torch.Tensor, w_gate: torch.Tensor, k: int, norm_topk_prob: bool):
    """The kernel as a model calls it: (topk_ids [T, k], topk_weights [T, k]). With MOEBENCH_PDL=1, w_gate must not
    be written by the kernel launched just before (moebench/kernels/common.py)."""
    return torch.ops.moebench.moe_router(x, w_gate, k, norm_topk_prob)


def moe_router_macs(x, w_gate, *_) -> int:
    return x.shape[0] * x.shape[1] * w_gate.shape[0]  # T·D·E: the logits matmul; softmax and top-k count zero


register_kernel("moebench::moe_router", moe_router_macs, reference=moe_router_ref)
