"""Micro-benchmark of moebench's Triton kernels on an NVIDIA GPU at Qwen3-30B-A3B's shapes, batch-1 decode.

For each kernel: its time in a CUDA graph as a decode step replays it (no launch overhead; the L2 cache filled with
other data, read, before each call; medians), the bytes it must read and write, the achieved GB/s, and the same for
the plain torch path it replaces, side by side with the ratio.
With --sweep, also the decode-shaped launches of the expert and projection kernels over tile sizes, warps and
pipeline stages (each output checked against the default launch's), the fastest first: what their _tiles should pick;
with --tune FILE, each launch's fastest options written to FILE, which MOEBENCH_TUNED=FILE makes the kernels use on
a GPU of the same name (moebench/kernels/tuning.py).

    python bench/gpu_kernels.py [--out results.json] [--cache-len 640] [--sweep [--tune tuned.json]]

Needs a CUDA GPU (exits 2 with one line without one); scripts/gpu_check.sh runs it first.
"""

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F

from moebench.kernels.tuning import launch_key

# Qwen3-30B-A3B: hidden 2048, 32 query / 4 key-value heads of 128, 128 experts of 768, top 8, vocab 151936.
D, H, HKV, HD, E, K, I, V = 2048, 32, 4, 128, 128, 8, 768, 151936


_flush = None


def bench(fn, n: int = 10) -> float:
    """µs of one call of fn as a decode step makes it: replayed in a CUDA graph (no launch overhead), with the L2
    cache holding none of its data: before each call a 256 MB buffer is read (a sum), so the cache is full of clean
    lines, as a decode step's streamed weights leave it. (Zeroing the buffer, as triton.testing.do_bench does, leaves
    the cache full of dirty lines whose write-back then halves a small memory-bound call's read bandwidth.) The graph
    of n (emptying, call) pairs is timed against the graph of the n emptyings alone (medians of 15 replays each);
    the difference, / n."""
    global _flush
    if _flush is None:
        _flush = torch.zeros(256 * 2**20, dtype=torch.int8, device="cuda")  # 4x the L2 cache
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles, and the allocator's first blocks, outside the capture
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)

    def replay_ms(with_fn: bool) -> float:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(n):
                _flush.sum()
                if with_fn:
                    fn()
        times = []
        for _ in range(15):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    return (replay_ms(True) - replay_ms(False)) * 1e3 / n


# Launch options tried by --sweep (~1 s of compilation each; 127 of them took ~150 s on an H200): the tl.dot
# kernels' tiles, warps and stages, and for the projections also BM = 1, their kernel without tl.dot (one row a
# program).
DOT_TILES = [dict(BM=16, BN=bn, BK=bk, num_warps=w, num_stages=st) for bn in (32, 64, 128) for bk in (64, 128, 256)
             for w, st in ((4, 3), (4, 5), (8, 4))]
ROW_TILES = [dict(BM=1, BN=bn, BK=bk, num_warps=w) for bn in (8, 16, 32) for bk in (256, 512) for w in (4, 8)]
# The experts: the sorted kernels' decode tile (every sorted tile took 83-94 µs on the H200, the pair kernels 33-68),
# the pair gate/up kernel's tiles (the down kernel keeps its default), the down kernel's, and the down kernel summing
# each token's k experts itself.
PAIR_TILES = [dict(BM=1, BN=bn, BK=bk, num_warps=w) for bn in (4, 8, 16) for bk in (128, 256) for w in (4, 8)]
EXPERT_TILES = ([dict(BM=16, BN=32, BK=64, num_warps=4, num_stages=5, down=None)] + PAIR_TILES
                + [dict(down=dict(BN=bn, BK=bk, num_warps=w)) for bn in (8, 16, 32) for bk in (128, 256)
                   for w in (4, 8)]
                + [dict(down=dict(BN=bn, BK=bk, num_warps=w, SUM_K=True)) for bn in (2, 4, 8) for bk in (64, 128)
                   for w in (4, 8)])


