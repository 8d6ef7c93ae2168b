"""Products through oneDNN with its packed weights: the CPU's fastest matrix products in eager mode.

torch's CPU `F.linear` runs float32 through MKL, which on AMD CPUs takes a slow path (this repo's Zen 5 VM: ~215
GFLOP/s for float32 GEMMs and ~30 GB/s for matrix-vector reads, against oneDNN's ~510 GFLOP/s and ~75 GB/s with the
weight packed once into its blocked layout). bfloat16 already goes to oneDNN, but repacks the weight on every call
(a packed weight: 500 -> 800 GFLOP/s at 50 rows, an expert's share of a 402-token prompt). The packed copies are
kept beside the weights (each packed once, again when the weight changes in place): the memory of the weights once
more, for the products that run eagerly (prefill; decode without compilation).
"""

import torch

from moebench.model.derived import derived

AVAILABLE = torch.backends.mkldnn.is_available()


def _vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


# bfloat16 matrix instructions (AVX512-BF16 or AMX); without them (AVX2 only) oneDNN's bfloat16 products are slow.
NATIVE_BF16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
# ... and faster than float32 FMAs: AMX, or AVX512-BF16 on AMD cores (Zen 4 and 5: a vdpbf16ps does twice the work of
# a float32 FMA in the same time). On Intel cores with AVX512-BF16 but no AMX (an Emerald Rapids VM that hides AMX)
# vdpbf16ps runs at half the rate of FMAs (79 against 153 GFLOP/s a core; 2048^3 products 141 against 266 GFLOP/s):
# there many-row bfloat16 products are faster in float32 (moebench.model.moe.in_float32).
FAST_BF16 = torch.cpu._is_amx_tile_supported() or (
    torch.cpu._is_avx512_bf16_supported() and _vendor() == "AuthenticAMD")


def usable(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """True when products of the CPU tensor x computed in `dtype` (float32, or bfloat16 on a CPU with its
    instructions) run here: outside torch.compile and torch.export (a compiled graph keeps its own products; an
    exported one must show aten's for the MAC count)."""
    return (AVAILABLE and x.device.type == "cpu" and (dtype == torch.float32 or dtype == torch.bfloat16 and NATIVE_BF16)
            and not torch.compiler.is_compiling())


def packed(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | list[torch.Tensor]:
    """w [N, K] (a linear's weight) or [E, N, K] (one weight per expert) in `dtype`, in oneDNN's packed layout."""
    def pack(w):
        pack = torch.ops.mkldnn._reorder_linear_weight
        return pack(w.to(dtype)) if w.dim() == 2 else [pack(m) for m in w.to(dtype)]
    return derived(w, ("onednn", dtype), pack)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for a packed `weight` (from `packed`), in x's dtype."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
