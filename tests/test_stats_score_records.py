"""Stats, score and the evaluation files (records, prompt_data, prompts.txt) against hand-computed values."""

import json
import math
import multiprocessing as mp
import os
from datetime import datetime
from pathlib import Path

import pytest
import torch

from moebench.errors import MoebenchError
from moebench.evaluation.records import (PROMPT_DATA_HEADER, RECORD_COLUMNS, PromptData, append_record,
                                         check_records_file,
                                         prompt_data_path, read_prompt_data, read_prompts, read_records,
                                         record_row, records_path, write_prompt_data)
from moebench.evaluation.score import compute_score
from moebench.modes.evaluate import score_text
from moebench.evaluation.stats import percentile, submodel_report, summarize

# x0..x19, sorted; the tests feed them shuffled.
X = [10, 11, 13, 16, 20, 25, 31, 38, 46, 55, 65, 76, 88, 101, 115, 130, 146, 163, 181, 200]
SHUFFLED = X[1::2] + X[::2][::-1]
# nxdi-semantics §1 for n = 20, by hand:
P50 = 60.0     # (x9 + x10)/2 = (55 + 65)/2
P90 = 164.8    # x17 + 0.1(x18 - x17) = 163 + 0.1·18
P95 = 181.95   # x18 + 0.05(x19 - x18) = 181 + 0.05·19
P99 = 196.39   # x18 + 0.81(x19 - x18) = 181 + 0.81·19
P100 = 200.0   # max
MEAN = 76.5    # 1530 / 20


# ---------------------------------------------------------------- stats

def test_percentiles_match_hand_formulas():
    assert sorted(SHUFFLED) == X and SHUFFLED != X
    for q, want in [(50, P50), (90, P90), (95, P95), (99, P99), (100, P100), (0, 10.0)]:
        assert percentile(SHUFFLED, q) == pytest.approx(want, abs=1e-9)
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summarize():
    s = summarize(SHUFFLED)
    assert (s.runs, s.min, s.max, s.mean) == (20, 10.0, 200.0, pytest.approx(MEAN))
    assert (s.p50, s.p90, s.p95, s.p99, s.p100) == pytest.approx((P50, P90, P95, P99, P100))
    assert summarize([1.0, 3.0]).std == 1.0  # population std
    with pytest.raises(ValueError):
        summarize([])



def test_a_score_below_a_thousandth_is_printed_in_significant_digits_not_as_zero():
    assert [score_text(x) for x in (0.0, 7.35e-06, 0.0123456, 1.23456)] == ["0.0000", "7.350e-06", "0.0123", "1.2346"]

def test_submodel_report_keys_percentiles_and_types():
    r = submodel_report([v / 1000 for v in SHUFFLED], tokens_per_run=640, batch=1, n_runs=20)
    assert list(r) == ["latency_ms_p50", "latency_ms_p90", "latency_ms_p95", "latency_ms_p99", "latency_ms_p100",
                       "latency_ms_avg", "latency_ms_mean", "throughput", "runs"]
    assert [r[f"latency_ms_p{q}"] for q in (50, 90, 95, 99, 100)] == pytest.approx([P50, P90, P95, P99, P100])
    assert r["latency_ms_avg"] == r["latency_ms_mean"] == pytest.approx(MEAN)
    assert r["runs"] == 20 and type(r["runs"]) is int
    assert all(type(v) is float for k, v in r.items() if k != "runs")
    assert json.loads(json.dumps(r)) == r


def test_submodel_report_throughput():
    # e2e: 20 runs of 0.5 s, 640 tokens each, batch 1 -> 20·640 / 10 s
    assert submodel_report([0.5] * 20, 640, 1, 20)["throughput"] == pytest.approx(1280.0)
    # token generation: 2 requests x 3 decode steps of 10 ms, 4 new tokens, batch 2 -> 2·4·2 / 0.06 s
    r = submodel_report([0.01] * 6, tokens_per_run=4, batch=2, n_runs=2)
    assert r["throughput"] == pytest.approx(266.6666667) and r["runs"] == 6
    assert r["latency_ms_p99"] == pytest.approx(10.0)


