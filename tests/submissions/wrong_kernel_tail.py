"""A deliberately wrong kernel: a Triton LM head whose reduction loop skips the tail. Its loop bound stops one
block early, so with BD = 32 and a hidden size of 128 it multiplies only the first 96 columns. It must fail
validation."""

import torch
import triton
import triton.language as tl

from moebench.kernels.common import dot
from moebench.kernels.registry import register_kernel
from moebench.model.qwen3_moe import Qwen3MoeForCausalLM as Reference


@triton.jit
def _lm_head_kernel(x_ptr, w_ptr, out_ptr, T, D, V, BT: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BV + tl.arange(0, BV)
    acc = tl.zeros((BT, BV), dtype=tl.float32)
    for d0 in range(0, D - BD, BD):  # BUG: stops one block early, the tail of D is never read
        d = d0 + tl.arange(0, BD)
        x = tl.load(x_ptr + rows[:, None] * D + d[None, :], mask=rows[:, None] < T, other=0.0)
        w = tl.load(w_ptr + cols[None, :] * D + d[:, None], mask=cols[None, :] < V, other=0.0)
        acc = dot(x, w, acc)
    tl.store(out_ptr + rows[:, None] * V + cols[None, :], acc, mask=(rows[:, None] < T) & (cols[None, :] < V))


@torch.library.custom_op("wrong_tail::lm_head", mutates_args=())
def lm_head(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    x, weight = x.contiguous(), weight.contiguous()
    (T, D), V = x.shape, weight.shape[0]
    out = torch.empty(T, V, dtype=torch.float32, device=x.device)
    _lm_head_kernel[(triton.cdiv(T, 16), triton.cdiv(V, 512))](x, weight, out, T, D, V, BT=16, BV=512, BD=32)
    return out


@lm_head.register_fake
def _(x, weight):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)


register_kernel("wrong_tail::lm_head", macs=lambda x, weight: x.shape[0] * x.shape[1] * weight.shape[0])


class TailSkippingLMHead(torch.nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def forward(self, h):
        return lm_head(h.reshape(-1, h.shape[-1]), self.weight).view(*h.shape[:-1], -1)


class Qwen3MoeForCausalLM(Reference):
    def __init__(self, config, options):
        super().__init__(config, options)
        self.lm_head = TailSkippingLMHead(self.lm_head.weight)
        self.tie_weights()
