"""The bench scripts run end to end on the embedded model (tiny runs: what they print is checked, not the speed)."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from moebench.engine import hugepages

REPO = Path(__file__).resolve().parents[1]


def bench(script: str, *args: str, out: Path | None = None, threads: int | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, f"bench/{script}", *args] + ([] if out is None else ["--out", str(out)])
    env = os.environ | ({} if threads is None else {"OMP_NUM_THREADS": str(threads)})
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def test_decode_speed_writes_both_engines_rows_against_the_measured_roofline(tmp_path):
    out = tmp_path / "decode.json"
    # one thread: with two, a test running beside this one makes the profiled kernels wait on each other at random
    proc = bench("decode_speed.py", "--models", "moebench-tiny", "--dtypes", "float32", "--tokens", "4",
                 "--repeats", "1", "--cache-len", "40", out=out, threads=1)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["cache_len"] == 40 and row["moebench_tok_s"] > 0 and row["transformers_tok_s"] > 0
    assert row["ratio"] == pytest.approx(row["moebench_tok_s"] / row["transformers_tok_s"])
    runs = row["bandwidth_reads"]  # measured before, between and after the runs
    assert len(runs) == 2
    for read in runs:  # each time the fastest matrix-vector read (huge pages included where the machine has them)
        assert read["matvec"] == max(v for name, v in read.items() if name not in ("matvec", "stream"))
        assert ("compiled_hp" in read) == hugepages.SUPPORTED
    assert row["bandwidth_gbs"] == pytest.approx(statistics.median(r["matvec"] for r in runs))
    assert row["roofline_tok_s"] == pytest.approx(row["bandwidth_gbs"] * 1e9 / row["bytes_per_token"])
    nearer = max(r["matvec"] for r in runs) * 1e9 / row["bytes_per_token"]  # one run: the reads before and after it
    assert row["moebench_share_by_run"] == pytest.approx(row["moebench_tok_s"] / nearer)
    assert 0 <= row["overhead_ms"] < row["recorded_step_ms"]  # both on the build with its kernels recorded
    assert "moebench-tiny" in proc.stdout and "of roofline" in proc.stdout
    chart = out.with_suffix(".svg").read_text()  # each engine's share of the roofline, one bar each
    assert 'data-marks="2"' in chart and "tiny float32 cache 40: transformers" in chart


def test_decode_speed_refuses_a_cache_too_small_for_the_run():
    proc = bench("decode_speed.py", "--models", "moebench-tiny", "--tokens", "64", "--cache-len", "10")
    assert proc.returncode == 2
    assert "--cache-len 10 cannot hold 16 prompt tokens and 64 new ones" in proc.stderr


@pytest.mark.parametrize("script, args, words", [
    ("decode_speed.py", ["--dtypes", "float33"], "argument --dtypes: float33: not one of float32, bfloat16"),
    ("decode_speed.py", ["--models", "nosuch"], "argument --models: nosuch: not one of moebench-tiny"),
    ("decode_speed.py", ["--tokens", "-5"], "argument --tokens: must be > 0, got -5"),
    ("prefill_speed.py", ["--model", "nosuch"], "argument --model: invalid choice: 'nosuch'"),
    ("prefill_speed.py", ["--out", "tests"], "argument --out: tests: a folder (or other non-file) is in its place"),
    ("decode_speed.py", ["--out", "README.md/x.json"], "argument --out: README.md/x.json: README.md is a file"),
    ("base_in_turn.py", ["--seq-len", "3"], "error: the prompt is 12 tokens, longer than --seq-len 3"),
])
def test_bad_arguments_are_one_usage_line(script, args, words):
    proc = bench(script, *args)  # (they were tracebacks)
    assert proc.returncode == 2 and words in proc.stderr.splitlines()[-1], proc.stderr


def test_build_llamacpp_takes_help_and_refuses_options_before_any_download():
    def run(*args):
        return subprocess.run(["bash", "scripts/build_llamacpp.sh", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=10)
    proc = run("--help")  # it took --help for the folder and downloaded 290 MB into it
    assert proc.returncode == 0 and "Usage: bash scripts/build_llamacpp.sh [DIR]" in proc.stdout
    proc = run("--bogus")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "unknown option --bogus" in proc.stderr


def test_prefill_speed_writes_both_engines_rows_against_the_compute_roofline(tmp_path):
    out = tmp_path / "prefill.json"
    proc = bench("prefill_speed.py", "--model", "moebench-tiny", "--dtypes", "float32", "--prompt-len", "24",
                 "--repeats", "1", out=out)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["prompt_len"] == 24 and row["moebench_ms"] > 0 and row["transformers_ms"] > 0
    assert row["roofline_ms"] == pytest.approx(row["gflop"] * 1e3 / row["gemm_gflops"])
    assert row["paired_ratio"] == pytest.approx(row["ratio"])  # one round: the same two runs
    share = row["roofline_ms"] / row["moebench_ms"]  # drawn as a percentage
    chart = out.with_suffix(".svg").read_text()
    assert 'data-marks="2"' in chart and "tiny float32 24 tokens: moebench" in chart
    assert f">{100 * share:.4g}<" in chart


def fake_llamacpp(tree: Path, tok_s: float) -> Path:
    """A llama.cpp tree whose converter writes a stand-in GGUF and whose llama-bench reports tok_s, each logging its
    arguments."""
    (tree / "conversion").mkdir(parents=True)
    (tree / "gguf-py").mkdir()
    (tree / "conversion" / "__init__.py").write_text("")
    (tree / "conversion" / "base.py").write_text("class TextModel:\n    pass\n")
    (tree / "convert_hf_to_gguf.py").write_text(
        "import sys\nfrom pathlib import Path\nimport conversion.base\n\ndef main():\n"
        "    assert conversion.base.TextModel.get_vocab_base_pre(None, None) == 'qwen2'\n"
        "    Path(sys.argv[sys.argv.index('--outfile') + 1]).write_text(' '.join(sys.argv[1:]))\n")
    bench_bin = tree / "build" / "bin" / "llama-bench"
    bench_bin.parent.mkdir(parents=True)
    bench_bin.write_text(f'#!/bin/sh\necho "$@" >> "{tree}/calls.txt"\necho \'[{{"avg_ts": {tok_s}}}]\'\n')
    bench_bin.chmod(0o755)
    return tree


def test_llamacpp_decode_converts_each_checkpoint_once(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from llamacpp_decode import gguf

    tree = fake_llamacpp(tmp_path / "llama.cpp", 250.0)
    first = gguf(tree, "moebench-tiny", "bfloat16", tmp_path / "gguf")
    assert first.name.endswith("-bf16.gguf") and "--outtype bf16" in first.read_text()
    first.write_text("kept")
    assert gguf(tree, "moebench-tiny", "bfloat16", tmp_path / "gguf") == first and first.read_text() == "kept"
    assert gguf(tree, "moebench-tiny", "float32", tmp_path / "gguf").name.endswith("-f32.gguf")


def test_llamacpp_decode_interleaves_both_engines_against_the_measured_roofline(tmp_path):
    tree, out = fake_llamacpp(tmp_path / "llama.cpp", 250.0), tmp_path / "l.json"
    proc = bench("llamacpp_decode.py", "--llama-cpp", str(tree), "--model", "moebench-tiny", "--dtypes", "bfloat16",
                 "--tokens", "4", "--repeats", "2", "--gguf-dir", str(tmp_path / "gguf"), out=out)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["llamacpp_runs"] == [250.0, 250.0] and len(row["moebench_runs"]) == 2
    assert row["ratio"] == pytest.approx(row["moebench_tok_s"] / 250.0)
    assert row["roofline_tok_s"] == pytest.approx(row["bandwidth_gbs"] * 1e9 / row["bytes_per_token"])
    assert len(row["bandwidth_reads"]) == 3  # before, between and after the rounds
    calls = (tree / "calls.txt").read_text().splitlines()  # the warm-up, then one run per round
    assert len(calls) == 3 and all("-bf16.gguf -p 0 -n 4 -d 16 -t " in c for c in calls)
    assert "llama.cpp" in proc.stdout and "tiny bfloat16: llama.cpp" in out.with_suffix(".svg").read_text()


def test_llamacpp_decode_without_a_built_tree_says_how_to_build_one(tmp_path):
    proc = bench("llamacpp_decode.py", "--llama-cpp", str(tmp_path))
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"llamacpp_decode: no llama.cpp tree with a built llama-bench at {tmp_path} (build one with: bash "
        "scripts/build_llamacpp.sh)"]


def test_llamacpp_decode_refuses_a_dtype_it_cannot_convert(tmp_path):
    proc = bench("llamacpp_decode.py", "--llama-cpp", str(tmp_path), "--dtypes", "float32,float16")
    assert proc.returncode == 2 and "--dtypes: 'float16' is not one of float32, bfloat16" in proc.stderr


def test_gpu_decode_pdl_side_by_side_measures_each_engine_with_its_own_setting(monkeypatch):
    """bench/gpu_decode.py's PDL part, its GPU work replaced by recorders: the second engine is built and captured
    with PDL switched the other way, every measurement of an engine runs with that engine's setting, and the
    setting is given back to MOEBENCH_PDL after each (the real run is on a lent GPU only)."""
    import argparse

    import torch

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import gpu_decode

    state = {"set": None}
    monkeypatch.setattr(gpu_decode.common, "set_pdl", lambda on: state.update(set=on))
    monkeypatch.setattr(gpu_decode.common, "pdl_on", lambda: bool(state["set"]))
    seen = []

    class FakeEngine:
        def __init__(self, model, **kwargs):
            self.model, self.pdl, self.eager_steps = model, bool(state["set"]), 0
            assert not kwargs or (kwargs["compile"] and kwargs["cuda_graphs"])

        def example_step(self, submodel, width):
            return (submodel, width)

        def step_function(self, submodel):
            def step(*inputs):
                assert state["set"] is self.pdl and inputs == (submodel, 640)
                self.eager_steps += 1
            return step

        def warm_decode(self, width):  # captures: the kernels must have run eagerly before, with the same setting
            assert state["set"] is self.pdl and self.eager_steps == 1

        def greedy(self, prompt, mask, n):
            seen.append(("greedy", self.pdl, state["set"]))
            return torch.zeros(1, n, dtype=torch.long), torch.full((n, 1, 4), 1.0 + self.pdl)

    def measure(kind, value):
        def fn(engine, *args):
            seen.append((kind, engine.pdl, state["set"]))
            return value[engine.pdl]
        return fn

    monkeypatch.setattr(gpu_decode, "Engine", FakeEngine)
    monkeypatch.setattr(gpu_decode, "moe_layer_us", measure("moe", {False: 40.0, True: 30.0}))
    monkeypatch.setattr(gpu_decode, "decode_rate", measure("decode", {False: 250.0, True: 300.0}))
    monkeypatch.setattr(gpu_decode, "request_ms", measure("request", {False: 1000.0, True: 900.0}))
    profile = [dict(kernel="_pair_gate_up_kernel", launches_per_step=48, us_per_step=700.0)]
    monkeypatch.setattr(gpu_decode, "step_kernels", measure("profile", {False: None, True: profile}))
    first = FakeEngine("model")  # built with MOEBENCH_PDL's setting (None here: off)
    lines, out, saved = [], {}, []
    args = argparse.Namespace(seq_len=640, repeats=5, steps=8, prompt_len=402)
    gpu_decode.pdl_side_by_side(first, torch.zeros(1, 4, dtype=torch.long), args, torch.device("cpu"), lines.append,
                                out, lambda: saved.append(dict(out)))
    assert state["set"] is None  # given back
    for kind, engine_pdl, setting in seen:  # the first engine's measurements ran with PDL off, the other's on
        assert setting is engine_pdl or (setting is None and not engine_pdl), (kind, engine_pdl, setting)
    # 3 rounds at most, each engine's timed decode after an untimed one; saved after the comparison and each turn
    assert sum(kind == "decode" for kind, *_ in seen) == 12 and sum(kind == "request" for kind, *_ in seen) == 6
    assert len(saved) == 8 and saved[0]["logits_max_diff"] == 1.0 and saved[-1] == out
    assert ("profile", True, True) in seen and out["step_kernels_on"] == profile
    assert out["first_engine_pdl"] is False and out["logits_max_diff"] == 1.0
    assert out["tokens_equal_before_first_difference"] == 16
    assert (out["decode_tok_s_on"], out["decode_tok_s_off"], out["request_ms_on"], out["moe_layer_us_off"]) == \
        (300.0, 250.0, 900.0, 40.0)
    assert "PDL on / off: decode 300 / 250 tok/s (1.200x); request 900 / 1000 ms" in lines[-2]
    assert "with PDL: 48 kernel launches, 700 µs of kernels; the longest: _pair_gate_up_kernel 700 µs" in lines[-1]


def test_base_in_turn_scores_an_honest_copy_both_ways(tmp_path):
    out = tmp_path / "turn.json"
    proc = bench("base_in_turn.py", "--seq-len", "16", "--runs", "2", "--rounds", "1", out=out)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["one_after_the_other"] > 0 and row["in_turn"] > 0 and row["p50_ratio_in_turn"] > 0
    assert result["spread"]["in_turn"]["median"] == row["in_turn"] and result["new_tokens"] > 0
    assert "in turn (p50 submission / reference" in proc.stdout
