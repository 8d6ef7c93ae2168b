"""Fault: hangs while being loaded. The phase time limit stops it with a clear message; the evaluation fails."""

import time

from moebench.model.qwen3_moe import Qwen3MoeForCausalLM  # noqa: F401

time.sleep(3600)
