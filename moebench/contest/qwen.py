"""moebench's contestant template: copy it to qwen.py in your working folder and make it faster.

The harness builds `Qwen3MoeForCausalLM(config, options)` exactly as it builds the reference and loads the same
weights into it (parameter names and shapes as in moebench.model.qwen3_moe). It then calls
`forward(input_ids, step, cache)` for each context-encoding and token-generation step and expects float32
logits [B, T or 1, vocab] back. Override any module or method (a layer's forward, the MoE block, attention);
work done in kernels registered with moebench.kernels counts as custom-kernel MACs in the score.
"""

from moebench.model.qwen3_moe import Qwen3MoeForCausalLM as Reference


class Qwen3MoeForCausalLM(Reference):
    """The reference model, unchanged: the starting point."""
