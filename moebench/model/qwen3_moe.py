"""The reference Qwen3-MoE model: nn.Modules only. `Qwen3MoeForCausalLM.forward` returns the logits."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moebench.model.config import Qwen3MoeConfig
from moebench.model.moe import experts_forward, route
from moebench.model.rope import apply_rope, rope_cos_sin, rope_frequencies

# Legend: B batch, T input columns, S cache slots in use, D hidden, H/Hkv query/key-value heads, hd head dim.


@dataclass(frozen=True)
class ModelOptions:
    """How the harness builds a model; a contestant's class receives the same object."""

    fused_qkv: bool = False  # one qkv_proj matmul instead of three (--fused-qkv)
    kernels: frozenset = frozenset()  # building blocks switched to moebench's Triton kernels: KERNEL_BLOCKS


# Building blocks that can run as registered Triton kernels (--enable-nki: all; --mlp-kernel-enabled: the MoE).
KERNEL_BLOCKS = ("rms_norm", "attention", "moe_router", "fused_moe")


@dataclass
class StepInputs:
    """What one forward call needs besides the token ids: explicit state, no globals."""

    positions: torch.Tensor  # [B, T] rope position of each input token
    slots: torch.Tensor  # [T] KV-cache slot each input column is written to (same for every row)
    mask: torch.Tensor  # [B, 1, T, S] bool: True where a query may attend to a cache slot
    last: torch.Tensor | None = None  # [B] column whose logits are returned; None: every column


class KVCache(nn.Module):
    """Static KV cache: k and v [L, B, Hkv, max_len, hd], written at StepInputs.slots."""

    def __init__(self, cfg: Qwen3MoeConfig, batch: int, max_len: int, dtype, device):
        super().__init__()
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.dim_head)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, opts: ModelOptions = ModelOptions()):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernel = None
        if "rms_norm" in opts.kernels:
            from moebench.kernels.rmsnorm import rms_norm  # imports Triton only when asked for

            self.kernel = rms_norm

    def forward(self, x):
        if self.kernel is not None:
            return self.kernel(x, self.weight, self.eps)
        # float32 statistics, result cast back before the weight, exactly as transformers.
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: Qwen3MoeConfig, layer: int, opts: ModelOptions):
        super().__init__()
        self.layer, self.fused = layer, opts.fused_qkv
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim_head
        self.sizes = [cfg.q_size, cfg.kv_size, cfg.kv_size]
        if self.fused:
            self.qkv_proj = nn.Linear(cfg.hidden_size, sum(self.sizes), bias=cfg.attention_bias)
        else:
            self.q_proj = nn.Linear(cfg.hidden_size, cfg.q_size, bias=cfg.attention_bias)
            self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=cfg.attention_bias)
            self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps, opts)  # per head, before RoPE
        self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps, opts)
        self.kernel = None
        if "attention" in opts.kernels:
            from moebench.kernels.attention import attention

            self.kernel = attention

    def forward(self, x, cos, sin, step: StepInputs, cache: KVCache):
        B, T, _ = x.shape
        if self.fused:
            q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = self.q_norm(q.view(B, T, self.n_heads, self.hd)).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_norm(k.view(B, T, self.n_kv, self.hd)).transpose(1, 2)  # [B, Hkv, T, hd]
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.k[self.layer].index_copy_(2, step.slots, k)
        cache.v[self.layer].index_copy_(2, step.slots, v)
        S = step.mask.shape[-1]
        keys, values = cache.k[self.layer, :, :, :S], cache.v[self.layer, :, :, :S]  # [B, Hkv, S, hd]
        if self.kernel is not None:
            o = self.kernel(q, keys, values, step.mask, self.hd**-0.5)
        else:
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=step.mask, scale=self.hd**-0.5,
                                               enable_gqa=self.n_heads != self.n_kv)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class DenseMLP(nn.Module):
    """SwiGLU MLP of the layers listed in mlp_only_layers or off the decoder_sparse_step grid."""

    def __init__(self, cfg: Qwen3MoeConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)  # gate rows first
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Experts(nn.Module):
    def __init__(self, cfg: Qwen3MoeConfig):
        super().__init__()
        E, D, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))  # gate rows first, then up
        self.down_proj = nn.Parameter(torch.empty(E, D, I))


class SparseMoE(nn.Module):
    def __init__(self, cfg: Qwen3MoeConfig, opts: ModelOptions = ModelOptions()):
        super().__init__()
        self.k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router
        self.experts = Experts(cfg)
        self.router_kernel, self.experts_fn = None, experts_forward
        if "moe_router" in opts.kernels:
            from moebench.kernels.router import moe_router

            self.router_kernel = moe_router
        if "fused_moe" in opts.kernels:
            from moebench.kernels.fused_moe import fused_moe

            self.experts_fn = fused_moe

    def forward(self, x):
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        if self.router_kernel is not None:
            ids, weights = self.router_kernel(flat, self.gate.weight, self.k, self.norm_topk_prob)
        else:
            ids, weights = route(self.gate(flat), self.k, self.norm_topk_prob)
        out = self.experts_fn(flat, self.experts.gate_up_proj, self.experts.down_proj, ids, weights)
        return out.view(B, T, D)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3MoeConfig, layer: int, opts: ModelOptions):
        super().__init__()
        self.self_attn = Attention(cfg, layer, opts)
        self.mlp = SparseMoE(cfg, opts) if cfg.is_moe_layer(layer) else DenseMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, opts)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, opts)

    def forward(self, x, cos, sin, step, cache):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, step, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen3MoeModel(nn.Module):
    def __init__(self, cfg: Qwen3MoeConfig, opts: ModelOptions):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, opts) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, opts)


class Qwen3MoeForCausalLM(nn.Module):
    """forward(input_ids [B, T], step, cache) -> float32 logits [B, T or 1, vocab]."""

    def __init__(self, config: Qwen3MoeConfig, options: ModelOptions = ModelOptions()):
        super().__init__()
        self.config, self.options = config, options
        self.model = Qwen3MoeModel(config, options)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        # A plain float32 attribute, not a buffer: casting the model to bfloat16 must not round it.
        self.inv_freq, self.rope_scale = rope_frequencies(config)

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, step: StepInputs, cache: KVCache) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)  # [B, T, D]
        if self.inv_freq.device != x.device:
            self.inv_freq = self.inv_freq.to(x.device)
        cos, sin = rope_cos_sin(self.inv_freq, self.rope_scale, step.positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, step, cache)
        if step.last is not None:
            x = x[torch.arange(x.shape[0], device=x.device), step.last][:, None]  # [B, 1, D]
        return self.lm_head(self.model.norm(x)).float()
