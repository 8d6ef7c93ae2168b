"""--mode evaluate_single and evaluate_all: accuracy, benchmark, kernel FLOP ratio, score, score record."""

import sys
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from moebench.cli.args import RunConfig
from moebench.engine.parallel import agreed_failure, shared_value, writes_files
from moebench.errors import CheckFailed, MoebenchError
from moebench.evaluation.records import (IN_TURN, PromptData, append_json_record, append_record, check_output_file,
                                         check_records_file, prompt_data_path, read_prompt_data, read_prompts,
                                         record_row, records_path, write_prompt_data)
from moebench.evaluation.expected import check_stored, read_meta, stored_index
from moebench.evaluation.flops import uncredited_kernels
from moebench.evaluation.score import Score, compute_score
from moebench.modes.contest import (UnderTest, provenance, expected_logits, expected_meta, print_validation,
                                    record_model_name, reference_benchmark, reference_request, write_json)
from moebench.modes.sandbox import IsolatedSubmission, SubmissionFault, isolation, submission_of, while_compiling
from moebench.modes.setup import at_seq_len, device_of, dtype_of, make_request, open_source, prompt_requests

REPORT_FILE = "benchmark_report.json"


@dataclass
class Base:
    latency: float  # ms, end-to-end p99
    throughput: float  # tokens/s
    origin: str


def base_from_report(report: dict, origin: str) -> Base:
    return Base(report["e2e_model"]["latency_ms_p99"], report["e2e_model"]["throughput"], origin)


def evaluate_prompt(run: RunConfig, sub, source, prompt: str, index: int | None, base: Base | None,
                    report_path: Path, artifacts=None, extend: bool = False) -> tuple[Score, object, str | None]:
    """One prompt: the submission is built (in its own process unless --isolation none), the reference gives the
    expected logits and base timings when needed, then the submission is validated, benchmarked on fresh prompts
    and its MACs counted; its timed outputs are checked last. A submission that crashes, hangs or is flagged
    scores 0 and is recorded. artifacts / extend: the compile folder evaluate_all's later prompts add to. Returns the
    score, the compile folder and, for a score of 0, why."""
    folder = Path.cwd()
    device, dtype = device_of(run), dtype_of(run)
    req = make_request(run, source, [prompt])
    isolated = isolation(run)
    under, failure = None, None
    try:
        # the submission first: a broken module fails before any long work
        under = IsolatedSubmission(run, source, req, extend) if isolated else \
            UnderTest(run, sub, source, device, dtype, req, artifacts)
        # (under tensor parallelism every rank checks that none failed alone before the reference's collectives:
        # after the load and the build (while_compiling), the validation and the FLOP count, and around each of the
        # reference's timed requests)
        shared_value(None, "the submission loaded")

        def reference():  # what the harness's reference does before the submission's first call
            expected = None if run.skip_accuracy else \
                expected_logits(run, source, req, device, dtype, index, folder)[0]
            # (in one process nothing of the submission runs beside the reference; in its own, it is timed in turn:
            # its engine compiled now)
            chosen = choose_base(run, source, req, device, dtype, base, folder, measure=not isolated)
            return expected, chosen, reference_request(run, source, req, device, dtype) if chosen is None else None

        expected, base, timed_reference = while_compiling(under, device, reference)
        accuracy, checked, v, problems = 1.0, False, None, []
        if expected is not None:
            v = under.validate(expected, req, source.tokenizer)
            shared_value(None, "the validation")
            print_validation(v)
            accuracy, checked = float(v.report.passed), True
        if base is None:  # timed with the submission, request by request (a shared machine's drift slows both)
            report = under.benchmark(req, timed_reference)
            timed_reference = None  # (freed: finish builds a reference of its own)
            base = with_given(run, base_from_report(report["reference"], IN_TURN))
        else:
            report = under.benchmark(req)
        report["accuracy"] = v.report.plot_data() if v is not None else None
        report["kernel_flops"] = flops = under.kernel_flops(req)
        shared_value(None, "the FLOP count")
        report["compile"] = under.compile if isolated else under.artifacts.summary()
        if isolated:
            report["checks"] = checks = under.finish(device, dtype)
            problems = check_problems(checks)
            uncredited(flops, checks.get("mac_count"))
    except SubmissionFault as e:
        failure = e
    finally:
        if isolated and under is not None:
            under.close()  # (before the ranks agree: another rank's submission may wait on this one's)
    if (failure := agreed_failure(failure)) is not None:
        print(f"evaluation failed: {failure}")
        return record_failure(run, sub, source, device, prompt, index, base, str(failure)), None, str(failure)
    for problem in problems:
        print(f"evaluation flagged: {problem}")
    reasons = [] if accuracy else ["the accuracy check failed"]
    if problems:
        reasons.append(f"flagged: {'; '.join(problems)}")
    why = "; ".join(reasons) or None  # why the score is 0
    passed, accuracy = bool(accuracy), 0.0 if problems else accuracy
    ratio = flops["nki_flop_ratio"]
    print_flops(flops)
    e2e = report["e2e_model"]
    score = compute_score(accuracy, base.latency, base.throughput, e2e["latency_ms_p99"], e2e["throughput"], ratio)
    path = records_path(folder, run.team_id, record_model_name(source))
    # first: a records file that fails now loses no score
    print_summary(score, checked, passed, problems, base, report_path, path)
    append_record(path, record_row(run.team_id, run.member_id, score))
    if writes_files():  # the provenance (git, hashes) only where the record is written: rank 0
        append_json_record(path.with_suffix(".jsonl"), {
            **record_head(run, prompt, index), "accuracy_checked": checked,
            "validation": v.report.summary() if checked else None, "flagged": problems or None,
            "base": asdict(base), "score": asdict(score), "provenance": provenance(run, sub, source, device),
            "report": without_samples(report)})
    write_json(report_path, report)  # (after the records: a report that cannot be written loses no score)
    return score, None if isolated else under.artifacts, why


