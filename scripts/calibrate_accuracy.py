"""How moebench's accuracy defaults were chosen: validate honest and wrong submissions on every prompt of
prompts.txt and print the worst error per top-k set and the largest logit gap at divergent tokens.

    python scripts/calibrate_accuracy.py [--seq-len 640] [--dtype bfloat16] [--prompts N] [--submissions PATH ...]
"""

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

import torch

from moebench.cli.args import parse_args, positive
from moebench.errors import MoebenchError
from moebench.evaluation.records import read_prompts
from moebench.evaluation.submission import load_submission
from moebench.model.loader import open_model
from moebench.modes.contest import UnderTest, expected_logits
from moebench.modes.setup import make_request

ROOT = Path(__file__).resolve().parents[1]
SUBMISSIONS = ["moebench/contest/qwen.py"] + [f"tests/submissions/{n}.py" for n in
                                              ("honest_reordered", "wrong_noise", "wrong_dropped_expert", "wrong_rope")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=positive(int), default=640)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--prompts", type=positive(int), default=None, help="only the first N prompts")
    ap.add_argument("--submissions", nargs="+", type=Path, default=[ROOT / s for s in SUBMISSIONS], metavar="PATH",
                    help="modules to validate, paths from the working folder (default: the template and the test "
                         "submissions)")
    args = ap.parse_args()
    for path in args.submissions:
        if not path.is_file():
            ap.error(f"--submissions {path}: file not found")
    folder = tempfile.mkdtemp(prefix="moebench-calibrate-")
    try:
        calibrate(args, folder)
    except MoebenchError as e:
        raise SystemExit(f"calibrate_accuracy: {e}") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def calibrate(args, folder: str) -> None:
    run, _ = parse_args(["--mode", "validate", "--seq-len", str(args.seq_len), "--torch-dtype", args.dtype,
                         "--compiled-model-path", folder])
    source = open_model(None)
    dtype, cpu = getattr(torch, args.dtype), torch.device("cpu")
    prompts = read_prompts(ROOT / "prompts.txt")[:args.prompts]
    for path in args.submissions:
        sub = load_submission(str(path.absolute()))
        checks, gap, calls, passed, scales = [], 0.0, 0, 0, []
        for prompt in prompts:
            req = make_request(run, source, [prompt])
            expected, _ = expected_logits(run, source, req, cpu, dtype, None, ROOT / ".none")
            v = UnderTest(run, sub, source, cpu, dtype, req).validate(expected, req, source.tokenizer)
            checks += v.report.checks
            gap, calls, passed = max(gap, v.report.max_gap), calls + v.report.calls, passed + v.report.passed
            finite = expected.float().masked_fill(expected == float("-inf"), 0)  # EOS, banned, is -inf
            scales.append(finite.abs().amax(-1).median().item())
        worst = {k: max(c.errors[k] for c in checks) for k in checks[0].errors}
        errs = "  ".join(f"top-{k or 'all'} {e:.4f}" for k, e in worst.items())
        over = sum(c.errors[None] > 0.01 for c in checks) / len(checks)
        failed = sum(not c.passed for c in checks) / len(checks)
        print(f"{Path(path).stem:22s} passed {passed}/{len(prompts)}  tokens failed {failed:.1%}  "
              f"top-all error > 1%: {over:.1%}  worst {errs}  max gap {gap:.4f}  calls {calls}  "
              f"(median max|logit| {statistics.median(scales):.3f})", flush=True)


if __name__ == "__main__":
    main()
