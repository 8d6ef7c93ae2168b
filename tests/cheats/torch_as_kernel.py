"""Cheat: a "kernel" that is torch's own product. The LM head goes through a custom op that calls F.linear,
registered with its true MAC formula: without the check its MACs counted as the submission's kernel (ratio ~0.25
at --seq-len 20, the score x1.25; wrapping every linear the same way, ~0.7). The harness sees the op hand its
product to aten: its MACs are the library's."""

import torch
import torch.nn.functional as F

from moebench.kernels.registry import register_kernel
from moebench.model.qwen3_moe import Qwen3MoeForCausalLM as Reference


@torch.library.custom_op("team_cheat::linear", mutates_args=())
def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


@linear.register_fake
def _(x, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


register_kernel("team_cheat::linear", macs=lambda x, weight: x.numel() // x.shape[-1] * weight.numel())


class Wrapped(torch.nn.Module):
    def __init__(self, inner: torch.nn.Linear):
        super().__init__()
        self.weight = inner.weight

    def forward(self, x):
        return linear(x, self.weight)


class Qwen3MoeForCausalLM(Reference):
    def __init__(self, config, options):
        super().__init__(config, options)
        self.lm_head = Wrapped(self.lm_head)
        self.tie_weights()
