"""The kernel FLOP ratio: multiply-accumulates counted on graphs captured from the submission as it ran."""

import contextlib
import operator
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from math import prod

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode

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


def _attention_block_macs(x, norm, norm_eps, qkv, q_norm, k_norm, eps, cos, sin, cache_k, cache_v, layer, slots, mask,
                          scale, wo):
    """moebench_cpu::attention_block_prompt: the q, k, v and output projections of x's rows (each panel tensor holds
    its weight's N K elements), and the attention over the mask's S keys (the output projection's K = H d)."""
    rows, hd_total = prod(_shape(x)[:-1]), prod(_shape(wo)) // _shape(x)[-1]
    projections = sum(prod(_shape(p)) for p in qkv) + prod(_shape(wo))
    return rows * projections + 2 * rows * _shape(mask)[-1] * hd_total


def _matmul_macs(a, b, *_):
    """torch.matmul with broadcasting: every output element is a dot product over a's last dim."""
    A, B = _shape(a), _shape(b)
    if len(B) == 1:
        return prod(A)
    batch = torch.broadcast_shapes(A[:-2], B[:-2]) if len(A) > 1 else B[:-2]
    rows = A[-2] if len(A) > 1 else 1
    return prod(batch) * rows * A[-1] * B[-1]


def _einsum_macs(equation, operands, *_):
    """torch.einsum contracted left to right, as torch does without opt_einsum: each pairwise product costs the
    sizes of every index either side holds, and keeps the indices a later operand or the output needs ("..."
    stands for the broadcast dims, aligned from the right)."""
    inputs, _, output = equation.replace(" ", "").partition("->")
    labels, sizes = [], {}
    for letters, t in zip(inputs.split(","), operands):
        shape = _shape(t)
        pre, _, post = letters.partition("...")
        n = len(shape) - len(pre) - len(post) if "..." in letters else 0
        names = [*pre, *(f"...{n - i}" for i in range(n)), *post]
        for name, size in zip(names, shape):
            sizes[name] = max(sizes.get(name, 1), size)
        labels.append(set(names))
    kept = {c for c in sizes if c.startswith("...")} | set(output) if "->" in equation else \
        {c for c in sizes if c.startswith("...") or sum(c in names for names in labels) == 1}
    held, macs = labels[0], 0
    for i, names in enumerate(labels[1:], 2):
        both = held | names
        macs += prod(sizes[c] for c in both)
        later = set().union(*labels[i:]) | kept
        held = both & later
    return macs


def _tensordot_macs(a, b, dims_a, dims_b, *_):
    A, B = _shape(a), _shape(b)
    return prod(A) * prod(d for i, d in enumerate(B) if i not in {x % len(B) for x in dims_b})


