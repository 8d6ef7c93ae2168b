"""An honest submission with other numerics: each token's experts summed one by one in float32, attention written out by
hand with a float32 softmax. It must pass validation."""

import torch
import torch.nn.functional as F

from moebench.model.moe import route
from moebench.model.qwen3_moe import Attention, Qwen3MoeForCausalLM as Reference, SparseMoE
from moebench.model.rope import apply_rope


class GatheredMoE(SparseMoE):
    def forward(self, x):
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        ids, weights = route(self.gate(flat), self.k, self.norm_topk_prob)
        out = torch.zeros(flat.shape, dtype=torch.float32)
        for j in range(self.k):  # every token's j-th expert, its weights gathered per token: [T, 2I, D], [T, D, I]
            gate, up = torch.bmm(self.experts.gate_up_proj[ids[:, j]], flat[:, :, None])[..., 0].chunk(2, dim=-1)
            y = torch.bmm(self.experts.down_proj[ids[:, j]], (F.silu(gate) * up)[:, :, None])[..., 0]
            out += y.float() * weights[:, j, None].float()
        return out.to(x.dtype).view(B, T, D)


class ManualAttention(Attention):
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
        keys = cache.k[self.layer, :, :, :S].repeat_interleave(self.n_heads // self.n_kv, dim=1)
        values = cache.v[self.layer, :, :, :S].repeat_interleave(self.n_heads // self.n_kv, dim=1)
        scores = (q.float() @ keys.float().transpose(-1, -2)) * self.hd ** -0.5
        probs = scores.masked_fill(~step.mask, float("-inf")).softmax(-1)
        o = (probs @ values.float()).to(x.dtype)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class Qwen3MoeForCausalLM(Reference):
    def __init__(self, config, options):
        super().__init__(config, options)
        for layer in self.model.layers:
            layer.self_attn.__class__ = ManualAttention
            if isinstance(layer.mlp, SparseMoE):
                layer.mlp.__class__ = GatheredMoE
