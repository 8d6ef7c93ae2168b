"""Every Triton kernel against its torch reference (under Triton's interpreter on the CPU), as a custom op in an
exported graph, and counted by the FLOP counter through its MAC formula."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module defines its kernels

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

pytest.importorskip("triton", reason="Triton is not installed; the kernel tests need it (pip install triton)")

from moebench.evaluation.flops import graph_macs  # noqa: E402
from moebench.kernels import interpret  # noqa: E402
from moebench.kernels.fused_moe import fused_moe, fused_moe_macs, fused_moe_ref, moe_align  # noqa: E402
from moebench.kernels.linear import linear, linear_ref  # noqa: E402
from moebench.kernels.registry import KERNELS, Kernel, load_builtin_kernels, register_kernel  # noqa: E402
from moebench.kernels.rmsnorm import rms_norm, rms_norm_ref  # noqa: E402
from moebench.kernels.router import moe_router, moe_router_ref  # noqa: E402
from moebench.model.moe import experts_forward, route  # noqa: E402

# Legend: T tokens, D hidden, I expert intermediate, E experts, k experts per token.
DEVICE = "cuda" if torch.cuda.is_available() and not interpret.interpreting() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
DTYPES = [torch.float32, torch.bfloat16]
TOKENS = [1, 5, 17, 127, 129]


def randn(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)


def test_the_kernels_helpers_are_called_as_rewritten_functions_under_the_interpreter():
    """There a @triton.jit helper called from a kernel patched triton.language anew at each call (~0.9 ms);
    common.device_function gives the kernels the function as the interpreter rewrites it, on a GPU the JITFunction."""
    import triton

    from moebench.kernels import attention, common, qkv

    helpers = (common.dot, common.cast, common.wait_for_inputs, attention.online_softmax_block, qkv._store_head)
    if interpret.interpreting():
        from triton.runtime.interpreter import InterpretedFunction

        assert not any(isinstance(h, (InterpretedFunction, triton.JITFunction)) for h in helpers)
        assert all(callable(h) for h in helpers)
    else:
        assert all(isinstance(h, triton.JITFunction) for h in helpers)


# ---------------------------------------------------------------------------------------------------------------
# RMSNorm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("fuse_residual", [False, True])
def test_rms_norm_matches_reference(dtype, T, fuse_residual):
    D = 48  # not a power of two: the kernel's masked tail
    x, w, r = randn(T, D, dtype=dtype, seed=1), randn(D, dtype=dtype, seed=2), randn(T, D, dtype=dtype, seed=3)
    if fuse_residual:
        out, h = rms_norm(x, w, 1e-6, residual=r)
        want, want_h = rms_norm_ref(x, w, 1e-6, residual=r)
        torch.testing.assert_close(h, want_h, atol=0, rtol=0)  # the add rounds exactly as torch rounds it
    else:
        out, want = rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6)
    assert out.dtype == want.dtype == dtype
    torch.testing.assert_close(out, want, **TOL[dtype])


def test_rms_norm_reference_is_the_models_rmsnorm():
    from moebench.model.qwen3_moe import RMSNorm

    norm = RMSNorm(64, 1e-6).to(torch.bfloat16)
    nn.init.normal_(norm.weight)
    x = randn(2, 3, 64, dtype=torch.bfloat16).cpu()
    torch.testing.assert_close(rms_norm_ref(x, norm.weight, norm.eps), norm(x), atol=0, rtol=0)


def test_rms_norm_any_leading_dims_and_weight_dtype():
    x, w = randn(2, 3, 4, 40, dtype=torch.bfloat16), randn(40)  # per-head q/k norm; float32 weight
    out = rms_norm(x, w, 1e-6)
    assert out.shape == x.shape and out.dtype == torch.float32  # promoted, as `weight * ...` is
    torch.testing.assert_close(out, rms_norm_ref(x, w, 1e-6), **TOL[torch.float32])


# ---------------------------------------------------------------------------------------------------------------
# Router


def check_routing(ids, weights, x, w_gate, k, norm):
    """Tie-proof: the probabilities at our ids are the reference's top-k values, in order; ids equal where no tie."""
    ref_ids, ref_weights = route(F.linear(x, w_gate), k, norm)
    assert ids.dtype == torch.int64 and weights.dtype == x.dtype and ids.shape == weights.shape == (x.shape[0], k)
    probs = torch.softmax(F.linear(x, w_gate), dim=-1, dtype=torch.float32)
    torch.testing.assert_close(probs.gather(1, ids), probs.gather(1, ref_ids), atol=0, rtol=0)
    torch.testing.assert_close(weights, ref_weights, **TOL[x.dtype])
    return ref_ids


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("E,k,norm", [(4, 2, True), (6, 2, False), (60, 8, True)])
@pytest.mark.parametrize("tiles", [dict(SPLIT_D=0), dict(SPLIT_D=16)],  # 16: three slices of D, a tail
                         ids=["one_pass", "split_logits"])
