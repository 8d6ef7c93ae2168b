"""Contestant modules that cannot work are refused with one line naming the file (exit 2), and `--qwen` finds the
module as CONTRACTS.md says: NAME.py in the working folder first, the shipped template for the default `qwen`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import error_line, run_cli as run

pytestmark = pytest.mark.usefixtures("in_tmp", "one_thread")

SUBMISSIONS = Path(__file__).resolve().parent / "submissions"
TEMPLATE = Path(__file__).resolve().parents[1] / "moebench" / "contest" / "qwen.py"
FAST = ["--mode", "validate", "--seq-len", "16", "--torch-dtype", "float32"]


def test_each_submission_process_starts_clean_with_the_environment_of_its_start(capsys, monkeypatch):
    """Without CUDA the submission's processes fork from a server that started with the first of them: each one
    still gets the harness's environment as it is when that process starts, as a spawned one would, holds no tensor
    of the harness's in shared memory (its request came as bytes) and no descriptor but its pipe (not the resource
    tracker's, not the fork server's). Forked, it has the server's answers to Inductor's checks of the CPU's vector
    sets and checks none itself (each is a Python process loading a test library: ~2.6 s of every evaluation), and
    has moebench's C++ CPU operators loaded from the harness's cache (a confined one built them in its own) and
    Inductor's compile_fx imported."""
    from multiprocessing import connection

    import torch

    from moebench.model import cpu_ops
    from moebench.modes.sandbox import _start_method

    forks = not torch.cuda.is_available() and not connection.arbitrary_address("AF_UNIX").startswith("\0")
    assert _start_method().get_start_method() == ("forkserver" if forks else "spawn")
    for value in ("first", "second"):
        monkeypatch.setenv("MOEBENCH_TEST_ECHO", value)
        code, out, err = run(capsys, *FAST, "--qwen", SUBMISSIONS / "broken_env_echo.py")
        assert code == 2 and "Qwen3MoeForCausalLM" in error_line(err), err
        assert f"echo: {value}" in out and "shared tensors: 0" in out and "descriptors: 1" in out, out
        assert ("vector sets checked: 0" in out) == forks, out
        assert ("C++ CPU operators loaded: True" in out) == (forks and cpu_ops.load()), out
        assert ("compile_fx imported: True" in out) == forks, out


def _python(code: str, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], env={**environ, **env}, capture_output=True, text=True,
                          timeout=120)


def test_a_process_whose_environment_says_where_triton_runs_does_not_ask_for_cuda_on_import():
    """Asking starts the GPU driver (its descriptors open): a spawned submission process imports moebench before
    it closes what it inherited. The harness's import writes the answer into the environment its children get."""
    import torch

    asked = ("import torch\ntorch.cuda.is_available = lambda: (_ for _ in ()).throw(AssertionError('asked'))\n"
             "import moebench, os\nprint(os.environ['TRITON_INTERPRET'])")
    done = _python(asked, TRITON_INTERPRET="0")
    assert done.returncode == 0 and done.stdout.split() == ["0"], done.stderr
    done = _python("import moebench, os\nprint(os.environ['TRITON_INTERPRET'])")  # unset: decided here
    assert done.returncode == 0 and done.stdout.split() == ["0" if torch.cuda.is_available() else "1"], done.stderr


def test_a_submission_process_keeps_the_gpu_drivers_descriptors_and_closes_the_rest(tmp_path):
    """_close_inherited keeps the driver's files (/dev/nvidia*; /dev/null stands in for them here) and the pipe."""
    code = f"""
import os
from moebench.modes import sandbox
sandbox.DRIVER_FILES = ("/dev/null",)
r, w = os.pipe()
driver, other = os.open("/dev/null", os.O_RDONLY), os.open({str(tmp_path / "f")!r}, os.O_CREAT | os.O_RDONLY)
sandbox._close_inherited(type("Conn", (), {{"fileno": lambda self: r}})())
print(sorted(fd for fd in (r, w, driver, other) if os.path.exists(f"/proc/self/fd/{{fd}}")) == sorted((r, driver)))
"""
    done = _python(code)
    assert done.returncode == 0 and done.stdout.split() == ["True"], done.stdout + done.stderr


