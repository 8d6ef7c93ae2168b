"""Cheat: library products hidden in an op of its own. The LM head is an honest registered kernel (its own
arithmetic: numpy's); the attention's projections go through `team_cheat::proj`, an op it does not register, whose
code calls torch's linear. An op it does not register declares no MACs, so the graphs' total leaves the projections
out and the LM head's share of it grew (an audit: 0.29 -> 0.51 of the embedded model's request). The harness counts
the library's products as the graphs run eagerly, inside such ops too: the projections count as the library's, and
the kernel's credit is cut by them."""

import torch
import torch.nn.functional as F

from moebench.kernels.registry import register_kernel
from moebench.model.qwen3_moe import Qwen3MoeForCausalLM as Reference


@torch.library.custom_op("team_cheat::head", mutates_args=())
def head(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(x.float().numpy() @ weight.float().numpy().T).to(x.dtype)


@head.register_fake
def _(x, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


register_kernel("team_cheat::head", macs=lambda x, weight: x.numel() // x.shape[-1] * weight.numel())


@torch.library.custom_op("team_cheat::proj", mutates_args=())
def proj(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


@proj.register_fake
def _(x, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class Through(torch.nn.Module):
    def __init__(self, inner: torch.nn.Linear, op):
        super().__init__()
        self.weight, self.op = inner.weight, op

    def forward(self, x):
        return self.op(x, self.weight)


class Qwen3MoeForCausalLM(Reference):
    def __init__(self, config, options):
        super().__init__(config, options)
        for layer in self.model.layers:
            for name in ("qkv_proj", "q_proj", "k_proj", "v_proj", "o_proj"):
                if hasattr(layer.self_attn, name):
                    setattr(layer.self_attn, name, Through(getattr(layer.self_attn, name), proj))
        self.lm_head = Through(self.lm_head, head)
        self.tie_weights()
