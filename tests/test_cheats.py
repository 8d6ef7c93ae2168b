"""The cheat library (tests/cheats/): each cheat of spec/peer-harnesses.md §4 that could work against an LLM
harness, run through a real evaluation; none raises its score. And the faults a submission can cause (a hang, a
crash, NaN logits) end in a failed, recorded evaluation while the harness goes on."""

import csv
import hashlib
import json
import os
import re
import time
from pathlib import Path

import pytest

from moebench.modes import confine
from tests.test_modes import invoke

pytestmark = pytest.mark.usefixtures("in_tmp", "one_thread")

CHEATS = Path(__file__).parent / "cheats"
RUN = ["--seq-len", "20", "--benchmark-runs", "2", "--warmup-runs", "1", "--base-latency", "100",
       "--base-throughput", "100", "--prompt", "Hello world"]
RECORDS = "moebench-tiny_score_records.csv"


def evaluate(module: str, *extra) -> tuple[int, str, str]:
    return invoke("--mode", "evaluate_single", *RUN, "--qwen", CHEATS / f"{module}.py", *extra)


def records(folder: Path = Path(".")) -> list[dict]:
    with open(folder / RECORDS, newline="") as f:
        return list(csv.DictReader(f))


def report() -> dict:
    return json.loads(Path("benchmark_report.json").read_text())


def test_memoizing_outputs_is_flagged_by_the_caching_audit():
    code, out, err = evaluate("memoize")
    assert code == 1, out + err
    assert "evaluation flagged: caching" in out
    assert "accuracy:             PASS, but flagged (caching" in out  # the validation passed; the flag zeroes it
    assert report()["checks"]["caching_audit"]["flagged"]
    assert float(records()[-1]["final_score"]) == 0


@pytest.mark.parametrize("faster_rounds, flagged, rounds", [(0, False, 1), (1, False, 2), (2, True, 2)])
def test_the_caching_audit_confirms_a_faster_round_with_a_second_and_alternates_the_order(faster_rounds, flagged,
                                                                                          rounds, monkeypatch):
    """A round where every repeated prompt was faster (by chance, on a busy machine) is timed again; only both
    rounds flag. The fresh prompt goes first in every other pair."""
    import torch

    from moebench.evaluation import checked

    ids = torch.arange(1, 7).reshape(1, 6)
    clock, order = [0.0], []

    def request(x, mask, n):
        repeated = torch.equal(x, ids)
        order.append(repeated)
        pairs_done = sum(order) - repeated  # the audit's pairs before this one
        clock[0] += 0.050 if repeated and pairs_done < 3 * faster_rounds else 0.100
        return torch.zeros(1, n, dtype=torch.int64), {"ttft": 0.0, "context": 0.0, "steps": [0.0]}

    monkeypatch.setattr(checked.time, "perf_counter", lambda: clock[0])
    _, outputs, audit, _ = checked.checked_benchmark(request, ids, torch.ones_like(ids), 2, 0, 0, 3, 50, (0,), 8)
    report = audit.report()
    assert (report["flagged"], report["rounds"], report["pairs"]) == (flagged, rounds, 3 * rounds)
    assert report["fresh_ms_p50"] == pytest.approx(100)
    assert order[:6] == [False, True, True, False, False, True]  # an even seed: fresh first in pairs 0 and 2...
    assert order[6:] == [True, False, False, True, True, False][:len(order) - 6]  # ...and 4 (1 of round 2)
    assert len(outputs) == 3 * rounds  # every fresh answer is checked


def _audit_on_a_rank(rank, world):
    """checked_benchmark's audit on this rank, with a clock by which only rank 0's repeated prompts are faster: the
    number of requests every rank made."""
    import torch
    from torch import distributed as dist

    from moebench.evaluation import checked

    ids, clock, calls = torch.arange(1, 7).reshape(1, 6), [0.0], [0]

    def request(x, mask, n):
        calls[0] += 1
        clock[0] += 0.050 if rank == 0 and torch.equal(x, ids) else 0.100
        return torch.zeros(1, n, dtype=torch.int64), {"ttft": 0.0, "context": 0.0, "steps": [0.0]}

    checked.time.perf_counter = lambda: clock[0]
    audit = checked.checked_benchmark(request, ids, torch.ones_like(ids), 2, 1, 0, 3, 50, (0,), 8)[2]
    counts = [None] * world
    dist.all_gather_object(counts, (calls[0], len(audit.rounds), audit.flagged))
    return counts


