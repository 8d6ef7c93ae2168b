"""Hugging Face safetensors checkpoints <-> our parameters, through one name table with shape checks."""

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moebench.errors import MoebenchError
from moebench.progress import Progress
from moebench.model.config import Qwen3MoeConfig
from moebench.model.qwen3_moe import ModelOptions

# One entry per parameter of ours: (groups, stacked). Each group is a list of (HF name, shape) concatenated along
# dim 0; with stacked=True the groups (one per expert) are stacked into a new leading dim.
Part = tuple[str, tuple[int, ...]]
Entry = tuple[list[list[Part]], bool]


def weight_table(cfg: Qwen3MoeConfig, opts: ModelOptions) -> dict[str, Entry]:
    D, V, hd = cfg.hidden_size, cfg.vocab_size, cfg.dim_head
    table: dict[str, Entry] = {}

    def one(ours, hf, shape):
        table[ours] = ([[(hf, shape)]], False)

    one("model.embed_tokens.weight", "model.embed_tokens.weight", (V, D))
    one("model.norm.weight", "model.norm.weight", (D,))
    if not cfg.tie_word_embeddings:
        one("lm_head.weight", "lm_head.weight", (V, D))
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        one(f"{p}.input_layernorm.weight", f"{p}.input_layernorm.weight", (D,))
        one(f"{p}.post_attention_layernorm.weight", f"{p}.post_attention_layernorm.weight", (D,))
        a = f"{p}.self_attn"
        one(f"{a}.q_norm.weight", f"{a}.q_norm.weight", (hd,))
        one(f"{a}.k_norm.weight", f"{a}.k_norm.weight", (hd,))
        one(f"{a}.o_proj.weight", f"{a}.o_proj.weight", (D, cfg.q_size))
        if cfg.attention_bias:
            one(f"{a}.o_proj.bias", f"{a}.o_proj.bias", (D,))
        sizes = {"q": cfg.q_size, "k": cfg.kv_size, "v": cfg.kv_size}
        kinds = ["weight", "bias"] if cfg.attention_bias else ["weight"]
        for kind in kinds:
            parts = [(f"{a}.{n}_proj.{kind}", (s, D) if kind == "weight" else (s,)) for n, s in sizes.items()]
            if opts.fused_qkv:
                table[f"{a}.qkv_proj.{kind}"] = ([parts], False)
            else:
                for (hf, shape), n in zip(parts, sizes):
                    one(f"{a}.{n}_proj.{kind}", hf, shape)
        m = f"{p}.mlp"
        if cfg.is_moe_layer(i):
            E, I = cfg.num_experts, cfg.moe_intermediate_size
            one(f"{m}.gate.weight", f"{m}.gate.weight", (E, D))
            x = f"{m}.experts"
            table[f"{x}.gate_up_proj"] = (
                [[(f"{x}.{e}.gate_proj.weight", (I, D)), (f"{x}.{e}.up_proj.weight", (I, D))] for e in range(E)], True)
            table[f"{x}.down_proj"] = ([[(f"{x}.{e}.down_proj.weight", (D, I))] for e in range(E)], True)
        else:
            I = cfg.intermediate_size
            table[f"{m}.gate_up_proj.weight"] = ([[(f"{m}.gate_proj.weight", (I, D)),
                                                   (f"{m}.up_proj.weight", (I, D))]], False)
            one(f"{m}.down_proj.weight", f"{m}.down_proj.weight", (D, I))
    return table


def _open_files(model_dir: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it (sharded via the index, or one model.safetensors)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise MoebenchError(f"{index}: not a valid safetensors index ({e})") from None
        return {name: model_dir / f for name, f in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise MoebenchError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    return {name: single for name in _keys(single)}


def _keys(path: Path) -> list[str]:
    if not path.is_file():
        raise MoebenchError(f"{path}: safetensors file listed in the index is missing")
    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise MoebenchError(f"{path}: cannot read safetensors file ({e})") from None


class _Reader:
    """Reads tensors by HF name across files, remembering which names were used."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self.where = _open_files(model_dir)
        self.used: set[str] = set()
        self.handles = {}

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self.where:
            raise MoebenchError(f"{self.model_dir}: checkpoint has no tensor {name!r} (expected shape {list(shape)})")
        path = self.where[name]
        try:
            if path not in self.handles:
                self.handles[path] = safe_open(path, framework="pt")
            t = self.handles[path].get_tensor(name)
        except MoebenchError:
            raise
        except Exception as e:
            raise MoebenchError(f"{path}: cannot read tensor {name!r} ({e})") from None
        if tuple(t.shape) != shape:
            raise MoebenchError(f"{path}: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}")
        self.used.add(name)
        return t


def load_weights(model: torch.nn.Module, model_dir: Path, dtype: torch.dtype, device) -> None:
    """Fill every parameter of `model` from the HF checkpoint in `model_dir`; every tensor must be used."""
    cfg, opts = model.config, model.options
    reader = _Reader(Path(model_dir))
    for path in sorted(set(reader.where.values())):
        _keys(path)  # a missing or unreadable shard fails here, naming the file
    state = {}
    table = weight_table(cfg, opts)
    bar = Progress(len(table), "loading weights", "tensor")
    for ours, (groups, stacked) in table.items():
        bar.update()
        stacked_name = ours if stacked and ours in reader.where else None
        if stacked_name:  # already stacked [E, ...] (transformers' in-memory layout)
            shape = (len(groups), sum(s[0] for _, s in groups[0]), *groups[0][0][1][1:])
            state[ours] = reader.get(stacked_name, shape).to(device=device, dtype=dtype)
            continue
        pieces = [torch.cat([reader.get(n, s) for n, s in g]) if len(g) > 1 else reader.get(*g[0]) for g in groups]
        t = torch.stack(pieces) if stacked else pieces[0]
        state[ours] = t.to(device=device, dtype=dtype)
    if cfg.tie_word_embeddings and "lm_head.weight" in reader.where:
        head = reader.get("lm_head.weight", (cfg.vocab_size, cfg.hidden_size))
        if not torch.equal(head.to(dtype), state["model.embed_tokens.weight"].cpu()):
            raise MoebenchError("tie_word_embeddings is true but lm_head.weight differs from the embeddings")
    bar.close()
    unused = sorted(set(reader.where) - reader.used)
    if unused:
        more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
        raise MoebenchError(f"{model_dir}: checkpoint tensors not used by Qwen3-MoE: {', '.join(unused[:3])}{more}")
    missing = set(dict(model.named_parameters())) - set(state)
    assert not missing, f"weight table misses parameters: {sorted(missing)[:3]}"
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()


def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our parameters under their Hugging Face names and shapes (experts unstacked, q/k/v split)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    out = {}
    for ours, (groups, stacked) in weight_table(model.config, model.options).items():
        t = params[ours].detach()
        for g, tg in zip(groups, t.unbind(0) if stacked else [t]):
            for (name, shape), piece in zip(g, tg.split([s[0] for _, s in g])):
                out[name] = piece.reshape(shape).contiguous()
    return out


def save_weights(model: torch.nn.Module, model_dir: Path, max_shard_bytes: int | None = None) -> None:
    """Write model.safetensors, or shards with model.safetensors.index.json when max_shard_bytes is set."""
    tensors = hf_state_dict(model)
    if max_shard_bytes is None:
        save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
        return
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, model_dir / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
