"""MoE routing and expert dispatch in plain torch: the reference math of the MoE block."""

import torch
import torch.nn.functional as F

# Legend: T tokens, D hidden size, I expert intermediate size, E experts, k experts per token.

# A CPU without bfloat16 matrix instructions (no AVX512-BF16 or AMX: AVX2 only) runs torch's bfloat16 GEMM about
# five times slower than its float32 GEMM. There a product of many rows runs in float32 instead: the inputs upcast
# exactly, float32 accumulation as in the bfloat16 kernel, the result rounded back to bfloat16. (One-row products,
# decode's, are bound by reading the weights and stay in bfloat16.)
SLOW_BF16_CPU = not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
WIDE_ROWS = 16  # rows from which the float32 detour pays for converting the weights


def in_float32(x: torch.Tensor, rows: int) -> bool:
    """True when a bfloat16 product of `rows` rows of x should run in float32 on this machine."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and SLOW_BF16_CPU and rows >= WIDE_ROWS


def in_compiled_cpu_graph(x: torch.Tensor) -> bool:
    """True while torch.compile traces x's operations for the CPU (not torch.export: the MAC count reads its graph's
    library operators)."""
    return x.device.type == "cpu" and torch.compiler.is_compiling() and not torch.compiler.is_exporting()


def linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """layer(x): as a reduction for one row in a compiled graph, in float32 where in_float32 says so. Layers other
    than a plain nn.Linear (the tensor-parallel ones, a submission's own) run their own forward."""
    if type(layer) is not torch.nn.Linear:
        return layer(x)
    rows = x.numel() // x.shape[-1]
    if rows == 1 and in_compiled_cpu_graph(x):
        # Decode's one-row products are bound by reading the weights. The CPU library's matrix-vector product
        # leaves cores idle; as a multiply-and-sum the compiler splits the output rows over every thread and
        # fuses the bias and the next operations. (Exported graphs keep the linear: the MAC count reads it.)
        y = (layer.weight * x.reshape(1, -1)).sum(-1)
        if layer.bias is not None:
            y = y + layer.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)
    if not in_float32(x, rows):
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


def _grouped_mm_supported(x: torch.Tensor, w_down: torch.Tensor) -> bool:
    # torch's grouped GEMM runs any float dtype on the CPU, on CUDA only bfloat16 (sm90+), and in a compiled graph
    # (whose shape checks insist on bfloat16) only bfloat16; every operand's rows must be 16-byte aligned.
    D, I = w_down.shape[1:]
    aligned = all(n * x.element_size() % 16 == 0 for n in (D, I))
    bf16 = x.dtype == torch.bfloat16
    device_ok = (x.device.type == "cpu" and (bf16 or not torch.compiler.is_compiling())) or (
        bf16 and torch.cuda.get_device_capability(x.device)[0] >= 9)
    return aligned and device_ok


def experts_forward(x, w_gate_up, w_down, topk_ids, topk_weights):
    """x [T, D], w_gate_up [E, 2I, D] (gate rows first), w_down [E, D, I] -> [T, D].

    out[t] = sum_j topk_weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = topk_ids[t, j]."""
    T, D = x.shape
    E, k = w_gate_up.shape[0], topk_ids.shape[1]
    exporting = torch.compiler.is_exporting()
    if T == 1 and torch.compiler.is_compiling() and not exporting:
        # One token, in a compiled graph: gather the k experts; the compiler fuses the gather into the products.
        ids, w = topk_ids[0], topk_weights[0]
        gate, up = (w_gate_up[ids] * x[0][None, None, :]).sum(-1).chunk(2, dim=-1)  # [k, I] each
        h = F.silu(gate) * up
        y = (w_down[ids] * h[:, None, :]).sum(-1)  # [k, D]
        return (y * w[:, None]).sum(0, keepdim=True).to(x.dtype)
    if T == 1 and not exporting:
        # One token (batch-1 decode): read only its k experts' weights, as NxDI's selective loading does.
        out = torch.zeros_like(x)
        for e, w in zip(topk_ids[0].tolist(), topk_weights[0]):
            gate, up = F.linear(x, w_gate_up[e]).chunk(2, dim=-1)
            out += F.linear(F.silu(gate) * up, w_down[e]) * w
        return out
    # Sort the T*k (token, expert) pairs by expert, then one grouped GEMM per projection.
    flat_ids = topk_ids.flatten()  # [T*k]
    order = flat_ids.argsort(stable=True)
    token_of = order // k  # source token of each sorted row
    xs = x[token_of]  # [T*k, D]
    wide = in_float32(x, T * k // E) and not exporting  # each expert's weights upcast in the loop below
    if _grouped_mm_supported(x, w_down) and not wide:
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
        counts = torch.bincount(flat_ids, minlength=E)
        ys = torch.empty_like(xs, dtype=torch.float32 if wide else x.dtype)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                rows, w1, w2 = xs[start:start + n], w_gate_up[e], w_down[e]
                if wide:
                    rows, w1, w2 = rows.float(), w1.float(), w2.float()
                gate, up = F.linear(rows, w1).chunk(2, dim=-1)
                ys[start:start + n] = F.linear(F.silu(gate) * up, w2)
                start += n
    ys = ys * topk_weights.flatten()[order, None]
    return torch.zeros_like(x).index_add_(0, token_of, ys.to(x.dtype))
