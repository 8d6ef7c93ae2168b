"""Micro-benchmark of moebench's Triton kernels on an NVIDIA GPU at Qwen3-30B-A3B's shapes, batch-1 decode.

For each kernel: median time (triton.testing.do_bench, CUDA-graph free, L2 flushed between runs), the bytes it must
read and write, the achieved GB/s, and the same for the plain torch path it replaces, side by side with the ratio.

    python bench/gpu_kernels.py [--out results.json] [--cache-len 640]

Needs a CUDA GPU (exits 2 with one line without one); scripts/gpu_check.sh runs it after the kernel tests.
"""

import argparse
import json
import sys

import torch
import torch.nn.functional as F

# Qwen3-30B-A3B: hidden 2048, 32 query / 4 key-value heads of 128, 128 experts of 768, top 8, vocab 151936.
D, H, HKV, HD, E, K, I, V = 2048, 32, 4, 128, 128, 8, 768, 151936


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3  # µs


def row(name: str, nbytes: int, ours, theirs, results: list) -> None:
    ours_us, theirs_us = bench(ours), bench(theirs)
    r = dict(kernel=name, bytes=nbytes, triton_us=ours_us, triton_gbs=nbytes / ours_us / 1e3, torch_us=theirs_us,
             torch_gbs=nbytes / theirs_us / 1e3, speedup=theirs_us / ours_us)
    results.append(r)
    print(f"{name:<34} {ours_us:9.1f} µs {r['triton_gbs']:8.0f} GB/s | torch {theirs_us:9.1f} µs "
          f"{r['torch_gbs']:8.0f} GB/s | {r['speedup']:5.2f}x", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--cache-len", type=int, default=640, help="KV-cache length for decode attention (default 640)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu_kernels.py: no CUDA GPU here; the kernels' CPU checks are the tests (pytest)",
              file=sys.stderr)
        return 2

    from moebench.kernels.attention import attention
    from moebench.kernels.flash_decoding import flash_decode
    from moebench.kernels.fused_moe import fused_moe
    from moebench.kernels.linear import linear
    from moebench.kernels.qkv import qkv_rope
    from moebench.kernels.quantized_moe import quantize_weights, quantized_moe
    from moebench.kernels.router import moe_router
    from moebench.model.moe import experts_forward, route

    dev, dt, S = "cuda", torch.bfloat16, args.cache_len
    g = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(dt)

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  bf16, batch 1, one token; "
          f"cache {S}", flush=True)
    results: list = []
    x = randn(1, D)
    w_gate, w_gate_up, w_down = randn(E, D, scale=D**-0.5), randn(E, 2 * I, D, scale=D**-0.5), randn(E, D, I,
                                                                                                    scale=I**-0.5)
    ids, weights = moe_router(x, w_gate, K, True)
    expert_bytes = K * 3 * D * I * 2
    row("router (T=1)", E * D * 2, lambda: moe_router(x, w_gate, K, True),
        lambda: route(F.linear(x, w_gate), K, True), results)
    row("fused MoE experts (T=1)", expert_bytes, lambda: fused_moe(x, w_gate_up, w_down, ids, weights),
        lambda: experts_forward(x, w_gate_up, w_down, ids, weights), results)
    row("MoE layer: router + experts", expert_bytes + E * D * 2,
        lambda: fused_moe(x, w_gate_up, w_down, *moe_router(x, w_gate, K, True)),
        lambda: experts_forward(x, w_gate_up, w_down, *route(F.linear(x, w_gate), K, True)), results)
    (qgu, sgu), (qd, sd) = quantize_weights(w_gate_up, torch.int8), quantize_weights(w_down, torch.int8)
    row("quantized int8 experts (T=1)", expert_bytes // 2,
        lambda: quantized_moe(x, qgu, sgu, qd, sd, ids, weights, 1200.0),
        lambda: experts_forward(x, w_gate_up, w_down, ids, weights), results)

    q, k, v = randn(1, H, 1, HD), randn(1, HKV, S, HD), randn(1, HKV, S, HD)
    mask = torch.ones(1, 1, 1, S, dtype=torch.bool, device=dev)
    kv_bytes = 2 * HKV * S * HD * 2

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=HD**-0.5, enable_gqa=True)

    row(f"flash decoding, split-K (S={S})", kv_bytes, lambda: flash_decode(q, k, v, mask, HD**-0.5), sdpa, results)
    row(f"flash attention kernel (S={S})", kv_bytes, lambda: attention(q, k, v, mask, HD**-0.5), sdpa, results)

    w_qkv, w_o = randn((H + 2 * HKV) * HD, D, scale=D**-0.5), randn(D, H * HD, scale=(H * HD)**-0.5)
    ones, cs = torch.ones(D, dtype=dt, device=dev), randn(1, HD)
    hd_ones = torch.ones(HD, dtype=dt, device=dev)
    row("QKV + norms + RoPE", w_qkv.numel() * 2,
        lambda: qkv_rope(x, ones, w_qkv, None, hd_ones, hd_ones, cs, cs, H, HKV, 1e-6),
        lambda: F.linear(x, w_qkv), results)
    o = randn(1, H * HD)
    row("o_proj + residual", w_o.numel() * 2, lambda: linear(o, w_o, None, x), lambda: x + F.linear(o, w_o), results)
    w_lm = randn(V, D, scale=D**-0.5)
    row("LM head", w_lm.numel() * 2, lambda: linear(x, w_lm), lambda: F.linear(x, w_lm), results)

    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, cache_len=S,
                           results=results), f, indent=2)
        print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
