"""Cheat: a kernel that runs everywhere but in the compiled code that is timed. The LM head calls a registered kernel
(its own arithmetic: numpy's) when exported and when run eagerly, and torch's linear inside torch.compile: the exported
graphs, which the count reads, hold the kernel, it runs when the harness runs the request's graphs eagerly, and a
prompt (run eagerly) calls it; every decode step that is timed runs torch's product. Without the check its MACs
counted as the submission's kernel (~0.25 at --seq-len 20). The harness runs each compiled decode step once more with
torch's profiler on and sees the kernel called fewer times than its graph holds it: its MACs are the library's."""

import torch
import torch.nn.functional as F

from moebench.kernels.registry import register_kernel
from moebench.model.qwen3_moe import Qwen3MoeForCausalLM as Reference


@torch.library.custom_op("team_cheat::compile_ghost_linear", mutates_args=())
def compile_ghost_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(x.float().numpy() @ weight.float().numpy().T).to(x.dtype)


@compile_ghost_linear.register_fake
def _(x, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


register_kernel("team_cheat::compile_ghost_linear",
                macs=lambda x, weight: x.numel() // x.shape[-1] * weight.numel())


class CompileGhost(torch.nn.Module):
    def __init__(self, inner: torch.nn.Linear):
        super().__init__()
        self.weight = inner.weight

    def forward(self, x):
        if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
            return F.linear(x, self.weight)
        return compile_ghost_linear(x, self.weight)


class Qwen3MoeForCausalLM(Reference):
    def __init__(self, config, options):
        super().__init__(config, options)
        self.lm_head = CompileGhost(self.lm_head)
        self.tie_weights()
