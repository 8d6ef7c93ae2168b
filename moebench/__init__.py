"""moebench: a benchmark and contest harness for Mixture-of-Experts inference kernels."""

__version__ = "0.2.0"


def _triton_interpreter_without_cuda() -> None:
    """Without CUDA, Triton kernels can only run in Triton's interpreter, and Triton fixes that choice early
    (any import of triton, e.g. by another library, before TRITON_INTERPRET is set makes kernels defined later
    unlaunchable on the CPU). So set it first thing; with CUDA it is left alone. Inductor's CPU code is C++ and
    does not read it."""
    import os

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_triton_interpreter_without_cuda()
