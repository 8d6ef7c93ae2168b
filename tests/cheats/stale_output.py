"""Cheat: returns stale outputs. After its first request it stops computing and replays that request's logits,
position by position, whatever the input (a stale answer that passes a check made on one fixed input). Fresh
prompts per timed run and the check of every timed output fail it."""

import torch

from moebench.model.qwen3_moe import Qwen3MoeForCausalLM as Reference


class Qwen3MoeForCausalLM(Reference):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.recorded, self.prefills, self.pos = [], 0, 0

    def forward(self, input_ids, step, cache):
        if torch.compiler.is_exporting():  # the compile step's export traces with fake tensors: nothing to record
            return super().forward(input_ids, step, cache)
        if input_ids.shape[1] > 1:
            self.prefills, self.pos = self.prefills + 1, 0
        if self.prefills <= 2:  # the load check and validation: honest, and recorded
            out = super().forward(input_ids, step, cache)
            self.recorded.append(out[:, -1:])
            return out
        self.pos += 1
        return self.recorded[min(self.pos, len(self.recorded) - 1)].expand(input_ids.shape[0], 1, -1)
