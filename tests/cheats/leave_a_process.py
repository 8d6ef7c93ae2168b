"""Cheat: leaves a process behind (a double fork into a session of its own), which could slow the reference while
the harness times it, or signal another evaluation's submission (a reviewer's find). Confined, every process of the
evaluation's user is stopped while the reference is timed and killed when the evaluation ends."""

import os
import time

from moebench.model.qwen3_moe import Qwen3MoeForCausalLM as Reference


class Qwen3MoeForCausalLM(Reference):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(300)
            os._exit(0)
        os.wait()
        print(f"leftover: uid {os.getuid()}")
