"""Cheat: a kernel called for show. The LM head calls a registered kernel (its own arithmetic: numpy's) in the exported
graphs, which the count reads; when it runs it calls the kernel on the first row only and lets torch's linear do the
work. The kernel does run, at the graph's shapes in a decode step, so neither the check for kernels that never run
nor the one for kernels calling the library sees it; without the bound on each graph's kernel MACs it earned ~0.33
at --seq-len 20. The harness counts the library's products as the graphs ran eagerly: torch did the LM head's MACs,
so the graph leaves its kernel none."""

import torch
import torch.nn.functional as F

from moebench.kernels.registry import register_kernel
from moebench.model.qwen3_moe import Qwen3MoeForCausalLM as Reference


@torch.library.custom_op("team_cheat::decoy_linear", mutates_args=())
def decoy_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(x.float().numpy() @ weight.float().numpy().T).to(x.dtype)


@decoy_linear.register_fake
def _(x, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


register_kernel("team_cheat::decoy_linear", macs=lambda x, weight: x.numel() // x.shape[-1] * weight.numel())


class Decoy(torch.nn.Module):
    def __init__(self, inner: torch.nn.Linear):
        super().__init__()
        self.weight = inner.weight

    def forward(self, x):
        if torch.compiler.is_exporting():
            return decoy_linear(x, self.weight)
        shown = decoy_linear(x[..., :1, :], self.weight)  # for show; its result used, or compiled code drops the call
        return F.linear(x, self.weight) + 1e-30 * shown  # (Inductor folds 0 * shown away)


class Qwen3MoeForCausalLM(Reference):
    def __init__(self, config, options):
        super().__init__(config, options)
        self.lm_head = Decoy(self.lm_head)
        self.tie_weights()
