"""Launch options measured on one GPU, used there in place of the kernels' built-in decode defaults.

`bench/gpu_kernels.py --sweep --tune FILE` times each decode launch's choices on the GPU it runs on and writes the
fastest of each to FILE (JSON: the device's name and, per launch, its options). With MOEBENCH_TUNED=FILE set, the
kernels' `_tiles` take their decode options from it on a GPU of that name (vLLM keeps its fused-MoE tiles per
device the same way). On another GPU, or without the variable, the built-in defaults hold; a file that cannot be
read or names another device is said once on stderr, never silently ignored.
"""

import functools
import json
import os
import sys

import torch

ENV = "MOEBENCH_TUNED"


@functools.cache
def _table() -> dict:
    path = os.environ.get(ENV)
    if not path:
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
        device, launches = data["device"], data["launches"]
        if not isinstance(launches, dict) or not all(isinstance(v, dict) for v in launches.values()):
            raise ValueError("'launches' must map each launch to a dict of options")
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"moebench: {ENV}={path} not used: {type(e).__name__}: {e}", file=sys.stderr)
        return {}
    here = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    if device != here:
        print(f"moebench: {ENV}={path} not used: tuned on {device}, this is {here}", file=sys.stderr)
        return {}
    return launches


def launch_key(kernel: str, shape: tuple) -> str:
    """The name of one launch in a tuned file: the kernel module's name and its `_tiles` arguments."""
    return f"{kernel} {','.join(str(n) for n in shape)}"


def tuned(kernel: str, shape: tuple, default: dict) -> dict:
    """The options measured fastest on this GPU for this kernel module's launch at `shape` (its `_tiles`
    arguments) when MOEBENCH_TUNED names a file tuned on it; else `default`."""
    return dict(_table().get(launch_key(kernel, shape), default))
