"""How far an honest submission's score strays from 1, with the base timed before the submission (one after the
other, as evaluate did until stop 41) and with the base timed in turn with it (evaluate's way now): the submission
is moebench's template (the reference, unchanged) in its own process, the base the reference in this one. Each
round times both ways, through evaluate's own code (IsolatedSubmission.benchmark, contest.reference_request), and
scores them by the guide's formula. Prints each round's two scores, then the spread of each.

    python bench/base_in_turn.py                     # moebench-tiny, seq-len 256, 6 rounds of 20 requests
    python bench/base_in_turn.py --seq-len 640 --rounds 3
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from _common import out_path, positive_int

import moebench
from moebench.cli.args import parse_args
from moebench.errors import MoebenchError
from moebench.evaluation.score import compute_score
from moebench.modes.contest import reference_benchmark, reference_request
from moebench.modes.sandbox import IsolatedSubmission
from moebench.modes.setup import device_of, dtype_of, make_request, open_source


def score(base: dict, report: dict) -> float:
    b, s = base["e2e_model"], report["e2e_model"]
    return compute_score(1, b["latency_ms_p99"], b["throughput"], s["latency_ms_p99"], s["throughput"], 0).final_score


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=positive_int, default=256)
    ap.add_argument("--runs", type=positive_int, default=20, help="timed requests of each, per round and way")
    ap.add_argument("--rounds", type=positive_int, default=6)
    ap.add_argument("--out", type=out_path, default="bench/results/base_in_turn.json")
    args = ap.parse_args()

    template = Path(moebench.__file__).parent / "contest" / "qwen.py"
    compiled = tempfile.TemporaryDirectory(prefix="base-in-turn-")
    run, _ = parse_args(["--mode", "evaluate_single", "--qwen", str(template), "--seq-len", str(args.seq_len),
                         "--benchmark-runs", str(args.runs), "--warmup-runs", "1", "--audit-pairs", "0",
                         "--compiled-model-path", f"{compiled.name}/traced_model"])
    source = open_source(run)
    device, dtype = device_of(run), dtype_of(run)
    try:
        req = make_request(run, source, run.prompts)
    except MoebenchError as e:  # --seq-len too short for the prompt
        ap.error(str(e))
    sub = IsolatedSubmission(run, source, req)
    rows = []
    try:
        reference = reference_request(run, source, req, device, dtype)
        for r in range(args.rounds):
            with sub.paused():
                before = reference_benchmark(run, source, req, device, dtype)
            after = sub.benchmark(req)
            in_turn = sub.benchmark(req, reference)
            rows.append({"round": r, "one_after_the_other": score(before, after),
                         "in_turn": score(in_turn["reference"], in_turn),
                         "p50_ratio_in_turn": in_turn["e2e_model"]["latency_ms_p50"]
                         / in_turn["reference"]["e2e_model"]["latency_ms_p50"]})
            print(f"round {r}: honest score {rows[-1]['one_after_the_other']:.3f} one after the other, "
                  f"{rows[-1]['in_turn']:.3f} in turn (p50 submission / reference {rows[-1]['p50_ratio_in_turn']:.3f})",
                  flush=True)
    finally:
        sub.close()
        compiled.cleanup()
    spread = {way: {"min": min(row[way] for row in rows), "median": statistics.median(row[way] for row in rows),
                    "max": max(row[way] for row in rows)} for way in ("one_after_the_other", "in_turn")}
    for way, s in spread.items():
        print(f"{way.replace('_', ' ')}: min {s['min']:.3f}, median {s['median']:.3f}, max {s['max']:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"seq_len": args.seq_len, "runs": args.runs, "prompt_tokens": req.input_ids.shape[1],
                               "new_tokens": req.max_new_tokens, "rows": rows, "spread": spread}, indent=1) + "\n")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
