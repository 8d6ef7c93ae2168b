"""Prefill (context encoding) of a 402-token prompt, the contest's longest: moebench against Hugging Face
transformers on the same checkpoint, in the same run, interleaved; medians, the ratio, and each one's share of the
compute roofline (FLOPs of the prompt / a large matrix product's GFLOP/s: the faster of float32 and the dtype itself,
since either may carry the dtype's products, measured between the runs and the best taken, as the machine's speed
moves within a run). The ratio of the medians, and the median of each round's ratio (the two runs of a round back to
back, so a slow minute slows both).

Both compute the last token's logits only (transformers' `logits_to_keep=1`, as its `generate` does).

    python bench/prefill_speed.py                      # moebench-speed, float32 and bfloat16
    python bench/prefill_speed.py --dtypes bfloat16 --repeats 3
"""

import argparse
import statistics

import torch

from _common import DTYPES, MODELS, engines, gemm_gflops, names, out_path, positive_int, timed, write_results


def prefill_flops(cfg, T: int) -> float:
    """2 x multiply-accumulates of a T-token prompt: the projections and k experts per token, attention's two
    products over the causal triangle, the LM head for the last token."""
    attn = cfg.hidden_size * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * cfg.hidden_size
    mlp = 3 * cfg.hidden_size * cfg.moe_intermediate_size * cfg.num_experts_per_tok + cfg.hidden_size * cfg.num_experts
    scores = 2 * cfg.num_attention_heads * cfg.dim_head * T * (T + 1) / 2
    return 2 * (cfg.num_hidden_layers * (T * (attn + mlp) + scores) + cfg.hidden_size * cfg.vocab_size)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="moebench-speed", choices=MODELS, help="a preset")
    ap.add_argument("--dtypes", type=names(DTYPES), default="float32,bfloat16")
    ap.add_argument("--prompt-len", type=positive_int, default=402)
    ap.add_argument("--repeats", type=positive_int, default=5, help="interleaved runs per engine")
    ap.add_argument("--out", type=out_path, default="bench/results/prefill_speed.json")
    args = ap.parse_args()

    torch.manual_seed(0)
    rows = []
    print(f"{torch.get_num_threads()} threads; prompt {args.prompt_len} tokens", flush=True)
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        source, engine, hf = engines(args.model, dtype, args.prompt_len + 1, compile=False)
        prompt = torch.randint(1, 4000, (1, args.prompt_len))
        mask = torch.ones_like(prompt)

        def ours():
            engine.prefill(prompt, mask)

        @torch.inference_mode()
        def theirs():
            hf(prompt, attention_mask=mask, logits_to_keep=1, use_cache=True)

        a, b, g = [], [], []
        for _ in range(args.repeats):
            a += timed(ours, 1)
            b += timed(theirs, 1)
            g.append(max(gemm_gflops(d, repeats=2) for d in {torch.float32, dtype}))
        gflops = max(g)
        flops = prefill_flops(source.config, args.prompt_len)
        row = dict(model=args.model, dtype=dtype_name, prompt_len=args.prompt_len, moebench_ms=statistics.median(a) * 1e3,
                   transformers_ms=statistics.median(b) * 1e3, moebench_best_ms=min(a) * 1e3,
                   transformers_best_ms=min(b) * 1e3, gemm_gflops=gflops, gflop=flops / 1e9,
                   roofline_ms=flops / gflops / 1e6)
        row["ratio"] = row["transformers_ms"] / row["moebench_ms"]
        # Each round's two runs back to back: their ratio moves less with the machine's speed than the medians do.
        row["paired_ratio"] = statistics.median(t / o for o, t in zip(a, b))
        rows.append(row)
        print(f"{args.model} {dtype_name:9s} moebench {row['moebench_ms']:7.0f} ms ({row['roofline_ms'] / row['moebench_ms']:4.0%}"
              f" of roofline)  transformers {row['transformers_ms']:7.0f} ms "
              f"({row['roofline_ms'] / row['transformers_ms']:4.0%})  ratio {row['ratio']:.2f}x (round by round "
              f"{row['paired_ratio']:.2f}x)  roofline "
              f"{row['roofline_ms']:.0f} ms ({flops / 1e9:.1f} GFLOP at {gflops:.0f} GFLOP/s)", flush=True)
        del engine, hf
    shares = [(f"{r['model'].removeprefix('moebench-')} {r['dtype']} {r['prompt_len']} tokens",
               r["roofline_ms"] / r["moebench_ms"], r["roofline_ms"] / r["transformers_ms"]) for r in rows]
    write_results(args.out, dict(rows=rows, threads=torch.get_num_threads()), shares,
                  f"Prefill, {torch.get_num_threads()} threads: against the compute roofline")


if __name__ == "__main__":
    main()
