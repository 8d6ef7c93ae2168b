"""moebench.model.cpu_ops: the C++ operators of compiled CPU decode steps and of prompts' attention compute the
same math as the torch reference (the rounding of a compiled bfloat16 graph included), with either way of splitting
the experts over the threads; compiled decode steps and eager prefills call them; a machine that cannot build them
keeps Inductor's loops and the library's attention."""

import copy
import ctypes
import itertools
import os
import subprocess
import types

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from moebench.engine.generator import Engine
from moebench.evaluation import flops
from moebench.model import cpu_ops, moe, qwen3_moe
from moebench.model.loader import build_model, open_model
from moebench.model.moe import experts_forward, route
from moebench.model.presets import PRESETS, random_model
from moebench.model.qwen3_moe import Attention, ModelOptions, Qwen3MoeForCausalLM, RMSNorm
from moebench.model.rope import apply_rope, rope_cos_sin



@pytest.fixture(autouse=True, scope="module")
def built():
    if not cpu_ops.load():
        pytest.skip("the C++ CPU operators could not be built here")


def reference_experts(x, ids, weights, w_gate_up, w_down):
    """One token's experts in float32, each product rounded to the inputs' dtype as a compiled graph rounds it."""
    dt = x.dtype
    I = w_down.shape[2]
    out = torch.zeros(x.shape[1])
    for e, w in zip(ids[0].tolist(), weights[0]):
        gu = (w_gate_up[e].float() @ x[0].float()).to(dt).float()
        h = (F.silu(gu[:I]) * gu[I:]).to(dt).float()
        out += (w_down[e].float() @ h).to(dt).float() * w.float()
    return out.to(dt)[None]


def random_norm(n: int, dtype: torch.dtype, g: torch.Generator) -> RMSNorm:
    norm = RMSNorm(n, 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=g)
    return norm


@pytest.fixture(params=[1, 2, 3])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D, I, E, k", [(64, 32, 8, 2), (96, 48, 6, 3), (72, 40, 5, 4), (128, 96, 16, 6)])
def test_moe_decode_matches_the_reference(threads, dtype, D, I, E, k):
    # k % threads == 0: whole experts per thread; otherwise every expert's rows split over the threads. D and I off
    # the vector widths (72, 40) take the scalar tails.
    g = torch.Generator().manual_seed(D + k)
    x = torch.randn(1, D, generator=g).to(dtype)
    w_gate_up = (torch.randn(E, 2 * I, D, generator=g) / D**0.5).to(dtype)
    w_down = (torch.randn(E, D, I, generator=g) / I**0.5).to(dtype)
    ids = torch.randperm(E, generator=g)[:k][None]
    weights = torch.softmax(torch.randn(1, k, generator=g), -1).to(dtype)
    got = torch.ops.moebench_cpu.moe_decode(x, ids, weights, w_gate_up, w_down)
    want = reference_experts(x, ids, weights, w_gate_up, w_down)
    assert got.shape == want.shape and got.dtype == dtype
    # float32: the sums' order only. bfloat16: a rounding of an intermediate product may land one step apart.
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_topk", [True, False])
@pytest.mark.parametrize("D, I, E, k", [(64, 32, 8, 2), (72, 40, 5, 3)])
def test_moe_route_decode_is_the_torch_moe_block(threads, dtype, norm_topk, D, I, E, k):
    g = torch.Generator().manual_seed(D + k + norm_topk)
    x = torch.randn(1, D, generator=g).to(dtype)
    norm = random_norm(D, dtype, g)
    router = torch.randn(E, D, generator=g).to(dtype)
    w_gate_up = (torch.randn(E, 2 * I, D, generator=g) / D**0.5).to(dtype)
    w_down = (torch.randn(E, D, I, generator=g) / I**0.5).to(dtype)
    got = torch.ops.moebench_cpu.moe_route_decode(x, norm.weight, norm.eps, router, k, norm_topk, w_gate_up, w_down)
    with torch.no_grad():
        xn = norm(x)
        ids, weights = route(F.linear(xn, router), k, norm_topk)  # the router's logits rounded to dtype, as decode's
        want = x + reference_experts(xn, ids, weights, w_gate_up, w_down)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got, want, **tol)
    with pytest.raises(RuntimeError, match="1 <= k <= E"):
        torch.ops.moebench_cpu.moe_route_decode(x, norm.weight, norm.eps, router, E + 1, norm_topk, w_gate_up, w_down)


def chosen(ids, weights):
    """Each row's (expert, weight) pairs in expert order: the choice, in whatever order its ties came."""
    order = ids.argsort(-1)
    return ids.gather(-1, order), weights.gather(-1, order)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_topk", [True, False])
@pytest.mark.parametrize("T, D, E, k", [(37, 64, 8, 2), (9, 72, 6, 6), (402, 768, 32, 4), (6, 40, 5, 3)])
def test_route_rows_is_the_routers_product_softmax_and_top_k(threads, dtype, norm_topk, T, D, E, k):
    # (T 9 and 6, E 5 and 6, D 40 and 72: rows and experts past whole tiles of four, columns past whole vectors)
    g = torch.Generator().manual_seed(T + D)
    x, router = torch.randn(T, D, generator=g).to(dtype), (torch.randn(E, D, generator=g) / D**0.5).to(dtype)
    ids, weights = torch.ops.moebench_cpu.route_rows(x, router, k, norm_topk)
    assert ids.shape == weights.shape == (T, k) and ids.dtype == torch.long and weights.dtype == dtype
    got, want = chosen(ids, weights), chosen(*route(F.linear(x.float(), router.float()).to(dtype), k, norm_topk))
    assert torch.equal(got[0], want[0])
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(got[1], want[1], **tol)
    with pytest.raises(RuntimeError, match="1 <= k <= E"):
        torch.ops.moebench_cpu.route_rows(x, router, E + 1, norm_topk)
    with pytest.raises(RuntimeError, match=r"route_rows: x \[T, D\] and router \[E, D\] of one dtype"):
        torch.ops.moebench_cpu.route_rows(x, router[:, 1:], k, norm_topk)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_rows_breaks_ties_as_torchs_top_k(threads, dtype):
    # Small whole numbers: every product and sum exact in any order (the logits are torch's bit for bit), and many
    # rows tie at the k-th expert, where torch's top-k often keeps another expert than the lower one. Those rows are
    # chosen again by torch's softmax and top-k; the others' choice is clear-cut.
    g = torch.Generator().manual_seed(0)
    T, D, E, k = 300, 48, 16, 4
    x, router = torch.randint(-2, 3, (T, D), generator=g).to(dtype), torch.randint(-1, 2, (E, D), generator=g).to(dtype)
    logits = F.linear(x.float(), router.float()).to(dtype)
    want = chosen(*route(logits, k, True))
    lower_first = logits.float().argsort(dim=-1, descending=True, stable=True)[:, :k].sort(-1).values
    assert (lower_first != want[0]).any(-1).sum() > T // 10  # the lower expert is often not torch's choice
    got = chosen(*torch.ops.moebench_cpu.route_rows(x, router, k, True))
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], **(dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else {}))
    with torch.no_grad():  # NaN logits (and infinite ones) are routed by torch too
        x[3, 0] = float("nan")
        ids, weights = torch.ops.moebench_cpu.route_rows(x, router, k, True)
        want_ids, want_weights = route(F.linear(x.float(), router.float()).to(dtype), k, True)
    assert torch.equal(ids[3], want_ids[3]) and weights[3].isnan().all() and want_weights[3].isnan().all()


