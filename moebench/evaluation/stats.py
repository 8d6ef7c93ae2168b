"""Latency statistics: numpy-linear percentiles, a summary record, and NxDI's per-submodel benchmark report."""

from dataclasses import dataclass

import numpy as np


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with numpy's default "linear" rule: rank q/100·(n−1), interpolated."""
    if len(values) == 0:
        raise ValueError("percentile of an empty list")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


@dataclass(frozen=True)
class Stats:
    """Summary of a list of samples, in the samples' unit; std is the population std (numpy's ddof=0)."""

    runs: int
    mean: float
    std: float
    min: float
    max: float
    p50: float
    p90: float
    p95: float
    p99: float
    p100: float


def summarize(samples: list[float]) -> Stats:
    """Stats of a non-empty list of samples."""
    if len(samples) == 0:
        raise ValueError("cannot summarize an empty list of samples")
    x = np.asarray(samples, dtype=np.float64)
    return Stats(runs=len(x), mean=float(x.mean()), std=float(x.std()), min=float(x.min()), max=float(x.max()),
                 p50=percentile(x, 50), p90=percentile(x, 90), p95=percentile(x, 95), p99=percentile(x, 99),
                 p100=percentile(x, 100))


def submodel_report(latencies_s: list[float], tokens_per_run: int, batch: int, n_runs: int) -> dict | None:
    """One section of benchmark_report.json, as NxDI's generate_report; None when the submodel never ran.

    Latencies are in seconds, reported in ms. throughput = n_runs·tokens_per_run·batch / Σlatencies, where
    n_runs counts requests even when latencies_s holds per-step samples (the token-generation section).
    """
    if len(latencies_s) == 0:
        return None
    total_s = float(np.sum(np.asarray(latencies_s, dtype=np.float64)))
    if not total_s > 0:
        raise ValueError(f"latencies must sum to a positive time, got {total_s} s")
    ms = [1000.0 * float(v) for v in latencies_s]
    mean_ms = float(np.mean(ms))
    report = {f"latency_ms_p{q}": percentile(ms, q) for q in (50, 90, 95, 99, 100)}
    report["latency_ms_avg"] = mean_ms
    report["latency_ms_mean"] = mean_ms  # the usage guide's name for avg
    report["throughput"] = float(n_runs * tokens_per_run * batch / total_s)
    report["runs"] = len(latencies_s)
    return report
