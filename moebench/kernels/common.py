"""Small Triton helpers shared by the kernels: two that paper over faults of Triton's CPU interpreter, and the
switch and wait of programmatic dependent launch."""

import functools
import os
import sys

import torch

from moebench.kernels.interpret import ensure_interpreter_on_cpu

INTERPRETED = ensure_interpreter_on_cpu()  # before any @triton.jit below

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


def device_function(fn):
    """@triton.jit for a function the kernels call. Under the interpreter, the function as the interpreter rewrites
    it, called as it is: a @triton.jit function called from a kernel there patches triton.language anew at every
    call (~0.9 ms each on the 2-core VM: a third of a decode step's time with --enable-nki), which the kernel calling
    it has patched already."""
    jitted = triton.jit(fn)
    rewritten = getattr(jitted, "rewrite", None) if INTERPRETED else None  # (an interpreter without it: as jitted)
    return rewritten() if rewritten is not None else jitted


if INTERPRETED:
    @device_function
    def cast(x, dtype: tl.constexpr):
        """float32 x to dtype, rounding to nearest even. The interpreter's own float32 -> bfloat16 cast
        truncates (and so does a store of float32 into a bfloat16 tensor), which torch never does."""
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # round the low 16 bits away, ties to even
            x = bits.to(tl.float32, bitcast=True)  # now exactly a bfloat16 value: truncation loses nothing
        return x.to(dtype)

    @device_function
    def dot(a, b, acc):
        """acc + a @ b in float32. The interpreter multiplies bfloat16 operands as raw integers: upcast them."""
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
else:
    @device_function
    def cast(x, dtype: tl.constexpr):
        return x.to(dtype)

    @device_function
    def dot(a, b, acc):
        """acc + a @ b, float32 accumulation; float32 operands multiplied exactly (no TF32 rounding)."""
        return tl.dot(a, b, acc, input_precision="ieee")


# Programmatic dependent launch (PDL; NVIDIA compute capability 9.0 and later): a kernel launched with it may start
# while the kernel before it in the stream still runs. Its programs first do what depends on nothing that kernel
# writes (address arithmetic, the first tile of weights), then `wait_for_inputs`: griddepcontrol.wait returns once
# the kernel before has finished and its writes are visible; then griddepcontrol.launch_dependents lets the kernel
# after start in turn. A kernel thus overlaps only its own prologue with the tail of the one before, so what it reads
# before its wait may come from the weights or from kernels two or more launches back (the one before had itself
# waited for those before letting this one start), never from the one just before: a kernel's weights must not be
# written by the kernel launched just before it (the model's weights never are).
# A decode step of batch 1 is ~11 kernels a layer of a few µs each: their starts and first loads add up.
# MOEBENCH_PDL=1 turns it on for every moebench kernel that waits; bench/gpu_decode.py measures decode with it off
# and on in one run (set_pdl). Off by default until a GPU has shown it faster.
PDL_ENV = "MOEBENCH_PDL"
_pdl: bool | None = None  # set_pdl's choice; None: MOEBENCH_PDL's


def unable_to_pdl() -> str | None:
    """Why PDL cannot run here, or None."""
    if INTERPRETED:
        return "Triton's interpreter runs the kernels"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    return None if major >= 9 else f"{torch.cuda.get_device_name()} is of compute capability {major}.{minor}"


@functools.cache
def _pdl_from_env() -> bool:
    value = os.environ.get(PDL_ENV, "")
    if value in ("", "0"):
        return False
    if value != "1":
        print(f"moebench: {PDL_ENV}={value!r} not used: 0 or 1", file=sys.stderr)
        return False
    why = unable_to_pdl()
    if why:
        print(f"moebench: {PDL_ENV}=1 not used: needs a CUDA GPU of compute capability 9.0 or later ({why})",
              file=sys.stderr)
    return why is None


def set_pdl(on: bool | None) -> None:
    """Launch the kernels from now on with PDL (True), without (False), or as MOEBENCH_PDL says (None). A CUDA graph
    keeps the launches it captured."""
    global _pdl
    why = unable_to_pdl() if on else None
    if why:
        raise ValueError(f"programmatic dependent launch cannot run: {why}")
    _pdl = on


def pdl_on() -> bool:
    return _pdl_from_env() if _pdl is None else _pdl


def pdl(early_reads: bool = True) -> dict:
    """The launch arguments of a kernel that takes USE_GDC: with PDL, its wait compiled in and the launch flag.
    early_reads=False (the wrapper has just written the weights the kernel reads before its wait, say by making them
    contiguous): this launch without PDL."""
    return dict(USE_GDC=True, launch_pdl=True) if early_reads and pdl_on() else dict(USE_GDC=False)


if INTERPRETED:
    @device_function
    def wait_for_inputs(USE_GDC: tl.constexpr):
        """The interpreter runs one program after another, one kernel after another: nothing to wait for (the
        tests run the kernels' USE_GDC paths so, without launch_pdl)."""
        pass
else:
    @device_function
    def wait_for_inputs(USE_GDC: tl.constexpr):
        """With PDL: wait for the kernel before (finished, its writes visible), then let the kernel after start."""
        if USE_GDC:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
