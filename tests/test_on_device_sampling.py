"""--on-device-sampling: NxDI's sampler math inside the decode graph, against a plain reference sampler; the same
seed gives the same tokens; --dynamic takes new sampling parameters without recompiling; the flags end to end."""

import functools

import pytest
import torch

from moebench.engine.generator import Engine
from moebench.engine.sampling import OnDeviceSampling, SamplingParams, on_device_sample
from moebench.model.loader import build_model, open_model
from moebench.model.qwen3_moe import ModelOptions, Qwen3MoeForCausalLM
from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_sample(logits, top_k: int, top_p: float, temperature: float, u: float, global_topk: int) -> int:
    """One row, step by step in plain Python: NxDI's sampler as its source describes it."""
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    cand = order[:global_topk] if global_topk > 0 else order
    vals = [logits[i] if (top_k <= 0 or r < top_k) else -3000.0 for r, i in enumerate(cand)]
    vals = [v / temperature for v in vals]

    def cdf(values):
        m = max(values)
        e = [pow(2.718281828459045, v - m) for v in values]
        s, acc, out = sum(e), 0.0, []
        for x in e:
            acc += x / s
            out.append(acc)
        return out

    c = cdf(vals)
    threshold = max(c[0], top_p)
    vals = [v if r == 0 or c[r] <= threshold else -3000.0 for r, v in enumerate(vals)]
    c = cdf(vals)
    c = [x / c[-1] for x in c]
    pick = min(sum(1 for x in c if x < u), len(cand) - 1)
    return cand[pick]


@pytest.mark.parametrize("top_k, top_p, temperature, global_topk", [
    (20, 0.95, 0.6, 256), (0, 1.0, 1.0, 0), (5, 0.5, 1.3, 50), (1, 1.0, 1.0, 256), (50, 0.9, 0.6, 30)])
def test_sampler_math_matches_the_reference(top_k, top_p, temperature, global_topk):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 300, generator=g, dtype=torch.float64).float() * 3
    uniform = torch.rand(6, generator=g)
    B = logits.shape[0]
    ids = on_device_sample(logits, torch.full((B,), top_k), torch.full((B,), top_p), torch.full((B,), temperature),
                           uniform, global_topk, do_sample=True)
    want = [reference_sample(logits[b].tolist(), top_k, top_p, temperature, float(uniform[b]), global_topk)
            for b in range(B)]
    assert ids.tolist() == want


def test_without_sampling_it_is_the_argmax():
    logits = torch.randn(3, 50)
    ones = torch.ones(3)
    assert torch.equal(on_device_sample(logits, ones.long(), ones, ones, ones * 0.5, 256, False), logits.argmax(-1))


@pytest.fixture(scope="module")
def setup():
    source = open_model(None)
    model = build_model(Qwen3MoeForCausalLM, source, ModelOptions(), torch.float32, "cpu")
    ids = torch.tensor([source.tokenizer.encode(t)[:5] for t in ("Hello there, how are", "The sky is blue")])
    return model, ids


PARAMS = SamplingParams(do_sample=True, temperature=0.6, top_k=20, top_p=0.95)


def test_the_same_seed_gives_the_reference_samplers_tokens(setup):
    model, ids = setup
    mask = torch.ones_like(ids)
    on_device = Engine(model, 2, 32, sampling=OnDeviceSampling(PARAMS, 256, False, True))
    got = on_device.generate(ids, mask, 12, generator=torch.Generator().manual_seed(7), keep_logits=True)

    plain, g = Engine(model, 2, 32), torch.Generator().manual_seed(7)
    logits, tokens = plain.prefill(ids, mask), []
    for i in range(12):
        u = torch.rand(2, generator=g)
        tok = torch.tensor([reference_sample(logits[b].tolist(), 20, 0.95, 0.6, float(u[b]), 256) for b in range(2)])
        tokens.append(tok)
        torch.testing.assert_close(got.logits[i], logits, atol=1e-5, rtol=1e-5)  # --output-logits: the raw logits
        if i < 11:
            logits = plain.decode(tok)
    assert torch.equal(got.tokens, torch.stack(tokens, 1))


@pytest.mark.parametrize("dynamic, graphs", [(True, 1), (False, 2)])
def test_dynamic_parameters_do_not_recompile(setup, monkeypatch, dynamic, graphs):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    model, ids = setup
    ids = ids[:1]  # batch 1: the whole decode step is one graph (a batch's sorted MoE dispatch breaks it up)
    counters = torch._dynamo.utils.counters["stats"]
    before = counters["unique_graphs"]
    engine = Engine(model, 1, 32, compile=True, sampling=OnDeviceSampling(PARAMS, 256, dynamic, False))
    engine.generate(ids, torch.ones_like(ids), 4, generator=torch.Generator().manual_seed(0))
    engine.sampling = OnDeviceSampling(SamplingParams(True, 1.1, 5, 0.8), 256, dynamic, False)  # a new request
    engine.generate(ids, torch.ones_like(ids), 4, generator=torch.Generator().manual_seed(0))
    assert counters["unique_graphs"] - before == graphs


@pytest.mark.usefixtures("in_tmp")
def test_generate_and_evaluate_with_on_device_sampling(capsys, in_tmp):
    common = ["--seq-len", "16", "--prompt", "Hello there", "--torch-dtype", "float32"]
    code, out, err = run_cli(capsys, "--mode", "generate", "--on-device-sampling", "--output-logits", "--dynamic",
                             "--global-topk", "64", *common)
    assert code == 0, out + err
    assert "Output 0: Hello there" in out and (in_tmp / "output_logits.pt").is_file()
    code, out, err = run_cli(capsys, "--mode", "evaluate_single", "--on-device-sampling", "--benchmark-runs", "1",
                             "--warmup-runs", "0", *common)
    assert code == 0, out + err
    assert "logit validation PASS" in out


def test_sampler_flags_without_on_device_sampling_get_a_note():
    from moebench.cli.args import parse_args

    _, notes = parse_args(["--mode", "generate", "--global-topk", "64", "--dynamic"])
    assert any("--global-topk has no effect without --on-device-sampling" in n for n in notes)
    assert any("--dynamic has no effect without --on-device-sampling" in n for n in notes)