def test_submodel_report_empty_is_none():
    assert submodel_report([], 640, 1, 20) is None


def test_one_new_token_reports_no_decode_section_and_its_page_renders():
    """One new token: no decode step ran, so token_generation_model is None (as NxDI's report), and neither the
    report nor its page stumble on it."""
    from moebench.evaluation.benchmark import Timings, benchmark_report
    from moebench.report.page import report_section

    t = Timings(e2e=[0.02, 0.03], ttft=[0.02, 0.03], context=[0.019, 0.029], steps=[[], []])
    report = benchmark_report(t, prompt_len=5, new_tokens=1, batch=1)
    assert report["token_generation_model"] is None
    assert report["e2e_model"]["samples_ms"] == [20.0, 30.0] and report["e2e_model"]["runs"] == 2
    assert report["context_encoding_model"]["samples_ms"] == [19.0, 29.0]
    assert "token_generation_model" in report_section("one token", report)
    assert "the base, timed in turn" not in report_section("one token", report)
    base = benchmark_report(Timings(e2e=[0.04], ttft=[0.04], context=[0.039], steps=[[]]), 5, 1, 1)
    page = report_section("with its base", {**report, "reference": base})
    assert "reference e2e_model (the base, timed in turn)" in page and ">40<" in page.replace(".0<", "<")


def test_a_timed_request_leaves_the_objects_from_before_out_of_the_collectors_passes_and_only_while_it_runs():
    """time_request freezes the objects alive when it starts (a full collection over the harness's ~300 thousand
    took ~155 ms, landing on whichever step it fell), collects what its steps leave as before, and unfreezes them
    when it ends, by an error too."""
    import gc

    from moebench.evaluation.benchmark import frozen_gc, time_request

    class Engine:  # the engine's side of a timed request, recording the collector's state
        device, sampling = torch.device("cpu"), None

        def __init__(self):
            self.frozen, self.collected = [], []

        def prefill(self, ids, mask):
            self.frozen.append(gc.get_freeze_count())
            return torch.zeros(1, 4)

        def decode(self, token):
            cycle = []
            cycle.append(cycle)  # garbage only the collector reclaims
            del cycle
            self.collected.append(gc.collect())
            if len(self.collected) == 3:
                raise RuntimeError("a step failed")
            return torch.zeros(1, 4)

        def pick(self, logits):
            return logits.argmax(-1)

    gc.collect()
    ids = torch.ones(1, 3, dtype=torch.long)
    engine = Engine()
    assert time_request(engine, ids, torch.ones_like(ids), 3, None).shape == (1, 3)
    assert engine.frozen[0] > 1000 and gc.get_freeze_count() == 0  # (pytest's and torch's objects, then none)
    assert all(n >= 1 for n in engine.collected)  # each step's cycle collected inside
    with pytest.raises(RuntimeError, match="a step failed"):
        time_request(engine, ids, torch.ones_like(ids), 3, None)
    assert gc.get_freeze_count() == 0
    with frozen_gc():  # the harness timing the reference's own timed request: frozen until the outer one ends
        time_request(Engine(), ids, torch.ones_like(ids), 2, None)
        assert gc.get_freeze_count() > 1000
    assert gc.get_freeze_count() == 0
    gc.freeze()  # a process that froze its objects itself: left frozen
    try:
        before = gc.get_freeze_count()
        time_request(Engine(), ids, torch.ones_like(ids), 2, None)
        assert gc.get_freeze_count() > before // 2 > 500  # left frozen (frozen objects freed meanwhile leave it too)
    finally:
        gc.unfreeze()


