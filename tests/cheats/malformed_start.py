"""Fault: its process answers the load and compile step with something other than what the harness reads there (a
reviewer's find: a traceback, then a hang at exit, the sandbox user never released). A failed, recorded evaluation."""

import moebench.modes.sandbox as sandbox
from moebench.model.qwen3_moe import Qwen3MoeForCausalLM  # noqa: F401  (honest model)

_send, _first = sandbox._send, [True]


def _malformed(conn, message):
    if _first:
        _first.clear()
        message = ("ok", 5, "", "")
    _send(conn, message)


sandbox._send = _malformed
