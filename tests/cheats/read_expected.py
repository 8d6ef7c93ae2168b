"""Cheat: reads the expected logits from disk. When its prompt is one the harness stored expected logits for, it
returns those (so validation passes) instead of computing; on any other prompt it returns zeros, instantly. The
timed runs use fresh prompts and every timed output is checked against the reference: the evaluation fails."""

import json
from pathlib import Path

import torch

from moebench.model.qwen3_moe import Qwen3MoeForCausalLM as Reference


class Qwen3MoeForCausalLM(Reference):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stolen, self.playing, self.pos = {}, None, 0
        for meta in Path.cwd().glob("expected_logits_*.json"):
            try:
                ids = tuple(json.loads(meta.read_text())["prompt_ids"][0])
                self.stolen[ids] = torch.load(meta.with_suffix(".pt"))[:, 0]  # [new_tokens, V]
            except (OSError, ValueError, KeyError):
                pass

    def forward(self, input_ids, step, cache):
        B, T = input_ids.shape
        V = self.config.vocab_size
        if T > 1:  # a prompt (padded to its bucket): is it one whose answer is on disk?
            ids = tuple(input_ids[0].tolist())
            self.playing = next((v for k, v in self.stolen.items() if ids[:len(k)] == k), None)
            self.pos = 0
        if self.playing is not None and self.pos < len(self.playing):
            out = self.playing[self.pos].view(1, 1, V).expand(B, 1 if step.last is not None else T, V)
            self.pos += 1
            return out.to(input_ids.device)
        return torch.zeros(B, 1 if step.last is not None else T, V, device=input_ids.device)
