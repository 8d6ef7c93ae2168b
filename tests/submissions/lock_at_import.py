"""The template with a multiprocessing lock made at import, as tqdm makes one for its first bar: its semaphore is
released when the process ends by itself, and reported as leaked (by the resource tracker, on the harness's stderr)
when the process is killed."""

import multiprocessing

from moebench.model.qwen3_moe import Qwen3MoeForCausalLM  # the reference, unchanged

__all__ = ["Qwen3MoeForCausalLM", "LOCK"]

LOCK = multiprocessing.get_context("spawn").Lock()  # a named semaphore, registered with this process's tracker