def without_samples(report: dict) -> dict:
    """The report for the records: every section but its raw samples (those stay in benchmark_report.json)."""
    return {k: without_samples(s) if isinstance(s, dict) else s for k, s in report.items() if k != "samples_ms"}


def choose_base(run: RunConfig, source, req, device, dtype, base: Base | None, folder: Path,
                measure: bool = True) -> Base | None:
    """Given numbers win, then evaluate_all's prompt data, then stored baselines, else the reference measured now;
    None instead when not `measure`: the caller times the reference alternating with the submission."""
    if run.base_latency is not None and run.base_throughput is not None:
        base = Base(run.base_latency, run.base_throughput, "given")
    elif base is None:
        base = stored_base(run, source, req, dtype, folder)
    if base is None:
        if not measure:
            return None
        base = base_from_report(reference_benchmark(run, source, req, device, dtype), "reference measured now")
    return with_given(run, base)


def with_given(run: RunConfig, base: Base) -> Base:
    """--base-latency and --base-throughput replace the numbers they give; the origin says where each came from
    ("given", or "latency given; throughput: <base's origin>" where only one is given)."""
    if run.base_latency is not None and run.base_throughput is not None:
        return Base(run.base_latency, run.base_throughput, "given")
    if run.base_latency is None and run.base_throughput is None:
        return base
    given, other = ("latency", "throughput") if run.base_latency is not None else ("throughput", "latency")
    return Base(run.base_latency or base.latency, run.base_throughput or base.throughput,
                f"{given} given; {other}: {base.origin}")


def uncredited(flops: dict, mac_count: dict | None) -> None:
    """The kernel share is not credited (ratio 0, and why) when the submission's MACs are not credible, and is
    credited up to the share of the reference's MACs its library ops leave (flops.credibility) otherwise."""
    if mac_count is None:
        return
    ratio = flops["nki_flop_ratio"]
    ranks = f" (its {mac_count['ranks']} ranks' summed)" if mac_count["ranks"] > 1 else ""
    if not mac_count["credited"]:
        why = (f"its graphs{ranks} count {mac_count['factor']:.3g} times the reference's MACs for this request "
               f"({mac_count['submission_total_macs']:,} against {mac_count['reference_total_macs']:,}; at most "
               f"{mac_count['allowed_factor']:g} times either way), so its kernel share ({ratio:.4f}) is not "
               "credited")
        print(f"note: {why}")
        flops.update(nki_flop_ratio=0.0, not_credited=why)
    elif ratio > mac_count["share_cap"] + 1e-9:  # (equal but for rounding)
        cap = mac_count["share_cap"]
        why = (f"its library ops{ranks} count {mac_count['library_macs']:,} of the reference's "
               f"{mac_count['reference_total_macs']:,} MACs for this request, which leaves {cap:.4f} of them to "
               f"its own code: its kernel share ({ratio:.4f}) is credited up to that")
        print(f"note: {why}")
        flops.update(nki_flop_ratio=cap, capped=why)