def test_the_reference_runs_each_prompt_the_submission_runs_first_and_second_in_turn_while_it_is_paused():
    """checked_benchmark with a reference: every warm-up and timed prompt goes to both, the reference first in every
    other pair (a shared machine's drift slows both alike; the seed's parity picks which, so that an odd number of
    runs favours neither), always under pause(); the caching audit is the submission's alone."""
    import contextlib

    import torch

    from moebench.evaluation.checked import checked_benchmark

    calls = []

    def answer(name):
        def request(ids, mask, n):
            calls.append((name, ids.clone()))
            return torch.zeros(ids.shape[0], n, dtype=torch.int64), {"ttft": 1e-3, "context": 1e-3, "steps": [1e-3]}
        return request

    @contextlib.contextmanager
    def pause():
        calls.append(("pause", None))
        yield
        calls.append(("resume", None))

    ids = torch.arange(1, 7).reshape(1, 6)
    args = (ids, torch.ones_like(ids), 2, 3, 1, 1, 50, (0,), 8)
    t, outputs, audit, ref = checked_benchmark(answer("sub"), *args, reference=answer("ref"), pause=pause)
    pair = ["pause", "ref", "resume", "sub"]
    # then one untimed fresh request (the audit's first is not the one after a pause), then the audit's pair (and
    # a second round's when the first was faster: a matter of chance here)
    audit_calls = ["sub"] * (1 + 2 * len(audit.rounds))
    assert [name for name, _ in calls] == pair + pair + pair[3:] + pair[:3] + pair + audit_calls
    order = [name for name, _ in calls if name in ("ref", "sub")]
    calls.clear()
    checked_benchmark(answer("sub"), *args[:-1], 7, reference=answer("ref"), pause=pause)  # an odd seed: the other
    assert [name for name, _ in calls if name in ("ref", "sub")][:8] == [{"ref": "sub", "sub": "ref"}[n]
                                                                           for n in order[:8]]
    prompts = [p for _, p in calls if p is not None]
    assert all(torch.equal(a, b) for a, b in zip(prompts[0:8:2], prompts[1:8:2]))  # each pair: one fresh prompt
    assert not torch.equal(prompts[2], prompts[4]) and len(ref.e2e) == len(t.e2e) == 3
    assert len(outputs) == 3 + len(audit.rounds)
    calls.clear()
    assert checked_benchmark(answer("sub"), *args)[3] is None and {name for name, _ in calls} == {"sub"}


def test_a_base_measured_beforehand_is_timed_on_fresh_prompts_as_the_submission_is(monkeypatch):
    """reference_benchmark (stored baselines, evaluate_all's prompt data, --isolation none's base): every warm-up
    and timed run gets a fresh prompt of the request's shape, drawn from a private seed, never a special token;
    generate's --benchmark keeps the user's own prompt."""
    import moebench.modes.contest as contest
    from moebench.cli.args import parse_args
    from moebench.modes.setup import device_of, dtype_of, make_request, open_source

    seen, compiled = [], []
    real = contest.answer_request
    monkeypatch.setattr(contest, "answer_request", lambda engine, ids, *a: seen.append(ids.clone()) or
                        real(engine, ids, *a))
    real_time = contest.time_request  # the untimed compile request: the request's own prompt
    monkeypatch.setattr(contest, "time_request", lambda engine, ids, *a: compiled.append((ids.clone(), a[-1])) or
                        real_time(engine, ids, *a))
    run, _ = parse_args(["--mode", "evaluate_single", "--seq-len", "24", "--benchmark-runs", "3",
                         "--warmup-runs", "1"])
    source = open_source(run)
    req = make_request(run, source, run.prompts)
    report = contest.reference_benchmark(run, source, req, device_of(run), dtype_of(run))
    assert len(seen) == 4 and report["e2e_model"]["runs"] == 3 and report["inputs"]["fresh_prompts"] is True
    assert len(compiled) == 1 and torch.equal(compiled[0][0], req.input_ids) and compiled[0][1] is None
    assert all(p.shape == req.input_ids.shape and not torch.equal(p, req.input_ids) for p in seen)
    assert len({tuple(p.flatten().tolist()) for p in seen}) == 4
    tok = source.tokenizer
    special = {*req.eos_ids, req.pad_id, *(i for i in (tok.bos_id, tok.eos_id, tok.pad_id) if i is not None)}
    assert not special & {int(i) for p in seen for i in p.flatten()}
    seen.clear()
    engine = contest.compiled_engine(run, contest.reference_model(run, source, device_of(run), dtype_of(run)), req)
    report = contest.benchmark(run, engine, req, "own")
    assert "inputs" not in report and report["e2e_model"]["runs"] == 3


