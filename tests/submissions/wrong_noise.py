"""Wrong: the right logits plus noise of 5% of their largest magnitude. Validation must fail."""

import torch

from moebench.model.qwen3_moe import Qwen3MoeForCausalLM as Reference


class Qwen3MoeForCausalLM(Reference):
    def forward(self, input_ids, step, cache):
        logits = super().forward(input_ids, step, cache)
        vocab = torch.arange(logits.shape[-1], device=logits.device)
        positions = step.positions[:, -logits.shape[1]:]  # (one column where step.last asks for one)
        noise = torch.sin(vocab * 12.9898 + positions[..., None] * 78.233)  # pseudo-random in [-1, 1]
        return logits + 0.05 * logits.abs().amax(-1, keepdim=True) * noise