def test_a_moebench_folder_in_the_working_folder_does_not_stand_in_for_the_harness(in_tmp):
    """The submission's processes run the harness's moebench, not a `moebench` folder in the working folder (another
    checkout's: the fork server once imported it first), while the contestant's own modules beside qwen.py still
    import. A fresh harness process: its fork server starts with it."""
    (in_tmp / "moebench").mkdir()
    (in_tmp / "moebench" / "__init__.py").write_text("")  # (imported, it holds none of moebench's modules)
    (in_tmp / "helpers.py").write_text("from moebench.model.qwen3_moe import Qwen3MoeForCausalLM  # noqa: F401\n")
    (in_tmp / "qwen.py").write_text("from helpers import Qwen3MoeForCausalLM  # noqa: F401\n")
    proc = subprocess.run([sys.executable, str(TEMPLATE.parents[2] / "main.py"), *FAST], cwd=in_tmp,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "logit validation PASS" in proc.stdout, proc.stdout + proc.stderr
    assert f"submission: {in_tmp / 'qwen.py'}" in proc.stdout


def test_the_submission_process_ends_by_itself_and_leaves_no_semaphore_behind(capfd):
    """After validation the harness asks the submission's process to end rather than killing it: killed, a lock it
    made (tqdm makes one for its bars) is left to its resource tracker, which warns about it on stderr."""
    import time

    from moebench.cli.main import main

    assert main([*FAST, "--qwen", str(SUBMISSIONS / "lock_at_import.py")]) == 0
    time.sleep(2)  # the tracker of a killed process warns a moment after its death
    out, err = capfd.readouterr()
    assert "logit validation PASS" in out, out + err
    assert "leaked" not in out + err, err


@pytest.mark.parametrize("name, words", [
    ("broken_import", ["import failed", "ImportError"]),
    ("broken_exit", ["import failed", "SystemExit"]),
    ("broken_no_class", ["Qwen3MoeForCausalLM"]),
    ("broken_shape", ["shape", "4095"]),
    ("broken_int_logits", ["logits of dtype torch.int64", "floating-point"]),
    ("broken_every_column", ["logits of shape [1, 2, 4096], expected [1, 1, 4096]", "step.last"]),
    ("broken_forward", ["forward failed", "RuntimeError", "broken on purpose"]),
])
def test_broken_submission_is_one_line_naming_the_file(name, words, capsys):
    path = SUBMISSIONS / f"{name}.py"
    code, out, err = run(capsys, "--mode", "validate", "--qwen", path, "--seq-len", 16)
    assert code == 2, err
    line = error_line(err)
    assert str(path) in line
    for w in words:
        assert w in line, line


def test_a_module_that_exits_at_import_is_one_line_in_process_too(capsys):
    path = SUBMISSIONS / "broken_exit.py"
    code, out, err = run(capsys, "--mode", "generate", "--qwen", path, "--max-new-tokens", 1, "--seq-len", 16)
    assert code == 2 and str(path) in error_line(err) and "SystemExit" in error_line(err), err


def test_missing_module_is_one_line(capsys):
    code, out, err = run(capsys, *FAST, "--qwen", "does_not_exist")
    assert code == 2
    assert "does_not_exist" in error_line(err)


@pytest.mark.parametrize("isolation", ["process", "none"])
def test_a_qwen_path_that_is_no_python_file_is_one_line(capsys, in_tmp, isolation):
    (in_tmp / "notes.txt").write_text("x = 1\n")
    (in_tmp / "pkg").mkdir()
    for given, words in (("./notes.txt", "not a Python module"), ("./pkg", "a folder")):
        code, out, err = run(capsys, *FAST, "--isolation", isolation, "--qwen", given)
        assert code == 2 and given in error_line(err) and words in error_line(err), out + err


@pytest.fixture
def no_qwen_on_path(monkeypatch):
    """A Python path without any folder holding a qwen.py (the repository root, on the path under pytest, has one:
    a link to the template): what a contestant sees from an empty folder with moebench installed."""
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not (Path(p or ".") / "qwen.py").is_file()])


def submission_line(out: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith("submission: ")]
    assert len(lines) == 1, out
    return lines[0].removeprefix("submission: ")