def test_with_no_warm_up_the_reference_is_still_compiled_before_its_first_timed_run():
    """--warmup-runs 0: the submission compiles in its compile step, so the reference (timed in turn, or
    beforehand) compiles by an untimed request too; its timed runs compile nothing."""
    from torch._dynamo.utils import counters

    import moebench.modes.contest as contest
    from moebench.cli.args import parse_args
    from moebench.modes.setup import device_of, dtype_of, make_request, open_source

    torch._dynamo.reset()
    run, _ = parse_args(["--mode", "evaluate_single", "--seq-len", "24", "--benchmark-runs", "2",
                         "--warmup-runs", "0"])
    source = open_source(run)
    req = make_request(run, source, run.prompts)
    answer = contest.reference_request(run, source, req, device_of(run), dtype_of(run))
    frames = sum(counters["frames"].values())
    assert frames > 0  # compiled already
    answer(req.input_ids.flip(1), req.attention_mask, req.max_new_tokens)
    assert sum(counters["frames"].values()) == frames


# ---------------------------------------------------------------- score

def test_score_hand_example():
    s = compute_score(accuracy=1, base_latency=500.0, base_throughput=100.0, latency=250.0, throughput=200.0,
                      flop_ratio=0.5)
    assert (s.reduced_latency, s.increased_throughput, s.final_score) == (2.0, 2.0, 6.0)
    assert (s.accuracy, s.base_latency, s.base_throughput, s.latency, s.throughput, s.flop_ratio) == \
           (1.0, 500.0, 100.0, 250.0, 200.0, 0.5)


def test_score_accuracy_zero_and_bounds():
    assert compute_score(0, 500.0, 100.0, 250.0, 200.0, 0.5).final_score == 0.0
    assert compute_score(True, 100.0, 10.0, 100.0, 10.0, 0.0).final_score == 1.0
    assert compute_score(1, 100.0, 10.0, 100.0, 10.0, 1.0).final_score == 2.0


@pytest.mark.parametrize("kwargs", [
    dict(accuracy=0.5), dict(accuracy=2), dict(accuracy=math.nan),
    dict(latency=0.0), dict(latency=-1.0), dict(latency=math.inf), dict(latency=math.nan),
    dict(throughput=0.0), dict(base_latency=0.0), dict(base_throughput=-5.0), dict(base_throughput=math.inf),
    dict(flop_ratio=-0.01), dict(flop_ratio=1.01), dict(flop_ratio=math.nan),
])
def test_score_rejects_invalid(kwargs):
    args = dict(accuracy=1, base_latency=500.0, base_throughput=100.0, latency=250.0, throughput=200.0,
                flop_ratio=0.5) | kwargs
    with pytest.raises(ValueError):
        compute_score(**args)


# ---------------------------------------------------------------- score records

SCORE = compute_score(1, 500.0, 100.0, 250.0, 200.0, 0.5)
HEADER_LINE = ",".join(RECORD_COLUMNS)


def test_records_path(tmp_path):
    assert records_path(tmp_path, "t7", "qwen3-30b-a3b") == tmp_path / "t7_qwen3-30b-a3b_score_records.csv"
    assert records_path(tmp_path, None, "tiny") == tmp_path / "tiny_score_records.csv"


