"""Broken (no Qwen3MoeForCausalLM), but first prints MOEBENCH_TEST_ECHO as its process's environment holds it, the
tensors in shared memory it can reach (the harness's own, were any passed to it that way) and the descriptors it
holds beyond the standard ones, how many of the CPU's vector sets it checks for Inductor and whether moebench's C++
CPU operators and Inductor's compile_fx are there before it asks for them."""

import gc
import os
import sys
import warnings

import torch
import torch._inductor.cpu_vec_isa as vec_isa

from moebench.model import cpu_ops

print(f"echo: {os.environ.get('MOEBENCH_TEST_ECHO')}")
with warnings.catch_warnings():  # isinstance on torch's deprecated aliases warns
    warnings.simplefilter("ignore")
    print(f"shared tensors: {sum(isinstance(o, torch.Tensor) and o.is_shared() for o in gc.get_objects())}")
print(f"descriptors: {len(os.listdir('/proc/self/fd')) - 4}")  # 0, 1, 2, the listing's own: the pipe is 1

checked = []  # Inductor's checks of the CPU's vector sets this process makes (none where the fork server made them)
vec_isa.VecISA._probe_load = lambda self, path: checked.append(str(self)) or True
bool(vec_isa.pick_vec_isa())
print(f"vector sets checked: {len(checked)}")
print(f"C++ CPU operators loaded: {cpu_ops.LOADED}")
print(f"compile_fx imported: {'torch._inductor.compile_fx' in sys.modules}")
