"""The checkpoint's tokenizer: tokenizer.json plus the special tokens of tokenizer_config.json."""

from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer

from moebench.errors import MoebenchError
from moebench.model.config import read_json


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value  # "<s>" or {"content": "<s>", ...}


class Tokenizer:
    def __init__(self, model_dir: Path):
        self.folder = Path(model_dir)
        path = self.folder / "tokenizer.json"
        if not path.is_file():
            raise MoebenchError(f"{path}: tokenizer.json not found; the model directory needs its tokenizer")
        try:
            self.tok = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise MoebenchError(f"{path}: cannot load tokenizer ({e})") from None
        cfg = read_json(self.folder / "tokenizer_config.json", required=False)
        self.bos_id = self._id(_token_text(cfg.get("bos_token")))
        self.eos_id = self._id(_token_text(cfg.get("eos_token")))
        self.pad_id = self._id(_token_text(cfg.get("pad_token")))
        self.add_bos = bool(cfg.get("add_bos_token", False)) and self.bos_id is not None
        self.padding_side = cfg.get("padding_side", "right")

    def _id(self, text: str | None) -> int | None:
        if text is None:
            return None
        i = self.tok.token_to_id(text)
        if i is None:
            raise MoebenchError(f"tokenizer_config.json names special token {text!r}, which tokenizer.json lacks")
        return i

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if self.add_bos else ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def batch(self, texts: list[str], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, T] padded with pad_id on `side`, and the attention mask [B, T] (1 = real token)."""
        seqs = [self.encode(t) for t in texts]
        if any(len(s) == 0 for s in seqs):
            raise MoebenchError("a prompt is empty after tokenization; give at least one token")
        T = max(map(len, seqs))
        ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for b, s in enumerate(seqs):
            cols = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
            ids[b, cols] = torch.tensor(s)
            mask[b, cols] = 1
        return ids, mask
