"""The kernel FLOP ratio on known answers: the reference counts exactly the MACs of a hand formula and none in
kernels; a model run wholly through one registered op has ratio 1; half in a kernel and half in plain matmuls 0.5."""

import pytest
import torch
from torch import nn

from moebench.engine.generator import Engine
from moebench.evaluation.flops import (BadCount, described_macs, flop_ratio, graph_macs, request_macs,
                                      uncredited_kernels)
from moebench.kernels.registry import KERNELS, register_kernel
from moebench.model.loader import build_model, open_model
from moebench.model.qwen3_moe import ModelOptions, Qwen3MoeForCausalLM
from tests.conftest import reference_macs

OP = "moebench_test::whole_model"


@torch.library.custom_op(OP, mutates_args=())
def whole_model(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[B, T, D] @ [D, V]: the test's stand-in for a custom kernel."""
    return x @ w


@whole_model.register_fake
def _(x, w):
    return x.new_empty(*x.shape[:-1], w.shape[1])


def kernel_macs(x, w):
    return x.shape[0] * x.shape[1] * x.shape[2] * w.shape[1]


@pytest.fixture
def kernel_registered():
    register_kernel(OP, macs=kernel_macs)
    yield
    KERNELS.pop(OP)


@pytest.fixture(scope="module")
def source():
    return open_model(None)


def request(source, text: str):
    ids = torch.tensor([source.tokenizer.encode(text)])
    return ids, torch.ones_like(ids)


# ---------------------------------------------------------------------------------------------------------------
# The reference against a hand formula


def test_reference_macs_equal_the_hand_formula(source):
    cfg = source.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers,
            cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.vocab_size) == \
        (128, 4, 2, 64, 3, 8, 2, 64, 4096)
    assert cfg.mlp_only_layers == () and not cfg.tie_word_embeddings and cfg.sliding_window is None
    model = build_model(Qwen3MoeForCausalLM, source, ModelOptions(), torch.float32, torch.device("cpu"))
    ids, mask = request(source, "The quick brown fox jumps")
    L, N, S = ids.shape[1], 5, 24
    per_submodel, graphs = request_macs(model, ids, mask, N, S)
    macs = per_submodel.total
    prefill, decode = reference_macs(cfg, L, N, S)
    report = per_submodel.report()
    assert report["by_graph"] == [
        dict(submodel="context_encoding_model", bucket=L, runs=1, total_macs_per_run=prefill, kernel_macs_per_run=0,
             nki_flop_ratio=0.0),
        dict(submodel="token_generation_model", bucket=S, runs=N - 1, total_macs_per_run=decode,
             kernel_macs_per_run=0, nki_flop_ratio=0.0)]
    assert report["total_macs"] == macs.total and report["kernel_ops"] == []
    assert len(graphs) == 2
    assert graph_macs(graphs[0]).total == prefill
    assert graph_macs(graphs[1]).total == decode
    assert macs.total == prefill + (N - 1) * decode
    assert macs.kernel == 0 and flop_ratio(macs) == 0.0
    assert sum(macs.by_op.values()) == macs.total
    # by hand: 3·(98304 + 1024 + 49152) = 445440 per token, 524288 for the LM head
    assert reference_macs(cfg, 1, 1, 1) == (445440 + 3 * 512 + 524288,) * 2


# ---------------------------------------------------------------------------------------------------------------
# Models built on a registered op


class KernelModel(nn.Module):
    """Embeddings, then logits [B, T, V] from the registered op only; with `plain`, plus a plain matmul of the
    same size."""

    def __init__(self, cfg, plain: bool):
        super().__init__()
        self.config, self.plain = cfg, plain
        g = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.w = nn.Parameter(torch.randn(cfg.hidden_size, cfg.vocab_size, generator=g) * 0.02)
        self.w2 = nn.Parameter(torch.randn(cfg.hidden_size, cfg.vocab_size, generator=g) * 0.02)

    def forward(self, input_ids, step, cache):
        x = self.embed(input_ids)
        logits = whole_model(x, self.w)
        if self.plain:
            logits = logits + x @ self.w2
        return logits


