"""The split-K flash-decoding kernel against scaled_dot_product_attention (under Triton's interpreter on the CPU):
split sizes, padding masks, cache slices; as a custom op (fake impl, exported graph) and counted as SDPA is."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module defines its kernels

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

pytest.importorskip("triton", reason="Triton is not installed; the kernel tests need it (pip install triton)")

from moebench.evaluation.flops import graph_macs  # noqa: E402
from moebench.kernels import interpret  # noqa: E402
from moebench.kernels.flash_decoding import (flash_decode, flash_decode_macs, flash_decode_ref,  # noqa: E402
                                             flash_decode_triton)
from moebench.kernels.registry import KERNELS  # noqa: E402

# Legend: B batch, H query heads, Hkv key/value heads, T queries, S keys (cache slots), hd head size, L layers.
DEVICE = "cuda" if torch.cuda.is_available() and not interpret.interpreting() else "cpu"
# bfloat16: about one step of its 8-bit mantissa (2^-7 relative; 2^-8 absolute, one step at 0.5 or so).
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2**-8, rtol=2**-7)}


def randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


def make_mask(B, T, S, pad=5):
    """Bool [B, 1, T, S], True = may attend, as the model's decode masks are: the T new tokens sit in the last T
    slots (causal among themselves), a few free slots are masked, and the last sequence is left-padded by `pad`
    (a query whose keys are all padding sees nothing at all)."""
    mask = torch.ones(T, S, dtype=torch.bool).tril(S - T).expand(B, 1, T, S).clone()
    mask[:, :, :, [s for s in (3, 20, 36) if s < S - T]] = False
    mask[-1, :, :, :pad] = False
    return mask.to(DEVICE)


def make_inputs(B, H, Hkv, T, S, hd, dtype, seed=0, L=2, layer=1):
    """q as the model makes it (a transposed [B, T, H, hd] view); k, v as the model passes them: the first S slots
    of one layer of a static cache [L, B, Hkv, max_len, hd], so not contiguous."""
    q = randn(B, T, H, hd, dtype=dtype, seed=seed).transpose(1, 2)  # [B, H, T, hd]
    cache_k = randn(L, B, Hkv, S + 9, hd, dtype=dtype, seed=seed + 1)
    cache_v = randn(L, B, Hkv, S + 9, hd, dtype=dtype, seed=seed + 2)
    return q, cache_k[layer, :, :, :S], cache_v[layer, :, :, :S]


def model_sdpa(q, k, v, mask, scale):
    """The model's own decode attention (Attention.forward without kernels)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def check(out, q, k, v, mask, scale, dtype):
    """Rows that see a key match the reference and the model's SDPA; rows that see none are exactly zero."""
    B, H, T, hd = q.shape
    assert out.shape == (B, H, T, hd) and out.dtype == dtype and not out.isnan().any()
    seen = mask.any(-1).expand(B, H, T)  # [B, H, T]
    assert torch.equal(out[~seen], torch.zeros_like(out[~seen]))
    for want in (flash_decode_ref(q, k, v, mask, scale), model_sdpa(q, k, v, mask, scale)):
        torch.testing.assert_close(out[seen], want[seen], **TOL[dtype])


# Interpreted, the defaults are 64-key splits of 32-key blocks: S = 127, 129, 300 run 2, 3 (the last of 1 key)
# and 5 splits (S = 64: exactly one); g·T = 1..24 rows share one tile per kv head.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,S,H,Hkv,hd", [
    (1, 1, 4, 2, 64), (1, 127, 8, 1, 48), (1, 129, 2, 2, 64), (1, 300, 4, 2, 48),
    (3, 1, 8, 1, 48), (3, 127, 2, 2, 64), (3, 129, 4, 2, 48), (3, 300, 8, 1, 64),
    (2, 64, 8, 2, 48),  # g = 4 and T = 2 share a factor: rows map to (head, query) by r // T and r % T only
])
def test_flash_decode_matches_reference(T, S, H, Hkv, hd, dtype):
    B = 2
    q, k, v = make_inputs(B, H, Hkv, T, S, hd, dtype)
    mask = make_mask(B, T, S, pad=min(5, S - 1))
    check(flash_decode(q, k, v, mask, hd**-0.5), q, k, v, mask, hd**-0.5, dtype)


@pytest.mark.parametrize("split_size,block_n", [(1, 16), (7, 16), (16, 16), (40, 16), (1000, 32)])
def test_split_sizes_and_row_blocks(split_size, block_n):
    # 8 query heads on 1 kv head times T = 3 queries: 24 rows, two 16-row tiles. The last sequence's 9 padded
    # keys leave whole splits with no allowed key (their partials must weigh nothing), and split_size 40 runs
    # three key blocks in one split, the last partial; 1000 is one split covering everything.
    B, H, Hkv, T, S, hd = 2, 8, 1, 3, 40, 48
    q, k, v = make_inputs(B, H, Hkv, T, S, hd, torch.float32, seed=3)
    mask = make_mask(B, T, S, pad=9)
    out = flash_decode_triton(q, k, v, mask, 0.2, split_size=split_size, block_m=16, block_n=block_n)
    check(out, q, k, v, mask, 0.2, torch.float32)


