"""The reference model against Hugging Face transformers, in float32, on checkpoints transformers saved."""

import pytest
import torch

from moebench.engine.generator import Engine
from moebench.model.loader import build_model, open_model
from moebench.model.qwen3_moe import ModelOptions, Qwen3MoeForCausalLM
from tests.conftest import HF_CONFIGS


def load(path, fused_qkv=False):
    return build_model(Qwen3MoeForCausalLM, open_model(str(path)), ModelOptions(fused_qkv=fused_qkv),
                       torch.float32, "cpu")


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_logits_match_transformers(hf_checkpoints, name):
    path, hf = hf_checkpoints[name]
    ids = torch.randint(1, 4096, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
    for fused in (False, True):
        engine = Engine(load(path, fused), batch=2, max_len=16)
        got = engine.prefill(ids, torch.ones_like(ids), every_column=True)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["sharded", "sliding", "dense_layers"])
def test_kv_cache_decoding_equals_full_forward(hf_checkpoints, name):
    model = load(hf_checkpoints[name][0])
    ids = torch.randint(1, 4096, (2, 14), generator=torch.Generator().manual_seed(2))
    full = Engine(model, 2, 16).prefill(ids, torch.ones_like(ids), every_column=True)
    engine = Engine(model, 2, 16)
    steps = [engine.prefill(ids[:, :6], torch.ones_like(ids[:, :6]))]
    steps += [engine.decode(ids[:, t]) for t in range(6, 14)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 5:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_gives_the_same_logits_as_each_prompt_alone(hf_checkpoints, side):
    model = load(hf_checkpoints["sharded"][0])
    prompts = [torch.tensor([5, 17, 301, 44, 9, 12]), torch.tensor([7, 8, 9])]
    T = 6
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for b, p in enumerate(prompts):
        cols = slice(0, len(p)) if side == "right" else slice(T - len(p), T)
        ids[b, cols], mask[b, cols] = p, 1
    engine = Engine(model, 2, 12)
    batched = [engine.prefill(ids, mask)]
    nxt = torch.tensor([100, 200])
    batched += [engine.decode(nxt), engine.decode(nxt + 1)]
    for b, p in enumerate(prompts):
        alone = Engine(model, 1, 12)
        steps = [alone.prefill(p[None], torch.ones(1, len(p), dtype=torch.long))]
        steps += [alone.decode(nxt[b:b + 1]), alone.decode(nxt[b:b + 1] + 1)]
        for got, want in zip(batched, steps):
            torch.testing.assert_close(got[b], want[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_decode_equals_eager(dtype):
    """The compiled decode step (static shapes, fused expert gather, one-row products as reductions, bfloat16
    attention in float32) gives the eager step's logits: to float32's rounding, or within a few bfloat16 roundings
    of the largest logit."""
    from moebench.model.presets import EMBEDDED

    model = build_model(Qwen3MoeForCausalLM, open_model(f"preset:{EMBEDDED}"), ModelOptions(), dtype, "cpu")
    prompt = torch.tensor([[5, 17, 301, 44, 9]])
    runs = []
    for compile in (False, True):
        engine = Engine(model, 1, 12, compile=compile)
        steps = [engine.prefill(prompt, torch.ones_like(prompt))]
        for t in (100, 200, 300, 400):
            steps.append(engine.decode(torch.tensor([t])))
        runs.append(torch.stack(steps).float())
    atol = 1e-5 if dtype == torch.float32 else 4 * 2**-8 * runs[0].abs().max().item()
    torch.testing.assert_close(runs[1], runs[0], atol=atol, rtol=0 if dtype == torch.bfloat16 else 1e-5)


def test_the_rope_frequencies_go_where_the_weights_go():
    """A plain float32 attribute (a buffer would be rounded by a cast to bfloat16), which loading passes by: moved
    with the weights (the meta device stands in for a GPU), so that a compiled decode step that runs before any
    prefill finds it there."""
    from moebench.model.loader import rope_on
    from moebench.model.presets import EMBEDDED

    from moebench.model import loader

    moved = []
    spy = (lambda model, device: moved.append((type(model).__name__, device)) or rope_on(model, device))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loader, "rope_on", spy)
        model = build_model(Qwen3MoeForCausalLM, open_model(f"preset:{EMBEDDED}"), ModelOptions(), torch.bfloat16,
                            "cpu")
    assert moved == [("Qwen3MoeForCausalLM", "cpu")]
    assert model.inv_freq.dtype == torch.float32 and model.inv_freq.device.type == "cpu"
    assert rope_on(model, torch.device("meta")) is model and model.inv_freq.device.type == "meta"
    assert model.inv_freq.dtype == torch.float32
    plain = torch.nn.Linear(2, 2)
    assert rope_on(plain, "meta") is plain and not hasattr(plain, "inv_freq")


def test_compiled_decode_falls_back_to_the_python_wrapper():
    """Where Inductor's C++ wrapper cannot call an operator of the step, the step compiles again with the Python
    wrapper and gives the eager step's logits; any other compile error still surfaces."""
    from torch._inductor.exc import InductorError

    from moebench.model.presets import EMBEDDED

    model = build_model(Qwen3MoeForCausalLM, open_model(f"preset:{EMBEDDED}"), ModelOptions(), torch.float32, "cpu")
    prompt = torch.tensor([[5, 17, 301, 44, 9]])

    def fails_with(error):
        def step(*inputs):
            raise InductorError(error, None)
        return step

    logits = []
    for compile in (False, True):
        engine = Engine(model, 1, 12, compile=compile)
        assert engine.cpp_wrapper == compile
        engine.prefill(prompt, torch.ones_like(prompt))
        if compile:
            engine._decode_step = fails_with(NotImplementedError("arg type Any is not yet supported"))
        logits.append(engine.decode(torch.tensor([100])))
    assert not engine.cpp_wrapper
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)

    engine._forget_steps()  # the next step is the first of its kind again: it calls _decode_step
    engine._decode_step = fails_with(RuntimeError("a broken kernel"))
    with pytest.raises(InductorError, match="a broken kernel"):
        engine.decode(torch.tensor([200]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_linear_in_a_compiled_graph_equals_the_linear(dtype):
    """moe.linear turns a one-row product into a multiply-and-sum when compiled; layers that are not a plain
    nn.Linear keep their own forward (a tensor-parallel layer's all-reduce must run)."""
    from moebench.model.moe import linear

    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 40, bias=True).to(dtype)
    x = torch.randn(1, 1, 96, dtype=dtype)
    got = torch.compile(linear, dynamic=False)(layer, x)
    torch.testing.assert_close(got.float(), layer(x).float(), atol=1e-5 if dtype == torch.float32 else 2e-2,
                               rtol=1e-5 if dtype == torch.float32 else 2e-2)

    class Doubled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    doubled = Doubled(96, 40).to(dtype)
    torch.testing.assert_close(torch.compile(linear, dynamic=False)(doubled, x), doubled(x))
