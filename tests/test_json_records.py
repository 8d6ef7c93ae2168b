"""The JSON-lines records: one line per evaluation with its provenance, beside the CSV; appends from concurrent
writers never interleave, and a line torn by a writer killed mid-write loses nothing else."""

import json
import multiprocessing as mp

import pytest

from moebench.evaluation.records import append_json_record, read_json_records
from tests.conftest import run_cli


def _writer(path, writer: int, n: int):
    for i in range(n):
        append_json_record(path, {"writer": writer, "i": i, "pad": "x" * 5000})  # larger than one pipe buffer


def test_concurrent_writers_never_interleave(tmp_path):
    path = tmp_path / "r.jsonl"
    procs = [mp.get_context("fork").Process(target=_writer, args=(path, w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    records, torn = read_json_records(path)
    assert torn == 0 and len(records) == 100
    assert sorted((r["writer"], r["i"]) for r in records) == [(w, i) for w in range(4) for i in range(25)]


def test_a_torn_line_loses_nothing_else(tmp_path):
    path = tmp_path / "r.jsonl"
    append_json_record(path, {"i": 0})
    with open(path, "ab") as f:  # a writer killed in the middle of its line
        f.write(b'{"i": 1, "half of a rec')
    append_json_record(path, {"i": 2})
    records, torn = read_json_records(path)
    assert [r["i"] for r in records] == [0, 2] and torn == 1


def test_numbers_json_has_not_are_written_as_null(tmp_path):
    path = tmp_path / "r.jsonl"  # a failed evaluation's latency is NaN: Python writes NaN, other readers refuse it
    append_json_record(path, {"score": {"latency": float("nan"), "throughput": 0.0}, "x": [float("inf"), 1.5]})
    line = path.read_text()
    assert "NaN" not in line and "Infinity" not in line
    assert json.loads(line) == {"score": {"latency": None, "throughput": 0.0}, "x": [None, 1.5]}


@pytest.mark.usefixtures("in_tmp", "one_thread")
def test_evaluate_writes_a_record_with_its_provenance(capsys, in_tmp):
    code, out, err = run_cli(capsys, "--mode", "evaluate_single", "--seq-len", "12", "--prompt", "Hello there",
                             "--benchmark-runs", "1", "--warmup-runs", "0", "--base-latency", "10",
                             "--base-throughput", "10", "--team-id", "t1", "--tol-map", "{None: (1e-5, 0.05)}")
    assert code == 0, out + err
    (record,), torn = read_json_records(in_tmp / "t1_moebench-tiny_score_records.jsonl")
    assert torn == 0
    p = record["provenance"]
    assert len(p["module_sha256"]) == 64 and p["model"] == "moebench-tiny" and len(p["weights_hash"]) == 64
    assert p["torch"] and p["triton"] and p["device"].startswith("cpu") and p["flags"]["team_id"] == "t1"
    assert record["score"]["final_score"] > 0 and record["report"]["e2e_model"]["runs"] == 1
    assert "logit validation PASS" in record["validation"]
    json.dumps(record)  # plain JSON all the way down


def test_a_killed_evaluation_leaves_every_earlier_record_intact(in_tmp):
    """evaluate_all over three prompts, killed (SIGKILL, with the submission's process) once the first prompt's
    records are written: both records files still hold that record whole, and the next evaluation appends."""
    import csv
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    (in_tmp / "prompts.txt").write_text("Hello world\n\nOnce upon a time\n\nThe quick brown fox\n")
    (in_tmp / "prompt_data_cpu.csv").write_text("Prompt ID,Context Length,Sequence Length,Base latency,"
                                                "Base throughput\n0,3,14,100,100\n1,4,14,100,100\n2,4,14,100,100\n")
    argv = [sys.executable, str(Path(__file__).parents[1] / "main.py"), "--mode", "evaluate_all", "--skip-accuracy",
            "--benchmark-runs", "1", "--warmup-runs", "0", "--audit-pairs", "1"]
    jsonl, csv_path = in_tmp / "moebench-tiny_score_records.jsonl", in_tmp / "moebench-tiny_score_records.csv"
    proc = subprocess.Popen(argv, cwd=in_tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (jsonl.is_file() and read_json_records(jsonl)[0]) and time.time() < deadline:
            assert proc.poll() is None, "the evaluation ended before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the harness and its submission process
        proc.wait()
    records, torn = read_json_records(jsonl)
    assert len(records) >= 1 and torn == 0 and records[0]["prompt_index"] == 0
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == len(records)
    assert float(rows[0]["final_score"]) == pytest.approx(records[0]["score"]["final_score"])
    append_json_record(jsonl, {"after": True})  # the files stay usable
    assert read_json_records(jsonl)[0][-1] == {"after": True}


@pytest.mark.usefixtures("in_tmp", "one_thread")
def test_a_report_that_cannot_be_written_after_the_evaluation_loses_no_score(capsys, in_tmp, monkeypatch):
    """A folder put in the report's place during the run (past the check before the long work): the score is
    recorded first, then the report's failure is one line and exit 2, with no temporary file left."""
    import os

    import moebench.modes.evaluate as evaluate
    from moebench.evaluation.records import read_records

    real = evaluate.write_json
    monkeypatch.setattr(evaluate, "write_json", lambda path, data: path.mkdir() or real(path, data))
    code, out, err = run_cli(capsys, "--mode", "evaluate_single", "--seq-len", "12", "--prompt", "Hello there",
                             "--benchmark-runs", "1", "--base-latency", "10", "--base-throughput", "10",
                             "--isolation", "none")
    assert code == 2 and "benchmark_report.json: Is a directory" in err and err.count("\n") == 1, out + err
    assert len(read_records(in_tmp / "moebench-tiny_score_records.csv")) == 1
    assert not [p for p in os.listdir(in_tmp) if p.endswith(".tmp")]
