"""Cheat: patches the clock. At import it slows time.perf_counter (and time.time) a hundredfold, so any timer in
its process reports a hundredth of the real time (the Event.elapsed_time / calculate_stats patch of GPU MODE #162).
Its numbers are honest otherwise. The harness times each request with its own clock, in its own process: the
score does not move; only the informational per-submodel times from the submission's process shrink."""

import time

from moebench.model.qwen3_moe import Qwen3MoeForCausalLM  # noqa: F401  (the reference, computed honestly)

_real_perf_counter, _real_time = time.perf_counter, time.time
_start = _real_perf_counter()
time.perf_counter = lambda: _start + (_real_perf_counter() - _start) / 100
time.time = lambda: _real_time() / 100