def test_router_matches_reference(monkeypatch, dtype, T, E, k, norm, tiles):
    check_router(monkeypatch, dtype, T, E, k, norm, tiles)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("E,k,norm", [(6, 2, False), (60, 8, True)])
@pytest.mark.parametrize("tiles", [dict(SPLIT_D=16, BLOCK_T=1, num_warps=1), dict(SPLIT_D=16, BLOCK_T=2)],
                         ids=["one_row", "two_rows"])
def test_router_split_logits_few_rows_a_program(monkeypatch, dtype, T, E, k, norm, tiles):
    """The decode launch: partial logits summed by programs of one or two tokens (T = 5: a half-empty last one)."""
    check_router(monkeypatch, dtype, T, E, k, norm, tiles)


def check_router(monkeypatch, dtype, T, E, k, norm, tiles):
    from moebench.kernels import router

    monkeypatch.setattr(router, "_tiles", lambda T, D: tiles)
    D = 40
    x, w_gate = randn(T, D, dtype=dtype, seed=4), randn(E, D, dtype=dtype, scale=D**-0.5, seed=5)
    seen, (ids, weights) = launches(monkeypatch, router._router_kernel, lambda: moe_router(x, w_gate, k, norm))
    assert seen["BLOCK_T"] == (tiles.get("BLOCK_T", 16) if tiles["SPLIT_D"] else 16)
    ref_ids = check_routing(ids, weights, x, w_gate, k, norm)
    if dtype == torch.float32:  # random float32 logits do not tie: the very same ids
        torch.testing.assert_close(ids, ref_ids, atol=0, rtol=0)
    ref = moe_router_ref(x, w_gate, k, norm)
    torch.testing.assert_close(weights, ref[1], **TOL[dtype])


def test_router_rejects_too_many_experts_per_token():
    with pytest.raises(ValueError, match="k <="):
        moe_router(randn(3, 32), randn(4, 32), 5, True)


# ---------------------------------------------------------------------------------------------------------------
# Fused MoE


def moe_inputs(T, D=48, E=6, k=2, I=24, dtype=torch.float32, seed=6):
    x = randn(T, D, dtype=dtype, seed=seed)
    w_gate_up = randn(E, 2 * I, D, dtype=dtype, scale=D**-0.5, seed=seed + 1)
    w_down = randn(E, D, I, dtype=dtype, scale=I**-0.5, seed=seed + 2)
    ids, weights = route(randn(T, E, seed=seed + 3), k, True)
    return x, w_gate_up, w_down, ids, weights.to(dtype)


def test_align_sorts_by_expert_and_pads_each_run():
    ids = torch.tensor([[2, 0], [2, 1], [0, 2], [2, 0]])  # expert 0: 3 pairs, 1: 1, 2: 4; expert 3 unused
    pairs, block_expert = moe_align(ids, E=4, BM=4)
    N = ids.numel()
    assert block_expert.tolist()[:3] == [0, 1, 2] and all(e == -1 for e in block_expert.tolist()[3:])
    blocks = pairs.view(-1, 4).tolist()
    assert blocks[0] == [1, 4, 7, N] and blocks[1] == [3, N, N, N] and blocks[2] == [0, 2, 5, 6]
    assert sorted(p for p in pairs.tolist() if p < N) == list(range(N))  # every pair exactly once


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", TOKENS)
def test_fused_moe_matches_reference(dtype, T):
    args = moe_inputs(T, dtype=dtype)
    out = fused_moe(*args)
    assert out.shape == args[0].shape and out.dtype == dtype
    torch.testing.assert_close(out, fused_moe_ref(*args), **TOL[dtype])
    if T > 1 and dtype == torch.float32:  # and the model's sorted path agrees with the loop it is tested on
        torch.testing.assert_close(out, experts_forward(*args), **TOL[dtype])


