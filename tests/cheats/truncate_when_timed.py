"""Cheat: answers each timed request with its first new token only, while the harness counts the tokens it asked
for (a reviewer's find: 15x the honest score). The harness checks every timed answer's shape: the evaluation
fails and is recorded."""

from moebench.model.qwen3_moe import Qwen3MoeForCausalLM  # noqa: F401  (honest model)
from moebench.modes import sandbox

_captured = sandbox._captured


def _one_token(fn, *args):
    if getattr(fn, "__name__", "") == "request":  # (ids, mask, new_tokens): a timed request
        return _captured(fn, *args[:2], 1)
    return _captured(fn, *args)


sandbox._captured = _one_token