def test_record_row():
    row = record_row(None, None, SCORE, when=datetime(2025, 3, 4, 5, 6, 7))
    assert list(row) == RECORD_COLUMNS == [
        "team_id", "member_id", "base_latency", "base_throughput", "accuracy", "latency", "throughput",
        "nki_flop_ratio", "increased_throughput", "reduced_latency", "final_score", "timestamp"]
    assert row["team_id"] == row["member_id"] == ""
    assert row["timestamp"] == "2025-03-04 05:06:07"
    assert (row["accuracy"], row["nki_flop_ratio"], row["final_score"]) == (1, 0.5, 6.0)
    datetime.strptime(record_row("t", "m", SCORE)["timestamp"], "%Y-%m-%d %H:%M:%S")


def test_append_writes_header_once(tmp_path):
    path = tmp_path / "r.csv"
    append_record(path, record_row("team, \"A\"", "m1", SCORE, datetime(2025, 1, 1)))
    append_record(path, record_row(None, None, SCORE, datetime(2025, 1, 2)))
    lines = path.read_text().splitlines()
    assert lines[0] == HEADER_LINE and len(lines) == 3
    rows = read_records(path)
    assert [list(r) for r in rows] == [RECORD_COLUMNS] * 2
    assert rows[0]["team_id"] == 'team, "A"' and rows[1]["team_id"] == ""
    assert float(rows[0]["final_score"]) == 6.0 and rows[1]["timestamp"] == "2025-01-02 00:00:00"


def test_append_after_missing_final_newline(tmp_path):
    path = tmp_path / "r.csv"
    append_record(path, record_row("a", "1", SCORE))
    path.write_bytes(path.read_bytes().rstrip(b"\n"))  # as a hand edit might leave it
    append_record(path, record_row("b", "2", SCORE))
    assert [r["team_id"] for r in read_records(path)] == ["a", "b"]