@pytest.mark.parametrize("E, k", [(8, 2), (32, 4), (128, 8), (128, 2), (64, 3)])
def test_route_rows_breaks_ties_in_cpp_as_torchs_top_k(threads, E, k):
    # Ties at the k-th expert in many rows (whole-number logits), so that the choice hangs on how torch's top-k breaks
    # them (std::nth_element, or std::partial_sort where 64 k <= E: the last two cases). route_rows makes that choice
    # itself (route_as_torch); torch's softmax and top-k only take the rows it cannot order safely.
    g = torch.Generator().manual_seed(E + k)
    T, D = 500, 6
    x, router = torch.randint(-2, 3, (T, D), generator=g).float(), torch.randint(-1, 2, (E, D), generator=g).float()
    logits = F.linear(x, router)
    lower_first = logits.argsort(dim=-1, descending=True, stable=True)[:, :k].sort(-1).values
    got, want = chosen(*torch.ops.moebench_cpu.route_rows(x, router, k, True)), chosen(*route(logits, k, True))
    assert (lower_first != want[0]).any(-1).sum() > T // 20  # ties that torch's top-k breaks otherwise
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-5)
    # Two different logits closer than 2^-16 (their probabilities may round alike): torch's softmax and top-k choose.
    near = logits[:64].clone()
    near[:, 1] = near[:, 0] + 2e-6
    got = chosen(*torch.ops.moebench_cpu.route_rows(torch.eye(64), near.t().contiguous(), k, True))  # logits: near
    assert torch.equal(got[0], chosen(*route(near, k, True))[0])
    # NaN among a row's logits (a padding row's garbage, say): torch chooses, and nothing sorts NaNs in C++ (a sort
    # of floats with NaNs among them has no order to keep, and may read past its ends).
    router[2, 0] = router[5, 3] = float("nan")  # two experts' logits NaN in every row
    got = chosen(*torch.ops.moebench_cpu.route_rows(x, router, k, True))
    assert torch.equal(got[0], chosen(*route(F.linear(x, router), k, True))[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H, Hkv, hd, S, slot", [(4, 2, 16, 9, 6), (6, 6, 8, 5, 4), (8, 2, 32, 40, 0)])
def test_attention_decode_is_the_torch_attention_block(threads, dtype, H, Hkv, hd, S, slot):
    g = torch.Generator().manual_seed(H + S)
    D, L, layer, slots = 48, 3, 1, S + 4

    def rand(*shape):
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).to(dtype)
    x, wq, wk, wv, wo = rand(1, D) * 5, rand(H * hd, D), rand(Hkv * hd, D), rand(Hkv * hd, D), rand(D, H * hd)
    norm, q_norm, k_norm = random_norm(D, dtype, g), random_norm(hd, dtype, g), random_norm(hd, dtype, g)
    inv_freq = 1.0 / (1e4 ** (torch.arange(0, hd, 2).float() / hd))
    cos, sin = rope_cos_sin(inv_freq, 1.0, torch.tensor([[slot + 3]]), dtype)  # [1, 1, hd]
    cache_k, cache_v = rand(L, 1, Hkv, slots, hd), rand(L, 1, Hkv, slots, hd)
    mask = torch.rand(1, 1, 1, S, generator=g) < 0.7
    mask[..., slot] = True  # the token itself
    want_k, want_v = cache_k.clone(), cache_v.clone()
    args = (x, norm.weight, norm.eps, wq, wk, wv, q_norm.weight, k_norm.weight, 1e-6, cos.reshape(-1), sin.reshape(-1),
            cache_k, cache_v, layer)
    got = torch.ops.moebench_cpu.attention_decode(*args, torch.tensor([slot]), mask, hd**-0.5, wo)
    with torch.no_grad():  # the model's own blocks, eager
        xn = norm(x)
        q = apply_rope(q_norm(F.linear(xn, wq).view(1, 1, H, hd)).transpose(1, 2), cos, sin)
        k = apply_rope(k_norm(F.linear(xn, wk).view(1, 1, Hkv, hd)).transpose(1, 2), cos, sin)
        want_k[layer, :, :, slot], want_v[layer, :, :, slot] = k[:, :, 0], F.linear(xn, wv).view(1, Hkv, hd)
        keys, values = want_k[layer, :, :, :S].float(), want_v[layer, :, :, :S].float()
        o = F.scaled_dot_product_attention(q.float(), keys, values, attn_mask=mask, scale=hd**-0.5,
                                           enable_gqa=H != Hkv).to(dtype)
        want = x + F.linear(o.transpose(1, 2).reshape(1, H * hd), wo)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(cache_k, want_k, **tol)  # the slot written, the rest untouched
    torch.testing.assert_close(cache_v, want_v, **tol)
    torch.testing.assert_close(got, want, **tol)
    with pytest.raises(RuntimeError, match="outside the mask's slots"):
        torch.ops.moebench_cpu.attention_decode(*args, torch.tensor([S]), mask, hd**-0.5, wo)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, T, H, Hkv, hd", [(1, 13, 4, 2, 16), (2, 5, 6, 6, 16), (1, 9, 4, 2, 64), (1, 7, 2, 1, 128)])
def test_qk_norm_rope_is_the_torch_model_s_norms_rotation_and_cache_write(threads, dtype, B, T, H, Hkv, hd):
    # hd 16: the scalar rotation (half a head is less than a vector); 64 and 128: whole heads in registers
    g = torch.Generator().manual_seed(T)
    L, layer, slots = 3, 2, T + 7
    qkv = torch.randn(B, T, (H + 2 * Hkv) * hd, generator=g).to(dtype)
    q, k, v = qkv.split([H * hd, Hkv * hd, Hkv * hd], dim=-1)  # a fused projection's views: rows of any stride
    q_norm, k_norm = random_norm(hd, dtype, g), random_norm(hd, dtype, g)
    inv_freq = 1.0 / (1e4 ** (torch.arange(0, hd, 2).float() / hd))
    positions = torch.arange(T)[None].repeat(B, 1) + torch.arange(B)[:, None]
    cos, sin = rope_cos_sin(inv_freq, 1.0, positions, dtype)  # [B, T, hd]
    at = torch.randperm(slots, generator=g)[:T]  # each token's slot
    cache_k, cache_v = torch.randn(L, B, Hkv, slots, hd, generator=g).to(dtype), torch.zeros(L, B, Hkv, slots, hd, dtype=dtype)
    want_k, want_v = cache_k.clone(), cache_v.clone()
    got = torch.ops.moebench_cpu.qk_norm_rope(q, k, v, q_norm.weight, k_norm.weight, q_norm.eps, cos, sin, cache_k,
                                              cache_v, layer, at)
    def torch_norm(norm, x):  # RMSNorm.forward's torch operations (for many rows it calls rms_norm_rows)
        xf = x.float()
        return norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)).to(x.dtype)
    with torch.no_grad():  # the torch model's operations (Attention.forward)
        want = apply_rope(torch_norm(q_norm, q.reshape(B, T, H, hd)).transpose(1, 2), cos, sin)
        kr = apply_rope(torch_norm(k_norm, k.reshape(B, T, Hkv, hd)).transpose(1, 2), cos, sin)
        want_k[layer, :, :, at], want_v[layer, :, :, at] = kr, v.reshape(B, T, Hkv, hd).transpose(1, 2)
    assert got.shape == (B, H, T, hd)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(cache_k, want_k, **tol)  # the prompt's slots written, the others untouched
    assert torch.equal(cache_v, want_v)
    with pytest.raises(RuntimeError, match=f"slot {slots} out of range"):
        torch.ops.moebench_cpu.qk_norm_rope(q, k, v, q_norm.weight, k_norm.weight, q_norm.eps, cos, sin, cache_k,
                                            cache_v, layer, torch.full((T,), slots))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 48), (37, 768), (3, 20)])
def test_rms_norm_rows_is_the_torch_rms_norm(threads, dtype, shape):
    g = torch.Generator().manual_seed(shape[-1])
    norm = random_norm(shape[-1], dtype, g)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    with torch.profiler.profile() as prof, torch.no_grad():
        got = norm(x)  # several rows, eager, on the CPU: the C++ pass
    assert "moebench_cpu::rms_norm_rows" in {e.name for e in prof.events()}
    xf = x.float()
    want = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)).to(dtype)
    assert got.dtype == dtype and got.shape == x.shape
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else {}  # bfloat16: a last-bit flip here and there
    torch.testing.assert_close(got, want, **tol)
    with torch.profiler.profile() as prof:  # with autograd: the torch operations (the C++ pass has no gradient)
        norm(x).sum().backward()
    assert "moebench_cpu::rms_norm_rows" not in {e.name for e in prof.events()} and norm.weight.grad is not None
    with pytest.raises(RuntimeError, match=r"rms_norm_rows: x \[..., D\] and w \[D\] of one dtype"):
        torch.ops.moebench_cpu.rms_norm_rows(x, norm.weight[1:], norm.eps)


