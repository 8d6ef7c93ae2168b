"""The custom-kernel registry: which torch ops are custom kernels, and how many multiply-accumulates each does."""

import importlib
from dataclasses import dataclass
from typing import Callable

# The kernels moebench ships, by module under moebench.kernels; importing one registers its ops.
BUILTIN_MODULES = ("rmsnorm", "attention", "router", "fused_moe")


@dataclass(frozen=True)
class Kernel:
    name: str  # the torch op's qualified name, e.g. "moebench::rms_norm"
    macs: Callable[..., int]  # MACs from the op's arguments as called (tensors: use their .shape)
    reference: Callable | None = None  # the plain torch spec of the op, same arguments and results
    flag: str | None = None  # the run-config field that switches it on alone (e.g. "mlp_kernel_enabled"), or None


KERNELS: dict[str, Kernel] = {}


def register_kernel(name: str, macs: Callable[..., int], reference: Callable | None = None,
                    flag: str | None = None) -> Kernel:
    """Declare the torch op `name` a custom kernel; its MACs then count as kernel MACs in the FLOP ratio.

    Contestants call it for their own kernels; `flag` is for moebench's kernels switched by a CLI flag."""
    kernel = Kernel(name, macs, reference, flag)
    KERNELS[name] = kernel
    return kernel


def load_builtin_kernels() -> dict[str, Kernel]:
    """Import moebench's own kernel modules (this imports Triton), registering their ops; returns KERNELS."""
    for module in BUILTIN_MODULES:
        importlib.import_module(f"moebench.kernels.{module}")
    return KERNELS
