"""Custom kernels: Triton kernels registered as torch custom ops, each beside its torch reference and MAC formula.

One file per kernel (rmsnorm.py, router.py, fused_moe.py, ...), each holding three things side by side: the
plain torch reference (`*_ref`, the spec), the `@triton.jit` kernel with its launch wrapper (`*_triton`:
checks, allocates, launches) exposed as a `torch.library.custom_op` named `moebench::<name>`, and a one-line
MAC formula (`*_macs`). Importing a kernel file registers it in `registry.KERNELS`, which the tests, the
benchmarks and the FLOP-ratio counter read.

On a machine without CUDA the kernels run in Triton's interpreter (correct, slow; see interpret.py).
This package imports nothing else of moebench, and importing it does not import Triton: the kernel files
are imported by whoever uses them (or all at once by `registry.load_builtin_kernels()`).
"""
