"""The fused input RMSNorm + QKV projection + q/k norms + RoPE kernel (under Triton's interpreter on the CPU): against
its torch reference, the reference against the model's own attention, and as a custom op in an exported graph."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module defines its kernels

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

pytest.importorskip("triton", reason="Triton is not installed; the kernel tests need it (pip install triton)")

from moebench.evaluation.flops import graph_macs  # noqa: E402
from moebench.kernels import interpret  # noqa: E402
from moebench.kernels.qkv import qkv_rope, qkv_rope_macs, qkv_rope_ref  # noqa: E402
from moebench.kernels.registry import KERNELS  # noqa: E402
from moebench.model.config import Qwen3MoeConfig  # noqa: E402
from moebench.model.qwen3_moe import Attention, KVCache, ModelOptions, RMSNorm, StepInputs  # noqa: E402
from moebench.model.rope import apply_rope, rope_cos_sin, rope_frequencies  # noqa: E402

# Legend: T tokens, D hidden, H/Hkv query/key-value heads, hd head size, B batch.
DEVICE = "cuda" if torch.cuda.is_available() and not interpret.interpreting() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
DTYPES = [torch.float32, torch.bfloat16]
EPS = 1e-6


def randn(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)


def qkv_inputs(T, D=48, hd=32, H=4, Hkv=2, norm=True, bias=True, dtype=torch.float32, seed=0):
    """The kernel's arguments, in order: random weights, and cos/sin of real positions 3..T+2 (theta 10000)."""
    N = (H + 2 * Hkv) * hd
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))  # [hd/2]
    cos, sin = rope_cos_sin(inv_freq, 1.0, torch.arange(3, T + 3)[None], dtype)  # [1, T, hd]
    return (randn(T, D, dtype=dtype, seed=seed), randn(D, dtype=dtype, seed=seed + 1) if norm else None,
            randn(N, D, dtype=dtype, scale=D**-0.5, seed=seed + 2),
            randn(N, dtype=dtype, seed=seed + 3) if bias else None,
            randn(hd, dtype=dtype, seed=seed + 4), randn(hd, dtype=dtype, seed=seed + 5),
            cos[0].to(DEVICE), sin[0].to(DEVICE), H, Hkv, EPS)


# (D, hd, H, Hkv, input norm, bias): D and hd off powers of two exercise the masked tails.
SHAPES = {"D48-hd32-4/2-norm-bias": (48, 32, 4, 2, True, True), "D80-hd24-2/1-plain": (80, 24, 2, 1, False, False)}
MORE_SHAPES = {"D80-hd48-2/1-norm": (80, 48, 2, 1, True, False), "D48-hd32-4/2-bias": (48, 32, 4, 2, False, True)}


def check_against_reference(T, shape, dtype):
    D, hd, H, Hkv, norm, bias = shape
    args = qkv_inputs(T, D, hd, H, Hkv, norm, bias, dtype)
    out, want = qkv_rope(*args), qkv_rope_ref(*args)
    for got, ref, heads in zip(out, want, (H, Hkv, Hkv)):
        assert got.shape == ref.shape == (T, heads, hd) and got.dtype == dtype and got.is_contiguous()
        torch.testing.assert_close(got, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 17, 127, 129])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_qkv_rope_matches_reference(dtype, T, shape):
    check_against_reference(T, shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MORE_SHAPES.values(), ids=MORE_SHAPES.keys())
def test_qkv_rope_matches_reference_norm_and_bias_apart(dtype, shape):
    check_against_reference(17, shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("shape", {**SHAPES, **MORE_SHAPES}.values(), ids={**SHAPES, **MORE_SHAPES}.keys())
def test_qkv_rope_split_over_d_matches_reference(monkeypatch, dtype, T, shape):
    """Launch options with SPLIT_D (a GPU's decode): partial products over slices of D (32 columns: a tail in each
    shape), then the sum, norms and RoPE in a second kernel."""
    from moebench.kernels import qkv

    monkeypatch.setattr(qkv, "_tiles", lambda T: dict(SPLIT_D=32, BK=16))
    monkeypatch.setattr(qkv, "_qkv_rope_kernel", None)  # the one-pass kernel must not run
    check_against_reference(T, shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_is_the_models_attention(dtype):
    """input_layernorm, then Attention with fused_qkv: q from its own modules, k and v as it writes the cache."""
    B, T = 2, 5
    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=48, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=24, attention_bias=True, rope_theta=10000.0)
    H, Hkv, hd, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim_head, cfg.hidden_size
    attn, norm = Attention(cfg, 0, ModelOptions(fused_qkv=True)), RMSNorm(D, cfg.rms_norm_eps)
    with torch.no_grad():
        for i, p in enumerate([*attn.parameters(), *norm.parameters()]):
            p.copy_(randn(*p.shape, scale=D**-0.5 if p.dim() == 2 else 1.0, seed=20 + i))
    attn, norm = attn.to(dtype), norm.to(dtype)
    x = randn(B, T, D, dtype=dtype, seed=30).cpu()
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])  # [B, T]
    cos, sin = rope_cos_sin(*rope_frequencies(cfg), positions, dtype)  # [B, T, hd]
    cache = KVCache(cfg, B, 8, dtype, "cpu")
    step = StepInputs(positions, torch.arange(T), torch.ones(B, 1, T, T, dtype=torch.bool))
    with torch.no_grad():
        h = norm(x)
        attn(h, cos, sin, step, cache)
        q = attn.qkv_proj(h).split(attn.sizes, dim=-1)[0]
        q = apply_rope(attn.q_norm(q.view(B, T, H, hd)).transpose(1, 2), cos, sin)  # [B, H, T, hd]
        args = (x.reshape(B * T, D), norm.weight, attn.qkv_proj.weight, attn.qkv_proj.bias, attn.q_norm.weight,
                attn.k_norm.weight, cos.reshape(B * T, hd), sin.reshape(B * T, hd), H, Hkv, cfg.rms_norm_eps)
        got = qkv_rope_ref(*args)
        kernel = qkv_rope(*(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args))
    model = (q.transpose(1, 2).reshape(B * T, H, hd),  # [B, H, T, hd] -> [B·T, H, hd]
             cache.k[0, :, :, :T].transpose(1, 2).reshape(B * T, Hkv, hd),
             cache.v[0, :, :, :T].transpose(1, 2).reshape(B * T, Hkv, hd))
    for ref, want, out in zip(got, model, kernel):
        torch.testing.assert_close(ref, want, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out.cpu(), want, **TOL[dtype])


