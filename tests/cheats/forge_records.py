"""Cheat: computes honestly, but while it is loaded it appends a forged perfect row to the score records, rewrites
the expected logits (so validation compares its outputs with themselves) and looks around the working directory.
Confined (--isolation user, as root) none of these files is even in its view; what it tried is printed."""

import glob
import os
import sys
from pathlib import Path

import torch

from moebench.model.qwen3_moe import Qwen3MoeForCausalLM as Reference


def attempt(what, fn):
    try:
        fn()
        print(f"forge: {what}: done")
    except Exception as e:  # noqa: BLE001
        print(f"forge: {what}: {type(e).__name__}")


class Qwen3MoeForCausalLM(Reference):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        print(f"forge: uid {os.getuid()}, sees {sorted(os.listdir('.'))}")
        for path in glob.glob("*_score_records.csv") or ["moebench-tiny_score_records.csv"]:
            attempt(f"append to {path}", lambda: open(path, "a").write(
                "forged,0,0,0,0,0,0,1,1,99,99,2026-01-01 00:00:00\n"))
        for path in glob.glob("expected_logits_*.pt") or ["expected_logits_0.pt"]:
            attempt(f"read {path}", lambda: Path(path).read_bytes())
            attempt(f"overwrite {path}", lambda: torch.save(torch.zeros(1), path))
        attempt("write to moebench's package", lambda: open(sys.modules[Reference.__module__].__file__, "a").close())