def test_tensor_parallel_ranks_run_the_audits_second_round_together():
    """Each rank's harness times its own submission process, but a request is answered by all of them together:
    the second round runs on every rank when rank 0's first was faster (a rank that stopped after one round left
    the other's submission waiting on a collective: a flaky failure of the two-rank CLI tests)."""
    from moebench.engine.parallel import run_parallel

    assert run_parallel(_audit_on_a_rank, 2, timeout=120) == [(13, 2, True), (13, 2, False)]


def test_replaying_stale_outputs_fails_the_check_of_the_timed_runs():
    code, out, err = evaluate("stale_output")
    assert code == 1, out + err
    assert "logit validation PASS" in out  # it computed honestly while it was checked
    assert "evaluation flagged: the timed outputs do not match the reference" in out
    assert not report()["checks"]["spot_check"]["passed"]


def test_less_work_on_timed_runs_fails_the_check_of_the_timed_runs():
    code, out, err = evaluate("less_work_when_timed")
    assert code == 1, out + err
    assert "logit validation PASS" in out
    assert "evaluation flagged: the timed outputs do not match the reference" in out
    assert float(records()[-1]["final_score"]) == 0


def baselines() -> None:
    Path("prompts.txt").write_text("Hello world\n")
    code, out, err = invoke("--mode", "generate_accuracy_baselines", "--seq-len", "20", "--benchmark-runs", "1",
                            "--warmup-runs", "0")
    assert code == 0, out + err


def test_reading_the_expected_logits_gains_nothing():
    """Even where the submission can read the expected logits (--isolation process: the same user), fresh prompts
    make them useless."""
    baselines()
    code, out, err = invoke("--mode", "evaluate_all", "--qwen", CHEATS / "read_expected.py", "--benchmark-runs", "2",
                            "--isolation", "process")
    assert code == 1, out + err
    assert "Partial: --isolation process" in out
    assert "logit validation PASS" in out  # the stolen logits pass validation...
    assert "evaluation flagged: the timed outputs do not match the reference" in out  # ...fresh prompts do not
    assert float(records()[-1]["final_score"]) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="confinement needs root (CI runs as root)")
def test_a_confined_submission_cannot_see_or_forge_the_expected_logits_or_the_records():
    baselines()
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(".").iterdir() if p.is_file()}
    code, out, err = invoke("--mode", "evaluate_all", "--qwen", CHEATS / "forge_records.py", "--benchmark-runs", "1",
                            "--audit-pairs", "0")
    assert code == 0, out + err
    uid = int(re.search(r"as user (\d+) \(moebench-sandbox\), in a private view of the filesystem", out)[1])
    assert uid in confine.USERS  # a user of its own while the evaluation lasts
    assert f"forge: uid {uid}, sees ['traced_model']" in out  # nothing else of the working directory
    assert "forge: read expected_logits_0.pt: FileNotFoundError" in out
    assert "forge: append to moebench-tiny_score_records.csv: PermissionError" in out
    assert "forge: write to moebench's package: " in out
    assert "done" not in "".join(line for line in out.splitlines() if line.startswith("forge:"))
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(".").iterdir() if p.is_file()}
    assert {n: after[n] for n in before if n.startswith(("expected_logits", "prompt"))} == \
        {n: h for n, h in before.items() if n.startswith(("expected_logits", "prompt"))}
    assert [r["team_id"] for r in records()] == [""]  # the cheat's own row, no forged one
    assert "logit validation PASS" in out and float(records()[-1]["accuracy"]) == 1
    # what Inductor compiled in the view, its precompiled C++ headers too, is kept in the module's cache folder
    assert list(Path(os.environ["MOEBENCH_SANDBOX_CACHE"], "inductor", "precompiled_headers").glob("*.gch"))


def test_a_pickle_from_the_submission_never_runs_in_the_harness():
    code, out, err = evaluate("pickle_bomb")
    assert code == 1, out + err
    assert "the submission's process sent something other than data during load and compile" in out
    assert not Path("pickle_bomb_ran_in_the_harness").exists()
    assert float(records()[-1]["final_score"]) == 0


def test_patching_the_clock_does_not_change_the_measured_latency():
    runs = ("--benchmark-runs", "6")  # (two runs' p99 is their slower one: a loaded machine's spike)
    code, out, err = evaluate("patch_clock", *runs)
    assert code == 0, out + err
    cheat = report()
    code, out, err = invoke("--mode", "evaluate_single", *RUN, *runs)  # the honest template
    assert code == 0, out + err
    honest = report()
    # The patch was live in the submission's process: its own (informational) timings shrank a hundredfold...
    assert cheat["context_encoding_model"]["latency_ms_p50"] < cheat["e2e_model"]["latency_ms_p50"] / 20
    # ...but the scored latency is the harness's, from its own process: not a hundredth of the honest run's.
    for stat in ("latency_ms_p50", "latency_ms_p99"):
        assert cheat["e2e_model"][stat] > 0.1 * honest["e2e_model"][stat], stat


