"""Honest, but written with data-dependent Python that torch.export cannot trace: a branch on a shape that depends
on the input's values. The compile step cannot export it, so its MACs are counted on graphs traced as it runs."""

import torch

from moebench.model.qwen3_moe import Qwen3MoeForCausalLM as Reference


class Qwen3MoeForCausalLM(Reference):
    def forward(self, input_ids, step, cache):
        if torch.bincount(input_ids.flatten()).shape[0] > 0:  # always true, but only real values know
            return super().forward(input_ids, step, cache)
        raise AssertionError("unreachable")
