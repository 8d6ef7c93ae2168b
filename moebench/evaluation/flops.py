"""The kernel FLOP ratio: multiply-accumulates counted on graphs captured from the submission as it ran."""

from dataclasses import dataclass, field
from math import prod

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from moebench.kernels.registry import KERNELS
from moebench.model import onednn
from moebench.model.qwen3_moe import StepInputs

aten = torch.ops.aten


def _shape(arg):
    val = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else arg
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _attention_macs(q, k, *_):
    """softmax(q kᵀ) v: B·H·L·S·d for the scores plus the same for the context."""
    B, H, L, d = _shape(q)
    S = _shape(k)[-2]
    return 2 * B * H * L * S * d


def _matmul_macs(a, b, *_):
    """torch.matmul with broadcasting: every output element is a dot product over a's last dim."""
    A, B = _shape(a), _shape(b)
    if len(B) == 1:
        return prod(A)
    batch = torch.broadcast_shapes(A[:-2], B[:-2]) if len(A) > 1 else B[:-2]
    rows = A[-2] if len(A) > 1 else 1
    return prod(batch) * rows * A[-1] * B[-1]


# MACs of the matmul-like aten ops, from their argument shapes. Element-wise ops and lookups count zero. Graphs
# traced while running (make_fx) hold the decomposed ops (mm, addmm, the backend's attention); torch.export's
# graphs (the compile step's) keep linear, matmul and scaled_dot_product_attention whole.
MATMUL_MACS = {
    aten.linear.default: lambda x, w, *_: prod(_shape(x)[:-1]) * prod(_shape(w)),
    aten.matmul.default: _matmul_macs,
    aten.scaled_dot_product_attention.default: _attention_macs,
    aten.mm.default: lambda a, b, *_: prod(_shape(a)) * _shape(b)[-1],
    aten.addmm.default: lambda bias, a, b, *_: prod(_shape(a)) * _shape(b)[-1],
    aten.bmm.default: lambda a, b, *_: prod(_shape(a)) * _shape(b)[-1],
    aten.baddbmm.default: lambda c, a, b, *_: prod(_shape(a)) * _shape(b)[-1],
    # Each row of the token matrix meets one expert's [K, N] matrix.
    aten._grouped_mm.default: lambda a, b, *_: prod(_shape(a)) * _shape(b)[-1],
    aten._scaled_dot_product_flash_attention_for_cpu.default: _attention_macs,
    aten._scaled_dot_product_flash_attention.default: _attention_macs,
    aten._scaled_dot_product_efficient_attention.default: _attention_macs,
    aten._scaled_dot_product_cudnn_attention.default: _attention_macs,
    aten._scaled_dot_product_attention_math.default: _attention_macs,
}
if onednn.AVAILABLE:  # the CPU's eager products (moebench.model.onednn); a packed weight keeps its [N, K] shape
    MATMUL_MACS[torch.ops.mkldnn._linear_pointwise.default] = lambda x, w, *_: prod(_shape(x)[:-1]) * prod(_shape(w))

# moebench's C++ CPU operators (moebench.model.cpu_ops, loaded at run time: keyed by name), counted as the library
# operators they stand in for: a prompt's attention over every key, a product against a weight in panels or of one
# row, the experts' products.
CPU_OP_MACS = {
    "moebench_cpu::attend_block": _attention_macs,
    "moebench_cpu::linear_panels": lambda x, panels: prod(_shape(x)[:-1]) * prod(_shape(panels)),
    "moebench_cpu::linear_row": lambda x, w: prod(_shape(x)[:-1]) * prod(_shape(w)),  # a prompt's LM head, eager
    # A prompt's experts: each (token, expert) pair through one expert's gate, up and down products.
    "moebench_cpu::moe_prompt": lambda x, ids, weights, gate_up, down: prod(_shape(ids)) * (
        prod(_shape(gate_up)[1:]) + prod(_shape(down)[1:])),
}


@dataclass
class MacCount:
    total: int = 0
    kernel: int = 0
    by_op: dict = field(default_factory=dict)  # op name -> MACs
    kernel_ops: frozenset = frozenset()  # the names in by_op that are registered kernels

    def add(self, other: "MacCount", times: int = 1) -> "MacCount":
        by_op = dict(self.by_op)
        for k, v in other.by_op.items():
            by_op[k] = by_op.get(k, 0) + v * times
        return MacCount(self.total + other.total * times, self.kernel + other.kernel * times, by_op,
                        self.kernel_ops | other.kernel_ops)


def _kernel_of(target):
    name = getattr(target, "_schema", None)
    return KERNELS.get(name.name) if name is not None else None