def test_models_sorted_dispatch_matches_the_reference_loop():
    args = moe_inputs(5, dtype=torch.bfloat16)
    torch.testing.assert_close(experts_forward(*args), fused_moe_ref(*args), atol=1e-5, rtol=1e-5)


def test_fused_moe_all_tokens_on_one_expert_and_k_larger():
    x, w_gate_up, w_down, _, _ = moe_inputs(33, E=8, k=4, I=20)  # 33 tokens: three blocks of one expert
    ids = torch.tensor([[3, 0, 5, 7]] * 33, device=DEVICE)
    weights = torch.full((33, 4), 0.25, device=DEVICE)
    torch.testing.assert_close(fused_moe(x, w_gate_up, w_down, ids, weights),
                               fused_moe_ref(x, w_gate_up, w_down, ids, weights), **TOL[torch.float32])


PAIR_TILES = {"pairs": dict(BM=1, BN=16, BK=32), "own down": dict(BM=1, BN=16, BK=32, down=dict(BN=8, BK=16)),
              "summed down": dict(BM=1, BN=16, BK=32, down=dict(BN=16, BK=16, SUM_K=True))}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, k, residual", [(1, 2, False), (1, 2, True), (3, 3, True)])
@pytest.mark.parametrize("tiles", list(PAIR_TILES))
def test_fused_moe_pair_kernels_match_reference(monkeypatch, dtype, T, k, residual, tiles):
    """Launch options with BM = 1 (what a GPU's decode may pick): one program per (token, expert) pair, no sort;
    the down kernel with its own options, or summing each token's k experts itself (no combine)."""
    from moebench.kernels import fused_moe as module

    monkeypatch.setattr(module, "_tiles", lambda N, E: PAIR_TILES[tiles])
    monkeypatch.setattr(module, "moe_align", None)  # the pair kernels need no sort
    monkeypatch.setattr(module, "combine", None if "SUM_K" in PAIR_TILES[tiles].get("down", {}) else module.combine)
    x, w_gate_up, w_down, ids, weights = moe_inputs(T, D=48, E=6, k=k, I=40, dtype=dtype)  # tails in D, I, BN
    r = randn(T, 48, dtype=dtype, seed=7) if residual else None
    down = PAIR_TILES[tiles].get("down", PAIR_TILES[tiles])
    kernel = module._token_down_kernel if down.get("SUM_K") else module._pair_down_kernel
    seen, out = launches(monkeypatch, kernel, lambda: fused_moe(x, w_gate_up, w_down, ids, weights, r))
    assert (seen["BN"], seen["BK"]) == (down["BN"], down["BK"])  # the down kernel's own options
    torch.testing.assert_close(out, fused_moe_ref(x, w_gate_up, w_down, ids, weights, r), **TOL[dtype])


def launches(monkeypatch, kernel, call) -> tuple[dict, object]:
    """The keyword arguments `kernel` was launched with by call(), and call()'s result."""
    seen, real = {}, kernel.run
    monkeypatch.setattr(kernel, "run", lambda *a, **kw: seen.update(kw) or real(*a, **kw))
    result = call()
    monkeypatch.setattr(kernel, "run", real)
    return seen, result


def test_fused_moe_rejects_mismatched_weights():
    x, w_gate_up, w_down, ids, weights = moe_inputs(3)
    with pytest.raises(ValueError, match="w_down"):
        fused_moe(x, w_gate_up, w_down[:, :, :-1], ids, weights)


