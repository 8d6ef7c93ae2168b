"""Flash attention with a boolean mask and grouped-query heads: reference, Triton kernel, custom op, MAC formula."""

import torch
import torch.nn.functional as F

from moebench.kernels.interpret import check_device, ensure_interpreter_on_cpu
from moebench.kernels.registry import register_kernel

INTERPRETED = ensure_interpreter_on_cpu()  # before any @triton.jit is defined, here or in common

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from moebench.kernels.common import cast, device_function, dot  # noqa: E402

# Legend: B batch, H query heads, Hkv key/value heads (H = g·Hkv; query head h reads kv head h // g),
# T queries, S keys (cache slots), hd head size.

LOG2E = 1.4426950408889634


def attention_ref(q, k, v, mask, scale: float):
    """q [B, H, T, hd], k and v [B, Hkv, S, hd], bool mask [B, 1, T, S] (True = may attend) -> out [B, H, T, hd].

    Exactly the model's attention: scaled_dot_product_attention with grouped-query heads. A query row whose mask
    is all False has no defined result here (SDPA's backends disagree); the kernel returns zeros for it."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


@device_function
def online_softmax_block(q, kt, v, allowed, m_i, l_i, acc, qk_scale):
    """One block of keys in flash attention's online softmax: q [M, D], kt [D, N] (k transposed), v [N, D], allowed
    [M, N]; m_i, l_i [M] the running row maximum (log2 units) and sum of exp2(score - m_i), acc [M, D] float32.
    qk_scale = scale·log2(e), so exp2 does the exponent. Returns the updated (m_i, l_i, acc)."""
    s = dot(q, kt, tl.zeros((q.shape[0], kt.shape[1]), dtype=tl.float32)) * qk_scale
    s = tl.where(allowed, s, float("-inf"))  # [M, N]
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row with no allowed key so far has m_new = -inf: subtract 0 instead, so that exp2(-inf - 0) = 0
    # rather than exp2(-inf + inf) = NaN. Such a row keeps l_i = 0 and acc = 0.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)  # [M] rescales what came before; 0 when m_i = -inf
    p = tl.exp2(s - m_safe[:, None])  # [M, N], 0 on masked keys
    l_i = l_i * alpha + tl.sum(p, axis=1)
    # The probabilities meet v in v's dtype (as torch's CPU and GPU flash kernels do), accumulating in float32.
    acc = dot(cast(p, v.dtype), v, acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def _attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, T, S, GROUP, qk_scale,
                      sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                      smb, smh, smt, sms, sob, soh, sot, sod,
                      HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (query block, query head, batch): an online softmax over the keys, BLOCK_N at a time,
    # with float32 scores, statistics and accumulator. qk_scale = scale·log2(e), so exp2 does the exponent.
    t_blk = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    hk = h // GROUP  # this query head's key/value head

    rows = t_blk * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] query positions
    cols = tl.arange(0, BLOCK_N)  # [BLOCK_N] key offsets within a block
    d = tl.arange(0, BLOCK_D)
    row_ok, d_ok = rows < T, d < HD

    q = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sqt + d[None, :] * sqd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    k_base = k_ptr + b * skb + hk * skh
    v_base = v_ptr + b * svb + hk * svh
    m_base = mask_ptr + b * smb + h * smh + rows[:, None] * smt

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running row maximum (log2 units)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running row sum of exp2(score - m_i)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, S, BLOCK_N):
        n = n0 + cols
        n_ok = n < S
        kt = tl.load(k_base + n[None, :] * sks + d[:, None] * skd,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N], k transposed
        allowed = tl.load(m_base + n[None, :] * sms, mask=row_ok[:, None] & n_ok[None, :], other=0) != 0
        v = tl.load(v_base + n[:, None] * svs + d[None, :] * svd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        m_i, l_i, acc = online_softmax_block(q, kt, v, allowed, m_i, l_i, acc, qk_scale)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # fully masked rows: 0, not 0/0
    tl.store(out_ptr + b * sob + h * soh + rows[:, None] * sot + d[None, :] * sod,
             cast(out, out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _check(q, k, v, mask):
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"attention: expected q [B, H, T, hd] and k, v [B, Hkv, S, hd]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    (B, H, T, hd), (Bk, Hkv, S, hdk) = q.shape, k.shape
    if Bk != B or hdk != hd or Hkv == 0 or H % Hkv:
        raise ValueError(f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} need the same B and hd, "
                         "and H a multiple of Hkv")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if mask.dtype != torch.bool:
        raise ValueError(f"attention: mask must be bool (True = may attend), got {mask.dtype}")
    try:
        torch.broadcast_shapes(mask.shape, (B, H, T, S))
    except RuntimeError:
        raise ValueError(f"attention: mask {tuple(mask.shape)} does not broadcast to {(B, H, T, S)}") from None
    return B, H, T, S, hd, Hkv


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                     block_m: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """Launch wrapper: same arguments and result as attention_ref (any strides; the mask may broadcast, e.g.
    [B, 1, T, S]); a query row whose mask is all False comes out as zeros. block_m/block_n override the tiles."""
    B, H, T, S, hd, Hkv = _check(q, k, v, mask)
    check_device(INTERPRETED, q, k, v, mask)
    out = torch.empty(B, H, T, hd, dtype=q.dtype, device=q.device)
    if not out.numel():
        return out
    m = mask.expand(B, H, T, S).view(torch.uint8)  # stride 0 over broadcast dims: no copy
    # tl.dot's smallest tile is 16 rows: decode (T = 1) wastes the other 15; context encoding on a GPU takes 64.
    BLOCK_M = block_m or (16 if INTERPRETED or T <= 16 else 64)
    BLOCK_N = block_n or 64
    BLOCK_D = max(16, triton.next_power_of_2(hd))
    grid = (triton.cdiv(T, BLOCK_M), H, B)
    _attention_kernel[grid](q, k, v, m, out, T, S, H // Hkv, scale * LOG2E,
                            *q.stride(), *k.stride(), *v.stride(), *m.stride(), *out.stride(),
                            HD=hd, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    return out


# The op that models call, visible as a node in exported and compiled graphs.
@torch.library.custom_op("moebench::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                  scale: float) -> torch.Tensor:
    return attention_triton(q, k, v, mask, scale)


@_attention_op.register_fake
def _(q, k, v, mask, scale):
    return q.new_empty(q.shape)  # contiguous [B, H, T, hd] in q's dtype


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """The kernel as a model calls it, in place of
    F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)."""
    return torch.ops.moebench.attention(q, k, v, mask, scale)


def attention_macs(q, k, *_) -> int:
    B, H, T, hd = q.shape
    return 2 * B * H * T * k.shape[-2] * hd  # B·H·T·S·hd for the scores plus the same for the context, as for SDPA


register_kernel("moebench::attention", attention_macs, reference=attention_ref, flag="attn_kernel_enabled")
