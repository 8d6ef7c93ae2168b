"""moebench's CPU operators in C++ (cpu_ops.cpp). In compiled decode steps: moebench_cpu::linear_row (a one-row
product; eagerly too: a prompt's LM head), moebench_cpu::moe_route_decode (one token's MoE block: norm, router,
top-k, experts and residual add in one call; moe_decode: the experts alone, behind a submission's router kernel),
moebench_cpu::attention_decode (one token's attention block: norm, projections, q/k norms, rotation, the cache's
write, attention, output projection and residual add in one call) and moebench_cpu::attend_row (one query a head
against the KV cache, for batches); in prompts (context encoding, eager): moebench_cpu::attend_block (many queries a
head), moebench_cpu::qk_norm_rope (q/k norms, rotation and the cache's write), moebench_cpu::rms_norm_rows (RMSNorm
of many rows) and, for experts computed in float32 (float32 weights, or bfloat16 ones where moe.in_float32 widens
them), moebench_cpu::moe_prompt (all of a prompt's experts in one call, each weight packed in float32 panels:
`panels`; bfloat16 experts kept in bfloat16 too where the CPU has AVX512-BF16 or AMX, their weights in bfloat16
panels of pairs: `pair_panels`, in AMX tiles' order where its tiles take them), moebench_cpu::linear_panels (a
prompt's projections, their weights packed the same way: float32 panels, or bfloat16 pairs; the output projection's
residual add fused in) and moebench_cpu::route_rows (the router's products, softmax and top-k; a row whose choice
hangs on a tie goes to torch's top-k); greedy decoding's argmax of the logits (moebench_cpu::argmax_rows, eagerly:
argmax_of); and a layer's two blocks each in one call, made of those: moebench_cpu::attention_block_prompt and
moebench_cpu::moe_block_prompt (the Python between the operators ran on caches the experts' weights had just swept:
~3% of a prompt).

The decode operators replace what Inductor would compile from the model's torch code (moebench-speed bfloat16 decode
~1.2x faster where the memory is fast, the embedded model's ~1.5x at 640 cache slots); attend_block the library's
flash attention (~3x faster for a 402-token prompt); linear_panels oneDNN's products (~1.1-1.2x on the experts' rows
in float32; a prompt's projections as fast with their weights in the caches, 2-10% faster with them pushed out, as
the experts' stream pushes them: Zen 4 VM); moe_prompt on bfloat16 pairs oneDNN's bfloat16 products of the experts
(~2.1x on a moebench-speed layer's, Zen 4 VM); with AMX, its tiles carry a bfloat16 prompt's products, attention's
too (the whole prompt 136 -> 58-90 ms on the Xeon VM). Built on first use with the machine's C++ compiler for this
CPU (-march=native: AVX512-BF16's dot products and AMX's tiles where the CPU has them), ~26 s on 2 cores, and kept
in Inductor's cache folder, keyed by the source, the compiler, torch and the CPU's flags: the harness's, whose fork
server loads them for the submissions' processes it forks (moebench.modes.fork_server; a spawned one builds them in
its own cache folder, a confined one's the only one it may write). Inductor's C++ wrapper calls the decode operators
through their C entry points (C_SHIMS), not through the dispatcher. Where they cannot be built (no compiler, say), or
with MOEBENCH_CPU_OPS=0, decode steps keep Inductor's loops and prompts the library's attention and oneDNN's
products: the same math.
"""

import ctypes
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from moebench.engine import hugepages
from moebench.model.derived import derived

SOURCE = Path(__file__).with_name("cpu_ops.cpp")
LOADED = False  # set by load(); read while tracing (a plain global, not a call Dynamo would trace)
# The build's panel width and what K its bfloat16 panels of pairs need to be a multiple of (0: it takes none; 32: AMX
# tiles) (set by load(): read on every prompt's product, where a call of the operators' own functions costs
# microseconds)
PANEL_WIDTH, PAIR_DEPTH = 0, 0


def _cpu_flags() -> str:
    try:
        return next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    except OSError:
        return ""


