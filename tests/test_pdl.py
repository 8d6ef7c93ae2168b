"""Programmatic dependent launch (moebench/kernels/common.py): off unless MOEBENCH_PDL=1 or set_pdl turns it on,
refused where it cannot run, and on a GPU of compute capability 9.0 or later the same results as without it, bit for
bit, through a decode layer's chain of kernels replayed in a CUDA graph. (tests/test_gpu_compile.py checks that the
decode kernels compile for sm_90 with their waits in the PTX.)"""

import os
import subprocess
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module defines its kernels

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="Triton is not installed; the kernel tests need it (pip install triton)")

from moebench.kernels import common, fused_moe, linear  # noqa: E402

HOPPER = (torch.cuda.is_available() and not common.INTERPRETED and torch.cuda.get_device_capability()[0] >= 9)


def pdl_in_fresh_process(value: str | None) -> tuple[str, str]:
    """(common.pdl()'s USE_GDC, stderr) in a new interpreter with MOEBENCH_PDL=value (unset for None)."""
    env = {k: v for k, v in os.environ.items() if k != common.PDL_ENV}
    if value is not None:
        env[common.PDL_ENV] = value
    done = subprocess.run([sys.executable, "-c", "from moebench.kernels import common; "
                           "print(common.pdl()['USE_GDC'])"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip(), done.stderr


def test_pdl_off_by_default_and_bad_values_said():
    assert pdl_in_fresh_process(None) == ("False", "")
    assert pdl_in_fresh_process("0") == ("False", "")
    on, err = pdl_in_fresh_process("yes")
    assert on == "False" and "MOEBENCH_PDL='yes' not used: 0 or 1" in err


@pytest.mark.skipif(HOPPER, reason="this GPU runs it")
def test_pdl_said_not_used_without_a_hopper_gpu():
    on, err = pdl_in_fresh_process("1")
    assert on == "False" and "MOEBENCH_PDL=1 not used: needs a CUDA GPU of compute capability 9.0" in err


@pytest.mark.skipif(not common.INTERPRETED, reason="the interpreter's refusal")
def test_set_pdl_refused_by_the_interpreter():
    with pytest.raises(ValueError, match="not Triton's interpreter"):
        common.set_pdl(True)
    common.set_pdl(False)
    assert common.pdl() == dict(USE_GDC=False)
    common.set_pdl(None)


def decode_layer(x, w, cache_k, cache_v, mask, slot):
    """One batch-1 decode layer through moebench's kernels, each reading the one before: norm + QKV + RoPE, the cache
    write (a torch kernel between them), flash decoding, o_proj + residual, norm, router, experts + residual, and an
    LM-head-like product."""
    from moebench.kernels.flash_decoding import flash_decode
    from moebench.kernels.qkv import qkv_rope
    from moebench.kernels.rmsnorm import rms_norm
    from moebench.kernels.router import moe_router

    H, HKV, HD = 32, 4, 128
    q, k, v = qkv_rope(x, w["in_norm"], w["qkv"], None, w["q_norm"], w["k_norm"], w["cos"], w["sin"], H, HKV, 1e-6)
    cache_k[0, :, slot] = k[0]
    cache_v[0, :, slot] = v[0]
    o = flash_decode(q.view(1, 1, H, HD).transpose(1, 2), cache_k, cache_v, mask, HD**-0.5)
    h = linear.linear(o.transpose(1, 2).reshape(1, H * HD), w["o"], None, x)
    n = rms_norm(h, w["post_norm"], 1e-6)
    ids, weights = moe_router(n, w["gate"], 8, True)
    out = fused_moe.fused_moe(n, w["gate_up"], w["down"], ids, weights, h)
    return out, linear.linear(out, w["lm"])


@pytest.mark.skipif(not HOPPER, reason="needs an NVIDIA GPU of compute capability 9.0 or later")
@pytest.mark.parametrize("variant", ["defaults", "split-K rows, summed down"])
def test_decode_chain_bit_equal_with_pdl(variant, monkeypatch):
    if variant != "defaults":
        monkeypatch.setattr(linear, "_tiles", lambda M, N, K: dict(BM=1, BN=8, BK=256, SPLIT_K=1024, num_warps=4))
        tiles = fused_moe._tiles
        monkeypatch.setattr(fused_moe, "_tiles", lambda N, E: tiles(N, E) | dict(
            down=dict(BN=8, BK=128, num_warps=8, SUM_K=True)))
    D, H, HKV, HD, E, I, S, V = 2048, 32, 4, 128, 16, 768, 640, 4096
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, scale=0.02):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(torch.bfloat16)

    w = dict(in_norm=randn(D, scale=1.0), qkv=randn((H + 2 * HKV) * HD, D), q_norm=randn(HD, scale=1.0),
             k_norm=randn(HD, scale=1.0), cos=randn(1, HD, scale=1.0), sin=randn(1, HD, scale=1.0), o=randn(D, H * HD),
             post_norm=randn(D, scale=1.0), gate=randn(E, D), gate_up=randn(E, 2 * I, D), down=randn(E, D, I),
             lm=randn(V, D))
    x = randn(1, D, scale=1.0)
    mask = torch.zeros(1, 1, 1, S, dtype=torch.bool, device="cuda")
    mask[..., :401] = True
    caches = randn(1, HKV, S, HD, scale=1.0), randn(1, HKV, S, HD, scale=1.0)
    outputs = {}
    for on in (False, True):
        cache_k, cache_v = (c.clone() for c in caches)
        common.set_pdl(on)
        try:
            decode_layer(x, w, cache_k.clone(), cache_v.clone(), mask, 400)  # compiles, outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out, logits = decode_layer(x, w, cache_k, cache_v, mask, 400)
        finally:
            common.set_pdl(None)
        graph.replay()
        graph.replay()
        torch.cuda.synchronize()
        outputs[on] = (out.clone(), logits.clone(), cache_k.clone())
    for a, b in zip(outputs[False], outputs[True]):
        assert torch.equal(a, b)
