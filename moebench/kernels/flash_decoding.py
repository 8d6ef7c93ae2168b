"""Split-K flash decoding (few queries, a long KV cache) with a boolean mask and grouped-query heads: reference,
Triton kernels, custom op, MAC formula."""

import functools

import torch

from moebench.kernels.interpret import check_device, ensure_interpreter_on_cpu
from moebench.kernels.registry import register_kernel

INTERPRETED = ensure_interpreter_on_cpu()  # before any @triton.jit is defined, here or in common

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from moebench.kernels.attention import LOG2E, _check, attention_ref, online_softmax_block  # noqa: E402
from moebench.kernels.common import cast, pdl, wait_for_inputs  # noqa: E402

# Legend: B batch, H query heads, Hkv key/value heads (H = g·Hkv; query head h reads kv head h // g),
# T queries, S keys (cache slots), hd head size, M = g·T the query rows that share one kv head.

# The spec is the model's attention, as for the flash-attention kernel: SDPA with grouped-query heads.
flash_decode_ref = attention_ref


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, acc_ptr, max_ptr, sum_ptr, T, S, GROUP, SPLIT, M_BLOCKS, qk_scale,
                  sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                  smb, smh, smt, sms, sab, sah, sat, sas, sad, ssb, ssh, sst, sss,
                  HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  USE_GDC: tl.constexpr):
    # Stage 1. One program per (split, kv head × row block, batch): the rows of its tile are the g query heads
    # of one kv head times the T queries (row r = j·T + t is query t of head hk·g + j), so each key block is
    # loaded once for the whole group, and decode (T = 1) fills g rows of the tile rather than 1. It runs an
    # online softmax over its chunk of SPLIT keys, BLOCK_N at a time, and leaves the unnormalised accumulator,
    # the row maximum and the row sum (log2 units, float32) for the combine.
    wait_for_inputs(USE_GDC)
    split = tl.program_id(0)
    hk = (tl.program_id(1) // M_BLOCKS).to(tl.int64)
    m_blk = tl.program_id(1) % M_BLOCKS
    b = tl.program_id(2).to(tl.int64)

    r = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] rows of the group
    h = hk * GROUP + r // T  # [BLOCK_M] query head of each row
    t = r % T  # [BLOCK_M] query position of each row
    cols = tl.arange(0, BLOCK_N)  # [BLOCK_N] key offsets within a block
    d = tl.arange(0, BLOCK_D)
    row_ok, d_ok = r < GROUP * T, d < HD

    q = tl.load(q_ptr + b * sqb + h[:, None] * sqh + t[:, None] * sqt + d[None, :] * sqd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    k_base = k_ptr + b * skb + hk * skh
    v_base = v_ptr + b * svb + hk * svh
    m_base = mask_ptr + b * smb + h[:, None] * smh + t[:, None] * smt
    start = split * SPLIT
    end = tl.minimum(start + SPLIT, S)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running row maximum (log2 units)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running row sum of exp2(score - m_i)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + cols
        n_ok = n < end
        kt = tl.load(k_base + n[None, :] * sks + d[:, None] * skd,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N], k transposed
        allowed = tl.load(m_base + n[None, :] * sms, mask=row_ok[:, None] & n_ok[None, :], other=0) != 0
        v = tl.load(v_base + n[:, None] * svs + d[None, :] * svd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        m_i, l_i, acc = online_softmax_block(q, kt, v, allowed, m_i, l_i, acc, qk_scale)

    row = b * ssb + h * ssh + t * sst + split * sss  # [BLOCK_M] this split's slot of each row
    tl.store(max_ptr + row, m_i, mask=row_ok)  # -inf where the chunk has no allowed key for the row
    tl.store(sum_ptr + row, l_i, mask=row_ok)
    tl.store(acc_ptr + b * sab + h[:, None] * sah + t[:, None] * sat + split * sas + d[None, :] * sad, acc,
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _combine_kernel(acc_ptr, max_ptr, sum_ptr, out_ptr, R, SPLITS, sar, sas, sad, ssr, sss, sor, sod,
                    HD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                    USE_GDC: tl.constexpr):
    # Stage 2. One program per BLOCK_R rows of the R = B·H·T rows (the partials and out are contiguous over
    # [B, H, T], so a row is one stride): the splits BLOCK_S at a time, each rescaled by exp2(its max - the max
    # so far) as the online softmax rescales key blocks; then out = acc / sum.
    wait_for_inputs(USE_GDC)
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # [BLOCK_R]
    c = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    r_ok, d_ok = r < R, d < HD

    m_i = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)  # the largest split maximum so far
    l_i = tl.zeros((BLOCK_R,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for c0 in range(0, SPLITS, BLOCK_S):
        split = c0 + c
        ok = r_ok[:, None] & (split < SPLITS)[None, :]  # [BLOCK_R, BLOCK_S]
        m_s = tl.load(max_ptr + r[:, None] * ssr + split[None, :] * sss, mask=ok, other=float("-inf"))
        l_s = tl.load(sum_ptr + r[:, None] * ssr + split[None, :] * sss, mask=ok, other=0.0)
        a_s = tl.load(acc_ptr + r[:, None, None] * sar + split[None, :, None] * sas + d[None, None, :] * sad,
                      mask=ok[:, :, None] & d_ok[None, None, :], other=0.0)  # [BLOCK_R, BLOCK_S, BLOCK_D]
        m_new = tl.maximum(m_i, tl.max(m_s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no allowed key yet: weights 0, not NaN
        alpha = tl.exp2(m_i - m_safe)  # [BLOCK_R] rescales the splits before
        w = tl.exp2(m_s - m_safe[:, None])  # [BLOCK_R, BLOCK_S], 0 for a split with no allowed key
        l_i = l_i * alpha + tl.sum(w * l_s, axis=1)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * a_s, axis=1)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a row with no allowed key anywhere: 0, not 0/0
    tl.store(out_ptr + r[:, None] * sor + d[None, :] * sod, cast(out, out_ptr.dtype.element_ty),
             mask=r_ok[:, None] & d_ok[None, :])


@functools.lru_cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_size(S: int, programs: int, block_n: int, device: torch.device) -> int:
    """Keys per split: on a GPU, enough splits that programs × splits fills every SM about twice, each split at
    least 64 keys and a multiple of the key block; interpreted, 128-key splits (few programs: the interpreter pays
    per program)."""
    if INTERPRETED:
        return 128
    splits = max(1, min(triton.cdiv(2 * _sm_count(device), programs), triton.cdiv(S, 64)))
    return triton.cdiv(triton.cdiv(S, splits), block_n) * block_n


def flash_decode_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                        split_size: int | None = None, block_m: int | None = None,
                        block_n: int | None = None) -> torch.Tensor:
    """Launch wrapper: same arguments and result as flash_decode_ref (any strides; the mask may broadcast, e.g.
    [B, 1, T, S]); a query row whose mask is all False comes out as zeros. split_size (keys per split), block_m
    (rows of a tile, out of M = g·T) and block_n (keys of a block) override the defaults."""
    B, H, T, S, hd, Hkv = _check(q, k, v, mask)
    check_device(INTERPRETED, q, k, v, mask)
    if split_size is not None and split_size < 1:
        raise ValueError(f"flash_decode: split_size must be at least 1 key, got {split_size}")
    out = torch.empty(B, H, T, hd, dtype=q.dtype, device=q.device)
    if not out.numel() or S == 0:
        return out.zero_()  # no key at all: every row is fully masked
    m = mask.expand(B, H, T, S).view(torch.uint8)  # stride 0 over broadcast dims: no copy
    M = (H // Hkv) * T  # rows per kv head
    # tl.dot's smallest tile is 16 rows; the g heads of a group share the tile, so decode wastes far fewer.
    BLOCK_M = block_m or min(max(16, triton.next_power_of_2(M)), 64)
    M_BLOCKS = triton.cdiv(M, BLOCK_M)
    BLOCK_N = block_n or 64
    SPLIT = split_size or _split_size(S, B * Hkv * M_BLOCKS, BLOCK_N, q.device)
    BLOCK_N = min(BLOCK_N, max(16, triton.next_power_of_2(SPLIT)))  # no wider than a split needs
    splits = triton.cdiv(S, SPLIT)
    BLOCK_D = max(16, triton.next_power_of_2(hd))

    acc = torch.empty(B, H, T, splits, hd, dtype=torch.float32, device=q.device)  # unnormalised, per split
    row_max = torch.empty(B, H, T, splits, dtype=torch.float32, device=q.device)  # log2 units
    row_sum = torch.empty_like(row_max)
    _split_kernel[(splits, Hkv * M_BLOCKS, B)](
        q, k, v, m, acc, row_max, row_sum, T, S, H // Hkv, SPLIT, M_BLOCKS, scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *m.stride(), *acc.stride(), *row_max.stride(),
        HD=hd, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, **pdl())
    R = B * H * T
    # Decode has few rows: on a GPU one program each, all its splits in one tile; interpreted, fewer programs.
    BLOCK_R = 16 if INTERPRETED else 1
    BLOCK_S = min(triton.next_power_of_2(splits), 16 if INTERPRETED else 64)
    _combine_kernel[(triton.cdiv(R, BLOCK_R),)](acc, row_max, row_sum, out, R, splits, acc.stride(2),
                                                *acc.stride()[3:], row_max.stride(2), row_max.stride(3),
                                                out.stride(2), out.stride(3),
                                                HD=hd, BLOCK_R=BLOCK_R, BLOCK_S=BLOCK_S, BLOCK_D=BLOCK_D, **pdl())
    return out


# The op that models call, visible as a node in exported and compiled graphs.
@torch.library.custom_op("moebench::flash_decode", mutates_args=())
def _flash_decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> torch.Tensor:
    return flash_decode_triton(q, k, v, mask, scale)


@_flash_decode_op.register_fake
def _(q, k, v, mask, scale):
    return q.new_empty(q.shape)  # contiguous [B, H, T, hd] in q's dtype


def flash_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """The kernel as a model calls it at a decode step, in place of
    F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)."""
    return torch.ops.moebench.flash_decode(q, k, v, mask, scale)


def flash_decode_macs(q, k, *_) -> int:
    B, H, T, hd = q.shape
    return 2 * B * H * T * k.shape[-2] * hd  # B·H·T·S·hd for the scores plus the same for the context, as for SDPA


register_kernel("moebench::flash_decode", flash_decode_macs, reference=flash_decode_ref,
                flag="flash_decoding_enabled")
