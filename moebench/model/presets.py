"""Built-in models: the embedded default checkpoint (trained weights shipped in the package), written once into a
cache folder, and larger random presets."""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from moebench import __version__
from moebench.errors import MoebenchError
from moebench.model.config import Qwen3MoeConfig, read_json
from moebench.model.qwen3_moe import ModelOptions, Qwen3MoeForCausalLM

ASSETS = Path(__file__).resolve().parents[1] / "assets"
EMBEDDED = "moebench-tiny"
# Its trained weights (model.safetensors, bfloat16) and weights.json (their sha256), from scripts/train_embedded.py.
EMBEDDED_WEIGHTS = ASSETS / EMBEDDED
SPECIAL = {"eos": "<|endoftext|>", "pad": "<|endoftext|>"}
_TOKENS = dict(bos_token_id=None, eos_token_id=0, pad_token_id=0)  # <|endoftext|> is id 0 in the shipped vocab

PRESETS = {
    # The embedded default (trained): every feature that changes the math (experts, top-k, GQA, q/k norm,
    # head_dim != hidden/heads, a dense layer), small enough that per-step overhead dominates.
    EMBEDDED: Qwen3MoeConfig(
        vocab_size=4096, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, mlp_only_layers=(), rope_theta=1_000_000.0, max_position_embeddings=4096,
        torch_dtype="bfloat16", name=EMBEDDED, **_TOKENS),
    # ~0.3B parameters (65.7M read per decoded token) for CPU speed work: the "speed" checkpoint of
    # spec/performance-anchors.md.
    "moebench-speed": Qwen3MoeConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, moe_intermediate_size=384, num_hidden_layers=8,
        num_attention_heads=12, num_key_value_heads=4, head_dim=64, num_experts=32, num_experts_per_tok=4,
        norm_topk_prob=True, rope_theta=1_000_000.0, max_position_embeddings=4096, torch_dtype="bfloat16",
        name="moebench-speed", **_TOKENS),
    # ~0.55B parameters (70M read per decoded token): the larger CPU preset.
    "moebench-0.5b": Qwen3MoeConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=384, num_hidden_layers=12,
        num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_experts=32, num_experts_per_tok=4,
        norm_topk_prob=True, rope_theta=1_000_000.0, max_position_embeddings=4096, torch_dtype="bfloat16",
        name="moebench-0.5b", **_TOKENS),
    # The real Qwen3-30B-A3B dimensions (random weights): for GPUs only, built in memory, never written.
    "qwen3-30b-a3b": Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, rope_theta=1_000_000.0, max_position_embeddings=40960, torch_dtype="bfloat16",
        name="qwen3-30b-a3b", **_TOKENS),
}
IN_MEMORY_ONLY = {"qwen3-30b-a3b"}  # 61 GB in bfloat16: too large to write as a cached checkpoint


def cache_root() -> Path:
    return Path(os.environ.get("MOEBENCH_CACHE", Path.home() / ".cache" / "moebench"))


def random_model(cfg: Qwen3MoeConfig, seed: int = 0, dtype=torch.float32, device="cpu") -> Qwen3MoeForCausalLM:
    """Deterministic random weights for `seed`: normal(0, 0.02) matrices and ones for norms, as transformers inits."""
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(cfg, ModelOptions())
    g = torch.Generator(device="cpu").manual_seed(seed)
    state = {}
    for name, p in model.named_parameters():  # tied weights appear once
        if name.endswith("norm.weight"):
            t = torch.ones(p.shape, dtype=dtype)
        elif name.endswith(".bias"):
            t = torch.zeros(p.shape, dtype=dtype)
        else:
            t = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, 0.02, generator=g).to(dtype)
        state[name] = t.to(device)
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    return model.eval()


def write_checkpoint(model: Qwen3MoeForCausalLM, out_dir: Path, max_shard_bytes: int | None = None) -> None:
    """A genuine Hugging Face checkpoint: config, safetensors, tokenizer and generation config."""
    from moebench.model.checkpoint import save_weights

    write_model_files(model.config, str(next(model.parameters()).dtype).removeprefix("torch."), out_dir)
    save_weights(model, out_dir, max_shard_bytes)


def write_model_files(cfg: Qwen3MoeConfig, dtype: str, out_dir: Path) -> None:
    """Everything of a checkpoint but the weights: config.json, the tokenizer's files, generation_config.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = dtype
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2))
    shutil.copy(ASSETS / "tokenizer.json", out_dir / "tokenizer.json")
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": SPECIAL["eos"], "pad_token": SPECIAL["pad"],
               "bos_token": None, "add_bos_token": False, "padding_side": "right",
               "model_max_length": cfg.max_position_embeddings}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
           "do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2))


def embedded_sha256() -> str:
    """The sha256 of the shipped trained weights, as scripts/train_embedded.py recorded it."""
    sha = read_json(EMBEDDED_WEIGHTS / "weights.json").get("sha256")
    if not isinstance(sha, str) or len(sha) != 64:
        raise MoebenchError(f"{EMBEDDED_WEIGHTS / 'weights.json'}: no sha256 of the weights; reinstall moebench")
    return sha


def check_weights(path: Path, sha: str, fix: str) -> None:
    """A one-line MoebenchError unless the file at `path` has this sha256."""
    if not path.is_file():
        raise MoebenchError(f"{path}: file not found; {fix}")
    got = hashlib.sha256(path.read_bytes()).hexdigest()
    if got != sha:
        raise MoebenchError(f"{path}: sha256 {got[:12]}... is not that of the {EMBEDDED} weights shipped with "
                            f"moebench ({sha[:12]}...); {fix}")


def preset_dir(name: str) -> Path:
    """The folder of a preset's checkpoint, written on first use (atomically: a crash leaves no half folder). The
    embedded model's weights are checked against their sha256 each time."""
    if name not in PRESETS:
        raise MoebenchError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    if name in IN_MEMORY_ONLY:
        raise MoebenchError(f"preset {name!r} is too large to write as a checkpoint; it is built in memory")
    sha = embedded_sha256() if name == EMBEDDED else None
    # The weights' hash is in the embedded model's folder name: new weights never reuse an old cache.
    out = cache_root() / "models" / (f"{name}-v{__version__}" + (f"-{sha[:12]}" if sha else ""))
    if (out / "config.json").is_file():
        if sha:
            check_weights(out / "model.safetensors", sha, f"delete {out} and run again to rewrite it")
        return out
    if sha:
        check_weights(EMBEDDED_WEIGHTS / "model.safetensors", sha, "reinstall moebench")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
    try:
        cfg = PRESETS[name]
        if sha:
            write_model_files(cfg, cfg.torch_dtype, tmp)
            shutil.copy(EMBEDDED_WEIGHTS / "model.safetensors", tmp / "model.safetensors")
        else:
            write_checkpoint(random_model(cfg, seed=0, dtype=getattr(torch, cfg.torch_dtype)), tmp)
        for f in tmp.iterdir():
            f.chmod(0o644)  # readable by the unprivileged contestant process too
        tmp.chmod(0o755)
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():  # another process won the race otherwise
            raise
    return out
