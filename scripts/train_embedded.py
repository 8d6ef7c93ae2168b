"""Trains the embedded model (moebench-tiny) on text every machine has and writes the weights moebench ships.

    python scripts/train_embedded.py [--seed 0] [--steps 2000] [--lr 6e-3] [--minutes 25]

The text is the tokenizer's own corpus, the docstrings of Python's standard library (make_tokenizer.py), plus the
language reference that ships with Python (pydoc_data.topics); documents are joined with <|endoftext|> and every
50th one is held out. The model is transformers' Qwen3MoeForCausalLM with the preset's exact config, trained in
float32 on one thread (AdamW, warm-up then cosine, a load-balancing loss for the router). The same seed gives the
same weights; --minutes only stops a run that would overrun. Writes OUT/model.safetensors (bfloat16) and
OUT/weights.json (its sha256, which moebench checks), and a plot of the loss curve; then, from the shipped file as
moebench loads it, prints held-out perplexity against the untrained model and greedy continuations.
"""

import argparse
import hashlib
import json
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from make_tokenizer import stdlib_docstrings
from moebench.engine.generator import Engine
from moebench.evaluation.records import read_prompts
from moebench.model.checkpoint import load_weights, save_weights
from moebench.model.loader import build_model, open_model
from moebench.model.presets import ASSETS, EMBEDDED, PRESETS, random_model, write_checkpoint
from moebench.model.qwen3_moe import ModelOptions, Qwen3MoeForCausalLM
from moebench.report.svg import lines

ROOT = Path(__file__).resolve().parents[1]
EOS = 0  # <|endoftext|>
HOLD_OUT_EVERY = 50  # every 50th document (2%) is for evaluation only
PROMPTS = list(dict.fromkeys(["I believe the meaning of life is"] + read_prompts(ROOT / "prompts.txt")))


def documents() -> list[str]:
    """Stdlib docstrings and the language reference's topics, in a fixed order, each once."""
    from pydoc_data.topics import topics

    docs = list(stdlib_docstrings()) + [topics[k] for k in sorted(topics)]
    return list(dict.fromkeys(d.strip() for d in docs if d.strip()))  # the stdlib repeats some docstrings


def token_stream(tok, docs: list[str]) -> torch.Tensor:
    """Every document's tokens followed by <|endoftext|>, as one long 1-D tensor."""
    ids = []
    for enc in tok.encode_batch(docs):
        ids += enc.ids + [EOS]
    return torch.tensor(ids)


def windows(stream: torch.Tensor, seq: int, offset: int = 0) -> torch.Tensor:
    """[N, seq + 1] overlapping by one token: inputs are [:, :-1], targets [:, 1:], so each token is predicted once."""
    n = (len(stream) - offset - 1) // seq
    return stream[offset:offset + n * seq + 1].unfold(0, seq + 1, seq)


def batches(stream: torch.Tensor, seq: int, batch: int, gen: torch.Generator):
    """Endless training batches [batch, seq + 1]: each epoch cuts the stream at a new random offset and shuffles."""
    while True:
        w = windows(stream, seq, int(torch.randint(seq, (1,), generator=gen)))
        order = torch.randperm(len(w), generator=gen)
        for i in range(0, len(order) - batch + 1, batch):
            yield w[order[i:i + batch]]


@torch.no_grad()
def mean_nll(logits_fn, held: torch.Tensor, batch: int = 8) -> float:
    """Mean next-token cross-entropy (nats) over the held-out windows; logits_fn: ids [B, T] -> [B, T, V]."""
    total, count = 0.0, 0
    for x in held.split(batch):
        logits = logits_fn(x[:, :-1]).float()
        total += F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        count += x[:, 1:].numel()
    return total / count


def moebench_logits(model):
    """Every column's logits from moebench's reference model (the engine's context-encoding step)."""
    return lambda x: Engine(model, x.shape[0], x.shape[1]).prefill(x, torch.ones_like(x), every_column=True)


def lr_at(step: int, args) -> float:
    """Linear warm-up, then cosine down to a tenth of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    done = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)))


def hf_model(args):
    """transformers' model with exactly the preset's config, initialised from the seed."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM as HFModel

    hf = PRESETS[EMBEDDED].to_hf_dict()
    hf.update(torch_dtype="float32", output_router_logits=True)  # for the load-balancing loss
    torch.manual_seed(args.seed)
    return HFModel(Qwen3MoeConfig(**hf)).float().train()


