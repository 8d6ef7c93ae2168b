"""Every mode end to end on the embedded model, in a temporary working folder: the files each one writes (names,
headers, keys), the numbers that must agree between them, and the one-line refusals of bad input."""

import contextlib
import csv
import io
import json
import shutil
from datetime import datetime
from pathlib import Path

import pytest
import torch

from moebench.cli.args import DEFAULT_PROMPT
from moebench.cli.main import main
from moebench.model.loader import open_model
from tests.conftest import error_line

pytestmark = pytest.mark.usefixtures("in_tmp", "one_thread")

TINY = ["--seq-len", "20", "--benchmark-runs", "2", "--warmup-runs", "1"]
PROMPTS_TXT = "Hello world\n\nThe quick brown fox\njumps over\n\n\nOnce upon a time\n"
PROMPTS = ["Hello world", "The quick brown fox\njumps over", "Once upon a time"]
RECORD_COLUMNS = ["team_id", "member_id", "base_latency", "base_throughput", "accuracy", "latency", "throughput",
                  "nki_flop_ratio", "increased_throughput", "reduced_latency", "final_score", "timestamp"]
PROMPT_DATA_HEADER = "Prompt ID,Context Length,Sequence Length,Base latency,Base throughput"
MODEL = "moebench-tiny"
RECORDS = f"{MODEL}_score_records.csv"
SECTIONS = ("e2e_model", "context_encoding_model", "token_generation_model")
LATENCY_KEYS = [f"latency_ms_{k}" for k in ("p50", "p90", "p95", "p99", "p100", "avg", "mean")]




