"""Batch-1 decode at Qwen3-30B-A3B's dimensions on an NVIDIA GPU: moebench against Hugging Face transformers.

Random bfloat16 weights (no download), made directly on the GPU. In one run it prints and writes (the JSON after
each part, so that a run cut short keeps what it measured):
  - the GPU's read bandwidth now (a large copy) and the decode roofline: bytes read per token / bandwidth;
  - with fewer layers of the same shapes (--hf-layers): the kernels' engine (compiled, CUDA graphs) against the
    plain torch model of the same weights (prefill logits, greedy tokens), then its tokens/s against transformers'
    (batched_mm, its best experts backend for batch 1, and grouped_mm): both at full size do not fit one GPU;
  - at full size (48 layers): the fused MoE layer (router + k experts, one token) in µs, replayed in a CUDA graph,
    against the roofline of its bytes; decode tokens/s (the whole step in one CUDA graph per bucket) and its share
    of the roofline; the kernels of one decode step (torch.profiler: launches and µs per step, longest first, and
    their sum against the step's time); the contest-shaped request: 402 prompt tokens, 640 in all, end to end
    (prefill + 238 decode steps), in ms;
  - on compute capability 9.0 and later, the same model's decode captured again with programmatic dependent launch
    switched the other way (MOEBENCH_PDL, moebench/kernels/common.py): logits compared, then decode tokens/s, the
    request and the MoE layer with it on and off, measured in turns.

    python bench/gpu_decode.py --out gpu_decode.json
    python bench/gpu_decode.py --device cpu --layers 2 --hf-layers 1 --small   # smoke run of the script itself

With MOEBENCH_TUNED=FILE (written by bench/gpu_kernels.py --sweep --tune FILE on this GPU) the kernels launch with
that file's options; scripts/gpu_check.sh runs it so. Without a GPU (and without --device cpu) it exits 2 with one
line.
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import torch
from torch._dynamo.utils import counters

from moebench.engine.generator import Engine
from moebench.kernels import common, tuning
from moebench.model.loader import rope_on
from moebench.model.presets import PRESETS
from moebench.model.qwen3_moe import KERNEL_BLOCKS, ModelOptions, Qwen3MoeForCausalLM

QUANTIZED = {"quantized_moe", "rms_norm_quantize"}


def random_model(cfg, options: ModelOptions, device, seed: int = 0) -> Qwen3MoeForCausalLM:
    """The model with normal(0, 0.02) weights made in place on `device` (a 30B model never passes through RAM)."""
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(cfg, options)
    g = torch.Generator(device=device).manual_seed(seed)
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if name == "weight" and p.dim() == 1:  # RMSNorm
                t = torch.ones(p.shape, dtype=torch.bfloat16, device=device)
            else:
                t = (torch.randn(p.shape, generator=g, device=device, dtype=torch.bfloat16) * 0.02)
            setattr(module, name, torch.nn.Parameter(t, requires_grad=False))
    return rope_on(model.eval(), device)  # (its decode steps compile before any prefill ran)


def hf_model(cfg, device, experts: str):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM as HFModel

    hf_cfg = Qwen3MoeConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "model_type")})
    with torch.device(device):
        model = HFModel._from_config(hf_cfg, dtype=torch.bfloat16, experts_implementation=experts)
    return model.eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def read_bandwidth(device) -> float:
    """GB/s of a 4 GiB device-to-device copy now, counting what is read and what is written."""
    if device.type != "cuda":
        return float("nan")
    a = torch.empty(2**31, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    times = []
    for _ in range(6):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    return 2 * 2**32 / statistics.median(times[1:]) / 1e9


def decode_rate(engine, prompt, steps: int, device) -> float:
    """Tokens/s of greedy decode steps after the prefill."""
    tok = engine.prefill(prompt, torch.ones_like(prompt)).argmax(-1)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        tok = engine.decode(tok).argmax(-1)
    sync(device)
    return steps / (time.perf_counter() - start)


def request_ms(engine, prompt, new_tokens: int, device) -> float:
    """End-to-end ms of prefill + greedy decoding of new_tokens tokens (no logits kept, as the benchmark times)."""
    sync(device)
    start = time.perf_counter()
    engine.generate(prompt, torch.ones_like(prompt), new_tokens, min_new_tokens=new_tokens)
    sync(device)
    return (time.perf_counter() - start) * 1e3


def agreement(engine, reference, prompt, new_tokens: int) -> dict:
    """How the kernels' engine (compiled, CUDA graphs) agrees with the plain torch model of the same weights, eager:
    the prefill logits' largest difference against the largest logit, and the greedy tokens that match."""
    ours, ours_logits = engine.greedy(prompt, torch.ones_like(prompt), new_tokens)
    theirs, theirs_logits = reference.greedy(prompt, torch.ones_like(prompt), new_tokens)
    scale = theirs_logits[0].abs().max().item()
    same = (ours == theirs).float().cumprod(1).sum().item()  # tokens equal before the first difference
    return dict(prefill_max_diff=(ours_logits[0] - theirs_logits[0]).abs().max().item(), logit_scale=scale,
                tokens_equal_before_first_difference=int(same), tokens=new_tokens)


