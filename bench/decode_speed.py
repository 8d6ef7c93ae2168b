"""Batch-1 decode speed: moebench against Hugging Face transformers on the same checkpoint, in the same run.

Prints tokens/s (prefill excluded) for each engine, their ratio, and each one's share of the memory-read roofline:
bandwidth (the fastest of five matrix-vector reads of a 1 GiB float32 matrix, torch.mv, a compiled multiply-and-sum,
the same with the matrix in huge pages as moebench's weights, oneDNN's product with a packed matrix, and moebench's
own C++ one-row product: the median of measurements between the runs) / bytes read per token, and the median share
run by run against the reads beside each run (the bandwidth switches level within minutes on a shared machine); and
moebench's framework overhead per decode step: the step's time minus the time its kernels compute (profiled).
Runs are interleaved (moebench, transformers, moebench, ...) so machine noise hits both, each after a short untimed
run of the same engine (steady-state decoding, warm caches for both); medians are quoted.

    python bench/decode_speed.py                                   # embedded model and the ~0.3B preset
    python bench/decode_speed.py --models moebench-tiny --dtypes float32 --repeats 3
    python bench/decode_speed.py --cache-len 640                  # as main.py's default request's last bucket
"""

import argparse
import statistics
import time

import torch
import torch._inductor.config as inductor_config

from _common import (DTYPES, MODELS, bandwidth, engines, kernel_seconds, names, out_path, positive_int,
                     write_results)

from moebench.evaluation.benchmark import frozen_gc


def decode_overhead_seconds(engine, prompt, n_tokens, rounds=3) -> tuple[float, float]:
    """(seconds of a decode step outside its computing kernels, the step's seconds): the step's time minus its
    kernels' (profiled). A compiled step is compiled again for this, with Inductor's kernels recorded, and both times
    are taken on that build (recording costs the embedded model's step ~40%, so the timed runs go without it). Timed
    and profiled runs alternate for a few rounds and each side keeps its fastest: one noisy run on a shared machine
    (a neighbour's burst during the profiled one) would otherwise show more kernel time than step time; while they
    still do, more rounds (up to four times as many)."""
    engine.recompile()
    with inductor_config.patch({"cpp.enable_kernel_profile": True}):
        moebench_decode(engine, prompt, 4)  # compiles again
        tok = None

        def step():
            nonlocal tok
            tok = engine.pick(engine.decode(tok))  # (as the timed steps choose)

        steps, kernels = [], []
        while len(steps) < rounds or (min(steps) < min(kernels) and len(steps) < 4 * rounds):  # noise: again
            steps.append(1 / moebench_decode(engine, prompt, n_tokens))
            tok = engine.pick(engine.prefill(prompt, torch.ones_like(prompt)))
            kernels.append(kernel_seconds(step, n_tokens))
        return min(steps) - min(kernels), min(steps)


def moebench_decode(engine, prompt, n_tokens) -> float:
    """Tokens/s of greedy decode steps after the prefill, each token chosen as the harness's timed requests choose
    it (engine.pick)."""
    tok = engine.pick(engine.prefill(prompt, torch.ones_like(prompt)))
    with frozen_gc():  # as the harness times requests
        start = time.perf_counter()
        for _ in range(n_tokens):
            tok = engine.pick(engine.decode(tok))
        return n_tokens / (time.perf_counter() - start)


