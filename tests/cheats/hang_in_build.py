"""Fault: loads, then hangs while its model is built (on the CPU the harness computes the expected logits
meanwhile). The phase time limit, counted from the process's start over the load and the build together, stops it
with a clear message; the evaluation fails."""

import time

from moebench.model.qwen3_moe import Qwen3MoeForCausalLM as Reference


class Qwen3MoeForCausalLM(Reference):
    def __init__(self, *args, **kwargs):
        time.sleep(3600)
