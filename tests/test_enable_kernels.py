"""--enable-nki and --mlp-kernel-enabled switch the model's building blocks to moebench's Triton kernels (run by
Triton's interpreter on the CPU): the submission still validates, and the kernels' MACs count in the ratio."""

import json

import pytest

from tests.conftest import run_cli

pytest.importorskip("triton", reason="the kernels need Triton (its interpreter on the CPU)")
pytestmark = pytest.mark.usefixtures("in_tmp", "one_thread")

SHORT = ["--seq-len", "10", "--prompt", "Hello there", "--torch-dtype", "float32"]


def test_enable_nki_validates_against_the_reference(capsys):
    code, out, err = run_cli(capsys, "--mode", "validate", "--enable-nki", *SHORT)
    assert code == 0, out + err
    assert "logit validation PASS" in out


def test_mlp_kernel_macs_count_in_the_flop_ratio(capsys, in_tmp):
    code, out, err = run_cli(capsys, "--mode", "evaluate_single", "--mlp-kernel-enabled", "--skip-accuracy",
                             "--benchmark-runs", "1", "--warmup-runs", "0", *SHORT)
    assert code == 0, out + err
    flops = json.loads((in_tmp / "benchmark_report.json").read_text())["kernel_flops"]
    ops = flops["by_op"]
    assert set(ops) >= {"moebench.moe_router.default", "moebench.fused_moe.default"}
    assert flops["kernel_macs"] == ops["moebench.moe_router.default"] + ops["moebench.fused_moe.default"]
    assert 0 < flops["nki_flop_ratio"] == pytest.approx(flops["kernel_macs"] / flops["total_macs"])


def test_example_submission_with_its_own_kernel_passes_and_counts(capsys, in_tmp):
    """qwen_with_triton.py: a contestant's own Triton LM head, registered with its MAC formula."""
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "qwen_with_triton.py"
    code, out, err = run_cli(capsys, "--mode", "evaluate_single", "--qwen", example, "--benchmark-runs", "1",
                             "--warmup-runs", "0", *SHORT)
    assert code == 0, out + err
    assert "logit validation PASS" in out
    flops = json.loads((in_tmp / "benchmark_report.json").read_text())["kernel_flops"]
    assert flops["kernel_macs"] == flops["by_op"]["qwen_example.lm_head.default"] > 0
    assert 0 < flops["nki_flop_ratio"] < 1