def test_rejects_bad_shapes_and_dtypes():
    args = list(qkv_inputs(3, D=32, hd=16, H=2, Hkv=1))
    with pytest.raises(ValueError, match="cos has shape"):
        qkv_rope(*args[:6], args[6][:, :8], *args[7:])
    with pytest.raises(ValueError, match="hd even"):
        qkv_rope(args[0], args[1], args[2][:-4], *args[3:])  # 60 rows: hd = 15
    with pytest.raises(ValueError, match="x's dtype"):
        qkv_rope(*args[:2], args[2].to(torch.bfloat16), *args[3:])


def test_macs_and_registry_entry():
    kernel = KERNELS["moebench::qkv_rope"]
    assert kernel.flag == "qkv_kernel_enabled" and kernel.reference is qkv_rope_ref
    args = qkv_inputs(5, D=48, hd=24, H=4, Hkv=2)
    assert kernel.macs(*args) == qkv_rope_macs(*args) == 5 * 48 * (4 + 2 * 2) * 24  # norms and RoPE count 0


@pytest.mark.parametrize("norm,bias", [(True, True), (False, False)])
def test_fake_impl_agrees_with_the_kernel(norm, bias):
    """Schema, fake tensor (shapes, dtypes, devices of the fake impl against the real run) and AOT dispatch."""
    args = qkv_inputs(3, D=32, hd=16, H=2, Hkv=1, norm=norm, bias=bias, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.moebench.qkv_rope, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


class TinyQkv(nn.Module):
    """The attention block's front: one qkv_rope call on the layer input."""

    def __init__(self, D=32, hd=16, H=2, Hkv=1):
        super().__init__()
        _, norm, w_qkv, bias, q_norm, k_norm, *_ = qkv_inputs(1, D, hd, H, Hkv)
        self.norm, self.w_qkv, self.bias = nn.Parameter(norm), nn.Parameter(w_qkv), nn.Parameter(bias)
        self.q_norm, self.k_norm, self.heads = nn.Parameter(q_norm), nn.Parameter(k_norm), (H, Hkv)

    def weights(self):
        return self.norm, self.w_qkv, self.bias, self.q_norm, self.k_norm

    def forward(self, x, cos, sin):
        norm, w_qkv, bias, q_norm, k_norm = self.weights()
        return qkv_rope(x, norm, w_qkv, bias, q_norm, k_norm, cos, sin, *self.heads, EPS)


def test_kernel_is_a_node_of_an_exported_graph_and_counts_as_kernel_macs():
    T, D, hd, H, Hkv = 5, 32, 16, 2, 1
    block = TinyQkv(D, hd, H, Hkv).eval()
    x, _, _, _, _, _, cos, sin, *_ = qkv_inputs(T, D, hd, H, Hkv, seed=7)
    with torch.no_grad():
        ep = torch.export.export(block, (x, cos, sin))
        targets = {n.target for n in ep.graph_module.graph.nodes if n.op == "call_function"}
        assert torch.ops.moebench.qkv_rope.default in targets
        macs = graph_macs(ep.graph_module)
        assert macs.kernel == macs.total == macs.by_op["moebench.qkv_rope.default"] == T * D * (H + 2 * Hkv) * hd
        norm, w_qkv, bias, q_norm, k_norm = block.weights()
        want = qkv_rope_ref(x, norm, w_qkv, bias, q_norm, k_norm, cos, sin, H, Hkv, EPS)
        for got, ref in zip(ep.module()(x, cos, sin), want):
            torch.testing.assert_close(got, ref, **TOL[torch.float32])
