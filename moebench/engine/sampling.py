"""Token sampling: one pure function. Greedy when do_sample is off or the temperature is 0."""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0 or self.top_k == 1


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. Temperature, then top-k, then top-p (nucleus), then a draw, as transformers.

    The draw uses `generator` (seeded by the caller), so a seed gives the same tokens on every run."""
    if params.greedy:
        return logits.argmax(dim=-1)
    scores = logits.float()
    scores = (scores - scores.max(dim=-1, keepdim=True).values) / params.temperature  # (no overflow at a tiny one)
    if 0 < params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= 1 - params.top_p  # the low tail whose mass is at most 1 - top_p
        drop[:, -1] = False  # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = scores.softmax(dim=-1)
    # Draw on the CPU with the caller's generator: the same seed gives the same tokens on any device.
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)


@dataclass(frozen=True)
class OnDeviceSampling:
    """--on-device-sampling: the token-generation graph samples and returns token ids (NxDI's in-graph sampler)."""

    params: SamplingParams
    global_topk: int = 256  # candidates kept by the first top-k (NxDI's distributed prefilter); 0: sort them all
    dynamic: bool = False  # sampling parameters are tensor inputs of the graph: changing them never recompiles
    output_logits: bool = False  # the graph also returns the logits


def on_device_sample(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, temperature: torch.Tensor,
                     uniform: torch.Tensor, global_topk: int, do_sample: bool,
                     banned: tuple[int, ...] = ()) -> torch.Tensor:
    """logits [B, V], per-row top_k [B] (0: no limit), top_p [B], temperature [B], a uniform draw [B] in [0, 1)
    -> token ids [B]. NxDI's sampler math (modules/generation/sampling.py), written to run inside a compiled graph:
    the global top-k candidates sorted by logit, candidates ranked top_k or lower set to -3000, divided by the
    temperature, the tail beyond the top_p mass cut (the most likely token always kept), then an inverse-CDF draw
    at `uniform`. Without do_sample: the argmax, never one of the `banned` ids (greedy's min_new_tokens rule; a
    draw keeps them, as NxDI's sampler applies no logits processor)."""
    if not do_sample:
        if banned:
            logits = logits.index_fill(-1, torch.tensor(banned, device=logits.device), float("-inf"))
        return logits.argmax(dim=-1)
    V = logits.shape[-1]
    K = V if global_topk <= 0 else min(global_topk, V)
    values, ids = torch.topk(logits.float(), K, dim=-1)  # [B, K], sorted: rank 0 is the most likely
    ranks = torch.arange(K, device=logits.device)
    limit = torch.where(top_k > 0, top_k, K)[:, None]
    # the top logit subtracted first (softmax is the same): a tiny temperature cannot overflow to inf - inf
    values = (torch.where(ranks >= limit, -3000.0, values) - values[:, :1]) / temperature[:, None]
    cum = values.softmax(dim=-1).cumsum(dim=-1)
    cut = (cum > torch.maximum(cum[:, :1], top_p[:, None])) & (ranks > 0)
    cum = torch.where(cut, -3000.0, values).softmax(dim=-1).cumsum(dim=-1)
    cum = cum / cum[:, -1:]  # as NxDI: the CDF ends at exactly 1, so a draw never falls past the last candidate
    pick = (cum < uniform[:, None]).sum(dim=-1).clamp(max=K - 1)  # [B]: the first rank whose CDF reaches the draw
    return ids.gather(1, pick[:, None]).squeeze(1)
