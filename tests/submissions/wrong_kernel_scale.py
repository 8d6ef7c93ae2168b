"""A deliberately wrong kernel: Triton decode attention whose softmax takes exp2 of the scaled scores but forgets
the log2(e) factor, so every attention distribution is flatter than it should be (a wrong scale). Context
encoding uses the reference; each decode step uses the kernel. It must fail validation."""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from moebench.kernels.registry import register_kernel
from moebench.model.qwen3_moe import Attention, Qwen3MoeForCausalLM as Reference
from moebench.model.rope import apply_rope


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, m_ptr, out_ptr, S, GROUP, scale,
                             sqh, skh, sks, svh, svs, HD: tl.constexpr, BLOCK_S: tl.constexpr):
    h = tl.program_id(0)  # one query head of batch row 0, one query
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, HD)
    s_ok = s < S
    q = tl.load(q_ptr + h * sqh + d).to(tl.float32)
    k = tl.load(k_ptr + (h // GROUP) * skh + s[:, None] * sks + d[None, :], mask=s_ok[:, None], other=0.0)
    allowed = tl.load(m_ptr + s, mask=s_ok, other=0) != 0
    scores = tl.where(allowed, tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scale, float("-inf"))
    p = tl.exp2(scores - tl.max(scores, axis=0))  # BUG: exp2 needs the scores times log2(e)
    p = p / tl.sum(p, axis=0)
    v = tl.load(v_ptr + (h // GROUP) * svh + s[:, None] * svs + d[None, :], mask=s_ok[:, None], other=0.0)
    tl.store(out_ptr + h * HD + d, tl.sum(v.to(tl.float32) * p[:, None], axis=0))


@torch.library.custom_op("wrong_scale::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """q [1, H, 1, hd], k/v [1, Hkv, S, hd], mask [1, 1, 1, S] -> [1, H, 1, hd] (batch 1, one query)."""
    (_, H, _, hd), (_, Hkv, S, _) = q.shape, k.shape
    out = torch.empty(H, hd, dtype=torch.float32, device=q.device)
    m = mask.reshape(S).contiguous().view(torch.uint8)
    _decode_attention_kernel[(H,)](q, k, v, m, out, S, H // Hkv, scale, q.stride(1), k.stride(1), k.stride(2),
                                   v.stride(1), v.stride(2), HD=hd, BLOCK_S=triton.next_power_of_2(S))
    return out.to(q.dtype).view(1, H, 1, hd)


@decode_attention.register_fake
def _(q, k, v, mask, scale):
    return q.new_empty(q.shape)


register_kernel("wrong_scale::decode_attention", macs=lambda q, k, *_: 2 * q.shape[1] * k.shape[2] * q.shape[3])


class KernelDecodeAttention(Attention):
    def forward(self, x, cos, sin, step, cache):
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = self.q_norm(q.view(B, T, self.n_heads, self.hd)).transpose(1, 2)
        k = self.k_norm(k.view(B, T, self.n_kv, self.hd)).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.k[self.layer].index_copy_(2, step.slots, k)
        cache.v[self.layer].index_copy_(2, step.slots, v)
        S = step.mask.shape[-1]
        keys, values = cache.k[self.layer, :, :, :S], cache.v[self.layer, :, :, :S]
        if B == 1 and T == 1:
            o = decode_attention(q, keys, values, step.mask, self.hd**-0.5)
        else:
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=step.mask, scale=self.hd**-0.5,
                                               enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class Qwen3MoeForCausalLM(Reference):
    def __init__(self, config, options):
        super().__init__(config, options)
        for layer in self.model.layers:
            layer.self_attn.__class__ = KernelDecodeAttention