def sweep(name: str, module, call, nbytes: int, choices: list) -> list:
    """Times call() with each choice merged into module._tiles' answer (a None value leaves its key out); each output
    must match the default launch's (within 2% of its largest value: other tiles sum in another order). Each row
    names its launch (moebench.kernels.tuning.launch_key: the module and its _tiles arguments) and the whole options
    it ran with. Fastest first."""
    default = module._tiles
    seen = {}

    def tiles_with(opts: dict):
        def _tiles(*shape):
            seen.update(launch=launch_key(module.__name__.rsplit(".", 1)[-1], shape),
                        run={key: v for key, v in (default(*shape) | opts).items() if v is not None})
            return dict(seen["run"])
        return _tiles

    rows, expected = [], None
    try:
        for opts in [{}] + choices:  # {}: the default
            module._tiles = tiles_with(opts)
            entry = dict(options=opts or "default")
            try:
                out = call().float()
                expected = out if expected is None else expected
                err = (out - expected).abs().max().item()
                if err > 0.02 * expected.abs().max().item():
                    rows.append(entry | dict(error=f"output off by {err:.3g}"))
                    continue
                rows.append(entry | dict(us=bench(call), launch=seen["launch"], run=seen["run"]))
            except Exception as e:  # a choice this GPU or Triton rejects (shared memory, say): said, the rest run
                if expected is None:
                    raise
                rows.append(entry | dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"))
    finally:
        module._tiles = default
    timed = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
    for r in timed[:5]:
        print(f"  sweep {name:<28} {r['us']:8.1f} µs {nbytes / r['us'] / 1e3:7.0f} GB/s  {r['options']}", flush=True)
    failed = [r for r in rows if "error" in r]
    if failed:
        print(f"  sweep {name}: {len(failed)} choices failed, e.g. {failed[0]}", flush=True)
    return timed + failed


def fastest(sweeps: dict) -> dict:
    """Each swept launch's fastest options, by launch key: a tuned file's `launches`."""
    return {rows[0]["launch"]: rows[0]["run"] for rows in sweeps.values() if rows and "us" in rows[0]}


def eager_bench(fn) -> float:
    """µs of one call of fn launched from Python (launch overhead included), L2 emptied between calls."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


def row(name: str, nbytes: int, ours, theirs, results: list, theirs_in_graph: bool = True) -> None:
    """One kernel against the torch path it replaces; a torch path that reads a value back to the host (the
    experts' loop over the chosen ids) cannot be captured in a graph: it is timed as launched, and marked so."""
    try:
        ours_us = bench(ours)
        theirs_us = bench(theirs) if theirs_in_graph else eager_bench(theirs)
    except Exception as e:  # one that cannot be captured (it waits for the device): said, the other rows run
        print(f"{name:<34} not timed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
        torch.cuda.synchronize()
        return
    r = dict(kernel=name, bytes=nbytes, triton_us=ours_us, triton_gbs=nbytes / ours_us / 1e3, torch_us=theirs_us,
             torch_gbs=nbytes / theirs_us / 1e3, speedup=theirs_us / ours_us, torch_in_graph=theirs_in_graph)
    results.append(r)
    print(f"{name:<34} {ours_us:9.1f} µs {r['triton_gbs']:8.0f} GB/s | torch {theirs_us:9.1f} µs "
          f"{r['torch_gbs']:8.0f} GB/s{'' if theirs_in_graph else ' (launched)'} | {r['speedup']:5.2f}x", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--cache-len", type=int, default=640, help="KV-cache length for decode attention (default 640)")
    p.add_argument("--sweep", action="store_true", help="also time the decode launches over tiles, warps and stages")
    p.add_argument("--tune", metavar="FILE", help="with --sweep: write each launch's fastest options to FILE, for "
                   "MOEBENCH_TUNED=FILE (moebench/kernels/tuning.py)")
    args = p.parse_args()
    if args.tune and not args.sweep:
        p.error("--tune needs --sweep")
    if not torch.cuda.is_available():
        print("bench/gpu_kernels.py: no CUDA GPU here; the kernels' CPU checks are the tests (pytest)",
              file=sys.stderr)
        return 2

    import triton

    from moebench.kernels import fused_moe as fused_moe_module
    from moebench.kernels import linear as linear_module
    from moebench.kernels import qkv as qkv_module
    from moebench.kernels import router as router_module
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
        lambda: experts_forward(x, w_gate_up, w_down, ids, weights), results, False)
    row("MoE layer: router + experts", expert_bytes + E * D * 2,
        lambda: fused_moe(x, w_gate_up, w_down, *moe_router(x, w_gate, K, True)),
        lambda: experts_forward(x, w_gate_up, w_down, *route(F.linear(x, w_gate), K, True)), results, False)
    (qgu, sgu), (qd, sd) = quantize_weights(w_gate_up, torch.int8), quantize_weights(w_down, torch.int8)
    row("quantized int8 experts (T=1)", expert_bytes // 2,
        lambda: quantized_moe(x, qgu, sgu, qd, sd, ids, weights, 1200.0),
        lambda: experts_forward(x, w_gate_up, w_down, ids, weights), results, False)

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

    sweeps = {}

    def save():  # after each part: a run cut short keeps what it measured
        device = torch.cuda.get_device_name()
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(device=device, torch=torch.__version__, cache_len=S, results=results, sweeps=sweeps),
                          f, indent=2)
        if args.tune:
            with open(args.tune, "w") as f:
                json.dump(dict(device=device, torch=torch.__version__, triton=triton.__version__,
                               launches=fastest(sweeps)), f, indent=2)

    save()
    if args.sweep:
        projection = [t for t in DOT_TILES if t["num_stages"] != 5] + ROW_TILES
        split_k = [dict(BM=1, BN=bn, BK=bk, SPLIT_K=sk, num_warps=w) for bn in (8, 16)
                   for sk, bk in ((512, 256), (1024, 256), (1024, 512)) for w in (4, 8)]  # o_proj: 64 column blocks
        for name, module, call, nbytes, choices in [
            ("fused MoE experts (T=1)", fused_moe_module, lambda: fused_moe(x, w_gate_up, w_down, ids, weights),
             expert_bytes, EXPERT_TILES),
            ("router (T=1)", router_module, lambda: moe_router(x, w_gate, K, True)[1], E * D * 2,
             [dict(SPLIT_D=0, BLOCK_T=None, num_warps=None)]  # one pass, tl.dot: Triton's warps
             + [dict(SPLIT_D=sd, BLOCK_T=bt, num_warps=w) for sd in (16, 32, 64)
                for bt, w in ((1, 1), (1, 2), (16, 4))]),
            ("QKV + norms + RoPE", qkv_module,
             lambda: qkv_rope(x, ones, w_qkv, None, hd_ones, hd_ones, cs, cs, H, HKV, 1e-6)[0], w_qkv.numel() * 2,
             [dict(SPLIT_D=None, BT=16, BK=128, num_warps=8, num_stages=4)]  # one program per head: its best
             + [dict(SPLIT_D=sd, BK=bk, num_warps=w) for sd, bk in ((128, 128), (256, 128), (256, 256), (512, 128),
                                                                    (512, 256)) for w in (2, 4, 8)]),  # split over D
            ("o_proj + residual", linear_module, lambda: linear(o, w_o, None, x), w_o.numel() * 2,
             projection + split_k),
            ("LM head", linear_module, lambda: linear(x, w_lm), w_lm.numel() * 2, projection),
        ]:
            sweeps[name] = sweep(name, module, call, nbytes, choices)
            save()
    if args.out:
        print(f"results: {args.out}")
    if args.tune:
        print(f"tuned launch options ({len(fastest(sweeps))}): {args.tune}; use them with MOEBENCH_TUNED={args.tune}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
