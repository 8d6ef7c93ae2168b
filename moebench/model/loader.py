"""Opens a model directory (or a built-in preset) and builds a model class from it."""

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from moebench.errors import MoebenchError
from moebench.model.checkpoint import load_weights
from moebench.model.config import Qwen3MoeConfig, read_json
from moebench.model.presets import EMBEDDED, IN_MEMORY_ONLY, PRESETS, preset_dir, random_model
from moebench.model.qwen3_moe import ModelOptions, Qwen3MoeForCausalLM
from moebench.model.tokenizer import Tokenizer

PRESET_PREFIX = "preset:"


@dataclass
class ModelSource:
    """What a --model-path names: config, tokenizer, generation defaults, and where the weights are."""

    name: str  # the model's name in records: the folder name, lower-cased, or the preset's name
    config: Qwen3MoeConfig
    tokenizer: Tokenizer
    generation: dict  # generation_config.json ({} when absent)
    weights_dir: Path | None  # None: random weights built in memory (the largest preset)


def open_model(model_path: str | None) -> ModelSource:
    """None -> the embedded model; 'preset:NAME' -> a built-in preset; otherwise a Hugging Face folder."""
    if model_path is None:
        model_path = PRESET_PREFIX + EMBEDDED
    if model_path.startswith(PRESET_PREFIX):
        name = model_path[len(PRESET_PREFIX):]
        if name not in PRESETS:
            raise MoebenchError(f"--model-path: unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        if name in IN_MEMORY_ONLY:
            tok_dir = preset_dir(EMBEDDED)
            return ModelSource(name, PRESETS[name], Tokenizer(tok_dir), read_json(tok_dir / "generation_config.json"),
                               None)
        folder = preset_dir(name)
    else:
        folder = Path(model_path)
        if not folder.is_dir():
            raise MoebenchError(f"--model-path {model_path}: no such directory (or use preset:NAME, "
                                f"presets: {', '.join(PRESETS)})")
    name = model_path[len(PRESET_PREFIX):] if model_path.startswith(PRESET_PREFIX) else folder.resolve().name.lower()
    config = dataclasses.replace(Qwen3MoeConfig.from_file(folder / "config.json"), name=name)
    return ModelSource(name, config, Tokenizer(folder), read_json(folder / "generation_config.json", False), folder)


def build_model(model_cls, source: ModelSource, options: ModelOptions, dtype: torch.dtype, device) -> torch.nn.Module:
    """Construct `model_cls(config, options)` on the meta device and load the weights into it. Weights that do not
    fit the device's free memory are one line."""
    if source.weights_dir is None:  # refused before the weights are drawn (a large preset's take minutes)
        if model_cls is not Qwen3MoeForCausalLM or options != ModelOptions():
            raise MoebenchError(f"preset {source.name} has no checkpoint on disk; only the reference model with "
                                "default options runs on it")
        with _fitting(source, dtype, device, lambda: construct(model_cls, source, options)):
            model = random_model(source.config, seed=0, dtype=dtype, device=device)
        return rope_on(model, device)
    model = construct(model_cls, source, options)
    with _fitting(source, dtype, device, lambda: model):
        load_weights(model, source.weights_dir, dtype, device)
    return rope_on(after_loading(model).eval(), device)


def out_of_memory(e: BaseException) -> bool:
    """Whether `e` is an allocation that failed: MemoryError, torch's OutOfMemoryError, or a RuntimeError in the
    words of CUDA ("out of memory") or of torch's CPU allocator ("can't allocate memory")."""
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or isinstance(e, RuntimeError) and \
        any(words in str(e) for words in ("out of memory", "can't allocate memory"))


@contextlib.contextmanager
def _fitting(source: ModelSource, dtype: torch.dtype, device, structure):
    """Loading the weights of `structure()` (the model on the meta device): an allocation that fails is one line,
    with their size."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        text = (str(e).strip().splitlines() or [type(e).__name__])[0]
        gb = sum(p.numel() for p in structure().parameters()) * dtype.itemsize / 1e9
        raise MoebenchError(
            f"{source.name}: its weights ({gb:.3g} GB in {str(dtype).removeprefix('torch.')}) do not fit in the free "
            f"{torch.device(device).type} memory ({text}). The evaluation modes hold the reference's copy beside the "
            "submission process's, unless evaluate_all reads stored expected logits and bases: --mode "
            "generate_accuracy_baselines stores them holding one copy") from None


def rope_on(model: torch.nn.Module, device) -> torch.nn.Module:
    """The RoPE frequencies on the weights' device: a plain float32 attribute (not a buffer, which a cast to bfloat16
    would round), so loading passes it by. The first forward moved it; a compiled decode step that ran first would
    take the CPU tensor as an input, and under CUDA graphs not be captured, then recompile once it moved."""
    if isinstance(getattr(model, "inv_freq", None), torch.Tensor):
        model.inv_freq = model.inv_freq.to(device)
    return model


def construct(model_cls, source: ModelSource, options: ModelOptions) -> torch.nn.Module:
    """`model_cls(config, options)` on the meta device: the structure, no weights yet."""
    if options.kernels:
        # Import the kernel modules (and Triton) here, not under the meta device below: Triton's interpreter
        # must not create its tensors on the meta device.
        from moebench.kernels.registry import load_builtin_kernels

        load_builtin_kernels()
    with torch.device("meta"):
        model = model_cls(source.config, options)
    return model


def after_loading(model: torch.nn.Module) -> torch.nn.Module:
    """Once the weights are in (or, on the meta device, to give a model the structure it will have then): e.g. the
    quantized experts quantize their weights."""
    for module in model.modules():
        if hasattr(module, "after_loading"):
            module.after_loading()
    return model
