"""Batched generation with a static KV cache, split into context encoding and token generation steps."""

from dataclasses import dataclass

import torch

from moebench.engine.sampling import SamplingParams, sample
from moebench.model.qwen3_moe import KVCache, StepInputs


@dataclass
class Generation:
    tokens: torch.Tensor  # [B, N] new token ids (pad after a row's EOS)
    lengths: list[int]  # new tokens per row, EOS included
    logits: torch.Tensor | None  # [N, B, V] float32 raw logits of each generated token, when asked


class Engine:
    """Runs one model over a batch: `prefill` (the whole prompt) then `decode` (one token per row per call).

    The cache has `max_len` slots. Every column of the padded prompt takes one slot, and every decode step the
    next slot, for all rows at once; `valid` records which slots hold real tokens, so left and right padding
    give the same result as running each prompt alone."""

    def __init__(self, model: torch.nn.Module, batch: int, max_len: int, compile: bool = False):
        p = next(model.parameters())
        self.model, self.cfg, self.device = model, model.config, p.device
        self.batch, self.max_len = batch, max_len
        self.cache = KVCache(self.cfg, batch, max_len, p.dtype, p.device)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=self.device)
        self.slot_pos = torch.zeros(batch, max_len, dtype=torch.long, device=self.device)
        self.next_slot = 0
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.all_slots = torch.arange(max_len, device=self.device)
        # Decode steps have static shapes (the mask spans the whole cache), so one compiled graph serves them all.
        self._decode_step = torch.compile(self._decode_step, dynamic=False) if compile else self._decode_step

    def _mask(self, q_slots: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, S] bool: causal over slots, real keys only (each query always sees itself)."""
        S = int(q_slots[-1]) + 1
        k_slots = torch.arange(S, device=self.device)
        causal = k_slots[None, :] <= q_slots[:, None]  # [T, S]
        mask = causal[None] & (self.valid[:, None, :S] | (k_slots[None, None, :] == q_slots[None, :, None]))
        if self.cfg.sliding_window is not None:
            q_pos = self.slot_pos[:, q_slots]  # [B, T]
            mask &= (q_pos[:, :, None] - self.slot_pos[:, None, :S]) < self.cfg.sliding_window
        return mask[:, None]

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, every_column: bool = False):
        """Context encoding: input_ids, attention_mask [B, T] -> logits of each row's last real token [B, V]
        (of every column [B, T, V] with every_column)."""
        B, T = input_ids.shape
        assert B == self.batch and T <= self.max_len, (B, T)
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device).bool()
        self.valid.zero_()
        self.valid[:, :T] = attention_mask
        positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)  # [B, T]
        self.slot_pos[:, :T] = positions
        slots = torch.arange(T, device=self.device)
        last = (attention_mask.long() * slots).argmax(1)  # [B] last real column, for either padding side
        step = StepInputs(positions=positions, slots=slots, mask=self._mask(slots), last=None if every_column else last)
        logits = self.model(input_ids, step, self.cache)
        self.next_slot, self.next_pos = T, attention_mask.long().sum(1)
        return logits if every_column else logits[:, -1]

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token generation: one new token per row [B] -> logits [B, V]."""
        slot = self.next_slot
        assert slot < self.max_len, "KV cache full"
        self.valid[:, slot] = True
        self.slot_pos[:, slot] = self.next_pos
        slots = self.all_slots[slot:slot + 1]
        mask = self.valid & (self.all_slots <= slot)  # [B, S]: real tokens up to this one
        if self.cfg.sliding_window is not None:
            mask &= (self.next_pos[:, None] - self.slot_pos) < self.cfg.sliding_window
        logits = self._decode_step(tokens.to(self.device)[:, None], self.next_pos[:, None], slots, mask[:, None, None])
        self.next_slot, self.next_pos = slot + 1, self.next_pos + 1
        return logits

    def _decode_step(self, tokens, positions, slots, mask):
        step = StepInputs(positions=positions, slots=slots, mask=mask)
        return self.model(tokens, step, self.cache)[:, -1]

    def greedy(self, input_ids, attention_mask, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain argmax decoding of exactly new_tokens tokens, EOS included (evaluation's decoding):
        (tokens [B, N], raw float32 logits [N, B, V])."""
        logits = [self.prefill(input_ids, attention_mask)]
        tokens = [logits[-1].argmax(-1)]
        for _ in range(new_tokens - 1):
            logits.append(self.decode(tokens[-1]))
            tokens.append(logits[-1].argmax(-1))
        return torch.stack(tokens, 1).cpu(), torch.stack(logits).float().cpu()

    def generate(self, input_ids, attention_mask, max_new_tokens: int, min_new_tokens: int = 0,
                 sampling: SamplingParams = SamplingParams(), generator: torch.Generator | None = None,
                 eos_ids: tuple[int, ...] = (), pad_id: int = 0, keep_logits: bool = False,
                 on_token=None) -> Generation:
        """Prefill, then decode until every row has max_new_tokens or has emitted EOS (after min_new_tokens)."""
        B, T = input_ids.shape
        assert T + max_new_tokens - 1 <= self.max_len, "prompt + new tokens exceed the KV cache"
        eos = torch.tensor(eos_ids, dtype=torch.long, device=self.device)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        lengths = torch.zeros(B, dtype=torch.long, device=self.device)
        out, kept = [], []
        logits = self.prefill(input_ids, attention_mask)
        for i in range(max_new_tokens):
            if keep_logits:
                kept.append(logits.float().cpu())
            scores = logits
            if i < min_new_tokens and len(eos_ids):
                scores = logits.index_fill(1, eos, float("-inf"))  # EOS may not end the row yet
            tok = torch.where(done, pad_id, sample(scores, sampling, generator))
            lengths += ~done
            if len(eos_ids):
                done |= torch.isin(tok, eos)
            out.append(tok)
            if on_token is not None:
                on_token(i)
            if i + 1 == max_new_tokens or bool(done.all()):
                break
            logits = self.decode(tok)
        return Generation(tokens=torch.stack(out, 1).cpu(), lengths=lengths.tolist(),
                          logits=torch.stack(kept) if keep_logits else None)
