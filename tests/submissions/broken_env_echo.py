"""Broken (no Qwen3MoeForCausalLM), but first prints MOEBENCH_TEST_ECHO as its process's environment holds it, the
tensors in shared memory it can reach (the harness's own, were any passed to it that way) and the descriptors it
holds beyond the standard ones."""

import gc
import os
import warnings

import torch

print(f"echo: {os.environ.get('MOEBENCH_TEST_ECHO')}")
with warnings.catch_warnings():  # isinstance on torch's deprecated aliases warns
    warnings.simplefilter("ignore")
    print(f"shared tensors: {sum(isinstance(o, torch.Tensor) and o.is_shared() for o in gc.get_objects())}")
print(f"descriptors: {len(os.listdir('/proc/self/fd')) - 4}")  # 0, 1, 2, the listing's own: the pipe is 1
