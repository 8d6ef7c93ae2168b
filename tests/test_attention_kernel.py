"""The flash-attention kernel against scaled_dot_product_attention (under Triton's interpreter on the CPU), as a
custom op (fake impl, exported graph) and counted by the FLOP counter as SDPA is."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module defines its kernels

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402

pytest.importorskip("triton", reason="Triton is not installed; the kernel tests need it (pip install triton)")

from moebench.evaluation.flops import graph_macs  # noqa: E402
from moebench.kernels import interpret  # noqa: E402
from moebench.kernels.attention import attention, attention_macs, attention_ref, attention_triton  # noqa: E402
from moebench.kernels.registry import KERNELS  # noqa: E402

# Legend: B batch, H query heads, Hkv key/value heads, T queries, S keys (cache slots), hd head size.
DEVICE = "cuda" if torch.cuda.is_available() and not interpret.interpreting() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


def make_mask(B, T, S, case):
    """Bool [B, 1, T, S], True = may attend, laid out as the model's masks are."""
    if case == "decode":  # one new token per sequence; a few cache slots are free (not yet written) or padding
        mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
        mask[:, :, :, [3, 20, 36]] = False
        mask[-1, :, :, :5] = False  # the last sequence is left-padded too
    else:  # context encoding: causal
        mask = torch.ones(T, S, dtype=torch.bool).tril(S - T).expand(B, 1, T, S).clone()
        if case == "causal_padded":  # the last sequence left-padded by 3: its first 3 query rows see no key
            mask[-1, :, :, :3] = False
    return mask.to(DEVICE)


def make_inputs(B, H, Hkv, T, S, hd, dtype, seed=0):
    """q as the model makes it (a transposed [B, T, H, hd] view); k, v the first S slots of a longer cache."""
    q = randn(B, T, H, hd, dtype=dtype, seed=seed).transpose(1, 2)  # [B, H, T, hd], not contiguous
    k = randn(B, Hkv, S + 7, hd, dtype=dtype, seed=seed + 1)[:, :, :S]
    v = randn(B, Hkv, S + 7, hd, dtype=dtype, seed=seed + 2)[:, :, :S]
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,S,case", [(5, 5, "causal"), (1, 37, "decode"), (17, 17, "causal_padded")])
@pytest.mark.parametrize("hd", [16, 64])
@pytest.mark.parametrize("H,Hkv", [(4, 2), (4, 4)])
@pytest.mark.parametrize("B", [1, 2])
def test_attention_matches_reference(B, H, Hkv, hd, T, S, case, dtype):
    # Key blocks 16 wide and query blocks 16 tall: S = 17 and 37 run the online softmax over 2 and 3 blocks (the
    # last one partial), T = 17 two query blocks.
    q, k, v, mask = *make_inputs(B, H, Hkv, T, S, hd, dtype), make_mask(B, T, S, case)
    scale = hd**-0.5
    out = attention_triton(q, k, v, mask, scale, block_m=16, block_n=16)
    want = attention_ref(q, k, v, mask, scale)
    assert out.shape == want.shape == (B, H, T, hd) and out.dtype == dtype

    # A query row that may attend to no key at all (padding) is defined by the kernel as zeros, where the
    # reference's answer depends on the SDPA backend (zeros, or NaN); the other rows must match the reference.
    seen = mask.any(-1).expand(B, H, T)  # [B, H, T]
    if case == "causal_padded" and B == 2:
        assert not seen.all()
    assert torch.equal(out[~seen], torch.zeros_like(out[~seen]))
    torch.testing.assert_close(out[seen], want[seen], **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [127, 129])
def test_attention_long_prompts_with_the_default_tiles(T, dtype):
    """The op as the model calls it, with its default tiles: 127 and 129 causal tokens, tails in both axes."""
    q, k, v, mask = *make_inputs(1, 4, 2, T, T, 64, dtype), make_mask(1, T, T, "causal")
    torch.testing.assert_close(attention(q, k, v, mask, 0.125), attention_ref(q, k, v, mask, 0.125), **TOL[dtype])


def test_attention_every_row_masked_and_broadcast_mask():
    """All keys masked: zeros, never NaN. A [T, S] mask broadcasts over batch and heads as SDPA's does."""
    q, k, v = make_inputs(1, 2, 1, 3, 20, 16, torch.float32)
    out = attention(q, k, v, torch.zeros(1, 1, 3, 20, dtype=torch.bool, device=DEVICE), 0.25)
    assert torch.equal(out, torch.zeros_like(out))
    mask = torch.ones(3, 20, dtype=torch.bool, device=DEVICE).tril(17)
    torch.testing.assert_close(attention(q, k, v, mask, 0.25), attention_ref(q, k, v, mask, 0.25),
                               **TOL[torch.float32])


def test_attention_rejects_bad_inputs():
    q, k, v = make_inputs(1, 3, 2, 2, 4, 16, torch.float32)
    mask = torch.ones(1, 1, 2, 4, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        attention(q, k, v, mask, 0.25)  # 3 query heads over 2 kv heads
    q = q[:, :2]
    with pytest.raises(ValueError, match="bool"):
        attention(q, k, v, mask.float(), 0.25)
    with pytest.raises(ValueError, match="broadcast"):
        attention(q, k, v, mask[..., :3], 0.25)


def test_fake_impl_agrees_with_the_kernel():
    """Schema, fake tensor (shape, dtype, device of the fake impl against the real run) and AOT dispatch."""
    q, k, v = make_inputs(2, 4, 2, 5, 5, 16, torch.bfloat16)
    torch.library.opcheck(torch.ops.moebench.attention, (q, k, v, make_mask(2, 5, 5, "causal"), 0.25),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


class TinyAttention(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, q, k, v, mask):
        return self.fn(q, k, v, mask, q.shape[-1] ** -0.5)


def test_registry_entry_and_macs_count_as_sdpa():
    kernel = KERNELS["moebench::attention"]  # registered by importing moebench.kernels.attention
    assert kernel.flag == "attn_kernel_enabled" and kernel.reference is attention_ref
    B, H, Hkv, T, S, hd = 2, 4, 2, 5, 5, 16
    q, k, v, mask = *make_inputs(B, H, Hkv, T, S, hd, torch.float32), make_mask(B, T, S, "causal")
    assert attention_macs(q, k, v, mask, 0.25) == 2 * B * H * T * S * hd
    with torch.no_grad():
        ep = torch.export.export(TinyAttention(attention), (q, k, v, mask))
        ref = make_fx(TinyAttention(attention_ref))(q, k, v, mask)  # as flops.capture_step traces: SDPA's aten op
    assert torch.ops.moebench.attention.default in {n.target for n in ep.graph_module.graph.nodes}
    macs, ref_macs = graph_macs(ep.graph_module), graph_macs(ref)
    assert macs.kernel == macs.total == ref_macs.total == 2 * B * H * T * S * hd and ref_macs.kernel == 0
    torch.testing.assert_close(ep.module()(q, k, v, mask), attention_ref(q, k, v, mask, hd**-0.5),
                               **TOL[torch.float32])
