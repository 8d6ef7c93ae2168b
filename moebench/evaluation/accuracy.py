"""Logit validation: NxDI's teacher-forced top-k tolerance check of an implementation's logits against goldens."""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal

import numpy as np
import torch

from moebench.errors import MoebenchError

# k -> (atol, rtol); k=None is the whole vocab. The contest driver's map (NxDI's own default is 50:0.02, 5:0.01).
DEFAULT_TOL_MAP = {None: (1e-5, 0.05), 1000: (1e-5, 0.03), 50: (1e-5, 0.03), 5: (1e-5, 0.03)}
# Divergence tolerance per dtype of the implementation under test: where the greedy token differs from the
# golden one, the two logits must be closer than this. NxDI's absolute 0.001 is below one bf16 ulp at logits ~18
# (0.125), so it demanded exact equality (nki-llama #22/#27). Defaults: (absolute, relative to the token's largest
# |expected logit|): float32 keeps 0.001; bfloat16 allows 16 ulps of the top logit (1/16 of it), float16 16 of its
# finer ulps (1/128). An explicit --divergence-difference-tol is absolute.
DEFAULT_DIVERGENCE_TOL = {"float32": (1e-3, 0.0), "bfloat16": (0.0, 1 / 16), "float16": (0.0, 1 / 128)}
# Share of validated tokens allowed outside the tolerances. In an MoE, a router near-tie can pick another expert
# under rounding alone: in bfloat16 about 2% of the embedded model's tokens flip an expert, and those tokens
# differ by up to ~6% of the top logit while all others stay within 1% (scripts/calibrate_accuracy.py). So
# low-precision runs may have up to 5% of tokens outside the map (GPU MODE's MLA check allows 5% mismatches),
# rounded up to a whole token (`allowed_misses`): one switch in a 16-token output is 6%; a wrong implementation
# (a dropped expert, a wrong RoPE, noise) fails most tokens. NaN or inf always fails.
DEFAULT_FAILED_FRACTION = {"float32": 0.0, "bfloat16": 0.05, "float16": 0.05}


def allowed_misses(fraction: float, tokens: int) -> int:
    """Tokens of `tokens` that may fall outside the tolerances: the share `fraction`, rounded up to a whole token
    (an honest bfloat16 run of 16 tokens with one expert switch passes; float32's 0 allows none)."""
    return math.ceil(Decimal(repr(float(fraction))) * tokens)


class GenerateOutputError(MoebenchError, ValueError):
    """generate_fn returned something unusable (no tokens, wrong shape): a broken submission, not a bug here."""


@dataclass
class TokenCheck:
    step: int  # index t into the expected sequence (0 = first generated token)
    row: int  # batch row b
    passed: bool
    errors: dict  # k -> max normalised error (unrounded) over that top-k set
    expected_id: int
    actual_id: int
    gap: float | None  # |actual[actual_id] - actual[expected_id]| when the ids differ, else None


@dataclass
class ValidationReport:
    passed: bool
    checks: list[TokenCheck]
    calls: int  # generate_fn calls: 1 + the teacher-forced re-runs
    tol_map: dict
    divergence_tol: tuple  # (absolute, relative to the token's largest |expected logit|)
    allowed_fraction: float = 0.0

    @property
    def failed(self) -> int:
        return sum(not c.passed for c in self.checks)

    @property
    def first_failure(self) -> TokenCheck | None:
        failed = [c for c in self.checks if not c.passed]
        return min(failed, key=lambda c: (c.step, c.row)) if failed else None

    @property
    def worst(self) -> dict:
        return {k: max((c.errors[k] for c in self.checks), default=float("-inf")) for k in self.tol_map}

    @property
    def max_gap(self) -> float:
        return max((c.gap for c in self.checks if c.gap is not None), default=0.0)

    def plot_data(self) -> dict:
        """benchmark_report.json's "accuracy": each top-k set's worst error per generated token (over rows) and its
        rtol, for the report's plot."""
        name = (lambda k: "all" if k is None else str(k))
        steps = max((c.step for c in self.checks), default=-1) + 1
        errors = {name(k): [max((c.errors[k] for c in self.checks if c.step == t), default=None) for t in range(steps)]
                  for k in self.tol_map}
        return {"passed": self.passed, "tokens": len(self.checks), "failed": self.failed,
                "rtol": {name(k): tol[1] for k, tol in self.tol_map.items()},
                "errors_by_step": {k: [v if v is None or math.isfinite(v) else None for v in e]
                                   for k, e in errors.items()}}

    def summary(self) -> str:
        rows = len({c.row for c in self.checks})
        lines = [f"logit validation {'PASS' if self.passed else 'FAIL'}: {len(self.checks)} tokens checked "
                 f"({rows} rows, {self.calls} generate calls)"]
        for k, err in self.worst.items():
            lines.append(f"  top-{'all' if k is None else k}: worst error {err:.4g} (rtol {self.tol_map[k][1]:g}; "
                         "the difference past atol over the largest expected logit: below 0, within atol)")
        lines.append(f"  max logit gap at a divergent token {self.max_gap:.4g} (tol {_tol_text(self.divergence_tol)})")
        lines.append(f"  tokens outside the tolerances: {self.failed} of {len(self.checks)} (allowed "
                     f"{self.allowed_fraction:.0%}: {allowed_misses(self.allowed_fraction, len(self.checks))})")
        bad = self.first_failure
        if bad is not None:
            why = [f"top-{'all' if k is None else k} error {bad.errors[k]:.4g} > {self.tol_map[k][1]:g}"
                   for k in self.tol_map if not _within(bad.errors[k], self.tol_map[k][1])]
            if bad.gap is not None and not why:
                why.append(f"logit gap {bad.gap:.4g} over the divergence tolerance")
            lines.append(f"  first failure: step {bad.step}, row {bad.row}: expected id {bad.expected_id}, "
                         f"actual id {bad.actual_id}; {'; '.join(why)}")
        return "\n".join(lines)


