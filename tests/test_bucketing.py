"""Bucketing: prompts padded to the first fitting context-encoding bucket, decode steps attending to the first
fitting token-generation bucket; the same tokens and logits as without buckets, one compiled graph per bucket and
no recompilation on the next request, MACs counted per bucket, and clear errors for requests that fit no bucket."""

import functools
import json

import pytest
import torch

from moebench.cli.args import parse_args
from moebench.engine.generator import Engine, auto_buckets
from moebench.evaluation.flops import request_macs
from moebench.model.loader import build_model, open_model
from moebench.model.qwen3_moe import ModelOptions, Qwen3MoeForCausalLM
from moebench.modes.setup import buckets_of
from tests.conftest import error_line, run_cli
from tests.conftest import reference_macs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def source():
    return open_model(None)


@pytest.fixture(scope="module")
def model(source):
    return build_model(Qwen3MoeForCausalLM, source, ModelOptions(), torch.float32, "cpu")


def request(source, *texts):
    ids = [source.tokenizer.encode(t) for t in texts]
    width = max(map(len, ids))
    padded = torch.tensor([[0] * (width - len(i)) + i for i in ids])  # left padding
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    return padded, mask


def test_auto_rule_is_nxdis():
    assert auto_buckets(640) == (128, 256, 640)
    assert auto_buckets(32) == (32,)
    assert auto_buckets(2048) == (128, 256, 512, 1024, 2048)
    run, _ = parse_args(["--mode", "validate", "--enable-bucketing"])
    assert buckets_of(run) == dict(ctx_buckets=(128, 256, 640), tkg_buckets=(128, 256, 640))
    run, _ = parse_args(["--mode", "validate", "--enable-bucketing", "--context-encoding-buckets", "64", "16",
                         "--token-generation-buckets", "600", "640"])
    assert buckets_of(run) == dict(ctx_buckets=(16, 64), tkg_buckets=(600, 640))
    assert buckets_of(parse_args(["--mode", "validate"])[0]) == dict(ctx_buckets=(128, 256, 640),
                                                                     tkg_buckets=(128, 256, 640))  # the guide's default
    assert buckets_of(parse_args(["--mode", "validate", "--enable-bucketing", "false"])[0]) == \
        dict(ctx_buckets=(), tkg_buckets=())


def test_buckets_give_the_same_tokens_and_logits(source, model):
    ids, mask = request(source, "Hello there, how are you", "A longer prompt about experts and routers")
    tokens, logits = Engine(model, 2, 40).greedy(ids, mask, 20)
    b_tokens, b_logits = Engine(model, 2, 40, ctx_buckets=(5, 16), tkg_buckets=(12, 24, 40)).greedy(ids, mask, 20)
    assert torch.equal(tokens, b_tokens)
    torch.testing.assert_close(b_logits, logits, atol=1e-5, rtol=1e-5)


def test_one_compiled_graph_per_bucket_and_no_recompilation(source, model, monkeypatch):
    # Dynamo's guards decide recompilation whatever the backend: the eager backend keeps the test fast.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    ids, mask = request(source, "Hello there, how are you")
    engine = Engine(model, 1, 40, compile=True, ctx_buckets=(16,), tkg_buckets=(12, 24, 40))
    counters = torch._dynamo.utils.counters["stats"]  # process-wide: count what this test adds
    before = counters["unique_graphs"]
    engine.greedy(ids, mask, 30)  # slots 7 .. 35: buckets 12, 24 and 40
    compiled = counters["unique_graphs"]
    assert compiled - before == 3
    engine.greedy(ids, mask, 30)  # a second request, as in a benchmark: nothing new
    assert counters["unique_graphs"] == compiled


