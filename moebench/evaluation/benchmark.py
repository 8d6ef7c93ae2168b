"""The benchmark: timed greedy requests, per-submodel latencies, and benchmark_report.json's content."""

import contextlib
import gc
import time
from dataclasses import dataclass, field

import torch

from moebench.engine.generator import Engine
from moebench.evaluation.stats import percentile, submodel_report


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def frozen_gc():
    """Leaves the Python objects alive on entry out of the garbage collector's passes until the exit (gc.freeze, as
    vLLM's engine does once it has started): the model's, the harness's and the libraries' (~300 thousand once
    transformers and Triton are imported). A full pass over them took ~155 ms on the Zen 4 VM, more than a whole
    moebench-speed prompt, and the allocations of a request's steps set one off now and then, on whichever timed
    prefill or decode step it fell: the harness process's Python, not the engine's speed. Objects made inside are
    collected as before. Nested (the harness's timing of the reference's own timed request), the outermost
    freezes and unfreezes; where the process froze objects itself (a submission's start-up, as vLLM's), it leaves
    them as they are."""
    global _depth, _owner
    if _depth == 0:
        _owner = gc.get_freeze_count() == 0
        if _owner:
            gc.freeze()
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _owner:
            gc.unfreeze()


_depth, _owner = 0, False  # frozen_gc's nesting, and whether its outermost froze


@dataclass
class Timings:
    """Seconds, per timed request: end to end, context encoding, and each decode step."""

    e2e: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)  # start to first token (context encoding + its sampling)
    context: list[float] = field(default_factory=list)
    steps: list[list[float]] = field(default_factory=list)  # [run][step]


def time_request(engine: Engine, input_ids, attention_mask, new_tokens: int, timings: Timings | None) -> torch.Tensor:
    """One greedy request of exactly new_tokens tokens (no early stop and no EOS chosen: the engine's banned ids, as
    the original's min = max new tokens). The device is synchronised before each clock reading, and the garbage
    collector leaves the objects from before the request alone (frozen_gc). Returns the tokens [B, new_tokens]."""
    with frozen_gc():
        device = engine.device
        _sync(device)
        start = time.perf_counter()
        logits = engine.prefill(input_ids, attention_mask)
        _sync(device)
        context_end = time.perf_counter()
        tokens = [engine.pick(logits)]
        _sync(device)
        first = time.perf_counter()
        steps = []
        draw = torch.zeros(input_ids.shape[0])  # on-device sampling here is greedy: the draw is unused
        for _ in range(new_tokens - 1):
            t = time.perf_counter()
            if engine.sampling is None:
                tokens.append(engine.pick(engine.decode(tokens[-1])))
            else:  # the token-generation graph returns the token ids itself (its argmax bans the same ids)
                tokens.append(engine.decode_sampled(tokens[-1], draw)[0])
            _sync(device)
            steps.append(time.perf_counter() - t)
        end = time.perf_counter()
        if timings is not None:
            timings.e2e.append(end - start)
            timings.ttft.append(first - start)
            timings.context.append(context_end - start)
            timings.steps.append(steps)
    return torch.stack(tokens, 1)


def answer_request(engine: Engine, input_ids, attention_mask, new_tokens: int) -> tuple[torch.Tensor, dict]:
    """A timed request as a submission's process answers the harness: the tokens, and its own per-submodel times
    (the decode steps' as a tensor: its bytes cross the pipe ~10x faster than a list's JSON)."""
    t = Timings()
    tokens = time_request(engine, input_ids, attention_mask, new_tokens, t)
    return tokens.cpu(), {"ttft": t.ttft[0], "context": t.context[0],
                          "steps": torch.tensor(t.steps[0], dtype=torch.float64)}


def run_benchmark(engine: Engine, input_ids, attention_mask, new_tokens: int, runs: int, warmup: int,
                  on_run=None) -> Timings:
    """`warmup` untimed requests (compilation happens there), then `runs` timed ones."""
    for _ in range(warmup):
        time_request(engine, input_ids, attention_mask, new_tokens, None)
    timings = Timings()
    for i in range(runs):
        time_request(engine, input_ids, attention_mask, new_tokens, timings)
        if on_run is not None:
            on_run(i)
    return timings


def benchmark_report(t: Timings, prompt_len: int, new_tokens: int, batch: int) -> dict:
    """The report of nxdi-semantics §1: e2e throughput counts the whole sequence (prompt included), context
    encoding its padded prompt, token generation the new tokens; token-generation percentiles are per step."""
    runs = len(t.e2e)
    steps = [s for run in t.steps for s in run]
    report = {
        "e2e_model": submodel_report(t.e2e, prompt_len + new_tokens, batch, runs),
        "context_encoding_model": submodel_report(t.context, prompt_len, batch, runs),
        "token_generation_model": submodel_report(steps, new_tokens, batch, runs),
    }
    e2e = report["e2e_model"]
    e2e["generated_tokens_per_s"] = runs * new_tokens * batch / sum(t.e2e)
    e2e["ttft_ms_p50"] = 1e3 * percentile(t.ttft, 50)
    e2e["ttft_ms_p99"] = 1e3 * percentile(t.ttft, 99)
    if steps:
        # Median latency of each decode step along the sequence, for plots of latency against position.
        by_step = [1e3 * percentile([run[i] for run in t.steps], 50) for i in range(len(t.steps[0]))]
        report["token_generation_model"]["decode_ms_by_step_p50"] = by_step
        report["token_generation_model"]["decode_ms_per_token_mean"] = 1e3 * sum(steps) / len(steps)
    for key, samples in (("e2e_model", t.e2e), ("context_encoding_model", t.context),
                         ("token_generation_model", steps)):
        if report[key] is None:  # never ran (one new token: no decode step)
            continue
        report[key]["samples_ms"] = [round(1e3 * x, 4) for x in samples]  # every timed sample, for the plots
    report["config"] = {"runs": runs, "batch": batch, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
                        "seq_len": prompt_len + new_tokens}
    return report
