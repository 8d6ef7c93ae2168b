"""moebench: a benchmark and contest harness for Mixture-of-Experts inference kernels."""

__version__ = "0.2.0"


def _where_triton_runs() -> None:
    """Without CUDA, Triton kernels can only run in Triton's interpreter, and Triton fixes that choice early
    (any import of triton, e.g. by another library, before TRITON_INTERPRET is set makes kernels defined later
    unlaunchable on the CPU). So set it first thing ("0" with CUDA). Inductor's CPU code is C++ and does not read
    it. Where it is set, CUDA is not asked about: asking starts the GPU driver, and a submission's process, spawned
    from the harness's (with its environment), imports moebench before it closes the descriptors it inherited, which
    would close the driver's too."""
    import os

    import torch

    if "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"


_where_triton_runs()