def _tol_text(tol: tuple) -> str:
    absolute, relative = tol
    return f"{absolute:g}" if not relative else f"{relative:g} x the top logit"


def _decimals(rtol: float) -> int:
    """Decimal places written in rtol (0.05 -> 2, 0.001 -> 3, 1e-05 -> 5), read from its shortest repr."""
    return max(0, -Decimal(repr(float(rtol))).as_tuple().exponent)


def _within(err: float, rtol: float) -> bool:
    # NxDI rounds the error to rtol's decimals before comparing, so 0.0504 passes rtol 0.05.
    return math.isfinite(err) and round(err, _decimals(rtol)) <= rtol


def check_token(expected: torch.Tensor, actual: torch.Tensor, tol_map: dict, divergence_tol,
                actual_id: int | None = None, remove_shift: bool = True):
    """One token's logits [V] against the golden [V]. Returns (passed, errors, expected_id, actual_id, gap).
    divergence_tol: an absolute float, or (absolute, relative to this token's largest |expected logit|)."""
    absolute, relative = divergence_tol if isinstance(divergence_tol, tuple) else (divergence_tol, 0.0)
    e = expected.detach().to("cpu", torch.float64).reshape(-1).numpy()
    a = actual.detach().to("cpu", torch.float64).reshape(-1).numpy()
    if e.shape != a.shape:
        raise GenerateOutputError(f"logits have {a.size} entries, expected {e.size}: return [n, B, vocab] logits")
    if np.isnan(e).any() or np.isposinf(e).any():
        raise ValueError("expected logits contain NaN or +inf: regenerate the reference logits")
    finite_e = np.isfinite(e)
    if not finite_e.any():
        raise ValueError("expected logits are all -inf: regenerate the reference logits")
    expected_id = int(np.argmax(e))
    # What the implementation would pick; NaN counts as lowest so a NaN row does not hide the argmax.
    if actual_id is None:
        actual_id = int(np.argmax(np.where(np.isnan(a), -np.inf, a)))

    def gap_of(values):
        if actual_id == expected_id:
            return None
        if not 0 <= actual_id < a.size or not finite_e[actual_id]:
            return math.inf  # an id outside the vocab, or one the reference forbids (-inf), is never close
        gap = abs(values[actual_id] - values[expected_id])
        return float(gap) if math.isfinite(gap) else math.inf

    # Non-finite actual where the golden is finite (NaN, inf, or a masked token) is a failure, not a dropped index.
    if not np.isfinite(a[finite_e]).all():
        return False, {k: math.inf for k in tol_map}, expected_id, actual_id, gap_of(a)

    # NxDI drops indices where either side is -inf; after the check above only the golden can be -inf there.
    keep = finite_e
    e_kept, a_kept = e[keep], a[keep]
    shift = 0.0
    if remove_shift:
        # Fit a ≈ scale·e + c and remove only c: a constant offset does not change softmax or argmax.
        design = np.stack([e_kept, np.ones_like(e_kept)], axis=1)
        (_, shift), *_ = np.linalg.lstsq(design, a_kept, rcond=None)
        a_kept = a_kept - shift

    errors, passed = {}, True
    for k, (atol, rtol) in tol_map.items():
        if k is None:
            subset = slice(None)
        else:
            subset = torch.topk(torch.from_numpy(e_kept), min(int(k), e_kept.size)).indices.numpy()
        es, as_ = e_kept[subset], a_kept[subset]
        # err_i = (|a_i - e_i| - atol) / max|e| over the subset: rtol is a fraction of the largest logit.
        worst_diff = float(np.max(np.abs(as_ - es) - atol))
        scale = float(np.max(np.abs(es)))
        err = worst_diff / scale if scale > 0 else (0.0 if worst_diff <= 0 else math.inf)
        errors[k] = err
        passed &= _within(err, rtol)

    gap = gap_of(a - shift)
    tol = max(absolute, relative * float(np.max(np.abs(e_kept))))
    if gap is not None and not gap < tol:  # strict <, as in NxDI
        passed = False
    return passed, errors, expected_id, actual_id, gap