def hf_rate(model, prompt, steps: int, device) -> float:
    """Tokens/s of transformers' generate after its prefill (the prefill's time is measured and taken out)."""
    def run(n):
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
        sync(device)
        return time.perf_counter() - start

    run(2)
    one, many = statistics.median(run(1) for _ in range(3)), statistics.median(run(steps + 1) for _ in range(3))
    return steps / (many - one)


def moe_layer_us(engine, device) -> float:
    """µs of the first layer's MoE block (router + experts + combine) on one token, replayed in a CUDA graph."""
    layer = engine.model.model.layers[0]
    x = torch.randn(1, 1, engine.cfg.hidden_size, dtype=torch.bfloat16, device=device)
    if device.type != "cuda":
        return float("nan")
    with torch.inference_mode():
        for _ in range(3):
            layer.mlp(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(20):
                layer.mlp(x)
        times = []
        for _ in range(20):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / 20)
    return statistics.median(times)


def step_kernels(engine, prompt, steps: int, device) -> list[dict]:
    """The device kernels of a decode step, by torch.profiler over `steps` greedy steps after the prefill: per kernel
    name its launches and µs per step, longest first (CUDA graph replays included: CUPTI sees their kernels)."""
    from torch.profiler import ProfilerActivity, profile

    tok = engine.prefill(prompt, torch.ones_like(prompt)).argmax(-1)
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    sync(device)
    with profile(activities=[activity]) as prof:
        for _ in range(steps):
            tok = engine.decode(tok).argmax(-1)
        sync(device)
    rows = []
    for ev in prof.key_averages():
        if device.type == "cuda" and ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = ev.device_time_total if device.type == "cuda" else ev.self_cpu_time_total
        rows.append(dict(kernel=ev.key, launches_per_step=ev.count / steps, us_per_step=us / steps))
    return sorted(rows, key=lambda r: -r["us_per_step"])