# ---------------------------------------------------------------------------------------------------------------
# As custom ops: the registry, the fake impls, exported graphs, MAC counting


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 17, 127, 129])
@pytest.mark.parametrize("K", [48, 300])  # 300: more than one reduction block, with a tail
@pytest.mark.parametrize("bias, residual", [(False, False), (True, False), (False, True), (True, True)])
def test_linear_matches_reference(dtype, T, K, bias, residual):
    N = 70
    x, w = randn(T, K, dtype=dtype, seed=1), randn(N, K, dtype=dtype, scale=K**-0.5, seed=2)
    b = randn(N, dtype=dtype, seed=3) if bias else None
    r = randn(T, N, dtype=dtype, seed=4) if residual else None
    out, want = linear(x, w, b, r), linear_ref(x, w, b, r)
    assert out.dtype == want.dtype == dtype
    torch.testing.assert_close(out, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("bias, residual", [(False, False), (True, True)])
@pytest.mark.parametrize("split_k", [None, 128], ids=["one_pass", "split_k"])  # 128: three slices of K, a tail
def test_linear_rows_kernel_matches_reference(monkeypatch, dtype, T, bias, residual, split_k):
    """Launch options with BM = 1 (what a GPU's decode may pick) run the kernel without tl.dot, one row a program;
    with SPLIT_K, its products over slices of K first (o_proj's few output columns still make many programs)."""
    from moebench.kernels import linear as module

    monkeypatch.setattr(module, "_tiles", lambda M, N, K: dict(BM=1, BN=16, BK=64, SPLIT_K=split_k))
    N, K = 70, 300  # column blocks and reduction blocks, each with a tail
    x, w = randn(T, K, dtype=dtype, seed=1), randn(N, K, dtype=dtype, scale=K**-0.5, seed=2)
    b = randn(N, dtype=dtype, seed=3) if bias else None
    r = randn(T, N, dtype=dtype, seed=4) if residual else None
    launched = []
    kernel = module._rows_partial_kernel if split_k else module._rows_kernel
    real = kernel.run
    monkeypatch.setattr(kernel, "run", lambda *a, **kw: launched.append(1) or real(*a, **kw))
    out, want = linear(x, w, b, r), linear_ref(x, w, b, r)
    assert launched and out.dtype == want.dtype == dtype
    torch.testing.assert_close(out, want, **TOL[dtype])


@pytest.mark.parametrize("tiles", [dict(BM=1, BN=16, BK=64, SPLIT_K=100), dict(BM=16, BN=16, BK=64, SPLIT_K=128)])
def test_linear_split_k_needs_one_row_a_program_and_whole_reduction_blocks(monkeypatch, tiles):
    from moebench.kernels import linear as module

    monkeypatch.setattr(module, "_tiles", lambda M, N, K: tiles)
    with pytest.raises(ValueError, match="SPLIT_K"):
        linear(randn(1, 300), randn(70, 300, seed=1))


def test_linear_keeps_leading_dims_and_rejects_mismatches():
    x, w = randn(2, 3, 32), randn(20, 32, seed=1)
    torch.testing.assert_close(linear(x, w), F.linear(x, w), **TOL[torch.float32])
    with pytest.raises(ValueError, match="linear: x"):
        linear(randn(3, 31), w)
    with pytest.raises(ValueError, match="residual"):
        linear(x, w, None, randn(2, 3, 21))


def test_fused_moe_with_the_residual_fused():
    x, w_gate_up, w_down, ids, weights = moe_inputs(17, D=48, E=5, I=24, dtype=torch.bfloat16)
    r = randn(17, 48, dtype=torch.bfloat16, seed=7)
    out = fused_moe(x, w_gate_up, w_down, ids, weights, r)
    torch.testing.assert_close(out, fused_moe_ref(x, w_gate_up, w_down, ids, weights, r), **TOL[torch.bfloat16])
    # the same numbers as adding the residual after the kernel: the sum is rounded first, as the model rounds it
    torch.testing.assert_close(out, r + fused_moe(x, w_gate_up, w_down, ids, weights), atol=0, rtol=0)


def test_kernels_count_in_torchs_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    x, w = randn(5, 48), randn(70, 48, seed=1)
    with FlopCounterMode(display=False) as counter:
        linear(x, w)
        fused_moe(*moe_inputs(5, D=32, E=4, I=16))
    assert counter.get_total_flops() == 2 * (5 * 48 * 70 + 5 * 2 * 3 * 32 * 16)


def test_registry_entries():
    kernels = load_builtin_kernels()
    names = {"moebench::rms_norm", "moebench::add_rms_norm", "moebench::moe_router", "moebench::fused_moe"}
    assert names <= set(kernels)
    assert kernels["moebench::fused_moe"].flag == "mlp_kernel_enabled"
    assert kernels["moebench::moe_router"].flag is None and kernels["moebench::rms_norm"].flag is None
    assert all(kernels[n].reference is not None for n in names)
    x, w_gate_up, w_down, ids, weights = moe_inputs(5, D=32, E=4, I=16)
    assert kernels["moebench::fused_moe"].macs(x, w_gate_up, w_down, ids, weights) == 5 * 2 * 3 * 32 * 16


def test_register_kernel_stays_backward_compatible():
    kernel = register_kernel("moebench_test::mine", lambda x: 7)
    try:
        assert kernel == Kernel("moebench_test::mine", kernel.macs) and kernel.reference is None and kernel.flag is None
    finally:
        KERNELS.pop("moebench_test::mine")


def test_interpreter_switched_on_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert interpret.ensure_interpreter_on_cpu() and os.environ["TRITON_INTERPRET"] == "1"


@pytest.mark.parametrize("op,args", [
    ("rms_norm", lambda: (randn(5, 48, dtype=torch.bfloat16), randn(48), 1e-6)),
    ("add_rms_norm", lambda: (randn(5, 48, dtype=torch.bfloat16), randn(5, 48, dtype=torch.bfloat16),
                              randn(48, dtype=torch.bfloat16), 1e-6)),
    ("moe_router", lambda: (randn(5, 32, dtype=torch.bfloat16), randn(6, 32, dtype=torch.bfloat16), 2, True)),
    ("fused_moe", lambda: moe_inputs(5, D=32, E=4, I=16, dtype=torch.bfloat16)),
    ("fused_moe", lambda: (*moe_inputs(5, D=32, E=4, I=16, dtype=torch.bfloat16),
                           randn(5, 32, dtype=torch.bfloat16, seed=8))),
    ("linear", lambda: (randn(5, 48, dtype=torch.bfloat16), randn(20, 48, dtype=torch.bfloat16, seed=1), None,
                        randn(5, 20, dtype=torch.bfloat16, seed=2))),
    ("linear", lambda: (randn(1, 48), randn(20, 48, seed=1), randn(20, seed=2), None)),
])
def test_fake_impls_agree_with_the_kernels(op, args):
    """Schema, fake tensor (shapes, dtypes, devices of the fake impl against the real run) and AOT dispatch."""
    torch.library.opcheck(getattr(torch.ops.moebench, op), args(),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


class TinyMoeBlock(nn.Module):
    """Post-attention norm with the residual fused, router, experts: one MoE block made of the three kernels."""

    def __init__(self, D=32, E=4, I=16, k=2):
        super().__init__()
        x, w_gate_up, w_down, _, _ = moe_inputs(1, D=D, E=E, I=I)
        self.norm = nn.Parameter(randn(D, seed=9))
        self.gate = nn.Parameter(randn(E, D, scale=D**-0.5, seed=10))
        self.w_gate_up, self.w_down, self.k = nn.Parameter(w_gate_up), nn.Parameter(w_down), k

    def forward(self, x, residual):
        h, residual = rms_norm(x, self.norm, 1e-6, residual)
        ids, weights = moe_router(h, self.gate, self.k, True)
        return residual + fused_moe(h, self.w_gate_up, self.w_down, ids, weights)

    def reference(self, x, residual):
        h, residual = rms_norm_ref(x, self.norm, 1e-6, residual)
        ids, weights = route(F.linear(h, self.gate), self.k, True)
        return residual + fused_moe_ref(h, self.w_gate_up, self.w_down, ids, weights)


def test_kernels_are_nodes_of_an_exported_graph_and_count_as_kernel_macs():
    T, D, E, I, k = 5, 32, 4, 16, 2
    block = TinyMoeBlock(D, E, I, k).eval()
    x, residual = randn(T, D, seed=11), randn(T, D, seed=12)
    with torch.no_grad():
        ep = torch.export.export(block, (x, residual))
        targets = {n.target for n in ep.graph_module.graph.nodes if n.op == "call_function"}
        assert {torch.ops.moebench.add_rms_norm.default, torch.ops.moebench.moe_router.default,
                torch.ops.moebench.fused_moe.default} <= targets
        ids_node = next(n for n in ep.graph_module.graph.nodes if n.target == torch.ops.moebench.moe_router.default)
        ids_val, weights_val = ids_node.meta["val"]
        assert ids_val.shape == weights_val.shape == (T, k) and ids_val.dtype == torch.int64

        macs = graph_macs(ep.graph_module)
        router_macs, experts_macs = T * D * E, fused_moe_macs(x, block.w_gate_up, block.w_down, torch.empty(T, k))
        assert experts_macs == T * k * 3 * D * I
        assert macs.kernel == macs.total == router_macs + experts_macs  # nothing outside the kernels
        assert macs.by_op["moebench.moe_router.default"] == router_macs
        assert macs.by_op["moebench.fused_moe.default"] == experts_macs
        assert macs.by_op["moebench.add_rms_norm.default"] == 0  # element-wise, as the reference's RMSNorm

        torch.testing.assert_close(ep.module()(x, residual), block.reference(x, residual), **TOL[torch.float32])
