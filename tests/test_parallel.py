"""Tensor parallelism: 2 and 4 CPU ranks give the logits and tokens of one process, each holding ~1/N of the weights.

Each world size is one spawn whose rank function checks several configurations (starting ranks costs seconds)."""

import dataclasses
import time

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from moebench.engine.generator import Engine
from moebench.engine.parallel import RankFailed, ShardingError, check_shardable, run_parallel, shard_model
from moebench.model.loader import build_model, open_model
from moebench.model.presets import EMBEDDED, PRESETS, random_model, write_checkpoint
from moebench.model.qwen3_moe import DenseMLP, ModelOptions, Qwen3MoeForCausalLM

NEW = 4  # tokens generated: 1 from the prefill, 3 decode steps
# float32, only the order of the sums differs: a bound relative to the largest logit (~12 in the trained embedded model,
# where float32's last place is ~1e-6); machines with and without AVX-512 order the sums differently.
BOUND = 4e-6  # x the largest logit


def _model(fused: bool = False, path=None):
    return build_model(Qwen3MoeForCausalLM, open_model(path), ModelOptions(fused_qkv=fused), torch.float32, "cpu")


def _write_variant(path):
    """The embedded model with attention biases (o_proj's must be added once), tied embeddings and a dense layer."""
    cfg = dataclasses.replace(PRESETS[EMBEDDED], attention_bias=True, tie_word_embeddings=True, mlp_only_layers=(1,))
    model = random_model(cfg, seed=1)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):  # random_model's biases are zeros: a bias added N times would pass
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    write_checkpoint(model, path)


def _prompts():
    """Two rows, the second left-padded: exercises the mask and the cache slots as the harness does."""
    ids = torch.tensor([[11, 523, 77, 1290, 9, 4000, 31], [0, 0, 45, 8, 2048, 600, 3]])
    return ids, (ids != 0).long()


def _run(model, forced=None, compile=False, batch=2):
    """Prefill + decode steps of the first `batch` prompts -> (greedy tokens [B, NEW], logits [NEW, B, V]). With
    `forced` [B, NEW] the decode steps are fed those tokens instead of their own argmax (teacher forcing, for
    comparisons under bfloat16 noise)."""
    engine = Engine(model, batch=batch, max_len=16)
    if compile:
        # As Engine(compile=True), plus fullgraph: a graph break (a collective dynamo cannot trace) is an error. The
        # aot_eager backend traces the same graph as inductor; inductor's code generation adds 40-70 s on two cores.
        engine._decode_step = torch.compile(engine._decode_step, dynamic=False, fullgraph=True, backend="aot_eager")
    ids, mask = _prompts()
    logits = [engine.prefill(ids[:batch], mask[:batch])]
    tokens = [logits[-1].argmax(-1)]
    for i in range(NEW - 1):
        logits.append(engine.decode(tokens[-1] if forced is None else forced[:, i]))
        tokens.append(logits[-1].argmax(-1))
    return torch.stack(tokens, 1), torch.stack(logits)


def _shapes(model) -> dict:
    layer = model.model.layers[0]
    attn, experts = layer.self_attn, layer.mlp.block.experts
    proj = attn.qkv_proj if attn.fused else attn.k_proj
    q = attn.qkv_proj if attn.fused else attn.q_proj
    return {"q": tuple(q.weight.shape), "kv_or_qkv": tuple(proj.weight.shape),
            "o": tuple(attn.o_proj.weight.shape), "gate_up": tuple(experts.gate_up_proj.shape),
            "down": tuple(experts.down_proj.shape), "lm_head": tuple(model.lm_head.weight.shape),
            "embed": tuple(model.model.embed_tokens.weight.shape),
            "local_heads": (model.config.num_attention_heads, model.config.num_key_value_heads),
            "numel": sum(p.numel() for p in model.parameters())}


def _gathered(value, world):
    """Every rank's `value`, on rank 0 (a list indexed by rank)."""
    out = [None] * world
    dist.all_gather_object(out, value)
    return out


def _run_sequence_parallel(rank, world):
    """--sequence-parallel-enabled: the same numbers; in context encoding the norms see ceil(7 / N) rows (7-token
    prompts: N = 2 and 4 both pad), and each layer reduce-scatters twice (attention, MoE); decode steps never."""
    import moebench.engine.parallel as par

    model = shard_model(_model(), rank, world, sequence_parallel=True)
    rows, scatters = [], []
    norm = model.model.layers[0].layers[0].input_layernorm
    handle = norm.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[1]))
    real = par.reduce_scatter_rows
    par.reduce_scatter_rows = lambda y, *a: scatters.append(y.shape[1]) or real(y, *a)
    try:
        result = _run(model)
    finally:
        par.reduce_scatter_rows = real
        handle.remove()
    return result, rows, scatters


