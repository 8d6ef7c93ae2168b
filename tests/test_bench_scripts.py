"""The bench scripts run end to end on the embedded model (tiny runs: what they print is checked, not the speed)."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from moebench.engine import hugepages

REPO = Path(__file__).resolve().parents[1]


def bench(script: str, *args: str, out: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, f"bench/{script}", *args] + ([] if out is None else ["--out", str(out)])
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_decode_speed_writes_both_engines_rows_against_the_measured_roofline(tmp_path):
    out = tmp_path / "decode.json"
    proc = bench("decode_speed.py", "--models", "moebench-tiny", "--dtypes", "float32", "--tokens", "4",
                 "--repeats", "1", "--cache-len", "40", out=out)
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


def test_prefill_speed_writes_both_engines_rows_against_the_compute_roofline(tmp_path):
    out = tmp_path / "prefill.json"
    proc = bench("prefill_speed.py", "--model", "moebench-tiny", "--dtypes", "float32", "--prompt-len", "24",
                 "--repeats", "1", out=out)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["prompt_len"] == 24 and row["moebench_ms"] > 0 and row["transformers_ms"] > 0
    assert row["roofline_ms"] == pytest.approx(row["gflop"] * 1e3 / row["gemm_gflops"])
    share = row["roofline_ms"] / row["moebench_ms"]  # drawn as a percentage
    chart = out.with_suffix(".svg").read_text()
    assert 'data-marks="2"' in chart and "tiny float32 24 tokens: moebench" in chart
    assert f">{100 * share:.4g}<" in chart
