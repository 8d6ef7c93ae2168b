"""Broken (no Qwen3MoeForCausalLM), but first prints MOEBENCH_TEST_ECHO as its process's environment holds it."""

import os

print(f"echo: {os.environ.get('MOEBENCH_TEST_ECHO')}")
