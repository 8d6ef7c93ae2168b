"""The custom-kernel registry: which torch ops are custom kernels, and how many multiply-accumulates each does."""

import importlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils import flop_counter

# The kernels moebench ships, by module under moebench.kernels; importing one registers its ops.
BUILTIN_MODULES = ("rmsnorm", "linear", "qkv", "attention", "flash_decoding", "router", "fused_moe", "quantized_moe")


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

    Contestants call it for their own kernels; `flag` is for moebench's kernels switched by a CLI flag.
    Once the op is defined, torch.utils.flop_counter.FlopCounterMode counts it too (2 FLOPs per MAC)."""
    if _composite_implicit(name):  # eagerly its own ops run in its place: the kernel check never sees it called
        raise ValueError(f"register_kernel: {name} has a CompositeImplicitAutograd implementation; a kernel is "
                         "registered for devices (torch.library.custom_op, or Library.impl with \"CPU\"/\"CUDA\" or "
                         "CompositeExplicitAutograd)")
    kernel = Kernel(name, macs, reference, flag)
    KERNELS[name] = kernel
    _register_flop_formula(name, macs)
    return kernel


def _composite_implicit(name: str) -> bool:
    """Whether the op `name` (its default overload, if defined yet) is implemented as CompositeImplicitAutograd.
    (Asked of the dispatcher by name: no torch.ops handle is made and kept for an op that may be defined again.)"""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeImplicitAutograd")
    except RuntimeError:  # not defined (yet)
        return False


def _register_flop_formula(name: str, macs: Callable[..., int]) -> None:
    namespace, _, op_name = name.partition("::")
    packet = getattr(getattr(torch.ops, namespace), op_name, None)  # None: the op is not defined (yet)
    if packet is None:
        return
    flop_counter.flop_registry.pop(packet, None)  # registering again (a module re-imported) replaces the formula

    @flop_counter.register_flop_formula(packet, get_raw=True)
    def flops(*args, out_val=None, **kwargs):
        return 2 * int(macs(*args, *kwargs.values()))


def load_builtin_kernels() -> dict[str, Kernel]:
    """Import moebench's own kernel modules (this imports Triton), registering their ops; returns KERNELS."""
    for module in BUILTIN_MODULES:
        importlib.import_module(f"moebench.kernels.{module}")
    return KERNELS
