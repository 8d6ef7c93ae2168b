"""Broken: forward raises RuntimeError."""

from moebench.model.qwen3_moe import Qwen3MoeForCausalLM as Reference


class Qwen3MoeForCausalLM(Reference):
    def forward(self, input_ids, step, cache):
        raise RuntimeError("this submission's forward is broken on purpose")
