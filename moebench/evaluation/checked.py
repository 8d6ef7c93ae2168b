"""Timed runs a submission cannot game (spec/peer-harnesses.md §4-5): every run gets a fresh prompt of the same
token length, drawn before the clock starts; the clock runs in the harness's process around the whole request;
every timed output is checked against the reference afterwards; and a caching audit compares a repeated prompt
with fresh ones."""

import contextlib
import os
import statistics
import time
from dataclasses import dataclass, field

import torch

from moebench.engine.parallel import shared_value
from moebench.evaluation.accuracy import allowed_misses
from moebench.evaluation.benchmark import Timings, frozen_gc

AUDIT_FASTER = 0.9  # a repeated prompt this much faster than a fresh one, in every pair, flags caching
AUDIT_ROUNDS = 2  # ... in every pair of this many rounds; the second is timed only when the first is faster


@dataclass
class TimedOutput:
    input_ids: torch.Tensor  # [B, T] the fresh prompt
    attention_mask: torch.Tensor
    tokens: torch.Tensor  # [B, N] what the submission returned


@dataclass
class Audit:
    """Rounds of pairs (fresh prompt, repeated prompt) in milliseconds."""
    rounds: list[list[tuple[float, float]]] = field(default_factory=list)

    @staticmethod
    def faster(pairs: list[tuple[float, float]]) -> bool:
        """Every repeated run more than 10% faster than the fresh run beside it (MLPerf TEST04's 10%)."""
        return bool(pairs) and all(r < AUDIT_FASTER * f for f, r in pairs)

    @property
    def flagged(self) -> bool:
        """Caching: every round's pairs faster (a round is confirmed by a second one; one round on a busy machine
        can be faster by chance: an honest submission over two ranks was flagged in CI)."""
        return len(self.rounds) == AUDIT_ROUNDS and all(map(self.faster, self.rounds))

    def report(self) -> dict:
        pairs = [p for r in self.rounds for p in r]
        med = statistics.median
        return {"pairs": len(pairs), "rounds": len(self.rounds),
                "fresh_ms_p50": med(f for f, _ in pairs) if pairs else None,
                "repeated_ms_p50": med(r for _, r in pairs) if pairs else None, "flagged": self.flagged}