def _split_output(out, batch: int, vocab: int):
    """generate_fn's result -> (logits [n, B, V], chosen ids [B, n] or None)."""
    logits, ids = out if isinstance(out, tuple) else (out, None)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or tuple(logits.shape[1:]) != (batch, vocab):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise GenerateOutputError(f"generate_fn returned logits of shape {shape}; expected [n, {batch}, {vocab}]")
    if ids is not None:
        ids = torch.as_tensor(ids).to("cpu", torch.long)
        if ids.dim() != 2 or ids.shape[0] != batch:
            raise GenerateOutputError(f"generate_fn returned ids of shape {tuple(ids.shape)}; expected [{batch}, n]")
        logits = logits[: ids.shape[1]]
    if logits.shape[0] == 0:
        raise GenerateOutputError("generate_fn returned 0 tokens; it must return at least one")
    return logits, ids


def validate_logits(prompts: list[list[int]], generate_fn, expected: torch.Tensor, tol_map: dict | None = None,
                    divergence_tol=DEFAULT_DIVERGENCE_TOL["bfloat16"],  # moebench's default dtype
                    num_tokens: int | None = None, allowed_fraction: float = 0.0) -> ValidationReport:
    """Teacher-forced validation of generate_fn's logits against greedy goldens `expected` [S, B, V].

    generate_fn(prompts, n_new) returns logits [n, B, V] (row 0 predicts the token after each prompt) or
    (logits, ids [B, n]). After the first divergent token the rest is re-run from prompt + golden tokens.
    """
    tol_map = DEFAULT_TOL_MAP if tol_map is None else tol_map
    if expected.dim() != 3:
        raise ValueError(f"expected logits must be [S, B, V], got shape {tuple(expected.shape)}")
    S, B, V = expected.shape
    if num_tokens is not None:
        S = min(S, num_tokens)
    if len(prompts) != B:
        raise ValueError(f"{len(prompts)} prompts but the expected logits have batch {B}")
    exp_ids = expected[:S].argmax(dim=-1).cpu()  # [S, B] golden greedy tokens
    current = [list(p) for p in prompts]  # our own copy: the caller's lists are never touched
    checks, calls, start = [], 0, 0
    while start < S:
        # The submission gets copies, so mutating its arguments cannot change what we feed it next.
        out = generate_fn([list(p) for p in current], S - start)
        calls += 1
        logits, ids = _split_output(out, B, V)
        m = min(logits.shape[0], S - start)
        chosen = ids[:, :m] if ids is not None else logits[:m].argmax(dim=-1).T.cpu()  # [B, m]
        mismatch = (chosen != exp_ids[start:start + m].T).any(dim=0)  # [m], over the whole batch
        # The first divergent token is itself validated; everything after it comes from a fresh re-run.
        div = start + (int(mismatch.nonzero()[0]) + 1 if mismatch.any() else m)
        for t in range(start, div):
            for b in range(B):
                # The loop's chosen id decides divergence, so the per-token check uses the same one.
                ok, errors, eid, aid, gap = check_token(expected[t, b], logits[t - start, b], tol_map,
                                                        divergence_tol, actual_id=int(chosen[b, t - start]))
                checks.append(TokenCheck(t, b, ok, errors, eid, aid, gap))
        current = [p + exp_ids[start:div, b].tolist() for b, p in enumerate(current)]  # teacher forcing
        start = div
    tol = divergence_tol if isinstance(divergence_tol, tuple) else (divergence_tol, 0.0)
    failed = [c for c in checks if not c.passed]
    broken = any(not math.isfinite(e) for c in failed for e in c.errors.values()) or \
        any(c.gap is not None and not math.isfinite(c.gap) for c in failed)  # NaN, inf, a forbidden token
    passed = not broken and len(failed) <= allowed_misses(allowed_fraction, len(checks))
    return ValidationReport(passed, checks, calls, dict(tol_map), tol, allowed_fraction)
