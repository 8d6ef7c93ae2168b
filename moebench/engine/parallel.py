"""Tensor parallelism (--tp-degree): shards a loaded reference model over N ranks, and starts the ranks.

What is split, as NxDI does it (spec/nxdi-semantics.md §3):
- attention: query heads over ranks; key/value heads too when Hkv >= N, else each rank keeps the one kv head its
  query heads read (replicated). q/k/v (or the fused qkv_proj) are column-parallel, o_proj row-parallel;
- experts and dense MLPs: the intermediate dim I (gate and up rows alike, down_proj columns); the router is
  replicated, so every rank routes every token the same way;
- lm_head: the vocabulary, logits all-gathered so every rank returns the full [B, T, V]; with vocab_parallel the
  embedding table too (each rank looks up its id range, zeros elsewhere, then a sum).
Row-parallel outputs are all-reduced in `reduce_dtype` (--rpl-reduce-dtype; None: the activations' dtype), their
bias added once after the sum. Norms, RoPE and the residual stream stay replicated. The collectives are
torch.distributed's functional ones, which torch.compile traces into the graph (no graph break), on gloo and NCCL.

Sequence parallelism (--sequence-parallel-enabled), in context encoding only (decode steps run as above): the
embedding output is split over the sequence (each rank keeps T / N rows), the norms and residual adds run on the
local rows, the normalised rows are all-gathered before attention and before the MoE (the router needs every
token), and the row-parallel outputs (o_proj, experts, dense MLP) are reduce-scattered over the sequence instead of
all-reduced; the last layer's rows are all-gathered for the LM head. NxDI needs the bucket to divide by N; here a
sequence that does not is padded with zero rows to the next multiple, dropped again when gathered.
"""

import dataclasses
import os
import pickle
import queue
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from moebench.errors import MoebenchError, SubmissionFault
from moebench.model.qwen3_moe import Attention, DenseMLP, SparseMoE, untouched

# Legend: N ranks, r this rank, H/Hkv query/key-value heads, hd head dim, D hidden, I intermediate, V vocab, E experts.


class ShardingError(MoebenchError, ValueError):
    """The model does not split N ways (a --tp-degree that does not divide its heads, I or vocabulary)."""


@dataclass(frozen=True)
class TensorParallel:
    """What a sharded model records about its split (as `model.parallel`)."""

    rank: int
    world: int
    group: object = None  # a torch.distributed ProcessGroup; None: the default (WORLD)
    vocab_parallel: bool = False
    reduce_dtype: torch.dtype | None = None


# ---- collectives: functional, so that torch.compile traces them ----

class _SequenceRegion:
    """Set while a sequence-parallel context encoding runs its layers: T, the sequence length (else None)."""

    T: int | None = None


_region = _SequenceRegion()

def _wait(t: torch.Tensor) -> torch.Tensor:
    # Eager functional collectives return an AsyncCollectiveTensor; the next op needs the data anyway.
    return t.wait() if isinstance(t, funcol.AsyncCollectiveTensor) else t


def all_reduce(x: torch.Tensor, group=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sum of x over the group's ranks, summed in `dtype` (None: x's dtype) and returned in x's dtype."""
    y = x if dtype is None or dtype == x.dtype else x.to(dtype)
    y = _wait(funcol.all_reduce(y, "sum", group or dist.group.WORLD))
    return y.to(x.dtype)


_gather0 = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor  # renamed in torch 2.10


def all_gather_last(x: torch.Tensor, world: int, group=None) -> torch.Tensor:
    """x [..., n] on each rank -> [..., world * n], rank r's block at [r*n, (r+1)*n)."""
    g = _wait(_gather0(x.contiguous(), 0, group or dist.group.WORLD))  # [world * x.shape[0], ...]
    g = g.view(world, *x.shape).movedim(0, -2)  # [..., world, n]
    return g.reshape(*x.shape[:-1], world * x.shape[-1])


_scatter0 = getattr(funcol, "reduce_scatter_single", None) or funcol.reduce_scatter_tensor