def test_a_full_disk_leaves_the_records_as_they_were(tmp_path, monkeypatch):
    """A write that fails part way (no space left) is cut back off: no torn row, one clear error."""
    from moebench.evaluation import records

    path = tmp_path / "r.csv"
    append_record(path, record_row("a", "1", SCORE))
    before = path.read_bytes()
    write = os.write

    def half_then_full(fd, data):
        write(fd, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(records.os, "write", half_then_full)
    with pytest.raises(MoebenchError, match="r.csv: No space left on device; the file is as it was"):
        append_record(path, record_row("b", "2", SCORE))
    assert path.read_bytes() == before


def _append_rows(path, worker, start):
    start.wait()
    for i in range(25):
        append_record(Path(path), record_row(f"w{worker}", str(i), SCORE))


def test_concurrent_appends_do_not_interleave(tmp_path):
    path = tmp_path / "r.csv"
    ctx = mp.get_context("fork")
    start = ctx.Event()
    procs = [ctx.Process(target=_append_rows, args=(str(path), w, start)) for w in range(8)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 8
    lines = path.read_text().split("\n")
    assert lines[-1] == "" and lines[0] == HEADER_LINE
    body = lines[1:-1]
    assert len(body) == 200 and HEADER_LINE not in body
    assert all(len(line.split(",")) == len(RECORD_COLUMNS) for line in body)
    rows = read_records(path)
    assert sorted((r["team_id"], int(r["member_id"])) for r in rows) == \
           sorted((f"w{w}", i) for w in range(8) for i in range(25))
    assert all(float(r["final_score"]) == 6.0 for r in rows)


def test_foreign_header_refused_and_untouched(tmp_path):
    path = tmp_path / "r.csv"
    path.write_bytes(b"team,score\r\nx,1\r\n")
    before = path.read_bytes()
    with pytest.raises(MoebenchError, match="r.csv") as e:
        append_record(path, record_row("t", "m", SCORE))
    assert "\n" not in str(e.value)
    assert path.read_bytes() == before
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(MoebenchError):
        append_record(path, record_row("t", "m", SCORE))
    assert path.read_bytes() == b"\xff\xfe\x00garbage"


def test_a_spreadsheets_copy_with_a_bom_and_crlf_is_appended_to(tmp_path):
    path = tmp_path / "r.csv"  # "CSV UTF-8" as a spreadsheet saves it
    path.write_bytes(b"\xef\xbb\xbf" + HEADER_LINE.encode() + b"\r\n")
    check_records_file(path)
    append_record(path, record_row("t", "m", SCORE))
    assert [r["team_id"] for r in read_records(path)] == ["t"]


def test_the_records_files_are_checked_before_the_work(tmp_path):
    """check_records_file refuses, on one line, what append_record and append_json_record would refuse later."""
    check_records_file(tmp_path / "new.csv")  # absent: created at the first append
    (tmp_path / "foreign.csv").write_text("team,score\nx,1\n")
    (tmp_path / "dir.jsonl").mkdir()
    for path, words in [(tmp_path / "foreign.csv", "not a moebench score-record file"),
                        (tmp_path / "dir.csv", "dir.jsonl: not a file"),
                        (tmp_path / "no" / "such.csv", "no such folder")]:
        with pytest.raises(MoebenchError, match=words) as e:
            check_records_file(path)
        assert "\n" not in str(e.value)
    assert (tmp_path / "foreign.csv").read_text() == "team,score\nx,1\n" and not (tmp_path / "new.csv").exists()


def test_read_records_errors(tmp_path):
    with pytest.raises(MoebenchError, match="missing.csv"):
        read_records(tmp_path / "missing.csv")


# ---------------------------------------------------------------- prompt data

ROWS = [PromptData(0, 18, 64, 12498.0, 51.86), PromptData(1, 126, 256, 9432.19, 70.24),
        PromptData(2, 402, 640, 3041.923456789, 217.7412345)]
HEADER = "Prompt ID,Context Length,Sequence Length,Base latency,Base throughput"


def test_prompt_data_round_trip(tmp_path):
    path = tmp_path / "prompt_data_cpu.csv"
    path.write_text("old content")
    write_prompt_data(path, ROWS)
    assert path.read_text().splitlines()[0] == HEADER == ",".join(PROMPT_DATA_HEADER)
    assert read_prompt_data(path) == ROWS
    assert sorted(os.listdir(tmp_path)) == ["prompt_data_cpu.csv"]  # no temp file left


def test_write_prompt_data_refuses_invalid_rows(tmp_path):
    path = tmp_path / "prompt_data_cpu.csv"
    write_prompt_data(path, ROWS)
    before = path.read_bytes()
    with pytest.raises(ValueError):
        write_prompt_data(path, ROWS + [PromptData(0, 1, 2, 3.0, 4.0)])
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["prompt_data_cpu.csv"]


def test_reads_the_original_contest_file(tmp_path):
    # aws-neuron/nki-moe's prompt_data_trn2.csv: spaces after commas, no final newline
    path = tmp_path / "prompt_data_trn2.csv"
    path.write_text("Prompt ID, Context Length, Sequence Length, Base latency, Base throughput\n"
                    "0,18,64,12498,51.86\n1,126,256,9432.19,70.24\n2,43,128,12089.08,54.40\n"
                    "3,10,64,12868.67,50.89\n4,402,640,3041.92,217.74")
    rows = read_prompt_data(path)
    assert len(rows) == 5 and rows[4] == PromptData(4, 402, 640, 3041.92, 217.74)


@pytest.mark.parametrize("content, line", [
    (b"", 1),
    (b"\n \n", 1),
    (b"ID,ctx,seq,lat,thr\n0,18,64,12498,51.86\n", 1),
    (HEADER.encode() + b"\n0,18,64,12498\n", 2),
    (HEADER.encode() + b"\n0,18,64,12498,51.86,7\n", 2),
    (HEADER.encode() + b"\n0,18,64,fast,51.86\n", 2),
    (HEADER.encode() + b"\n0,18.5,64,12498,51.86\n", 2),
    (HEADER.encode() + b"\n0,18,64,12498,51.86\n1,18,64,0,51.86\n", 3),
    (HEADER.encode() + b"\n0,18,64,12498,-1\n", 2),
    (HEADER.encode() + b"\n0,0,64,12498,51.86\n", 2),
    (HEADER.encode() + b"\n0,18,64,inf,51.86\n", 2),
    (HEADER.encode() + b"\n-1,18,64,12498,51.86\n", 2),
    (HEADER.encode() + b"\n0,18,64,12498,51.86\n1,1\xff8,64,1,1\n", 3),
    (HEADER.encode() + b"\n0,18,64,12498,51.86\n\n0,18,64,12498,51.86\n", 4),
])
def test_malformed_prompt_data(tmp_path, content, line):
    path = tmp_path / "prompt_data_cpu.csv"
    path.write_bytes(content)
    with pytest.raises(MoebenchError) as e:
        read_prompt_data(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:{line}:") and "\n" not in msg


def test_prompt_data_path_txt_fallback(tmp_path):
    assert prompt_data_path(tmp_path, "cpu") is None
    (tmp_path / "prompt_data_cpu.txt").write_text(HEADER + "\n0,18,64,12498,51.86\n")
    assert prompt_data_path(tmp_path, "cpu") == tmp_path / "prompt_data_cpu.txt"
    assert read_prompt_data(prompt_data_path(tmp_path, "cpu")) == [PromptData(0, 18, 64, 12498.0, 51.86)]
    (tmp_path / "prompt_data_cpu.csv").write_text(HEADER + "\n")
    assert prompt_data_path(tmp_path, "cpu") == tmp_path / "prompt_data_cpu.csv"
    assert prompt_data_path(tmp_path, "cuda") is None


# ---------------------------------------------------------------- prompts.txt

def test_prompts_blank_line_separation(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n  I believe the meaning of life is  \n\n"
                    "Write a poem\n  about the sea,\nin two lines.\n\n\n\n"
                    "   \n\t\n"
                    "Last one\n")
    assert read_prompts(path) == ["I believe the meaning of life is", "Write a poem\n  about the sea,\nin two lines.",
                                  "Last one"]
    path.write_bytes(b"\xef\xbb\xbfa\r\nb\r\n \r\nc")  # BOM, CRLF, no final newline
    assert read_prompts(path) == ["a\nb", "c"]


def test_prompts_missing(tmp_path):
    with pytest.raises(MoebenchError) as e:
        read_prompts(tmp_path / "prompts.txt")
    assert str(e.value) == (f"prompts.txt not found in {tmp_path}: "
                            "evaluate_all and generate_accuracy_baselines need it")


@pytest.mark.parametrize("content", [b"", b"\n  \n\t\n", b"a prompt \xff\n"])
def test_prompts_empty_or_not_utf8(tmp_path, content):
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    with pytest.raises(MoebenchError) as e:
        read_prompts(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_prompt_data_bases_are_timed_at_the_sequence_length_they_record(monkeypatch):
    """--max-new-tokens below --seq-len: the row's Sequence Length is the prompt and the new tokens, and
    evaluate_all runs the submission there; the base is timed there too (its KV cache and buckets), not at
    --seq-len."""
    import moebench.modes.evaluate as evaluate
    from moebench.cli.args import parse_args
    from moebench.modes.setup import make_request, open_source

    timed = []

    def fake(run, source, req, device, dtype):
        timed.append((run.seq_len, req.input_ids.shape, req.max_new_tokens))
        return {"e2e_model": {"latency_ms_p99": 12.0, "throughput": 34.0}}

    monkeypatch.setattr(evaluate, "reference_benchmark", fake)
    run, _ = parse_args(["--mode", "generate_accuracy_baselines", "--seq-len", "440", "--max-new-tokens", "8"])
    source = open_source(run)
    prompts = ["Hello world", "The sky is blue and the grass is green"]
    reqs = [make_request(run, source, [p]) for p in prompts]
    rows = evaluate.measure_prompt_data(run, source, prompts, reqs)
    lengths = [int(r.attention_mask.sum()) for r in reqs]
    assert [(r.context_length, r.seq_len, r.base_latency) for r in rows] == [(n, n + 8, 12.0) for n in lengths]
    assert [t[0] for t in timed] == [n + 8 for n in lengths] and all(t[2] == 8 for t in timed)