def test_bfloat16_one_key_splits():
    q, k, v = make_inputs(1, 4, 2, 1, 21, 64, torch.bfloat16, seed=5)
    mask = make_mask(1, 1, 21, pad=2)
    check(flash_decode_triton(q, k, v, mask, 0.125, split_size=1), q, k, v, mask, 0.125, torch.bfloat16)


def test_fully_masked_rows_give_zeros_and_masks_broadcast():
    """All keys masked: zeros, never NaN, in every split. A [T, S] or stride-0 mask broadcasts as SDPA's does."""
    q, k, v = make_inputs(2, 4, 2, 3, 20, 16, torch.float32)
    out = flash_decode_triton(q, k, v, torch.zeros(2, 1, 3, 20, dtype=torch.bool, device=DEVICE), 0.25, split_size=8)
    assert torch.equal(out, torch.zeros_like(out))
    for mask in (torch.ones(3, 20, dtype=torch.bool, device=DEVICE).tril(17),
                 torch.ones(1, 1, 1, 20, dtype=torch.bool, device=DEVICE).expand(2, 1, 3, 20)):
        check(flash_decode_triton(q, k, v, mask, 0.25, split_size=8), q, k, v, mask, 0.25, torch.float32)


def test_cache_slices_read_as_contiguous_copies():
    """Strided q, k, v (a layer of the cache, cut at S) give bit for bit what contiguous copies give."""
    q, k, v = make_inputs(2, 4, 2, 1, 45, 48, torch.bfloat16, seed=7, L=3, layer=2)
    assert not (k.is_contiguous() or v.is_contiguous())
    mask = make_mask(2, 1, 45)
    out = flash_decode_triton(q, k, v, mask, 0.15, split_size=16)
    assert torch.equal(out, flash_decode_triton(q.contiguous(), k.contiguous(), v.contiguous(), mask.contiguous(),
                                                0.15, split_size=16))
    check(out, q, k, v, mask, 0.15, torch.bfloat16)


def test_flash_decode_rejects_bad_inputs():
    q, k, v = make_inputs(1, 3, 2, 1, 4, 16, torch.float32)
    mask = torch.ones(1, 1, 1, 4, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        flash_decode(q, k, v, mask, 0.25)  # 3 query heads over 2 kv heads
    q = q[:, :2]
    with pytest.raises(ValueError, match="bool"):
        flash_decode(q, k, v, mask.float(), 0.25)
    with pytest.raises(ValueError, match="broadcast"):
        flash_decode(q, k, v, mask[..., :3], 0.25)
    with pytest.raises(ValueError, match="split_size"):
        flash_decode_triton(q, k, v, mask, 0.25, split_size=0)


def test_fake_impl_agrees_with_the_kernel():
    """Schema, fake tensor (shape, dtype, device of the fake impl against the real run) and AOT dispatch."""
    q, k, v = make_inputs(1, 4, 2, 1, 20, 16, torch.bfloat16)
    torch.library.opcheck(torch.ops.moebench.flash_decode, (q, k, v, make_mask(1, 1, 20), 0.25),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


class TinyDecode(nn.Module):
    def forward(self, q, k, v, mask):
        return flash_decode(q, k, v, mask, q.shape[-1] ** -0.5)


def test_registry_entry_export_and_macs_count_as_sdpa():
    kernel = KERNELS["moebench::flash_decode"]  # registered by importing moebench.kernels.flash_decoding
    assert kernel.flag == "flash_decoding_enabled" and kernel.reference is flash_decode_ref
    assert kernel.macs is flash_decode_macs
    B, H, Hkv, T, S, hd = 2, 4, 2, 1, 24, 16
    q, k, v = make_inputs(B, H, Hkv, T, S, hd, torch.float32)
    mask = make_mask(B, T, S)
    assert flash_decode_macs(q, k, v, mask, 0.25) == 2 * B * H * T * S * hd == 6144
    with torch.no_grad():
        ep = torch.export.export(TinyDecode(), (q, k, v, mask))
    assert torch.ops.moebench.flash_decode.default in {n.target for n in ep.graph_module.graph.nodes}
    macs = graph_macs(ep.graph_module)
    assert macs.kernel == macs.total == 2 * B * H * T * S * hd
    check(ep.module()(q, k, v, mask), q, k, v, mask, hd**-0.5, torch.float32)
