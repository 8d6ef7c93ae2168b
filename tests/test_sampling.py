"""engine.sampling.sample: greedy cases, top-k and top-p filters, and seeded draws."""

import pytest
import torch

from moebench.engine.sampling import SamplingParams, sample

V = 50


def random_logits(rows=6, seed=0):
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def draws(row: torch.Tensor, params: SamplingParams, n=4000, seed=0) -> torch.Tensor:
    """n draws from one row of logits, in one call (the row repeated n times)."""
    return sample(row[None].expand(n, -1).contiguous(), params, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("params", [
    SamplingParams(do_sample=False, temperature=0.6, top_k=20, top_p=0.95),
    SamplingParams(do_sample=True, temperature=0.0, top_k=20, top_p=0.95),
    SamplingParams(do_sample=True, temperature=1.0, top_k=1, top_p=1.0),
], ids=["do_sample_false", "temperature_0", "top_k_1"])
def test_greedy_cases_equal_argmax(params):
    logits = random_logits()
    assert params.greedy
    for seed in range(3):
        got = sample(logits, params, torch.Generator().manual_seed(seed))
        assert torch.equal(got, logits.argmax(-1))


def test_top_k_draws_only_the_k_most_likely():
    row = random_logits(1)[0]
    top3 = set(torch.topk(row, 3).indices.tolist())
    seen = set(draws(row, SamplingParams(True, temperature=5.0, top_k=3, top_p=1.0)).tolist())
    assert seen == top3  # a hot temperature reaches all three, never a fourth
    unfiltered = set(draws(row, SamplingParams(True, temperature=5.0, top_k=0, top_p=1.0)).tolist())
    assert len(unfiltered) > 3  # the filter, not the distribution, keeps the draws in the top 3


def test_tiny_top_p_keeps_only_the_argmax():
    logits = random_logits(3)
    for row in logits:
        seen = set(draws(row, SamplingParams(True, temperature=1.0, top_k=0, top_p=1e-6), n=1000).tolist())
        assert seen == {int(row.argmax())}


@pytest.mark.parametrize("top_p, kept", [(0.7, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    seen = set(draws(probs.log(), SamplingParams(True, temperature=1.0, top_k=0, top_p=top_p)).tolist())
    assert seen == kept


def test_same_seed_same_draws_other_seed_other_draws():
    logits = random_logits(rows=200)
    params = SamplingParams(True, temperature=1.0, top_k=20, top_p=0.95)
    a = sample(logits, params, torch.Generator().manual_seed(7))
    b = sample(logits, params, torch.Generator().manual_seed(7))
    c = sample(logits, params, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # a generator carries on: a second call from the same generator continues the same stream
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(torch.stack([sample(logits, params, g1) for _ in range(3)]),
                       torch.stack([sample(logits, params, g2) for _ in range(3)]))


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 1e-8])
def test_a_tiny_temperature_draws_the_argmax_on_the_host_and_in_the_graph(temperature):
    """Dividing the logits by it first overflowed (inf - inf: NaN probabilities, a traceback); the top logit is
    subtracted first, so the draw is the argmax, as the temperature's limit is."""
    from moebench.engine.sampling import on_device_sample

    logits = random_logits(rows=8) * 30
    params = SamplingParams(True, temperature=temperature, top_k=0, top_p=0.95)
    assert torch.equal(sample(logits, params, torch.Generator().manual_seed(0)), logits.argmax(-1))
    B = logits.shape[0]
    got = on_device_sample(logits, torch.zeros(B, dtype=torch.long), torch.full((B,), 0.95),
                           torch.full((B,), temperature), torch.rand(B, generator=torch.Generator().manual_seed(0)),
                           256, do_sample=True)
    assert torch.equal(got, logits.argmax(-1))
