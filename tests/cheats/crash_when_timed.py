"""Fault: its process dies in the middle of the benchmark (as a segfault would). The evaluation fails and is
recorded; evaluate_all goes on with the next prompt."""

import inspect
import os

from moebench.model.qwen3_moe import Qwen3MoeForCausalLM as Reference


class Qwen3MoeForCausalLM(Reference):
    def forward(self, input_ids, step, cache):
        if any(frame.function == "answer_request" for frame in inspect.stack()[1:9]):  # a timed request
            os._exit(3)
        return super().forward(input_ids, step, cache)
