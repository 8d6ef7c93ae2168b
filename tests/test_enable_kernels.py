"""--enable-nki and the per-kernel flags switch the model's building blocks to moebench's Triton kernels (run by
Triton's interpreter on the CPU): the submission still validates, the kernels' MACs count in the ratio, each flag
switches on exactly its kernels, and the quantized experts really keep 1-byte weights."""

import json
from pathlib import Path

import pytest
import torch

from moebench.cli.args import parse_args
from moebench.engine.generator import Engine
from moebench.evaluation.flops import request_macs
from moebench.model.loader import build_model, open_model
from moebench.model.qwen3_moe import ModelOptions, Qwen3MoeForCausalLM
from moebench.modes.contest import options_of
from tests.conftest import run_cli

pytest.importorskip("triton", reason="the kernels need Triton (its interpreter on the CPU)")
pytestmark = pytest.mark.usefixtures("in_tmp", "one_thread")

SHORT = ["--seq-len", "10", "--prompt", "Hello there", "--torch-dtype", "float32"]


def test_enable_nki_validates_and_runs_almost_everything_in_kernels(capsys, in_tmp):
    code, out, err = run_cli(capsys, "--mode", "evaluate_single", "--enable-nki", "--benchmark-runs", "1",
                             "--audit-pairs", "0", "--warmup-runs", "0", *SHORT)
    assert code == 0, out + err
    assert "logit validation PASS" in out
    flops = json.loads((in_tmp / "benchmark_report.json").read_text())["kernel_flops"]
    assert flops["nki_flop_ratio"] > 0.95 and flops["kernels_not_run"] == []  # each ran at its graph's shapes
    assert flops["kernels_calling_library"] == flops["kernels_computing_in_torch"] == {}
    assert "capped" not in flops  # its kernels' formulas count what the reference's ops count
    assert set(flops["kernel_ops"]) >= {f"moebench.{op}.default" for op in (
        "qkv_rope", "attention", "flash_decode", "linear", "moe_router", "fused_moe")}
    prompt_len = len(open_model(None).tokenizer.encode("Hello there"))
    decode_steps = 10 - prompt_len - 1  # the first new token comes from context encoding
    assert [(g["submodel"], g["bucket"], g["runs"]) for g in flops["by_graph"]] == [
        ("context_encoding_model", 10, 1), ("token_generation_model", 10, decode_steps)]  # the one bucket: 10
    assert "moebench.fused_moe.default" in out and f"token_generation_model bucket 10: {decode_steps} run(s)" in out


def test_mlp_kernel_macs_count_in_the_flop_ratio(capsys, in_tmp):
    code, out, err = run_cli(capsys, "--mode", "evaluate_single", "--mlp-kernel-enabled", "--skip-accuracy",
                             "--benchmark-runs", "1", "--audit-pairs", "0", "--warmup-runs", "0", *SHORT)
    assert code == 0, out + err
    flops = json.loads((in_tmp / "benchmark_report.json").read_text())["kernel_flops"]
    ops = flops["by_op"]
    assert set(ops) >= {"moebench.moe_router.default", "moebench.fused_moe.default"}
    assert flops["kernel_macs"] == ops["moebench.moe_router.default"] + ops["moebench.fused_moe.default"]
    assert 0 < flops["nki_flop_ratio"] == pytest.approx(flops["kernel_macs"] / flops["total_macs"])


def test_example_submission_with_its_own_kernel_passes_and_counts(capsys, in_tmp):
    """qwen_with_triton.py: a contestant's own Triton LM head, registered with its MAC formula."""
    example = Path(__file__).resolve().parents[1] / "qwen_with_triton.py"
    code, out, err = run_cli(capsys, "--mode", "evaluate_single", "--qwen", example, "--benchmark-runs", "1",
                             "--audit-pairs", "0", "--warmup-runs", "0", *SHORT)
    assert code == 0, out + err
    assert "logit validation PASS" in out
    flops = json.loads((in_tmp / "benchmark_report.json").read_text())["kernel_flops"]
    assert flops["kernel_macs"] == flops["by_op"]["qwen_example.lm_head.default"] > 0
    assert flops["kernels_not_run"] == [] and flops["kernels_calling_library"] == {} and "capped" not in flops
    assert flops["kernels_computing_in_torch"] == {}  # its torch work around the kernel is a small part
    assert 0 < flops["nki_flop_ratio"] < 1


def kernel_ops_of(*flags: str) -> set[str]:
    """The kernel ops in the graphs of a prefill and a decode step of the model these flags build."""
    run, _ = parse_args(["--mode", "validate", "--torch-dtype", "float32", *flags])
    source = open_model(None)
    model = build_model(Qwen3MoeForCausalLM, source, options_of(run), torch.float32, "cpu")
    ids = torch.tensor([source.tokenizer.encode("Hello there")])
    macs, _ = request_macs(model, ids, torch.ones_like(ids), new_tokens=2, max_len=8)
    return {op.split(".")[1] for op in macs.total.kernel_ops}


