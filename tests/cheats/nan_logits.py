"""Fault: returns NaN logits. Validation fails on them (NaN never passes a tolerance)."""

import torch

from moebench.model.qwen3_moe import Qwen3MoeForCausalLM as Reference


class Qwen3MoeForCausalLM(Reference):
    def forward(self, input_ids, step, cache):
        return super().forward(input_ids, step, cache) * torch.nan
