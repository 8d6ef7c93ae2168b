"""Broken: forward returns every column's logits [B, T, vocab] where step.last asks for one column only."""

import dataclasses

from moebench.model.qwen3_moe import Qwen3MoeForCausalLM as Reference


class Qwen3MoeForCausalLM(Reference):
    def forward(self, input_ids, step, cache):
        return super().forward(input_ids, dataclasses.replace(step, last=None), cache)
