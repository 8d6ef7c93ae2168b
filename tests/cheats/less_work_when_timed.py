"""Cheat: does less work when it is timed. It looks at its caller: under the harness's timed request it runs only
the first decoder layer (about a third of the work here); when the harness checks logits it runs them all. Every
timed output is checked against the reference: the evaluation fails."""

import inspect

from moebench.model.qwen3_moe import Qwen3MoeForCausalLM as Reference


class Qwen3MoeForCausalLM(Reference):
    def forward(self, input_ids, step, cache):
        timed = any(frame.function == "time_request" for frame in inspect.stack()[1:8])
        layers = self.model.layers
        if timed:
            self.model.layers = layers[:1]
        try:
            return super().forward(input_ids, step, cache)
        finally:
            self.model.layers = layers
