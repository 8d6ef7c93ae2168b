"""The Qwen3-MoE model config: a frozen dataclass read from a Hugging Face `config.json`."""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from moebench.errors import MoebenchError

ROPE_TYPES = ("default", "linear", "yarn")  # of the types transformers supports, those with a fixed frequency table


@dataclass(frozen=True)
class Qwen3MoeConfig:
    """Every field that changes the math, with Hugging Face names and defaults."""

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144  # dense MLP layers (mlp_only_layers / decoder_sparse_step)
    moe_intermediate_size: int = 768
    num_hidden_layers: int = 48
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    head_dim: int | None = None  # None: hidden_size // num_attention_heads, as in transformers
    num_experts: int = 128
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None  # {"rope_type": ..., "factor": ..., ...}; None = plain RoPE
    max_position_embeddings: int = 40960
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # only set when use_sliding_window is true, as in transformers
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    name: str = field(default="qwen3-moe", compare=False)

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.dim_head

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.dim_head

    def is_moe_layer(self, i: int) -> bool:
        """transformers' rule: MoE unless listed in mlp_only_layers or off the decoder_sparse_step grid."""
        return i not in self.mlp_only_layers and self.num_experts > 0 and (i + 1) % self.decoder_sparse_step == 0

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return tuple(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else (self.eos_token_id,)

    def _count(self, experts: int, vocab_rows: int) -> int:
        """Parameters with `experts` experts per MoE layer and `vocab_rows` embedding/head rows."""
        D = self.hidden_size
        attn = D * (self.q_size + 2 * self.kv_size) + self.q_size * D + 2 * self.dim_head
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size + D
        total = vocab_rows * D + D
        for i in range(self.num_hidden_layers):
            mlp = (experts * 3 * D * self.moe_intermediate_size + self.num_experts * D
                   if self.is_moe_layer(i) else 3 * D * self.intermediate_size)
            total += attn + mlp + 2 * D
        return total

    def num_parameters(self) -> int:
        return self._count(self.num_experts, self.vocab_size * (1 if self.tie_word_embeddings else 2))

    def active_parameters(self) -> int:
        """Parameters read to decode one token at batch 1 (k experts per MoE layer, the head, one embedding row)."""
        return self._count(self.num_experts_per_tok, self.vocab_size)

    def to_hf_dict(self) -> dict:
        """The config.json that transformers' Qwen3MoeConfig reads back to the same model."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.pop("name")
        d["mlp_only_layers"] = list(self.mlp_only_layers)
        if isinstance(self.eos_token_id, tuple):
            d["eos_token_id"] = list(self.eos_token_id)
        d["use_sliding_window"] = self.sliding_window is not None
        rope = dict(self.rope_scaling or {"rope_type": "default"})
        rope["rope_theta"] = self.rope_theta
        d["rope_parameters"] = rope  # transformers >= 5
        d["architectures"] = ["Qwen3MoeForCausalLM"]
        d["model_type"] = "qwen3_moe"
        return d

    @classmethod
    def from_dict(cls, raw: dict, name: str = "qwen3-moe") -> "Qwen3MoeConfig":
        raw = dict(raw)
        if raw.get("model_type", "qwen3_moe") != "qwen3_moe":
            raise MoebenchError(f"model_type is {raw['model_type']!r}; moebench runs Qwen3-MoE ('qwen3_moe') models")
        if "num_local_experts" in raw and "num_experts" not in raw:
            raw["num_experts"] = raw["num_local_experts"]
        # Rope: transformers 5 writes rope_parameters (theta inside), older files rope_theta + rope_scaling.
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or None
        if rope is not None:
            rope = dict(rope)
            raw["rope_theta"] = rope.pop("rope_theta", raw.get("rope_theta", 10000.0))
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type not in ROPE_TYPES:
                raise MoebenchError(f"rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
            rope = None if rope_type == "default" else {**rope, "rope_type": rope_type}
        raw["rope_scaling"] = rope
        raw.setdefault("rope_theta", 10000.0)
        if not raw.get("use_sliding_window", False):
            raw["sliding_window"] = None
        if raw.get("hidden_act", "silu") != "silu":
            raise MoebenchError(f"hidden_act {raw['hidden_act']!r} is not supported; Qwen3-MoE uses 'silu'")
        raw["mlp_only_layers"] = tuple(raw.get("mlp_only_layers") or ())
        if isinstance(raw.get("eos_token_id"), list):
            raw["eos_token_id"] = tuple(raw["eos_token_id"])
        raw["torch_dtype"] = raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in raw.items() if k in known and k != "name"}, name=name)
        except TypeError as e:
            raise MoebenchError(f"config.json: {e}") from None

    @classmethod
    def from_file(cls, path: Path) -> "Qwen3MoeConfig":
        path = Path(path)
        if not path.is_file():
            raise MoebenchError(f"{path}: config.json not found; a model directory needs one")
        return cls.from_dict(read_json(path), name=path.parent.name.lower())


def read_json(path: Path, required: bool = True) -> dict:
    """A JSON object from `path`; {} when an optional file is absent; a clear error when malformed."""
    if not path.is_file():
        if required:
            raise MoebenchError(f"{path}: file not found")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoebenchError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise MoebenchError(f"{path}: expected a JSON object")
    return data
