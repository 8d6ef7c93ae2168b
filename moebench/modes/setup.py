"""What every mode does first: pick the device and dtype, open the model, tokenize the prompts, fix the lengths."""

from dataclasses import dataclass, replace

import torch

from moebench.cli.args import RunConfig
from moebench.engine.generator import Engine, auto_buckets, engine_for
from moebench.engine.sampling import OnDeviceSampling, SamplingParams
from moebench.errors import MoebenchError
from moebench.model.loader import ModelSource, open_model


SMALL_MODEL = 50e6  # parameters: below this a CPU run uses one thread


def device_of(run: RunConfig) -> torch.device:
    target = run.platform_target or ("cuda" if torch.cuda.is_available() else "cpu")
    if target == "cuda" and not torch.cuda.is_available():
        raise MoebenchError("--platform-target cuda: no CUDA device is visible to torch")
    return torch.device(target)


def open_source(run: RunConfig) -> ModelSource:
    """The model of --model-path. On the CPU a small model runs on one thread: it gains nothing from a second,
    and two threads wait on each other at every op whenever anything else runs on the machine (a busy 2-core
    box becomes 100x slower). The reference and the submission share the setting."""
    source = open_model(run.model_path)
    if device_of(run).type == "cpu" and source.config.num_parameters() < SMALL_MODEL:
        torch.set_num_threads(1)
    return source


def dtype_of(run: RunConfig) -> torch.dtype:
    return getattr(torch, run.torch_dtype)


