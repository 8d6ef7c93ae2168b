"""RMSNorm, optionally with the residual add fused in: reference, Triton kernel, custom ops, MAC formula."""

import torch

from moebench.kernels.interpret import check_device, ensure_interpreter_on_cpu
from moebench.kernels.registry import register_kernel

INTERPRETED = ensure_interpreter_on_cpu()  # before any @triton.jit is defined, here or in common

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from moebench.kernels.common import cast, pdl, wait_for_inputs  # noqa: E402

# Legend: T rows (tokens, or tokens x heads for the q/k norms), D normalised size.


def rms_norm_ref(x, weight, eps: float, residual=None):
    """x [..., D], weight [D] -> out [..., D]; with residual: (out, x + residual).

    As moebench's RMSNorm (and transformers): float32 statistics, the normalised row cast back to x's dtype
    before it meets the weight. The fused add rounds h = x + residual to x's dtype before normalising it."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    out = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return out if residual is None else (out, x)


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, h_ptr, D, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr, USE_GDC: tl.constexpr):
    # One program per row; all arithmetic in float32 (the interpreter cannot add bfloat16 directly).
    wait_for_inputs(USE_GDC)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * D + cols, mask=mask, other=0.0)
        x = cast(x.to(tl.float32) + r.to(tl.float32), x_ptr.dtype.element_ty)  # h, rounded as torch rounds it
        tl.store(h_ptr + row * D + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)
    y = cast(xf * inv_rms, x_ptr.dtype.element_ty).to(tl.float32)  # cast back before the weight, as the reference
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + cols, cast(w * y, out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """Launch wrapper: same arguments and results as rms_norm_ref."""
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"rms_norm: weight has shape {tuple(weight.shape)}, expected ({D},)")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual {tuple(residual.shape)} and x {tuple(x.shape)} differ")
    check_device(INTERPRETED, x, weight)
    rows = x.reshape(-1, D).contiguous()  # [T, D]
    T = rows.shape[0]
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    res = residual.reshape(-1, D).contiguous() if residual is not None else rows
    h = torch.empty_like(rows) if residual is not None else rows
    if T:
        _rms_norm_kernel[(T,)](rows, res, weight.contiguous(), out, h, D, eps,
                               HAS_RESIDUAL=residual is not None, BLOCK_D=triton.next_power_of_2(D), **pdl())
    return out if residual is None else (out, h.view(x.shape))


# The ops that models call, visible as nodes in exported and compiled graphs.
@torch.library.custom_op("moebench::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm_triton(x, weight, eps)


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


@torch.library.custom_op("moebench::add_rms_norm", mutates_args=())
def _add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_triton(x, weight, eps, residual)


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)), torch.empty_like(x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """The kernel as a model calls it: out, or (out, new_residual = x + residual) when residual is given."""
    if residual is None:
        return torch.ops.moebench.rms_norm(x, weight, eps)
    return torch.ops.moebench.add_rms_norm(x, residual, weight, eps)


def rms_norm_macs(*args) -> int:
    return 0  # element-wise: counts zero, as the reference's RMSNorm does (CONTRACTS "What counts") and NxDI does


register_kernel("moebench::rms_norm", rms_norm_macs, reference=rms_norm_ref)
register_kernel("moebench::add_rms_norm", rms_norm_macs,
                reference=lambda x, residual, weight, eps: rms_norm_ref(x, weight, eps, residual))
