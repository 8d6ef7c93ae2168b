"""The kernel FLOP ratio: multiply-accumulates counted on graphs captured from the submission as it ran."""

from dataclasses import dataclass, field
from math import prod

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from moebench.kernels.registry import KERNELS
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


# MACs of the matmul-like aten ops, from their argument shapes. Element-wise ops and lookups count zero.
MATMUL_MACS = {
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
        self.graphs = []

    def forward(self, input_ids, step, cache):
        self.graphs.append(capture_step(self.inner, input_ids, step, cache))
        return self.inner(input_ids, step, cache)


@dataclass
class RequestMacs:
    """MACs of one request, per submodel: each graph's count and how many times it ran."""

    context_encoding: MacCount
    token_generation: MacCount | None  # one decode step; None when a single token is generated
    decode_steps: int

    @property
    def total(self) -> MacCount:
        total = MacCount().add(self.context_encoding)
        return total.add(self.token_generation, self.decode_steps) if self.token_generation else total

    def report(self) -> dict:
        """benchmark_report.json's "kernel_flops": the ratio, MACs per op and per submodel."""
        total = self.total
        submodels = {"context_encoding_model": (self.context_encoding, 1),
                     "token_generation_model": (self.token_generation, self.decode_steps)}
        return {"nki_flop_ratio": flop_ratio(total), "total_macs": total.total, "kernel_macs": total.kernel,
                "by_op": total.by_op, "kernel_ops": sorted(total.kernel_ops),
                "by_submodel": {name: {"runs": runs, "total_macs_per_run": c.total, "kernel_macs_per_run": c.kernel,
                                       "nki_flop_ratio": flop_ratio(c)}
                                for name, (c, runs) in submodels.items() if c is not None}}


def request_macs(model, input_ids, attention_mask, new_tokens: int, max_len: int) -> tuple[RequestMacs, list]:
    """MACs of one request: the context-encoding graph once plus the token-generation graph for each of the
    new_tokens - 1 decode steps, both captured from `model` running this very input. Returns (count, graphs)."""
    from moebench.engine.generator import Engine

    probe = _Capturing(model)
    engine = Engine(probe, batch=input_ids.shape[0], max_len=max_len)
    first = engine.prefill(input_ids, attention_mask).argmax(-1)
    if new_tokens > 1:
        engine.decode(first)
    prefill, *decode = [graph_macs(g) for g in probe.graphs]
    return RequestMacs(prefill, decode[0] if decode else None, new_tokens - 1), probe.graphs