@pytest.mark.parametrize("plain, ratio", [(False, 1.0), (True, 0.5)])
def test_kernel_share(source, kernel_registered, plain, ratio):
    cfg = source.config
    model = KernelModel(cfg, plain).eval()
    ids, mask = request(source, "Hello world")
    L, N, S = ids.shape[1], 4, 16
    # the model really runs (its logits have the contract's shape) through an Engine
    assert Engine(model, batch=1, max_len=S).prefill(ids, mask).shape == (1, cfg.vocab_size)
    macs, graphs = request_macs(model, ids, mask, N, S)
    macs = macs.total
    D, V = cfg.hidden_size, cfg.vocab_size
    kernel = L * D * V + (N - 1) * D * V  # the model returns every column's logits, the prefill's included
    assert graph_macs(graphs[0]).kernel == L * D * V
    assert graph_macs(graphs[1]).kernel == D * V
    assert macs.kernel == kernel
    assert macs.total == (2 if plain else 1) * kernel
    assert flop_ratio(macs) == ratio
    kernel_ops = {name: n for name, n in macs.by_op.items() if "whole_model" in name}
    assert list(kernel_ops.values()) == [kernel], macs.by_op


def test_unregistered_op_counts_nothing(source):
    """Without the registry entry the same op is an unknown call: no MACs at all (ratio 0 by definition)."""
    assert OP not in KERNELS
    model = KernelModel(source.config, plain=False).eval()
    ids, mask = request(source, "Hello world")
    macs = request_macs(model, ids, mask, 3, 8)[0].total
    assert macs.total == 0 and macs.kernel == 0 and flop_ratio(macs) == 0.0