def pdl_side_by_side(engine, prompt, args, device, say, out: dict, save) -> None:
    """The same model's decode captured a second time with programmatic dependent launch switched the other way
    (moebench/kernels/common.py): its logits against the first engine's (16 greedy steps), the fused MoE layer, and
    tokens/s and the contest-shaped request of both, measured in turns; into `out`, saved after each part."""
    first = common.pdl_on()
    engines = {first: engine}
    common.set_pdl(not first)
    try:
        engines[not first] = other = Engine(engine.model, batch=1, max_len=args.seq_len, compile=True,
                                            tkg_buckets=(args.seq_len,), cuda_graphs=True)
        step = other.example_step("token_generation_model", args.seq_len)
        with torch.inference_mode():  # eager first: Triton compiles and loads these launches outside any capture
            other.step_function("token_generation_model")(*step)
        other.warm_decode(args.seq_len)  # (the engines share one compiled step: this one's graph is recorded now)
        moe_us = {not first: moe_layer_us(other, device)}
    finally:
        common.set_pdl(None)
    moe_us[first] = moe_layer_us(engine, device)

    def run(on: bool, fn, *fn_args):  # eager launches (the prefill) with the engine's own setting too
        common.set_pdl(on)
        try:
            return fn(engines[on], *fn_args)
        finally:
            common.set_pdl(None)

    tokens = {on: run(on, Engine.greedy, prompt, torch.ones_like(prompt), 16) for on in (False, True)}
    diff = (tokens[True][1] - tokens[False][1]).abs().max().item()
    same = int((tokens[True][0] == tokens[False][0]).float().cumprod(1).sum().item())
    out.update(first_engine_pdl=first, logits_max_diff=diff, tokens_equal_before_first_difference=same,
               moe_layer_us_on=moe_us[True], moe_layer_us_off=moe_us[False])
    save()
    say(f"PDL on against off, same weights, 16 greedy steps: logits differ by at most {diff:.3g}; tokens equal for "
        f"{same} of 16; fused MoE layer {moe_us[True]:.1f} against {moe_us[False]:.1f} µs")
    rates, e2e = {False: [], True: []}, {False: [], True: []}
    new_tokens = args.seq_len - args.prompt_len
    for _ in range(min(args.repeats, 3)):  # in turns: the GPU's clocks and neighbours drift alike for both
        for on in (False, True):
            run(on, lambda e: decode_rate(e, prompt, 2, device))  # untimed: a graph replayed again after a switch
            rates[on].append(run(on, lambda e: decode_rate(e, prompt, args.steps, device)))
            e2e[on].append(run(on, lambda e: request_ms(e, prompt, new_tokens, device)))
            key = "on" if on else "off"
            out.update({f"decode_tok_s_{key}": statistics.median(rates[on]),
                        f"request_ms_{key}": statistics.median(e2e[on]), f"rounds_{key}": len(rates[on])})
            save()
    say(f"PDL on / off: decode {out['decode_tok_s_on']:.0f} / {out['decode_tok_s_off']:.0f} tok/s "
        f"({out['decode_tok_s_on'] / out['decode_tok_s_off']:.3f}x); request {out['request_ms_on']:.0f} / "
        f"{out['request_ms_off']:.0f} ms")
    kernels = run(True, lambda e: step_kernels(e, prompt, 8, device))  # with PDL, kernels overlap their neighbours
    out["step_kernels_on"] = kernels
    save()
    say(f"one decode step with PDL: {sum(r['launches_per_step'] for r in kernels):.0f} kernel launches, "
        f"{sum(r['us_per_step'] for r in kernels):.0f} µs of kernels; the longest: " + ", ".join(
            f"{r['kernel'][:40]} {r['us_per_step']:.0f} µs" for r in kernels[:6]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=48, help="decoder layers of the full-size runs")
    ap.add_argument("--hf-layers", type=int, default=8,
                    help="layers of the side-by-side run with transformers (0: no side-by-side part)")
    ap.add_argument("--small", action="store_true", help="shrink every dimension (a smoke run on the CPU)")
    ap.add_argument("--prompt-len", type=int, default=402)
    ap.add_argument("--seq-len", type=int, default=640)
    ap.add_argument("--steps", type=int, default=128, help="decode steps timed per run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", help="write the results as JSON here (after each part, so a run cut short keeps them)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/gpu_decode.py: no CUDA GPU here (--device cpu --small runs the script on the CPU)",
              file=sys.stderr)
        return 2
    if args.prompt_len + args.steps >= args.seq_len:
        ap.error(f"--prompt-len {args.prompt_len} + --steps {args.steps} must stay below --seq-len {args.seq_len}")
    cfg = dataclasses.replace(PRESETS["qwen3-30b-a3b"], num_hidden_layers=args.layers)
    if args.small:
        cfg = dataclasses.replace(cfg, vocab_size=4096, hidden_size=256, moe_intermediate_size=64, num_experts=16,
                                  num_experts_per_tok=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    on_gpu = device.type == "cuda"
    kernels = frozenset(set(KERNEL_BLOCKS) - QUANTIZED) if on_gpu else frozenset()  # CPU: the interpreter is slow
    options = ModelOptions(fused_qkv=True, kernels=kernels)
    name = torch.cuda.get_device_name() if on_gpu else "cpu"
    began = time.perf_counter()

    def say(line: str) -> None:
        print(f"[{time.perf_counter() - began:5.0f} s] {line}", flush=True)

    say(f"device: {name}  torch {torch.__version__}  bfloat16, batch 1, {cfg.num_hidden_layers} layers")
    bw = read_bandwidth(device)
    bytes_per_token = cfg.active_parameters() * 2
    roofline = bw * 1e9 / bytes_per_token
    result = dict(device=name, torch=torch.__version__, layers=cfg.num_hidden_layers, bandwidth_gbs=bw,
                  bytes_per_token=bytes_per_token, roofline_tok_s=roofline, kernels=sorted(kernels),
                  tuned=os.environ.get(tuning.ENV))

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)

    save()
    say(f"read bandwidth {bw:.0f} GB/s; {bytes_per_token / 1e9:.3f} GB per token; roofline {roofline:.0f} tok/s")
    if result["tuned"]:
        say(f"{tuning.ENV}={result['tuned']}: {len(tuning._table())} tuned launches in use, built-in defaults for "
            f"the rest")
    torch.manual_seed(0)
    prompt = torch.randint(1, cfg.vocab_size, (1, args.prompt_len), device=device)
    # One bucket, the whole cache: a decode step reads ~6 GB of weights and 1.3 MB of KV cache a layer at most, so
    # smaller buckets would save nothing measurable and cost a compilation each (minutes of a short lease).
    buckets = (args.seq_len,)
    short = prompt[:, :16]
    failed = 0

    # 1. Fewer layers of the same shapes: the kernels against plain torch on the same weights, then the speed
    #    against transformers (both fit one GPU at once).
    if args.hf_layers:
        try:
            small = dataclasses.replace(cfg, num_hidden_layers=args.hf_layers)
            engine = Engine(random_model(small, options, device), batch=1, max_len=args.seq_len, compile=True,
                            tkg_buckets=buckets, cuda_graphs=True)
            plain_options = dataclasses.replace(options, kernels=frozenset())  # the same parameters, drawn alike
            plain = Engine(random_model(small, plain_options, device), batch=1, max_len=args.seq_len)
            check = agreement(engine, plain, prompt, 16)
            del plain
            result["agreement"] = check
            say(f"{args.hf_layers} layers, kernels (compiled, CUDA graphs) against plain torch (eager), same weights: "
                f"prefill logits differ by at most {check['prefill_max_diff']:.3g} (largest logit "
                f"{check['logit_scale']:.3g}); greedy tokens equal for {check['tokens_equal_before_first_difference']} "
                f"of {check['tokens']}")
            decode_rate(engine, short, 4, device)
            ours = statistics.median(decode_rate(engine, short, args.steps, device) for _ in range(args.repeats))
            side = result["side_by_side"] = dict(layers=args.hf_layers, moebench_tok_s=ours)
            say(f"{args.hf_layers} layers: moebench {ours:.0f} tok/s")
            del engine
            save()
            for experts in ("batched_mm", "grouped_mm"):
                try:
                    hf = hf_model(small, device, experts)
                    rate = hf_rate(hf, short, args.steps, device)
                    del hf
                except Exception as e:  # a backend this transformers or GPU lacks: said, and the others still run
                    say(f"transformers {experts}: not run ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
                    continue
                side[f"transformers_{experts}_tok_s"] = rate
                say(f"{args.hf_layers} layers: transformers ({experts}) {rate:.0f} tok/s; moebench / it = "
                    f"{ours / rate:.2f}x")
                save()
        except Exception as e:  # said, and the full-size part still runs
            failed += 1
            say(f"side-by-side part failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
    if on_gpu:
        torch.cuda.empty_cache()

    # 2. Full size: the fused MoE layer, decode tokens/s and the contest-shaped request.
    engine = None
    try:
        model = random_model(cfg, options, device)
        engine = Engine(model, batch=1, max_len=args.seq_len, compile=True, tkg_buckets=buckets, cuda_graphs=True)
        start = time.perf_counter()
        for b in buckets:
            engine.warm_decode(b)
        result["compile_s"] = time.perf_counter() - start
        skips = dict(counters["inductor"]).get("cudagraph_skips", 0)  # a graph Inductor could not capture runs bare
        result["cudagraph_skips"] = skips
        say(f"compiled {len(buckets)} decode bucket(s) {buckets} in {result['compile_s']:.0f} s; CUDA graphs "
            f"skipped: {skips}")
        try:
            moe_us = moe_layer_us(engine, device)
        except Exception as e:  # a kernel that cannot be captured: said, and the rest still runs
            say(f"fused MoE layer: not timed ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
            moe_us = float("nan")
        moe_bytes = (cfg.num_experts_per_tok * 3 * cfg.moe_intermediate_size + cfg.num_experts) * cfg.hidden_size * 2
        result.update(moe_layer_us=moe_us, moe_layer_bytes=moe_bytes, moe_layer_roofline_us=moe_bytes / bw / 1e3)
        say(f"fused MoE layer (router + {cfg.num_experts_per_tok} experts, one token): {moe_us:.1f} µs; roofline "
            f"{moe_bytes / bw / 1e3:.1f} µs")
        save()
        decode_rate(engine, prompt, 4, device)
        rates = [decode_rate(engine, prompt, args.steps, device) for _ in range(args.repeats)]
        result.update(decode_tok_s=statistics.median(rates), decode_best_tok_s=max(rates),
                      decode_share_of_roofline=statistics.median(rates) / roofline)
        say(f"moebench decode, {cfg.num_hidden_layers} layers, {args.prompt_len}-token prompt: "
            f"{statistics.median(rates):.0f} tok/s ({statistics.median(rates) / roofline:.0%} of the roofline)")
        save()
        try:  # where a step's time goes: its kernels, and the gaps between them
            kernels = step_kernels(engine, prompt, 8, device)
            step_us = 1e6 / statistics.median(rates)
            busy = sum(r["us_per_step"] for r in kernels)
            result.update(step_us=step_us, kernels_us_per_step=busy, step_kernels=kernels)
            say(f"one decode step: {sum(r['launches_per_step'] for r in kernels):.0f} kernel launches, {busy:.0f} µs "
                f"of kernels in a {step_us:.0f} µs step; the longest:")
            for r in kernels[:14]:
                print(f"    {r['us_per_step']:8.1f} µs {r['launches_per_step']:5.0f} x  {r['kernel'][:90]}", flush=True)
            save()
        except Exception as e:  # a profiler this build lacks: said, and the request is still timed
            say(f"decode step not profiled ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})")
        new_tokens = args.seq_len - args.prompt_len
        e2e = [request_ms(engine, prompt, new_tokens, device) for _ in range(args.repeats)]
        result.update(request_ms=statistics.median(e2e), request_best_ms=min(e2e))
        say(f"contest-shaped request ({args.prompt_len} prompt + {new_tokens} new tokens): "
            f"{statistics.median(e2e):.0f} ms")
        save()
    except Exception as e:
        failed += 1
        say(f"full-size part failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
    if engine is not None and on_gpu and common.unable_to_pdl() is None:
        try:
            result["pdl"] = {}
            pdl_side_by_side(engine, prompt, args, device, say, result["pdl"], save)
        except Exception as e:  # a Triton or driver without it: said
            failed += 1
            say(f"PDL side by side failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
    if args.out:
        print(f"results: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
