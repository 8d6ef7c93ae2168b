"""Where Triton kernels run: compiled on a CUDA GPU, in Triton's interpreter on the CPU."""

import os

import torch


def interpreting() -> bool:
    """True when `@triton.jit` functions defined from now on run in Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def ensure_interpreter_on_cpu() -> bool:
    """Switch Triton to its interpreter when no CUDA device is present; returns whether it is on.

    Call it at the top of every kernel module, before any `@triton.jit` runs: Triton reads TRITON_INTERPRET
    when the decorator runs, so a kernel defined before the variable is set is a compiled kernel for good.
    Without CUDA a compiled kernel cannot launch at all; the interpreter runs it on CPU tensors with numpy,
    with the right numbers and a speed good only for correctness checks. With a GPU the variable is left as
    it is, so TRITON_INTERPRET=1 can still be set by hand to debug a kernel there."""
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    return interpreting()


def check_device(interpreted: bool, *tensors: torch.Tensor) -> None:
    """Fail with a line a user can act on when a compiled (not interpreted) kernel is handed CPU tensors."""
    if not interpreted and any(t.device.type != "cuda" for t in tensors):
        raise RuntimeError("compiled Triton kernels need CUDA tensors; to run them on the CPU set TRITON_INTERPRET=1 "
                           "before moebench's kernel modules are imported")
