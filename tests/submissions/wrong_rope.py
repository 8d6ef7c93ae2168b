"""Wrong: rotary embeddings with the default theta 10000 instead of the config's rope_theta. Validation must fail."""

import torch

from moebench.model.qwen3_moe import Qwen3MoeForCausalLM as Reference


class Qwen3MoeForCausalLM(Reference):
    def __init__(self, config, options):
        super().__init__(config, options)
        dim = config.dim_head
        self.inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