def banned_tokens(req, tokenizer) -> tuple[int, ...]:
    """The token ids a fresh prompt never holds: the request's end-of-sequence and padding ids, the tokenizer's
    special ones."""
    special = (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    return tuple({*req.eos_ids, req.pad_id, *(i for i in special if i is not None)})


def private_seed() -> int:
    """The fresh prompts' seed: drawn by the harness (the submission cannot predict it), rank 0's on every rank."""
    return shared_value(int.from_bytes(os.urandom(4), "little"), "the fresh prompts' seed")


def fresh_prompt(input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab: int, banned: tuple[int, ...],
                 generator: torch.Generator) -> torch.Tensor:
    """input_ids with every real token replaced by a random one (never a special token): same shape, same mask."""
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[list(banned)] = False
    choices = allowed.nonzero().flatten()
    drawn = choices[torch.randint(len(choices), input_ids.shape, generator=generator)]
    return torch.where(attention_mask.bool(), drawn, input_ids)


def checked_benchmark(request, input_ids, attention_mask, new_tokens: int, runs: int, warmup: int,
                      audit_pairs: int, vocab: int, banned: tuple[int, ...], seed: int, on_run=None,
                      reference=None, pause=contextlib.nullcontext) -> tuple[Timings, list[TimedOutput], Audit,
                                                                            Timings | None]:
    """`request(ids, mask, new_tokens) -> (tokens, timings the submission's process measured)` is called for
    `warmup` untimed and `runs` timed fresh prompts, then for `audit_pairs` pairs (a fresh prompt, the request's
    own prompt; each first in every other pair), and as many again when the repeated prompt was faster in every
    pair (Audit). End-to-end times come from this process's clock; the per-submodel times the submission's
    process reports are kept as informational. `reference`, a request of the same form: the reference runs each
    warm-up and timed prompt too, under `pause()` (the submission stopped), alternating with the submission (each
    goes first in every other pair), so that a shared machine's drift slows both alike. Returns the submission's
    timings, its outputs, the audit and the reference's timings (None without a reference)."""
    g = torch.Generator().manual_seed(seed)

    def fresh():
        return fresh_prompt(input_ids, attention_mask, vocab, banned, g)

    def timed(ids, fn=request):
        with frozen_gc():  # (this process's collector too: it runs while the submission's answer is awaited)
            start = time.perf_counter()
            tokens, inner = fn(ids, attention_mask, new_tokens)
            return time.perf_counter() - start, tokens, inner

    def keep(t: Timings, seconds: float, inner: dict) -> None:
        t.e2e.append(seconds)
        t.ttft.append(inner["ttft"])
        t.context.append(inner["context"])
        t.steps.append(torch.as_tensor(inner["steps"], dtype=torch.float64).tolist())

    def by_reference(ids, ref: Timings | None) -> None:
        with pause():
            seconds, _, inner = timed(ids, reference)
        if ref is not None:
            keep(ref, seconds, inner)

    def pair(i: int, ids, ref: Timings | None):
        """The submission on ids; with a reference, the reference too: first in every other pair, the seed's last
        bit choosing which (so that an odd number of runs favours neither on average)."""
        first = (i + seed) % 2 == 0
        if reference is not None and first:
            by_reference(ids, ref)
        answer = timed(ids)
        if reference is not None and not first:
            by_reference(ids, ref)
        return answer

    for i in range(warmup):
        pair(i, fresh(), None)
    t, ref, outputs = Timings(), Timings() if reference is not None else None, []
    for i in range(runs):
        ids = fresh()  # drawn before the clock starts
        seconds, tokens, inner = pair(i, ids, ref)
        keep(t, seconds, inner)
        outputs.append(TimedOutput(ids, attention_mask, tokens))
        if on_run is not None:
            on_run(i)
    audit = Audit()
    if reference is not None and audit_pairs:  # the audit's first fresh request is not the one after a pause
        timed(fresh())
    # Whether another round runs is rank 0's finding on every rank: over tensor-parallel ranks each request is
    # answered by all the ranks' submissions together, and a rank that stopped while another went on left that
    # one's submission waiting on a collective (each rank's clock finds its own pairs faster or not).
    while audit_pairs and len(audit.rounds) < AUDIT_ROUNDS and \
            shared_value(all(map(audit.faster, audit.rounds)), "whether the audit goes on"):
        audit.rounds.append([])
        for i in range(audit_pairs):  # which goes first alternates (on across rounds): the order favours neither
            ids, fresh_first = fresh(), (i + (len(audit.rounds) - 1) * audit_pairs + seed) % 2 == 0
            if not fresh_first:
                repeated = timed(input_ids)[0]
            seconds, tokens, _ = timed(ids)
            if fresh_first:
                repeated = timed(input_ids)[0]
            outputs.append(TimedOutput(ids, attention_mask, tokens))
            audit.rounds[-1].append((1e3 * seconds, 1e3 * repeated))
    return t, outputs, audit, ref


def spot_check(engine, outputs: list[TimedOutput], divergence_tol: tuple, allowed_fraction: float) -> dict:
    """Each output's tokens, teacher-forced through the reference `engine`: a token passes when its reference
    logit is within the divergence tolerance of the reference's best (the validation's rule where greedy choices
    differ; a token the engine bans, EOS, never passes). Fails when one output has more tokens that do not pass
    than `allowed_fraction` of its tokens, rounded up to a whole token, or a logit that is NaN or inf (the
    validation's rules)."""
    absolute, relative = divergence_tol
    worst, failing = 0.0, None
    for i, out in enumerate(outputs):
        for b in range(out.input_ids.shape[0]):
            prompt = out.input_ids[b][out.attention_mask[b].bool()]
            tokens = out.tokens[b]
            ids = torch.cat([prompt, tokens[:-1]])[None]
            logits = engine.prefill(ids, torch.ones_like(ids), every_column=True)[0, len(prompt) - 1:]
            logits = engine.scores(logits).float()
            top = logits.max(-1).values
            gap = top - logits.gather(-1, tokens.to(logits.device)[:, None])[:, 0]
            scale = logits.masked_fill(logits == float("-inf"), 0).abs().max(-1).values  # over the allowed ids
            tol = torch.clamp(relative * scale, min=absolute)
            bad = ~(gap <= tol)
            misses = int(bad.sum())
            worst = max(worst, misses / len(tokens))
            broken = not bool(torch.isfinite(gap).all())  # NaN or inf fails outright, as in the validation
            if failing is None and (broken or misses > allowed_misses(allowed_fraction, len(tokens))):
                first = int(bad.nonzero()[0])
                failing = (f"timed run {i}: {misses / len(tokens):.0%} of its tokens are not the reference's choice "
                           f"for the same fresh prompt (first at token {first}, logit gap {float(gap[first]):.3g}, "
                           f"tolerance {float(tol[first]):.3g})")
    summary = {"outputs": len(outputs), "passed": failing is None, "worst_fraction": worst,
               "allowed_fraction": allowed_fraction}
    if failing is not None:
        summary["message"] = failing
    return summary