def test_macs_are_counted_per_bucket(source, model):
    ids, mask = request(source, "The quick brown fox jumps")
    L, N = ids.shape[1], 10
    ctx, tkg = (L + 1, 32), (L + 3, L + 6, 32)
    macs, _ = request_macs(model, ids, mask, N, 32, ctx_buckets=ctx, tkg_buckets=tkg)
    # decode slots L .. L + 8 attend to L + 3 slots (3 steps), L + 6 (3 steps), then 32 (3 steps)
    assert [(g.submodel, g.bucket, g.runs) for g in macs.graphs] == [
        ("context_encoding_model", L + 1, 1), ("token_generation_model", L + 3, 3),
        ("token_generation_model", L + 6, 3), ("token_generation_model", 32, 3)]
    cfg = source.config
    assert macs.graphs[0].macs.total == reference_macs(cfg, L + 1, 1, 1)[0]  # the padded prompt runs in full
    for g in macs.graphs[1:]:
        assert g.macs.total == reference_macs(cfg, 1, 1, g.bucket)[1]
    assert macs.total.total == sum(g.macs.total * g.runs for g in macs.graphs)


@pytest.mark.usefixtures("in_tmp")
def test_evaluate_with_buckets_reports_each_graph(capsys, in_tmp):
    code, out, err = run_cli(capsys, "--mode", "evaluate_single", "--enable-bucketing", "--seq-len", "24",
                             "--context-encoding-buckets", "8", "16", "--token-generation-buckets", "12", "24",
                             "--prompt", "Hello there", "--benchmark-runs", "2", "--audit-pairs", "0",
                             "--warmup-runs", "1",
                             "--torch-dtype", "float32")
    assert code == 0, out + err
    assert "logit validation PASS" in out
    graphs = json.loads((in_tmp / "benchmark_report.json").read_text())["kernel_flops"]["by_graph"]
    assert [(g["submodel"], g["bucket"]) for g in graphs] == [
        ("context_encoding_model", 8), ("token_generation_model", 12), ("token_generation_model", 24)]


@pytest.mark.parametrize("flags, words", [
    (["--context-encoding-buckets", "2"], "longer than the largest context-encoding bucket (2)"),
    (["--token-generation-buckets", "4"], "largest token-generation bucket (4) leaves no room"),
    (["--token-generation-buckets", "12"], "largest token-generation bucket (12) holds the 7-token prompt and 5 new "
                                           "tokens, not the 17 asked for"),  # (it generated 5, silently)
    (["--token-generation-buckets", "12", "--max-new-tokens", "6"], "and 5 new tokens, not the 6 asked for"),
    (["--token-generation-buckets", "64"], "bucket 64 is larger than --seq-len 24"),
    (["--context-encoding-buckets", "8", "16", "--max-context-length", "12"],
     "--context-encoding-buckets: bucket 16 is larger than --max-context-length 12, the longest prompt"),
])
def test_requests_that_fit_no_bucket_stop_with_one_line(capsys, flags, words):
    code, out, err = run_cli(capsys, "--mode", "generate", "--enable-bucketing", "--seq-len", "24",
                             "--prompt", "Hello there, how are you", *flags)
    assert code == 2
    assert words in error_line(err)


def test_buckets_without_bucketing_get_a_note():
    _, notes = parse_args(["--mode", "validate", "--enable-bucketing", "false", "--context-encoding-buckets", "128"])
    assert any("--context-encoding-buckets has no effect without --enable-bucketing" in n for n in notes)


def test_a_decode_steps_mask_shows_its_own_requests_tokens_only(source, model):
    """The decode mask is the engine's record of real slots up to the step's own: a longer request before it, or a
    warm-up step at a bucket's last slot, leaves nothing visible past the step's slot."""
    engine = Engine(model, 2, 40, tkg_buckets=(12, 24, 40))
    long_ids, long_mask = request(source, "A longer prompt about experts and routers", "and a second row")
    engine.greedy(long_ids, long_mask, 12)  # slots past 20 hold real tokens now
    engine.example_step("token_generation_model", 40)  # a warm-up at the cache's last slot
    ids, mask = request(source, "Hello", "Hi there")
    T = ids.shape[1]
    engine.prefill(ids, mask)
    *_, step_mask = engine._decode_inputs(torch.zeros(2, dtype=torch.long))
    expected = torch.zeros(2, 12, dtype=torch.bool)
    expected[:, :T] = mask.bool()
    expected[:, T] = True  # the step's own token
    assert torch.equal(step_mask[:, 0, 0], expected)
