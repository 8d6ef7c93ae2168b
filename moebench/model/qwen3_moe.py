"""The reference Qwen3-MoE model: nn.Modules only. `Qwen3MoeForCausalLM.forward` returns the logits."""

import importlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moebench.model import cpu_ops
from moebench.model.config import Qwen3MoeConfig
from moebench.model.moe import (experts_forward, in_compiled_cpu_graph, in_float32, linear, prompt_experts_dtype,
                                route_tokens)
from moebench.model.rope import apply_rope, rope_cos_sin, rope_frequencies

# Legend: B batch, T input columns, S cache slots in use, D hidden, H/Hkv query/key-value heads, hd head dim.


@dataclass(frozen=True)
class ModelOptions:
    """How the harness builds a model; a contestant's class receives the same object."""

    fused_qkv: bool = False  # one qkv_proj matmul instead of three (--fused-qkv)
    kernels: frozenset = frozenset()  # building blocks switched to moebench's Triton kernels: KERNEL_BLOCKS
    quant_dtype: str = "int8"  # the quantized experts' weight dtype: int8 or fp8 (--quantized-dtype)
    quant_bound: float = 1200.0  # activations are clamped to +-this before quantized matmuls


# Building blocks that can run as registered Triton kernels, and the kernel each uses.
KERNEL_BLOCKS = {
    "rms_norm": "RMSNorm (moebench::rms_norm)",
    "qkv": "input RMSNorm + QKV projection + q/k norms + RoPE (moebench::qkv_rope); needs fused_qkv",
    "attention": "flash attention, context encoding and decode (moebench::attention)",
    "flash_decoding": "split-K flash decoding for one-token decode steps (moebench::flash_decode)",
    "o_proj": "attention output projection with the residual add fused (moebench::linear)",
    "moe_router": "router matmul + softmax + top-k (moebench::moe_router)",
    "fused_moe": "sorted grouped expert MLP with the weighted combine (moebench::fused_moe)",
    "moe_residual": "the residual add fused into the expert kernel's combine",
    "quantized_moe": "int8/fp8 expert weights dequantized in the kernel (moebench::quantized_moe)",
    "rms_norm_quantize": "post-attention RMSNorm fused with activation quantization (moebench::rms_norm_quantize)",
    "dense_mlp": "the dense layers' SwiGLU projections (moebench::linear)",
    "lm_head": "the output projection (moebench::linear)",
}


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

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [B, Hkv, T, hd] into `layer`'s cache at slots [T]. One index_put_ on each whole cache tensor: a
        compiled step does it in place, where a write through the layer's view (cache.k[layer].index_copy_) makes
        the compiled step copy that layer's cache (~60 µs a layer at 640 slots)."""
        B, H = k.shape[:2]
        dev = slots.device
        index = (torch.full((), layer, device=dev), torch.arange(B, device=dev)[:, None, None],  # no host copy
                 torch.arange(H, device=dev)[None, :, None], slots[None, None, :])
        self.k.index_put_(index, k)
        self.v.index_put_(index, v)


def kernel_of(opts: ModelOptions, block: str, module: str, name: str):
    """moebench.kernels.<module>.<name> when `block` runs as a kernel, else None (Triton is imported only then)."""
    if block not in opts.kernels:
        return None
    return getattr(importlib.import_module(f"moebench.kernels.{module}"), name)


