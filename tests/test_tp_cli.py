"""--tp-degree N on the command line: moebench starts N ranks (gloo on the CPU), each holding its shard; rank 0
alone prints and writes; the result validates against the one-process reference; bad degrees stop with one line."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moebench.cli.args import parse_args
from moebench.cli.main import main
from moebench.errors import MoebenchError
from tests.conftest import error_line

SUBMISSIONS = Path(__file__).parent / "submissions"
SHORT = ["--seq-len", "16", "--prompt", "Hello there", "--torch-dtype", "float32", "--benchmark-runs", "1",
         "--warmup-runs", "0", "--base-latency", "100", "--base-throughput", "100"]


@pytest.mark.usefixtures("in_tmp")
def test_evaluate_single_over_two_ranks(capfd, in_tmp):
    """No base given: each rank times the reference in turn with its submission process, both ranks' submission
    processes stopped at once (their signalling helpers once stopped each other: a hang)."""
    code = main(["--mode", "evaluate_single", "--tp-degree", "2", "--vocab-parallel", "--team-id", "tp",
                 *SHORT[:SHORT.index("--base-latency")]])
    out, err = capfd.readouterr()  # the ranks are processes: their output reaches the file descriptors
    assert code == 0, out + err
    assert out.count("logit validation PASS") == 1  # rank 0 reports, rank 1 keeps quiet
    assert "base" in out and "(reference measured now, alternating with the submission on the same prompts)" in out
    rows = list(csv.reader((in_tmp / "tp_moebench-tiny_score_records.csv").open()))
    assert len(rows) == 2  # the header and one row: rank 1 wrote nothing
    report = json.loads((in_tmp / "benchmark_report.json").read_text())
    assert report["e2e_model"]["runs"] == 1
    check = report["checks"]["mac_count"]  # the ranks' MACs summed against the sharded reference's summed
    assert (check["ranks"], check["factor"], check["share_cap"]) == (2, 1.0, 0.0)


@pytest.mark.usefixtures("in_tmp")
def test_a_failure_one_rank_meets_alone_fails_the_prompt_on_every_rank_and_the_next_runs(capfd, in_tmp,
                                                                                           monkeypatch):
    """Rank 1's kernel formula alone is broken: its FLOP count fails while rank 0's passes (no collective between
    them there). Rank 0 learns of it at its next checkpoint, rather than go on into the MAC counts' collective; the
    prompt fails on both, naming rank 1 and why, is recorded once, and evaluate_all's next prompt runs in step
    (before: rank 0 met rank 1's next prompt in a collective, a traceback, and no second prompt)."""
    monkeypatch.setenv("BROKEN_MACS", "-1")
    monkeypatch.setenv("BROKEN_MACS_RANK", "1")
    (in_tmp / "prompts.txt").write_text("Hello there\n\nWhat is two\n")
    short = SHORT[:SHORT.index("--prompt")] + SHORT[SHORT.index("--prompt") + 2:]
    code = main(["--mode", "evaluate_all", "--tp-degree", "2", "--qwen", str(SUBMISSIONS / "broken_macs.py"),
                 "--team-id", "tp", "--skip-accuracy", "--audit-pairs", "0", *short])
    out, err = capfd.readouterr()
    assert code == 1, out + err
    why = "rank 1: the kernel FLOP count failed: broken_macs.head.default: its MAC count -"
    assert out.count(f"evaluation failed: {why}") == 2 and "== prompt 1" in out and "out of step" not in out + err
    assert f"2 of 2 prompts scored 0 (prompt 0: {why}" in err
    rows = list(csv.DictReader((in_tmp / "tp_moebench-tiny_score_records.csv").open()))
    assert [r["final_score"] for r in rows] == ["0.0", "0.0"]


@pytest.mark.usefixtures("in_tmp")
def test_compile_then_skip_compile_over_two_ranks(capfd, in_tmp):
    """The issue's done-when: compile into DIR over two ranks (sequence parallel, sharded checkpoint), then the same
    command with --skip-compile loads it all without compiling; a run with other flags is refused."""
    args = ["--mode", "evaluate_single", "--tp-degree", "2", "--sequence-parallel-enabled", "--compiled-model-path",
            "DIR", *SHORT]
    assert main(args) == 0  # (--save_sharded_checkpoint: on by default, as in the guide)
    out, err = capfd.readouterr()
    assert "compile: exported 2 graphs" in out and "saved the sharded checkpoint" in out, out + err
    assert "isolation: the submission runs in a process of its own per rank (2, joined by their own gloo group)" \
        in out
    assert os.geteuid() != 0 or " (moebench-sandbox)" in out  # confined where the harness is root
    d = in_tmp / "DIR"
    for r in (0, 1):
        assert (d / "weights" / f"tp{r}_sharded_checkpoint.safetensors").is_file()
        assert (d / f"compiled_code_tp{r}.bin").is_file() and len(list((d / "graphs" / f"tp{r}").iterdir())) == 2
    first = json.loads((in_tmp / "benchmark_report.json").read_text())

    assert main(args + ["--skip-compile"]) == 0
    out, err = capfd.readouterr()
    assert "compile: skipped (--skip-compile); reusing 2 graphs (cte 16, tkg 16), compiled code, sharded weights" \
        in out, out + err
    assert out.count("logit validation PASS") == 1
    second = json.loads((in_tmp / "benchmark_report.json").read_text())
    assert second["compile"]["skipped"] and second["kernel_flops"] == first["kernel_flops"]
    assert second.keys() == first.keys()

    args.remove("--sequence-parallel-enabled")
    assert main(args + ["--skip-compile"]) == 2
    out, err = capfd.readouterr()
    assert "compiled for other flags (sequence_parallel_enabled" in err


def test_a_degree_that_does_not_split_the_heads_is_one_line(capsys):
    assert main(["--mode", "validate", "--tp-degree", "3"]) == 2
    assert "the model's 4 attention heads do not split 3 ways" in error_line(capsys.readouterr().err)


@pytest.mark.usefixtures("in_tmp")
def test_a_broken_submission_over_two_ranks_is_one_line(capfd):
    """Both ranks meet the error: rank 0 prints its line, and the launcher does not repeat rank 1's."""
    broken = Path(__file__).parent / "submissions" / "broken_import.py"
    assert main(["--mode", "validate", "--tp-degree", "2", "--seq-len", "16", "--qwen", str(broken)]) == 2
    line = error_line(capfd.readouterr().err)
    assert "import failed: ImportError: cannot import name 'NoSuchNameForTests'" in line and "rank 1" not in line


@pytest.mark.usefixtures("in_tmp")
def test_a_records_file_only_rank_0_checks_stops_every_rank_with_its_line(capfd):
    """Rank 0 writes the files and checks them before the long work; the other ranks stop with its error (they went
    on alone and broke at their next collective: a traceback and a line blaming rank 1)."""
    Path("moebench-tiny_score_records.csv").write_text("not,a,records,header\n")
    assert main(["--mode", "evaluate_single", "--tp-degree", "2", *SHORT]) == 2
    line = error_line(capfd.readouterr().err)
    assert "moebench-tiny_score_records.csv is not a moebench score-record file" in line and "rank 1" not in line
    assert Path("moebench-tiny_score_records.csv").read_text() == "not,a,records,header\n"


@pytest.mark.usefixtures("in_tmp")
def test_a_rank_that_ended_before_rank_0_failed_is_named(monkeypatch, capsys):
    """A failure only rank 1 met ends it quietly (it prints nothing), and rank 0's next collective breaks: the line
    names rank 1's end, where the cause is."""
    from moebench.engine import parallel as engine_parallel

    broken = "Traceback (most recent call last):\nRuntimeError: [pair.cc:553] Connection closed by peer\n"
    why = "exit code 1: evaluation failed: the submission's process died during the FLOP count (exit code -9)"

    def ranks(fn, world, argv):  # as run_parallel ends then
        raise engine_parallel.RankFailed("1 rank(s) of 2 failed", [(0, broken)], None, {1: why})

    monkeypatch.setattr(engine_parallel, "run_parallel", ranks)
    assert main(["--mode", "validate", "--tp-degree", "2", "--seq-len", "16"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == ("moebench: error: --tp-degree 2: rank 0 failed: RuntimeError: [pair.cc:553] Connection closed by "
                    f"peer; rank 1 had ended before ({why})")


def test_parallel_only_flags_note_that_one_process_ignores_them():
    _, notes = parse_args(["--mode", "validate", "--vocab-parallel", "--rpl-reduce-dtype", "float32"])
    assert any("--vocab-parallel has no effect with --tp-degree 1" in n for n in notes)
    assert any("--rpl-reduce-dtype has no effect with --tp-degree 1" in n for n in notes)
    _, notes = parse_args(["--mode", "validate", "--sequence-parallel-enabled"])
    assert any("--sequence-parallel-enabled has no effect with --tp-degree 1" in n for n in notes)


def test_under_torchrun_the_degree_defaults_to_its_ranks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert parse_args(["--mode", "validate"])[0].tp_degree == 2
    assert parse_args(["--mode", "validate", "--tp-degree", "2"])[0].tp_degree == 2
    with pytest.raises(MoebenchError, match="--tp-degree 1 but torchrun started 2 ranks"):
        parse_args(["--mode", "validate", "--tp-degree", "1"])
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(MoebenchError, match="WORLD_SIZE='two'"):
        parse_args(["--mode", "validate"])


def test_torchrun_starts_the_ranks(tmp_path):
    """Under torchrun each process joins torchrun's group (gloo on the CPU) and runs the mode; rank 0 reports.
    Without --tp-degree, the degree is torchrun's number of ranks."""
    main_py = Path(__file__).resolve().parents[1] / "main.py"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(main_py), "--mode", "validate", "--seq-len", "10", "--prompt",
                           "Hello there", "--torch-dtype", "float32"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("logit validation PASS") == 1
