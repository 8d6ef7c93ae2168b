"""Cheat: does less work when it is timed. It looks at its caller: under the harness's timed request it runs only
the first decoder layer (about a third of the work here); when the harness checks logits it runs them all. Every
timed output is checked against the reference: the evaluation fails."""

import sys

from moebench.model.qwen3_moe import Qwen3MoeForCausalLM as Reference


def under_timed_request() -> bool:
    """Whether the harness's timed request is among the callers, however deep (a compiled step adds frames)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_name != "time_request":
        frame = frame.f_back
    return frame is not None


class Qwen3MoeForCausalLM(Reference):
    def forward(self, input_ids, step, cache):
        layers = self.model.layers
        if under_timed_request():
            self.model.layers = layers[:1]
        try:
            return super().forward(input_ids, step, cache)
        finally:
            self.model.layers = layers
