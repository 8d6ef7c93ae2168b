"""Logit validation on synthetic logits: the per-token check, the teacher-forced loop, and the report."""

import math

import pytest
import torch

from moebench.evaluation.accuracy import DEFAULT_TOL_MAP, allowed_misses, check_token, validate_logits
from moebench.evaluation.checked import TimedOutput, spot_check

V = 512
LOOSE = {None: (1e-5, 0.5)}  # only the divergence rule can fail under this map


def logits(seed, *shape):
    return torch.randn(*shape, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 4


def test_identical_logits_pass_with_zero_error():
    e = logits(0)
    passed, errors, eid, aid, gap = check_token(e, e.clone(), DEFAULT_TOL_MAP, 1e-3)
    assert passed and eid == aid == int(e.argmax()) and gap is None
    assert set(errors) == set(DEFAULT_TOL_MAP) and all(abs(err) < 1e-6 for err in errors.values())


def test_constant_shift_is_removed():
    e = logits(1)
    assert check_token(e, e + 7.5, DEFAULT_TOL_MAP, 1e-3)[0]
    assert not check_token(e, e + 7.5, DEFAULT_TOL_MAP, 1e-3, remove_shift=False)[0]


def test_noise_of_ten_percent_fails_and_half_percent_passes():
    e = logits(2)
    scale = e.abs().max()
    noise = torch.rand(V, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 - 1
    passed, errors, *_ = check_token(e, e + 0.1 * scale * noise, DEFAULT_TOL_MAP, 0.25)
    assert not passed and errors[None] > 0.05
    passed, errors, *_ = check_token(e, e + 0.005 * scale * noise, DEFAULT_TOL_MAP, 0.25)
    assert passed and errors[None] < 0.01


def test_neg_inf_in_expected_is_ignored_but_not_in_actual():
    e, a = logits(4), logits(4)
    e[:10] = -math.inf
    a[:10] = -3.0  # anything where the golden masks the token, short of becoming the argmax
    a[0] = math.nan
    a[1] = -math.inf
    passed, errors, *_ = check_token(e, a, DEFAULT_TOL_MAP, 1e-3)
    assert passed and all(err < 1e-6 for err in errors.values())
    a[2] = 1e3  # ...but choosing a token the golden masks is a divergence that can never be close
    passed, _, _, aid, gap = check_token(e, a, LOOSE, 1e3)
    assert not passed and aid == 2 and gap == math.inf
    a = logits(4)
    a[20] = -math.inf  # masking a token the golden allows is a mismatch
    assert not check_token(e, a, DEFAULT_TOL_MAP, 1e-3)[0]


def test_nan_in_actual_fails_with_infinite_error():
    e = logits(5)
    a = e.clone()
    a[7] = math.nan
    passed, errors, *_ = check_token(e, a, DEFAULT_TOL_MAP, 1e-3)
    assert not passed and all(err == math.inf for err in errors.values())


@pytest.mark.parametrize("diff, ok", [(0.504, True), (0.56, False)])
def test_error_is_rounded_to_the_decimals_of_rtol(diff, ok):
    e = torch.zeros(V, dtype=torch.float64)
    e[0] = 10.0  # max|e| = 10, so an abs diff d gives err d/10
    a = e.clone()
    a[5] += diff
    passed, errors, *_ = check_token(e, a, {None: (0.0, 0.05)}, 1e-3, remove_shift=False)
    assert passed is ok and errors[None] == pytest.approx(diff / 10)  # reported unrounded


@pytest.mark.parametrize("tol, ok", [(0.25, True), (0.05, False)])
def test_divergent_token_passes_only_within_the_gap_tolerance(tol, ok):
    e = logits(6)
    g = int(e.argmax())
    other = int(e.topk(2).indices[1])
    a = e.clone()
    a[other] = a[g] + 0.1  # the implementation picks `other`, 0.1 logits above the golden token
    passed, _, eid, aid, gap = check_token(e, a, LOOSE, tol)
    assert (eid, aid) == (g, other) and gap == pytest.approx(0.1) and passed is ok


class Impl:
    """A fake generate_fn that replays a fixed [S, B, V] table from the position each prompt has reached."""

    def __init__(self, table, prompt_len, ids=None):
        self.table, self.prompt_len, self.ids, self.seen = table, prompt_len, ids, []

    def __call__(self, prompts, n_new):
        self.seen.append(([list(p) for p in prompts], n_new))
        pos = len(prompts[0]) - self.prompt_len
        out = self.table[pos:pos + n_new]
        return out if self.ids is None else (out, self.ids[:, pos:pos + n_new])


S, B = 8, 2
PROMPTS = [[1, 2, 3], [4, 5, 6]]


def test_exact_implementation_needs_one_call():
    expected = logits(7, S, B)
    prompts = [list(p) for p in PROMPTS]
    impl = Impl(expected, 3)
    report = validate_logits(prompts, impl, expected)
    assert report.passed and report.calls == 1 and len(report.checks) == S * B
    assert impl.seen[0] == (PROMPTS, S) and prompts == PROMPTS  # caller's lists untouched
    assert report.first_failure is None and report.max_gap == 0.0


def test_divergence_forces_a_teacher_forced_rerun():
    expected = logits(8, S, B)
    actual = expected.clone()
    g = int(expected[3, 0].argmax())
    other = int(expected[3, 0].topk(2).indices[1])
    actual[3, 0, other] = actual[3, 0, g] + 0.1
    impl = Impl(actual, 3)
    report = validate_logits(PROMPTS, impl, expected, divergence_tol=0.25)
    assert report.passed and report.calls == 2 and len(report.checks) == S * B
    exp_ids = expected.argmax(-1)  # [S, B]
    assert impl.seen[1] == ([p + exp_ids[:4, b].tolist() for b, p in enumerate(PROMPTS)], S - 4)
    step3 = next(c for c in report.checks if (c.step, c.row) == (3, 0))
    assert step3.actual_id == other and step3.gap == pytest.approx(0.1)
    assert report.max_gap == pytest.approx(0.1)


def test_returned_ids_replace_the_argmax():
    expected = logits(9, S, B)
    ids = expected.argmax(-1).T.clone()  # [B, S]
    assert validate_logits(PROMPTS, Impl(expected, 3, ids), expected).calls == 1
    wrong = int(expected[2, 1].topk(2).indices[1])
    ids[1, 2] = wrong  # the implementation says it chose another token than its own logits' argmax
    report = validate_logits(PROMPTS, Impl(expected, 3, ids), expected, divergence_tol=1e-3)
    assert not report.passed and report.calls == 2
    bad = report.first_failure
    assert (bad.step, bad.row, bad.actual_id) == (2, 1, wrong) and bad.gap > 0


def test_num_tokens_limits_the_checks():
    expected = logits(10, S, B)
    impl = Impl(expected, 3)
    report = validate_logits(PROMPTS, impl, expected, num_tokens=3)
    assert report.passed and len(report.checks) == 3 * B and impl.seen[0][1] == 3
    assert {c.step for c in report.checks} == {0, 1, 2}


def test_report_first_failure_worst_and_summary():
    expected = logits(11, S, B)
    actual = expected.clone()
    for t, b in [(4, 0), (2, 1)]:  # large errors on the lowest logits, so the argmax is unchanged
        low = expected[t, b].topk(50, largest=False).indices
        actual[t, b, low] -= 5.0
    report = validate_logits(PROMPTS, Impl(actual, 3), expected)
    assert not report.passed and report.calls == 1
    bad = report.first_failure
    assert (bad.step, bad.row) == (2, 1) and bad.gap is None and bad.errors[None] > 0.05
    assert report.worst[None] == max(c.errors[None] for c in report.checks)
    assert set(report.worst) == set(DEFAULT_TOL_MAP)
    text = report.summary()
    assert "FAIL" in text and "step 2, row 1" in text and "top-all" in text


def test_generate_fn_returning_no_tokens_is_rejected():
    expected = logits(12, S, B)
    with pytest.raises(ValueError, match="0 tokens"):
        validate_logits(PROMPTS, lambda prompts, n: expected[:0], expected)


def test_relative_divergence_tolerance_scales_with_the_top_logit():
    e = torch.zeros(V, dtype=torch.float64)
    e[0], e[1] = 16.0, 15.9  # the golden picks token 0
    a = e.clone()
    a[1] = 16.3  # the implementation picks token 1, 0.3 above token 0
    loose = {None: (1e-5, 0.1)}
    assert check_token(e, a, loose, (0.0, 1 / 16), remove_shift=False)[4] == pytest.approx(0.3)
    assert check_token(e, a, loose, (0.0, 1 / 16), remove_shift=False)[0]  # 0.3 < 16/16: within 16 bf16 ulps
    assert not check_token(e, a, loose, (0.0, 1 / 64), remove_shift=False)[0]  # 0.3 >= 16/64


def test_a_small_share_of_failed_tokens_is_allowed_but_nan_never():
    expected = logits(11, S, B)
    actual = expected.clone()
    actual[5, 0] += 0.5 * expected[5, 0].abs().max() * torch.randn(V, generator=torch.Generator().manual_seed(1),
                                                                     dtype=torch.float64)
    actual[5, 0, expected[5, 0].argmax()] += 100  # keep the greedy token, so no re-run
    impl = Impl(actual, 3)
    strict = validate_logits(PROMPTS, impl, expected)
    assert not strict.passed and strict.failed == 1
    loose = validate_logits(PROMPTS, impl, expected, allowed_fraction=1 / (S * B))
    assert loose.passed and "1 of" in loose.summary()
    actual[6, 1, 3] = float("nan")
    assert not validate_logits(PROMPTS, Impl(actual, 3), expected, allowed_fraction=0.5).passed


def test_the_allowed_share_of_misses_rounds_up_to_whole_tokens():
    assert [allowed_misses(0.05, n) for n in (16, 20, 21, 40, 41)] == [1, 1, 2, 2, 3]
    assert allowed_misses(0.0, 1000) == 0 and allowed_misses(0.05, 0) == 0


class ReferenceOf:
    """A stand-in reference engine: prefill returns fixed logits [T, V] for the columns after the prompt."""

    def __init__(self, logits, banned=()):
        self.logits, self.banned = logits, list(banned)

    def scores(self, logits):
        return logits.index_fill(-1, torch.tensor(self.banned, dtype=torch.long), float("-inf"))

    def prefill(self, ids, mask, every_column):
        prompt = ids.shape[1] - self.logits.shape[0] + 1
        return torch.cat([torch.zeros(prompt - 1, V), self.logits])[None]


@pytest.mark.parametrize("misses, fraction, passed", [(0, 0.0, True), (1, 0.0, False), (1, 0.05, True),
                                                      (2, 0.05, False)])
def test_spot_check_allows_the_dtypes_share_of_misses_in_whole_tokens(misses, fraction, passed):
    ref = logits(12, 16).float()
    tokens = ref.argmax(-1)
    for t in range(misses):  # a token far below the reference's best
        tokens[3 + 5 * t] = ref[3 + 5 * t].argmin()
    out = TimedOutput(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long), tokens[None])
    check = spot_check(ReferenceOf(ref), [out], (0.0, 1 / 16), fraction)
    assert check["passed"] == passed and check["worst_fraction"] == misses / 16
    assert passed or "first at token 3" in check["message"]


def test_spot_check_fails_on_nan_even_within_the_allowed_misses():
    ref = logits(13, 16).float()
    tokens = ref.argmax(-1)
    ref[4] = float("nan")
    out = TimedOutput(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long), tokens[None])
    assert not spot_check(ReferenceOf(ref), [out], (0.0, 1 / 16), 0.05)["passed"]


def test_spot_check_fails_a_banned_token_even_where_it_is_the_reference_logits_best():
    ref = logits(14, 16).float()
    out = TimedOutput(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long), ref.argmax(-1)[None])
    eos = int(ref[5].argmax())  # the raw argmax at token 5 is EOS: greedy must pick the next best there
    check = spot_check(ReferenceOf(ref, banned=[eos]), [out], (0.0, 1 / 16), 0.05)
    assert not check["passed"] and "first at token 5" in check["message"]
    out.tokens[0, 5] = ref[5].index_fill(0, torch.tensor([eos]), float("-inf")).argmax()
    assert spot_check(ReferenceOf(ref, banned=[eos]), [out], (0.0, 1 / 16), 0.0)["passed"]
