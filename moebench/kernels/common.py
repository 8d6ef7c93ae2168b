"""Small Triton helpers shared by the kernels, papering over two faults of Triton's CPU interpreter."""

from moebench.kernels.interpret import ensure_interpreter_on_cpu

INTERPRETED = ensure_interpreter_on_cpu()  # before any @triton.jit below

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

if INTERPRETED:
    @triton.jit
    def cast(x, dtype: tl.constexpr):
        """float32 x to dtype, rounding to nearest even. The interpreter's own float32 -> bfloat16 cast
        truncates (and so does a store of float32 into a bfloat16 tensor), which torch never does."""
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # round the low 16 bits away, ties to even
            x = bits.to(tl.float32, bitcast=True)  # now exactly a bfloat16 value: truncation loses nothing
        return x.to(dtype)

    @triton.jit
    def dot(a, b, acc):
        """acc + a @ b in float32. The interpreter multiplies bfloat16 operands as raw integers: upcast them."""
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
else:
    @triton.jit
    def cast(x, dtype: tl.constexpr):
        return x.to(dtype)

    @triton.jit
    def dot(a, b, acc):
        """acc + a @ b, float32 accumulation; float32 operands multiplied exactly (no TF32 rounding)."""
        return tl.dot(a, b, acc, input_precision="ieee")
