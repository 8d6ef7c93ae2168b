"""Contestant modules: find and import `--qwen NAME`, and check the class it defines."""

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from moebench.errors import MoebenchError

TEMPLATE = Path(__file__).resolve().parents[1] / "contest" / "qwen.py"
CLASS_NAME = "Qwen3MoeForCausalLM"


@dataclass
class Submission:
    name: str  # as given to --qwen
    path: Path  # the file that was loaded
    cls: type

    def fail(self, what: str) -> MoebenchError:
        return MoebenchError(f"--qwen {self.name} ({self.path}): {what}")


def find_module_file(name: str, folder: Path) -> Path:
    """NAME.py in `folder`, else the module NAME on the Python path, else NAME as a .py path; the default
    `qwen` falls back to moebench's template."""
    if not name.endswith(".py") and "/" not in name:
        local = folder / f"{name}.py"
        if local.is_file():
            return local
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            return Path(spec.origin)
        if name == "qwen":
            return TEMPLATE
        raise MoebenchError(f"--qwen {name}: no {name}.py in {folder} and no module {name!r} on the Python path")
    path = Path(name)
    if path.is_dir():
        raise MoebenchError(f"--qwen {name}: a folder; give the module's .py file")
    if not path.is_file():
        raise MoebenchError(f"--qwen {name}: file not found")
    if path.suffix != ".py":
        raise MoebenchError(f"--qwen {name}: not a Python module (a .py file)")
    return path


def locate_submission(name: str, folder: Path | None = None) -> Submission:
    """The module's file, not imported (cls None): the harness's side of an isolated evaluation never runs
    contestant code, which could patch anything in the process that imports it."""
    return Submission(name, find_module_file(name, folder or Path.cwd()).resolve(), None)


def load_submission(name: str, folder: Path | None = None) -> Submission:
    path = find_module_file(name, folder or Path.cwd()).resolve()
    module_name = f"moebench_submission_{abs(hash(str(path)))}"
    if str(path.parent) not in sys.path:  # its own modules beside it import (after everything else of the path's)
        sys.path.append(str(path.parent))
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:  # any error in a contestant's module is the contestant's, on one line
        del sys.modules[module_name]  # (SystemExit: a module that parses its own command line at import, say)
        raise MoebenchError(f"--qwen {name} ({path}): import failed: {type(e).__name__}: {e}") from None
    cls = getattr(module, CLASS_NAME, None)
    sub = Submission(name, path, cls)
    if cls is None:
        raise sub.fail(f"defines no class {CLASS_NAME}")
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise sub.fail(f"{CLASS_NAME} is not a torch.nn.Module subclass")
    return sub


def check_logits(sub: Submission, logits, batch: int, vocab: int, columns: int) -> None:
    """The forward contract: a float tensor [B, columns, vocab] (columns: 1 when step.last names the column wanted,
    else input_ids' T)."""
    if not isinstance(logits, torch.Tensor):
        raise sub.fail(f"forward returned {type(logits).__name__}, expected the logits tensor")
    if logits.ndim != 3 or logits.shape[0] != batch or logits.shape[-1] != vocab:
        raise sub.fail(f"forward returned logits of shape {list(logits.shape)}, expected [{batch}, T, {vocab}]")
    if logits.shape[1] != columns:
        why = "step.last names the one column wanted" if columns == 1 else "one for each column of input_ids"
        raise sub.fail(f"forward returned logits of shape {list(logits.shape)}, expected [{batch}, {columns}, "
                       f"{vocab}]: {why}")
    if not logits.is_floating_point():
        raise sub.fail(f"forward returned logits of dtype {logits.dtype}, expected a floating-point tensor")
