"""The contest score: accuracy × reduced latency × increased throughput × (1 + kernel FLOP ratio)."""

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Score:
    """Inputs and result of one score; latencies in ms, throughputs in tokens/s."""

    accuracy: float
    base_latency: float
    base_throughput: float
    latency: float
    throughput: float
    flop_ratio: float
    reduced_latency: float
    increased_throughput: float
    final_score: float


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return value


def compute_score(accuracy: float, base_latency: float, base_throughput: float, latency: float,
                  throughput: float, flop_ratio: float) -> Score:
    """The guide's formula; latency is the e2e p99 in ms, throughput the e2e tokens/s of the same run."""
    if accuracy not in (0, 1):  # True/False compare equal to 1/0
        raise ValueError(f"accuracy must be 0 or 1, got {accuracy}")
    base_latency = _positive("base_latency", base_latency)
    base_throughput = _positive("base_throughput", base_throughput)
    latency = _positive("latency", latency)
    throughput = _positive("throughput", throughput)
    flop_ratio = float(flop_ratio)
    if not 0 <= flop_ratio <= 1:  # also rejects NaN
        raise ValueError(f"flop_ratio must be in [0, 1], got {flop_ratio}")
    accuracy = float(accuracy)
    reduced_latency = base_latency / latency
    increased_throughput = throughput / base_throughput
    final_score = accuracy * reduced_latency * increased_throughput * (1 + flop_ratio)
    return Score(accuracy=accuracy, base_latency=base_latency, base_throughput=base_throughput, latency=latency,
                 throughput=throughput, flop_ratio=flop_ratio, reduced_latency=reduced_latency,
                 increased_throughput=increased_throughput, final_score=final_score)
