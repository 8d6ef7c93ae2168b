"""Batched generation with a static KV cache, split into context encoding and token generation steps."""

import collections
import dis
import logging
import math
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import counters
from torch._inductor.exc import InductorError

from moebench.engine import hugepages
from moebench.engine.sampling import OnDeviceSampling, SamplingParams, on_device_sample, sample
from moebench.errors import MoebenchError
from moebench.model import cpu_ops
from moebench.model.loader import out_of_memory
from moebench.model.qwen3_moe import KVCache, StepInputs


@dataclass
class Generation:
    tokens: torch.Tensor  # [B, N] new token ids (pad after a row's EOS)
    lengths: list[int]  # new tokens per row, EOS included
    logits: torch.Tensor | None  # [N, B, V] float32 raw logits of each generated token, when asked


def auto_buckets(largest: int) -> tuple[int, ...]:
    """NxDI's automatic bucket rule: powers of two from 128 below the largest size, then the largest itself."""
    return tuple(2**i for i in range(7, round(math.log2(largest)))) + (largest,)


def _kind(x):
    """A step's arguments as their kind: tensors as device, dtype, shape and strides, plain values as themselves."""
    if isinstance(x, torch.Tensor):
        return x.device, x.dtype, tuple(x.shape), x.stride()
    return tuple(_kind(y) for y in x) if isinstance(x, tuple) else x


def _arguments(fn, args: tuple) -> dict:
    """fn's local variables on entry when called with these positional arguments (what Dynamo's guards read)."""
    code = fn.__code__
    missing = code.co_argcount - len(args)
    return dict(zip(code.co_varnames, args + (fn.__defaults__[len(fn.__defaults__) - missing:] if missing else ())))