def check_problems(checks: dict) -> list[str]:
    """Why the harness's own checks of the timed runs refuse to score them (empty: they passed)."""
    problems = []
    spot = checks.get("spot_check")
    if spot and not spot["passed"]:
        problems.append(f"the timed outputs do not match the reference: {spot['message']}")
    audit = checks.get("caching_audit")
    if audit and audit["flagged"]:
        problems.append(f"caching: a repeated prompt ran over 10% faster than a fresh one in each of {audit['pairs']} "
                        f"pairs, {audit['rounds']} rounds (median {audit['repeated_ms_p50']:.2f} ms against "
                        f"{audit['fresh_ms_p50']:.2f} ms)")
    return problems


def record_head(run: RunConfig, prompt: str, index: int | None) -> dict:
    return {"time": datetime.now().isoformat(timespec="seconds"), "team_id": run.team_id, "member_id": run.member_id,
            "mode": run.mode, "prompt_index": index, "prompt": prompt}


def record_failure(run: RunConfig, sub, source, device, prompt: str, index: int | None, base: Base | None,
                   error: str) -> Score:
    """A failed evaluation (crash, hang, fault in the submission): score 0 in both records, with the reason."""
    if base is None:  # none measured yet: the flags' bases, where given
        base = with_given(run, Base(float("nan"), float("nan"), "not measured"))
    score = Score(accuracy=0.0, base_latency=base.latency, base_throughput=base.throughput, latency=float("nan"),
                  throughput=0.0, flop_ratio=0.0, reduced_latency=0.0, increased_throughput=0.0, final_score=0.0)
    path = records_path(Path.cwd(), run.team_id, record_model_name(source))
    append_record(path, record_row(run.team_id, run.member_id, score))
    if writes_files():
        append_json_record(path.with_suffix(".jsonl"), {
            **record_head(run, prompt, index), "error": error, "score": asdict(score),
            "provenance": provenance(run, sub, source, device)})
    print(f"records: {path} (a failed evaluation, score 0)")
    return score


def stored_base(run: RunConfig, source, req, dtype, folder: Path) -> Base | None:
    """The baseline stored by generate_accuracy_baselines for this very prompt, model, weights, dtype and
    sequence length (found through the expected-logits metadata), or None."""
    meta = expected_meta(run, source, req, dtype)
    i = stored_index(folder, meta)
    data_path = prompt_data_path(folder, device_of(run).type)
    if i is None or data_path is None or not (folder / f"expected_logits_{i}.json").is_file():
        return None
    stored = read_meta(folder / f"expected_logits_{i}.json")
    rows = {r.prompt_id: r for r in read_prompt_data(data_path)}
    if stored.mismatch(meta) or stored.base_mismatch(meta) or stored.seq_len != run.seq_len or i not in rows or \
            (rows[i].context_length, rows[i].seq_len) != (sum(map(len, meta.prompt_ids)), run.seq_len) or \
            stored.other_base(rows[i]):
        return None  # (a row of another length was timed for another prompt; one of other numbers in another run)
    return Base(rows[i].base_latency, rows[i].base_throughput, f"{data_path.name}, prompt {i}")


def print_flops(flops: dict) -> None:
    """The kernel FLOP ratio broken down per op (share of all MACs) and per submodel."""
    total = flops["total_macs"]
    print(f"kernel FLOP ratio {flops['nki_flop_ratio']:.4f}: {flops['kernel_macs']:,} of {total:,} MACs per request")
    for op, macs in sorted(flops["by_op"].items(), key=lambda kv: -kv[1]):
        kind = "kernel" if op in flops["kernel_ops"] else ""
        print(f"  {op:<48} {macs / total if total else 0:7.2%} {kind}")
    for g in flops["by_graph"]:
        print(f"  {g['submodel']} bucket {g['bucket']}: {g['runs']} run(s) x {g['total_macs_per_run']:,} MACs, "
              f"ratio {g['nki_flop_ratio']:.4f}")
    for line in uncredited_kernels(flops):
        print(f"  {line}")