@pytest.mark.parametrize("flags, ops", [
    (["--qkv-kernel-enabled", "--fused-qkv"], {"qkv_rope"}),
    (["--attn-kernel-enabled"], {"attention"}),
    (["--flash-decoding-enabled"], {"flash_decode"}),
    (["--mlp-kernel-enabled"], {"moe_router", "fused_moe"}),
    (["--mlp-kernel-enabled", "--mlp-kernel-fuse-residual-add"], {"moe_router", "fused_moe"}),
    (["--quantized-mlp-kernel-enabled"], {"quantized_moe"}),
    (["--quantized-mlp-kernel-enabled", "--rmsnorm-quantize-kernel-enabled"], {"quantized_moe", "rms_norm_quantize"}),
    (["--enable-nki", "--quantized-mlp-kernel-enabled"],
     {"rms_norm", "qkv_rope", "attention", "flash_decode", "linear", "moe_router", "quantized_moe"}),
])
def test_each_flag_switches_on_its_kernels(flags, ops):
    assert kernel_ops_of(*flags) == ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_residual_adds_give_the_unfused_models_logits(dtype):
    source = open_model(None)
    ids = torch.tensor([source.tokenizer.encode("Hello there, general")])

    def logits(*blocks):
        model = build_model(Qwen3MoeForCausalLM, source, ModelOptions(kernels=frozenset(blocks)), dtype, "cpu")
        return Engine(model, batch=1, max_len=8).prefill(ids, torch.ones_like(ids))

    # the kernels round the block's output before adding the residual, as the unfused model does: same numbers
    torch.testing.assert_close(logits("moe_router", "fused_moe", "moe_residual"), logits("moe_router", "fused_moe"),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits("moe_router", "quantized_moe", "moe_residual"),
                               logits("moe_router", "quantized_moe"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("qdtype, shrink", [("int8", 4), ("fp8", 4)])
def test_quantized_experts_keep_one_byte_weights(qdtype, shrink):
    source = open_model(None)

    def expert_bytes(options):
        model = build_model(Qwen3MoeForCausalLM, source, options, torch.float32, "cpu")
        experts = model.model.layers[0].mlp.experts
        return sum(t.numel() * t.element_size() for t in [*experts.parameters(), *experts.buffers()]), experts

    plain, _ = expert_bytes(ModelOptions())
    quantized, experts = expert_bytes(ModelOptions(kernels=frozenset({"quantized_moe"}),
                                                   quant_dtype=qdtype))
    assert not list(experts.parameters())  # the float weights are gone
    assert experts.gate_up_proj_q.element_size() == experts.down_proj_q.element_size() == 1
    scales = experts.gate_up_proj_scale.numel() + experts.down_proj_scale.numel()
    assert quantized == plain // shrink + 4 * scales


def test_quantized_bfloat16_passes_validation_and_reports_its_error(capsys):
    code, out, err = run_cli(capsys, "--mode", "validate", "--quantized-mlp-kernel-enabled",
                             "--rmsnorm-quantize-kernel-enabled", "--seq-len", "12", "--prompt", "Hello there")
    assert code == 0, out + err
    assert "logit validation PASS" in out and "top-5: worst error" in out


def test_a_submissions_own_blocks_keep_running_with_kernels_on(capsys, in_tmp):
    """qwen_with_triton.py replaces the LM head, honest_reordered.py attention and the MoE: with --enable-nki (and
    the quantized experts) their own code runs there and the output says so."""
    root = Path(__file__).resolve().parent
    code, out, err = run_cli(capsys, "--mode", "evaluate_single", "--qwen", root.parent / "qwen_with_triton.py",
                             "--enable-nki", "--skip-accuracy", "--benchmark-runs", "1", "--audit-pairs", "0",
                             "--warmup-runs", "0", "--max-new-tokens", "2", "--base-latency", "100",
                             "--base-throughput", "10", *SHORT)  # (each kernel in Triton's interpreter: few tokens)
    assert code == 0, out + err
    assert "note: the submission's own TritonLMHead run instead of moebench's kernels" in out
    flops = json.loads((in_tmp / "benchmark_report.json").read_text())["kernel_flops"]
    assert "qwen_example.lm_head.default" in flops["kernel_ops"] and "moebench.linear.default" in flops["kernel_ops"]

    code, out, err = run_cli(capsys, "--mode", "validate", "--qwen", root / "submissions" / "honest_reordered.py",
                             "--quantized-mlp-kernel-enabled", *SHORT)
    assert code == 0, out + err
    assert "GatheredMoE" in out and "ManualAttention" in out and "logit validation PASS" in out