class _OwnLinear(torch.nn.Module):
    """A submission's block in the place of an nn.Linear: the same product in a forward of its own."""
    calls = 0

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x):
        _OwnLinear.calls += 1
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


def _own_blocks(model) -> None:
    """q_proj, o_proj (with biases in the variant), the dense MLP's products and the (tied) LM head as _OwnLinear."""
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.q_proj, attn.o_proj = _OwnLinear(attn.q_proj), _OwnLinear(attn.o_proj)
        if isinstance(layer.mlp, DenseMLP):
            layer.mlp.gate_up_proj, layer.mlp.down_proj = _OwnLinear(layer.mlp.gate_up_proj), _OwnLinear(
                layer.mlp.down_proj)
    model.lm_head = _OwnLinear(model.lm_head)


class _LinearKernelCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func is torch.ops.moebench.linear.default
        return func(*args, **(kwargs or {}))


def _ranks_main(rank, world, forced, variant):
    """One spawn per world size: plain, fused qkv + vocab-parallel, bf16 reduce, and (world 2) a compiled decode."""
    torch.set_num_threads(1)
    out = {}
    full = _model()
    k_full = full.model.layers[1].self_attn.k_proj.weight.clone()  # [Hkv * hd, D]
    gu_full = full.model.layers[1].mlp.experts.gate_up_proj.clone()  # [E, 2I, D]
    model = shard_model(full, rank, world)
    out["plain"] = _run(model)
    # This rank keeps the right rows: the kv head(s) its query heads read, the gate and up rows of its I range.
    H, Hkv, hd, I = 4, 2, 64, 64
    kv = rank * Hkv // world if Hkv >= world else (rank * H // world) // (H // Hkv)
    kv_rows = slice(kv * hd, (kv + max(Hkv // world, 1)) * hd)
    cols = slice(rank * I // world, (rank + 1) * I // world)
    ok = (torch.equal(model.model.layers[1].self_attn.k_proj.weight, k_full[kv_rows])
          and torch.equal(model.model.layers[1].mlp.block.experts.gate_up_proj,
                          torch.cat([gu_full[:, :I][:, cols], gu_full[:, I:][:, cols]], 1)))
    out["slices_ok"] = _gathered(ok, world)
    out["shapes"] = _gathered(_shapes(model), world)
    model = shard_model(_model(fused=True), rank, world, vocab_parallel=True)
    out["fused_vocab"] = _run(model)
    out["fused_vocab_shapes"] = _shapes(model)
    out["bf16"] = _run(shard_model(_model(), rank, world, reduce_dtype=torch.bfloat16), forced=forced)
    out["sequence"], out["sequence_rows"], out["scatters"] = _run_sequence_parallel(rank, world)
    if world == 2:
        model = shard_model(_model(path=variant), rank, world, vocab_parallel=True)
        assert isinstance(model.model.layers[1].mlp, DenseMLP)
        assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: one shared vocabulary slice
        out["variant"] = _run(model)
        out["variant_sequence"] = _run(shard_model(_model(path=variant), rank, world, vocab_parallel=True,
                                                   sequence_parallel=True))
        # The row-parallel products and the vocabulary-split LM head run the linear kernel where their blocks do.
        kernels = ModelOptions(kernels=frozenset({"o_proj", "dense_mlp", "lm_head"}))
        model = shard_model(build_model(Qwen3MoeForCausalLM, open_model(variant), kernels, torch.float32, "cpu"),
                            rank, world, vocab_parallel=True)
        with _LinearKernelCalls() as calls:
            out["variant_kernels"] = _run(model)
        out["linear_kernel_calls"] = calls.n
        # A submission's own blocks in the place of the reference's products run their forward on their shards.
        model = _model(path=variant)
        _own_blocks(model)
        out["own_blocks"] = _run(shard_model(model, rank, world, vocab_parallel=True))
        out["own_calls"] = _OwnLinear.calls
        model = shard_model(_model(path=variant), rank, world)  # tied, the embedding whole: tying again (as a
        model.tie_weights()  # sharded checkpoint's loading does) must leave the head its slice
        out["tied_head"] = tuple(model.lm_head.weight.shape)
        model = _model()
        model.lm_head = torch.nn.Sequential(model.lm_head)  # its weight a level down: nothing to split
        try:
            shard_model(model, rank, world)
        except ShardingError as e:
            out["no_weight"] = (str(e), hasattr(model, "parallel"))
        t = time.perf_counter()
        # Batch 1: at batch 2 the decode step's experts take the grouped-GEMM path, which torch.compile cannot trace
        # in float32 on the CPU (the same in one process; not a tensor-parallel matter).
        out["compiled"] = _run(shard_model(_model(), rank, world), compile=True, batch=1)
        out["compile_s"] = time.perf_counter() - t
    return out


@pytest.fixture(scope="module")
def reference(one_thread, tmp_path_factory):
    open_model(None)  # writes the embedded checkpoint once, before the ranks read it
    full = _model()
    variant = tmp_path_factory.mktemp("tp-variant")
    _write_variant(variant)
    return (_run(full), sum(p.numel() for p in full.parameters()), _run(full, batch=1), str(variant),
            _run(_model(path=str(variant))))


def _close(got, want):
    tokens, logits = got
    assert torch.equal(tokens, want[0])
    torch.testing.assert_close(logits, want[1], atol=BOUND * want[1].abs().max().item(), rtol=0)


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_matches_one_process(reference, world):
    (ref_tokens, ref_logits), full_numel, ref_batch1, variant, ref_variant = reference
    out = run_parallel(_ranks_main, world, ref_tokens, variant)
    _close(out["plain"], (ref_tokens, ref_logits))
    _close(out["fused_vocab"], (ref_tokens, ref_logits))
    # bfloat16 sums of float32 activations (~3 significant digits per reduce): differences ~3e-3 of the largest
    # logit (the trained embedded model's logits reach ~10, a random model's ~1).
    bf16_diff = (out["bf16"][1] - ref_logits).abs().max() / ref_logits.abs().max()
    assert 1e-5 < bf16_diff < 1e-2  # close, and the reduces really ran in bfloat16
    assert out["slices_ok"] == [True] * world
    _close(out["sequence"], (ref_tokens, ref_logits))
    layers = open_model(None).config.num_hidden_layers
    assert out["sequence_rows"] == [-(-7 // world)] + [1] * (NEW - 1)  # prefill: local rows; decode: one token
    assert out["scatters"] == [7] * (2 * layers)  # prefill only

    n = world
    kv_heads = max(2 // n, 1)  # 2 kv heads: split over 2 ranks, replicated over 4
    for s in out["shapes"]:
        assert s["q"] == (4 // n * 64, 128) and s["kv_or_qkv"] == (kv_heads * 64, 128)
        assert s["o"] == (128, 4 // n * 64)
        assert s["gate_up"] == (8, 2 * 64 // n, 128) and s["down"] == (8, 128, 64 // n)
        assert s["lm_head"] == (4096 // n, 128) and s["embed"] == (4096, 128)
        assert s["local_heads"] == (4 // n, kv_heads)
        # Everything but the replicated parts (embedding, norms, routers, the replicated kv heads) is split.
        assert s["numel"] < full_numel * (1 / n + 0.35)
    fv = out["fused_vocab_shapes"]
    assert fv["kv_or_qkv"] == ((4 // n + 2 * kv_heads) * 64, 128) and fv["embed"] == (4096 // n, 128)
    if world == 2:
        _close(out["variant"], ref_variant)
        _close(out["variant_sequence"], ref_variant)
        _close(out["variant_kernels"], ref_variant)
        # Each forward (a prefill, NEW - 1 decode steps): o_proj in every layer, the dense layer's two, the LM head.
        variant_layers = open_model(variant).config.num_hidden_layers
        assert out["linear_kernel_calls"] == NEW * (variant_layers + 3)
        _close(out["own_blocks"], ref_variant)
        assert out["own_calls"] == NEW * (2 * variant_layers + 3)  # q, o in every layer, the dense layer's 2, the head
        message, touched = out["no_weight"]
        assert "lm_head is a Sequential without a weight of the reference's shape [4096, 128]" in message
        assert not touched
        assert out["tied_head"] == (4096 // world, 128)  # a sharded model's head stays its slice
        _close(out["compiled"], ref_batch1)
        print(f"compiled decode (world 2, incl. compile): {out['compile_s']:.1f} s")


def test_heads_that_do_not_split_are_a_clear_error(one_thread):
    model = _model()
    with pytest.raises(ValueError, match="4 attention heads do not split 3 ways"):
        shard_model(model, 0, 3)
    assert model.config.num_attention_heads == 4  # nothing was touched
    cfg = model.config
    with pytest.raises(ShardingError, match="4 key/value heads"):
        check_shardable(dataclasses.replace(cfg, num_attention_heads=12, num_key_value_heads=4), 6)
    with pytest.raises(ShardingError, match="vocabulary"):
        check_shardable(dataclasses.replace(cfg, vocab_size=4097), 2)
    with pytest.raises(ShardingError, match="process group"):
        shard_model(model, 0, 2)  # no process group in this process
    assert not hasattr(model, "parallel")  # a refused call leaves the model as it was


def _expected_on_a_rank(rank, world):
    """contest.expected_logits with nothing stored, its reference standing in by one that answers the rank: what
    each rank computed, and the logits it took."""
    from types import SimpleNamespace

    from moebench.modes import contest

    computed = []
    contest.expected_meta = lambda *args: None
    contest.find_stored = lambda *args: None
    contest.compute_expected = lambda *args: computed.append(rank) or torch.full((2,), float(rank))
    req = SimpleNamespace(input_ids=None, attention_mask=None, max_new_tokens=2, eos_ids=())
    source = SimpleNamespace(config=SimpleNamespace(vocab_size=4))
    logits, _ = contest.expected_logits(SimpleNamespace(seq_len=8), source, req, "cpu", torch.float32, None, None)
    out = [None] * world
    dist.all_gather_object(out, (computed, logits.tolist()))
    return out


def test_every_rank_takes_rank_0s_expected_logits():
    """Each rank's validation chooses from its expected tokens the requests the submission's ranks answer together:
    one set of expected logits, rank 0's (two references on GPUs need not decode alike)."""
    assert run_parallel(_expected_on_a_rank, 2, timeout=120) == [([0], [0.0, 0.0]), ([1], [0.0, 0.0])]


def _exit_code_under_torchrun(rank, world):
    """The exit code of a rank that torchrun started, where main() answers 1 on rank 1 only (its own audit flagged)."""
    from moebench.cli import main
    from moebench.modes import parallel

    main.main = lambda argv: rank
    out = [None] * world
    dist.all_gather_object(out, parallel._torchrun_rank(rank, world, []))
    return out


def test_every_rank_torchrun_started_exits_with_rank_0s_code():
    assert run_parallel(_exit_code_under_torchrun, 2, timeout=120) == [0, 0]


def _out_of_step(rank, world):
    from moebench.engine.parallel import shared_value

    return shared_value(rank, "the port" if rank else "the seed")


def test_a_rank_out_of_step_with_rank_0_stops_naming_both_values():
    """A failure one rank met alone sends it on to the next prompt: its next broadcast pairs with another of the
    other ranks. Each broadcast names its value, so that rank stops, rather than take a seed for a port."""
    with pytest.raises(RankFailed, match="(?s)rank 1.*the ranks are out of step: rank 0 shared the seed where rank 1 "
                                         "waited for the port"):
        run_parallel(_out_of_step, 2, timeout=120)


def _prompts_with_failures(rank, world):
    """Three prompts' worth of evaluate_prompt's steps: on prompt 0 rank 1's submission fails alone before a
    checkpoint rank 0 goes on to; on prompt 1 both fail, alike; prompt 2 goes through. What each rank recorded."""
    from moebench.engine.parallel import agreed_failure, every_value, shared_value
    from moebench.errors import SubmissionFault

    outcomes = []
    for prompt in range(3):
        failure, seen = None, []
        try:
            if (rank, prompt) == (1, 0) or prompt == 1:
                raise SubmissionFault("its answer came past the time limit")
            seen.append(shared_value(10 * prompt + rank, "the fresh prompts' seed"))
            seen.append(every_value(rank, "the MAC counts"))
        except SubmissionFault as e:
            failure = e
        failure = agreed_failure(failure)
        outcomes.append((failure and str(failure), seen))
    waits = dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout  # for a collective's other ranks
    return _gathered(outcomes, world), waits


def test_a_failure_one_rank_meets_alone_is_every_ranks_and_the_next_prompt_runs_in_step():
    """A failure one rank meets alone sends it to the prompt's end, where it waits: the others learn of it at their
    next checkpoint (rather than pair it with another collective) and every rank records the same outcome. It
    waits a day, not gloo's 30 minutes: one of the others' calls may take an hour (--phase-time-limit)."""
    want = [("rank 1: its answer came past the time limit", []),
            ("ranks 0, 1: its answer came past the time limit", []),
            (None, [20, [0, 1]])]
    outcomes, waits = run_parallel(_prompts_with_failures, 2, timeout=120)
    assert outcomes == [want, want] and waits.total_seconds() == 24 * 3600


def _fail_on_rank_1(rank, world):
    if rank == 1:
        raise KeyError("rank one broke")
    dist.barrier()  # rank 0 waits in a collective that never completes: run_parallel must stop it
    return rank


def test_run_parallel_reports_a_failing_rank():
    with pytest.raises(RankFailed, match="(?s)rank 1.*KeyError: 'rank one broke'"):
        run_parallel(_fail_on_rank_1, 2)


def _return_early_on_rank_1(rank, world):
    if rank == 1:
        return "rank one gave up"  # and leaves the group: rank 0's collective is broken
    dist.barrier()
    return rank


def test_run_parallel_names_a_rank_that_returned_while_another_waited():
    with pytest.raises(RankFailed, match="(?s)rank 0.*--- rank 1 ---\nhad returned 'rank one gave up'") as e:
        run_parallel(_return_early_on_rank_1, 2, timeout=60)
    assert [r for r, _ in e.value.errors] == [0] and e.value.ended == {1: "rank one gave up"}
