"""Cheat: a kernel that compiled code calls as often as its graph holds it, but on less. The LM head calls a registered
kernel (its own arithmetic: numpy's) on the whole head when exported and when run eagerly; inside torch.compile it
calls it on one row of the head's weight, for show, and torch's linear computes the logits. The compiled decode step
calls the kernel once, as its graph holds it, so counting calls alone credited its MACs (~0.25 at --seq-len 20). The
harness compares each compiled call's arguments with the graph's: a call on one row is not the graph's call, and the
kernel's MACs are the library's."""

import torch
import torch.nn.functional as F

from moebench.kernels.registry import register_kernel
from moebench.model.qwen3_moe import Qwen3MoeForCausalLM as Reference


@torch.library.custom_op("team_cheat::compile_thin_linear", mutates_args=())
def compile_thin_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(x.float().numpy() @ weight.float().numpy().T).to(x.dtype)


@compile_thin_linear.register_fake
def _(x, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


register_kernel("team_cheat::compile_thin_linear",
                macs=lambda x, weight: x.numel() // x.shape[-1] * weight.numel())


class CompileThin(torch.nn.Module):
    def __init__(self, inner: torch.nn.Linear):
        super().__init__()
        self.weight = inner.weight

    def forward(self, x):
        if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
            shown = compile_thin_linear(x, self.weight[:1])  # one row of the vocabulary, for show
            return F.linear(x, self.weight) + 1e-30 * shown  # (a result left unused is dropped by Inductor)
        return compile_thin_linear(x, self.weight)


class Qwen3MoeForCausalLM(Reference):
    def __init__(self, config, options):
        super().__init__(config, options)
        self.lm_head = CompileThin(self.lm_head)
        self.tie_weights()