@pytest.mark.parametrize("module", ["hang_at_import", "hang_in_build"])
def test_a_hang_is_stopped_at_the_phase_time_limit_and_recorded(module):
    code, out, err = evaluate(module, "--phase-time-limit", "3")
    assert code == 1, out + err
    assert "the submission did not finish load and compile within the time limit of 3 s" in out
    assert "the evaluation scored 0: the submission did not finish load and compile within the time limit" in err
    row = records()[-1]
    assert float(row["final_score"]) == 0 and row["accuracy"] == "0"
    assert row["base_latency"] == row["base_throughput"] == "100.0"  # the given bases (they were nan)
    jsonl = [json.loads(line) for line in Path(RECORDS).with_suffix(".jsonl").read_text().splitlines()]
    assert "time limit" in jsonl[-1]["error"]


def test_nan_logits_fail_validation():
    code, out, err = evaluate("nan_logits")
    assert code == 1, out + err
    assert "logit validation FAIL" in out and "the evaluation scored 0: the accuracy check failed" in err


def test_a_crash_fails_each_prompt_and_evaluate_all_goes_on():
    Path("prompts.txt").write_text("Hello world\n\nOnce upon a time\n")
    Path("prompt_data_cpu.csv").write_text("Prompt ID,Context Length,Sequence Length,Base latency,Base throughput\n"
                                           "0,3,16,100,100\n1,4,16,100,100\n")
    code, out, err = invoke("--mode", "evaluate_all", "--qwen", CHEATS / "crash_when_timed.py", "--skip-accuracy",
                            "--benchmark-runs", "1", "--warmup-runs", "0", "--seq-len", "24")
    assert code == 1, out + err
    assert "note: --seq-len 24 has no effect: each prompt runs at the Sequence Length of prompt_data_cpu.csv" in out
    assert out.count("the submission's process died during benchmark (exit code 3)") == 2
    assert "2 of 2 prompts scored 0 (prompt 0: the submission's process died during benchmark (exit code 3); " \
        "prompt 1: the submission's process died" in err
    assert [r["final_score"] for r in records()] == ["0.0", "0.0"]


@pytest.mark.skipif(os.geteuid() != 0, reason="confinement needs root (CI runs as root)")
def test_a_process_the_submission_leaves_behind_is_killed_with_its_evaluation():
    code, out, err = evaluate("leave_a_process", "--skip-accuracy")
    assert code == 0, out + err
    uid = int(re.search(r"leftover: uid (\d+)", out)[1])
    assert uid in confine.USERS
    for _ in range(100):  # a killed process is gone once the kernel has run it (a moment, on a busy machine)
        alive = [p.name for p in Path("/proc").iterdir() if p.name.isdigit() and _alive_as(p, uid)]
        if not alive:
            break
        time.sleep(0.1)
    assert not alive


def _alive_as(proc: Path, uid: int) -> bool:
    try:
        status = (proc / "status").read_text()
    except OSError:  # gone meanwhile
        return False
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return int(fields["Uid"].split()[0]) == uid and fields["State"].split()[0] != "Z"


def test_forging_the_mac_counts_in_the_submissions_process_changes_nothing():
    code, out, err = evaluate("forge_flop_ratio", "--skip-accuracy")
    assert code == 0, out + err
    flops = report()["kernel_flops"]
    assert flops["nki_flop_ratio"] == 0 and flops["kernel_macs"] == 0 and flops["total_macs"] > 10**6
    assert float(records()[-1]["nki_flop_ratio"]) == 0


def test_a_kernel_that_is_torchs_own_product_earns_no_kernel_share():
    code, out, err = evaluate("torch_as_kernel", "--skip-accuracy")
    assert code == 0, out + err
    flops = report()["kernel_flops"]
    assert flops["by_op"]["team_cheat.linear.default"] > 0.2 * flops["total_macs"]  # the LM head's MACs...
    assert flops["nki_flop_ratio"] == 0 and flops["kernel_macs"] == 0  # ...are torch's
    assert flops["kernels_calling_library"] == {"team_cheat.linear.default": "aten.linear.default"}
    assert flops["kernels_not_run"] == []  # it ran: its product is the library's
    assert "team_cheat.linear.default calls aten.linear.default inside" in out