def invoke(*argv) -> tuple[int, str, str]:
    """main(argv) in-process; (exit code, stdout, stderr). Works in module-scoped fixtures too (no capsys)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()




def n_tokens(text: str) -> int:
    return len(open_model(None).tokenizer.encode(text))


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def check_record(row: dict, team: str = "", member: str = "") -> None:
    """One score-record row: its own numbers agree with the score formula."""
    assert row["team_id"] == team and row["member_id"] == member
    f = {k: float(row[k]) for k in RECORD_COLUMNS[2:-1]}
    assert f["reduced_latency"] == pytest.approx(f["base_latency"] / f["latency"], rel=1e-12)
    assert f["increased_throughput"] == pytest.approx(f["throughput"] / f["base_throughput"], rel=1e-12)
    assert f["final_score"] == pytest.approx(
        f["accuracy"] * f["reduced_latency"] * f["increased_throughput"] * (1 + f["nki_flop_ratio"]), rel=1e-12)
    datetime.strptime(row["timestamp"], "%Y-%m-%d %H:%M:%S")


def check_report(report: dict, prompt_len: int, seq_len: int, runs: int) -> None:
    for name in SECTIONS:
        section = report[name]
        for key in LATENCY_KEYS + ["throughput", "runs"]:
            assert key in section, (name, key)
        assert section["latency_ms_avg"] == section["latency_ms_mean"]
        p = [section[f"latency_ms_p{q}"] for q in (50, 90, 95, 99, 100)]
        assert p == sorted(p) and p[0] > 0
    e2e = report["e2e_model"]
    for key in ("generated_tokens_per_s", "ttft_ms_p50", "ttft_ms_p99"):
        assert key in e2e
    assert e2e["runs"] == report["context_encoding_model"]["runs"] == runs
    # throughput = runs·tokens·batch / Σlatencies, i.e. tokens / mean latency at batch 1; e2e counts the prompt too
    assert e2e["throughput"] == pytest.approx(seq_len / (e2e["latency_ms_avg"] / 1000), rel=1e-6)
    ctx = report["context_encoding_model"]
    assert ctx["throughput"] == pytest.approx(prompt_len / (ctx["latency_ms_avg"] / 1000), rel=1e-6)
    assert e2e["generated_tokens_per_s"] == pytest.approx(
        (seq_len - prompt_len) / (e2e["latency_ms_avg"] / 1000), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# generate_accuracy_baselines, then evaluate_all on what it wrote


@pytest.fixture(scope="module")
def baselines(tmp_path_factory):
    """A folder with prompts.txt (3 prompts, one on two lines) and what generate_accuracy_baselines wrote."""
    folder = tmp_path_factory.mktemp("baselines")
    (folder / "prompts.txt").write_text(PROMPTS_TXT)
    with contextlib.chdir(folder):
        code, out, err = invoke("--mode", "generate_accuracy_baselines", *TINY)
    assert code == 0, err
    return folder, out


@pytest.fixture
def copy_of(tmp_path, monkeypatch):
    """A copy of the baselines folder, made the working folder."""
    def make(src: Path) -> Path:
        dst = tmp_path / "copy"
        shutil.copytree(src, dst)
        monkeypatch.chdir(dst)
        return dst
    return make


def test_generate_accuracy_baselines_writes_logits_and_prompt_data(baselines):
    folder, out = baselines
    for i, prompt in enumerate(PROMPTS):
        L = n_tokens(prompt)
        logits = torch.load(folder / f"expected_logits_{i}.pt", weights_only=True)
        assert type(logits) is torch.Tensor and logits.dtype == torch.float32
        assert logits.shape == (20 - L, 1, 4096)
        # the scores greedy chose from: EOS (id 0, banned at every step as the original's min_new_tokens) at -inf
        assert torch.isfinite(logits[..., 1:]).all() and bool((logits[..., 0] == float("-inf")).all())
        meta = json.loads((folder / f"expected_logits_{i}.json").read_text())
        assert set(meta) == {"model", "weights_hash", "prompt_ids", "dtype", "seq_len", "new_tokens",
                             "moebench_version", "tp_degree", "eos_ids", "base"}
        assert meta["model"] == MODEL and meta["dtype"] == "bfloat16" and meta["tp_degree"] == 1
        assert meta["eos_ids"] == [0]
        assert meta["seq_len"] == 20 and meta["new_tokens"] == 20 - L
        assert meta["prompt_ids"] == [open_model(None).tokenizer.encode(prompt)]
    text = (folder / "prompt_data_cpu.csv").read_text()
    assert text.splitlines()[0] == PROMPT_DATA_HEADER
    rows = list(csv.reader(text.splitlines()[1:]))
    assert len(rows) == 3
    for i, (row, prompt) in enumerate(zip(rows, PROMPTS)):
        assert [int(c) for c in row[:3]] == [i, n_tokens(prompt), 20]
        assert float(row[3]) > 0 and float(row[4]) > 0
        # the base written beside each prompt's logits, named in their metadata
        assert json.loads((folder / f"expected_logits_{i}.json").read_text())["base"] == [float(c) for c in row[3:]]
    assert "prompt data: " in out


def test_evaluate_all_on_the_baselines(baselines, copy_of):
    folder = copy_of(baselines[0])
    code, out, err = invoke("--mode", "evaluate_all", *TINY)
    assert code == 0, err
    assert "expected logits: stored" in out
    assert "expected logits: computed" not in err
    for i, prompt in enumerate(PROMPTS):
        report = json.loads((folder / f"benchmark_report_{i}.json").read_text())
        check_report(report, n_tokens(prompt), 20, runs=2)
        assert report["kernel_flops"]["nki_flop_ratio"] == 0.0
    header, rows = read_csv(folder / RECORDS)
    assert header == RECORD_COLUMNS
    assert len(rows) == 3
    with open(folder / "prompt_data_cpu.csv", newline="") as f:
        data = list(csv.DictReader(f))
    for row, base in zip(rows, data):
        check_record(row)
        assert row["accuracy"] == "1"
        assert float(row["base_latency"]) == float(base["Base latency"])
        assert float(row["base_throughput"]) == float(base["Base throughput"])
    totals = [line for line in out.splitlines() if line.startswith("total score")]
    assert len(totals) == 1
    printed = float(totals[0].rsplit(":", 1)[1])
    # printed with 4 decimals: equal to the rows' sum up to that rounding
    assert abs(printed - sum(float(r["final_score"]) for r in rows)) <= 0.5e-4 + 1e-9


def test_baselines_of_fewer_new_tokens_are_what_evaluate_all_then_runs(tmp_path, monkeypatch):
    """generate_accuracy_baselines --max-new-tokens 2: prompt_data's Sequence Length is the prompt and the 2 tokens
    timed and stored, so evaluate_all (without the flag) generates those 2, checked against the stored logits. The
    buckets and --max-context-length given for --seq-len are capped to that shorter run (they stopped it, after the
    expected logits were written)."""
    monkeypatch.chdir(tmp_path)
    Path("prompts.txt").write_text("Hello world\n")
    fits_seq_len = ["--token-generation-buckets", "12", "20", "--max-context-length", "16"]
    code, out, err = invoke("--mode", "generate_accuracy_baselines", *TINY, "--max-new-tokens", 2, *fits_seq_len)
    assert code == 0, err
    L = n_tokens("Hello world")
    with open("prompt_data_cpu.csv", newline="") as f:
        (row,) = csv.DictReader(f)
    assert (int(row["Context Length"]), int(row["Sequence Length"])) == (L, L + 2)
    code, out, err = invoke("--mode", "evaluate_all", "--benchmark-runs", "1", "--audit-pairs", "0", *fits_seq_len)
    assert code == 0, err
    assert "expected logits: stored" in out
    assert json.loads(Path("benchmark_report_0.json").read_text())["config"]["new_tokens"] == 2
    # fewer new tokens asked for: not run (the base was timed over 2), and said; a base given replaces its number
    code, out, err = invoke("--mode", "evaluate_all", "--benchmark-runs", "1", "--audit-pairs", "0",
                            "--max-new-tokens", "1", "--base-latency", "50")
    assert code == 0, err
    assert "note: --max-new-tokens 1 has no effect: each prompt generates up to the Sequence Length of " \
        "prompt_data_cpu.csv" in out
    assert json.loads(Path("benchmark_report_0.json").read_text())["config"]["new_tokens"] == 2
    assert "base 50.00 ms (latency given; throughput: prompt_data_cpu.csv)" in out
    last = json.loads(Path(RECORDS).with_suffix(".jsonl").read_text().splitlines()[-1])["base"]
    assert last == {"latency": 50.0, "throughput": float(row["Base throughput"]),
                    "origin": "latency given; throughput: prompt_data_cpu.csv"}


def test_evaluate_single_uses_the_stored_baseline_of_its_prompt(baselines, copy_of):
    folder = copy_of(baselines[0])
    # Files that only start like the harness's are not its own: not read, not in the way.
    shutil.copy(folder / "expected_logits_1.json", folder / "expected_logits_1.bak.json")
    (folder / "expected_logits_notes.json").write_text("not json")
    code, out, err = invoke("--mode", "evaluate_single", "--prompt", PROMPTS[1], *TINY)
    assert code == 0, err
    assert "expected logits: stored" in out and "prompt_data_cpu.csv, prompt 1" in out
    with open(folder / "prompt_data_cpu.csv", newline="") as f:
        stored = list(csv.DictReader(f))[1]
    _, rows = read_csv(folder / RECORDS)
    assert float(rows[-1]["base_latency"]) == float(stored["Base latency"])
    assert float(rows[-1]["base_throughput"]) == float(stored["Base throughput"])
    # a row of another Context Length was timed for another prompt: not this one's base (the reference is timed)
    lines = (folder / "prompt_data_cpu.csv").read_text().splitlines(keepends=True)
    cells = lines[2].split(",")
    lines[2] = ",".join([cells[0], str(int(cells[1]) + 1), *cells[2:]])
    (folder / "prompt_data_cpu.csv").write_text("".join(lines))
    code, out, err = invoke("--mode", "evaluate_single", "--prompt", PROMPTS[1], *TINY)
    assert code == 0 and "expected logits: stored" in out and "prompt_data_cpu.csv, prompt 1" not in out, out + err


def test_stored_logits_of_other_weights_are_refused(baselines, copy_of):
    folder = copy_of(baselines[0])
    meta_path = folder / "expected_logits_2.json"  # the last prompt's: found before prompts 0 and 1 are evaluated
    meta = json.loads(meta_path.read_text())
    meta["weights_hash"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    code, out, err = invoke("--mode", "evaluate_all", *TINY)
    assert code == 2
    line = error_line(err)
    assert "expected_logits_2.pt" in line and "weights_hash" in line
    assert "== prompt 0" not in out and not (folder / RECORDS).exists()
    assert not (folder / "benchmark_report_0.json").exists()


def test_a_prompt_too_long_stops_the_baselines_before_any_is_rewritten(baselines, copy_of):
    folder = copy_of(baselines[0])
    def files():  # (equal logits computed again would be equal bytes: the time they were written tells)
        return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir() if p.name != "prompts.txt"}
    before = files()
    with open(folder / "prompts.txt", "a") as f:
        f.write("\n" + " ".join(["word"] * 40) + "\n")  # prompt 3 does not fit --seq-len 20
    code, out, err = invoke("--mode", "generate_accuracy_baselines", *TINY)
    assert code == 2 and "prompts.txt, prompt 3: the prompt is" in error_line(err), err
    assert files() == before


def test_baselines_stopped_before_the_end_leave_the_last_whole_runs_files(baselines, copy_of, monkeypatch):
    """Stopped while it times the reference (Ctrl-C), a float32 run of generate_accuracy_baselines has written
    nothing: the bfloat16 run's logits, metadata and bases stay together (its new logits beside the old bases
    were scored by evaluate_all float32 against bases timed in bfloat16)."""
    from moebench.modes import validate

    folder = copy_of(baselines[0])
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(validate, "measure_prompt_data", interrupted)
    code, out, err = invoke("--mode", "generate_accuracy_baselines", *TINY, "--torch-dtype", "float32")
    assert code == 130 and "moebench: interrupted" in err
    assert "prompt 2: " in out  # stopped after computing every prompt's expected logits
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_expected_logits_stopped_while_written_are_refused_not_trusted(baselines, copy_of, monkeypatch):
    """save_expected removes the old metadata before it writes the logits: stopped there, what is left is logits no
    metadata vouches for, refused by name (not new logits under another run's metadata)."""
    from moebench.evaluation import expected

    folder = copy_of(baselines[0])

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(expected, "write_whole", interrupted)
    with pytest.raises(KeyboardInterrupt):
        expected.save_expected(folder, 0, torch.zeros(1, 1, 4), None)
    assert not (folder / "expected_logits_0.json").exists() and (folder / "expected_logits_0.pt").exists()
    code, out, err = invoke("--mode", "evaluate_all", *TINY)
    assert code == 2 and "expected_logits_0.pt has no metadata file expected_logits_0.json" in error_line(err), err


def test_bases_other_than_those_written_with_the_expected_logits_are_refused(baselines, copy_of):
    """Each expected_logits_{i}.json names the base written with it: prompt data from another run beside it (one
    stopped between the files, say) is refused by name, as evaluate_all would score against another run's bases."""
    folder = copy_of(baselines[0])
    lines = (folder / "prompt_data_cpu.csv").read_text().splitlines(keepends=True)
    cells = lines[2].split(",")
    lines[2] = ",".join([*cells[:3], repr(2 * float(cells[3])), *cells[4:]])
    (folder / "prompt_data_cpu.csv").write_text("".join(lines))
    code, out, err = invoke("--mode", "evaluate_all", *TINY)
    assert code == 2 and "prompt_data_cpu.csv: prompt 1's base is " in error_line(err), err
    assert "expected_logits_1.json): the two come from different runs" in error_line(err)


def test_stored_logits_of_another_dtype_are_refused(baselines, copy_of):
    copy_of(baselines[0])
    code, out, err = invoke("--mode", "evaluate_all", *TINY, "--torch-dtype", "float32")
    assert code == 2
    line = error_line(err)
    assert "expected_logits_0.pt" in line and "dtype" in line


# ---------------------------------------------------------------------------------------------------------------
# evaluate_all: prompt_data measured when missing, refusals


def test_evaluate_all_measures_missing_prompt_data_and_names_records_by_team(in_tmp):
    (in_tmp / "prompts.txt").write_text("Hello world\n")
    code, out, err = invoke("--mode", "evaluate_all", *TINY, "--torch-dtype", "float32", "--skip-accuracy",
                            "--team-id", "T")
    assert code == 0, err
    measuring = [line for line in out.splitlines() if "measuring" in line]
    assert len(measuring) == 1 and "prompt_data_cpu.csv" in measuring[0] and "writing" in measuring[0]
    lines = (in_tmp / "prompt_data_cpu.csv").read_text().splitlines()
    assert lines[0] == PROMPT_DATA_HEADER and len(lines) == 2
    assert not (in_tmp / RECORDS).exists()
    header, rows = read_csv(in_tmp / f"T_{RECORDS}")
    assert header == RECORD_COLUMNS and len(rows) == 1
    check_record(rows[0], team="T")
    assert (in_tmp / "benchmark_report_0.json").is_file()


def test_a_records_file_that_cannot_take_the_record_stops_before_the_work(in_tmp):
    """Found after the evaluation, the run's score was lost: now the records are checked first."""
    (in_tmp / "prompts.txt").write_text("Hello world\n")
    (in_tmp / RECORDS).write_text("team,score\nfoo,1\n")  # not a score-record file
    for mode in ("evaluate_single", "evaluate_all"):
        code, out, err = invoke("--mode", mode, *TINY, "--skip-accuracy")
        assert code == 2 and f"{RECORDS} is not a moebench score-record file" in error_line(err), err
    code, out, err = invoke("--mode", "evaluate_single", *TINY, "--skip-accuracy", "--team-id", "no/such")
    assert code == 2 and "would not name a file in the working folder" in error_line(err), err
    assert (in_tmp / RECORDS).read_text() == "team,score\nfoo,1\n"
    assert sorted(p.name for p in in_tmp.iterdir()) == sorted(["prompts.txt", RECORDS])  # no report, no prompt data


def test_evaluate_all_without_prompts_txt_is_one_line(in_tmp):
    code, out, err = invoke("--mode", "evaluate_all", *TINY)
    assert code == 2
    assert "prompts.txt" in error_line(err)


def test_evaluate_all_with_prompt_data_of_other_length_is_one_line(in_tmp):
    (in_tmp / "prompts.txt").write_text(PROMPTS_TXT)
    (in_tmp / "prompt_data_cpu.csv").write_text(f"{PROMPT_DATA_HEADER}\n0,2,20,10.0,50.0\n1,5,20,10.0,50.0\n")
    code, out, err = invoke("--mode", "evaluate_all", *TINY)
    assert code == 2
    line = error_line(err)
    assert "prompt_data_cpu.csv" in line and "3 prompts" in line


# ---------------------------------------------------------------------------------------------------------------
# evaluate_single


def test_evaluate_single_given_base(in_tmp):
    code, out, err = invoke("--mode", "evaluate_single", *TINY, "--team-id", "a", "--member-id", "b",
                            "--base-latency", 100, "--base-throughput", 50)
    assert code == 0, err
    report = json.loads((in_tmp / "benchmark_report.json").read_text())
    L = n_tokens(DEFAULT_PROMPT)
    check_report(report, L, 20, runs=2)
    header, rows = read_csv(in_tmp / f"a_{RECORDS}")
    assert header == RECORD_COLUMNS and len(rows) == 1
    row = rows[0]
    check_record(row, "a", "b")
    assert row["accuracy"] == "1" and float(row["nki_flop_ratio"]) == 0.0
    assert float(row["base_latency"]) == 100 and float(row["base_throughput"]) == 50
    e2e = report["e2e_model"]
    assert float(row["latency"]) == e2e["latency_ms_p99"] and float(row["throughput"]) == e2e["throughput"]
    lines = out.splitlines()
    assert any(line.startswith("accuracy:") and "PASS" in line for line in lines), out
    final = [line for line in lines if line.startswith("final score:")]
    assert len(final) == 1
    assert float(final[0].split(":")[1]) == pytest.approx(float(row["final_score"]), abs=0.5e-4)


def test_evaluate_single_skip_accuracy_measures_the_base(in_tmp):
    code, out, err = invoke("--mode", "evaluate_single", *TINY, "--torch-dtype", "float32", "--skip-accuracy")
    assert code == 0, err
    assert any(line.startswith("accuracy:") and "not checked" in line for line in out.splitlines()), out
    assert "expected logits" not in err
    header, rows = read_csv(in_tmp / RECORDS)
    assert header == RECORD_COLUMNS and len(rows) == 1
    check_record(rows[0])
    assert rows[0]["accuracy"] == "1"
    # the base: the reference timed alternating with the submission, on its prompts, by the same clock
    reference = json.loads((in_tmp / "benchmark_report.json").read_text())["reference"]["e2e_model"]
    assert reference["runs"] == 2 and "alternating with the submission on the same prompts" in out
    assert float(rows[0]["base_latency"]) == reference["latency_ms_p99"] > 0
    assert float(rows[0]["base_throughput"]) == reference["throughput"] > 0


# ---------------------------------------------------------------------------------------------------------------
# validate, generate --benchmark


def test_validate_passes(in_tmp):
    code, out, err = invoke("--mode", "validate", "--seq-len", 16)
    assert code == 0, err
    assert "PASS" in out
    # on the CPU the reference computes the expected logits while the submission's process compiles
    assert out.index("expected logits: computed by the reference model") < out.index("compile: ")


def test_validate_batch_of_two(in_tmp):
    code, out, err = invoke("--mode", "validate", "--seq-len", 16, "--prompt", "a", "--prompt", "b b")
    assert code == 0, err
    assert "PASS" in out
    assert "expected text [1]" in out


def test_generate_benchmark_writes_the_report(in_tmp):
    code, out, err = invoke("--mode", "generate", "--benchmark", "--max-new-tokens", 4, "--seq-len", 16,
                            "--benchmark-runs", 2, "--warmup-runs", 1, "--torch-dtype", "float32")
    assert code == 0, err
    report = json.loads((in_tmp / "benchmark_report.json").read_text())
    L = n_tokens(DEFAULT_PROMPT)
    check_report(report, L, L + 4, runs=2)
    assert report["config"]["new_tokens"] == 4
    assert any(line.startswith("benchmark: ") for line in out.splitlines())