def _padded(T: int, world: int) -> int:
    return -(-T // world) * world


def local_rows(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """x [B, T, D], the same on every rank -> this rank's rows [B, ceil(T / N), D] (zero rows pad the last)."""
    T = x.shape[1]
    n = _padded(T, world) // world
    return F.pad(x, (0, 0, 0, _padded(T, world) - T))[:, rank * n:(rank + 1) * n]


def gather_rows(x: torch.Tensor, T: int, world: int, group=None) -> torch.Tensor:
    """Each rank's rows [B, n, D] -> the whole sequence [B, T, D] (padding rows dropped)."""
    g = _wait(_gather0(x.transpose(0, 1).contiguous(), 0, group or dist.group.WORLD))  # [N * n, B, D]
    return g.transpose(0, 1)[:, :T]


def reduce_scatter_rows(y: torch.Tensor, world: int, group=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Each rank's partial sum [B, T, D] -> this rank's rows of the sum [B, ceil(T / N), D], summed in `dtype`."""
    T = y.shape[1]
    z = F.pad(y, (0, 0, 0, _padded(T, world) - T)).transpose(0, 1)  # [Tp, B, D]
    z = z if dtype is None or dtype == y.dtype else z.to(dtype)
    z = _wait(_scatter0(z.contiguous(), "sum", 0, group or dist.group.WORLD))  # [Tp / N, B, D]
    return z.transpose(0, 1).to(y.dtype)


def reduce_rows(y: torch.Tensor, world: int, group=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A row-parallel output's sum over ranks: all of it, or this rank's rows inside a sequence-parallel region."""
    if _region.T is not None:
        return reduce_scatter_rows(y, world, group, dtype)
    return all_reduce(y, group, dtype)


# ---- parallel layers ----

def _keep(t: torch.Tensor) -> nn.Parameter:
    """A parameter owning a copy of the slice t, so that the full tensor can be freed."""
    return nn.Parameter(t.clone(memory_format=torch.contiguous_format), requires_grad=False)


def _own_shard(block: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A submission's own block in the place of one of the reference's nn.Linear layers, made this rank's shard: its
    weight (and bias, where it has one) replaced by the slices given; its forward then runs on them."""
    block.weight = _keep(weight)
    if bias is not None:
        block.bias = _keep(bias)
    return block


def _bias(block: nn.Module) -> torch.Tensor | None:
    bias = getattr(block, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_r @ W_r^T, + bias once: x's last dim (W's columns) is split over ranks. `kernel`: the
    product as the registered linear kernel (the block's, when it runs as one), else F.linear. A submission's own
    block in the nn.Linear's place runs its forward on its columns, its bias on rank 0 alone (zeros elsewhere)."""

    def __init__(self, linear: nn.Module, cols: slice, tp: TensorParallel, kernel=None):
        super().__init__()
        self.world, self.group, self.reduce_dtype = tp.world, tp.group, tp.reduce_dtype
        self.kernel, self.block = kernel or F.linear, None
        if type(linear) is nn.Linear:
            self.weight = _keep(linear.weight[:, cols])  # [out, in / N]
            self.bias = None if linear.bias is None else _keep(linear.bias)  # [out], whole
        else:
            bias = _bias(linear)
            self.block = _own_shard(linear, linear.weight[:, cols], bias if tp.rank == 0 or bias is None
                                    else torch.zeros_like(bias))
            self.weight, self.bias = self.block.weight, None

    def forward(self, x):
        y = self.kernel(x, self.weight) if self.block is None else self.block(x)
        y = reduce_rows(y, self.world, self.group, self.reduce_dtype)
        return y if self.bias is None else y + self.bias


class ReducedBlock(nn.Module):
    """Wraps a block whose output is this rank's partial sum (the sharded experts): sums it, then adds the residual.
    Takes the calls of SparseMoE.forward (x, norm=None, residual=None)."""

    def __init__(self, block: nn.Module, tp: TensorParallel):
        super().__init__()
        self.block = block
        self.world, self.group, self.reduce_dtype = tp.world, tp.group, tp.reduce_dtype

    def forward(self, x, norm=None, residual=None):
        out = reduce_rows(self.block(x, norm=norm), self.world, self.group, self.reduce_dtype)
        return out if residual is None else residual + out


class ParallelLMHead(nn.Module):
    """The lm_head split over the vocabulary: local logits [..., V / N], all-gathered to [..., V]. `kernel` as
    RowParallelLinear's; `block`: a submission's own lm_head, run on this rank's rows."""

    def __init__(self, weight: nn.Parameter, tp: TensorParallel, kernel=None, block: nn.Module | None = None):
        super().__init__()
        self.weight = weight  # [V / N, D]
        self.world, self.group = tp.world, tp.group
        self.kernel, self.block = kernel or F.linear, block
        if block is not None:
            block.weight = weight

    def forward(self, x):
        y = self.kernel(x, self.weight) if self.block is None else self.block(x)
        return all_gather_last(y, self.world, self.group)


class VocabParallelEmbedding(nn.Module):
    """The embedding split over the vocabulary: rows [start, start + V / N) here, zeros for other ids, summed."""

    def __init__(self, weight: nn.Parameter, start: int, tp: TensorParallel):
        super().__init__()
        self.weight, self.start, self.group = weight, start, tp.group  # weight [V / N, D]

    def forward(self, ids):
        local = ids - self.start
        here = (local >= 0) & (local < self.weight.shape[0])  # [B, T]
        x = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight) * here[..., None]
        return all_reduce(x, self.group)  # exactly one rank holds each row: the sum is exact in any dtype


class SequenceParallelLayers(nn.Module):
    """The decoder layers with sequence parallelism in context encoding (see the module's docstring); decode steps
    (one token) run the layers as they are. Takes the place of model.model.layers' contents, called like a layer."""

    def __init__(self, layers: nn.ModuleList, tp: TensorParallel):
        super().__init__()
        self.layers = layers
        self.rank, self.world, self.group = tp.rank, tp.world, tp.group

    def forward(self, x, cos, sin, step, cache):
        T = x.shape[1]
        if T == 1:
            for layer in self.layers:
                x = layer(x, cos, sin, step, cache)
            return x
        x = local_rows(x, self.rank, self.world)  # the embedding's rows, split (its reduce-scatter)
        _region.T = T
        try:
            for layer in self.layers:
                h = x + layer.self_attn(self._gather(layer.input_layernorm(x), T), cos, sin, step, cache)
                x = h + layer.mlp(self._gather(layer.post_attention_layernorm(h), T))
        finally:
            _region.T = None
        return self._gather(x, T)

    def _gather(self, x, T):
        return gather_rows(x, T, self.world, self.group)


# ---- sharding ----

def _heads(cfg, rank: int, world: int) -> tuple[range, range]:
    """(query heads, key/value heads) that rank keeps."""
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    q = range(rank * H // world, (rank + 1) * H // world)
    if Hkv >= world:
        return q, range(rank * Hkv // world, (rank + 1) * Hkv // world)
    g = H // Hkv  # GQA group: query head h reads kv head h // g; all of this rank's heads are in one group
    return q, range(q.start // g, q.start // g + 1)


def check_shardable(cfg, world: int) -> None:
    """Raises ShardingError unless the model with config `cfg` splits `world` ways."""
    if world < 1:
        raise ShardingError(f"tensor-parallel degree must be >= 1, got {world}")
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    if H % world:
        raise ShardingError(f"--tp-degree {world}: the model's {H} attention heads do not split {world} ways; "
                            f"use a degree that divides {H}")
    if Hkv >= world and Hkv % world or Hkv < world and world % Hkv:
        raise ShardingError(f"--tp-degree {world}: the model's {Hkv} key/value heads neither split {world} ways nor "
                            f"replicate evenly over {world} ranks; use a degree that divides or is a multiple of {Hkv}")
    sizes = {"vocabulary": cfg.vocab_size}
    if any(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)):
        sizes["moe_intermediate_size"] = cfg.moe_intermediate_size
    if not all(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)):
        sizes["intermediate_size"] = cfg.intermediate_size
    for what, n in sizes.items():
        if n % world:
            raise ShardingError(f"--tp-degree {world}: the model's {what} ({n}) does not split {world} ways")


def _shard_attention(attn: Attention, qh: range, kvh: range, tp: TensorParallel) -> None:
    hd = attn.hd
    q_rows, kv_rows = slice(qh.start * hd, qh.stop * hd), slice(kvh.start * hd, kvh.stop * hd)
    names = ["qkv_proj"] if attn.fused else ["q_proj", "k_proj", "v_proj"]
    for name in names:
        lin = getattr(attn, name)
        if attn.fused:  # rows: q [H*hd] | k [Hkv*hd] | v [Hkv*hd]
            def rows(t):
                q, k, v = t.split(attn.sizes, dim=0)
                return torch.cat([q[q_rows], k[kv_rows], v[kv_rows]])
        else:
            def rows(t, s=q_rows if name == "q_proj" else kv_rows):
                return t[s]
        setattr(attn, name, _column_shard(lin, rows))
    attn.o_proj = RowParallelLinear(attn.o_proj, q_rows, tp, attn.o_kernel if untouched(attn.o_proj) else None)
    attn.n_heads, attn.n_kv = len(qh), len(kvh)
    attn.sizes = [len(qh) * hd, len(kvh) * hd, len(kvh) * hd]


def _column_shard(lin: nn.Module, rows) -> nn.Module:
    """This rank's rows (`rows` picks them from a [out, ...] tensor) of a column-parallel product, in place: the
    reference's nn.Linear and a submission's own block alike."""
    bias = _bias(lin)
    block = _own_shard(lin, rows(lin.weight), None if bias is None else rows(bias))
    if type(block) is nn.Linear:
        block.out_features = block.weight.shape[0]
    return block


def _check_products(model: nn.Module, cfg, vocab_parallel: bool) -> None:
    """Raises ShardingError where a block in the place of one of the reference's products holds no weight of that
    product's shape to split (a submission's own block is sharded by its `weight`, laid out as nn.Linear's [out,
    in])."""
    D, q, kv = cfg.hidden_size, cfg.q_size, cfg.kv_size
    blocks = {"lm_head": (model.lm_head, (cfg.vocab_size, D))}
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        shapes = {"qkv_proj": (q + 2 * kv, D)} if attn.fused else {"q_proj": (q, D), "k_proj": (kv, D),
                                                                    "v_proj": (kv, D)}
        blocks.update({f"layers.{i}.self_attn.{n}": (getattr(attn, n, None), shape)
                       for n, shape in {**shapes, "o_proj": (D, q)}.items()})
        if isinstance(layer.mlp, DenseMLP):
            I = cfg.intermediate_size
            blocks.update({f"layers.{i}.mlp.{n}": (getattr(layer.mlp, n, None), shape)
                           for n, shape in (("gate_up_proj", (2 * I, D)), ("down_proj", (D, I)))})
    for where, (block, shape) in blocks.items():
        weight = getattr(block, "weight", None)
        if not (isinstance(weight, torch.Tensor) and tuple(weight.shape) == shape):
            raise ShardingError(f"shard_model: {where} is a {type(block).__name__} without a weight of the "
                                f"reference's shape {list(shape)} (nn.Linear's [out, in]) to split; tensor "
                                "parallelism shards a block in the place of the reference's nn.Linear by its weight")
    embed = model.model.embed_tokens
    if vocab_parallel and type(embed) is not nn.Embedding:
        raise ShardingError(f"shard_model: --vocab-parallel splits the reference's nn.Embedding; embed_tokens is a "
                            f"{type(embed).__name__}")


def _shard_experts(moe: SparseMoE, rank: int, world: int) -> None:
    ex = moe.experts
    quantized = hasattr(ex, "gate_up_proj_q")
    gate_up = ex.gate_up_proj_q if quantized else ex.gate_up_proj  # [E, 2I, D]
    I = gate_up.shape[1] // 2
    cols = slice(rank * I // world, (rank + 1) * I // world)

    def gate_up_rows(t):  # [E, 2I, ...] -> [E, 2I / N, ...], gate rows first, then up
        return torch.cat([t[:, :I][:, cols], t[:, I:][:, cols]], dim=1)

    if quantized:  # per-output-channel scales: gate_up's follow its rows, down's (over D) stay whole
        ex.gate_up_proj_q = gate_up_rows(ex.gate_up_proj_q).contiguous()
        ex.gate_up_proj_scale = gate_up_rows(ex.gate_up_proj_scale).contiguous()
        ex.down_proj_q = ex.down_proj_q[:, :, cols].contiguous()
    else:
        ex.gate_up_proj = _keep(gate_up_rows(ex.gate_up_proj))  # [E, 2I / N, D]
        ex.down_proj = _keep(ex.down_proj[:, :, cols])  # [E, D, I / N]


def _shard_dense(mlp: DenseMLP, rank: int, world: int, tp: TensorParallel) -> None:
    I = mlp.down_proj.weight.shape[1]
    cols = slice(rank * I // world, (rank + 1) * I // world)
    mlp.gate_up_proj = _column_shard(mlp.gate_up_proj, lambda t: torch.cat([t[:I][cols], t[I:][cols]]))  # gate, up
    mlp.down_proj = RowParallelLinear(mlp.down_proj, cols, tp, mlp.kernel if untouched(mlp.down_proj) else None)


def shard_model(model: nn.Module, rank: int, world: int, group=None, vocab_parallel: bool = False,
                reduce_dtype: torch.dtype | None = None, sequence_parallel: bool = False) -> nn.Module:
    """Turns a loaded reference Qwen3MoeForCausalLM into rank `rank`'s shard of a `world`-way tensor-parallel model,
    in place, keeping only this rank's slices. Every rank must call it and then run the same forward calls.

    Afterwards model.config holds the local head counts (so Engine builds a local KV cache), model.global_config
    the whole model's, model.parallel the split. World 1 leaves the layers as they are."""
    cfg = getattr(model, "global_config", None) or model.config
    if getattr(model, "parallel", None) is not None and model.parallel.world > 1:
        raise ShardingError("shard_model: this model is already sharded")
    check_shardable(cfg, world)
    if not 0 <= rank < world:
        raise ShardingError(f"shard_model: rank {rank} is outside 0..{world - 1}")
    tp = TensorParallel(rank, world, group, vocab_parallel, reduce_dtype)
    if world == 1:
        model.global_config, model.parallel = cfg, tp
        return model
    if not dist.is_initialized() or dist.get_world_size(group) != world:
        raise ShardingError(f"shard_model: world {world} needs an initialised process group of that size "
                            "(run_parallel, init_from_env or torch.distributed.init_process_group)")
    layers = model.model.layers
    for layer in layers:
        for part, kinds in ((layer.self_attn, (Attention,)), (layer.mlp, (SparseMoE, DenseMLP))):
            if not isinstance(part, kinds):
                raise ShardingError(f"shard_model: cannot shard {type(part).__name__}; tensor parallelism runs the "
                                    "reference model's blocks only")
    _check_products(model, cfg, vocab_parallel)
    model.global_config, model.parallel = cfg, tp
    qh, kvh = _heads(cfg, rank, world)
    for layer in layers:
        _shard_attention(layer.self_attn, qh, kvh, tp)
        if isinstance(layer.mlp, SparseMoE):
            _shard_experts(layer.mlp, rank, world)
            layer.mlp = ReducedBlock(layer.mlp, tp)  # the router stays whole
        else:
            _shard_dense(layer.mlp, rank, world, tp)
    V = cfg.vocab_size
    vocab = slice(rank * V // world, (rank + 1) * V // world)
    head = _keep(model.lm_head.weight[vocab])  # [V / N, D]
    if vocab_parallel:
        tied = model.lm_head.weight is model.model.embed_tokens.weight
        emb = head if tied else _keep(model.model.embed_tokens.weight[vocab])
        model.model.embed_tokens = VocabParallelEmbedding(emb, vocab.start, tp)
    own = None if type(model.lm_head) is nn.Linear else model.lm_head
    model.lm_head = ParallelLMHead(head, tp, model.lm_head_kernel if untouched(model.lm_head) else None, own)
    if sequence_parallel:
        model.model.layers = nn.ModuleList([SequenceParallelLayers(layers, tp)])
    model.config = dataclasses.replace(cfg, num_attention_heads=len(qh), num_key_value_heads=len(kvh),
                                       head_dim=cfg.dim_head)  # head_dim pinned: its default derives from H
    return model


class FailedOnAnotherRank(SubmissionFault):
    """This rank's evaluation stops because another rank's failed (a fault that rank met alone: its call ended past
    the time limit where this rank's ended inside it, say)."""


_OUTCOME = "the prompt's outcome"


def _gathered(what: str, value, failure: str | None) -> list[tuple]:
    """Every rank's (what, value, failure), in rank order."""
    entries = [None] * dist.get_world_size()
    dist.all_gather_object(entries, (what, value, failure))
    return entries


def _in_step(what: str, value) -> list:
    """Every rank's value, the ranks' checkpoint: each names what it shares (a rank whose collective pairs with
    another of the others stops, naming both, rather than take a seed for a port), and a rank that met a failure
    alone, waiting in agreed_failure, is seen here by the others: they raise FailedOnAnotherRank and join it."""
    entries = _gathered(what, value, None)
    for r, (theirs, _, failure) in enumerate(entries):
        if theirs == _OUTCOME and failure is not None:
            raise FailedOnAnotherRank(f"rank {r}: {failure}")
    odd = next((r for r, (theirs, _, _) in enumerate(entries) if theirs != entries[0][0]), None)
    if odd is not None:
        raise RuntimeError(f"the ranks are out of step: rank 0 shared {entries[0][0]} where rank {odd} waited for "
                           f"{entries[odd][0]}")
    return [v for _, v, _ in entries]


def shared_value(value, what: str):
    """Rank 0's value on every rank of the default group (a checkpoint: _in_step); the value itself without tensor
    parallelism. `what` names it."""
    if not dist.is_initialized():
        return value
    _in_step(what, None)
    box = [value]  # (broadcast, in step now: an all-gather would move the expected logits once per rank)
    dist.broadcast_object_list(box, src=0)
    return box[0]


def every_value(value, what: str) -> list:
    """Every rank's value, in rank order (a checkpoint: _in_step); [value] without tensor parallelism."""
    return _in_step(what, value) if dist.is_initialized() else [value]


def agreed_failure(error: SubmissionFault | None) -> SubmissionFault | None:
    """The end of a prompt on every rank: None where every rank's evaluation went through, else one SubmissionFault
    naming each rank that failed on its own and why, so that every rank records the same outcome and starts the
    next prompt in step. A rank that failed alone waits here until the others, told at their next checkpoint
    (evaluate_prompt has them after the build, the validation and the FLOP count, and before each of the reference's
    collectives), come too."""
    if not dist.is_initialized():
        return error
    own = None if error is None or isinstance(error, FailedOnAnotherRank) else str(error)
    entries = _gathered(_OUTCOME, None, own)
    while not all(what == _OUTCOME for what, _, _ in entries):
        entries = _gathered(_OUTCOME, None, own)
    ranks = {}  # each failure's text: the ranks that met it
    for r, (_, _, failure) in enumerate(entries):
        if failure is not None:
            ranks.setdefault(failure, []).append(str(r))
    return SubmissionFault("; ".join(f"rank{'s' * (len(rs) > 1)} {', '.join(rs)}: {failure}"
                                     for failure, rs in ranks.items())) if ranks else None


# ---- starting ranks ----

def writes_files() -> bool:
    """Only rank 0 writes reports, records and expected logits; the other ranks compute the same and keep quiet."""
    return not dist.is_initialized() or dist.get_rank() == 0


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


# How long a rank waits in a collective for the others: they may be waiting on their submissions (each call up to
# --phase-time-limit), and a rank whose submission failed alone waits at the prompt's end until they come
# (agreed_failure): a day (gloo's default, 30 minutes, is less than one call may take; 24 calls of a whole hour
# between two checkpoints would still outlast it). A rank that dies is seen at once: run_parallel watches the
# processes, as torchrun's agent does; a true deadlock (a bug) waits the day out.
RANKS_WAIT = timedelta(days=1)


def init_from_env(backend: str | None = None) -> tuple[int, int, torch.device]:
    """Joins the process group that torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; LOCAL_RANK
    picks the GPU): NCCL when CUDA is there, else gloo. Returns (rank, world, this rank's device)."""
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise MoebenchError(f"tensor parallelism: {', '.join(missing)} not set; start the ranks with torchrun")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                                rank=rank, world_size=world, timeout=RANKS_WAIT)
    return rank, world, device


class RankFailed(RuntimeError):
    """A rank started by run_parallel raised; the message holds the tracebacks, `errors` the (rank, traceback)
    pairs, first cause first."""

    def __init__(self, message: str, errors: list = (), rank0=None, ended: dict | None = None):
        super().__init__(message)
        self.errors, self.rank0 = list(errors), rank0  # rank0: rank 0's result, where it came with the failures
        self.ended = dict(ended or {})  # {rank: result} of the other ranks that had returned: often the cause


def _worker(rank: int, world: int, port: int, fn, args, results) -> None:
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the ranks share the cores
        store = dist.TCPStore("127.0.0.1", port, is_master=False)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=RANKS_WAIT)
        out = fn(rank, world, *args)
        # Plain pickle bytes: torch's queue would pass tensors through shared memory that dies with this process.
        results.put((rank, None, pickle.dumps(out)))
    except BaseException:
        results.put((rank, traceback.format_exc(), None))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


RANK0_GRACE = 10.0  # s


def run_parallel(fn, world: int, *args, timeout: float | None = None):
    """Runs fn(rank, world, *args) in `world` fresh CPU processes joined by a gloo group on 127.0.0.1, and returns
    rank 0's result. fn must be importable (module level); results must pickle. A rank that raises (or dies) ends
    the run: the others are stopped and RankFailed carries the failing ranks' tracebacks, and the results of ranks
    that had returned meanwhile (a rank that leaves the group early breaks the collectives of those still in it)."""
    # The store lives here, on a port the OS picks: no race for a "free" port between processes.
    store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, store.port, fn, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    done, errors, value, ended = set(), [], None, {}
    waited = 0.0
    try:
        while len(done) < world and not errors:
            try:
                rank, err, data = results.get(timeout=0.5)
            except queue.Empty:
                waited += 0.5
                dead = [r for r, p in enumerate(procs) if r not in done and p.exitcode not in (None, 0)]
                if dead:
                    errors = [(r, f"exited with code {procs[r].exitcode} without a result\n") for r in dead]
                elif timeout is not None and waited > timeout:
                    errors = [(-1, f"no result after {timeout:g} s\n")]
                continue
            done.add(rank)
            if err is not None:
                errors.append((rank, err))
                # A rank's failure usually breaks the others' collectives: keep the first cause, collect a few, and
                # rank 0's result where it comes within RANK0_GRACE s (a user error both ranks meet: rank 0 prints it).
                deadline = time.monotonic() + RANK0_GRACE
                while True:
                    try:
                        r, e, data = results.get(timeout=1.0)
                    except queue.Empty:
                        if 0 in done or procs[0].exitcode is not None or time.monotonic() > deadline:
                            break
                        continue
                    done.add(r)
                    if e is not None:
                        errors.append((r, e))
                    elif r == 0:
                        value = pickle.loads(data)
                    else:
                        ended[r] = pickle.loads(data)
            elif rank == 0:
                value = pickle.loads(data)
            else:
                ended[rank] = pickle.loads(data)
    finally:
        for p in procs:
            if errors:
                p.terminate()
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        text = "".join(f"--- rank {r} ---\n{e}" for r, e in errors)
        text += "".join(f"--- rank {r} ---\nhad returned {v!r}\n" for r, v in sorted(ended.items()))
        raise RankFailed(f"{len(errors)} rank(s) of {world} failed:\n{text}", errors, value, ended)
    return value