@dataclass
class Request:
    """A tokenized batch of prompts and how many tokens to generate for it."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    max_new_tokens: int
    min_new_tokens: int  # equal to max_new_tokens unless the user capped the length
    pad_id: int
    eos_ids: tuple[int, ...]


def buckets_of(run: RunConfig) -> dict:
    """Engine's ctx_buckets and tkg_buckets: none without --enable-bucketing, else the given sizes or NxDI's
    automatic rule up to the longest prompt and to --seq-len ([128, 256, 640] for the default 640)."""
    if not run.enable_bucketing:
        return dict(ctx_buckets=(), tkg_buckets=())
    ctx = run.context_encoding_buckets or auto_buckets(run.max_context_length or run.seq_len)
    return dict(ctx_buckets=tuple(sorted(set(ctx))),
                tkg_buckets=tuple(sorted(set(run.token_generation_buckets or auto_buckets(run.seq_len)))))


def at_seq_len(run: RunConfig, seq_len: int, **changes) -> RunConfig:
    """The run at another sequence length (a prompt's from prompt_data, or a baseline's prompt and new tokens),
    its --max-context-length and bucket sizes capped to fit it: flags that fit --seq-len fit the run."""
    longest = None if run.max_context_length is None else min(run.max_context_length, seq_len - 1)

    def capped(sizes, cap):
        return sizes and tuple(sorted({min(size, cap) for size in sizes}))

    return replace(run, seq_len=seq_len, max_context_length=longest, **changes,
                   context_encoding_buckets=capped(run.context_encoding_buckets, longest or seq_len),
                   token_generation_buckets=capped(run.token_generation_buckets, seq_len))


def on_device_sampling(run: RunConfig) -> OnDeviceSampling | None:
    """--on-device-sampling: generate samples with the run's parameters in the decode graph; evaluation decodes
    greedily, so there the graph returns its argmax."""
    if not run.on_device_sampling:
        return None
    params = SamplingParams(run.do_sample, run.temperature, run.top_k, run.top_p) if run.mode == "generate" else \
        SamplingParams()
    return OnDeviceSampling(params, run.global_topk, run.dynamic, run.output_logits and run.mode == "generate")


def make_engine(model, run: RunConfig, batch: int, compile: bool, banned: tuple[int, ...]) -> Engine:
    """The engine and its KV cache; a cache too large for memory is the user's --seq-len, not a bug. banned: the ids
    its greedy decoding never picks (the request's EOS ids where it gets exactly max_new_tokens, as the original's
    min_new_tokens = max_new_tokens)."""
    return engine_for(model, batch, run.seq_len, compile=compile, sampling=on_device_sampling(run), banned=banned,
                      **buckets_of(run))


def eos_ids_of(source: ModelSource) -> tuple[int, ...]:
    ids = set(source.config.eos_token_ids)
    gen_eos = source.generation.get("eos_token_id")
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    if source.tokenizer.eos_id is not None:
        ids.add(source.tokenizer.eos_id)
    return tuple(sorted(ids))


def make_request(run: RunConfig, source: ModelSource, prompts: list[str], notes: list[str] | None = None) -> Request:
    """The length rules of CONTRACTS.md: --seq-len is the total; new tokens = seq_len - prompt unless capped. A note
    where --seq-len caps the length asked for: printed, or added to `notes` (once each)."""
    tok = source.tokenizer
    pad_id = run.pad_token_id
    if pad_id is None:
        pad_id = next((i for i in (tok.pad_id, tok.eos_id, source.config.pad_token_id) if i is not None), 0)
    if pad_id >= source.config.vocab_size:
        raise MoebenchError(f"--pad-token-id {pad_id} is outside the vocabulary ({source.config.vocab_size})")
    eos_ids = eos_ids_of(source)
    if any(not 0 <= i < source.config.vocab_size for i in eos_ids):
        raise MoebenchError(f"the model's EOS ids {list(eos_ids)} (config.json, generation_config.json, tokenizer) "
                            f"are not all inside its vocabulary ({source.config.vocab_size})")
    input_ids, mask = tok.batch(prompts, pad_id, run.padding_side or tok.padding_side)
    if int(input_ids.max()) >= source.config.vocab_size:
        raise MoebenchError(f"the tokenizer produced token id {int(input_ids.max())}, outside the model's vocabulary "
                            f"({source.config.vocab_size}); tokenizer.json does not belong to this model")
    T = input_ids.shape[1]
    longest = run.max_context_length or run.seq_len - 1
    if T > longest:
        what = f"--max-context-length {run.max_context_length}" if run.max_context_length else \
               f"--seq-len {run.seq_len} (which includes at least one new token)"
        raise MoebenchError(f"the prompt is {T} tokens, longer than {what}")
    buckets = buckets_of(run)
    largest = max(buckets["ctx_buckets"] + buckets["tkg_buckets"], default=0)
    if largest > run.seq_len:  # evaluate_all's sequence length comes from prompt_data: check against it
        raise MoebenchError(f"bucket {largest} is larger than the sequence length {run.seq_len}, the KV cache")
    if buckets["ctx_buckets"] and T > buckets["ctx_buckets"][-1]:
        raise MoebenchError(f"the prompt is {T} tokens, longer than the largest context-encoding bucket "
                            f"({buckets['ctx_buckets'][-1]})")
    room = run.seq_len - T
    top = buckets["tkg_buckets"][-1] if buckets["tkg_buckets"] else None
    if top is not None and top - T < 1:
        raise MoebenchError(f"the prompt is {T} tokens: the largest token-generation bucket ({top}) leaves no room "
                            "for a new token")
    if run.max_new_tokens is not None:
        wanted, asked = run.max_new_tokens, f"--max-new-tokens {run.max_new_tokens}"
    elif run.max_length is not None:
        if run.max_length <= T:
            raise MoebenchError(f"--max-length {run.max_length} leaves no room after the {T}-token prompt")
        wanted, asked = run.max_length - T, f"--max-length {run.max_length}"
    else:
        wanted, asked = room, None
    new, min_new = min(wanted, room), 0 if asked else room
    if new < wanted:  # (the KV cache holds --seq-len tokens: CONTRACTS.md's cap)
        note = f"note: {asked} is capped by --seq-len {run.seq_len}: {new} new tokens after the {T}-token prompt"
        if notes is None:
            print(note)
        elif note not in notes:
            notes.append(note)
    if top is not None and T + new > top:  # generating past the largest bucket: no graph for it, as in NxDI
        raise MoebenchError(f"the largest token-generation bucket ({top}) holds the {T}-token prompt and {top - T} "
                            f"new tokens, not the {new} asked for; add a bucket of {T + new} or ask for fewer tokens "
                            "(--max-new-tokens)")
    return Request(input_ids, mask, new, min_new, pad_id, eos_ids)


def prompt_requests(runs: list[RunConfig], source: ModelSource, prompts: list[str], where: str) -> list[Request]:
    """The request of each prompt of a prompts file (runs[i] its run), all made before any long work so a prompt
    that does not fit stops the mode before it measures or writes anything; the error names the prompt."""
    reqs, notes = [], []
    for i, (run, prompt) in enumerate(zip(runs, prompts)):
        try:
            reqs.append(make_request(run, source, [prompt], notes))
        except MoebenchError as e:
            raise MoebenchError(f"{where}, prompt {i}: {e}") from None
    for note in notes:
        print(note)
    return reqs
