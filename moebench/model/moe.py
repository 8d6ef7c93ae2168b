"""MoE routing and expert dispatch in plain torch: the reference math of the MoE block."""

import torch
import torch.nn.functional as F

from moebench.model import cpu_ops, onednn

# Legend: T tokens, D hidden size, I expert intermediate size, E experts, k experts per token.

# A CPU without fast bfloat16 matrix instructions (AVX2 only; Intel's AVX512-BF16 without AMX: onednn.FAST_BF16)
# runs torch's bfloat16 GEMM 2-5 times slower than its float32 GEMM. There a product of many rows runs in float32
# instead: the inputs upcast exactly, float32 accumulation as in the bfloat16 kernel, the result rounded back to
# bfloat16. (One-row products, decode's, are bound by reading the weights and stay in bfloat16.)
SLOW_BF16_CPU = not onednn.FAST_BF16
WIDE_ROWS = 16  # rows from which the float32 detour pays for converting the weights


def in_float32(x: torch.Tensor, rows: int) -> bool:
    """True when a bfloat16 product of `rows` rows of x should run in float32 on this machine."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and SLOW_BF16_CPU and rows >= WIDE_ROWS


def in_compiled_cpu_graph(x: torch.Tensor) -> bool:
    """True while torch.compile traces x's operations for the CPU (not torch.export: the MAC count reads its graph's
    library operators)."""
    return x.device.type == "cpu" and torch.compiler.is_compiling() and not torch.compiler.is_exporting()


def linear(layer: torch.nn.Linear, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """layer(x) (residual + layer(x) with `residual`): for one row on the CPU, eagerly or in a compiled graph, C++ dot
    products (moebench.model.cpu_ops; in a compiled graph without them, a reduction); for many rows on the CPU
    outside compiled graphs, C++ register tiles on the weight packed once into panels (cpu_ops.linear_panels, the add
    fused in) where they run, else oneDNN with the weight packed once (moebench.model.onednn); in float32 where
    in_float32 says so. Layers other than a plain nn.Linear (the tensor-parallel ones, a submission's own) run their
    own forward."""
    if type(layer) is not torch.nn.Linear:
        return layer(x) if residual is None else residual + layer(x)
    rows = x.numel() // x.shape[-1]
    wide = in_float32(x, rows)
    dtype = torch.float32 if wide else x.dtype
    if rows > 1 and layer.bias is None and cpu_ops.products_usable(x, layer.weight, dtype):
        # A prompt's product: the tiles ask the cache for the next panel of weights as they go, where oneDNN waits for
        # weights the experts' stream pushed out of the caches (Zen 4 VM, 402 rows, the caches flushed: bfloat16
        # 388-398 against 352-376 GFLOP/s, float32 199-206 against 191-202; as fast with the weights in the caches).
        fused = (residual is not None and dtype == x.dtype == residual.dtype
                 and residual.shape == (*x.shape[:-1], layer.out_features))
        y = torch.ops.moebench_cpu.linear_panels(x.reshape(rows, -1).to(dtype), cpu_ops.packed_for(layer.weight, dtype),
                                                 residual.reshape(rows, -1) if fused else None)
        y = y.to(x.dtype).reshape(*x.shape[:-1], -1)
        return y if residual is None or fused else residual + y
    y = _linear(layer, x, rows, dtype)
    return y if residual is None else residual + y


def _linear(layer: torch.nn.Linear, x: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    compiled, y = in_compiled_cpu_graph(x), None
    if rows == 1 and not torch.compiler.is_exporting() and cpu_ops.usable(x, layer.weight):
        # One C++ loop of dot products, at the memory's speed: in compiled decode steps, and eagerly (a prompt's LM
        # head: ~1 ms faster than oneDNN's product in bfloat16, ~0.4 ms in float32, on the Xeon VM). Exported
        # graphs keep the linear (below): the MAC count reads it.
        y = torch.ops.moebench_cpu.linear_row(x.reshape(1, -1), layer.weight)
    elif rows == 1 and compiled:
        # Decode's one-row products are bound by reading the weights. The CPU library's matrix-vector product
        # leaves cores idle; as a multiply-and-sum the compiler splits the output rows over every thread and
        # fuses the bias and the next operations. (Exported graphs keep the linear: the MAC count reads it.)
        y = (layer.weight * x.reshape(1, -1)).sum(-1)
    if y is not None:
        if layer.bias is not None:
            y = y + layer.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)
    if onednn.usable(x, dtype):
        bias = None if layer.bias is None else layer.bias.to(dtype)
        return onednn.linear(x.to(dtype), onednn.packed(layer.weight, dtype), bias).to(x.dtype)
    if dtype == x.dtype:
        return layer(x)
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias).to(x.dtype)


def route(router_logits: torch.Tensor, k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (topk_ids [T, k], topk_weights [T, k] in the logits' dtype).

    As transformers: softmax in float32 over all experts, top-k of the probabilities, renormalised to sum 1
    when norm_topk_prob, then cast back."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights.to(router_logits.dtype)


def route_tokens(gate: torch.nn.Linear, x: torch.Tensor, k: int, norm_topk_prob: bool):
    """route(linear(gate, x), k, norm_topk_prob): outside compiled and exported graphs on the CPU in one C++ call
    (cpu_ops' route_rows: the router's products, softmax and top-k; where the choice hangs on a tie, torch's own
    softmax and top-k), else in torch. Layers other than a plain nn.Linear run their own forward."""
    if (type(gate) is torch.nn.Linear and gate.bias is None and not torch.compiler.is_compiling()
            and cpu_ops.usable(x, gate.weight)):
        return torch.ops.moebench_cpu.route_rows(x, gate.weight, k, norm_topk_prob)
    return route(linear(gate, x), k, norm_topk_prob)


def _grouped_mm_supported(x: torch.Tensor, w_down: torch.Tensor) -> bool:
    # torch's grouped GEMM runs any float dtype on the CPU, on CUDA only bfloat16 (sm90+), and in a compiled graph
    # (whose shape checks insist on bfloat16) only bfloat16; every operand's rows must be 16-byte aligned.
    D, I = w_down.shape[1:]
    aligned = all(n * x.element_size() % 16 == 0 for n in (D, I))
    bf16 = x.dtype == torch.bfloat16
    device_ok = (x.device.type == "cpu" and (bf16 or not torch.compiler.is_compiling())) or (
        bf16 and torch.cuda.get_device_capability(x.device)[0] >= 9)
    return aligned and device_ok


def _expert_mlp(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, dtype: torch.dtype):
    """mlp(rows, e): expert e's SwiGLU MLP of rows of x, computed in `dtype` (the result stays in it)."""
    if dtype == torch.float32 and cpu_ops.panels_usable(x, w_gate_up) and cpu_ops.panels_usable(x, w_down):
        w1, w2, product = cpu_ops.panels(w_gate_up), cpu_ops.panels(w_down), torch.ops.moebench_cpu.linear_panels
    elif onednn.usable(x, dtype):
        w1, w2, product = onednn.packed(w_gate_up, dtype), onednn.packed(w_down, dtype), onednn.linear
    else:
        w1, w2 = w_gate_up, w_down

        def product(rows, w):
            return F.linear(rows, w.to(dtype))

    def mlp(rows: torch.Tensor, e: int) -> torch.Tensor:
        gate, up = product(rows.to(dtype), w1[e]).chunk(2, dim=-1)
        return product(F.silu(gate) * up, w2[e])
    return mlp


def prompt_experts_dtype(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, k: int):
    """The dtype of the panels with which the C++ operator moe_prompt computes a prompt's experts here (x [T, D], T >
    1, k experts a token; eager, on the CPU): float32, or bfloat16 pairs; None where the torch code computes them."""
    T, E = x.shape[0], w_gate_up.shape[0]
    if T == 1 or torch.compiler.is_exporting() or not cpu_ops.experts_usable(x, w_gate_up, w_down, k):
        return None
    dtype = torch.float32 if in_float32(x, T * k // E) else x.dtype
    return dtype if dtype == torch.float32 or cpu_ops.pair_panels_usable(x) else None


def experts_forward(x, w_gate_up, w_down, topk_ids, topk_weights, residual=None):
    """x [T, D], w_gate_up [E, 2I, D] (gate rows first), w_down [E, D, I] -> [T, D].

    out[t] = sum_j topk_weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = topk_ids[t, j]; with residual
    [T, D], residual + out (the add fused into the C++ prompt operator where it runs)."""
    out, added = _experts(x, w_gate_up, w_down, topk_ids, topk_weights, residual)
    return out if residual is None or added else residual + out


def _experts(x, w_gate_up, w_down, topk_ids, topk_weights, residual) -> tuple[torch.Tensor, bool]:
    """experts_forward's result, and whether the residual is added in."""
    T, D = x.shape
    E, k = w_gate_up.shape[0], topk_ids.shape[1]
    exporting = torch.compiler.is_exporting()
    if T == 1 and torch.compiler.is_compiling() and not exporting:
        if cpu_ops.usable(x, w_gate_up):  # the k experts in one C++ operator, at the memory's speed
            return torch.ops.moebench_cpu.moe_decode(x, topk_ids, topk_weights.to(x.dtype), w_gate_up, w_down), False
        # One token, in a compiled graph: gather the k experts; the compiler fuses the gather into the products.
        ids, w = topk_ids[0], topk_weights[0]
        gate, up = (w_gate_up[ids] * x[0][None, None, :]).sum(-1).chunk(2, dim=-1)  # [k, I] each
        h = F.silu(gate) * up
        y = (w_down[ids] * h[:, None, :]).sum(-1)  # [k, D]
        return (y * w[:, None]).sum(0, keepdim=True).to(x.dtype), False
    if T == 1 and not exporting:
        # One token (batch-1 decode): read only its k experts' weights, as NxDI's selective loading does.
        mlp = _expert_mlp(x, w_gate_up, w_down, x.dtype)
        out = torch.zeros_like(x)
        for e, w in zip(topk_ids[0].tolist(), topk_weights[0]):
            out += mlp(x, e) * w
        return out, False
    wide = in_float32(x, T * k // E) and not exporting  # each expert's weights upcast in the loop below
    dtype = torch.float32 if wide else x.dtype
    panels = prompt_experts_dtype(x, w_gate_up, w_down, k) if topk_ids.dtype == torch.int64 else None
    if panels is not None:
        # The same math in one C++ call: the sort, the products (weights in panels: float32, or bfloat16 pairs for
        # AVX512-BF16's dot products), silu, weighting and sum.
        w1, w2 = cpu_ops.packed_for(w_gate_up, panels), cpu_ops.packed_for(w_down, panels)
        fused = residual is not None and residual.dtype == x.dtype and residual.shape == x.shape
        return torch.ops.moebench_cpu.moe_prompt(x, topk_ids, topk_weights.to(x.dtype), w1, w2,
                                                 residual if fused else None), fused
    # Sort the T*k (token, expert) pairs by expert, then one grouped GEMM per projection.
    flat_ids = topk_ids.flatten()  # [T*k]
    order = flat_ids.argsort(stable=True)
    token_of = order // k  # source token of each sorted row
    xs = x.to(dtype)[token_of]  # [T*k, D], upcast before the gather: T rows, not T*k
    if _grouped_mm_supported(x, w_down) and not wide and not onednn.usable(x, dtype):
        counts = torch.zeros(E, dtype=torch.int32, device=x.device).index_add_(
            0, flat_ids, torch.ones_like(flat_ids, dtype=torch.int32))  # tokens per expert, a static shape
        offs = counts.cumsum(0, dtype=torch.int32)
        gate, up = F.grouped_mm(xs, w_gate_up.transpose(1, 2), offs=offs).chunk(2, dim=-1)
        ys = F.grouped_mm(F.silu(gate) * up, w_down.transpose(1, 2), offs=offs)  # [T*k, D]
    elif exporting:
        # torch.export (the compile step's graphs): per-expert slices would have data-dependent sizes, so each
        # row meets its expert's gathered weights in a batched matmul: the same multiply-accumulates.
        ids = flat_ids[order]
        gate, up = torch.bmm(w_gate_up[ids], xs[:, :, None])[..., 0].chunk(2, dim=-1)
        ys = torch.bmm(w_down[ids], (F.silu(gate) * up)[:, :, None])[..., 0]
    else:
        # Each expert's rows, one expert after another (on the CPU through oneDNN's packed weights, faster here
        # than torch's grouped GEMM: 450 against 380 GFLOP/s in bfloat16, 260 against 135 in float32).
        counts = torch.bincount(flat_ids, minlength=E)
        mlp = _expert_mlp(x, w_gate_up, w_down, dtype)
        ys = torch.empty_like(xs, dtype=dtype)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                ys[start:start + n] = mlp(xs[start:start + n], e)
                start += n
    # In place: a new [T*k, D] buffer is mostly page faults (~1 ms for moebench-speed's float32 prompt).
    ys.mul_(topk_weights.flatten()[order, None])
    return torch.zeros_like(x).index_add_(0, token_of, ys.to(x.dtype)), False