class _StepClock:
    """A logits processor that only records when each generation step's logits arrive."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def hf_decode(model, prompt, n_tokens) -> float:
    from transformers import LogitsProcessorList

    clock = _StepClock()
    with torch.inference_mode(), frozen_gc():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_tokens + 1,
                       min_new_tokens=n_tokens + 1, do_sample=False, logits_processor=LogitsProcessorList([clock]),
                       pad_token_id=0)
    # times[0] follows the prefill; each later entry follows one decode step.
    return n_tokens / (clock.times[-1] - clock.times[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=names(MODELS), default="moebench-tiny,moebench-speed",
                    help="presets, comma-separated")
    ap.add_argument("--dtypes", type=names(DTYPES), default="float32,bfloat16")
    ap.add_argument("--tokens", type=positive_int, default=64, help="decode steps timed per run")
    ap.add_argument("--repeats", type=positive_int, default=5, help="interleaved runs per engine")
    ap.add_argument("--prompt-len", type=positive_int, default=16)
    ap.add_argument("--cache-len", type=positive_int, default=None,
                    help="moebench's KV cache slots, each attended to by every step (main.py's default request: 640 in "
                         "its last bucket); default prompt-len + tokens + 1, what transformers' cache ends with")
    ap.add_argument("--eager", action="store_true", help="moebench without compiled decode steps")
    ap.add_argument("--out", type=out_path, default="bench/results/decode_speed.json")
    args = ap.parse_args()
    needed = args.prompt_len + args.tokens + 1
    cache_len = args.cache_len or needed
    if cache_len < needed:
        ap.error(f"--cache-len {cache_len} cannot hold {args.prompt_len} prompt tokens and {args.tokens} new ones")

    torch.manual_seed(0)
    rows = []
    print(f"{torch.get_num_threads()} threads", flush=True)
    for name in args.models:
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            source, engine, hf = engines(name, dtype, cache_len, compile=not args.eager)
            prompt = torch.randint(1, 4000, (1, args.prompt_len))
            start = time.perf_counter()
            moebench_decode(engine, prompt, 4)  # warm-up, and compilation of the decode step
            print(f"moebench warm-up (compile included): {time.perf_counter() - start:.1f} s", flush=True)
            hf_decode(hf, prompt, 4)
            # The bandwidth drifts on a shared machine (50-80 GB/s within minutes here): it is measured between the
            # runs, and the roofline takes the median of the measurements.
            a, b, reads = [], [], []
            for _ in range(args.repeats):
                reads.append(bandwidth(repeats=3))
                # Each timed run follows a short untimed one of the same engine: neither starts on caches emptied by
                # the 1 GiB read or by the other engine (the embedded model's first steps after the read take 2-4x).
                moebench_decode(engine, prompt, 4)
                a.append(moebench_decode(engine, prompt, args.tokens))
                hf_decode(hf, prompt, 4)
                b.append(hf_decode(hf, prompt, args.tokens))
            reads.append(bandwidth(repeats=3))
            bw = {key: statistics.median(r[key] for r in reads) for key in reads[0]}
            print(f"memory read, 1 GiB float32 (medians of {len(reads)}): matrix-vector {bw['matvec']:.1f} GB/s, the "
                  f"roofline's (torch.mv {bw['mv']:.1f}, compiled multiply-and-sum {bw['compiled']:.1f}, the same in "
                  f"huge pages {bw.get('compiled_hp', float('nan')):.1f}, oneDNN packed "
                  f"{bw.get('onednn', float('nan')):.1f}, moebench's {bw.get('moebench', float('nan')):.1f}; each "
                  f"run's {min(r['matvec'] for r in reads):.1f}-{max(r['matvec'] for r in reads):.1f}); plain sum "
                  f"{bw['stream']:.1f}", flush=True)
            step_s = 1 / statistics.median(a)
            overhead_s, recorded_step_s = decode_overhead_seconds(engine, prompt, args.tokens)
            bytes_per_token = source.config.active_parameters() * dtype.itemsize
            roofline = bw["matvec"] * 1e9 / bytes_per_token
            row = dict(model=name, dtype=dtype_name, cache_len=cache_len, moebench_tok_s=statistics.median(a),
                       transformers_tok_s=statistics.median(b), moebench_best=max(a), transformers_best=max(b),
                       roofline_tok_s=roofline, bandwidth_gbs=bw["matvec"], mv_gbs=bw["mv"],
                       compiled_mv_gbs=bw["compiled"], compiled_hp_mv_gbs=bw.get("compiled_hp"),
                       onednn_mv_gbs=bw.get("onednn"), moebench_mv_gbs=bw.get("moebench"), stream_gbs=bw["stream"],
                       bandwidth_reads=reads,
                       bytes_per_token=bytes_per_token, step_ms=step_s * 1e3, overhead_ms=overhead_s * 1e3,
                       recorded_step_ms=recorded_step_s * 1e3,
                       hf_experts=getattr(hf.config, "_experts_implementation", "?"))
            row["ratio"] = row["moebench_tok_s"] / row["transformers_tok_s"]
            # Each run against the reads beside it (the higher of the one before and the one after): where the
            # bandwidth switches level between runs, the share the run had at the level it ran at.
            paired = [max(r0["matvec"], r1["matvec"]) * 1e9 / bytes_per_token for r0, r1 in zip(reads, reads[1:])]
            row["moebench_share_by_run"] = statistics.median(t / r for t, r in zip(a, paired))
            row["transformers_share_by_run"] = statistics.median(t / r for t, r in zip(b, paired))
            rows.append(row)
            print(f"{name:15s} {dtype_name:9s} cache {cache_len:4d}  moebench {row['moebench_tok_s']:8.1f} tok/s "
                  f"({row['moebench_tok_s'] / roofline:4.0%} of roofline; run by run "
                  f"{row['moebench_share_by_run']:4.0%})  transformers {row['transformers_tok_s']:7.1f}"
                  f" ({row['transformers_tok_s'] / roofline:4.0%}; {row['transformers_share_by_run']:4.0%})  "
                  f"ratio {row['ratio']:.2f}x  "
                  f"roofline {roofline:.0f} tok/s  framework overhead {overhead_s * 1e3:.2f} of "
                  f"{recorded_step_s * 1e3:.2f} ms/step (a build with its kernels recorded)", flush=True)
            del engine, hf
    shares = [(f"{r['model'].removeprefix('moebench-')} {r['dtype']} cache {r['cache_len']}",
               r["moebench_tok_s"] / r["roofline_tok_s"], r["transformers_tok_s"] / r["roofline_tok_s"]) for r in rows]
    write_results(args.out, dict(rows=rows, machine=f"{torch.get_num_threads()} threads CPU"), shares,
                  f"Batch-1 decode, {torch.get_num_threads()} threads: tokens/s against the memory-read roofline")


if __name__ == "__main__":
    main()
