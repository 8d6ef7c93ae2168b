"""Cheat: replaces the child's side of the pipe with one that sends a pickle which, unpickled, would run its code
in the harness's process (here: create a file). The harness reads only plain data (torch.load weights_only): the
evaluation fails and the file is never created."""

import pickle

import moebench.modes.sandbox as sandbox
from moebench.model.qwen3_moe import Qwen3MoeForCausalLM  # noqa: F401  (honest model)

MARK = "pickle_bomb_ran_in_the_harness"


class Payload:
    def __reduce__(self):
        return (open, (MARK, "w"))


def _send(conn, message):
    conn.send_bytes(pickle.dumps(("ok", Payload(), "", "")))


sandbox._send = _send
