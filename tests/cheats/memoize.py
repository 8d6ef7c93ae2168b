"""Cheat: memoizes its outputs by input. A request whose tokens it has seen before is answered from a dictionary,
without computing (the output-caching exploit of GPU MODE's live leaderboard). Fresh prompts make the cache
useless for timed runs; the caching audit sees the repeated prompt run faster and flags the evaluation."""

from moebench.model.qwen3_moe import Qwen3MoeForCausalLM as Reference


class Qwen3MoeForCausalLM(Reference):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.memo, self.seen = {}, ()

    def forward(self, input_ids, step, cache):
        # The whole sequence so far is the key: a prefill starts it, each decode step extends it.
        self.seen = (self.seen if input_ids.shape[1] == 1 else ()) + tuple(input_ids.flatten().tolist())
        key = (self.seen, step.last is None)
        if key not in self.memo:
            self.memo[key] = super().forward(input_ids, step, cache)
        return self.memo[key]
