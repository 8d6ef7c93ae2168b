"""Example submission: a Triton kernel of your own in place of one building block (the LM head).

It shows the three things a custom kernel needs to count in moebench's score:
  1. the kernel and its launch wrapper (here a tiled matmul, logits = x @ W^T, accumulated in float32);
  2. a torch custom op around it, with a fake implementation (shapes only) so graphs can be captured;
  3. registration with moebench's kernel registry, with its MAC formula: its MACs then count as kernel MACs.
Then the model class swaps the building block for a module that calls the op. Try it:

    python main.py --mode validate --qwen qwen_with_triton --seq-len 16
    python main.py --mode evaluate_single --qwen qwen_with_triton --seq-len 32 --benchmark-runs 3

On the CPU the kernel runs in Triton's interpreter (correct, slow); on a GPU it is compiled.
"""

import torch
import triton
import triton.language as tl

from moebench.kernels.common import dot  # tl.dot with a float32 accumulator (and interpreter fixes on the CPU)
from moebench.kernels.registry import register_kernel
from moebench.model.qwen3_moe import Qwen3MoeForCausalLM as Reference

# Legend: T tokens, D hidden size, V vocabulary.


def lm_head_ref(x, weight):
    """The spec: x [T, D] @ weight [V, D]^T -> logits [T, V] in float32."""
    return (x @ weight.T).float()


@triton.jit
def _lm_head_kernel(x_ptr, w_ptr, out_ptr, T, D, V, BT: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr):
    # Program (i, j) computes logits[rows i, columns j].
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BV + tl.arange(0, BV)
    acc = tl.zeros((BT, BV), dtype=tl.float32)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        x = tl.load(x_ptr + rows[:, None] * D + d[None, :], mask=(rows[:, None] < T) & (d[None, :] < D), other=0.0)
        w = tl.load(w_ptr + cols[None, :] * D + d[:, None], mask=(cols[None, :] < V) & (d[:, None] < D), other=0.0)
        acc = dot(x, w, acc)
    tl.store(out_ptr + rows[:, None] * V + cols[None, :], acc, mask=(rows[:, None] < T) & (cols[None, :] < V))


@torch.library.custom_op("qwen_example::lm_head", mutates_args=())
def lm_head(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    x, weight = x.contiguous(), weight.contiguous()
    T, D = x.shape
    V = weight.shape[0]
    out = torch.empty(T, V, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(T, 16), triton.cdiv(V, 256))
    _lm_head_kernel[grid](x, weight, out, T, D, V, BT=16, BV=256, BD=64)
    return out


@lm_head.register_fake
def _(x, weight):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)


register_kernel("qwen_example::lm_head", macs=lambda x, weight: x.shape[0] * x.shape[1] * weight.shape[0],
                reference=lm_head_ref)


class TritonLMHead(torch.nn.Module):
    """Takes the place of the reference's nn.Linear lm_head; keeps its parameter name and shape."""

    def __init__(self, weight: torch.nn.Parameter):
        super().__init__()
        self.weight = weight

    def forward(self, h):  # h [B, T, D] -> [B, T, V]
        return lm_head(h.reshape(-1, h.shape[-1]), self.weight).view(*h.shape[:-1], -1)


class Qwen3MoeForCausalLM(Reference):
    def __init__(self, config, options):
        super().__init__(config, options)
        self.lm_head = TritonLMHead(self.lm_head.weight)
        self.tie_weights()
