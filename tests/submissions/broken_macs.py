"""Broken: its own kernel (a torch custom op standing in for a Triton one, the LM head) is registered with a MAC
formula that gives a negative count (BROKEN_MACS=nan: not a number): the harness refuses the count, a failed,
recorded evaluation in one line (before: a traceback and no record). BROKEN_MACS=1 is honest; 1000 inflates the
count: the kernel share is then not credited; 1.9 inflates it within the 2x check: the share is then capped at the
honest one. BROKEN_MACS_RANK=r: under tensor parallelism only rank r's formula is broken (a failure that rank
meets alone)."""

import os

import torch

from moebench.kernels.registry import register_kernel
from moebench.model.qwen3_moe import Qwen3MoeForCausalLM as Reference


@torch.library.custom_op("broken_macs::head", mutates_args=())
def head(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # its own multiply-accumulates, as a kernel's, in numpy (a torch product, or torch's element-wise arithmetic,
    # inside would count as the library's)
    return torch.from_numpy(x.float().numpy() @ weight.float().numpy().T).to(x.dtype)


@head.register_fake
def _(x, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


MACS = float(os.environ.get("BROKEN_MACS", "-1"))
ON_RANK = os.environ.get("BROKEN_MACS_RANK")


def macs(x, w):
    broken = ON_RANK is None or torch.distributed.get_rank() == int(ON_RANK)
    return (MACS if broken else 1) * x.shape[0] * x.shape[1] * x.shape[2] * w.shape[0]


register_kernel("broken_macs::head", macs=macs)


class Head(torch.nn.Linear):
    def forward(self, h):
        return head(h, self.weight)


class Qwen3MoeForCausalLM(Reference):
    def __init__(self, config, options):
        super().__init__(config, options)
        weight = self.lm_head.weight
        self.lm_head = Head(weight.shape[1], weight.shape[0], bias=False)
        self.lm_head.weight = weight
        self.tie_weights()
