"""Compiles every moebench Triton kernel for an NVIDIA GPU (default sm_90, the H100) on a machine without one.

Triton's compiler needs no GPU to go from Python to PTX and a cubin (its wheel ships LLVM and ptxas). This script
runs each kernel's launch wrapper with GPU tile choices (not the interpreter's), catches the launch, and compiles
the kernel with the very arguments and constexprs it was launched with: type errors, bad constexprs or shapes that
only the compiled path rejects show up here, before a GPU is lent.

    python scripts/check_gpu_compile.py [--arch 90] [--dtype bfloat16 --dtype float32]

Prints one line per kernel configuration and exits 1 if any fails to compile. Run it in its own process: it must
import the kernels before anything switches Triton to its interpreter.
"""

import argparse
import os
import sys
import time

import torch

DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64",
          torch.int32: "i32", torch.uint8: "u8", torch.int8: "i8", torch.bool: "i1", torch.float8_e4m3fn: "fp8e4nv"}


def pretend_a_gpu():
    """Define the kernels as compiled JIT functions and let the wrappers take CPU tensors."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("check_gpu_compile.py: unset TRITON_INTERPRET; the kernels must be compiled, not interpreted")
    torch.cuda.is_available = lambda: True  # moebench then leaves the interpreter off
    torch.cuda.get_device_capability = lambda *args: (9, 0)  # and may launch with PDL (moebench/kernels/common.py)
    from moebench.kernels import interpret

    interpret.check_device = lambda *args: None


def arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument {value!r}")


LAUNCH_OPTIONS = {"num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion", "launch_pdl"}


def capture_launches():
    """Replace JITFunction.run: record (kernel, signature, constexprs) and launch nothing."""
    from triton.runtime.jit import JITFunction

    launches = {}

    def run(self, *args, grid, warmup, **kwargs):
        unknown = set(kwargs) - set(self.arg_names) - LAUNCH_OPTIONS
        if unknown:  # what Triton itself would refuse at the launch
            raise TypeError(f"{self.__name__}: unknown launch arguments {sorted(unknown)}")
        values = dict(zip(self.arg_names, args)) | kwargs
        signature, constexprs = {}, {}
        for p in self.params:
            if p.is_constexpr:
                signature[p.name], constexprs[p.name] = "constexpr", values[p.name]
            else:
                signature[p.name] = arg_type(values[p.name])
        key = (self.__name__, tuple(sorted(signature.items())), tuple(sorted(constexprs.items(), key=str)))
        launches.setdefault(key, (self, signature, constexprs))

    JITFunction.run = run
    return launches


def launch_everything(dtype, tokens=(1, 17)):
    """Each kernel's wrapper at Qwen3-30B-A3B's widths (8 experts instead of 128), decode and prefill shapes."""
    from moebench.kernels import attention, flash_decoding, fused_moe, linear, qkv, quantized_moe, rmsnorm, router

    g = torch.Generator().manual_seed(0)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(dt)

    D, H, HKV, HD, E, K, I, S = 2048, 32, 4, 128, 8, 8, 768, 640
    for T in tokens:
        x, w = randn(T, D), randn(D)
        rmsnorm.rms_norm_triton(x, w, 1e-6)
        rmsnorm.rms_norm_triton(x, w, 1e-6, x)
        linear.linear_triton(x, randn(D, D), randn(D), x)
        linear.linear_triton(x, randn(4096, D))
        tiles = linear._tiles  # and the kernel without tl.dot that BM = 1 picks (bench/gpu_kernels.py --sweep)
        linear._tiles = lambda M, N, K: dict(BM=1, BN=16, BK=512, num_warps=4)
        linear.linear_triton(x, randn(D, D), None, x)
        linear._tiles = lambda M, N, K: dict(BM=1, BN=8, BK=256, SPLIT_K=1024, num_warps=4)  # and split over K
        linear.linear_triton(randn(T, 4096), randn(D, 4096), None, x)
        linear._tiles = tiles
        cs = randn(T, HD)
        hd1 = randn(HD)
        qkv.qkv_rope_triton(x, w, randn((H + 2 * HKV) * HD, D), None, hd1, hd1, cs, cs, H, HKV, 1e-6)
        qkv.qkv_rope_triton(x, None, randn((H + 2 * HKV) * HD, D), randn((H + 2 * HKV) * HD), hd1, hd1, cs, cs, H,
                            HKV, 1e-6)
        q, k = randn(1, H, T, HD), randn(1, HKV, S, HD)
        mask = torch.ones(1, 1, T, S, dtype=torch.bool)
        attention.attention_triton(q, k, k, mask, HD**-0.5)
        flash_decoding.flash_decode_triton(q, k, k, mask, HD**-0.5, split_size=128)
        ids, weights = router.moe_router_triton(x, randn(E, D), K, True)
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
        w_gate_up, w_down = randn(E, 2 * I, D), randn(E, D, I)
        fused_moe.fused_moe_triton(x, w_gate_up, w_down, ids, weights)
        fused_moe.fused_moe_triton(x, w_gate_up, w_down, ids, weights, x)
        tiles = fused_moe._tiles  # and the sorted kernels' decode tiles (one token runs the pair kernels)
        fused_moe._tiles = fused_moe.sorted_tiles
        fused_moe.fused_moe_triton(x, w_gate_up, w_down, ids, weights, x)
        summed = dict(down=dict(BN=8, BK=128, num_warps=8, SUM_K=True))  # the down kernel summing k experts
        fused_moe._tiles = lambda N, E: tiles(N, E) | (summed if tiles(N, E)["BM"] == 1 else {})
        fused_moe.fused_moe_triton(x, w_gate_up, w_down, ids, weights, x)
        fused_moe._tiles = tiles
        for qdtype in (torch.int8, torch.float8_e4m3fn):
            (qgu, sgu), (qd, sd) = (quantized_moe.quantize_weights(w_gate_up, qdtype),
                                    quantized_moe.quantize_weights(w_down, qdtype))
            _, xq, xs = quantized_moe.rms_norm_quantize_triton(x, w, 1e-6, 1200.0, qdtype)
            quantized_moe.quantized_moe_triton(x, qgu, sgu, qd, sd, ids, weights, 1200.0)
            quantized_moe.quantized_moe_triton(xq, qgu, sgu, qd, sd, ids, weights, 1200.0, xs, x)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, choices=(80, 86, 89, 90),
                   help="CUDA compute capability x10 (default 90: H100, H200)")
    p.add_argument("--dtype", action="append", choices=("bfloat16", "float32"),
                   help="activation dtype(s) to launch with (default: both)")
    args = p.parse_args()
    pretend_a_gpu()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launches = capture_launches()
    from moebench.kernels import flash_decoding

    flash_decoding._sm_count = lambda device: 132  # an H100's SMs: the split heuristic's input
    dtypes = args.dtype or ("bfloat16", "float32")
    for dtype in dtypes:
        launch_everything(getattr(torch, dtype))
    from moebench.kernels import common

    common.set_pdl(True)  # and the launches with programmatic dependent launch: their waits compiled in
    launch_everything(getattr(torch, dtypes[0]))
    common.set_pdl(None)
    target, failed = GPUTarget("cuda", args.arch, 32), 0
    for fn, signature, constexprs in launches.values():
        shown = ", ".join(f"{k}={v}" for k, v in constexprs.items())
        dtypes = sorted({t for t in signature.values() if t.startswith("*")})
        start = time.perf_counter()
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target)
            if constexprs.get("USE_GDC") and not all(f"griddepcontrol.{op}" in compiled.asm["ptx"]
                                                     for op in ("wait", "launch_dependents")):
                raise RuntimeError("USE_GDC=True but no griddepcontrol.wait and .launch_dependents in the PTX")
            status = f"ok  {time.perf_counter() - start:4.1f} s, {len(compiled.asm['cubin'])} B cubin"
        except Exception as e:  # report every failure, then fail
            failed += 1
            status = f"FAILED: {type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"
        print(f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__} [{' '.join(dtypes)}] ({shown}): {status}",
              flush=True)
    print(f"{len(launches) - failed} of {len(launches)} kernel configurations compile for sm_{args.arch}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