def _flags() -> list[str]:
    from torch.utils import cpp_extension

    lib = Path(torch.__file__).parent / "lib"
    return ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++20", "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            *(f"-I{p}" for p in cpp_extension.include_paths()), f"-L{lib}", f"-Wl,-rpath,{lib}"]


@functools.cache
def load() -> bool:
    """Loads the operators (built first when this machine has none cached): True when they are there."""
    global LOADED, PANEL_WIDTH, PAIR_DEPTH
    if os.environ.get("MOEBENCH_CPU_OPS", "1") == "0" or sys.platform != "linux":
        return False
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    compiler = os.environ.get("CXX", "g++")
    try:
        version = subprocess.run([compiler, "--version"], check=True, capture_output=True, text=True).stdout
        flags = _flags()
        key = hashlib.sha256("\n".join([SOURCE.read_text(), version, *flags, torch.__version__, _cpu_flags()]).encode())
        path = Path(cache_dir()) / "moebench_cpu_ops" / f"{key.hexdigest()[:16]}.so"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                built = Path(tmp) / path.name
                subprocess.run([compiler, *flags, str(SOURCE), "-o", str(built), "-ltorch_cpu", "-lc10"], check=True,
                               capture_output=True, text=True)
                os.replace(built, path)  # whole or not at all, for concurrent builders
        torch.ops.load_library(str(path))
    except (OSError, subprocess.CalledProcessError) as e:
        if isinstance(e, subprocess.CalledProcessError):  # the compiler's first error
            e = next((line for line in e.stderr.splitlines() if "error" in line), f"{compiler} failed")
        print(f"moebench: the C++ CPU operators were not built ({e}); decode steps run Inductor's loops, prompts "
              "the library's attention and oneDNN's products instead", file=sys.stderr)
        return False
    torch.library.register_fake("moebench_cpu::moe_decode")(_moe_decode_fake)
    torch.library.register_fake("moebench_cpu::moe_route_decode")(_moe_route_decode_fake)
    torch.library.register_fake("moebench_cpu::linear_row")(_linear_row_fake)
    torch.library.register_fake("moebench_cpu::attend_row")(_attend_row_fake)
    torch.library.register_fake("moebench_cpu::attention_decode")(_attention_decode_fake)
    torch.library.register_fake("moebench_cpu::attend_block")(_attend_block_fake)
    PANEL_WIDTH, PAIR_DEPTH = torch.ops.moebench_cpu.panel_width(), torch.ops.moebench_cpu.pair_depth()
    # Inductor's C++ wrapper calls the decode operators through their C entry points (cpu_ops.cpp), which the graphs'
    # libraries find once this one's symbols are global
    ctypes.CDLL(str(path), mode=os.RTLD_GLOBAL | os.RTLD_NOLOAD)
    config = torch._inductor.config.aot_inductor
    config.custom_ops_to_c_shims = CShims({**config.custom_ops_to_c_shims,
                                           **{getattr(torch.ops.moebench_cpu, name).default: [_c_declaration(name)]
                                              for name in C_SHIMS}})
    LOADED = True
    return True


C_SHIMS = ("attend_row", "moe_decode", "moe_route_decode", "attention_decode", "linear_row")  # aoti_torch_cpu_<name>
_C_TYPES = {"Tensor": "AtenTensorHandle", "float": "double", "int": "int64_t", "bool": "int32_t"}


def _c_declaration(name: str) -> str:
    """The C entry point of moebench_cpu::<name>, from its schema: Inductor calls it with the schema's arguments and
    a pointer for each result."""
    schema = getattr(torch.ops.moebench_cpu, name).default._schema
    args = [_C_TYPES[str(a.type)] for a in schema.arguments] + ["AtenTensorHandle*"] * len(schema.returns)
    return f"AOTITorchError aoti_torch_cpu_{name}({', '.join(args)})"


class CShims(dict):
    """Inductor's custom_ops_to_c_shims, pickled by the operators' names: Inductor pickles its config into the key of
    its cache of compiled graphs, and an operator cannot be pickled (no graph would ever be cached)."""

    def __reduce__(self):
        return _c_shims, (tuple((op._schema.name, op._overloadname, decls) for op, decls in self.items()),)


