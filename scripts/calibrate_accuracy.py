"""How moebench's accuracy defaults were chosen: validate honest and wrong submissions on every prompt of
prompts.txt and print the worst error per top-k set and the largest logit gap at divergent tokens.

    python scripts/calibrate_accuracy.py [--seq-len 640] [--dtype bfloat16]
"""

import argparse
from pathlib import Path

import torch

from moebench.cli.args import parse_args
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
    ap.add_argument("--seq-len", default="640")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompts", type=int, default=None, help="only the first N prompts")
    args = ap.parse_args()
    run, _ = parse_args(["--mode", "validate", "--seq-len", args.seq_len, "--torch-dtype", args.dtype])
    source = open_model(None)
    dtype = getattr(torch, args.dtype)
    prompts = read_prompts(ROOT / "prompts.txt")[:args.prompts]
    for path in SUBMISSIONS:
        sub = load_submission(str(ROOT / path))
        worst, gap, calls, passed = {}, 0.0, 0, 0
        for i, prompt in enumerate(prompts):
            req = make_request(run, source, [prompt])
            expected, _ = expected_logits(run, source, req, "cpu", dtype, None, ROOT / ".none")
            v = UnderTest(run, sub, source, "cpu", dtype, batch=1).validate(expected, req, source.tokenizer)
            for k, e in v.report.worst.items():
                worst[k] = max(worst.get(k, 0.0), e)
            gap, calls, passed = max(gap, v.report.max_gap), calls + v.report.calls, passed + v.report.passed
            scale = expected.abs().amax(-1).median().item()
        errs = "  ".join(f"top-{k or 'all'} {e:.4f}" for k, e in worst.items())
        print(f"{Path(path).stem:22s} passed {passed}/{len(prompts)}  {errs}  max gap {gap:.4f}  calls {calls}  "
              f"(median max|logit| {scale:.3f})", flush=True)


if __name__ == "__main__":
    main()