def score_text(score: float) -> str:
    """A score to 4 decimals; one above 0 but below 0.001 (a very slow submission) in 4 significant digits, not
    as 0.0000."""
    return f"{score:.3e}" if 0 < abs(score) < 1e-3 else f"{score:.4f}"


def print_summary(s: Score, checked: bool, passed: bool, problems: list[str], base: Base, report_path: Path,
                  records: Path) -> None:
    """passed: the logit validation's verdict; problems: what flagged the run (its accuracy is then counted 0)."""
    acc = ("PASS" if passed else "FAIL") if checked else "not checked (--skip-accuracy; counted as 1)"
    if problems:
        acc += f", but flagged ({'; '.join(problems)}): counted as 0"
    print(f"accuracy:             {acc}")
    print(f"latency (e2e p99):    {s.latency:.2f} ms   base {s.base_latency:.2f} ms ({base.origin})")
    print(f"throughput (e2e):     {s.throughput:.2f} tokens/s   base {s.base_throughput:.2f} tokens/s")
    print(f"reduced latency:      {s.reduced_latency:.4f}")
    print(f"increased throughput: {s.increased_throughput:.4f}")
    print(f"kernel FLOP ratio:    {s.flop_ratio:.4f}")
    print(f"final score:          {score_text(s.final_score)}")
    print(f"report: {report_path}")
    print(f"records: {records}")


def run_evaluate_single(run: RunConfig) -> int:
    sub = submission_of(run)
    print(f"submission: {sub.path}")
    source = open_source(run)
    if len(run.prompts) != 1:
        raise MoebenchError("--mode evaluate_single takes one --prompt; use evaluate_all for several")
    check_records_file(records_path(Path.cwd(), run.team_id, record_model_name(source)))
    check_output_file(Path.cwd() / REPORT_FILE)
    _, _, why = evaluate_prompt(run, sub, source, run.prompts[0], None, None, Path.cwd() / REPORT_FILE)
    if why is not None:
        raise CheckFailed(f"the evaluation scored 0: {why}")
    return 0


def run_evaluate_all(run: RunConfig) -> int:
    folder = Path.cwd()
    prompts = read_prompts(folder / "prompts.txt")
    sub = submission_of(run)
    print(f"submission: {sub.path}")
    source = open_source(run)
    check_records_file(records_path(folder, run.team_id, record_model_name(source)))
    platform = device_of(run).type
    data_path = prompt_data_path(folder, platform)
    for path in [folder / f"benchmark_report_{i}.json" for i in range(len(prompts))] + \
            [folder / f"prompt_data_{platform}.csv"] * (data_path is None):  # what this run writes
        check_output_file(path)
    rows = None if data_path is None else read_prompt_data(data_path)
    if rows is not None:
        check_prompt_data(run, source, prompts, rows, data_path)
    # every prompt's request and stored expected logits checked before any long work
    runs = [run] * len(prompts) if rows is None else \
        [at_seq_len(run, row.seq_len, max_new_tokens=None, max_length=None)
         for row in rows]  # the file's sequence length is used, as its bases were timed
    reqs = prompt_requests(runs, source, prompts, "prompts.txt")
    for i, (prompt_run, req) in enumerate(zip(runs, reqs)):
        wanted = expected_meta(prompt_run, source, req, dtype_of(run))
        if not run.skip_accuracy:
            check_stored(folder, i, wanted, source.config.vocab_size)
        if rows is not None:
            check_bases(folder, i, wanted, data_path, rows[i])
    if rows is None:
        data_path = folder / f"prompt_data_{platform}.csv"
        print(f"{data_path.name} not found: measuring the reference on each prompt now and writing it")
        rows = measure_prompt_data(run, source, prompts, reqs)
        write_prompt_data(data_path, rows)  # (only rank 0 writes under tensor parallelism: use the rows in hand)
        runs = [at_seq_len(run, row.seq_len) for row in rows]
    total, failed, artifacts = 0.0, [], None
    for i, (prompt, row, prompt_run) in enumerate(zip(prompts, rows, runs)):
        print(f"== prompt {i} ({row.context_length} tokens of context, sequence length {row.seq_len})")
        base = Base(row.base_latency, row.base_throughput, data_path.name)
        score, artifacts, why = evaluate_prompt(prompt_run, sub, source, prompt, i, base,
                                                folder / f"benchmark_report_{i}.json", artifacts, extend=i > 0)
        total += score.final_score
        if why is not None:
            failed.append(f"prompt {i}: {why}")
    print(f"total score ({len(prompts)} prompts): {score_text(total)}")
    if failed:
        raise CheckFailed(f"{len(failed)} of {len(prompts)} prompts scored 0 ({'; '.join(failed)})")
    return 0


