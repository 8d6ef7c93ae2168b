"""--mode generate: print each prompt's continuation; with --output-logits, save the raw logits."""

import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from moebench.cli.args import RunConfig
from moebench.engine.sampling import SamplingParams
from moebench.model.loader import build_model, open_model
from moebench.model.qwen3_moe import ModelOptions, Qwen3MoeForCausalLM
from moebench.modes.setup import device_of, dtype_of, make_engine, make_request

LOGITS_FILE = "output_logits.pt"
COMPILE_FROM = 64  # decode steps from which compiling the decode step (seconds, cached on disk) pays off


def run_generate(run: RunConfig) -> int:
    device, dtype = device_of(run), dtype_of(run)
    source = open_model(run.model_path)
    prompts = run.prompts
    req = make_request(run, source, prompts)
    model = build_model(Qwen3MoeForCausalLM, source, ModelOptions(fused_qkv=run.fused_qkv), dtype, device)
    print(f"model: {source.name} ({source.config.num_parameters() / 1e6:.1f}M parameters, {run.torch_dtype}, "
          f"{device.type})", file=sys.stderr)
    compile = req.max_new_tokens >= COMPILE_FROM
    if compile:
        print("compiling the decode step (cached for later runs)...", file=sys.stderr)
    engine = make_engine(model, run, batch=len(prompts), compile=compile)
    sampling = SamplingParams(run.do_sample, run.temperature, run.top_k, run.top_p)
    generator = torch.Generator().manual_seed(run.seed)
    bar = tqdm(total=req.max_new_tokens, desc="generate", unit="tok", file=sys.stderr,
               disable=not sys.stderr.isatty())
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
        torch.save(out.logits, path)  # [new_tokens, batch, vocab], float32
        print(f"logits: {path}")
    return 0
