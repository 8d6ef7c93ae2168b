"""Cheat: a "kernel" that computes with torch's arithmetic. The LM head goes through a custom op whose code
multiplies element by element and sums (no library product for the check to see), registered with its true MAC
formula: without the check its MACs counted as the submission's kernel (ratio ~0.25 at --seq-len 20). The harness
sees the op run two elements of torch's arithmetic for each MAC it declares: its MACs are the library's."""

import torch

from moebench.kernels.registry import register_kernel
from moebench.model.qwen3_moe import Qwen3MoeForCausalLM as Reference


@torch.library.custom_op("team_cheat::elementwise_linear", mutates_args=())
def elementwise_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (x[..., None, :] * weight).sum(-1)


@elementwise_linear.register_fake
def _(x, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


register_kernel("team_cheat::elementwise_linear", macs=lambda x, weight: x.numel() // x.shape[-1] * weight.numel())


class Wrapped(torch.nn.Module):
    def __init__(self, inner: torch.nn.Linear):
        super().__init__()
        self.weight = inner.weight

    def forward(self, x):
        return elementwise_linear(x, self.weight)


class Qwen3MoeForCausalLM(Reference):
    def __init__(self, config, options):
        super().__init__(config, options)
        self.lm_head = Wrapped(self.lm_head)
        self.tie_weights()