def train(args, train_stream, held):
    model = hf_model(args)
    decay = [p for p in model.parameters() if p.ndim >= 2]  # not the norms' scales
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    data = batches(train_stream, args.seq, args.batch, torch.Generator().manual_seed(args.seed))
    curve, recent, start = {"train": [], "held-out": []}, [], time.time()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        x = next(data)
        out = model(input_ids=x[:, :-1])
        ce = F.cross_entropy(out.logits.flatten(0, 1), x[:, 1:].flatten())
        (ce + args.aux * out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        recent.append(ce.item())
        last = step + 1 == args.steps
        late = time.time() - start > args.minutes * 60
        if (step + 1) % args.log_every == 0 or last or late:
            line = f"step {step + 1:5d}/{args.steps}  lr {lr_at(step, args):.2e}  train {sum(recent) / len(recent):.3f}"
            curve["train"].append((step + 1, sum(recent) / len(recent)))
            recent = []
            if (step + 1) % args.eval_every == 0 or last or late:
                model.eval()
                nll = mean_nll(lambda ids: model(input_ids=ids).logits, held)
                model.train()
                curve["held-out"].append((step + 1, nll))
                line += f"  held-out {nll:.3f} (ppl {math.exp(nll):.1f})"
            print(f"{line}  aux {out.aux_loss.item():.3f}  {(time.time() - start) / 60:.1f} min", flush=True)
        if late and not last:
            print(f"stopped by --minutes {args.minutes} at step {step + 1} of {args.steps}: these weights depend on "
                  "the machine's speed; use fewer --steps for a reproducible run", flush=True)
            break
    return model.eval(), curve, time.time() - start


def ship(hf, out: Path) -> str:
    """transformers' weights -> moebench's model in bfloat16 -> OUT/model.safetensors; returns its sha256."""
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        with torch.device("meta"):
            model = Qwen3MoeForCausalLM(PRESETS[EMBEDDED], ModelOptions())
        load_weights(model, Path(tmp), torch.bfloat16, "cpu")
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out)
    (out / "model.safetensors").chmod(0o644)
    return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()


def report(out: Path, held: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Held-out perplexity of the shipped weights (loaded by moebench, float32 compute) and of the untrained model;
    greedy continuations of the prompts."""
    cfg = PRESETS[EMBEDDED]
    untrained = math.exp(mean_nll(moebench_logits(random_model(cfg, seed=0)), held))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / EMBEDDED
        with torch.device("meta"):
            model = Qwen3MoeForCausalLM(cfg, ModelOptions())
        load_weights(model, out, torch.bfloat16, "cpu")
        write_checkpoint(model, folder)  # a whole checkpoint folder, opened the way the harness opens one
        source = open_model(str(folder))
        model = build_model(Qwen3MoeForCausalLM, source, ModelOptions(), torch.float32, "cpu")
    trained = math.exp(mean_nll(moebench_logits(model), held))
    print(f"\nheld-out perplexity ({held[:, 1:].numel()} tokens): trained {trained:.2f}, untrained {untrained:.1f}")
    for prompt in PROMPTS:
        ids, mask = source.tokenizer.batch([prompt], 0, "right")
        tokens, _ = Engine(model, 1, ids.shape[1] + new_tokens).greedy(ids, mask, new_tokens)
        tokens = tokens[0].tolist()
        text = source.tokenizer.decode(tokens[:tokens.index(EOS)] if EOS in tokens else tokens)
        print(f"\n--- {prompt!r}\n{text!r}")
    return trained, untrained


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=2000, help="optimizer steps; the default takes ~22 min on one core")
    ap.add_argument("--minutes", type=float, default=25.0, help="wall-clock budget: training stops here if not done")
    ap.add_argument("--lr", type=float, default=6e-3, help="peak learning rate")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256, help="tokens per training sequence")
    ap.add_argument("--aux", type=float, default=0.01, help="weight of the router's load-balancing loss")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=40, help="greedy tokens per prompt in the final report")
    ap.add_argument("--out", type=Path, default=ASSETS / EMBEDDED)
    ap.add_argument("--plot", type=Path, default=Path(__file__).with_name("train_embedded_loss.svg"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # the same arithmetic on every run, and a core left for the machine's other work

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ASSETS / "tokenizer.json"))
    assert tok.token_to_id("<|endoftext|>") == EOS
    docs = documents()
    train_stream = token_stream(tok, [d for i, d in enumerate(docs) if i % HOLD_OUT_EVERY])
    held = windows(token_stream(tok, docs[::HOLD_OUT_EVERY]), args.seq)
    print(f"{len(docs)} documents: {len(train_stream)} training tokens, {held[:, 1:].numel()} held out; "
          f"{args.steps} steps of {args.batch}x{args.seq} tokens = "
          f"{args.steps * args.batch * args.seq / len(train_stream):.1f} epochs", flush=True)

    model, curve, seconds = train(args, train_stream, held)
    sha = ship(model, args.out)
    args.plot.write_text(lines(curve, f"{EMBEDDED}: loss (seed {args.seed}, {args.steps} steps, lr {args.lr})",
                               "step", "cross-entropy (nats/token)"))
    trained, untrained = report(args.out, held, args.new_tokens)
    command = "python scripts/train_embedded.py " + shlex.join(sys.argv[1:])
    meta = {"sha256": sha, "command": command.strip(), "train_minutes": round(seconds / 60, 1),
            "held_out_perplexity": round(trained, 2), "untrained_perplexity": round(untrained, 1)}
    (args.out / "weights.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"\n{args.out}/model.safetensors sha256 {sha}; trained {seconds / 60:.1f} min; plot {args.plot}")


if __name__ == "__main__":
    main()