def test_default_qwen_loads_the_template(capsys, no_qwen_on_path):
    code, out, err = run(capsys, *FAST)
    assert code == 0, err
    assert Path(submission_line(out)) == TEMPLATE
    assert submission_line(out).endswith("/moebench/contest/qwen.py")
    assert "PASS" in out


def test_qwen_py_in_the_working_folder_is_preferred(capsys, in_tmp, no_qwen_on_path):
    (in_tmp / "qwen.py").write_text(
        "from moebench.model.qwen3_moe import Qwen3MoeForCausalLM as Reference\n\n\n"
        "class Qwen3MoeForCausalLM(Reference):\n"
        "    pass\n")
    code, out, err = run(capsys, *FAST)
    assert code == 0, err
    assert Path(submission_line(out)) == in_tmp / "qwen.py"
    assert "PASS" in out


@pytest.mark.parametrize("isolation, macs, words", [
    ("user", "-1", "the kernel FLOP count failed: broken_macs.head.default: its MAC count -524288 is negative"),
    ("none", "-1", "the kernel FLOP count failed: broken_macs.head.default: its MAC count -524288 is negative"),
    ("user", "nan", "the kernel FLOP count failed: broken_macs.head.default: its MAC count nan is not a whole number"),
    ("none", "nan", "the kernel FLOP count failed: broken_macs.head.default: its MAC count nan is not a whole number"),
])
def test_a_kernel_whose_mac_formula_gives_no_count_fails_its_evaluation_and_is_recorded(isolation, macs, words,
                                                                                        capsys, monkeypatch):
    import csv

    monkeypatch.setenv("BROKEN_MACS", macs)
    code, out, err = run(capsys, "--mode", "evaluate_single", "--qwen", SUBMISSIONS / "broken_macs.py",
                         "--seq-len", "20", "--benchmark-runs", "1", "--warmup-runs", "0", "--audit-pairs", "0",
                         "--skip-accuracy", "--base-latency", "100", "--base-throughput", "100",
                         "--isolation", isolation)
    assert code == 1 and f"evaluation failed: {words}" in out, out + err
    with open("moebench-tiny_score_records.csv", newline="") as f:
        assert [r["final_score"] for r in csv.DictReader(f)] == ["0.0"]


@pytest.mark.parametrize("macs", ["1", "1.9", "1000"])
def test_a_kernel_share_counted_far_from_the_references_macs_is_not_credited(macs, capsys, monkeypatch):
    """1000x: no share at all; 1.9x, within the 2x check: no more share than the honest count's (the library's
    MACs, counted by the harness, leave it no more of the reference's)."""
    import json

    monkeypatch.setenv("BROKEN_MACS", macs)
    code, out, err = run(capsys, "--mode", "evaluate_single", "--qwen", SUBMISSIONS / "broken_macs.py",
                         "--seq-len", "20", "--benchmark-runs", "1", "--warmup-runs", "0", "--audit-pairs", "0",
                         "--skip-accuracy", "--base-latency", "100", "--base-throughput", "100")
    assert code == 0, out + err
    report = json.loads(Path("benchmark_report.json").read_text())
    check, flops = report["checks"]["mac_count"], report["kernel_flops"]
    if macs == "1":  # honest: the same MACs as the reference, the LM head's share credited
        assert check["credited"] and check["factor"] == 1 and 0.2 < flops["nki_flop_ratio"] < 0.5
        assert "not_credited" not in flops and "capped" not in flops
        assert flops["nki_flop_ratio"] == pytest.approx(check["share_cap"], abs=1e-9)
    elif macs == "1.9":  # counted 1.9 times: 0.38 or so, credited as the honest 0.25
        assert check["credited"] and 1 < check["factor"] < 2 and "not_credited" not in flops
        counted = flops["kernel_macs"] / flops["total_macs"]
        assert flops["nki_flop_ratio"] == check["share_cap"] < counted - 0.1
        honest = flops["kernel_macs"] / 1.9 / check["reference_total_macs"]  # the LM head's true share
        assert flops["nki_flop_ratio"] == pytest.approx(honest, rel=1e-6)
        assert "is credited up to that" in flops["capped"] and "note: its library ops count" in out
    else:
        assert not check["credited"] and check["factor"] > 100 and flops["nki_flop_ratio"] == 0
        assert "note: its graphs count" in out and "so its kernel share (0.99" in out
        assert "is not credited" in flops["not_credited"]