def test_a_kernel_computing_with_torchs_element_wise_arithmetic_earns_no_kernel_share():
    code, out, err = evaluate("elementwise_kernel", "--skip-accuracy")
    assert code == 0, out + err
    flops = report()["kernel_flops"]
    kernel = "team_cheat.elementwise_linear.default"
    assert flops["by_op"][kernel] > 0.2 * flops["total_macs"]  # the LM head's MACs...
    assert flops["nki_flop_ratio"] == 0 and flops["kernel_macs"] == 0  # ...are torch's
    elements, macs = flops["kernels_computing_in_torch"][kernel]
    assert elements == 2 * macs and not flops["kernels_calling_library"] and flops["kernels_not_run"] == []
    assert f"{kernel} runs {elements:,} elements of torch's arithmetic in a call of {macs:,} MACs" in out


def test_a_kernel_that_runs_only_while_exported_earns_no_kernel_share():
    code, out, err = evaluate("ghost_kernel", "--skip-accuracy")
    assert code == 0, out + err
    flops = report()["kernel_flops"]
    assert flops["by_op"]["team_cheat.ghost_linear.default"] > 0.2 * flops["total_macs"]  # the exported graphs...
    assert flops["nki_flop_ratio"] == 0 and flops["kernel_macs"] == 0  # ...are not what runs
    assert flops["kernels_not_run"] == ["team_cheat.ghost_linear.default"] and not flops["kernels_calling_library"]
    assert "team_cheat.ghost_linear.default is in the graphs but did not run" in out


def test_a_kernel_that_torch_compile_does_not_run_earns_no_kernel_share():
    code, out, err = evaluate("compile_ghost_kernel", "--skip-accuracy")
    assert code == 0, out + err
    flops = report()["kernel_flops"]
    kernel = "team_cheat.compile_ghost_linear.default"
    assert flops["by_op"][kernel] > 0.2 * flops["total_macs"]  # the exported graphs hold it...
    assert not flops["kernels_not_run"] and not flops["kernels_calling_library"]  # ...and it runs eagerly...
    assert flops["kernels_not_compiled"] == {kernel: [0, 1]}  # ...but not in the compiled decode step
    assert flops["nki_flop_ratio"] == 0 and flops["kernel_macs"] == 0
    assert f"{kernel} is in a decode step's graph 1 time(s) but its compiled code called it 0 time(s)" in out


def test_a_kernel_that_compiled_code_calls_on_less_than_its_graph_earns_no_kernel_share():
    code, out, err = evaluate("compile_thin_kernel", "--skip-accuracy")
    assert code == 0, out + err
    flops = report()["kernel_flops"]
    kernel = "team_cheat.compile_thin_linear.default"
    assert flops["by_op"][kernel] > 0.2 * flops["total_macs"] and not flops["kernel_macs_cut"]
    assert not flops["kernels_not_run"] and not flops["kernels_calling_library"]  # it runs whole eagerly...
    assert flops["kernels_not_compiled"] == {kernel: [0, 1]}  # ...and compiled once, on one row: not the graph's call
    assert flops["nki_flop_ratio"] == 0 and flops["kernel_macs"] == 0
    assert f"{kernel} is in a decode step's graph 1 time(s) but its compiled code called it 0 time(s) at its" in out


def test_a_kernel_called_for_show_while_torch_does_the_work_earns_no_kernel_share():
    code, out, err = evaluate("decoy_kernel", "--skip-accuracy")
    assert code == 0, out + err
    flops = report()["kernel_flops"]
    assert flops["by_op"]["team_cheat.decoy_linear.default"] > 0.2 * flops["total_macs"]
    assert not flops["kernels_not_run"] and not flops["kernels_calling_library"]  # it ran, with no product inside
    assert flops["nki_flop_ratio"] == 0 and flops["kernel_macs"] == 0
    cut = flops["kernel_macs_cut"]
    assert [c["submodel"] for c in cut] == ["context_encoding_model", "token_generation_model"]
    assert all(c["library_macs_run"] == c["library_macs_in_graph"] + c["kernel_macs_per_run"] for c in cut)
    assert "of its kernel MACs (524,288) 0 are credited" in out



