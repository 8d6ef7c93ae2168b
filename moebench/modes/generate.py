"""--mode generate: print each prompt's continuation; with --output-logits, save the raw logits."""

import sys
import time
from pathlib import Path

import torch

from moebench.cli.args import RunConfig
from moebench.engine.parallel import writes_files
from moebench.engine.sampling import SamplingParams
from moebench.evaluation.expected import save_tensor
from moebench.evaluation.records import check_output_file
from moebench.evaluation.submission import load_submission
from moebench.modes.compiled import compile_step, open_artifacts
from moebench.modes.contest import benchmark, build_submission, compiled_engine, options_of, write_json
from moebench.modes.setup import device_of, dtype_of, make_engine, make_request, open_source
from moebench.progress import Progress

LOGITS_FILE = "output_logits.pt"
REPORT_FILE = "benchmark_report.json"
COMPILE_FROM = 64  # decode steps from which compiling the decode step (seconds, cached on disk) pays off


def run_generate(run: RunConfig) -> int:
    device, dtype = device_of(run), dtype_of(run)
    source = open_source(run)
    prompts = run.prompts
    req = make_request(run, source, prompts)
    for path in [Path.cwd() / LOGITS_FILE] * run.output_logits + [Path.cwd() / REPORT_FILE] * run.benchmark:
        check_output_file(path)  # before the long work
    sub = load_submission(run.qwen)
    started = time.perf_counter()
    artifacts = open_artifacts(run, sub.path, source, options_of(run), device)
    model = build_submission(run, sub, source, device, dtype, len(prompts), artifacts)
    print(f"model: {source.name} ({source.config.num_parameters() / 1e6:.1f}M parameters, {run.torch_dtype}, "
          f"{device.type}), module: {sub.path}")
    compile = req.max_new_tokens >= COMPILE_FROM
    # on-device greedy sampling bans EOS in its graph where every row gets max_new_tokens (generate does on the host)
    banned = req.eos_ids if req.min_new_tokens >= req.max_new_tokens else ()
    engine = make_engine(model, run, batch=len(prompts), compile=compile, banned=banned)
    if compile and not run.skip_compile:
        print("compiling the decode step...", file=sys.stderr)
    compile_step(run, artifacts, model, engine, req, source, compile_code=compile, started=started)
    sampling = SamplingParams(run.do_sample, run.temperature, run.top_k, run.top_p)
    generator = torch.Generator().manual_seed(run.seed)
    bar = Progress(req.max_new_tokens, "generate", "token")
    stamps = [time.perf_counter()]  # start, then one per token

    def on_token(i):
        stamps.append(time.perf_counter())
        bar.update()

    out = engine.generate(req.input_ids, req.attention_mask, req.max_new_tokens, req.min_new_tokens, sampling,
                          generator, req.eos_ids, req.pad_id, keep_logits=run.output_logits, on_token=on_token)
    bar.close()
    print("Generated outputs:")
    for b, prompt in enumerate(prompts):
        tokens = out.tokens[b, :out.lengths[b]].tolist()
        tokens = [t for t in tokens if t not in req.eos_ids]
        print(f"Output {b}: {prompt}{source.tokenizer.decode(tokens)}")
    steps = len(stamps) - 1
    timing = f"{steps} steps in {stamps[-1] - stamps[0]:.2f} s: first token {1e3 * (stamps[1] - stamps[0]):.0f} ms"
    if steps > 2:  # the first decode step includes compilation; the rate is measured after it
        timing += f", then {(steps - 2) / (stamps[-1] - stamps[2]):.1f} decode steps/s (batch {len(prompts)})"
    print(timing, file=sys.stderr)
    if run.output_logits:
        path = Path.cwd() / LOGITS_FILE
        if writes_files():
            save_tensor(path, out.logits)  # [new_tokens, batch, vocab], float32
        print(f"logits: {path}")
    if run.benchmark:
        report = benchmark(run, compiled_engine(run, model, req), req, "generate")
        path = Path.cwd() / REPORT_FILE
        write_json(path, report)
        e2e = report["e2e_model"]
        print(f"benchmark: e2e p99 {e2e['latency_ms_p99']:.2f} ms, throughput {e2e['throughput']:.2f} tokens/s "
              f"({e2e['runs']} runs): {path}")
    return 0