# MACs of the matmul-like aten ops, from their argument shapes. Element-wise ops and lookups count zero. Graphs
# traced while running (make_fx) hold the decomposed ops (mm, addmm, the backend's attention); torch.export's
# graphs (the compile step's) keep linear, matmul, einsum and scaled_dot_product_attention whole.
MATMUL_MACS = {
    aten.linear.default: lambda x, w, *_: prod(_shape(x)[:-1]) * prod(_shape(w)),
    aten.matmul.default: _matmul_macs,
    aten.einsum.default: _einsum_macs,
    aten.tensordot.default: _tensordot_macs,
    aten.scaled_dot_product_attention.default: _attention_macs,
    aten.mm.default: lambda a, b, *_: prod(_shape(a)) * _shape(b)[-1],
    aten.mv.default: lambda a, b, *_: prod(_shape(a)),
    aten.dot.default: lambda a, b, *_: prod(_shape(a)),
    aten.vdot.default: lambda a, b, *_: prod(_shape(a)),
    aten.addmm.default: lambda bias, a, b, *_: prod(_shape(a)) * _shape(b)[-1],
    aten.addmv.default: lambda bias, a, b, *_: prod(_shape(a)),
    aten.bmm.default: lambda a, b, *_: prod(_shape(a)) * _shape(b)[-1],
    aten.baddbmm.default: lambda c, a, b, *_: prod(_shape(a)) * _shape(b)[-1],
    aten.addbmm.default: lambda c, a, b, *_: prod(_shape(a)) * _shape(b)[-1],
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
MATMUL_BY_NAME = {str(op): f for op, f in MATMUL_MACS.items()}

# moebench's C++ CPU operators (moebench.model.cpu_ops, loaded at run time: keyed by name), counted as the library
# operators they stand in for: a prompt's attention over every key, a product against a weight in panels or of one
# row, the router's product (with its softmax and top-k), the experts' products.
CPU_OP_MACS = {
    "moebench_cpu::attend_block": _attention_macs,
    "moebench_cpu::linear_panels": lambda x, panels, *_: prod(_shape(x)[:-1]) * prod(_shape(panels)),  # (pairs too)
    "moebench_cpu::linear_row": lambda x, w: prod(_shape(x)[:-1]) * prod(_shape(w)),  # a prompt's LM head, eager
    "moebench_cpu::route_rows": lambda x, router, *_: prod(_shape(x)[:-1]) * prod(_shape(router)),
    # A prompt's experts: each (token, expert) pair through one expert's gate, up and down products.
    "moebench_cpu::moe_prompt": lambda x, ids, weights, gate_up, down, *_: prod(_shape(ids)) * (
        prod(_shape(gate_up)[1:]) + prod(_shape(down)[1:])),
    "moebench_cpu::attention_block_prompt": _attention_block_macs,
    # A prompt's MoE block: the router's product, then k experts a token.
    "moebench_cpu::moe_block_prompt": lambda x, norm, eps, router, k, norm_topk, gate_up, down: prod(_shape(x)[:-1]) * (
        prod(_shape(router)) + k * (prod(_shape(gate_up)[1:]) + prod(_shape(down)[1:]))),
}


@dataclass
class MacCount:
    total: int = 0
    kernel: int = 0
    by_op: dict = field(default_factory=dict)  # op name -> MACs
    kernel_ops: frozenset = frozenset()  # the names in by_op that are registered kernels
    uncredited: frozenset = frozenset()  # registered kernels whose MACs count as the library's (described_macs)

    def add(self, other: "MacCount", times: int = 1) -> "MacCount":
        by_op = dict(self.by_op)
        for k, v in other.by_op.items():
            by_op[k] = by_op.get(k, 0) + v * times
        return MacCount(self.total + other.total * times, self.kernel + other.kernel * times, by_op,
                        self.kernel_ops | other.kernel_ops, self.uncredited | other.uncredited)


class BadCount(ValueError):
    """A graph description or a kernel's MAC count that the harness cannot count from."""


# Namespaces whose ops the harness counts by its own formulas (or as zero), whatever the submission declares.
HARNESS_NAMESPACES = ("aten", "prims", "mkldnn", "moebench", "moebench_cpu", "quantized", "_quantized")


def describe(gm: torch.fx.GraphModule) -> list:
    """What the harness counts a graph's MACs from, as plain data: for each op node [target, args, declared], where
    args are its arguments (a tensor as {"shape", "dtype"}) and declared the MACs a kernel registered in this
    process gives itself (the submission's formula; None for other ops). Runs where the graph was made (the
    submission's process); `described_macs` counts, in the harness's."""
    nodes = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        values = [_meta_val(a) for a in (*node.args, *node.kwargs.values())]
        kernel = KERNELS.get(node.target._schema.name)
        declared = _declared(kernel.macs(*values)) if kernel is not None else None
        nodes.append([str(node.target), [_plain(v) for v in values], declared])
    return nodes


def _declared(macs):
    """A kernel formula's result as plain data, for `described_macs` to accept or refuse (a whole number, at least
    0): a count that is not one is refused there, with the harness's message, in either process."""
    try:
        return operator.index(macs)
    except TypeError:
        return macs if isinstance(macs, (float, str)) else repr(macs)


def _meta_val(arg):
    if isinstance(arg, torch.fx.Node):
        return arg.meta.get("val")
    return [_meta_val(a) for a in arg] if isinstance(arg, (list, tuple)) else arg


def _plain(value):
    if isinstance(value, torch.Tensor):
        return {"shape": [int(d) for d in value.shape], "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return None  # a dtype, a device, a symbolic size: no formula reads them


def _value(value):
    """A described argument for a formula: a tensor as a meta tensor of its shape (nothing allocated)."""
    if isinstance(value, dict):
        shape = value.get("shape")
        if not (isinstance(shape, list) and len(shape) <= 16 and all(type(d) is int and d >= 0 for d in shape)):
            raise BadCount(f"a tensor described with the shape {shape!r}")
        dtype = getattr(torch, str(value.get("dtype")), None)
        return torch.empty(shape, dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32, device="meta")
    if isinstance(value, list):
        return [_value(v) for v in value]
    return value


# The dispatch keys below the Python key's: an op's own implementation, without the modes above it.
_BELOW_PYTHON = torch._C._dispatch_keyset_full_after(torch._C.DispatchKey.Python)
# Library products by operator name, any overload (out= variants too): the matmul-like aten ops, moebench's CPU
# operators, and the products no graph of the model holds but a kernel's own code could call (under inference mode a
# composite op reaches the check whole: F.bilinear as aten::bilinear, not the _trilinear inside).
LIBRARY_PRODUCTS = {op._schema.name for op in MATMUL_MACS} | set(CPU_OP_MACS) | {
    f"aten::{name}" for name in ("convolution", "_convolution", "conv1d", "conv2d", "conv3d", "_int_mm", "_scaled_mm",
                                 "_weight_int8pack_mm", "_weight_int4pack_mm", "mkldnn_linear", "chain_matmul",
                                 "linalg_multi_dot", "inner", "outer", "ger", "kron", "_trilinear", "_cdist_forward",
                                 "_pdist_forward", "_addmm_activation", "_flash_attention_forward",
                                 "_efficient_attention_forward", "cudnn_convolution", "mkldnn_convolution",
                                 "_slow_conv2d_forward", "convolution_overrideable", "bilinear", "linalg_vecdot",
                                 "cdist", "addr", "cosine_similarity", "linalg_matmul", "matrix_power",
                                 "linalg_matrix_power", "_sparse_mm", "sspaddmm", "hspmm", "_sparse_addmm",
                                 "fbgemm_linear_fp16_weight", "_convolution_mode", "conv_transpose1d",
                                 "conv_transpose2d", "conv_transpose3d", "conv_tbc", "_conv_depthwise2d")}


# Namespaces of library ops, whose insides the kernel check does not walk (every other op is the submission's own).
LIBRARY_NAMESPACES = (*HARNESS_NAMESPACES, "_c10d_functional", "c10d", "c10d_functional", "_dtensor", "triton",
                      "inductor", "profiler", "debugprims", "rngprims", "higher_order")


def library_op(name: str) -> bool:
    """True for an op ("namespace::name") of the library or the harness, not of the submission."""
    return name.partition("::")[0] in LIBRARY_NAMESPACES


# Torch's arithmetic, element by element: the aten ops tagged pointwise or reduction (copies and selections aside),
# the _foreach_ ops, the arithmetic prims, the norms and pools that scale and sum, and the ops that sum rows they
# gather (an accumulating index_put too). A kernel whose own code runs at least this share of its formula's MACs in
# them in one call computes with torch (`(x[:, None] * w).sum(-1)`: 2 elements a MAC), not in code of its own;
# moebench's kernels run at most 0.0015 (the experts' routing and sorting). A torch step around an honest kernel's
# products costs it its credit only where it is that large against them (the weights dequantized in torch for a
# product of one row: 1-2 elements a MAC; rotating q and k in torch inside a 402-token attention kernel: ~0.01).
TORCH_ARITHMETIC_SHARE = 0.25
_MOVES = {f"aten::{name}" for name in ("clone", "where", "masked_fill", "masked_fill_", "fill_", "zero_",
                                       "lift_fresh_copy", "copy_", "_to_copy")}
_SUMS_OF_ROWS = {f"aten::{name}" for name in ("bincount", "index_add", "index_add_", "scatter_add", "scatter_add_",
                                               "scatter_reduce", "scatter_reduce_", "index_reduce", "index_reduce_",
                                               "cumsum", "cumsum_", "cumprod", "cumprod_", "_segment_reduce")}
_EMBEDDING_BAGS = {f"aten::{name}" for name in ("embedding_bag", "_embedding_bag", "_embedding_bag_forward_only")}
_ACCUMULATING_PUTS = {f"aten::{name}" for name in ("index_put", "index_put_", "_index_put_impl_", "_unsafe_index_put",
                                                   "put", "put_")}  # (self, indices, values, accumulate, ...)
_OTHER_ARITHMETIC = {
    *(f"prims::{name}" for name in ("mul", "div", "add", "sub", "sum", "prod", "pow", "exp", "exp2", "log", "log2",
                                    "amax", "amin", "var", "xor_sum")),
    *(f"aten::{name}" for name in ("batch_norm", "instance_norm", "layer_norm", "group_norm", "prelu", "trapezoid",
                                   "trapz", "cumulative_trapezoid", "pairwise_distance", "native_batch_norm",
                                   "_native_batch_norm_legit",
                                   "_native_batch_norm_legit_no_training", "cudnn_batch_norm", "miopen_batch_norm",
                                   "native_layer_norm", "native_group_norm", "_prelu_kernel", "avg_pool1d",
                                   "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "_adaptive_avg_pool2d",
                                   "_adaptive_avg_pool3d", "mkldnn_adaptive_avg_pool2d"))}


def _arithmetic_elements(func, args, kwargs, out) -> int:
    """The elements one call of an op computes, if it is torch's arithmetic (above): the larger of its outputs' and
    its largest tensor argument's (a sum reads many to write few); the rows an embedding bag adds; the values an
    accumulating index_put adds. 0 for other ops."""
    name = func._schema.name
    tensor = torch.Tensor
    if name in _EMBEDDING_BAGS and len(args) > 1 and isinstance(args[0], tensor) and isinstance(args[1], tensor):
        return args[1].numel() * args[0].shape[-1]  # (weight, indices, ...): each index adds a row of the weight
    if name in _ACCUMULATING_PUTS:  # a write (the KV cache's) adds nothing
        accumulate = kwargs.get("accumulate", args[3] if len(args) > 3 else False)
        return args[2].numel() if accumulate is True and len(args) > 2 and isinstance(args[2], tensor) else 0
    if name in _MOVES or not (name in _SUMS_OF_ROWS or name in _OTHER_ARITHMETIC or name.startswith("aten::_foreach_")
                              or {torch.Tag.pointwise, torch.Tag.reduction} & set(func.tags)):
        return 0
    leaves = torch.utils._pytree.tree_leaves
    outputs = sum(t.numel() for t in leaves(out) if isinstance(t, tensor))
    if name.startswith("aten::_foreach_"):  # lists of tensors, updated in place: the first list's elements
        outputs = max(outputs, sum(t.numel() for t in leaves(args[:1]) if isinstance(t, tensor)))
    return max([outputs, *(t.numel() for t in leaves((args, kwargs)) if isinstance(t, tensor))])


def schema_of(target: str) -> str:
    """A described node's target ("ns.op.overload") as its operator's name ("ns::op")."""
    namespace, _, rest = target.partition(".")
    return f"{namespace}::{rest.rsplit('.', 1)[0]}"


def _below_python(mode, func, args, kwargs):
    """func's own implementation with `mode` on, so that the ops it calls are seen one by one (a mode is off
    while its handler runs); None where it cannot be reached that way (no tensor argument, a dispatch the keys
    of its tensors do not resolve): the caller then runs it as usual, unseen."""
    tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if not tensors:
        return None
    keys = torch._C._dispatch_keys(tensors[0])
    for t in tensors[1:]:
        keys = keys | torch._C._dispatch_keys(t)
    try:
        with mode:
            return (func.redispatch(keys & _BELOW_PYTHON, *args, **kwargs),)
    except (NotImplementedError, RuntimeError):  # the kernel's own error, if any, comes again from the usual call
        return None


def _call_macs(formula, args, kwargs) -> int:
    """MACs of one real call by `formula` (0 without one, or where it fails on the arguments: for a kernel's own
    formula, the count's description of the graphs then faults it)."""
    try:
        return max(0, int(formula(*args, *kwargs.values()))) if formula is not None else 0
    except Exception:  # noqa: BLE001
        return 0


def _library_macs(func, args, kwargs) -> int:
    """A library product's MACs by the harness's formulas (0 for other ops, and for the products it has no
    formula for)."""
    return _call_macs(MATMUL_BY_NAME.get(str(func)) or CPU_OP_MACS.get(func._schema.name), args, kwargs)


class _LibraryProducts(TorchDispatchMode):
    """While one call of a kernel runs: the first library product its implementation calls, also from inside
    other ops of the submission's (custom ops it calls), the MACs of all of them, and the elements of torch's
    arithmetic it runs."""

    def __init__(self, kernel):
        super().__init__()
        self.kernel, self.first, self.macs, self.elements = kernel, None, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if func is self.kernel or not library_op(name):
            out = _below_python(self, func, args, kwargs)
            if out is not None:
                return out[0]
        elif name in LIBRARY_PRODUCTS and not (name == "aten::einsum" and len(args[1]) < 2):
            self.first = self.first or str(func)  # (an einsum of one operand is a sum, not a product)
            self.macs += _library_macs(func, args, kwargs)
        out = func(*args, **kwargs)
        self.elements += _arithmetic_elements(func, args, kwargs, out)  # (0 for a product)
        return out


class _KernelsCallingLibrary(TorchDispatchMode):
    """While active: the registered kernels called, for each the first library product its own code calls, the
    MACs of every library product (in the kernels' code too), and the kernels whose code computes in torch's
    arithmetic (a call's elements at least TORCH_ARITHMETIC_SHARE of its MACs): {kernel: [elements, MACs]}."""

    def __init__(self):
        super().__init__()
        self.found, self.called, self.library_macs, self.in_torch = {}, set(), 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name not in KERNELS:
            if not library_op(name):  # the submission's own op, not registered: the library products it runs
                out = _below_python(self, func, args, kwargs)  # are seen (and counted)
                if out is not None:
                    return out[0]
            self.library_macs += _library_macs(func, args, kwargs)
            return func(*args, **kwargs)
        self.called.add(str(func))
        with _LibraryProducts(func) as inside:
            out = func(*args, **kwargs)
        if inside.first is not None:
            self.found.setdefault(str(func), inside.first)
        self.library_macs += inside.macs
        declared = _call_macs(KERNELS[func._schema.name].macs, args, kwargs)
        if declared and inside.elements >= TORCH_ARITHMETIC_SHARE * declared:
            self.in_torch.setdefault(str(func), [inside.elements, declared])
        return out


@dataclass
class KernelCheck:
    """What check_kernels saw of the registered kernels as one request's graphs ran eagerly."""

    calling_library: dict  # {kernel op: the first library product its own code calls}
    computing_in_torch: dict  # {kernel op: [elements of torch's arithmetic, MACs] of a call that computed in torch}
    called: list  # the kernel ops called
    library_macs: dict  # {(submodel, bucket): the MACs of the library products run in its step}


def check_kernels(model, input_ids, attention_mask, new_tokens: int, max_len: int, ctx_buckets: tuple = (),
                  tkg_buckets: tuple = (), cache=None) -> KernelCheck:
    """Where the submission runs, each of one request's graphs run once, eagerly, at its own shapes
    (each_graph_once), every op seen. The count credits none of a kernel that hands its products to torch (or to
    moebench's CPU operators) or computes them with torch's element-wise ops and reductions, nor of one of the
    graphs' kernels that never runs outside the tracing (a branch on torch.compiler.is_exporting); and a graph's
    kernel MACs only up to what the library's products, as they ran, leave of the graph's MACs (a kernel called for
    show while torch does the work). (The model's own process answers: one lying about itself is the reviewer's to
    find.) Dynamo stands aside meanwhile: a frame it met under the modes would be left eager for good. cache: as in
    each_graph_once."""
    library = {}
    with torch.compiler.set_stance("force_eager"), _KernelsCallingLibrary() as mode:
        for submodel, bucket, _ in each_graph_once(model, input_ids, attention_mask, new_tokens, max_len,
                                                   ctx_buckets, tkg_buckets, cache):
            library[(submodel, bucket)], mode.library_macs = mode.library_macs, 0
    return KernelCheck(mode.found, mode.in_torch, sorted(mode.called), library)


def kernel_calls(step, graph: torch.fx.GraphModule | None = None) -> dict:
    """{kernel op name: calls} of every registered kernel while step() runs, as torch's profiler sees the
    dispatcher's calls: a compiled graph calls its custom ops through the dispatcher too (a CUDA graph's replay does
    not). With `graph`, a call counts only at the arguments of one of the graph's nodes of that kernel (each node
    matched once): a kernel called on a slice of what the graph gives it is not the graph's call. Arguments
    compared: each tensor's shape and each number (a list of tensors, a string, a dtype are not recorded)."""
    overloads = torch._C._profiler._ExperimentalConfig(capture_overload_names=True)  # ('' for .default)
    with quiet_profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=graph is not None,
                       experimental_config=overloads) as profile:
        step()
    held = None if graph is None else [
        _node_arguments(n) for n in graph.graph.nodes
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.name in KERNELS]
    calls = Counter()
    for e in profile.events():
        if e.name not in KERNELS:
            continue
        if held is not None:
            call = _call_arguments(e)
            node = next((n for n in held if len(n) == len(call) and all(
                a == "*" or a == b for a, b in zip(n, call))), None)
            if node is None:
                continue
            held.remove(node)
        calls[e.name] += 1
    # (a torch.library.triton_op's Triton kernels are launched by compiled code itself, unseen: not counted)
    triton_ops = getattr(getattr(torch._library, "triton", None), "triton_ops_to_kernels", {})
    return {name: calls[name] for name in KERNELS if name not in triton_ops}


_NUMBER_TYPES = ("IntType", "SymIntType", "FloatType", "SymFloatType", "BoolType", "SymBoolType", "NumberType")


def _argument_kind(schema_type) -> str:
    """"tensor", "number" (a number or a list of them) or "other" (not compared: the profiler records no list of
    tensors, string, dtype) for a schema argument's type."""
    if schema_type.kind() == "OptionalType":
        schema_type = schema_type.getElementType()
    if schema_type.kind() == "ListType":
        return "number" if schema_type.getElementType().kind() in _NUMBER_TYPES else "other"
    return "tensor" if schema_type.kind() == "TensorType" else (
        "number" if schema_type.kind() in _NUMBER_TYPES else "other")


def _node_arguments(node: torch.fx.Node) -> tuple:
    """A graph node's call as kernel_calls compares it: its op, then each argument of its schema (defaults too): a
    tensor's shape, a number, None, or "*" (any) where the call's cannot be compared."""
    key = [node.target._schema.name, node.target._overloadname]
    for i, a in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            value = _meta_val(node.args[i])
        else:
            value = _meta_val(node.kwargs[a.name]) if a.name in node.kwargs else (
                a.default_value if a.has_default_value() else None)
        key.append(_graph_value(_argument_kind(a.type), value))
    return tuple(key)


def _graph_value(kind: str, value):
    if kind == "other":
        return "*"
    if value is None:
        return None
    if kind == "tensor":
        return tuple(value.shape) if isinstance(value, torch.Tensor) else "*"
    if isinstance(value, (list, tuple)):  # (the profiler records no list of more than 30)
        values = tuple(_graph_value(kind, v) for v in value)
        return "*" if "*" in values or len(values) > 30 else values
    return value if isinstance(value, (bool, int, float)) else "*"  # (a dtype given as a number, a symbolic size)


def _call_arguments(event) -> tuple:
    """A call's arguments as the profiler recorded them (record_shapes), in _node_arguments' terms."""
    namespace, _, name = event.name.partition("::")
    overload = event.overload_name or "default"
    op = getattr(getattr(getattr(torch.ops, namespace), name), overload, None)
    if op is None:
        return (event.name, overload)  # (matches no node)
    n = len(op._schema.arguments)
    shapes, dtypes, values = ([*(getattr(event, f) or []), *[None] * n][:n]
                              for f in ("input_shapes", "input_dtypes", "concrete_inputs"))
    key = [event.name, overload]
    for a, shape, dtype, value in zip(op._schema.arguments, shapes, dtypes, values):
        kind = _argument_kind(a.type)
        if kind == "tensor":
            key.append(tuple(shape or ()) if dtype else None)
        else:
            key.append(tuple(value) if isinstance(value, list) else value)
    return tuple(key)


@contextlib.contextmanager
def quiet_profile(**options):
    """torch.profiler.profile(**options), its start and stop lines on stderr (USDT:... profiler_start) kept from the
    output."""
    profile = torch.profiler.profile(**options)
    with _quiet_stderr():
        profile.start()
    try:
        yield profile
    finally:
        with _quiet_stderr():
            profile.stop()


@contextlib.contextmanager
def _quiet_stderr():
    if sys.stderr is not None:
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 to keep quiet
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def described_macs(nodes: list, uncredited=()) -> MacCount:
    """MACs of a graph from its description (`describe`), by the harness's own formulas: the matmul-like aten ops,
    moebench's CPU operators and moebench's kernels. An op the submission registered as a kernel counts the MACs its
    formula declared where the graph was described (a whole number, at least 0); ops of moebench's, aten's and the
    other library namespaces never take a declared count. A kernel in `uncredited` (check_kernels: one calling the
    library or computing in torch, one that did not run) counts as the library's."""
    if not isinstance(nodes, list):
        raise BadCount("a graph described without its list of nodes")
    count = MacCount()
    for node in nodes:
        if not (isinstance(node, list) and len(node) == 3 and isinstance(node[0], str) and isinstance(node[1], list)):
            raise BadCount("a graph node that is not [target, args, declared]")
        target, args, declared = node
        namespace, schema = target.partition(".")[0], schema_of(target)
        if namespace == "moebench" and schema in KERNELS:  # moebench's own kernels (load_builtin_kernels)
            formula, kernel = KERNELS[schema].macs, True
        elif target in MATMUL_BY_NAME:
            formula, kernel = MATMUL_BY_NAME[target], False
        elif schema in CPU_OP_MACS:
            formula, kernel = CPU_OP_MACS[schema], False
        elif declared is not None and namespace not in HARNESS_NAMESPACES:
            formula, kernel = (lambda *_: declared), True
        else:
            continue
        if kernel and target in uncredited:
            kernel, count.uncredited = False, count.uncredited | {target}
        try:
            macs = formula(*[_value(a) for a in args])
        except BadCount:
            raise
        except Exception as e:  # noqa: BLE001  arguments no such op is called with, sizes no tensor can have
            line = (str(e).strip().splitlines() or [""])[0][:200]
            raise BadCount(f"{target}: no MAC count from the arguments described ({type(e).__name__}: "
                           f"{line})") from None
        try:
            macs = int(macs) if isinstance(macs, float) else operator.index(macs)
        except (TypeError, ValueError, OverflowError):
            raise BadCount(f"{target}: its MAC count {macs!r} is not a whole number") from None
        if macs < 0:
            raise BadCount(f"{target}: its MAC count {macs} is negative" if macs > -2**62 else
                           f"{target}: its MAC count is negative")
        if macs >= 2**62:
            raise BadCount(f"{target}: its MAC count is 2**62 or more, beyond any graph")
        count.total += macs
        count.kernel += macs * kernel
        if kernel:
            count.kernel_ops |= {target}
        count.by_op[target] = count.by_op.get(target, 0) + macs
    return count


def graph_macs(gm: torch.fx.GraphModule) -> MacCount:
    """MACs of one captured graph (torch.export or make_fx, ATen level, shapes in node.meta['val'])."""
    return described_macs(describe(gm))


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


def each_graph_once(model, input_ids, attention_mask, new_tokens: int, max_len: int, ctx_buckets: tuple = (),
                    tkg_buckets: tuple = (), cache=None):
    """Runs `model` through one request's graphs once each, eagerly: the context encoding of this very prompt, then
    one decode step per token-generation bucket (a step's shapes depend on its slot only). Yields after each step
    its graph as Engine.graph_runs gives it: (submodel, bucket, the times the request runs it). cache: the KV cache
    of the engine that runs the request, written over where it fits rather than another allocated."""
    from moebench.engine.generator import Engine

    engine = Engine(model, batch=input_ids.shape[0], max_len=max_len, ctx_buckets=ctx_buckets,
                    tkg_buckets=tkg_buckets, cache=cache)
    cte, *tkg = engine.graph_runs(input_ids.shape[1], new_tokens)
    first = engine.prefill(input_ids, attention_mask).argmax(-1)
    yield cte
    slots = range(engine.next_slot, engine.next_slot + new_tokens - 1)  # the decode steps' cache slots
    buckets = [engine.decode_width(slot) for slot in slots]
    for submodel, S, n in tkg:
        engine.next_slot = slots[buckets.index(S)]
        engine.decode(first)
        yield submodel, S, n


def request_macs(model, input_ids, attention_mask, new_tokens: int, max_len: int, ctx_buckets: tuple = (),
                 tkg_buckets: tuple = ()) -> tuple[RequestMacs, list]:
    """MACs of one request, on graphs captured from `model` running this very input: the context-encoding graph
    once, and for each token-generation bucket its graph times the decode steps that fall in it (new_tokens - 1
    steps in all; without buckets one graph over the whole cache). Returns (count, graphs)."""
    probe = _Capturing(model)
    runs = [GraphRuns(submodel, bucket, graph_macs(probe.graphs[-1]), n) for submodel, bucket, n in
            each_graph_once(probe, input_ids, attention_mask, new_tokens, max_len, ctx_buckets, tkg_buckets)]
    return RequestMacs(runs), probe.graphs


def uncredited_kernels(flops: dict) -> list[str]:
    """For a report's kernel_flops: a line for each of the graphs' kernels counted as the library's, and why."""
    return [*(f"{k} calls {op} inside: a registered kernel that hands its products to the library does not count "
              "as a kernel" for k, op in (flops.get("kernels_calling_library") or {}).items()),
            *(f"{k} runs {e:,} elements of torch's arithmetic in a call of {m:,} MACs: a registered kernel that "
              "computes with torch does not count as a kernel"
              for k, (e, m) in (flops.get("kernels_computing_in_torch") or {}).items()),
            *(f"{k} is in the graphs but did not run when the request's graphs ran eagerly: it does not count as "
              "a kernel" for k in flops.get("kernels_not_run") or []),
            *(f"{k} is in a decode step's graph {n} time(s) but its compiled code called it {c} time(s) at its "
              "arguments there: it does not count as a kernel"
              for k, (c, n) in (flops.get("kernels_not_compiled") or {}).items()),
            *(_cut_line(c) for c in flops.get("kernel_macs_cut") or []),
            *(f"{op} is in the graphs but is not a registered kernel (register_kernel): its MACs are not counted, "
              "and the library products it runs count as the library's"
              for op in flops.get("ops_not_registered") or []),
            *(f"{k} is registered (register_kernel) but in none of the request's graphs: the model never calls it"
              for k in flops.get("kernels_not_in_graphs") or [])]


def _cut_line(c: dict) -> str:
    where = f"{c['submodel']} bucket {c['bucket']}"
    if c["library_macs_run"] is None:
        return f"{where}: its kernels were not seen running: their MACs are not credited"
    return (f"{where}: its library products ran {c['library_macs_run']:,} MACs when it ran eagerly, "
            f"{c['library_macs_in_graph']:,} in its graph: of its kernel MACs ({c['kernel_macs_per_run']:,}) "
            f"{c['credited_kernel_macs_per_run']:,} are credited")


# The submission's total MACs may differ from the reference's (another algorithm, wasted work) by this factor
# either way before its kernel share stops being credited: its graphs and its own kernels' formulas are described
# by its process, which could inflate them.
CREDIBLE_FACTOR = 2.0


def credibility(flops: dict, reference: int, ranks: int = 1) -> dict:
    """The report's checks.mac_count: the submission's counted MACs against the reference's for the same request
    (`reference`, both counted by the harness's formulas); its kernel share is credited only within CREDIBLE_FACTOR,
    and at most up to `share_cap`: the share of the reference's MACs that the submission's library ops leave to its
    own code (1 - library MACs / reference MACs). The library's MACs are counted by the harness's formulas alone,
    so a kernel formula that counts more than its kernel does gains nothing. Over several ranks both counts are the
    ranks' summed, the reference sharded as the submission is (the router, repeated on every rank, in both)."""
    total = flops["total_macs"]
    factor = total / reference if reference else float("inf")
    library = total - flops["kernel_macs"]
    return {"submission_total_macs": total, "reference_total_macs": reference, "factor": factor,
            "allowed_factor": CREDIBLE_FACTOR, "credited": 1 / CREDIBLE_FACTOR <= factor <= CREDIBLE_FACTOR,
            "library_macs": library, "share_cap": max(0.0, 1 - library / reference) if reference else 0.0,
            "ranks": ranks}