def graph_macs(gm: torch.fx.GraphModule) -> MacCount:
    """MACs of one captured graph (torch.export or make_fx, ATen level, shapes in node.meta['val'])."""
    count = MacCount()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        kernel = _kernel_of(node.target)
        if kernel is not None:
            args = [a.meta.get("val") if isinstance(a, torch.fx.Node) else a for a in node.args]
            macs = int(kernel.macs(*args))
            count.kernel += macs
            count.kernel_ops |= {str(node.target)}
        elif node.target in MATMUL_MACS:
            macs = int(MATMUL_MACS[node.target](*node.args))
        elif (schema := getattr(node.target, "_schema", None)) is not None and schema.name in CPU_OP_MACS:
            macs = int(CPU_OP_MACS[schema.name](*node.args))
        else:
            continue
        count.total += macs
        name = str(node.target)
        count.by_op[name] = count.by_op.get(name, 0) + macs
    return count


def capture_step(model: torch.nn.Module, input_ids: torch.Tensor, step: StepInputs, cache) -> torch.fx.GraphModule:
    """The ATen graph of one forward call, traced while it really runs (data-dependent paths as taken)."""

    def forward(ids, positions, slots, mask, k, v):
        cache.k, cache.v = k, v  # the graph sees the cache as inputs, not as constants
        return model(ids, StepInputs(positions, slots, mask, step.last), cache)

    k, v = cache.k, cache.v
    try:
        with torch.inference_mode(False), torch.no_grad():
            return make_fx(forward, tracing_mode="real")(input_ids, step.positions, step.slots, step.mask,
                                                          k.clone(), v.clone())
    finally:
        cache.k, cache.v = k, v


def flop_ratio(per_request: MacCount) -> float:
    """Share of the MACs done in custom kernels: 0.0 with none."""
    return per_request.kernel / per_request.total if per_request.total else 0.0


class _Capturing(torch.nn.Module):
    """Stands in for the model inside an Engine and records the graph of each forward call it serves."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config
        self.graphs, self.widths = [], []  # widths: (input columns, cache slots attended) of each call

    def forward(self, input_ids, step, cache):
        self.graphs.append(capture_step(self.inner, input_ids, step, cache))
        self.widths.append((input_ids.shape[1], step.mask.shape[-1]))
        return self.inner(input_ids, step, cache)


@dataclass
class GraphRuns:
    """One captured graph of a request: its submodel, bucket (the static size of its shapes), MACs and runs."""

    submodel: str  # context_encoding_model or token_generation_model
    bucket: int  # prompt columns (context encoding) or cache slots attended (token generation)
    macs: MacCount
    runs: int


@dataclass
class RequestMacs:
    """MACs of one request: each distinct graph's count and how many times it ran."""

    graphs: list[GraphRuns]

    @property
    def total(self) -> MacCount:
        total = MacCount()
        for g in self.graphs:
            total = total.add(g.macs, g.runs)
        return total

    def report(self) -> dict:
        """benchmark_report.json's "kernel_flops": the ratio, MACs per op, and per graph (submodel and bucket)."""
        total = self.total
        return {"nki_flop_ratio": flop_ratio(total), "total_macs": total.total, "kernel_macs": total.kernel,
                "by_op": total.by_op, "kernel_ops": sorted(total.kernel_ops),
                "by_graph": [{"submodel": g.submodel, "bucket": g.bucket, "runs": g.runs,
                              "total_macs_per_run": g.macs.total, "kernel_macs_per_run": g.macs.kernel,
                              "nki_flop_ratio": flop_ratio(g.macs)} for g in self.graphs]}


def request_macs(model, input_ids, attention_mask, new_tokens: int, max_len: int, ctx_buckets: tuple = (),
                 tkg_buckets: tuple = ()) -> tuple[RequestMacs, list]:
    """MACs of one request, on graphs captured from `model` running this very input: the context-encoding graph
    once, and for each token-generation bucket its graph times the decode steps that fall in it (new_tokens - 1
    steps in all; without buckets one graph over the whole cache). Returns (count, graphs)."""
    from moebench.engine.generator import Engine

    probe = _Capturing(model)
    engine = Engine(probe, batch=input_ids.shape[0], max_len=max_len, ctx_buckets=ctx_buckets,
                    tkg_buckets=tkg_buckets)
    first = engine.prefill(input_ids, attention_mask).argmax(-1)
    runs = [GraphRuns("context_encoding_model", probe.widths[0][0], graph_macs(probe.graphs[0]), 1)]
    slots = range(engine.next_slot, engine.next_slot + new_tokens - 1)  # the decode steps' cache slots
    buckets = [engine.decode_width(slot) for slot in slots]
    for S in dict.fromkeys(buckets):  # each bucket once, in order
        engine.next_slot = slots[buckets.index(S)]  # a step's shapes depend on its slot only: one step per bucket
        engine.decode(first)
        runs.append(GraphRuns("token_generation_model", S, graph_macs(probe.graphs[-1]), buckets.count(S)))
    return RequestMacs(runs), probe.graphs