def test_the_operators_round_to_bfloat16_bit_for_bit_as_torch_at_the_edges(threads):
    """Rounding to bfloat16 (AVX512-BF16's conversion instruction where there is one) is torch's bit for bit: ties to
    even, overflow to infinity, zeros' signs, denormals kept (the instruction flushes them) and every NaN 0x7fc0 (the
    instruction keeps sign and payload). Through rms_norm_rows: its output is the weight times the normed row."""
    tiny = torch.finfo(torch.bfloat16).smallest_normal
    specials = torch.tensor([tiny / 2, -tiny / 4, tiny / 64, float("nan"), -float("nan"), float("inf"), -0.0, 0.0,
                             3e38, -3e38, 1.0, -2.5, 1 + 2**-8, 1 + 3 * 2**-8, 7.0, 0.1], dtype=torch.bfloat16)
    w = specials.repeat(4)  # D = 64: whole vectors
    x = (torch.arange(1, 65, dtype=torch.float32) / 64).to(torch.bfloat16).expand(3, 64).clone()
    x[1] = 1.0  # the normed row is 1 exactly: products are the weights, some of them ties or past the largest
    x[2, 5] = float("nan")  # a whole row of NaNs
    got = torch.ops.moebench_cpu.rms_norm_rows(x, w, 1e-6)
    xf = x.float()
    want = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert (want[0].float().abs() < tiny).any() and (want[0] != 0).any()  # denormals among the results
    nan = want.isnan()  # (torch's own NaN bits vary with its kernel: 0x7fc0 one at a time, 0xffff vectorised)
    assert torch.equal(got.isnan(), nan) and nan[2].all()
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))