def check_bases(folder: Path, i: int, wanted, data_path: Path, row: PromptData) -> None:
    """A prompt's stored base (row) against the run, where the expected logits written with it (by
    generate_accuracy_baselines) say how it was measured: another model, weights, dtype or --tp-degree is refused,
    and a row other than the one written with them, accuracy checked or not (prompt data from elsewhere, with no
    expected logits beside it, says nothing)."""
    meta_path = folder / f"expected_logits_{i}.json"
    if not meta_path.is_file():
        return
    stored = read_meta(meta_path)
    if why := stored.base_mismatch(wanted):
        raise MoebenchError(f"{data_path}: prompt {i}'s base was measured with {why} ({meta_path.name}, written "
                            "with it); a score compares like with like: regenerate them with --mode "
                            "generate_accuracy_baselines")
    if why := stored.other_base(row):
        raise MoebenchError(f"{data_path}: prompt {i}'s base is {why} ({meta_path.name}): the two come from "
                            "different runs; regenerate them with --mode generate_accuracy_baselines")


def check_prompt_data(run: RunConfig, source, prompts: list[str], rows: list[PromptData], data_path: Path) -> None:
    """A prompt_data file's rows against prompts.txt: one per prompt, each leaving room for a new token."""
    if [r.prompt_id for r in rows] != list(range(len(prompts))):
        raise MoebenchError(f"{data_path}: has prompt ids {[r.prompt_id for r in rows]}, but prompts.txt has "
                            f"{len(prompts)} prompts (ids 0..{len(prompts) - 1})")
    for i, (prompt, row) in enumerate(zip(prompts, rows)):
        n = source.tokenizer.batch([prompt], 0, "right")[0].shape[1]
        if row.seq_len <= n:
            raise MoebenchError(f"{data_path}: prompt {i} is {n} tokens, but its Sequence Length is {row.seq_len}; "
                                "it must leave room for at least one new token")
        if row.context_length != n:
            print(f"note: {data_path.name}: prompt {i} is {n} tokens, not the {row.context_length} its Context Length "
                  "says (the prompt itself is used)", file=sys.stderr)
    if "seq_len" in run.explicit and any(r.seq_len != run.seq_len for r in rows):
        print(f"note: --seq-len {run.seq_len} has no effect: each prompt runs at the Sequence Length of "
              f"{data_path.name}")  # (stdout: an error found later stays the one stderr line)
    for name in ("max_new_tokens", "max_length"):  # (a shorter run would be scored against bases timed longer)
        if name in run.explicit:
            print(f"note: --{name.replace('_', '-')} {getattr(run, name)} has no effect: each prompt generates up "
                  f"to the Sequence Length of {data_path.name}, where its base was timed")


def measure_prompt_data(run: RunConfig, source, prompts: list[str], reqs: list) -> list[PromptData]:
    """Base latency and throughput of the reference on each prompt's request. A row's Sequence Length is the
    prompt's tokens and the new tokens timed (--seq-len, unless --max-new-tokens asked for fewer): what a later
    evaluate_all then generates, and what the expected logits stored beside it hold. Each base is timed at that
    Sequence Length (its KV cache and buckets), as evaluate_all will time the submission."""
    device, dtype = device_of(run), dtype_of(run)
    lengths = [int(req.attention_mask.sum()) for req in reqs]
    runs = [at_seq_len(run, n + req.max_new_tokens) for n, req in zip(lengths, reqs)]
    rows = []
    for i, (at, req) in enumerate(zip(runs, prompt_requests(runs, source, prompts, "prompts.txt"))):
        base = base_from_report(reference_benchmark(at, source, req, device, dtype), "measured")
        rows.append(PromptData(i, lengths[i], at.seq_len, base.latency, base.throughput))
    return rows