def test_library_products_hidden_in_an_unregistered_op_count_as_the_library_s():
    """The projections behind an op the submission does not register are out of the graphs' total, but not out of
    the products that ran: the LM head kernel's credit is cut by them, and the op is named."""
    code, out, err = evaluate("hidden_products", "--skip-accuracy")
    assert code == 0, out + err
    flops = report()["kernel_flops"]
    assert flops["ops_not_registered"] == ["team_cheat::proj"]
    assert "team_cheat::proj is in the graphs but is not a registered kernel (register_kernel)" in out
    cut = flops["kernel_macs_cut"]
    assert {c["submodel"] for c in cut} == {"context_encoding_model", "token_generation_model"}
    for c in cut:  # the hidden products ran: the graph's kernel MACs credited only what they leave
        hidden = c["library_macs_run"] - c["library_macs_in_graph"]
        assert hidden > 0 and c["credited_kernel_macs_per_run"] == max(0, c["kernel_macs_per_run"] - hidden)
    assert flops["kernel_macs"] < 0.6 * flops["by_op"]["team_cheat.head.default"]

@pytest.mark.parametrize("module", ["malformed_start", "malformed_compiled"])
def test_a_malformed_answer_to_the_load_and_compile_step_fails_the_evaluation(module):
    code, out, err = evaluate(module, "--skip-accuracy")
    assert code == 1, out + err
    assert "evaluation failed: the submission's process sent a malformed reply during load and compile" in out
    assert float(records()[-1]["final_score"]) == 0


def test_answering_a_timed_request_with_fewer_tokens_fails_the_evaluation():
    code, out, err = evaluate("truncate_when_timed", "--skip-accuracy")
    assert code == 1, out + err
    assert "evaluation failed: a timed request asked for 16 new tokens of 1 prompt, and the submission's process " \
        "answered a tensor of shape [1, 1], torch.int64" in out
    assert float(records()[-1]["final_score"]) == 0


def test_a_timed_answer_is_checked_before_it_is_kept():
    import torch

    from moebench.modes.sandbox import SubmissionFault, _timed_reply

    inner = {"ttft": 1, "context": 0.5, "steps": [0.1, 0.2]}
    tokens = torch.tensor([[1, 2, 3]])
    assert _timed_reply((tokens, inner), 1, 3, 10)[1] == {"ttft": 1.0, "context": 0.5, "steps": [0.1, 0.2]}
    as_sent = {**inner, "steps": torch.tensor([0.1, 0.2], dtype=torch.float64)}  # (what answer_request sends)
    assert _timed_reply((tokens, as_sent), 1, 3, 10)[1] == {"ttft": 1.0, "context": 0.5, "steps": [0.1, 0.2]}
    for bad in ((tokens, {"ttft": 1}), (tokens, None), (tokens,), (tokens[:, :2], inner), (tokens.float(), inner),
                (torch.tensor([[1, 2, 10]]), inner), (torch.tensor([[1, -1, 3]]), inner), ([[1, 2, 3]], inner),
                (tokens.bool(), inner), (torch.cat([tokens, tokens]), inner), (tokens, {**inner, "steps": [0.1]}),
                (tokens, {**inner, "steps": ["x", "y"]}), (tokens, {**inner, "steps": torch.zeros(2, 1)}),
                (tokens, {**inner, "steps": [10**400, 1]}), (tokens, {**inner, "ttft": 10**400}), (tokens, tokens)):
        with pytest.raises(SubmissionFault):
            _timed_reply(bad, 1, 3, 10)


def test_the_pipes_messages_are_plain_data_and_nothing_else_is_read():
    import pickle

    import torch

    from moebench.modes.sandbox import _decode, _encode

    message = ("ok", (torch.arange(6).reshape(2, 3), torch.randn(2, 1, 5).bfloat16(), torch.tensor(True),
                      torch.empty(0, 4)),
               {"ttft": 0.25, "steps": [1.0, float("nan")], "none": None, "n": 3, "ok": False, "s": "x\ny"}, "", "")
    back = _decode(_encode(message))
    assert type(back) is tuple and type(back[1]) is tuple and back[2]["n"] == 3 and back[2]["ok"] is False
    for a, b in zip(message[1], back[1]):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    assert back[2]["steps"][1] != back[2]["steps"][1] and back[2]["s"] == "x\ny" and back[2]["none"] is None
    for bad in (pickle.dumps(("ok", 1, "", "")), _encode(("ok",))[:-3], _encode((torch.ones(3),))[:-1],
                _encode((torch.ones(3),)) + b"\0",
                *(len(h).to_bytes(8, "little") + h for h in (b'{"\\u0000tensor": 1}', b'{"\\u0000tuple": 1, "a": 2}',
                                                              b'{"\\u0000tensor": ["object", [1]]}'))):
        with pytest.raises((ValueError, KeyError, TypeError)):
            _decode(bad)
    with pytest.raises(TypeError):
        _encode((object(),))  # the harness sends only plain data too
