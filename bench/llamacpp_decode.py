"""Batch-1 decode on the CPU: moebench against llama.cpp (llama-bench) on the same checkpoint, in the same run,
interleaved; tokens/s, each one's share of the memory-read roofline measured between the runs, and the ratio.

The preset's checkpoint is converted to GGUF once (float32 or bfloat16, the weights as they are) with the converter
of the llama.cpp tree (its tokenizer check bypassed: the preset's own tokenizer is not one it knows, and decoding
speed does not depend on it). llama-bench generates --tokens tokens after --prompt-len tokens of context (its
--n-depth); moebench decodes the same after a prompt of that length, its decode step compiled as in
bench/decode_speed.py. Both use every thread torch uses.

    bash scripts/build_llamacpp.sh                  # once: llama-bench from PyPI's llama-cpp-python source
    python bench/llamacpp_decode.py --llama-cpp ~/.cache/moebench/llama.cpp/llama_cpp_python-0.3.36/vendor/llama.cpp
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from _common import MODELS, bandwidth, moebench_engine, out_path, positive_int, write_results
from decode_speed import moebench_decode
from moebench.model.presets import preset_dir

# Runs the tree's converter with its pre-tokenizer check answering "qwen2" (Qwen's byte-level BPE, which the presets'
# tokenizers are too).
CONVERT = """import sys
tree = sys.argv.pop(1)
sys.path[:0] = [tree, tree + "/gguf-py"]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
import convert_hf_to_gguf
convert_hf_to_gguf.main()
"""


OUTTYPES = {"float32": "f32", "bfloat16": "bf16"}  # GGUF's names of the dtypes the converter keeps as they are


def gguf(tree: Path, name: str, dtype_name: str, folder: Path) -> Path:
    """The preset's checkpoint as GGUF in `dtype_name` (converted once into `folder`)."""
    outtype = OUTTYPES[dtype_name]
    src = preset_dir(name)
    out = folder / f"{src.name}-{outtype}.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".part")
        print(f"converting {name} to GGUF ({outtype}) ...", flush=True)
        subprocess.run([sys.executable, "-c", CONVERT, str(tree), str(src), "--outtype", outtype, "--outfile",
                        str(tmp)], check=True, capture_output=True, text=True)
        tmp.rename(out)
    return out


def llama_tok_s(bench: Path, model: Path, tokens: int, depth: int, threads: int) -> float:
    """Tokens/s of one llama-bench generation run of `tokens` tokens after `depth` tokens of context."""
    out = subprocess.run([str(bench), "-m", str(model), "-p", "0", "-n", str(tokens), "-d", str(depth), "-t",
                          str(threads), "-r", "1", "-o", "json"], check=True, capture_output=True, text=True).stdout
    (run,) = json.loads(out)
    return run["avg_ts"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", required=True, type=Path, help="a llama.cpp tree with build/bin/llama-bench "
                    "(scripts/build_llamacpp.sh prints one)")
    ap.add_argument("--model", default="moebench-speed", choices=MODELS, help="a preset")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--tokens", type=positive_int, default=32, help="decode steps timed per run")
    ap.add_argument("--prompt-len", type=positive_int, default=16)
    ap.add_argument("--repeats", type=positive_int, default=5, help="interleaved runs per engine")
    ap.add_argument("--gguf-dir", type=Path, default=Path.home() / ".cache" / "moebench" / "gguf",
                    help="where the converted checkpoints are kept")
    ap.add_argument("--out", type=out_path, default="bench/results/llamacpp_decode.json")
    args = ap.parse_args()
    dtype_names = args.dtypes.split(",")
    for dtype_name in dtype_names:
        if dtype_name not in OUTTYPES:
            ap.error(f"--dtypes: {dtype_name!r} is not one of {', '.join(OUTTYPES)}")
    bench = args.llama_cpp / "build" / "bin" / "llama-bench"
    if not bench.is_file() or not (args.llama_cpp / "convert_hf_to_gguf.py").is_file():
        sys.exit(f"llamacpp_decode: no llama.cpp tree with a built llama-bench at {args.llama_cpp} "
                 "(build one with: bash scripts/build_llamacpp.sh)")

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    rows = []
    print(f"{threads} threads; {args.tokens} tokens after {args.prompt_len} of context", flush=True)
    for dtype_name in dtype_names:
        dtype = getattr(torch, dtype_name)
        model = gguf(args.llama_cpp, args.model, dtype_name, args.gguf_dir)
        source, engine = moebench_engine(args.model, dtype, args.prompt_len + args.tokens + 1, compile=True)
        prompt = torch.randint(1, 4000, (1, args.prompt_len))
        start = time.perf_counter()
        moebench_decode(engine, prompt, 4)  # compiles the decode step
        print(f"moebench warm-up (compile included): {time.perf_counter() - start:.1f} s", flush=True)
        llama_tok_s(bench, model, 4, args.prompt_len, threads)  # the file into the page cache
        a, b, reads = [], [], []
        for _ in range(args.repeats):
            reads.append(bandwidth(repeats=3)["matvec"])
            moebench_decode(engine, prompt, 4)
            a.append(moebench_decode(engine, prompt, args.tokens))
            b.append(llama_tok_s(bench, model, args.tokens, args.prompt_len, threads))
        reads.append(bandwidth(repeats=3)["matvec"])
        bytes_per_token = source.config.active_parameters() * dtype.itemsize
        roofline = statistics.median(reads) * 1e9 / bytes_per_token
        row = dict(model=args.model, dtype=dtype_name, tokens=args.tokens, context=args.prompt_len,
                   moebench_tok_s=statistics.median(a), llamacpp_tok_s=statistics.median(b), moebench_runs=a,
                   llamacpp_runs=b, bandwidth_gbs=statistics.median(reads), bandwidth_reads=reads,
                   roofline_tok_s=roofline, bytes_per_token=bytes_per_token)
        row["ratio"] = row["moebench_tok_s"] / row["llamacpp_tok_s"]
        row["paired_ratio"] = statistics.median(x / y for x, y in zip(a, b))
        rows.append(row)
        ours, theirs = row["moebench_tok_s"], row["llamacpp_tok_s"]
        print(f"{args.model} {dtype_name:9s} moebench {ours:7.1f} tok/s ({ours / roofline:4.0%} of roofline)  "
              f"llama.cpp {theirs:7.1f} ({theirs / roofline:4.0%})  ratio "
              f"{row['ratio']:.2f}x (round by round {row['paired_ratio']:.2f}x)  roofline {roofline:.0f} tok/s at "
              f"{row['bandwidth_gbs']:.1f} GB/s", flush=True)
        del engine
    shares = [(f"{r['model'].removeprefix('moebench-')} {r['dtype']}", r["moebench_tok_s"] / r["roofline_tok_s"],
               r["llamacpp_tok_s"] / r["roofline_tok_s"]) for r in rows]
    write_results(args.out, dict(rows=rows, threads=threads), shares,
                  f"Batch-1 decode against llama.cpp, {threads} threads: tokens/s against the memory-read roofline",
                  competitor="llama.cpp")


if __name__ == "__main__":
    main()