def _c_shims(items) -> CShims:
    from torch._library.utils import lookup_op

    load()
    return CShims({lookup_op(f"{name}.{overload}"): decls for name, overload, decls in items})


def _moe_decode_fake(x, ids, weights, w_gate_up, w_down):
    return torch.empty_like(x)


def _moe_route_decode_fake(x, norm, eps, router, k, norm_topk, w_gate_up, w_down):
    return torch.empty_like(x)


def _linear_row_fake(x, w):
    return x.new_empty(1, w.shape[0])


def _attend_row_fake(q, keys, values, mask, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _attention_decode_fake(x, norm, norm_eps, wq, wk, wv, q_norm, k_norm, eps, cos, sin, cache_k, cache_v, layer, slot,
                           mask, scale, wo):
    return torch.empty_like(x)


def _attend_block_fake(q, keys, values, mask, scale):
    B, H, T, hd = q.shape
    return q.new_empty(B, T, H, hd).transpose(1, 2)


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """True when the operators take x (the activations) and w (the weights, or the cache) here: both on the CPU in
    one dtype, float32 or bfloat16, once load() has loaded them."""
    return LOADED and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and w.dtype == x.dtype


def argmax_of(device: torch.device):
    """What chooses greedy decoding's tokens on `device`: logits [B, V] -> each row's argmax [B], as
    logits.argmax(-1) (the first largest, or the first NaN). On the CPU with the operators loaded
    moebench_cpu::argmax_rows: ~4 us for 32000 float32 logits where torch's argmax takes ~30 (~115 in bfloat16). In a
    decode step, run from caches the weights have swept, its choice took ~20 us against ~50 for torch's argmax (Zen 4
    VM)."""
    if LOADED and device.type == "cpu":
        return torch.ops.moebench_cpu.argmax_rows.default
    return functools.partial(torch.argmax, dim=-1)


def panels_usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """True when linear_panels computes float32 products of x's rows (float32, or bfloat16 widened) with the weights
    w [E, N, K] (packed once into float32 panels) here: eagerly (not while compiling or exporting), on the CPU, N a
    multiple of the panel width."""
    return (LOADED and x.device.type == "cpu" and x.dtype == w.dtype and x.dtype in (torch.float32, torch.bfloat16)
            and not torch.compiler.is_compiling() and w.shape[-2] % PANEL_WIDTH == 0)


def experts_usable(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, k: int) -> bool:
    """True when moe_prompt computes a prompt's experts here (as panels_usable says for both weights, the experts'
    intermediate size I a multiple of the panel width: gate's and up's panels pair up; k <= 64 experts a token)."""
    return (panels_usable(x, w_gate_up) and panels_usable(x, w_down) and k <= 64
            and w_down.shape[-1] % PANEL_WIDTH == 0)


AMX = torch.cpu._is_amx_tile_supported()


def pair_panels_usable(x: torch.Tensor) -> bool:
    """True when moe_prompt takes bfloat16 panels of pairs for x's rows here (x bfloat16): on AMX tiles where the CPU
    has them (a build without them leaves such a CPU's products to oneDNN's tiles, far faster than vdpbf16ps), else
    on AVX512-BF16's dot products."""
    return LOADED and x.dtype == torch.bfloat16 and PAIR_DEPTH > 0 and (PAIR_DEPTH == 32 or not AMX)


def products_usable(x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> bool:
    """True when linear_panels computes a prompt's product x [rows, K] @ w [N, K]^T in `dtype` here, eagerly (not
    while compiling or exporting: the MAC count reads an exported graph's linears): float32 (float32 weights, or
    bfloat16 ones moe.in_float32 widens), or bfloat16 on AVX512-BF16 pairs (pair_panels_usable); with AVX-512's 6 x
    64 register tiles, the ones timed against oneDNN's products (the AVX2 build's 6 x 16 were not); N a multiple of
    the panel width, K even (bfloat16: a multiple of PAIR_DEPTH), and a panel for every thread at least (linear_panels
    shares the panels among the threads, not the rows: oneDNN keeps the narrow products of a many-core machine)."""
    return (LOADED and x.device.type == "cpu" and x.dtype == w.dtype and not torch.compiler.is_compiling()
            and PANEL_WIDTH == 64 and w.shape[-2] % 64 == 0 and w.shape[-1] % 2 == 0
            and w.shape[-2] // 64 >= torch.get_num_threads()
            and (dtype == torch.float32 and x.dtype in (torch.float32, torch.bfloat16)
                 or dtype == torch.bfloat16 and pair_panels_usable(x) and w.shape[-1] % PAIR_DEPTH == 0))


def packed_for(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w's panels for linear_panels' and moe_prompt's products in `dtype`: bfloat16 pairs, or float32."""
    return pair_panels(w) if dtype == torch.bfloat16 else panels(w)


def pair_panels(w: torch.Tensor) -> torch.Tensor:
    """w [E, N, K] bfloat16 -> [E, N / NB, K / 2, NB, 2], for moe_prompt and linear_panels with AVX512-BF16 (w [N, K]
    -> [N / NB, K / 2, NB, 2]): each panel NB output columns, the weights of rows 2p and 2p + 1 of each column side by
    side (one vdpbf16ps operand), made once per weight, in huge pages where the machine has them. With AMX tiles
    (PAIR_DEPTH 32) the same pairs in the tiles' order, [E, N / NB, K / 32, NB / 16, 16, 32]: each 1 KiB tile 16 rows
    of pairs for 16 columns, a panel's tiles K first."""
    def layout(w, E, N, K, nb):
        if PAIR_DEPTH == 32:
            return w.view(E, N // nb, nb // 16, 16, K // 32, 16, 2).permute(0, 1, 4, 2, 5, 3, 6)
        return w.view(E, N // nb, nb, K // 2, 2).permute(0, 1, 3, 2, 4)

    def pack(w):
        packed = _packed(w, layout, torch.bfloat16)
        if PAIR_DEPTH != 32:
            return packed
        N, K = w.shape[-2:]
        return packed.view(*w.shape[:-2], N // PANEL_WIDTH, K // 32, PANEL_WIDTH // 16, 16, 32)
    return derived(w, "pair_panels", pack)


def panels(w: torch.Tensor) -> torch.Tensor:
    """w [E, N, K] -> [E, N / NB, K, NB] (w [N, K] -> [N / NB, K, NB]) in float32 (bfloat16 weights widened), for
    linear_panels and moe_prompt: each panel NB output columns, K rows of NB weights (NB: panel_width()), made once
    per weight, in huge pages where the machine has them (moebench.engine.hugepages: a prompt streams every expert's
    weights once a layer). Float32 for bfloat16 weights too: twice the memory of bfloat16 panels, but widened in the
    cache panel by panel a prompt's experts ran 7-12% slower (Xeon VM)."""
    def layout(w, E, N, K, nb):
        return w.view(E, N // nb, nb, K).transpose(2, 3)
    return derived(w, "panels", lambda w: _packed(w, layout, torch.float32))


def _packed(w: torch.Tensor, layout, dtype: torch.dtype) -> torch.Tensor:
    """w [E, N, K] (or [N, K]: one) laid out as layout(w, E, N, K, NB) gives, copied into a buffer of `dtype` (huge
    pages where the machine has them and the buffer is large enough)."""
    E, N, K = w.shape if w.dim() == 3 else (1, *w.shape)
    view = layout(w, E, N, K, PANEL_WIDTH)
    nbytes = w.numel() * dtype.itemsize
    huge = hugepages.SUPPORTED and nbytes >= hugepages.MIN_BYTES
    out = hugepages.empty(nbytes) if huge else torch.empty(nbytes, dtype=torch.uint8)
    packed = out.view(dtype).view(view.shape).copy_(view)
    return packed if w.dim() == 3 else packed[0]
