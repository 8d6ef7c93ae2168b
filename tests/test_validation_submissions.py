"""The harness tests itself: an honest submission with other numerics passes validation in bfloat16, and
deliberately wrong ones (noise on the logits, a dropped expert, a wrong RoPE) fail it."""

from pathlib import Path

import pytest

from moebench.cli.main import main

SUBMISSIONS = Path(__file__).parent / "submissions"


pytestmark = pytest.mark.usefixtures("in_tmp", "one_thread")


def validate(capsys, module: str, *extra: str):
    code = main(["--mode", "validate", "--qwen", str(SUBMISSIONS / f"{module}.py"), "--seq-len", "56",
                 "--prompt", "Explain in two sentences what a Mixture-of-Experts layer does.", *extra])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_honest_reordered_submission_passes(capsys, dtype):
    code, out, err = validate(capsys, "honest_reordered", "--torch-dtype", dtype)
    assert code == 0, out + err
    assert "logit validation PASS" in out


@pytest.mark.parametrize("module, extra", [
    ("wrong_noise", []), ("wrong_dropped_expert", []), ("wrong_rope", []),
    # kernels run in Triton's interpreter: every failing token costs a teacher-forced re-run, so check fewer
    ("wrong_kernel_tail", ["--num-tokens-to-check", "6"]), ("wrong_kernel_scale", ["--num-tokens-to-check", "6"])])
def test_wrong_submission_fails(capsys, module, extra):
    code, out, err = validate(capsys, module, *extra)
    assert code == 1, out + err
    assert "logit validation FAIL" in out and "first failure: step" in out
    assert "expected text [0]:" in out and "actual text   [0]:" in out