def _compiled_code(fn, *args):
    """(guards, function) of the code Dynamo made of fn for these arguments (the cache entry whose guards pass, taking
    fn's local variables on entry: _arguments), when all that code does is call one compiled graph; (None, None) when
    it does more (a graph break: the code after it is compiled only under Dynamo's hook); None when no entry's guards
    pass (the call changed state they read)."""
    try:
        for entry in _debug_get_cache_entry_list(fn.__code__):
            if entry.guard_manager.check(_arguments(fn, args)):
                names = entry.code.co_names
                graphs = sum(n.startswith("__compiled_fn") for n in names)
                if graphs != 1 or any(n.startswith("__resume") for n in names):
                    return None, None
                code = types.FunctionType(entry.code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
                return entry.guard_manager.check, code
    except Exception:  # a torch whose cache entries read otherwise: Dynamo serves
        return None, None
    return None


# The instructions of Dynamo's code for a step that only reads its arguments (locals, attributes, items) and calls
# its graph: nothing stored into an object, no other call but the profiler's marks (CPython 3.11's names: another
# version's code keeps its own call).
_READING = frozenset({"RESUME", "NOP", "LOAD_GLOBAL", "LOAD_ATTR", "LOAD_METHOD", "LOAD_FAST", "LOAD_CONST",
                      "LOAD_DEREF", "BINARY_SUBSCR", "COPY", "SWAP", "STORE_FAST", "DELETE_FAST", "PUSH_NULL",
                      "PRECALL", "CALL", "BUILD_LIST", "BUILD_TUPLE", "LIST_EXTEND", "POP_TOP", "RETURN_VALUE"})


def _graph_name(code: types.CodeType) -> str | None:
    """The global name of the one graph that code calls, when all it does is read its arguments and call it
    (_READING); else None. (~1 ms: once a kind of step.)"""
    names = [n for n in code.co_names if n.startswith("__compiled_fn")]
    ops = list(dis.get_instructions(code))
    marks = sum(i.opname in ("LOAD_ATTR", "LOAD_METHOD") and str(i.argval).startswith("record_pregraph") for i in ops)
    calls = sum(i.opname == "CALL" for i in ops)
    pure = len(names) == 1 and calls == 1 + marks and all(i.opname in _READING for i in ops)
    return names[0] if pure else None


def _graph_call(code, args: tuple, name: str):
    """Runs code(*args), code a step's function Dynamo compiled (_compiled_code) that only reads its arguments and
    calls its graph, the global `name` (_graph_name), and returns (its output, a function that runs the next steps
    given their inputs (args but the engine), or None where it cannot). That function calls the graph itself with the
    arguments the code read now, the step's own inputs replaced by the next step's, without the ~300 instructions
    fetching the weights (the embedded model's step on the 2-core AMD VM: 275 -> 255 us). The tensors it holds are
    those the code read now: right while no other code of the model runs (_run_step)."""
    graph, seen = code.__globals__[name], []

    def record(*graph_args):
        seen[:] = graph_args, graph(*graph_args)
        return seen[1]

    out = types.FunctionType(code.__code__, {**code.__globals__, name: record}, code.__name__, code.__defaults__,
                             code.__closure__)(*args)
    graph_args, results = list(seen[0]), seen[1]
    where = []  # (graph argument, step input, item of a tuple input or None): each of the step's tensors
    for i, x in enumerate(args[1:]):
        for k, t in enumerate(x) if isinstance(x, tuple) else [(None, x)]:
            if isinstance(t, torch.Tensor):
                at = [j for j, a in enumerate(graph_args) if a is t]
                if not at:  # an input the graph does not read (or reads otherwise)
                    return out, None
                where += [(j, i, k) for j in at]
    one = not isinstance(out, tuple)
    picks = [next((j for j, r in enumerate(results) if r is o), -1) if o is not None else None
             for o in ((out,) if one else out)]
    if -1 in picks or not (one or type(out) is tuple):
        return out, None

    def step(*inputs):
        for j, i, k in where:
            graph_args[j] = inputs[i] if k is None else inputs[i][k]
        results = graph(*graph_args)
        got = tuple(None if j is None else results[j] for j in picks)
        return got[0] if one else got
    return out, step


def _no_shim_warning(record: logging.LogRecord) -> bool:
    """Drops Inductor's warning, amid a mode's output, that an ATen op of a graph the C++ wrapper calls (a batch's
    experts' index_add) has no C entry point and is called through the dispatcher: the graph runs all the same."""
    return "is missing a c-shim implementation" not in record.getMessage()


def first_fit(buckets: tuple[int, ...], n: int, kind: str) -> int:
    """The smallest bucket holding n tokens; a clear error when none does."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} tokens do not fit the largest {kind} bucket ({buckets[-1]})")


def prefill_width(ctx_buckets: tuple[int, ...], T: int) -> int:
    """Columns a T-column prompt runs with: its context-encoding bucket, or T itself (no buckets, or longer than
    the largest: validation's teacher forcing)."""
    return first_fit(ctx_buckets, T, "context-encoding") if ctx_buckets and T <= ctx_buckets[-1] else T


def decode_width(tkg_buckets: tuple[int, ...], max_len: int, slot: int) -> int:
    """Cache slots a decode step writing `slot` attends to: its token-generation bucket, or the whole cache."""
    return first_fit(tkg_buckets, slot + 1, "token-generation") if tkg_buckets else max_len


def graph_runs(ctx_buckets: tuple[int, ...], tkg_buckets: tuple[int, ...], max_len: int, T: int,
               new_tokens: int) -> list[tuple[str, int, int]]:
    """The graphs a request of T prompt columns and new_tokens new tokens runs: (submodel, bucket, runs), the
    context encoding once, then each token-generation bucket as many times as decode steps fall in it."""
    runs = [("context_encoding_model", prefill_width(ctx_buckets, T), 1)]
    buckets = [decode_width(tkg_buckets, max_len, slot) for slot in range(T, T + new_tokens - 1)]
    return runs + [("token_generation_model", S, buckets.count(S)) for S in dict.fromkeys(buckets)]


def engine_for(model, batch: int, seq_len: int, **options) -> "Engine":
    """Engine(model, batch, seq_len, ...); a KV cache too large to make (out of memory, or sizes past 64 bits:
    torch's "overflow", a TypeError or a RuntimeError) is the user's --seq-len, not a bug: one line."""
    try:
        return Engine(model, batch=batch, max_len=seq_len, **options)
    except (RuntimeError, MemoryError, TypeError) as e:
        if not out_of_memory(e) and "overflow" not in str(e).lower():
            raise
        cfg = model.config
        gb = 2 * cfg.num_hidden_layers * batch * cfg.kv_size * seq_len * next(model.parameters()).itemsize / 1e9
        raise MoebenchError(f"--seq-len {seq_len}: the KV cache needs {gb:.1f} GB, more than is free") from None


class Engine:
    """Runs one model over a batch: `prefill` (the whole prompt) then `decode` (one token per row per call).

    The cache has `max_len` slots. Every column of the padded prompt takes one slot, and every decode step the
    next slot, for all rows at once; `valid` records which slots hold real tokens, so left and right padding
    give the same result as running each prompt alone.

    Buckets (--enable-bucketing): the prompt is padded on the right to the first context-encoding bucket that
    fits (the padding columns are masked and their slots reused by decoding), and a decode step attends to the
    first token-generation bucket of cache slots that holds every token so far, so each bucket has one static
    shape: one compiled decode graph per bucket. Without buckets the prompt keeps its length and decode steps
    attend to the whole cache (one bucket at max_len, as the original without bucketing)."""

    def __init__(self, model: torch.nn.Module, batch: int, max_len: int, compile: bool = False,
                 ctx_buckets: tuple[int, ...] = (), tkg_buckets: tuple[int, ...] = (),
                 sampling: OnDeviceSampling | None = None, cuda_graphs: bool = False, banned: tuple[int, ...] = (),
                 cache: KVCache | None = None):
        p = next(model.parameters())
        self.model, self.cfg, self.device = model, model.config, p.device
        self.batch, self.max_len = batch, max_len
        if self.device.type == "cpu":
            hugepages.adopt(model)  # decoding streams the weights: from 2 MiB pages, not 4 KiB ones
        if max(ctx_buckets + tkg_buckets, default=0) > max_len:
            raise ValueError(f"a bucket ({max(ctx_buckets + tkg_buckets)}) is larger than the KV cache ({max_len})")
        self.ctx_buckets, self.tkg_buckets = tuple(sorted(ctx_buckets)), tuple(sorted(tkg_buckets))
        self.sampling = sampling
        # Token ids greedy decoding never picks (`pick`, `greedy`, the in-graph argmax): the request's EOS ids, which
        # the original's min_new_tokens = max_new_tokens processor sets to -inf at every step.
        self.banned = tuple(sorted(set(banned)))
        self._banned = torch.tensor(self.banned, dtype=torch.long, device=self.device)
        # cache: another engine's over the same model, written over (this one's prefill makes it its own) where its
        # shape, dtype and device fit, rather than another allocated
        shape = (self.cfg.num_hidden_layers, batch, self.cfg.num_key_value_heads, max_len, self.cfg.dim_head)
        fits = cache is not None and all((t.shape, t.dtype, t.device) == (shape, p.dtype, p.device)
                                         for t in (cache.k, cache.v))
        self.cache = cache if fits else KVCache(self.cfg, batch, max_len, p.dtype, p.device)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=self.device)
        self.slot_pos = torch.zeros(batch, max_len, dtype=torch.long, device=self.device)
        self.next_slot = 0
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.all_slots = torch.arange(max_len, device=self.device)
        # Views a decode step takes, made once (a view costs ~1-2 µs; the embedded model's step ~0.12 ms): each
        # column of `valid`, each slot's index [1], and `valid` as each width's mask [B, 1, 1, S]
        self._valid_columns, self._slot_ids, self._masks = self.valid.unbind(1), self.all_slots.split(1), {}
        # Decode steps have static shapes (the mask spans the whole cache), so one compiled graph serves them all.
        if compile:
            # Dynamo keeps one cache of graphs for _decode_step across every engine of the process (reference,
            # submission, each prompt's length, each bucket); past the limit it would fall back to eager silently.
            limit = max(64, 4 * (len(self.tkg_buckets) + 1))
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        # cuda_graphs: each bucket's compiled decode step is captured once in a CUDA graph and replayed (Inductor's
        # "reduce-overhead"): one launch per step instead of one per kernel.
        self.cuda_graphs = compile and cuda_graphs and self.device.type == "cuda"
        self.compiled = compile  # the decode steps (a prefill runs eagerly)
        if self.cuda_graphs:  # the step writes the cache in place: a graph may only mutate inputs at fixed addresses
            for t in (self.cache.k, self.cache.v):
                torch._dynamo.mark_static_address(t)
        self._eager_decode_step = self._decode_step
        # A call through Dynamo costs its frame hook, cache lookup and guards, ~0.1 ms of the embedded model's
        # ~0.4 ms step on the 2-core AMD VM. As NxDI traces a bucket's graph once, a kind of step (its inputs'
        # devices, dtypes, shapes and strides, the bucket, the sampling arguments) gets one graph: its first step
        # runs through Dynamo, the next ones check the guards of the graph Dynamo picked until one passes (Python
        # state of a model's own, a lazily packed weight or a step counter, may make Dynamo compile again), and from
        # then on call the code Dynamo compiled for it directly (_run_step), the reference and a submission alike;
        # from its second step since other code of the model last ran, the graph that code calls (_graph_call).
        self._steps = {} if compile and not cuda_graphs else None
        self._lookups, self._compiles = collections.Counter(), collections.Counter()
        self._calls, self._graphs = {}, {}  # a fixed kind's graph call (_graph_call), its graph's name
        # On the CPU Inductor's C++ wrapper calls the kernels (not its Python one): a small model's step is mostly
        # the host's work. It cannot call the collectives of tensor parallelism.
        self.cpp_wrapper = compile and self.device.type == "cpu" and not (dist.is_available() and dist.is_initialized())
        if self.cpp_wrapper:
            logging.getLogger("torch._inductor.ir").addFilter(_no_shim_warning)
        if self.device.type == "cpu":
            cpu_ops.load()  # products, experts and attention in C++ (moebench.model.cpu_ops) if it builds
        self.argmax = cpu_ops.argmax_of(self.device)  # greedy decoding's choice: logits [B, V] -> [B]
        if compile:
            self._decode_step = self._compiled()

    def _compiled(self):
        """The decode step compiled: Inductor's "reduce-overhead" mode with cuda_graphs; otherwise without the size
        asserts on every input (Dynamo's guards, or the step's kind in _run_step, check each input's sizes and strides
        before the graph)."""
        if self.cuda_graphs:
            return torch.compile(self._eager_decode_step, dynamic=False, mode="reduce-overhead")
        # realize_reads_threshold 1: a value several operations read (a normalised hidden state: the router and the
        # experts, or q, k and v) is computed once into a buffer, not again inside each product's loop, where it made
        # the one-row products compute-bound (moebench-speed bfloat16: ~6% faster steps).
        options = {"cpp_wrapper": self.cpp_wrapper, "size_asserts": False, "realize_reads_threshold": 1}
        return torch.compile(self._eager_decode_step, dynamic=False, options=options)

    def _mask(self, q_slots: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, S] bool: causal over slots, real keys only (each query always sees itself)."""
        S = int(q_slots[-1]) + 1
        k_slots = torch.arange(S, device=self.device)
        causal = k_slots[None, :] <= q_slots[:, None]  # [T, S]
        mask = causal[None] & (self.valid[:, None, :S] | (k_slots[None, None, :] == q_slots[None, :, None]))
        if self.cfg.sliding_window is not None:
            q_pos = self.slot_pos[:, q_slots]  # [B, T]
            mask &= (q_pos[:, :, None] - self.slot_pos[:, None, :S]) < self.cfg.sliding_window
        return mask[:, None]

    def prefill_width(self, T: int) -> int:
        return prefill_width(self.ctx_buckets, T)

    def _prefill_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, every_column: bool = False):
        """Pads the prompt to its width and resets the cache's bookkeeping: (input_ids, StepInputs, mask)."""
        B, T = input_ids.shape
        assert B == self.batch and T <= self.max_len, (B, T)
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device).bool()
        width = self.prefill_width(T)
        input_ids, attention_mask = F.pad(input_ids, (0, width - T)), F.pad(attention_mask, (0, width - T))
        self.valid.zero_()
        self.valid[:, :width] = attention_mask
        positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)  # [B, T]
        self.slot_pos[:, :width] = positions
        slots = torch.arange(width, device=self.device)
        last = (attention_mask.long() * slots).argmax(1)  # [B] last real column, for either padding side
        step = StepInputs(positions=positions, slots=slots, mask=self._mask(slots), last=None if every_column else last)
        return input_ids, step, attention_mask

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, every_column: bool = False):
        """Context encoding: input_ids, attention_mask [B, T] -> logits of each row's last real token [B, V]
        (of every column [B, T, V] with every_column)."""
        real_columns = input_ids.shape[1]
        input_ids, step, attention_mask = self._prefill_inputs(input_ids, attention_mask, every_column)
        self._calls.clear()  # the model's own code runs: what a step's graph call holds may change
        logits = self.model(input_ids, step, self.cache)
        self.next_slot, self.next_pos = real_columns, attention_mask.long().sum(1)  # decoding reuses padding slots
        return logits[:, :real_columns] if every_column else logits[:, -1]

    def graph_runs(self, T: int, new_tokens: int) -> list[tuple[str, int, int]]:
        return graph_runs(self.ctx_buckets, self.tkg_buckets, self.max_len, T, new_tokens)

    def example_step(self, submodel: str, width: int) -> tuple:
        """Inputs of one call of the step function `submodel` at `width` (a bucket), for torch.export: the
        positional arguments of `step_function(submodel)`. Changes the cache's bookkeeping (a prefill resets it)."""
        if submodel == "context_encoding_model":
            ids = torch.zeros(self.batch, width, dtype=torch.long)
            ids, step, _ = self._prefill_inputs(ids, torch.ones_like(ids))
            return ids, step.positions, step.slots, step.mask, step.last
        self.next_slot, self.next_pos = width - 1, torch.full_like(self.next_pos, width - 1)  # the bucket's last slot
        self.valid[:, width:] = False  # none past the step's slot
        inputs = self._decode_inputs(torch.zeros(self.batch, dtype=torch.long))
        if self.sampling is None:
            return inputs
        p = self.sampling.params
        params = self._param_tensors(p) if self.sampling.dynamic else p
        return *inputs, torch.full((self.batch,), 0.5, device=self.device), params, self._how()

    @torch.inference_mode()
    def warm_decode(self, width: int) -> None:
        """One decode step in the `width` bucket, so that a compiled engine compiles that bucket's graph now."""
        self._replay(*self.example_step("token_generation_model", width))

    def step_function(self, submodel: str):
        """What one call of `submodel` computes, uncompiled: the model over a prompt, or a whole decode step
        (on-device sampling included)."""
        if submodel == "context_encoding_model":
            def prefill_step(ids, positions, slots, mask, last):
                return self.model(ids, StepInputs(positions, slots, mask, last), self.cache)[:, -1]
            return prefill_step
        return self._eager_decode_step

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token generation: one new token per row [B] -> logits [B, V]."""
        logits = self._replay(*self._decode_inputs(tokens))
        self.next_slot, self.next_pos = self.next_slot + 1, self.next_pos + 1
        return logits

    def _replay(self, *inputs):
        """The decode step; under CUDA graphs its outputs live in the graph's memory, which the next replay
        overwrites: they are copied out."""
        if not self.cuda_graphs:
            try:
                return self._run_step(inputs)
            except InductorError as e:
                # An operator the C++ wrapper cannot call (a submission's custom operator with an untyped argument,
                # say): the Python wrapper can.
                if not (self.cpp_wrapper and isinstance(e.inner_exception, NotImplementedError)):
                    raise
                self.cpp_wrapper = False
                self._decode_step = self._compiled()
                self._forget_steps()
                return self._run_step(inputs)
        torch.compiler.cudagraph_mark_step_begin()
        out = self._decode_step(*inputs)
        return out.clone() if isinstance(out, torch.Tensor) else tuple(None if t is None else t.clone() for t in out)

    def _run_step(self, inputs: tuple):
        """The compiled step: the first of each kind through Dynamo; the next ones check the guards of the graph Dynamo
        picked for that kind (through Dynamo again when they fail) until they pass once: from then on its code is
        called directly, unchecked (or the graph it calls, with the tensors the code read on the kind's last step, where
        no other code of the model ran since: a prefill, a step through Dynamo or eager; _graph_call). A step with
        a graph break, or of a kind whose guards failed for three steps, goes through Dynamo; a kind whose steps keep
        making Dynamo compile (a model's state that changes every step) runs eagerly from its fourth such step on, as
        a model NxDI could not trace into one graph would."""
        if self._steps is None:
            return self._decode_step(*inputs)
        kind = _kind(inputs)
        call = self._calls.get(kind)
        if call is not None:
            return call(*inputs)
        step = self._steps.get(kind)
        if step is not None and step[0] is None and step[1] is not None:  # fixed: its graph called directly?
            if kind not in self._graphs:
                self._graphs[kind] = _graph_name(step[1].__code__)
            if self._graphs[kind] is not None:
                out, call = _graph_call(step[1], (self, *inputs), self._graphs[kind])
                if call is None:
                    self._graphs[kind] = None  # its code from now on
                else:
                    self._calls[kind] = call
                return out
        self._calls.clear()  # the model's own code runs: what a graph call holds may change
        if step is not None and step[1] is not None:  # not a graph break
            guards, code = step
            args = (self, *inputs)
            if guards is None:
                return code(*args)
            if guards(_arguments(code, args)):
                self._steps[kind] = None, code  # the kind's graph from now on
                return code(*args)
        frames = counters["frames"]["total"]  # the frames Dynamo has compiled
        out = self._decode_step(*inputs)
        if counters["frames"]["total"] != frames:
            self._compiles[kind] += 1
            if self._compiles[kind] > 3:
                self._steps[kind] = None, type(self)._decode_step  # the step as written, without Dynamo
                return out
        if step is None or step[1] is not None:
            self._lookups[kind] += 1  # a kind not fixed after a few steps (its state changes every step): Dynamo's
            found = _compiled_code(type(self)._decode_step, self, *inputs) if self._lookups[kind] <= 3 else (None, None)
            if found is not None:
                self._steps[kind] = found
        return out

    def recompile(self) -> None:
        """Forget every compiled step (Dynamo's too): the next steps compile again, under the settings of then."""
        torch._dynamo.reset()
        self._forget_steps()

    def _forget_steps(self) -> None:
        if self._steps is not None:
            self._steps.clear()
        self._calls.clear()
        self._graphs.clear()
        self._lookups.clear()
        self._compiles.clear()

    @torch.inference_mode()
    def decode_sampled(self, tokens: torch.Tensor, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token generation with on-device sampling: tokens [B] and the draw [B] -> (next token ids [B], logits
        [B, V] when the sampling config asks for them, else None), all from one graph."""
        s = self.sampling
        p = s.params
        # --dynamic: the parameters are tensor inputs of the graph; otherwise constants of it (a change recompiles)
        params = self._param_tensors(p) if s.dynamic else p
        out = self._replay(*self._decode_inputs(tokens), uniform.to(self.device), params, self._how())
        self.next_slot, self.next_pos = self.next_slot + 1, self.next_pos + 1
        return out

    def _how(self) -> tuple:
        s = self.sampling  # plain values: the graph never reads self.sampling
        return s.global_topk, not s.params.greedy, s.output_logits, self.banned

    def _param_tensors(self, p: SamplingParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        def full(value, dtype):
            return torch.full((self.batch,), value, dtype=dtype, device=self.device)

        return full(p.top_k, torch.long), full(p.top_p, torch.float32), full(p.temperature, torch.float32)

    def sample_first(self, logits: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        """The on-device sampler applied to the context encoding's logits (the first new token)."""
        s = self.sampling
        return on_device_sample(logits, *self._param_tensors(s.params), uniform.to(self.device), s.global_topk,
                                not s.params.greedy, self.banned)

    def _decode_inputs(self, tokens: torch.Tensor):
        """The step writing the next slot: tokens [B, 1], positions [B, 1], slots [1], mask [B, 1, 1, S]. No slot past
        it is valid (a prefill clears them, decode steps fill them in order): the mask is `valid`'s first S."""
        slot = self.next_slot
        assert slot < self.max_len, "KV cache full"
        self._valid_columns[slot].fill_(True)
        S = self.decode_width(slot)
        if S not in self._masks:
            self._masks[S] = self.valid[:, None, None, :S]
        mask = self._masks[S].clone()  # a copy: the step's, whatever a model does with it
        if self.cfg.sliding_window is not None:  # (slot_pos: read by sliding windows only)
            self.slot_pos[:, slot] = self.next_pos
            mask &= ((self.next_pos[:, None] - self.slot_pos[:, :S]) < self.cfg.sliding_window)[:, None, None]
        # A copy: made here (in inference mode, as the warm-up's), the step's graph sees the same kind of tensor
        # whether the tokens came from a graph or from the caller (one graph a bucket, not two).
        tokens = tokens.clone() if tokens.device == self.device else tokens.to(self.device)
        return tokens.unsqueeze(1), self.next_pos.unsqueeze(1), self._slot_ids[slot], mask

    def decode_width(self, slot: int) -> int:
        return decode_width(self.tkg_buckets, self.max_len, slot)

    def _decode_step(self, tokens, positions, slots, mask, uniform=None, params=None, how=None):
        step = StepInputs(positions=positions, slots=slots, mask=mask)
        logits = self.model(tokens, step, self.cache)[:, -1]
        if uniform is None:
            return logits
        global_topk, do_sample, output_logits, banned = how
        if isinstance(params, SamplingParams):  # not --dynamic: constants of this graph
            params = self._param_tensors(params)
        ids = on_device_sample(logits, *params, uniform, global_topk, do_sample, banned)
        return ids, logits if output_logits else None

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """What greedy decoding chooses from: the logits with the banned ids at -inf (a new tensor when any are)."""
        return logits.index_fill(-1, self._banned, float("-inf")) if self.banned else logits

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """The greedy choice: logits [B, V] -> token ids [B], never a banned one. The argmax of the scores, taken
        from the logits unless it is banned (rare): a copy with the ids at -inf costs a decode step ~1.5% on the CPU,
        the check ~0.3% (the timed path syncs the device every step anyway)."""
        tokens = self.argmax(logits)
        if self.banned and any(t in self.banned for t in tokens.tolist()):
            tokens = self.argmax(self.scores(logits))
        return tokens

    def greedy(self, input_ids, attention_mask, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy decoding of exactly new_tokens tokens, no early stop (evaluation's decoding): (tokens [B, N],
        float32 scores [N, B, V]: the raw logits with the banned ids at -inf, as the original's scores after its
        min_new_tokens processor)."""
        scores = [self.scores(self.prefill(input_ids, attention_mask))]
        tokens = [self.argmax(scores[-1])]
        for _ in range(new_tokens - 1):
            scores.append(self.scores(self.decode(tokens[-1])))
            tokens.append(self.argmax(scores[-1]))
        return torch.stack(tokens, 1).cpu(), torch.stack(scores).float().cpu()

    def generate(self, input_ids, attention_mask, max_new_tokens: int, min_new_tokens: int = 0,
                 sampling: SamplingParams = SamplingParams(), generator: torch.Generator | None = None,
                 eos_ids: tuple[int, ...] = (), pad_id: int = 0, keep_logits: bool = False,
                 on_token=None) -> Generation:
        """Prefill, then decode until every row has max_new_tokens or has emitted EOS (after min_new_tokens).

        With on-device sampling (the engine's `sampling`, which then replaces `sampling`) each decode step samples
        inside its graph from a uniform draw of `generator`: a drawn EOS before min_new_tokens is kept, not banned
        (the greedy in-graph argmax never picks the engine's `banned` ids)."""
        B, T = input_ids.shape
        assert T + max_new_tokens - 1 <= self.max_len, "prompt + new tokens exceed the KV cache"
        assert not (keep_logits and self.sampling and not self.sampling.output_logits), "on-device: no logits"
        eos = torch.tensor(eos_ids, dtype=torch.long, device=self.device)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        lengths = torch.zeros(B, dtype=torch.long, device=self.device)
        out, kept = [], []
        logits = self.prefill(input_ids, attention_mask)
        sampled = None if self.sampling is None else self.sample_first(logits, torch.rand(B, generator=generator))
        for i in range(max_new_tokens):
            if keep_logits:
                kept.append(logits.float().cpu())
            if sampled is None:
                scores = logits
                if i < min_new_tokens and len(eos_ids):
                    scores = logits.index_fill(1, eos, float("-inf"))  # EOS may not end the row yet
                sampled = sample(scores, sampling, generator)
            tok = torch.where(done, pad_id, sampled)
            lengths += ~done
            if len(eos_ids) and i >= min_new_tokens:  # (on-device sampling may draw EOS earlier: it is kept)
                done |= torch.isin(tok, eos)
            out.append(tok)
            if on_token is not None:
                on_token(i)
            if i + 1 == max_new_tokens or (len(eos_ids) and bool(done.all())):  # no EOS: no wait for the device
                break
            if self.sampling is None:
                logits, sampled = self.decode(tok), None
            else:
                sampled, logits = self.decode_sampled(tok, torch.rand(B, generator=generator))
        return Generation(tokens=torch.stack(out, 1).cpu(), lengths=lengths.tolist(),
                          logits=torch.stack(kept) if keep_logits else None)


def smallest_run(model: torch.nn.Module, batch: int) -> None:
    """A two-token prompt and one decode step, eagerly, on a cache of 4 slots: each submodel run once, cheaply."""
    engine = Engine(model, batch=batch, max_len=4)
    ids = torch.ones(batch, 2, dtype=torch.long)
    engine.decode(engine.prefill(ids, torch.ones_like(ids)).argmax(-1))
