"""The custom-kernel registry: which torch ops are custom kernels, and how many multiply-accumulates each does."""

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Kernel:
    name: str  # the torch op's qualified name, e.g. "moebench::rms_norm"
    macs: Callable[..., int]  # MACs from the op's arguments as called (tensors: use their .shape)
    reference: Callable | None = None  # the plain torch spec of the op


KERNELS: dict[str, Kernel] = {}


def register_kernel(name: str, macs: Callable[..., int], reference: Callable | None = None) -> Kernel:
    """Declare the torch op `name` a custom kernel; its MACs then count as kernel MACs in the FLOP ratio."""
    kernel = Kernel(name, macs, reference)
    KERNELS[name] = kernel
    return kernel
