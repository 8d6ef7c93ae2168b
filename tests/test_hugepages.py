"""moebench.engine.hugepages: a CPU model's weights moved into one huge-page block keep their values, dtypes and ties,
and the engine computes the same logits from them."""

import copy
import dataclasses

import pytest
import torch

from moebench.engine import hugepages
from moebench.engine.generator import Engine
from moebench.model.presets import PRESETS, random_model


@pytest.fixture
def any_size(monkeypatch):
    monkeypatch.setattr(hugepages, "MIN_BYTES", 0)  # the tiny model stays in the caches: moved here all the same


def tiny(tie: bool = False):
    cfg = dataclasses.replace(PRESETS["moebench-tiny"], tie_word_embeddings=tie)
    return random_model(cfg, seed=3)


def test_small_models_stay_where_they_are():
    model = tiny()
    before = [p.data_ptr() for p in model.parameters()]
    assert hugepages.adopt(model) == 0
    assert [p.data_ptr() for p in model.parameters()] == before


@pytest.mark.skipif(not hugepages.SUPPORTED, reason="no transparent huge pages on this machine")
@pytest.mark.parametrize("tie", [False, True])
def test_adopted_weights_keep_values_ties_and_sit_in_one_aligned_block(any_size, tie):
    model = tiny(tie)
    model.register_buffer("steps", torch.arange(5))  # buffers move too, whatever their dtype
    expected = {name: t.clone() for name, t in model.state_dict().items()}
    moved = hugepages.adopt(model)
    tensors = [*model.parameters(), *model.buffers()]
    assert moved >= sum(t.numel() * t.element_size() for t in tensors)
    start = min(t.data_ptr() for t in tensors)
    assert start % hugepages.PAGE == 0
    assert max(t.data_ptr() for t in tensors) < start + moved
    for name, t in model.state_dict().items():
        assert t.dtype == expected[name].dtype and torch.equal(t, expected[name]), name
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in model.parameters())
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    assert hugepages.adopt(model) == 0  # already there: nothing moves twice


@pytest.mark.skipif(not hugepages.SUPPORTED, reason="no transparent huge pages on this machine")
def test_the_engine_adopts_cpu_weights_and_decodes_the_same(monkeypatch):
    model = tiny()
    same = copy.deepcopy(model)
    prompt, mask = torch.tensor([[5, 17, 42, 9, 100, 3]]), torch.ones(1, 6, dtype=torch.long)
    where = [p.data_ptr() for p in model.parameters()]
    plain = Engine(model, batch=1, max_len=12)  # too small to move
    assert [p.data_ptr() for p in model.parameters()] == where
    monkeypatch.setattr(hugepages, "MIN_BYTES", 0)
    moved = Engine(same, batch=1, max_len=12)
    assert min(p.data_ptr() for p in same.parameters()) % hugepages.PAGE == 0
    with torch.inference_mode():
        want, got = plain.greedy(prompt, mask, 5), moved.greedy(prompt, mask, 5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
