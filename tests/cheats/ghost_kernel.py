"""Cheat: a kernel that exists only while torch.export traces. The LM head calls a registered kernel (doing its own
arithmetic, so that no library product is seen inside it) when torch.compiler.is_exporting(), and torch's linear
otherwise: the exported graphs, which the count reads, hold the kernel, while every run that is timed goes through
torch. Without the check its MACs counted as the submission's kernel (ratio ~0.25 at --seq-len 20). The harness
runs the request's graphs eagerly and sees the kernel never called: its MACs are the library's."""

import torch
import torch.nn.functional as F

from moebench.kernels.registry import register_kernel
from moebench.model.qwen3_moe import Qwen3MoeForCausalLM as Reference


@torch.library.custom_op("team_cheat::ghost_linear", mutates_args=())
def ghost_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (x[..., None, :] * weight).sum(-1)


@ghost_linear.register_fake
def _(x, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


register_kernel("team_cheat::ghost_linear", macs=lambda x, weight: x.numel() // x.shape[-1] * weight.numel())


class Ghost(torch.nn.Module):
    def __init__(self, inner: torch.nn.Linear):
        super().__init__()
        self.weight = inner.weight

    def forward(self, x):
        return ghost_linear(x, self.weight) if torch.compiler.is_exporting() else F.linear(x, self.weight)


class Qwen3MoeForCausalLM(Reference):
    def __init__(self, config, options):
        super().__init__(config, options)
        self.lm_head = Ghost(self.lm_head)
        self.tie_weights()
