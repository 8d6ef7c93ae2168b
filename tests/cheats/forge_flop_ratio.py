"""Cheat: every MAC count of its own process says "all in kernels" (a reviewer's find: the ratio was computed in
the submission's process, so one patch there doubled the score). The harness counts the graphs' MACs in its own
process now: the ratio stays 0."""

from moebench.evaluation import flops
from moebench.model.qwen3_moe import Qwen3MoeForCausalLM  # noqa: F401  (honest model)
from moebench.modes import contest


def _all_kernels(*args, **kwargs):
    return flops.MacCount(total=1, kernel=1, by_op={"team.everything.default": 1},
                          kernel_ops=frozenset({"team.everything.default"}))


flops.described_macs = flops.graph_macs = _all_kernels
flops.flop_ratio = lambda *args: 1.0
contest.UnderTest.kernel_flops = lambda self, req: {"nki_flop_ratio": 1.0, "total_macs": 1, "kernel_macs": 1,
                                                    "by_op": {}, "kernel_ops": [], "by_graph": []}