class _Op(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


@pytest.mark.parametrize("fn, args, macs", [
    (lambda x, w: torch.einsum("btd,nd->btn", x, w), ((2, 4, 8), (16, 8)), 2 * 4 * 8 * 16),
    (lambda x, w: torch.einsum("...d,nd->...n", x, w), ((2, 4, 8), (16, 8)), 2 * 4 * 8 * 16),
    (lambda a, b: torch.einsum("bij,bjk->bik", a, b), ((3, 4, 5), (3, 5, 6)), 3 * 4 * 5 * 6),
    (lambda a, b, c: torch.einsum("ij,jk,kl->il", a, b, c), ((2, 3), (3, 4), (4, 5)), 2 * 3 * 4 + 2 * 4 * 5),
    (lambda x, w: torch.tensordot(x, w, dims=1), ((2, 4, 8), (8, 16)), 2 * 4 * 8 * 16),
    (lambda w, v: torch.mv(w, v), ((16, 8), (8,)), 16 * 8),
    (lambda w, v: torch.addmv(torch.zeros(16), w, v), ((16, 8), (8,)), 16 * 8),
    (lambda a, b: torch.dot(a, b), ((8,), (8,)), 8),
    (lambda a, b: torch.addbmm(torch.zeros(4, 16), a, b), ((2, 4, 8), (2, 8, 16)), 2 * 4 * 8 * 16),
])
def test_every_matmul_like_op_torch_export_keeps_whole_is_counted(fn, args, macs):
    ep = torch.export.export(_Op(fn), tuple(torch.randn(s) for s in args))
    assert graph_macs(ep.graph_module).total == macs


def test_the_harness_counts_a_described_graph_by_its_own_formulas():
    x, w = {"shape": [2, 3, 8], "dtype": "float32"}, {"shape": [16, 8], "dtype": "bfloat16"}
    count = described_macs([["aten.linear.default", [x, w], 10**12],  # declared on an aten op: ignored
                            ["team.head.default", [x, w], 500],  # a kernel registered only in the submission
                            ["moebench.no_such_kernel.default", [x], 10**12],  # not moebench's: counts nothing
                            ["aten.add.Tensor", [x, x], None]])
    assert (count.total, count.kernel, count.kernel_ops) == (2 * 3 * 8 * 16 + 500, 500, {"team.head.default"})
    for bad in (["team.head.default", [x], -1], ["team.head.default", [x], float("nan")],
                ["team.head.default", [x], "many"], ["aten.linear.default", [{"shape": [-2, 8]}, w], None],
                ["aten.linear.default", [{"shape": "big"}, w], None], ["aten.linear.default", [x, w]], "node",
                ["aten.linear.default", [], None], ["aten.linear.default", [{"shape": [10**30, 8]}, w], None],
                ["team.head.default", [x], 10**400], ["team.head.default", [x], -10**5000]):
        with pytest.raises(BadCount) as e:
            described_macs([bad])
        assert "\n" not in str(e.value)  # one line


def test_a_malformed_description_of_the_graphs_is_refused_in_one_line():
    from types import SimpleNamespace

    from moebench.modes.compiled import request_flops
    from moebench.modes.sandbox import SubmissionFault

    run = SimpleNamespace(enable_bucketing=False, seq_len=20)
    req = SimpleNamespace(input_ids=torch.ones(1, 4, dtype=torch.long), max_new_tokens=3)
    cte = {"submodel": "context_encoding_model", "bucket": 4, "nodes": []}
    tkg = {"submodel": "token_generation_model", "bucket": 20, "nodes": []}
    assert request_flops(run, req, [cte, tkg])["total_macs"] == 0
    for bad in (None, [1], [{**cte, "bucket": [4]}, tkg], [{**cte, "nodes": None}, tkg], [cte],
                [{**cte, "calling_library": ["team.head.default"]}, tkg],
                [{**cte, "calling_library": {"team.head.default": 1}}, tkg],
                [{**cte, "computing_in_torch": {"team.head.default": 5}}, tkg],
                [{**cte, "computing_in_torch": {"team.head.default": [5, -1]}}, tkg],
                [{**cte, "computing_in_torch": [["team.head.default", 5, 1]]}, tkg],
                [{**cte, "kernels_run": "team.head.default"}, tkg], [{**cte, "kernels_run": [None]}, tkg],
                [{**cte, "library_macs_run": -1}, tkg], [{**cte, "library_macs_run": 1.5}, tkg],
                [{**cte, "library_macs_run": True}, tkg], [cte, {**tkg, "kernel_calls_compiled": [1]}],
                [cte, {**tkg, "kernel_calls_compiled": {"team::head": -1}}],
                [cte, {**tkg, "kernel_calls_compiled": {"team::head": True}}],
                [{**cte, "kernels_registered": "team::head"}, tkg], [{**cte, "kernels_registered": [1]}, tkg]):
        with pytest.raises(SubmissionFault, match="^the kernel FLOP count failed: "):
            request_flops(run, req, bad)


@pytest.mark.parametrize("ran_library, credited", [(600, 500), (900, 200), (2000, 0), (None, 0)])
def test_a_graphs_kernel_macs_are_credited_up_to_what_the_library_run_leaves(ran_library, credited):
    """A graph of 600 library MACs and a 500-MAC kernel: when its step ran eagerly with the library doing 900 MACs,
    the kernel did at most 200 of the graph's 1100; not seen running at all (None): none."""
    from types import SimpleNamespace

    from moebench.modes.compiled import request_flops

    x, w = {"shape": [1, 4, 10], "dtype": "float32"}, {"shape": [15, 10], "dtype": "float32"}
    nodes = [["aten.linear.default", [x, w], None], ["team.head.default", [x, w], 500]]
    run = SimpleNamespace(enable_bucketing=False, seq_len=20)
    req = SimpleNamespace(input_ids=torch.ones(1, 4, dtype=torch.long), max_new_tokens=2)
    graphs = [{"submodel": s, "bucket": b, "nodes": nodes, "kernels_run": ["team.head.default"],
               "library_macs_run": ran_library} for s, b in (("context_encoding_model", 4), ("token_generation_model",
                                                                                          20))]
    flops = request_flops(run, req, graphs)
    assert flops["kernel_macs"] == 2 * credited and flops["total_macs"] == 2 * 1100
    assert [c["credited_kernel_macs_per_run"] for c in flops["kernel_macs_cut"]] == [credited] * 2 * (credited < 500)
    assert uncredited_kernels(flops)[:1] == ([] if credited == 500 else [
        "context_encoding_model bucket 4: its kernels were not seen running: their MACs are not credited"
        if ran_library is None else f"context_encoding_model bucket 4: its library products ran {ran_library:,} "
        f"MACs when it ran eagerly, 600 in its graph: of its kernel MACs (500) {credited:,} are credited"])


def test_the_submission_s_own_ops_that_declare_no_macs_and_kernels_no_graph_calls_are_named():
    """An op of the submission's that is not a registered kernel (no MACs declared) computes uncounted; a kernel it
    registered that no graph holds never runs: each gets a line of the FLOP breakdown. The library's are not named."""
    from types import SimpleNamespace

    from moebench.modes.compiled import request_flops

    x, w = {"shape": [1, 4, 10], "dtype": "float32"}, {"shape": [15, 10], "dtype": "float32"}
    nodes = [["aten.linear.default", [x, w], None], ["team.proj.default", [x, w], None],
             ["team.head.default", [x, w], 600], ["moebench_cpu.attend_row.default", [x, w], None]]
    run = SimpleNamespace(enable_bucketing=False, seq_len=20)
    req = SimpleNamespace(input_ids=torch.ones(1, 4, dtype=torch.long), max_new_tokens=2)
    graphs = [{"submodel": s, "bucket": b, "nodes": nodes, "kernels_run": ["team.head.default"],
               "library_macs_run": 600, "kernels_registered": ["team::head", "team::unused"]}
              for s, b in (("context_encoding_model", 4), ("token_generation_model", 20))]
    flops = request_flops(run, req, graphs)
    assert flops["ops_not_registered"] == ["team::proj"] and flops["kernels_not_in_graphs"] == ["team::unused"]
    assert uncredited_kernels(flops) == [
        "team::proj is in the graphs but is not a registered kernel (register_kernel): its MACs are not counted, and "
        "the library products it runs count as the library's",
        "team::unused is registered (register_kernel) but in none of the request's graphs: the model never calls it"]

@torch.library.custom_op("moebench_test::torch_inside", mutates_args=())
def torch_inside(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A "kernel" that hands its product to torch."""
    return torch.nn.functional.linear(x, w)


@torch.library.custom_op("moebench_test::own_arithmetic", mutates_args=())
def own_arithmetic(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A "kernel" doing its multiply-accumulates with torch's element-wise products and a sum."""
    return (x[..., None, :] * w).sum(-1)


for _op in (torch_inside, own_arithmetic):
    _op.register_fake(lambda x, w: x.new_empty(*x.shape[:-1], w.shape[0]))
    register_kernel(_op._qualname, macs=lambda x, w: x.numel() // x.shape[-1] * w.numel())


def test_a_kernel_handing_its_products_to_torch_or_computing_them_with_torch_counts_as_the_library():
    from moebench.evaluation.flops import _KernelsCallingLibrary, check_kernels

    x, w = torch.randn(2, 3, 8), torch.randn(16, 8)
    with _KernelsCallingLibrary() as mode:
        out = own_arithmetic(torch_inside(x, w), torch.randn(4, 16))
    assert out.shape == (2, 3, 4)
    assert mode.found == {"moebench_test.torch_inside.default": "aten.linear.default"}  # own_arithmetic: not found
    assert mode.called == {"moebench_test.torch_inside.default", "moebench_test.own_arithmetic.default"}
    assert mode.library_macs == 2 * 3 * 8 * 16  # the linear inside torch_inside; own_arithmetic's products are not
    # ...but its products and sum run 2 elements of torch's arithmetic for each of its 2·3·16·4 MACs
    assert mode.in_torch == {"moebench_test.own_arithmetic.default": [2 * 384, 384]}
    ids = torch.tensor([[5, 6, 7]])
    model = build_model(Qwen3MoeForCausalLM, open_model(None), ModelOptions(), torch.float32, "cpu")
    check = check_kernels(model, ids, torch.ones_like(ids), 3, 8)
    assert (check.calling_library, check.computing_in_torch, check.called) == ({}, {}, [])  # no kernel at all...
    counted, _ = request_macs(model, ids, torch.ones_like(ids), 3, 8)
    # ...and its library products, as they ran eagerly, are its graphs' MACs (moebench's CPU operators included)
    assert check.library_macs == {(g.submodel, g.bucket): g.macs.total for g in counted.graphs}
    engine = Engine(model, batch=1, max_len=8)  # the request's engine: its cache is written over, none allocated
    assert check_kernels(model, ids, torch.ones_like(ids), 3, 8, cache=engine.cache) == check
    assert Engine(model, batch=1, max_len=8, cache=engine.cache).cache is engine.cache
    assert Engine(model, batch=1, max_len=9, cache=engine.cache).cache is not engine.cache  # (8 slots do not fit)
    xd, wd = {"shape": [2, 3, 8], "dtype": "float32"}, {"shape": [16, 8], "dtype": "float32"}
    nodes = [["moebench_test.torch_inside.default", [xd, wd], 768], ["moebench_test.own_arithmetic.default",
                                                                      [xd, wd], 768]]
    assert described_macs(nodes).kernel == 2 * 768
    count = described_macs(nodes, mode.found)
    assert (count.total, count.kernel, count.kernel_ops) == (2 * 768, 768, {"moebench_test.own_arithmetic.default"})
    assert count.uncredited == {"moebench_test.torch_inside.default"}


@torch.library.custom_op("moebench_test::summed_in_a_loop", mutates_args=())
def summed_in_a_loop(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    acc = x.new_zeros(x.shape[0], w.shape[0])
    for k in range(x.shape[1]):
        acc += x[:, k, None] * w[:, k]
    return acc


@torch.library.custom_op("moebench_test::embedding_bag_product", mutates_args=())
def embedding_bag_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Each row of x weighs the rows of wᵀ: a bag's weighted sum is a row of x wᵀ."""
    M, K = x.shape
    return torch.nn.functional.embedding_bag(torch.arange(K).repeat(M), w.T.contiguous(), torch.arange(0, M * K, K),
                                             mode="sum", per_sample_weights=x.flatten())


@torch.library.custom_op("moebench_test::foreach_rows", mutates_args=())
def foreach_rows(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.stack(torch._foreach_mul(list(w), [row] * len(w))).sum(-1) for row in x])


@torch.library.custom_op("moebench_test::prims_product", mutates_args=())
def prims_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    shape = (x.shape[0], *w.shape)
    return torch.ops.prims.sum(torch.ops.prims.mul(x[:, None].expand(shape), w[None].expand(shape)), [2])


@torch.library.custom_op("moebench_test::norm_product", mutates_args=())
def norm_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """An eval-mode batch norm scales w's columns by a row of x; an accumulating index_put sums each row."""
    N, K = w.shape
    unit = torch.ones(K) - 1e-5  # (the norm divides by sqrt(var + eps): 1)
    rows = torch.arange(N).repeat_interleave(K)
    return torch.stack([w.new_zeros(N).index_put_((rows,), torch.nn.functional.batch_norm(
        w, torch.zeros(K), unit, weight=row, training=False).flatten(), accumulate=True) for row in x])


@torch.library.custom_op("moebench_test::routed_in_torch", mutates_args=())
def routed_in_torch(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """An honest kernel's torch work around its product (here numpy's): a softmax and a scale of its rows, and a
    write into a cache (an index_put that does not accumulate)."""
    scale = torch.softmax(x, -1).amax(-1, keepdim=True)
    torch.zeros(64, 64).index_put_((torch.arange(3),), x)
    return torch.from_numpy(x.numpy() @ w.numpy().T) * scale


for _op in (summed_in_a_loop, embedding_bag_product, foreach_rows, prims_product, norm_product, routed_in_torch):
    _op.register_fake(lambda x, w: x.new_empty(x.shape[0], w.shape[0]))
    register_kernel(_op._qualname, macs=lambda x, w: x.shape[0] * w.numel())


@pytest.mark.parametrize("kernel, elements", [(summed_in_a_loop, 2), (embedding_bag_product, 1), (foreach_rows, 2),
                                              (prims_product, 2), (norm_product, 2), (routed_in_torch, None)])
def test_the_kernel_check_sees_products_computed_with_torchs_arithmetic(kernel, elements):
    from moebench.evaluation.flops import _KernelsCallingLibrary

    x, w = torch.randn(3, 64), torch.randn(32, 64)
    with torch.inference_mode(), _KernelsCallingLibrary() as mode:
        out = kernel(x, w)
    torch.testing.assert_close(out, x @ w.T * (torch.softmax(x, -1).amax(-1, keepdim=True) if elements is None else 1))
    macs = 3 * 32 * 64
    assert mode.in_torch == ({} if elements is None else {f"{kernel._qualname.replace('::', '.')}.default":
                                                         [pytest.approx(elements * macs, rel=0.05), macs]})
    assert mode.found == {} and mode.library_macs == 0


@torch.library.custom_op("moebench_test::hidden_inner", mutates_args=())
def hidden_inner(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x @ w.T


@torch.library.custom_op("moebench_test::calls_hidden", mutates_args=())
def calls_hidden(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A kernel hiding its product in an unregistered op of its own."""
    return hidden_inner(x, w)


@torch.library.custom_op("moebench_test::listed", mutates_args=())
def listed(xs: list[torch.Tensor]) -> torch.Tensor:
    """Its tensors arrive in a list."""
    return torch.nn.functional.linear(xs[0], xs[1])


@torch.library.custom_op("moebench_test::out_variant", mutates_args=())
def out_variant(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    out = x.new_empty(x.shape[0], w.shape[0])
    return torch.mm(x, w.T, out=out)


@torch.library.custom_op("moebench_test::one_operand_einsum", mutates_args=())
def one_operand_einsum(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """An einsum of one operand is a sum: no product."""
    return torch.einsum("ij->i", x)[:, None] * w.sum(1)


@torch.library.custom_op("moebench_test::bilinear", mutates_args=())
def bilinear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.bilinear: a product (under inference mode aten::bilinear reaches the check whole, not its _trilinear)."""
    return torch.nn.functional.bilinear(x, x, w[:, None, :].expand(-1, x.shape[1], -1).contiguous())


@torch.library.custom_op("moebench_test::meta_only", mutates_args=(), device_types="meta")
def meta_only(scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Registered for one device and called with a CPU scalar first: dispatched by all its tensors' keys."""
    return x * 2


for _op in (hidden_inner, calls_hidden, out_variant, one_operand_einsum, bilinear):
    _op.register_fake(lambda x, w: x.new_empty(x.shape[0], w.shape[0]))
listed.register_fake(lambda xs: xs[0].new_empty(xs[0].shape[0], xs[1].shape[0]))
meta_only.register_fake(lambda scale, x: torch.empty_like(x))
for _op in (calls_hidden, listed, out_variant, one_operand_einsum, meta_only, bilinear):
    register_kernel(_op._qualname, macs=lambda *args: 0)


@pytest.mark.parametrize("call, found", [
    (lambda x, w: calls_hidden(x, w), "aten.matmul.default"),
    (lambda x, w: listed([x, w]), "aten.linear.default"),
    (lambda x, w: out_variant(x, w), "aten.mm.out"),
    (lambda x, w: one_operand_einsum(x, w), None),
    (lambda x, w: bilinear(x, w), "aten.bilinear.default"),
    (lambda x, w: meta_only(torch.tensor(1.0), x.to("meta")), None),
])
def test_the_kernel_check_sees_products_hidden_a_level_down_and_runs_every_kernel(call, found):
    from moebench.evaluation.flops import _KernelsCallingLibrary

    x, w = torch.randn(3, 8), torch.randn(5, 8)
    with torch.inference_mode(), _KernelsCallingLibrary() as mode:
        call(x, w)
    assert list(mode.found.values()) == ([found] if found else [])


def test_a_kernel_implemented_as_composite_implicit_autograd_is_refused_at_registration():
    """Eagerly, such an op runs its own ops in its place (aten::linear its matmul): the kernel check would never
    see it called."""
    with pytest.raises(ValueError, match="^register_kernel: aten::linear has a CompositeImplicitAutograd"):
        register_kernel("aten::linear", macs=lambda x, w, *_: x.numel() // x.shape[-1] * w.numel())
    assert "aten::linear" not in KERNELS


def test_over_several_ranks_the_summed_macs_are_checked_and_capped(capsys):
    """The ranks' MACs summed against the sharded reference's summed: far off, no share; close, the share up to what
    the summed library MACs leave of the reference's, as for one rank."""
    from moebench.evaluation.flops import credibility
    from moebench.modes.evaluate import uncredited

    check = credibility({"total_macs": 2500, "kernel_macs": 1000}, 1000, ranks=2)
    assert (check["credited"], check["factor"], check["share_cap"], check["ranks"]) == (False, 2.5, 0.0, 2)
    flops = {"nki_flop_ratio": 0.4}
    uncredited(flops, check)
    assert flops["nki_flop_ratio"] == 0 and "its graphs (its 2 ranks' summed) count 2.5 times" in flops["not_credited"]
    check = credibility({"total_macs": 1500, "kernel_macs": 1000}, 1000, ranks=2)  # a kernel formula inflated 2x
    flops = {"nki_flop_ratio": 1000 / 1500}
    uncredited(flops, check)
    assert flops["nki_flop_ratio"] == pytest.approx(0.5) and "(its 2 ranks' summed)" in flops["capped"]
    assert credibility({"total_macs": 1010, "kernel_macs": 900}, 1000)["share_cap"] == pytest.approx(0.89)


@pytest.mark.parametrize("calls, not_compiled", [(None, {}), ({"team::head": 2}, {}), ({"team::head": 3}, {}),
                                                 ({"team::head": 1}, {"team.head.default": [1, 2]}),
                                                 ({"team::head": 0}, {"team.head.default": [0, 2]}),
                                                 ({"team::other": 0}, {})])
def test_a_kernel_its_compiled_step_calls_fewer_times_than_its_graph_holds_it_is_not_credited(calls, not_compiled):
    """A decode step's graph holding the kernel twice: its compiled code (kernel_calls_compiled, by op name) must
    call it twice at least; None, or a kernel not in it: not checked (under CUDA graphs; a triton_op)."""
    from types import SimpleNamespace

    from moebench.modes.compiled import request_flops

    x, w = {"shape": [1, 1, 10], "dtype": "float32"}, {"shape": [15, 10], "dtype": "float32"}
    nodes = [["aten.linear.default", [x, w], None], *[["team.head.default", [x, w], 150]] * 2]
    run = SimpleNamespace(enable_bucketing=False, seq_len=20)
    req = SimpleNamespace(input_ids=torch.ones(1, 1, dtype=torch.long), max_new_tokens=2)
    graphs = [{"submodel": s, "bucket": b, "nodes": nodes, "kernels_run": ["team.head.default"],
               "library_macs_run": 150, "kernel_calls_compiled": c}
              for s, b, c in (("context_encoding_model", 1, None), ("token_generation_model", 20, calls))]
    flops = request_flops(run, req, graphs)
    assert flops["kernels_not_compiled"] == not_compiled
    assert flops["kernel_macs"] == (0 if not_compiled else 2 * 300) and flops["total_macs"] == 2 * 450
    assert bool(not_compiled) == any("its compiled code called it" in line for line in uncredited_kernels(flops))


@pytest.mark.usefixtures("kernel_registered")
def test_kernel_calls_sees_the_kernels_a_compiled_graph_calls_and_keeps_the_profiler_quiet(capfd):
    from moebench.evaluation.flops import kernel_calls

    def twice_or_once(x, w):
        y = whole_model(x, w)
        return y + whole_model(x, w) if not torch.compiler.is_compiling() else 2 * y

    x, w = torch.randn(1, 2, 8), torch.randn(8, 4)
    compiled = torch.compile(twice_or_once, dynamic=False)
    with torch.inference_mode():
        compiled(x, w)  # (compiled outside the profiler)
        assert kernel_calls(lambda: twice_or_once(x, w))[OP] == 2
        assert kernel_calls(lambda: compiled(x, w))[OP] == 1
    out, err = capfd.readouterr()
    assert "profiler" not in out + err  # its start and stop lines (USDT:... profiler_start) kept from the output


@torch.library.custom_op("moebench_test::scaled", mutates_args=())
def scaled(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, mode: str, dims: list[int], scale: float = 1.0,
           rows: int = -1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (x @ w) * scale


@scaled.register_fake
def _(x, w, bias, mode, dims, scale=1.0, rows=-1, dtype=torch.float32):
    return x.new_empty(*x.shape[:-1], w.shape[1])


@pytest.mark.parametrize("variant, counted", [("graph's", 1), ("twice", 1), ("row", 0), ("scale", 0), ("rows", 0),
                                              ("bias", 0), ("dims", 0)])
def test_kernel_calls_counts_only_the_calls_at_a_graph_nodes_arguments(variant, counted):
    """A compiled call counts for the graph (kernel_calls(step, graph)) only at the arguments of one of its nodes:
    each tensor's shape, each number, defaults and keywords placed by the schema; each node matched once."""
    from moebench.evaluation.flops import kernel_calls

    name = "moebench_test::scaled"
    register_kernel(name, macs=kernel_macs)
    try:
        def graphs(x, w):
            return scaled(x, w, None, dtype=torch.bfloat16, mode="up", scale=0.5, dims=[1, 2])  # (rows: its default)

        def compiled(x, w):
            if variant == "twice":
                return graphs(x, w) + scaled(x, w, None, "up", [1, 2], 0.5, -1, torch.bfloat16)
            arguments = {"row": (x[:, :1], w, None, "up", [1, 2], 0.5), "scale": (x, w, None, "up", [1, 2], 2.0),
                         "rows": (x, w, None, "up", [1, 2], 0.5, 1), "bias": (x, w, x, "up", [1, 2], 0.5),
                         "dims": (x, w, None, "up", [1], 0.5)}.get(variant)
            return graphs(x, w) if arguments is None else scaled(*arguments).sum() + 0 * x[..., :4]

        x, w = torch.randn(1, 4, 8), torch.randn(8, 4)
        graph = torch.export.export(Wrap(graphs), (x, w)).graph_module
        step = torch.compile(compiled, dynamic=False)
        with torch.inference_mode():
            step(x, w)
            assert kernel_calls(lambda: step(x, w))[name] == (2 if variant == "twice" else 1)  # every call
            assert kernel_calls(lambda: step(x, w), graph)[name] == counted  # the graph's calls
    finally:
        KERNELS.pop(name)


class Wrap(torch.nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, *args):
        return self.f(*args)


_LIB = torch.library.Library("moebench_test_overloads", "DEF")
_LIB.define("k(Tensor x, Tensor y) -> Tensor")
_LIB.define("k.fast(Tensor x, float s, int[] sizes) -> Tensor")
_LIB.impl("k", lambda x, y: x + y, "CompositeExplicitAutograd")
_LIB.impl("k.fast", lambda x, s, sizes: x * s, "CompositeExplicitAutograd")
torch.library.register_fake("moebench_test_overloads::k")(lambda x, y: torch.empty_like(x))
torch.library.register_fake("moebench_test_overloads::k.fast")(lambda x, s, sizes: torch.empty_like(x))


def test_kernel_calls_tells_a_kernel_s_overloads_apart_and_takes_long_lists_as_any():
    """A kernel op with a named overload beside its default: each call read by its own overload's schema (and
    matched to that overload's nodes); a list of more than 30 numbers, which the profiler does not record, matches."""
    from moebench.evaluation.flops import kernel_calls

    name, ops = "moebench_test_overloads::k", torch.ops.moebench_test_overloads.k
    register_kernel(name, macs=lambda x, *_: x.numel())
    try:
        def step(x):
            return ops.fast(ops.default(x, x), 0.5, list(range(40)))

        x = torch.randn(2, 4)
        graph = torch.export.export(Wrap(step), (x,)).graph_module
        compiled = torch.compile(step, dynamic=False)
        with torch.inference_mode():
            compiled(x)
            assert kernel_calls(lambda: compiled(x), graph)[name] == 2
            assert kernel_calls(lambda: compiled(x[:1]), graph)[name] == 0  # (other shapes: not the graph's)
    finally:
        KERNELS.pop(name)
