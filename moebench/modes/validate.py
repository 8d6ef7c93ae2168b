"""--mode validate (logit validation of the submission) and --mode generate_accuracy_baselines."""

from dataclasses import replace
from pathlib import Path

from moebench.cli.args import RunConfig
from moebench.engine.parallel import agreed_failure, shared_value
from moebench.errors import CheckFailed, SubmissionFault
from moebench.evaluation.expected import save_expected
from moebench.evaluation.records import check_output_file, read_prompts, write_prompt_data
from moebench.modes.contest import UnderTest, expected_logits, print_validation
from moebench.modes.evaluate import measure_prompt_data
from moebench.modes.sandbox import IsolatedSubmission, isolation, submission_of, while_compiling
from moebench.modes.setup import device_of, dtype_of, make_request, open_source, prompt_requests


def run_validate(run: RunConfig) -> int:
    """Exit 0 when the submission's logits pass, 1 when they do not, on every platform."""
    sub = submission_of(run)
    print(f"submission: {sub.path}")
    source = open_source(run)
    device, dtype = device_of(run), dtype_of(run)
    req = make_request(run, source, run.prompts)
    isolated = isolation(run)
    under, failure = None, None
    try:
        # the submission first: a broken module fails before any long work
        under = IsolatedSubmission(run, source, req) if isolated else UnderTest(run, sub, source, device, dtype, req)
        shared_value(None, "the submission loaded")  # (every rank's, before the reference runs: agreed_failure)
        expected = while_compiling(under, device, lambda: expected_logits(run, source, req, device, dtype, None,
                                                                          Path.cwd())[0])
        v = under.validate(expected, req, source.tokenizer)
    except SubmissionFault as e:
        failure = e
    finally:
        if isolated and under is not None:
            under.close()
    if (failure := agreed_failure(failure)) is not None:
        raise failure
    print_validation(v)
    if not v.report.passed:
        raise CheckFailed("validation failed")
    return 0


def run_generate_accuracy_baselines(run: RunConfig) -> int:
    """For each prompt of prompts.txt: expected_logits_{i}.pt/.json from the reference, and the reference's
    latency and throughput in prompt_data_<platform>.csv."""
    folder = Path.cwd()
    prompts = read_prompts(folder / "prompts.txt")
    source = open_source(run)
    device, dtype = device_of(run), dtype_of(run)
    reqs = prompt_requests([run] * len(prompts), source, prompts, "prompts.txt")  # all checked before any is written
    data_path = folder / f"prompt_data_{device.type}.csv"
    for path in [folder / f"expected_logits_{i}{ext}" for i in range(len(prompts)) for ext in (".pt", ".json")]:
        check_output_file(path)
    check_output_file(data_path)
    # Every file is written once all is computed: a run stopped before (Ctrl-C, a failure) leaves the files of the
    # last whole run together, never new expected logits beside bases timed for other prompts or another dtype.
    expected = []
    for i, req in enumerate(reqs):
        expected.append(expected_logits(run, source, req, device, dtype, None, folder / ".no-stored-logits"))
        print(f"prompt {i}: {req.attention_mask.sum()} tokens, {expected[-1][0].shape[0]} expected tokens")
    rows = measure_prompt_data(run, source, prompts, reqs)
    for i, ((logits, meta), row) in enumerate(zip(expected, rows)):  # each metadata names its base: a mix is refused
        meta = replace(meta, base=[row.base_latency, row.base_throughput])
        print(f"prompt {i}: expected logits -> {save_expected(folder, i, logits, meta).name}")
    write_prompt_data(data_path, rows)
    for r in rows:
        print(f"prompt {r.prompt_id}: base latency {r.base_latency:.2f} ms, base throughput "
              f"{r.base_throughput:.2f} tokens/s")
    print(f"prompt data: {data_path}")
    return 0
