"""What the CPU bench scripts share: this machine's measured limits, the two engines on one checkpoint, timing."""

import argparse
import functools
import json
import re
import statistics
import time
from pathlib import Path

import torch

from moebench.cli.args import positive
from moebench.engine import hugepages
from moebench.engine.generator import Engine
from moebench.evaluation.benchmark import frozen_gc
from moebench.model import cpu_ops, onednn
from moebench.model.loader import build_model, open_model
from moebench.model.presets import PRESETS, preset_dir
from moebench.model.qwen3_moe import ModelOptions, Qwen3MoeForCausalLM
from moebench.report import svg


def names(allowed) -> callable:
    """An argparse type: a comma-separated list, each one of `allowed`."""
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{', '.join(bad) or 'nothing'}: not one of {', '.join(allowed)}")
        return items
    return parse


positive_int = positive(int)  # an argparse type: one usage line for anything but an integer above 0


def out_path(text: str) -> str:
    """An argparse type for --out: refused before any measuring when the file, its .svg chart, or a folder on the
    way cannot be one (a folder in its place, a file where a folder must go)."""
    path = Path(text)
    for p in (path, path.with_suffix(".svg")):
        if p.exists() and not p.is_file():
            raise argparse.ArgumentTypeError(f"{p}: a folder (or other non-file) is in its place")
    blocked = next((q for q in path.parents if q.exists() and not q.is_dir()), None)
    if blocked is not None:
        raise argparse.ArgumentTypeError(f"{text}: {blocked} is a file, not a folder")
    return text
DTYPES = ("float32", "bfloat16")
MODELS = tuple(PRESETS)


def timed(fn, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of fn, after one warm-up call, the objects from before left out of the
    garbage collector's passes (moebench.evaluation.benchmark.frozen_gc), as the harness times requests."""
    fn()
    times = []
    with frozen_gc():
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return times


@functools.cache
def _reads() -> tuple[int, dict]:
    """The large matrix-vector reads `bandwidth` times (the 1 GiB matrix made once per process)."""
    w, v = torch.randn(16384, 16384), torch.randn(16384)
    summed = torch.compile(lambda w, v: (w * v).sum(-1), dynamic=False)
    reads = {"mv": lambda: torch.mv(w, v), "compiled": lambda: summed(w, v), "stream": w.sum}
    if onednn.usable(w, torch.float32):
        packed = onednn.packed(w, torch.float32)
        reads["onednn"] = lambda: onednn.linear(v[None], packed)
    wh = w
    if hugepages.SUPPORTED:  # as the engine's weights (moebench.engine.hugepages)
        wh = hugepages.empty(w.numel() * 4).view(torch.float32).view(w.shape).copy_(w)
        reads["compiled_hp"] = lambda: summed(wh, v)
    if cpu_ops.load():  # moebench's own one-row product, as its decode steps read their weights
        reads["moebench"] = lambda: torch.ops.moebench_cpu.linear_row(v[None], wh)
    return w.numel() * 4, reads


def bandwidth(repeats: int = 5) -> dict:
    """GB/s (median) of reading 1 GiB of float32 now. `matvec`, the roofline's bandwidth, is the fastest of the
    large matrix-vector reads: `mv` (torch.mv, the BLAS library's), `compiled` (w * v summed along rows, as Inductor
    compiles one-row products; `compiled_hp` the same with the matrix in huge pages), `onednn` (oneDNN's product
    with the matrix packed in its layout) and `moebench` (the C++ one-row product of moebench's decode steps, on the
    huge-page matrix). `stream` (torch.sum, a plain read) is for reference. (Without `moebench` the roofline was
    the library's reads only: on the Zen 4 VM ~24 GB/s where moebench's own read reached ~32, and moebench's decode
    read "above 100%" of it.)"""
    nbytes, reads = _reads()
    out = {name: nbytes / statistics.median(timed(fn, repeats)) / 1e9 for name, fn in reads.items()}
    return dict(matvec=max(v for name, v in out.items() if name != "stream"), **out)


def gemm_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s (median) of an n x n x n matrix product in dtype, the faster of torch's and oneDNN's with a packed
    weight (on AMD CPUs MKL's float32 GEMM reaches less than half of oneDNN's): the compute roofline of prefill."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    products = [lambda: a @ b]
    if onednn.usable(a, dtype):
        packed = onednn.packed(b, dtype)
        products.append(lambda: onednn.linear(a, packed))
    return max(2 * n**3 / statistics.median(timed(fn, repeats)) / 1e9 for fn in products)


def moebench_engine(name: str, dtype: torch.dtype, max_len: int, compile: bool):
    """(the preset's source, moebench's engine on it): the preset's checkpoint is written on first use."""
    source = open_model(f"preset:{name}")
    ours = build_model(Qwen3MoeForCausalLM, source, ModelOptions(fused_qkv=True), dtype, "cpu")
    return source, Engine(ours, batch=1, max_len=max_len, compile=compile)


def engines(name: str, dtype: torch.dtype, max_len: int, compile: bool):
    """moebench's engine and transformers' model on the same checkpoint (a preset, written on first use)."""
    from transformers import Qwen3MoeForCausalLM as HFModel

    source, engine = moebench_engine(name, dtype, max_len, compile)
    return source, engine, HFModel.from_pretrained(preset_dir(name), dtype=dtype).eval()


# Profiler events that only make views or allocate: the framework's, not the math's.
_BOOKKEEPING = re.compile(r"aten::(empty\w*|as_strided|view\w*|_reshape_alias|alias|detach|lift_fresh\w*|select|slice"
                          r"|transpose|t|unsqueeze|squeeze|expand|permute|reshape|_unsafe_view|resolve_\w+)$")


def kernel_seconds(fn, steps: int) -> float:
    """Seconds per call of fn spent inside computing kernels (Inductor's generated kernels and the library's
    operators), from torch.profiler: the step time minus this is the framework's overhead."""
    import torch._inductor.config as inductor_config

    from moebench.evaluation.flops import quiet_profile

    assert inductor_config.cpp.enable_kernel_profile, "set while compiling, so Inductor's kernels are recorded"
    with quiet_profile() as prof:
        for _ in range(steps):
            fn()
    # Self times (children excluded, so nothing counts twice) of every event but the framework's own.
    math = [e for e in prof.events() if not _BOOKKEEPING.match(e.name)
            and not e.name.startswith(("TorchDynamo", "Torch-Compiled", "## ", "Pregraph", "ProfilerStep"))]
    return sum(e.self_cpu_time_total for e in math) / 1e6 / steps


def write_results(path: str, payload: dict, shares: list[tuple[str, float, float]], title: str,
                  competitor: str = "transformers"):
    """Write a bench script's results as JSON (folders made as needed), and beside it (.svg) a bar chart of each
    row's share of the roofline, moebench's and the competitor's (shares: (row label, moebench's, the other's))."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    bars = [(f"{label}: {engine}", 100 * share) for label, *both in shares
            for engine, share in zip(("moebench", competitor), both)]
    chart = out.with_suffix(".svg")
    chart.write_text(svg.bars(bars, title, "% of the roofline measured in the same run",
                              highlight={name for name, _ in bars if name.endswith("moebench")}))
    print(f"results: {out}, chart: {chart}")
