"""Fault: its process answers the end of its compile (the second of the start's two replies) with something other
than what the harness reads there. A failed, recorded evaluation."""

import moebench.modes.sandbox as sandbox
from moebench.model.qwen3_moe import Qwen3MoeForCausalLM  # noqa: F401  (honest model)

_send = sandbox._send


def _malformed(conn, message):
    if isinstance(message, tuple) and len(message) > 1 and isinstance(message[1], dict) and "compile" in message[1]:
        message = ("ok", {"compile": 5}, "", "")
    _send(conn, message)


sandbox._send = _malformed
