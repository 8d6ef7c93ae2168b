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

from moebench.kernels import common, flash_decoding, fused_moe, linear, qkv, rmsnorm, router  # noqa: E402

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
    with pytest.raises(ValueError, match="cannot run: Triton's interpreter runs the kernels"):
        common.set_pdl(True)
    common.set_pdl(False)
    assert common.pdl() == dict(USE_GDC=False)
    common.set_pdl(None)


def randn(*shape, seed, dtype=torch.bfloat16, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def linear_case(tiles):
    def run():
        x, w, r = randn(3, 300, seed=1), randn(40, 300, seed=2, scale=0.05), randn(3, 40, seed=3)
        return linear.linear_triton(x, w, None, r), linear.linear_triton(x[:1], w)
    return {linear: tiles}, run


def qkv_case(norm: bool):
    def run():  # D = 96 in slices of 64, 32 deep: a first tile, a loop and a tail in D
        x, w = randn(1, 96, seed=1), randn((2 + 2) * 32, 96, seed=2, scale=0.1)
        hd1, cs = randn(32, seed=3), randn(1, 32, seed=4)
        return qkv.qkv_rope_triton(x, randn(96, seed=5) if norm else None, w, None, hd1, hd1, cs, cs, 2, 1, 1e-6)
    return {qkv: lambda T: dict(SPLIT_D=64, BK=32)}, run


def moe_case(down):
    def run():  # I = 40 in 16-deep steps: a first tile, a loop and a tail
        x, r = randn(1, 48, seed=1), randn(1, 48, seed=2)
        w_gate_up, w_down = randn(6, 80, 48, seed=3, scale=0.2), randn(6, 48, 40, seed=4, scale=0.2)
        ids, weights = torch.tensor([[4, 1, 3]]), randn(1, 3, seed=5).abs()
        return (fused_moe.fused_moe_triton(x, w_gate_up, w_down, ids, weights, r),
                router.moe_router_triton(x, randn(6, 48, seed=6), 2, True)[1])
    return {fused_moe: lambda N, E: dict(BM=1, BN=16, BK=32, down=down),
            router: lambda T, D: dict(SPLIT_D=16, BLOCK_T=1, num_warps=1)}, run


def attention_case():
    def run():
        x, w = randn(2, 48, seed=1), randn(48, seed=2)
        q, k = randn(1, 4, 1, 32, seed=3), randn(1, 2, 150, 32, seed=4)
        mask = torch.ones(1, 1, 1, 150, dtype=torch.bool)
        return rmsnorm.rms_norm_triton(x, w, 1e-6), flash_decoding.flash_decode_triton(q, k, k, mask, 0.2)
    return {}, run


GDC_CASES = {"linear dot": linear_case(None), "linear rows": linear_case(lambda M, N, K: dict(BM=1, BN=16, BK=64)),
             "linear split-K": linear_case(lambda M, N, K: dict(BM=1, BN=16, BK=64, SPLIT_K=128)),
             "qkv split, norm": qkv_case(True), "qkv split, no norm": qkv_case(False),
             "experts own down, router": moe_case(dict(BN=8, BK=16)),
             "experts summed down": moe_case(dict(BN=16, BK=16, SUM_K=True)), "norm, flash decoding": attention_case()}


@pytest.mark.skipif(not common.INTERPRETED, reason="the kernels' USE_GDC paths run under the interpreter here")
@pytest.mark.parametrize("case", list(GDC_CASES))
def test_use_gdc_paths_give_the_same_bits(case, monkeypatch):
    """Each kernel's PDL path (its first tile of weights loaded before the wait, the loop then starting one tile on)
    against its plain path, bit for bit: under the interpreter, whose wait is a no-op, with USE_GDC=True."""
    tiles, run = GDC_CASES[case]
    for module, choose in tiles.items():
        if choose is not None:
            monkeypatch.setattr(module, "_tiles", choose)
    plain = run()
    for module in (linear, qkv, router, fused_moe, rmsnorm, flash_decoding):
        monkeypatch.setattr(module, "pdl", lambda early_reads=True: dict(USE_GDC=True))
    early = run()
    flat = [(a, b) for x, y in zip(plain, early) for a, b in zip(*(t if isinstance(t, tuple) else (t,)
                                                                   for t in (x, y)))]
    assert flat and all(torch.equal(a, b) for a, b in flat)


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
    """Eager (the kernels really overlapping on the stream) and in a CUDA graph replayed for two tokens in turn (a
    kernel reading before its wait what the one before writes would see the other token's data)."""
    if variant != "defaults":
        monkeypatch.setattr(linear, "_tiles", lambda M, N, K: dict(BM=1, BN=8, BK=256, SPLIT_K=1024, num_warps=4))
        tiles = fused_moe._tiles
        monkeypatch.setattr(fused_moe, "_tiles", lambda N, E: tiles(N, E) | dict(
            down=dict(BN=8, BK=128, num_warps=8, SUM_K=True)))
    D, H, HKV, HD, E, I, S, V = 2048, 32, 4, 128, 16, 768, 640, 4096
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, scale=0.02):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(torch.bfloat16)

    w = dict(in_norm=rand(D, scale=1.0), qkv=rand((H + 2 * HKV) * HD, D), q_norm=rand(HD, scale=1.0),
             k_norm=rand(HD, scale=1.0), cos=rand(1, HD, scale=1.0), sin=rand(1, HD, scale=1.0), o=rand(D, H * HD),
             post_norm=rand(D, scale=1.0), gate=rand(E, D), gate_up=rand(E, 2 * I, D), down=rand(E, D, I),
             lm=rand(V, D))
    tokens = [rand(1, D, scale=1.0) for _ in range(2)]
    mask = torch.zeros(1, 1, 1, S, dtype=torch.bool, device="cuda")
    mask[..., :401] = True
    caches = rand(1, HKV, S, HD, scale=1.0), rand(1, HKV, S, HD, scale=1.0)
    outputs = {}
    for on in (False, True):
        x = tokens[0].clone()
        cache_k, cache_v = (c.clone() for c in caches)
        common.set_pdl(on)
        try:
            eager_k = cache_k.clone()
            runs = [(*decode_layer(x, w, eager_k, cache_v.clone(), mask, 400), eager_k)]  # compiles too
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out, logits = decode_layer(x, w, cache_k, cache_v, mask, 400)
        finally:
            common.set_pdl(None)
        for token in tokens:
            x.copy_(token)
            graph.replay()
            torch.cuda.synchronize()
            runs.append((out.clone(), logits.clone(), cache_k.clone()))
        outputs[on] = runs
    assert not torch.equal(outputs[False][1][0], outputs[False][2][0])  # the two tokens differ
    for plain, early in zip(outputs[False], outputs[True]):
        assert all(torch.equal(a, b) for a, b in zip(plain, early))
