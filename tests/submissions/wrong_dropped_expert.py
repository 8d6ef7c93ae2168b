"""Wrong: each token skips its least-weighted expert (k-1 experts). Validation must fail."""

from moebench.model.moe import experts_forward, route
from moebench.model.qwen3_moe import Qwen3MoeForCausalLM as Reference, SparseMoE


class DroppedExpertMoE(SparseMoE):
    def forward(self, x):
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        ids, weights = route(self.gate(flat), self.k, self.norm_topk_prob)
        out = experts_forward(flat, self.experts.gate_up_proj, self.experts.down_proj, ids[:, :-1], weights[:, :-1])
        return out.view(B, T, D)


class Qwen3MoeForCausalLM(Reference):
    def __init__(self, config, options):
        super().__init__(config, options)
        for layer in self.model.layers:
            if isinstance(layer.mlp, SparseMoE):
                layer.mlp.__class__ = DroppedExpertMoE