def test_a_prompt_s_attention_block_norms_and_rotates_in_cpp(monkeypatch):
    # The model's prompt (eager, CPU), its attention block one operator at a time, calls qk_norm_rope; its logits and
    # cache are those of the torch operations.
    monkeypatch.setattr(Attention, "_block_in_cpp", lambda *a: False)
    model = random_model(PRESETS["moebench-tiny"], seed=3)
    prompt = torch.randint(1, 200, (1, 21))
    engine = Engine(model, batch=1, max_len=32, compile=False)
    with torch.profiler.profile() as prof:
        got = engine.prefill(prompt, torch.ones_like(prompt))
    assert "moebench_cpu::qk_norm_rope" in {e.name for e in prof.events()}
    cache = engine.cache.k.clone(), engine.cache.v.clone()
    monkeypatch.setattr(Attention, "_rotates_in_cpp", lambda *a: False)
    torch.testing.assert_close(got, engine.prefill(prompt, torch.ones_like(prompt)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache, (engine.cache.k, engine.cache.v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True])
def test_a_prompt_s_attention_block_runs_in_one_cpp_call_as_its_five(monkeypatch, one_thread, dtype, fused):
    # The norm, the q, k and v projections (fused or not), the q/k norms and rotation with the cache's write, the
    # attention and the output projection with the residual add in attention_block_prompt: bit for bit what the
    # five operators give one by one, logits and cache, for two rows with left padding. (One thread: the tiny
    # model's narrowest projections have 2 panels.)
    if not cpu_ops.products_usable(torch.empty(2, 128, dtype=dtype), torch.empty(128, 128, dtype=dtype), dtype):
        pytest.skip("this CPU's prompt products do not run on panels in this dtype")
    model = build_model(Qwen3MoeForCausalLM, open_model(None), ModelOptions(fused_qkv=fused), dtype, "cpu")
    engine = Engine(model, batch=2, max_len=40, compile=False)
    prompt = torch.randint(1, 200, (2, 33), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompt)
    mask[1, :5] = 0
    with torch.profiler.profile() as prof:
        got = engine.prefill(prompt, mask, every_column=True)
    names = [e.name for e in prof.events()]
    assert names.count("moebench_cpu::attention_block_prompt") == len(model.model.layers)
    assert "moebench_cpu::qk_norm_rope" not in names
    cache = engine.cache.k.clone(), engine.cache.v.clone()
    monkeypatch.setattr(Attention, "_block_in_cpp", lambda *a: False)
    with torch.profiler.profile() as prof:
        want = engine.prefill(prompt, mask, every_column=True)
    names = [e.name for e in prof.events()]
    assert names.count("moebench_cpu::attend_block") == len(model.model.layers)
    assert "moebench_cpu::attention_block_prompt" not in names
    assert torch.equal(got, want) and torch.equal(cache[0], engine.cache.k) and torch.equal(cache[1], engine.cache.v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_prompt_s_moe_block_runs_in_one_cpp_call_as_the_torch_code(monkeypatch, dtype):
    # The norm, the routing, the experts and the residual add in moe_block_prompt; the same operators called one by
    # one from Python (bit for bit the same); the routing in torch (softmax and top-k): the same experts.
    model = random_model(PRESETS["moebench-tiny"], seed=4, dtype=dtype)
    prompt = torch.randint(1, 200, (1, 21))
    engine = Engine(model, batch=1, max_len=32, compile=False)
    layers = model.config.num_hidden_layers
    with torch.profiler.profile() as prof:
        got = engine.prefill(prompt, torch.ones_like(prompt))
    names = [e.name for e in prof.events()]
    assert names.count("moebench_cpu::moe_block_prompt") == layers and "moebench_cpu::route_rows" not in names
    monkeypatch.setattr(qwen3_moe.SparseMoE, "_block_in_cpp", lambda *a: None)
    with torch.profiler.profile() as prof:
        assert torch.equal(got, engine.prefill(prompt, torch.ones_like(prompt)))
    names = [e.name for e in prof.events()]
    assert names.count("moebench_cpu::route_rows") == names.count("moebench_cpu::moe_prompt") == layers
    assert "moebench_cpu::moe_block_prompt" not in names  # (bfloat16 logits tie often: torch's top-k breaks those)
    monkeypatch.setattr(qwen3_moe, "route_tokens", lambda gate, x, k, norm: route(gate(x), k, norm))
    with torch.profiler.profile() as prof:
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(got, engine.prefill(prompt, torch.ones_like(prompt)), **tol)
    assert "moebench_cpu::route_rows" not in {e.name for e in prof.events()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N, K", [(37, 100), (256, 128), (5, 640)])
def test_linear_row_matches_f_linear(threads, dtype, N, K):
    g = torch.Generator().manual_seed(N)
    x, w = torch.randn(1, K, generator=g).to(dtype), (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    got = torch.ops.moebench_cpu.linear_row(x, w)
    want = F.linear(x.float(), w.float()).to(dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [1, 15, 16, 17, 50, 32000])
def test_argmax_rows_chooses_as_torchs_argmax(dtype, V):
    """The first of a row's largest, or its first NaN; ties (small whole numbers), -inf rows, a column view."""
    g = torch.Generator().manual_seed(V)
    rows = [torch.randn(V, generator=g), torch.randint(-3, 3, (V,), generator=g).float(), torch.full((V,), -torch.inf),
            torch.full((V,), 2.0), torch.arange(V).float(), torch.arange(V).float().flip(0)]  # (largest last, first)
    for at in {0, V // 2, V - 1}:  # +inf; a zero and a negative zero tied
        inf, zeros = torch.randn(V, generator=g) - 10, torch.full((V,), -1.0)
        inf[at], zeros[at], zeros[-1] = torch.inf, -0.0, 0.0
        rows += [inf, zeros]
    for at in {0, V // 2, V - 1}:  # NaNs: one, or two with the largest before them
        nan = torch.randint(-3, 3, (V,), generator=g).float()
        nan[at], nan[-1] = float("nan"), float("nan")
        rows += [nan]
    x = torch.stack(rows).to(dtype)
    views = (x, torch.cat([x, x], 1)[:, :V], x.T.contiguous().T, x[4:5].expand(3, V))  # (rows V, 2V, 0 apart; columns)
    for logits in views:
        assert torch.equal(torch.ops.moebench_cpu.argmax_rows(logits), logits.argmax(-1))
    with pytest.raises(RuntimeError, match=r"argmax_rows: x \[B, V\], V > 0"):
        torch.ops.moebench_cpu.argmax_rows(torch.zeros(2, 0))


def test_greedy_decoding_chooses_with_argmax_rows(one_thread):
    model = random_model(PRESETS["moebench-tiny"], seed=3, dtype=torch.float32)
    engine = Engine(model, batch=2, max_len=16)
    assert engine.argmax == torch.ops.moebench_cpu.argmax_rows.default
    prompt = torch.tensor([[5, 17, 42, 9], [1, 2, 3, 4]])
    with torch.profiler.profile() as prof:
        tokens, scores = engine.greedy(prompt, torch.ones_like(prompt), 4)
    assert sum(e.name == "moebench_cpu::argmax_rows" for e in prof.events()) == 4
    assert torch.equal(tokens, scores.argmax(-1).T)
    logits = torch.zeros(2, 8)
    logits[:, 3], logits[1, 6] = 1.0, 0.5
    banning = Engine(model, batch=2, max_len=16, banned=(3,))  # a banned choice: chosen again from the scores
    assert engine.pick(logits).tolist() == [3, 3] and banning.pick(logits).tolist() == [0, 6]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, H, Hkv, S, hd", [(1, 4, 2, 7, 64), (2, 6, 3, 40, 24), (1, 12, 4, 130, 128)])
def test_attend_row_matches_sdpa_on_cache_views(threads, dtype, B, H, Hkv, S, hd):
    g = torch.Generator().manual_seed(S)
    cache = torch.randn(2, B, Hkv, S + 9, hd, generator=g).to(dtype)  # [L, B, Hkv, max_len, hd] as KVCache's
    keys, values = cache[1, :, :, :S], cache[0, :, :, :S]  # strided views, as the decode step reads them
    q = torch.randn(B, H, 1, hd, generator=g).to(dtype)
    mask = torch.rand(B, 1, 1, S, generator=g) < 0.7
    mask[..., -1] = True  # the query's own slot
    got = torch.ops.moebench_cpu.attend_row(q, keys, values, mask, hd**-0.5)
    want = F.scaled_dot_product_attention(q.float(), keys.float(), values.float(), attn_mask=mask,
                                          scale=hd**-0.5, enable_gqa=True).to(dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, H, Hkv, T, S, hd, holes", [
    (1, 12, 4, 402, 402, 64, False),  # moebench-speed's contest prompt: causal
    (2, 4, 2, 37, 50, 64, True),  # a cache with earlier slots, padding holes, a query that sees nothing
    (1, 6, 3, 100, 130, 80, True),  # head dim off the vector widths
    (1, 2, 1, 3, 5, 24, False),
])
def test_attend_block_matches_sdpa_on_cache_views(threads, dtype, B, H, Hkv, T, S, hd, holes):
    g = torch.Generator().manual_seed(T)
    cache = torch.randn(2, B, Hkv, S + 9, hd, generator=g).to(dtype)  # [L, B, Hkv, max_len, hd] as KVCache's
    keys, values = cache[1, :, :, :S], cache[0, :, :, :S]
    q = torch.randn(B, T, H, hd, generator=g).to(dtype).transpose(1, 2)  # [B, H, T, hd] as the model's
    slots = torch.arange(S - T, S)  # the prompt's columns are the cache's last T slots
    mask = (torch.arange(S)[None, :] <= slots[:, None]).expand(B, 1, T, S).clone()
    if holes:
        mask &= torch.rand(B, 1, 1, S, generator=g) < 0.7
        mask[0, :, 0] = False  # row 0's first query sees no key: zeros, as the library gives
    got = torch.ops.moebench_cpu.attend_block(q, keys, values, mask, hd**-0.5)
    exact = F.scaled_dot_product_attention(q.float(), keys.float(), values.float(), attn_mask=mask,
                                           scale=hd**-0.5, enable_gqa=True)
    want = exact.to(dtype)
    assert got.shape == want.shape and got.transpose(1, 2).is_contiguous()  # [B, T, H, hd] underneath
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got, want, **tol)
    if dtype == torch.bfloat16:  # (with AVX512-BF16, products on bfloat16 pairs): within twice the output's rounding
        assert (got.float() - exact).abs().max() <= 2 * (want.float() - exact).abs().max()
    if holes:
        assert torch.equal(got[0, :, 0], torch.zeros_like(got[0, :, 0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strided", [False, True])
def test_attend_block_takes_any_mask(threads, dtype, strided):
    """Each row's own random keys (some rows none, one the first key alone, one the last alone), the mask's bytes in
    a row or every other byte of a wider one: each row's seen range found wherever it lies."""
    B, H, Hkv, T, S, hd = 2, 4, 2, 61, 75, 32
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, H, T, hd, generator=g).to(dtype)
    keys, values = (torch.randn(B, Hkv, S, hd, generator=g).to(dtype) for _ in range(2))
    wide = torch.rand(B, 1, T, 2 * S, generator=g) < torch.rand(B, 1, T, 1, generator=g) * 0.3
    mask = wide[..., ::2] if strided else wide[..., :S].clone()
    mask[0, 0, 3:9] = False
    mask[1, 0, 5], mask[1, 0, 6] = False, False
    mask[1, 0, 5, 0], mask[1, 0, 6, S - 1] = True, True
    mask[1, 0, 48:] = False  # a block of queries (48 rows) whose keys are those of two rows, one key each
    mask[1, 0, 50, 2], mask[1, 0, 52, S - 4] = True, True
    got = torch.ops.moebench_cpu.attend_block(q, keys, values, mask, hd**-0.5)
    want = F.scaled_dot_product_attention(q.float(), keys.float(), values.float(), attn_mask=mask, scale=hd**-0.5,
                                          enable_gqa=True).nan_to_num(0.0)  # (a row without keys: zeros)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got.float(), want, **tol)
    assert not got[0, :, 3:9].any()


@pytest.mark.parametrize("M, N, K", [(1, 64, 48), (7, 128, 40), (9, 64, 21), (50, 768, 384)])
def test_linear_panels_matches_f_linear(threads, M, N, K):
    g = torch.Generator().manual_seed(M)
    w, x = torch.randn(2, N, K, generator=g), torch.randn(M, K, generator=g)
    panels = cpu_ops.panels(w)
    assert panels is cpu_ops.panels(w)  # packed once
    torch.testing.assert_close(torch.ops.moebench_cpu.linear_panels(x, panels[1]), x @ w[1].T, rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        w.mul_(2)  # an in-place change: packed again
    torch.testing.assert_close(torch.ops.moebench_cpu.linear_panels(x, cpu_ops.panels(w)[1]), x @ w[1].T,
                               rtol=1e-5, atol=1e-4)


def test_a_cpu_with_amx_takes_its_tiles_where_linux_lets_the_process_use_them():
    # AMX's tiles carry a bfloat16 prompt's products (oneDNN's per-product calls: ~1.6x slower on the Xeon VM), unless
    # Linux refuses the process its tile state (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), asked here
    # again): then oneDNN's, and no bfloat16 panels.
    if not cpu_ops.AMX:
        pytest.skip("this CPU has no AMX")
    permitted = ctypes.CDLL(None, use_errno=True).syscall(158, 0x1023, 18) == 0  # (158: arch_prctl on x86-64)
    assert cpu_ops.PAIR_DEPTH == (32 if permitted else 0)
    x, w = torch.randn(402, 768).bfloat16(), torch.randn(768, 768).bfloat16()
    assert cpu_ops.products_usable(x, w, torch.bfloat16) == permitted
    assert (moe.prompt_experts_dtype(x, torch.empty(8, 128, 768).bfloat16(), torch.empty(8, 768, 64).bfloat16(), 2)
            == (torch.bfloat16 if permitted else None))


def pair_panels_shape(N, K):
    """The shape of the bfloat16 panels of pairs of a weight [N, K] here: AMX tiles' order, or AVX512-BF16's pairs."""
    if cpu_ops.PAIR_DEPTH == 32:
        return N // 64, K // 32, 4, 16, 32
    return N // 64, K // 2, 64, 2


@pytest.mark.parametrize("M, N, K", [(2, 64, 48), (13, 192, 128), (50, 768, 384), (33, 128, 96)])
def test_linear_panels_on_bfloat16_pairs_and_with_a_residual_is_the_torch_product(threads, M, N, K):
    # bfloat16 x with bfloat16 panels of pairs (AVX512-BF16's dot products, or AMX tiles): float32 sums, each rounded
    # once, as the library's bfloat16 product rounds them; with a residual, residual + the rounded product rounded
    # again, as the model's `residual + linear(x)`. Float32 too (the residual's add exact there).
    g = torch.Generator().manual_seed(M)
    w, x, res = torch.randn(N, K, generator=g) / 8, torch.randn(M, K, generator=g), torch.randn(M, N, generator=g)
    got = torch.ops.moebench_cpu.linear_panels(x, cpu_ops.panels(w), res)
    torch.testing.assert_close(got, res + x @ w.T, rtol=1e-5, atol=1e-4)
    count = flops.CPU_OP_MACS["moebench_cpu::linear_panels"]  # the MAC count's formula: the product's M N K
    assert count(x, cpu_ops.panels(w), res) == count(x, cpu_ops.panels(w)) == M * N * K
    if not cpu_ops.pair_panels_usable(torch.empty(0, dtype=torch.bfloat16)):
        pytest.skip("this CPU has no AVX512-BF16, or has AMX and the build has no AMX tiles (oneDNN's then)")
    x, w, res = x.bfloat16(), w.bfloat16(), res.bfloat16()
    if K % cpu_ops.PAIR_DEPTH:  # AMX tiles take K in steps of 32; such a product stays with oneDNN
        assert not cpu_ops.products_usable(x, w, torch.bfloat16)
        return
    pairs = cpu_ops.pair_panels(w)
    assert pairs.shape == pair_panels_shape(N, K) and pairs is cpu_ops.pair_panels(w)  # packed once
    exact = x.double() @ w.double().T  # float32 sums of exact products: within a few float32 roundings
    got = torch.ops.moebench_cpu.linear_panels(x, pairs)
    assert got.dtype == torch.bfloat16
    assert ((got.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-5).all()  # each one rounding from exact
    assert (got.double() - exact).abs().mean() < 1.2 * (exact.bfloat16().double() - exact).abs().mean() + 1e-6
    assert count(x, pairs, res) == M * N * K
    summed = torch.ops.moebench_cpu.linear_panels(x, pairs, res)
    assert torch.equal(summed, res + got)  # the add after the product's rounding, then rounded
    with pytest.raises(RuntimeError, match="residual \\[M, N\\] in x's dtype"):
        torch.ops.moebench_cpu.linear_panels(x, pairs, res.float())
    with pytest.raises(RuntimeError, match="bfloat16 x with bfloat16 panels of pairs"):
        torch.ops.moebench_cpu.linear_panels(x.float(), pairs)


def test_a_prompt_s_product_keeps_oneDNN_where_the_panels_are_fewer_than_the_threads_or_the_residual_differs():
    layer = torch.nn.Linear(128, 128, bias=False)  # 2 panels
    x = torch.randn(3, 7, 128)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert cpu_ops.products_usable(x, layer.weight, torch.float32) == (torch.ops.moebench_cpu.panel_width() == 64)
        torch.set_num_threads(3)  # a thread would sit idle: linear_panels shares panels, not rows
        assert not cpu_ops.products_usable(x, layer.weight, torch.float32)
    finally:
        torch.set_num_threads(before)
    residual = torch.randn(3, 7, 128, dtype=torch.float64)  # another dtype: added after, as torch adds it
    with torch.no_grad():
        got = moe.linear(layer, x, residual)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, residual + x @ layer.weight.T, rtol=1e-5, atol=1e-5)


def test_a_prompt_s_products_run_on_panels_with_the_residual_add_fused(monkeypatch, one_thread):
    # The model's prompt (eager, CPU) runs its projections through linear_panels (the output projection with the
    # residual add in it); its logits and cache are those of oneDNN's products to their summation order. (One
    # thread: the tiny model's narrowest projections have 2 panels. The attention block one operator at a time.)
    monkeypatch.setattr(Attention, "_block_in_cpp", lambda *a: False)
    model = random_model(PRESETS["moebench-tiny"], seed=4)
    prompt = torch.randint(1, 200, (1, 21))
    for dtype in (torch.float32, torch.bfloat16):
        engine = Engine(model.to(dtype), batch=1, max_len=32, compile=False)
        with torch.profiler.profile() as prof:
            got = engine.prefill(prompt, torch.ones_like(prompt))
        names = [e.name for e in prof.events()]
        if not cpu_ops.products_usable(torch.empty(2, 128, dtype=dtype), model.lm_head.weight, dtype):
            assert "moebench_cpu::linear_panels" not in names
            continue
        layers = len(model.model.layers)
        assert names.count("moebench_cpu::linear_panels") == 4 * layers  # q, k, v, o (not the router: 8 columns)
        with monkeypatch.context() as m, torch.profiler.profile() as prof:
            m.setattr(cpu_ops, "products_usable", lambda *a: False)
            want = engine.prefill(prompt, torch.ones_like(prompt))
        library = [e.name for e in prof.events()]
        assert "moebench_cpu::linear_panels" not in library
        assert library.count("aten::add") == names.count("aten::add") + layers  # the attention's residual adds
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
        torch.testing.assert_close(got, want, **tol)


def prompt_experts(x, ids, weights, w_gate_up, w_down):
    """A prompt's experts in float64 (exact for these sizes, to float32's precision), each token's sum as float64."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t, j in itertools.product(range(x.shape[0]), range(ids.shape[1])):
        e = ids[t, j]
        gate, up = (w_gate_up[e].double() @ x[t].double()).chunk(2)
        out[t] += weights[t, j].double() * (w_down[e].double() @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, D, I, E, k", [(45, 64, 64, 8, 2), (70, 128, 64, 6, 3), (3, 64, 128, 5, 1)])
def test_moe_prompt_is_the_experts_math(threads, dtype, T, D, I, E, k):
    # Every expert in one call: uneven and empty experts (3 tokens, 5 experts), tiles of fewer rows than a register
    # tile, gate and up panels paired; against float64, and what experts_forward runs for such a prompt.
    g = torch.Generator().manual_seed(T * k)
    x = torch.randn(T, D, generator=g).to(dtype)
    w_gate_up, w_down = (torch.randn(E, 2 * I, D, generator=g) / 8).to(dtype), (torch.randn(E, D, I, generator=g) / 8).to(dtype)
    ids, weights = torch.rand(T, E, generator=g).topk(k).indices, torch.rand(T, k, generator=g).to(dtype)
    got = torch.ops.moebench_cpu.moe_prompt(x, ids, weights, cpu_ops.panels(w_gate_up), cpu_ops.panels(w_down))
    assert got.dtype == dtype and got.shape == x.shape
    want = prompt_experts(x, ids, weights, w_gate_up, w_down)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(got.double(), want, **tol)
    residual = torch.randn(T, D, generator=g).to(dtype)  # the MoE block's residual add, fused: residual + got
    panels = cpu_ops.panels(w_gate_up), cpu_ops.panels(w_down)
    assert torch.equal(torch.ops.moebench_cpu.moe_prompt(x, ids, weights, *panels, residual), residual + got)
    with pytest.raises(RuntimeError, match=r"moe_prompt: residual \[T, D\] in x's dtype"):
        torch.ops.moebench_cpu.moe_prompt(x, ids, weights, *panels, residual[1:])
    if dtype == torch.float32:  # (bfloat16 only where moe.in_float32 widens it: the test below)
        with torch.profiler.profile() as prof:
            plain, added = experts_forward(x, w_gate_up, w_down, ids, weights), \
                experts_forward(x, w_gate_up, w_down, ids, weights, residual)
        names = [e.name for e in prof.events()]
        assert names.count("moebench_cpu::moe_prompt") == 2 and "aten::add" not in names
        assert torch.equal(plain, got) and torch.equal(added, residual + got)


def test_moe_prompt_rounds_to_bfloat16_as_torch(threads):
    # One expert a token: a bfloat16 prompt's output is its float32 twin's (the same values) rounded to bfloat16 as
    # torch rounds (nearest even; the vectorised rounding of the weighted outputs and of the sums).
    g = torch.Generator().manual_seed(3)
    T, D, I, E = 70, 128, 64, 5
    x = torch.randn(T, D, generator=g).bfloat16()
    w_gate_up = (torch.randn(E, 2 * I, D, generator=g) / 8).bfloat16()
    w_down = (torch.randn(E, D, I, generator=g) / 8).bfloat16()
    ids, weights = torch.randint(0, E, (T, 1), generator=g), torch.rand(T, 1, generator=g).bfloat16()
    got = torch.ops.moebench_cpu.moe_prompt(x, ids, weights, cpu_ops.panels(w_gate_up), cpu_ops.panels(w_down))
    wide = torch.ops.moebench_cpu.moe_prompt(x.float(), ids, weights.float(), cpu_ops.panels(w_gate_up.float()),
                                             cpu_ops.panels(w_down.float()))
    assert torch.equal(got, wide.bfloat16())


@pytest.mark.parametrize("T, D, I, E, k", [(45, 64, 64, 8, 2), (70, 128, 64, 6, 3), (3, 64, 128, 5, 1)])
def test_moe_prompt_on_bfloat16_pairs_is_the_experts_math(threads, monkeypatch, T, D, I, E, k):
    # With AVX512-BF16, a bfloat16 prompt's experts where its products stay bfloat16 (onednn.FAST_BF16): bfloat16
    # panels of pairs and vdpbf16ps, or AMX tiles. Against float64, as close as the float32 panels' path; what
    # experts_forward runs.
    if not cpu_ops.pair_panels_usable(torch.empty(0, dtype=torch.bfloat16)):
        pytest.skip("this CPU has no AVX512-BF16, or has AMX and the build has no AMX tiles (oneDNN's then)")
    monkeypatch.setattr(moe, "SLOW_BF16_CPU", False)
    g = torch.Generator().manual_seed(T * k)
    x = torch.randn(T, D, generator=g).bfloat16()
    w_gate_up = (torch.randn(E, 2 * I, D, generator=g) / 8).bfloat16()
    w_down = (torch.randn(E, D, I, generator=g) / 8).bfloat16()
    ids, weights = torch.rand(T, E, generator=g).topk(k).indices, torch.rand(T, k, generator=g).bfloat16()
    pairs = cpu_ops.pair_panels(w_gate_up), cpu_ops.pair_panels(w_down)
    assert pairs[0].shape == (E, *pair_panels_shape(2 * I, D)) and pairs[1].shape == (E, *pair_panels_shape(D, I))
    got = torch.ops.moebench_cpu.moe_prompt(x, ids, weights, *pairs)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    want = prompt_experts(x, ids, weights, w_gate_up, w_down)
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=2e-2)
    wide = torch.ops.moebench_cpu.moe_prompt(x, ids, weights, cpu_ops.panels(w_gate_up), cpu_ops.panels(w_down))
    assert (got.double() - want).norm() < 1.5 * (wide.double() - want).norm() + 1e-3
    residual = torch.randn(T, D, generator=g).bfloat16()
    with torch.profiler.profile() as prof:
        assert torch.equal(experts_forward(x, w_gate_up, w_down, ids, weights), got)
        assert torch.equal(experts_forward(x, w_gate_up, w_down, ids, weights, residual), residual + got)
    assert "moebench_cpu::moe_prompt" in {e.name for e in prof.events()}
    with pytest.raises(RuntimeError, match="bfloat16 panels of pairs"):  # (a float32 x takes float32 panels)
        torch.ops.moebench_cpu.moe_prompt(x.float(), ids, weights.float(), *pairs)


def test_prompt_experts_run_in_one_call_and_match_the_torch_loop(monkeypatch):
    # Where bfloat16 products are slow (onednn.FAST_BF16 false) a bfloat16 prompt's experts run in float32 too, their
    # weights widened into float32 panels. Against the torch loop of products (linear_panels for both: float32
    # panels, the bfloat16 rows upcast).
    monkeypatch.setattr(moe, "SLOW_BF16_CPU", True)
    g = torch.Generator().manual_seed(6)
    T, D, I, E, k = 64, 64, 64, 4, 2
    for dtype in (torch.float32, torch.bfloat16):
        x, w_gate_up, w_down = torch.randn(T, D, generator=g).to(dtype), \
            (torch.randn(E, 2 * I, D, generator=g) / 8).to(dtype), (torch.randn(E, D, I, generator=g) / 8).to(dtype)
        ids, weights = torch.rand(T, E, generator=g).topk(k).indices, torch.rand(T, k, generator=g).to(dtype)
        assert cpu_ops.panels(w_down).dtype == torch.float32
        with torch.profiler.profile() as prof:
            got = experts_forward(x, w_gate_up, w_down, ids, weights)
        names = {e.name for e in prof.events()}
        assert got.dtype == dtype and "moebench_cpu::moe_prompt" in names and "aten::index_add_" not in names
        with monkeypatch.context() as m:
            m.setattr(cpu_ops, "experts_usable", lambda *a: False)
            with torch.profiler.profile() as prof:
                loop = experts_forward(x, w_gate_up, w_down, ids, weights)
            assert "moebench_cpu::linear_panels" in {e.name for e in prof.events()}
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(got, loop, **tol)


def test_bad_inputs_raise_one_clear_error():
    x, w_gate_up, w_down = torch.randn(1, 32), torch.randn(4, 32, 32), torch.randn(4, 32, 16)
    with pytest.raises(RuntimeError, match="expert id out of range"):
        torch.ops.moebench_cpu.moe_decode(x, torch.tensor([[1, 4]]), torch.ones(1, 2), w_gate_up, w_down)
    with pytest.raises(RuntimeError, match="share one dtype"):
        torch.ops.moebench_cpu.linear_row(x, torch.randn(8, 32).bfloat16())
    q, kv = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 5, 16)
    with pytest.raises(RuntimeError, match=r"mask \[B, 1, T, S\] bool"):
        torch.ops.moebench_cpu.attend_block(q, kv, kv, torch.ones(1, 1, 3, 5), 0.25)
    with pytest.raises(RuntimeError, match=r"linear_panels: x \[M, K\], panels"):
        torch.ops.moebench_cpu.linear_panels(torch.randn(3, 16), torch.randn(2, 8, 32))
    x, panels = torch.randn(1, 64), (cpu_ops.panels(torch.randn(4, 128, 64)), cpu_ops.panels(torch.randn(4, 64, 64)))
    with pytest.raises(RuntimeError, match="moe_prompt: expert id out of range: 4"):
        torch.ops.moebench_cpu.moe_prompt(x, torch.tensor([[1, 4]]), torch.ones(1, 2), *panels)
    with pytest.raises(RuntimeError, match="moe_prompt: float32 panels gate_up"):
        torch.ops.moebench_cpu.moe_prompt(x, torch.tensor([[1, 2]]), torch.ones(1, 2), panels[1], panels[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_decode_calls_the_operators_and_agrees_with_eager(one_thread, dtype):
    model = random_model(PRESETS["moebench-tiny"], seed=5, dtype=dtype)
    prompt, mask = torch.tensor([[5, 17, 42, 9, 100, 3]]), torch.ones(1, 6, dtype=torch.long)
    eager = Engine(copy.deepcopy(model), batch=1, max_len=16)
    compiled = Engine(model, batch=1, max_len=16, compile=True)
    want_tokens, want_logits = eager.greedy(prompt, mask, 6)
    compiled.greedy(prompt, mask, 2)  # compiles the decode step
    with torch.profiler.profile() as prof:
        tokens, logits = compiled.greedy(prompt, mask, 6)
    names = {e.name for e in prof.events()}
    assert {"moebench_cpu::moe_route_decode", "moebench_cpu::linear_row", "moebench_cpu::attention_decode"} <= names
    assert torch.equal(tokens, want_tokens)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    torch.testing.assert_close(logits, want_logits, **tol)



def test_compiled_steps_call_the_decode_operators_through_their_c_entry_points(one_thread):
    """Inductor's C++ wrapper calls each decode operator's C entry point (cpu_ops.C_SHIMS), its arguments in the
    schema's order: the results are the eager calls', the profiler records the calls by name with their shapes, the
    compiled graph is cached (a second compile reads it) and an operator's error is raised."""
    g = torch.Generator().manual_seed(3)
    H, Hkv, hd, S, D, E, I = 4, 2, 8, 6, 32, 4, 16
    x, mask = torch.randn(1, D, generator=g), torch.rand(1, 1, 1, S, generator=g) < 0.7
    q, keys, values = torch.randn(2, H, 1, hd, generator=g), *torch.randn(2, 2, Hkv, S, hd, generator=g)
    wq, wk, wv, wo = (torch.randn(n, m, generator=g) / m**0.5 for n, m in [(H * hd, D), (Hkv * hd, D), (Hkv * hd, D),
                                                                           (D, H * hd)])
    norm, q_norm, k_norm, router = torch.rand(D) + 0.5, torch.rand(hd) + 0.5, torch.rand(hd) + 0.5, torch.randn(E, D)
    w_gate_up, w_down = torch.randn(E, 2 * I, D, generator=g) / D**0.5, torch.randn(E, D, I, generator=g) / I**0.5
    cos, sin = torch.rand(hd, generator=g), torch.rand(hd, generator=g)
    ops = torch.ops.moebench_cpu

    def step(x, q, keys, values, mask, cache_k, cache_v):
        a = ops.attention_decode(x, norm, 1e-6, wq, wk, wv, q_norm, k_norm, 1e-5, cos, sin, cache_k, cache_v, 1,
                                 torch.tensor([2]), mask, hd**-0.5, wo)
        m = ops.moe_route_decode(a, norm, 1e-6, router, 2, False, w_gate_up, w_down)
        e = ops.moe_decode(m, torch.tensor([[3, 0]]), torch.tensor([[0.75, 0.25]]), w_gate_up, w_down)
        return ops.linear_row(e, router), ops.attend_row(q, keys, values, mask.expand(2, 1, 1, S), 0.3)

    def inputs():
        return x, q, keys, values, mask, *torch.zeros(2, 3, 1, Hkv, S, hd)

    want = step(*inputs())
    compiled = torch.compile(step, fullgraph=True, options={"cpp_wrapper": True})
    got, (code,) = run_and_get_code(compiled, *inputs())
    for name in cpu_ops.C_SHIMS:
        assert f"aoti_torch_cpu_{name}(" in code
    assert "aoti_torch_call_dispatcher" not in code
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.profiler.profile(record_shapes=True) as prof:
        compiled(*inputs())
    shapes = {e.name: e.input_shapes for e in prof.events() if e.name.startswith("moebench_cpu::")}
    assert set(shapes) == {f"moebench_cpu::{name}" for name in cpu_ops.C_SHIMS}
    assert shapes["moebench_cpu::linear_row"] == [[1, D], [E, D]]
    torch._dynamo.reset()
    counters.clear()
    torch.compile(step, fullgraph=True, options={"cpp_wrapper": True})(*inputs())
    assert counters["inductor"]["fxgraph_cache_hit"] == 1 and not counters["inductor"]["fxgraph_cache_bypass"]
    with pytest.raises(RuntimeError, match="aoti_torch_cpu_moe_decode"):  # an expert id out of range
        torch.compile(lambda x: ops.moe_decode(x, torch.tensor([[1, E]]), torch.ones(1, 2), w_gate_up, w_down),
                      options={"cpp_wrapper": True})(x)

def test_warm_decode_steps_call_their_compiled_code_and_each_engine_keeps_its_graph(one_thread):
    """Once a step of a kind ran through Dynamo, the next step checks the guards of its graph and, from then on, the
    steps of that kind call the code Dynamo compiled for it directly: steps of engines with other dtypes and cache
    sizes, alternated, still run their own graphs, and a step of another kind (another bucket) gets its own."""
    prompt, mask = torch.tensor([[5, 17, 42, 9, 100, 3]]), torch.ones(1, 6, dtype=torch.long)
    runs = []
    for dtype, max_len in [(torch.float32, 16), (torch.bfloat16, 16), (torch.bfloat16, 24)]:
        model = random_model(PRESETS["moebench-tiny"], seed=5, dtype=dtype)
        want = Engine(copy.deepcopy(model), batch=1, max_len=max_len).greedy(prompt, mask, 6)[0]
        runs.append((want, Engine(model, batch=1, max_len=max_len, compile=True)))
    for _ in range(2):
        for want, compiled in runs:
            assert torch.equal(compiled.greedy(prompt, mask, 6)[0], want)
    assert all(len(compiled._steps) == 1 for _, compiled in runs)
    for _, compiled in runs:
        (guards, code), = compiled._steps.values()
        assert guards is None and type(code) is types.FunctionType

    model = random_model(PRESETS["moebench-tiny"], seed=5)
    short, short_mask = prompt[:, :2], mask[:, :2]
    want = Engine(copy.deepcopy(model), batch=1, max_len=24, tkg_buckets=(8, 24)).greedy(short, short_mask, 10)[0]
    bucketed = Engine(model, batch=1, max_len=24, compile=True, tkg_buckets=(8, 24))
    assert torch.equal(bucketed.greedy(short, short_mask, 10)[0], want)  # slots 2-7 in the 8 bucket, then 24
    assert sorted(kind[3][2][-1] for kind in bucketed._steps) == [8, 24]  # the mask's slots
    # the 8 bucket's graph was called directly from its third step; the 24 bucket's first step ran through Dynamo,
    # which dropped that call
    assert [kind[3][2][-1] for kind in bucketed._calls] == [24]


def test_a_models_python_state_is_seen_until_its_steps_graph_is_fixed(one_thread):
    """A submission's forward may read Python state: a step whose guards fail goes through Dynamo (which compiles
    again), so a counter that changes every step is always seen, and so is a value changed before the first step
    whose guards pass; from that step on the kind's graph is fixed, unchecked, as NxDI traces a bucket once. A kind
    whose steps keep making Dynamo compile runs eagerly from the fourth such step on."""
    prompt, mask = torch.tensor([[5, 17, 42, 9, 100, 3]]), torch.ones(1, 6, dtype=torch.long)

    class Counting(Qwen3MoeForCausalLM):
        count = 0

        def forward(self, input_ids, step, cache):
            self.count += 1
            return super().forward(input_ids, step, cache) + self.count

    class Scaled(Qwen3MoeForCausalLM):
        scale = 3.0

        def forward(self, input_ids, step, cache):
            return super().forward(input_ids, step, cache) * self.scale

    models = []
    for cls in (Counting, Scaled):
        model = random_model(PRESETS["moebench-tiny"], seed=5)
        model.__class__ = cls
        models.append(model)
    eager = Engine(copy.deepcopy(models[0]), batch=1, max_len=16).greedy(prompt, mask, 7)[1]
    counting = Engine(models[0], batch=1, max_len=16, compile=True)
    torch.testing.assert_close(counting.greedy(prompt, mask, 7)[1], eager, atol=1e-4, rtol=1e-4)
    # after each step the counter matched none of the graphs and Dynamo compiled again: the fifth and sixth steps
    # ran eagerly, without compiling
    assert list(counting._steps.values()) == [(None, Engine._decode_step)]
    assert list(counting._compiles.values()) == [4]

    eager, compiled = Engine(copy.deepcopy(models[1]), batch=1, max_len=16), Engine(models[1], 1, 16, compile=True)
    tokens = [engine.prefill(prompt, mask).argmax(-1) for engine in (eager, compiled)]
    for scale, seen in ((3.0, 3.0), (5.0, 5.0), (5.0, 5.0), (7.0, 5.0)):  # the third step's guards pass
        eager.model.scale = compiled.model.scale = scale
        want, got = eager.decode(tokens[0]), compiled.decode(tokens[1])
        torch.testing.assert_close(got, want * seen / scale, atol=1e-4, rtol=1e-4)
        tokens = [want.argmax(-1), got.argmax(-1)]
    (guards, code), = compiled._steps.values()
    assert guards is None and type(code) is types.FunctionType


def test_a_kind_that_keeps_compiling_behind_a_graph_break_runs_eagerly(one_thread):
    """A forward with a graph break whose code after it reads state that changes every step (the step's slot, as the
    memoizing cheat's sequence so far) makes Dynamo compile at every step: from the fourth such step the kind runs
    eagerly, with the same outputs, and Dynamo compiles nothing more."""
    prompt, mask = torch.tensor([[5, 17, 42, 9, 100, 3]]), torch.ones(1, 6, dtype=torch.long)

    class Breaking(Qwen3MoeForCausalLM):
        def forward(self, input_ids, step, cache):
            slot = int(step.slots[-1])  # a graph break; the code after it holds the slot as a constant
            return super().forward(input_ids, step, cache) * (1 + 0 * slot)

    model = random_model(PRESETS["moebench-tiny"], seed=5)
    model.__class__ = Breaking
    eager = Engine(copy.deepcopy(model), batch=1, max_len=16).greedy(prompt, mask, 8)[1]
    compiled = Engine(model, batch=1, max_len=16, compile=True)
    torch.testing.assert_close(compiled.greedy(prompt, mask, 8)[1], eager, atol=1e-4, rtol=1e-4)
    assert list(compiled._steps.values()) == [(None, Engine._decode_step)]
    assert list(compiled._compiles.values()) == [4]  # the first four of seven steps
    frames = counters["frames"]["total"]
    torch.testing.assert_close(compiled.greedy(prompt, mask, 8)[1], eager, atol=1e-4, rtol=1e-4)
    assert counters["frames"]["total"] == frames  # eagerly: Dynamo compiled nothing


def test_a_fixed_steps_graph_is_called_with_what_its_code_read_since_the_last_prefill(one_thread):
    """From the second step of a fixed kind the engine calls the graph itself with the tensors Dynamo's code read
    (_graph_call): a tensor a model's prompt sets (a new one each request) is read again after the next prefill; a
    step whose code stores into the model (after its graph) keeps running that code."""
    prompt, mask = torch.tensor([[5, 17, 42, 9, 100, 3]]), torch.ones(1, 6, dtype=torch.long)

    class Biased(Qwen3MoeForCausalLM):
        def forward(self, input_ids, step, cache):
            if input_ids.shape[1] > 1:  # a prompt: its own tensor, read by its decode steps
                self.bias = input_ids[:, :1].float() / 10
            return super().forward(input_ids, step, cache) + self.bias

    class Keeping(Qwen3MoeForCausalLM):
        def forward(self, input_ids, step, cache):
            logits = super().forward(input_ids, step, cache)
            self.last = logits[..., :4] * 1  # a store after the graph: in the code Dynamo made
            return logits

    for cls in (Biased, Keeping):
        model = random_model(PRESETS["moebench-tiny"], seed=5)
        model.__class__ = cls
        eager, compiled = Engine(copy.deepcopy(model), 1, 16), Engine(model, 1, 16, compile=True)
        for first in (5, 60, 5):  # each request's bias differs from the one before
            prompt[0, 0] = first
            got, want = compiled.greedy(prompt, mask, 7)[1], eager.greedy(prompt, mask, 7)[1]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        (kind, (guards, code)), = compiled._steps.items()
        assert guards is None and type(code) is types.FunctionType
        if cls is Biased:
            assert compiled._calls[kind].__name__ == "step" and torch.equal(model.bias, eager.model.bias)
        else:  # the code itself, which stores the step's logits
            torch.testing.assert_close(model.last, eager.model.last, atol=1e-4, rtol=1e-4)
            assert kind not in compiled._calls and compiled._graphs[kind] is None


def test_only_a_step_compiled_whole_is_called_directly():
    """_compiled_code gives the guards and the code Dynamo made of a function for these arguments when it calls one
    graph, and no code when the function has a graph break (the code after it is compiled only under Dynamo's
    hook)."""
    from moebench.engine.generator import _compiled_code

    def whole(x, scale=2.0):
        return (x * scale).sin()

    def broken(x, scale=2.0):
        y = (x * scale).sin()
        torch._dynamo.graph_break()
        return y.cos()

    x = torch.randn(8)
    for fn, direct in ((whole, True), (broken, False)):
        torch.compile(fn, dynamic=False, backend="eager")(x)
        guards, code = _compiled_code(fn, x)
        assert (code is not None) == direct, fn.__name__
        if direct:
            assert guards({"x": x, "scale": 2.0}) and not guards({"x": x, "scale": 3.0})
            torch.testing.assert_close(code(x), fn(x))
            assert _compiled_code(fn, torch.randn(8, 2)) is None  # no entry's guards pass for another shape


def test_only_code_that_reads_its_arguments_has_its_graph_called_itself():
    """_graph_name names the graph of Dynamo's code that only reads its arguments and calls it; code that replays a
    forward's side effects after the graph (an attribute set: one more call; a list appended to: a store into its
    items) has none: that code must keep running."""
    from moebench.engine.generator import _compiled_code, _graph_name

    class Box:
        pass

    box = Box()

    def reads(x, w):
        return x @ w

    def stores(x, w, box):
        box.last = x @ w  # replayed by Dynamo's code after the graph
        return box.last

    def appends(x, w, seen):
        seen.append(1)  # a list method called after the graph
        return x @ w

    x, w = torch.randn(4, 8), torch.randn(8, 3)
    for fn, args, named in ((reads, lambda: (x, w), True), (stores, lambda: (x, w, box), False),
                            (appends, lambda: (x, w, []), False)):
        torch.compile(fn, dynamic=False, backend="eager")(*args())
        guards, code = _compiled_code(fn, *args())
        assert code is not None, fn.__name__
        name = _graph_name(code.__code__)
        assert (name is not None) == named, fn.__name__
        if named:
            assert name.startswith("__compiled_fn") and name in code.__code__.co_names


def test_the_warm_up_compiles_the_graph_later_steps_run(one_thread):
    """The compile step's warm-up step and a request's steps are one kind of call: no second graph (the tokens the
    prefill's argmax gives once made the first request's step compile again)."""
    engine = Engine(random_model(PRESETS["moebench-tiny"], seed=5), batch=1, max_len=16, compile=True)
    engine.warm_decode(16)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    engine.greedy(torch.tensor([[5, 17, 42, 9, 100, 3]]), torch.ones(1, 6, dtype=torch.long), 4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_prefill_calls_attend_block_and_agrees_with_the_library(monkeypatch, dtype):
    monkeypatch.setattr(Attention, "_block_in_cpp", lambda *a: False)  # (one operator at a time)
    engine = Engine(random_model(PRESETS["moebench-tiny"], seed=6, dtype=dtype), batch=2, max_len=40)
    prompt = torch.randint(1, 200, (2, 33), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompt)
    mask[1, :5] = 0  # left padding in the second row
    with torch.profiler.profile() as prof:
        got = engine.prefill(prompt, mask, every_column=True)
    assert "moebench_cpu::attend_block" in {e.name for e in prof.events()}
    monkeypatch.setattr(cpu_ops, "LOADED", False)  # the library's attention
    want = engine.prefill(prompt, mask, every_column=True)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[1, 5:], want[1, 5:], **tol)  # the padding columns' logits mean nothing


def test_without_the_operators_decode_keeps_inductors_loops(monkeypatch, capsys):
    monkeypatch.setenv("MOEBENCH_CPU_OPS", "0")
    assert cpu_ops.load.__wrapped__() is False
    monkeypatch.setenv("MOEBENCH_CPU_OPS", "1")
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert cpu_ops.load.__wrapped__() is False
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not built" in err[0] and "/nonexistent/c++" in err[0]
    monkeypatch.setattr(cpu_ops, "LOADED", False)
    x, w = torch.randn(1, 32), torch.randn(8, 32)
    assert not cpu_ops.usable(x, w)  # compiled steps take the multiply-and-sum loops


@pytest.mark.parametrize("march", ["x86-64-v2", "haswell", "skylake-avx512"])
def test_the_operators_compile_for_other_cpus(march):
    """-march=native picks the source's paths by this CPU's flags: the others must compile too (no AVX2; AVX2 without
    AVX-512; AVX-512 without AVX512-BF16, whose build once failed unseen on machines that have it)."""
    flags = [f"-march={march}" if f == "-march=native" else f
             for f in cpu_ops._flags() if f not in ("-shared", "-fPIC")]
    done = subprocess.run([os.environ.get("CXX", "g++"), *flags, "-fsyntax-only", str(cpu_ops.SOURCE)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