def untouched(*modules: nn.Module) -> bool:
    """True when these blocks are still the reference's own (nn.Linear, RMSNorm), not a submission's replacement:
    only then may a kernel read their weights in their place."""
    return all(type(m) in (nn.Linear, RMSNorm) for m in modules)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, opts: ModelOptions = ModelOptions()):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernel = kernel_of(opts, "rms_norm", "rmsnorm", "rms_norm")

    def forward(self, x):
        if self.kernel is not None:
            return self.kernel(x, self.weight, self.eps)
        if (x.numel() > x.shape[-1] and not torch.compiler.is_compiling() and not torch.is_grad_enabled()
                and cpu_ops.usable(x, self.weight)):
            # Many rows on the CPU (a prompt, eager, no autograd): the same math in one C++ pass (cpu_ops).
            return torch.ops.moebench_cpu.rms_norm_rows(x, self.weight, self.eps)
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
        if "qkv" in opts.kernels and not self.fused:
            raise ValueError("the QKV kernel works on the fused qkv_proj: build the model with fused_qkv")
        self.qkv_kernel = kernel_of(opts, "qkv", "qkv", "qkv_rope")
        self.kernel = kernel_of(opts, "attention", "attention", "attention")
        self.decode_kernel = kernel_of(opts, "flash_decoding", "flash_decoding", "flash_decode")
        self.o_kernel = kernel_of(opts, "o_proj", "linear", "linear")

    def _projections(self) -> tuple[nn.Module, ...]:
        return (self.qkv_proj,) if self.fused else (self.q_proj, self.k_proj, self.v_proj)

    def _reference_block(self, step: StepInputs, norm: RMSNorm | None) -> bool:
        """True with the reference's own input norm, projections and q/k norms (no kernels, no biases, one eps) and
        a boolean mask: what a C++ operator doing the whole block takes in their place."""
        if not untouched(norm):  # the reference's own input norm (not None, not a submission's)
            return False
        kernels = (self.qkv_kernel, self.kernel, self.decode_kernel, self.o_kernel, self.q_norm.kernel,
                   self.k_norm.kernel, norm.kernel)
        projections = self._projections()
        return (all(k is None for k in kernels) and step.mask.dtype == torch.bool
                and untouched(*projections, self.o_proj, self.q_norm, self.k_norm)
                and all(p.bias is None for p in (*projections, self.o_proj)) and self.q_norm.eps == self.k_norm.eps)

    def _attends_in_cpp(self, x: torch.Tensor, step: StepInputs, norm: RMSNorm | None) -> bool:
        """True in a compiled CPU graph with the reference's own block (_reference_block) and the C++ operators
        loaded (moebench.model.cpu_ops)."""
        return (in_compiled_cpu_graph(x) and self._reference_block(step, norm)
                and cpu_ops.usable(x, self.o_proj.weight))

    def _rotates_in_cpp(self, q: torch.Tensor, cos: torch.Tensor, cache: KVCache) -> bool:
        """True outside compiled and exported graphs on the CPU, with the reference's own q/k norms (no kernels), q,
        the norms' weights, the rotation and the cache in one dtype, and the C++ operators loaded (cpu_ops)."""
        return (not torch.compiler.is_compiling() and cpu_ops.usable(q, cache.k)
                and untouched(self.q_norm, self.k_norm) and self.q_norm.kernel is None and self.k_norm.kernel is None
                and self.q_norm.eps == self.k_norm.eps
                and self.q_norm.weight.dtype == self.k_norm.weight.dtype == cos.dtype == q.dtype)

    def _block_in_cpp(self, x: torch.Tensor, cos: torch.Tensor, step: StepInputs, cache: KVCache,
                      norm: RMSNorm | None) -> bool:
        """True where a prompt's whole attention block (the input norm, the projections, the q/k norms and rotation
        with the cache's write, the attention, the output projection and the residual add) runs as one C++ call:
        eagerly on the CPU without autograd, with the reference's own norm, projections and q/k norms (no kernels,
        no biases), every product on panels in x's dtype, a boolean mask."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or not self._reference_block(step, norm):
            return False
        return (not in_float32(x, x.numel() // x.shape[-1]) and cpu_ops.usable(x, norm.weight)
                and all(cpu_ops.products_usable(x, p.weight, x.dtype) for p in (*self._projections(), self.o_proj))
                and self._rotates_in_cpp(x, cos, cache))

    def forward(self, x, cos, sin, step: StepInputs, cache: KVCache, norm: RMSNorm | None = None,
                residual: torch.Tensor | None = None):
        """x [B, T, D] -> attention output [B, T, D]. With `norm`, x is the layer's input and is normalised here
        (fused into the QKV kernel when it runs); with `residual`, returns residual + output (fused into the
        output-projection kernel when it runs)."""
        B, T, _ = x.shape
        if B * T == 1 and residual is x and self._attends_in_cpp(x, step, norm):
            # One token in a compiled CPU step: the input norm, projections, q/k norms, rotation, the cache's write,
            # the attention, the output projection and the residual add in one C++ call (moebench.model.cpu_ops).
            wq, wk, wv = (self.qkv_proj.weight.split(self.sizes) if self.fused
                          else (self.q_proj.weight, self.k_proj.weight, self.v_proj.weight))
            return torch.ops.moebench_cpu.attention_decode(
                x.reshape(1, -1), norm.weight, norm.eps, wq, wk, wv, self.q_norm.weight, self.k_norm.weight,
                self.q_norm.eps, cos.reshape(-1), sin.reshape(-1), cache.k, cache.v, self.layer, step.slots,
                step.mask, self.hd**-0.5, self.o_proj.weight).view(B, T, -1)
        if T > 1 and residual is x and self._block_in_cpp(x, cos, step, cache, norm):
            # A prompt on the CPU: what the lines below do in five C++ calls (the norm, the projections on panels,
            # qk_norm_rope, attend_block, the output projection with the residual add), in one.
            return torch.ops.moebench_cpu.attention_block_prompt(
                x, norm.weight, norm.eps, [cpu_ops.packed_for(p.weight, x.dtype) for p in self._projections()],
                self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, cos, sin, cache.k, cache.v, self.layer,
                step.slots, step.mask, self.hd**-0.5, cpu_ops.packed_for(self.o_proj.weight, x.dtype))
        use_qkv_kernel = (self.qkv_kernel is not None and untouched(self.qkv_proj, self.q_norm, self.k_norm)
                          and (norm is None or untouched(norm)))
        if use_qkv_kernel:
            q, k, v = self.qkv_kernel(x.reshape(B * T, -1), None if norm is None else norm.weight,
                                      self.qkv_proj.weight, self.qkv_proj.bias, self.q_norm.weight,
                                      self.k_norm.weight, cos.reshape(B * T, -1), sin.reshape(B * T, -1),
                                      self.n_heads, self.n_kv, self.q_norm.eps)
            q = q.view(B, T, self.n_heads, self.hd).transpose(1, 2)  # [B, H, T, hd]
            k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)  # [B, Hkv, T, hd]
            v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        else:
            if norm is not None:
                x = norm(x)
            if self.fused:
                q, k, v = linear(self.qkv_proj, x).split(self.sizes, dim=-1)
            else:
                q, k, v = linear(self.q_proj, x), linear(self.k_proj, x), linear(self.v_proj, x)
            if T > 1 and self._rotates_in_cpp(q, cos, cache):
                # A prompt on the CPU: the q/k norms, the rotation and the cache's write in one C++ call.
                q = torch.ops.moebench_cpu.qk_norm_rope(q, k, v, self.q_norm.weight, self.k_norm.weight,
                                                        self.q_norm.eps, cos, sin, cache.k, cache.v, self.layer,
                                                        step.slots)
                k = None
            else:
                q = self.q_norm(q.view(B, T, self.n_heads, self.hd)).transpose(1, 2)  # [B, H, T, hd]
                k = self.k_norm(k.view(B, T, self.n_kv, self.hd)).transpose(1, 2)  # [B, Hkv, T, hd]
                v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if k is not None:  # (None: already in the cache)
            cache.write(self.layer, step.slots, k, v)
        S = step.mask.shape[-1]
        keys, values = cache.k[self.layer, :, :, :S], cache.v[self.layer, :, :, :S]  # [B, Hkv, S, hd]
        if self.decode_kernel is not None and T == 1:
            o = self.decode_kernel(q, keys, values, step.mask, self.hd**-0.5)
        elif self.kernel is not None:
            o = self.kernel(q, keys, values, step.mask, self.hd**-0.5)
        elif T == 1 and in_compiled_cpu_graph(q) and cpu_ops.usable(q, keys) and step.mask.dtype == torch.bool:
            # One query a head in C++: the library's flash attention costs ~10-20 µs a call in a decode step.
            o = torch.ops.moebench_cpu.attend_row(q, keys, values, step.mask, self.hd**-0.5)
        elif (T > 1 and cpu_ops.usable(q, keys) and step.mask.dtype == torch.bool
              and not torch.compiler.is_exporting()):
            # Many queries (a prompt) in C++: ~3x the library's flash attention on the CPU (its tiles go through
            # MKL, and it computes the masked half of a causal block too). Exported graphs keep the library's.
            o = torch.ops.moebench_cpu.attend_block(q, keys, values, step.mask, self.hd**-0.5)
        else:
            # A compiled CPU decode step attends in float32: the CPU's bfloat16 flash attention is several times
            # slower for one query (moebench-speed, 640 cache slots: 6.2 -> 4.0 ms a step, the upcasts included).
            wide = T == 1 and q.dtype == torch.bfloat16 and in_compiled_cpu_graph(q)
            qkv = (q.float(), keys.float(), values.float()) if wide else (q, keys, values)
            o = F.scaled_dot_product_attention(*qkv, attn_mask=step.mask, scale=self.hd**-0.5,
                                               enable_gqa=self.n_heads != self.n_kv).to(q.dtype)
        o = o.transpose(1, 2).reshape(B, T, self.n_heads * self.hd)
        if self.o_kernel is not None and untouched(self.o_proj):
            return self.o_kernel(o, self.o_proj.weight, self.o_proj.bias, residual)
        return linear(self.o_proj, o, residual)


class DenseMLP(nn.Module):
    """SwiGLU MLP of the layers listed in mlp_only_layers or off the decoder_sparse_step grid."""

    def __init__(self, cfg: Qwen3MoeConfig, opts: ModelOptions = ModelOptions()):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)  # gate rows first
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.kernel = kernel_of(opts, "dense_mlp", "linear", "linear")

    def forward(self, x, norm: RMSNorm | None = None, residual: torch.Tensor | None = None):
        """norm and residual as in Attention.forward."""
        if norm is not None:
            x = norm(x)
        if self.kernel is not None and untouched(self.gate_up_proj):
            gate, up = self.kernel(x, self.gate_up_proj.weight).chunk(2, dim=-1)
        else:
            gate, up = linear(self.gate_up_proj, x).chunk(2, dim=-1)
        if self.kernel is not None and untouched(self.down_proj):
            return self.kernel(F.silu(gate) * up, self.down_proj.weight, None, residual)
        return linear(self.down_proj, F.silu(gate) * up, residual)  # (a row-parallel one runs the kernel it holds)


class Experts(nn.Module):
    def __init__(self, cfg: Qwen3MoeConfig):
        super().__init__()
        E, D, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))  # gate rows first, then up
        self.down_proj = nn.Parameter(torch.empty(E, D, I))

    def quantize(self, qdtype: torch.dtype) -> None:
        """Replace the weights by 1-byte copies with per-output-channel float32 scales (the quantized kernel's)."""
        from moebench.kernels.quantized_moe import quantize_weights

        for name in ("gate_up_proj", "down_proj"):
            wq, scale = quantize_weights(getattr(self, name).data, qdtype)
            delattr(self, name)
            self.register_buffer(name + "_q", wq)
            self.register_buffer(name + "_scale", scale)


QUANT_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


class SparseMoE(nn.Module):
    def __init__(self, cfg: Qwen3MoeConfig, opts: ModelOptions = ModelOptions()):
        super().__init__()
        self.k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router
        self.experts = Experts(cfg)
        self.router_kernel = kernel_of(opts, "moe_router", "router", "moe_router")
        self.experts_kernel = kernel_of(opts, "fused_moe", "fused_moe", "fused_moe")
        self.quantized_kernel = kernel_of(opts, "quantized_moe", "quantized_moe", "quantized_moe")
        self.norm_quantize = kernel_of(opts, "rms_norm_quantize", "quantized_moe", "rms_norm_quantize")
        self.fuse_residual = "moe_residual" in opts.kernels
        self.qdtype, self.bound = QUANT_DTYPES[opts.quant_dtype], opts.quant_bound
        if self.fuse_residual and self.experts_kernel is None and self.quantized_kernel is None:
            raise ValueError("the fused residual add needs an expert kernel (fused_moe or quantized_moe)")
        if self.norm_quantize is not None and self.quantized_kernel is None:
            raise ValueError("rms_norm_quantize feeds the quantized expert kernel: it needs quantized_moe")

    def after_loading(self):
        """Called by the harness once the weights are in: the quantized kernel keeps its weights quantized (unless a
        submission's own forward, which reads the float weights, replaced this one)."""
        if self.quantized_kernel is not None and type(self).forward is SparseMoE.forward:
            self.experts.quantize(self.qdtype)

    def _reference_block(self, flat: torch.Tensor, norm: RMSNorm | None) -> bool:
        """True with the reference's own norm, router (no bias) and experts (no kernels), the C++ operators taking
        flat's rows and the router's weight: what a C++ operator doing the whole block takes in their place."""
        if not untouched(norm):  # the reference's own input norm (not None, not a submission's)
            return False
        kernels = (self.router_kernel, self.experts_kernel, self.quantized_kernel, self.norm_quantize, norm.kernel)
        return (all(k is None for k in kernels) and type(self.gate) is nn.Linear and self.gate.bias is None
                and cpu_ops.usable(flat, self.gate.weight))

    def _routed_in_cpp(self, flat: torch.Tensor, norm: RMSNorm | None) -> bool:
        """True for one token in a compiled CPU graph with the reference's own block (_reference_block) and the
        C++ operators loaded (moebench.model.cpu_ops)."""
        return (flat.shape[0] == 1 and in_compiled_cpu_graph(flat) and self._reference_block(flat, norm)
                and cpu_ops.usable(flat, self.experts.gate_up_proj))

    def _block_in_cpp(self, flat: torch.Tensor, norm: RMSNorm | None) -> torch.dtype | None:
        """The experts' panels' dtype where a prompt's whole MoE block (the norm, the routing, the experts and the
        residual add) runs as one C++ call: many rows, eagerly on the CPU without autograd, with the reference's own
        norm, router and experts (no kernels); else None."""
        if (flat.shape[0] == 1 or torch.compiler.is_compiling() or torch.is_grad_enabled()
                or not self._reference_block(flat, norm) or not cpu_ops.usable(flat, norm.weight)):
            return None
        return prompt_experts_dtype(flat, self.experts.gate_up_proj, self.experts.down_proj, self.k)

    def forward(self, x, norm: RMSNorm | None = None, residual: torch.Tensor | None = None):
        """x [B, T, D] -> [B, T, D]; norm and residual as in Attention.forward."""
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        if residual is x and (dtype := self._block_in_cpp(flat, norm)) is not None:
            # A prompt on the CPU: the norm, the routing (route_rows), the experts and the residual add (moe_prompt)
            # in one C++ call (moebench.model.cpu_ops), what the lines below do in three.
            w1, w2 = (cpu_ops.packed_for(w, dtype) for w in (self.experts.gate_up_proj, self.experts.down_proj))
            return torch.ops.moebench_cpu.moe_block_prompt(flat, norm.weight, norm.eps, self.gate.weight, self.k,
                                                           self.norm_topk_prob, w1, w2).view(B, T, D)
        if residual is x and self._routed_in_cpp(flat, norm):
            # One token in a compiled CPU step: the norm, the router's product, softmax, top-k, the experts and the
            # residual add in one C++ call (moebench.model.cpu_ops).
            return torch.ops.moebench_cpu.moe_route_decode(
                flat, norm.weight, norm.eps, self.gate.weight, self.k, self.norm_topk_prob, self.experts.gate_up_proj,
                self.experts.down_proj).view(B, T, D)
        xq = x_scale = None
        if norm is not None and self.norm_quantize is not None and untouched(norm):
            flat, xq, x_scale = self.norm_quantize(flat, norm.weight, norm.eps, self.bound, self.qdtype)
        elif norm is not None:
            flat = norm(flat)
        if self.router_kernel is not None and untouched(self.gate):
            ids, weights = self.router_kernel(flat, self.gate.weight, self.k, self.norm_topk_prob)
        else:
            ids, weights = route_tokens(self.gate, flat, self.k, self.norm_topk_prob)
        fused_add = residual is not None and self.fuse_residual  # __init__ made sure an expert kernel runs
        res = residual.reshape(B * T, D) if fused_add else None
        if self.quantized_kernel is not None:
            e = self.experts
            out = self.quantized_kernel(flat if xq is None else xq, e.gate_up_proj_q, e.gate_up_proj_scale,
                                        e.down_proj_q, e.down_proj_scale, ids, weights, self.bound, x_scale, res)
        elif self.experts_kernel is not None:
            out = self.experts_kernel(flat, self.experts.gate_up_proj, self.experts.down_proj, ids, weights, res)
        else:  # (the residual added in the C++ prompt operator where it runs)
            flat_res = None if residual is None else residual.reshape(B * T, D)
            out = experts_forward(flat, self.experts.gate_up_proj, self.experts.down_proj, ids, weights, flat_res)
            return out.view(B, T, D)
        out = out.view(B, T, D)
        return residual + out if residual is not None and not fused_add else out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3MoeConfig, layer: int, opts: ModelOptions):
        super().__init__()
        self.self_attn = Attention(cfg, layer, opts)
        self.mlp = SparseMoE(cfg, opts) if cfg.is_moe_layer(layer) else DenseMLP(cfg, opts)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, opts)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, opts)

    def forward(self, x, cos, sin, step, cache):
        # The reference's blocks apply the norm and residual add themselves (a kernel or a C++ operator may fuse them
        # in); a block whose forward a submission replaced gets the plain call.
        if type(self.self_attn).forward is Attention.forward:
            h = self.self_attn(x, cos, sin, step, cache, norm=self.input_layernorm, residual=x)
        else:
            h = x + self.self_attn(self.input_layernorm(x), cos, sin, step, cache)
        if type(self.mlp).forward in (SparseMoE.forward, DenseMLP.forward):
            return self.mlp(h, norm=self.post_attention_layernorm, residual=h)
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
        self.lm_head_kernel = kernel_of(options, "lm_head", "linear", "linear")
        # A plain float32 attribute, not a buffer: casting the model to bfloat16 must not round it.
        self.inv_freq, self.rope_scale = rope_frequencies(config)

    def tie_weights(self):
        parallel = getattr(self, "parallel", None)
        if parallel is not None and parallel.world > 1:  # sharded: tied there where both are split (shard_model)
            return
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
        x = self.model.norm(x)
        if self.lm_head_kernel is not None and untouched(self.lm_head):
            return self.lm_head_kernel(x, self.lm_head.weight).float()
        return linear(self.lm_head, x).float()
