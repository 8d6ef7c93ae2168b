"""Broken: defines no Qwen3MoeForCausalLM (a misspelt class name)."""

from moebench.model.qwen3_moe import Qwen3MoeForCausalLM as Reference


class Qwen3MoEForCausalLM(Reference):  # "MoE", not "Moe"
    pass
