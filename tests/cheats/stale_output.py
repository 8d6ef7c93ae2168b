"""Cheat: returns stale outputs. It computes honestly on the prompts of its first two requests (the load check and
the logit validation) and on any prompt that extends one of them (the validation's teacher-forced re-runs); on any
other prompt it stops computing and replays its first request's logits, position by position, whatever the input (a
stale answer that passes a check made on one fixed input). Fresh prompts per timed run and the check of every timed
output fail it."""

import torch

from moebench.model.qwen3_moe import Qwen3MoeForCausalLM as Reference


class Qwen3MoeForCausalLM(Reference):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.recorded, self.checked, self.honest, self.pos = [], [], True, 0

    def forward(self, input_ids, step, cache):
        if torch.compiler.is_exporting():  # the compile step's export traces with fake tensors: nothing to record
            return super().forward(input_ids, step, cache)
        if input_ids.shape[1] > 1:
            prompt = [t for t in input_ids[0].tolist() if t != 0]  # padding removed
            if len(self.checked) < 2:
                self.checked.append(prompt)
            self.honest, self.pos = any(prompt[:len(p)] == p for p in self.checked), 0
        if self.honest:  # checked: honest, and recorded
            out = super().forward(input_ids, step, cache)
            self.recorded.append(out[:, -1:])
            return out
        self.pos += 1
        return self.recorded[min(self.pos, len(self.recorded) - 1)].expand(input_ids.shape[0], 1, -1)
