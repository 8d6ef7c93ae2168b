"""Run options: one frozen dataclass whose fields (defaults, help, flag names) also build the argparse parser."""

import argparse
import ast
import dataclasses
import math
import os
from dataclasses import dataclass, field

from moebench.engine.parallel import launched_by_torchrun
from moebench.errors import MoebenchError
from moebench.evaluation.accuracy import DEFAULT_TOL_MAP
from moebench.model.qwen3_moe import QUANT_DTYPES, ModelOptions

MODES = ("evaluate_single", "evaluate_all", "validate", "generate", "generate_accuracy_baselines")
DEFAULT_PROMPT = "I believe the meaning of life is"
VALIDATING = ("evaluate_single", "evaluate_all", "validate")
SCORED = ("evaluate_single", "evaluate_all")
SAMPLING = ("generate",)  # evaluation decodes greedily, as the original driver did
TIMED = SCORED + ("generate", "generate_accuracy_baselines")
BUILDS = VALIDATING + ("generate",)  # the modes that build the submission (--qwen, the kernel flags)


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "y", "on"):
        return True
    if value in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false/1/0/yes/no, got {text!r}")


def parse_tol_map(text: str) -> dict:
    """'{None: (1e-5, 0.05), 50: (1e-5, 0.03)}' -> {None|int: (atol, rtol)}, checked."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(f"not a Python literal: {text!r}") from None
    if not isinstance(value, dict) or not value:
        raise argparse.ArgumentTypeError("expected a non-empty dict like {None: (1e-5, 0.05), 50: (1e-5, 0.03)}")
    for k, v in value.items():
        ok_key = k is None or (isinstance(k, int) and not isinstance(k, bool) and k > 0)
        ok_val = (isinstance(v, (tuple, list)) and len(v) == 2
                  and all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < math.inf
                          for x in v))
        if not (ok_key and ok_val):
            raise argparse.ArgumentTypeError(f"entry {k!r}: {v!r}: keys are None or a positive int top-k, "
                                             "values (atol, rtol) with finite non-negative numbers")
    return {k: (float(v[0]), float(v[1])) for k, v in value.items()}


def _number(kind, low, strict: bool, high=None):
    """A parser for numbers of `kind` above `low` (strict) or at least `low`, and at most `high` (when given)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            what = {int: "a whole number", float: "a number"}.get(kind, kind.__name__)
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value):  # nan passes every comparison; inf overflows timeouts and the score
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high:g}, got {text}")
        return value
    parse.__name__ = f"{kind.__name__}"
    return parse


def positive(kind):
    """A parser for numbers of `kind` above 0 (argparse's type; the bench scripts use it too)."""
    return _number(kind, 0, strict=True)


def _nonneg(kind):
    return _number(kind, 0, strict=False)


def _seed(text):
    value = _nonneg(int)(text)
    if value >= 2 ** 64:  # torch.Generator.manual_seed takes an unsigned 64-bit seed
        raise argparse.ArgumentTypeError(f"must be below 2**64, got {text}")
    return value


def _file_part(text):
    """A name that goes into a file name in the working folder (the team's records): no folder in it."""
    if "/" in text or "\0" in text:
        raise argparse.ArgumentTypeError(f"{text!r} would not name a file in the working folder (no '/' in it)")
    if len(text.encode("utf-8", "surrogateescape")) > 128:
        raise argparse.ArgumentTypeError(f"{len(text)} characters: too long for a file name (at most 128 bytes)")
    return text


# A score's base (latency in ms, throughput in tokens/s): bounded, so that no score overflows to inf.
_BASE = _number(float, 1e-6, strict=False, high=1e9)


def opt(default, help, *, flags=(), type=None, choices=None, bool_flag=False, append=False, many=False,
        modes=None, no_effect=None):
    """A run option. modes: the modes it affects (elsewhere an explicit value prints a note); no_effect: why it
    never matters."""
    return field(default=default, metadata=dict(help=help, flags=flags, type=type, choices=choices,
                                                bool_flag=bool_flag, append=append, many=many, modes=modes,
                                                no_effect=no_effect))


@dataclass(frozen=True)
class RunConfig:
    # Contest-specific
    mode: str = opt(None, "what to run: generate prints continuations; the others evaluate a submission",
                    choices=MODES)
    qwen: str = opt("qwen", "contestant module: NAME.py in the working directory, a module on the Python path, or "
                            "a .py path (default: ./qwen.py, else moebench's template)",
                modes=BUILDS)
    enable_nki: bool = opt(False, "switch the model's building blocks to moebench's registered Triton kernels "
                                  "(the guide's name; alias --enable-kernels)",
                           flags=("--enable-nki", "--enable-kernels"), bool_flag=True, modes=BUILDS)
    base_latency: float = opt(None, "baseline end-to-end p99 latency in ms for the score (default: the reference "
                                    "measured on this machine)", type=_BASE, modes=SCORED)
    base_throughput: float = opt(None, "baseline throughput in tokens/s for the score (default: measured)",
                                 type=_BASE, modes=SCORED)
    team_id: str = opt(None, "team identifier; names the score-records CSV", type=_file_part, modes=SCORED)
    member_id: str = opt(None, "team member identifier, stored in the score records", modes=SCORED)
    isolation: str = opt("user", "user: the submission runs in its own process, as an unprivileged user in a private "
                                 "view of the filesystem where the harness runs as root; process: its own process, "
                                 "this same user; none: one process, for debugging. The harness keeps the clock, "
                                 "the reference and the records", choices=("user", "process", "none"),
                         modes=VALIDATING)
    phase_time_limit: float = opt(3600.0, "seconds the submission may take for each phase (load and compile, "
                                          "validation, benchmark, FLOP count) before it is stopped and fails",
                                  type=_number(float, 0, strict=True, high=1e6), modes=VALIDATING)
    audit_pairs: int = opt(5, "caching audit: pairs of (fresh prompt, repeated prompt) timed after the benchmark, "
                              "and as many again when every repeated run was over 10%% faster; flagged when it is "
                              "in both rounds (0: no audit)",
                           type=_nonneg(int), modes=SCORED)
    # Model configuration
    model_path: str = opt(None, "Hugging Face Qwen3-MoE folder, or preset:NAME (moebench-tiny, moebench-speed, "
                                "qwen3-30b-a3b); default: the embedded moebench-tiny model")
    compiled_model_path: str = opt("traced_model", "folder for the compile step's artifacts: exported graphs per "
                                                   "submodel and bucket, compiled code, tokenizer, manifest, sharded "
                                                   "weights", modes=BUILDS)
    platform_target: str = opt(None, "device to run on: cpu or cuda (default: cuda when present, else cpu); "
                                     "trn2/trn3 exist only on AWS Trainium", choices=("cpu", "cuda", "trn2", "trn3"))
    # Evaluation
    benchmark: bool = opt(False, "generate: also benchmark latency and throughput and write benchmark_report.json "
                                 "(the evaluate modes always do)", bool_flag=True, modes=("generate",))
    divergence_difference_tol: float = opt(None, "largest allowed logit gap (raw logit units) between the "
                                                 "expected and the chosen token where greedy choices diverge "
                                                 "(default: chosen per dtype)", type=_nonneg(float), modes=VALIDATING)
    tol_map: dict = opt(None, "per-top-k tolerances as a Python dict {k or None: (atol, rtol)} (default: the "
                              f"guide's {DEFAULT_TOL_MAP})", type=parse_tol_map, modes=VALIDATING)
    num_tokens_to_check: int = opt(None, "validate only the first N generated tokens (default: all)",
                                   type=positive(int), modes=VALIDATING)
    # Generation
    prompt: tuple = opt((), f"a prompt; repeat the flag for several (default: {DEFAULT_PROMPT!r}; the "
                            "prompts.txt modes read theirs from that file)", append=True,
                        modes=("evaluate_single", "validate", "generate"))
    top_k: int = opt(20, "sample only among the k most likely tokens (0: no limit)", type=_nonneg(int),
                     modes=SAMPLING)
    top_p: float = opt(0.95, "nucleus sampling: smallest set of tokens with this total probability",
                       type=positive(float), modes=SAMPLING)
    temperature: float = opt(0.6, "sampling temperature (0: greedy)", type=_nonneg(float), modes=SAMPLING)
    global_topk: int = opt(256, "on-device sampling: candidates kept by the first top-k (0: all)",
                           type=_nonneg(int), modes=SAMPLING)
    do_sample: bool = opt(True, "sample (true) or decode greedily (false); evaluation always decodes greedily",
                          bool_flag=True, modes=SAMPLING)
    dynamic: bool = opt(False, "on-device sampling: sampling parameters are inputs of the decode graph (no "
                               "recompilation when they change)", bool_flag=True, modes=SAMPLING)
    pad_token_id: int = opt(None, "token id used for padding (default: the tokenizer's pad token)", type=_nonneg(int))
    # Basic configuration
    torch_dtype: str = opt("bfloat16", "dtype of weights and activations", choices=("bfloat16", "float16", "float32"))
    batch_size: int = opt(1, "batch size; always set to the number of prompts, as in the guide", type=positive(int),
                          no_effect="the batch is the prompts given")
    padding_side: str = opt(None, "pad prompts of unequal length on the left or right (default: the tokenizer's)",
                            choices=("left", "right"))
    seq_len: int = opt(640, "total length, prompt included; sizes the KV cache", type=positive(int))
    n_active_tokens: int = opt(None, "NxDI field, overwritten per submodel there", type=positive(int),
                               no_effect="NxDI overwrites it per submodel (context: the prompt, decode: 1)")
    n_positions: int = opt(None, "NxDI field, reset to the bucket size there", type=positive(int),
                           no_effect="the KV cache is sized by --seq-len")
    max_context_length: int = opt(None, "longest prompt accepted, in tokens (default: --seq-len - 1)",
                                  type=positive(int))
    max_new_tokens: int = opt(None, "new tokens to generate (default: --seq-len minus the prompt; capped by "
                                    "--seq-len); in generate, EOS may then end a sequence early", type=positive(int))
    max_length: int = opt(None, "total length to generate to (default: --seq-len; capped by it)", type=positive(int))
    rpl_reduce_dtype: str = opt(None, "dtype of tensor-parallel all-reduces of row-parallel outputs",
                                choices=("bfloat16", "float16", "float32"))
    output_logits: bool = opt(False, "write the raw logits of every generated token to output_logits.pt (with "
                                     "--on-device-sampling the decode graph then returns them too)",
                              bool_flag=True, modes=SAMPLING)
    vocab_parallel: bool = opt(False, "tensor parallelism: shard the embedding over the vocabulary too",
                               bool_flag=True)
    skip_compile: bool = opt(False, "reuse the artifacts under --compiled-model-path instead of compiling; "
                                    "artifacts made for another model, weights, module or flags are refused",
                             bool_flag=True, modes=BUILDS)
    save_sharded_checkpoint: bool = opt(True, "write one weight file per tensor-parallel rank at compile time, "
                                              "read directly (no re-sharding) by --skip-compile",
                                        flags=("--save_sharded_checkpoint", "--save-sharded-checkpoint"),
                                        bool_flag=True, modes=BUILDS)
    # Attention
    fused_qkv: bool = opt(False, "compute q, k and v with one fused matmul", bool_flag=True, modes=BUILDS)
    sequence_parallel_enabled: bool = opt(False, "tensor parallelism: split the context-encoding sequence over the "
                                                 "ranks between blocks (norms and residuals on T / N rows each)",
                                          bool_flag=True)
    flash_decoding_enabled: bool = opt(False, "the Triton split-K flash-decoding kernel for decode steps",
                                       bool_flag=True, modes=BUILDS)
    on_device_sampling: bool = opt(False, "sample inside the compiled decode graph, which returns token ids "
                                          "(evaluation: its greedy argmax)", bool_flag=True, modes=TIMED)
    # Bucketing
    enable_bucketing: bool = opt(True, "pad prompts to the first fitting context-encoding bucket and attend "
                                       "decode steps over the first fitting token-generation bucket: one graph "
                                       "per bucket (false: exact prompt lengths, decode over the whole cache)",
                                 bool_flag=True)
    bucket_n_active_tokens: bool = opt(False, "NxDI field, overwritten per submodel there", bool_flag=True,
                                       no_effect="NxDI overwrites it per submodel")
    context_encoding_buckets: tuple = opt(None, "context-encoding bucket sizes (default with --enable-bucketing: "
                                                "128, 256, ... below --max-context-length (else --seq-len), "
                                                "then it)",
                                          type=positive(int), many=True)
    token_generation_buckets: tuple = opt(None, "token-generation bucket sizes (default with --enable-bucketing: "
                                                "128, 256, ... below --seq-len, then --seq-len)",
                                          type=positive(int), many=True)
    # Parallelism
    tp_degree: int = opt(1, "tensor-parallel ranks, started by moebench (gloo on the CPU) or by torchrun "
                            "(default: torchrun's ranks under torchrun, else 1: one process; the guide's 4 was "
                            "four NeuronCores)", type=positive(int))
    # Kernels
    qkv_kernel_enabled: bool = opt(False, "the Triton kernel fusing the input RMSNorm, QKV projection, q/k norms "
                                          "and RoPE (needs --fused-qkv)", bool_flag=True, modes=BUILDS)
    attn_kernel_enabled: bool = opt(False, "the Triton flash-attention kernel (context encoding and decode)",
                                    bool_flag=True, modes=BUILDS)
    mlp_kernel_enabled: bool = opt(False, "the Triton MoE router and fused expert kernels", bool_flag=True,
                                   modes=BUILDS)
    quantized_mlp_kernel_enabled: bool = opt(False, "experts with int8/fp8 weights (per-channel scales), "
                                                    "dequantized in the Triton kernel; changes the numbers, so "
                                                    "--enable-nki never turns it on", bool_flag=True, modes=BUILDS)
    rmsnorm_quantize_kernel_enabled: bool = opt(False, "post-attention RMSNorm fused with the activations' "
                                                       "quantization (needs --quantized-mlp-kernel-enabled)",
                                                bool_flag=True, modes=BUILDS)
    quantized_kernel_lower_bound: float = opt(ModelOptions.quant_bound,
                                              "activations are clamped to +-this before quantized matmuls",
                                              type=positive(float), modes=BUILDS)
    mlp_kernel_fuse_residual_add: bool = opt(False, "fuse the residual add into the MoE kernel (needs an MoE "
                                                    "kernel: --mlp-kernel-enabled, --quantized-mlp-kernel-enabled "
                                                    "or --enable-nki)", bool_flag=True, modes=BUILDS)
    # Added by moebench
    quantized_dtype: str = opt(ModelOptions.quant_dtype, "weight dtype of --quantized-mlp-kernel-enabled",
                               choices=tuple(QUANT_DTYPES), modes=BUILDS)
    skip_accuracy: bool = opt(False, "performance only: no accuracy check (records say 'not checked')",
                              bool_flag=True, modes=SCORED)
    benchmark_runs: int = opt(20, "timed benchmark runs", type=positive(int), modes=TIMED)
    warmup_runs: int = opt(1, "untimed warm-up runs before the benchmark (each model timed is compiled before "
                              "them, untimed, even with 0)",
                           type=_nonneg(int), modes=TIMED)
    seed: int = opt(0, "seed for sampling", type=_seed, modes=SAMPLING)
    explicit: frozenset = field(default=frozenset(), repr=False)  # names of the options given on the command line

    @property
    def prompts(self) -> list[str]:
        return list(self.prompt) or [DEFAULT_PROMPT]


def flag_names(f: dataclasses.Field) -> tuple[str, ...]:
    return f.metadata["flags"] or ("--" + f.name.replace("_", "-"),)


OPTIONS = [f for f in dataclasses.fields(RunConfig) if f.name != "explicit"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """A usage error is one line, as every other error (not the whole usage text)."""
        self.exit(2, f"moebench: error: {message} (moebench --help lists the flags)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="moebench", argument_default=argparse.SUPPRESS, allow_abbrev=False,
        description="moebench: the NKI-MoE contest driver, on CPUs and NVIDIA GPUs. "
                    "Every flag of the contest's usage guide is accepted.",
        epilog="Bool flags accept a bare flag or a value: true/false/1/0/yes/no.")
    for f in OPTIONS:
        m = f.metadata
        shown = "" if f.default in (None, (), False) else f" (default: {f.default})"
        kw = dict(dest=f.name, help=m["help"] + shown)
        if m["bool_flag"]:
            kw.update(nargs="?", const=True, type=parse_bool, metavar="BOOL")
        elif m["append"]:
            kw.update(action="append")
        else:
            kw.update(type=m["type"] or str, choices=m["choices"])
            if m["many"]:
                kw["nargs"] = "+"
        if f.name == "mode":
            kw["required"] = True
        p.add_argument(*flag_names(f), **kw)
    return p


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def parse_args(argv: list[str] | None = None) -> tuple[RunConfig, list[str]]:
    """Command line -> (RunConfig, notes to print). Unsupported values raise MoebenchError."""
    given = vars(build_parser().parse_args(argv))
    for name, value in given.items():  # (bytes that are not UTF-8 reach Python as surrogates)
        for text in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(text, str) and not _utf8(text):
                raise MoebenchError(f"--{name.replace('_', '-')}: {text!r} is not UTF-8 text")
    for name in ("model_path", "compiled_model_path"):
        if given.get(name) == "":
            raise MoebenchError(f"--{name.replace('_', '-')}: an empty path; name a folder")
    for name in ("prompt", "context_encoding_buckets", "token_generation_buckets"):
        if name in given:
            given[name] = tuple(given[name])
    run = RunConfig(**given, explicit=frozenset(given))
    if launched_by_torchrun():  # its ranks are the ranks asked for
        try:
            world = int(os.environ["WORLD_SIZE"])
        except ValueError:
            raise MoebenchError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes") from None
        if "tp_degree" not in given:
            run = dataclasses.replace(run, tp_degree=world)
        elif run.tp_degree != world:
            raise MoebenchError(f"--tp-degree {run.tp_degree} but torchrun started {world} ranks")
    return run, check(run)


def check(run: RunConfig) -> list[str]:
    """Stops on impossible combinations; returns a note for each explicit flag that has no effect here."""
    notes = []
    if run.platform_target in ("trn2", "trn3"):
        raise MoebenchError(f"--platform-target {run.platform_target}: Trainium needs the AWS Neuron SDK, which "
                            "moebench does not use; use cpu or cuda")
    for f in OPTIONS:
        if f.name not in run.explicit:
            continue
        m, flag = f.metadata, flag_names(f)[0]
        if m["no_effect"]:
            notes.append(f"note: {flag} has no effect: {m['no_effect']}")
        elif m["modes"] and run.mode not in m["modes"]:
            notes.append(f"note: {flag} has no effect in --mode {run.mode}")
    notes += check_kernel_flags(run)
    for name in ("vocab_parallel", "rpl_reduce_dtype", "sequence_parallel_enabled"):
        if name in run.explicit and run.tp_degree == 1:
            notes.append(f"note: --{name.replace('_', '-')} has no effect with --tp-degree 1")
    if (run.on_device_sampling and run.mode in SAMPLING and run.do_sample and 0 < run.global_topk < run.top_k):
        raise MoebenchError(f"--top-k {run.top_k} is larger than --global-topk {run.global_topk}, the candidates "
                            "on-device sampling keeps (as in the original, an error)")
    if run.tp_degree > 1:
        for name in ("mlp_kernel_fuse_residual_add", "rmsnorm_quantize_kernel_enabled"):
            if getattr(run, name):
                notes.append(f"note: --{name.replace('_', '-')} has no effect with --tp-degree {run.tp_degree}: the "
                             "sharded block's sum across ranks comes first")
        if run.enable_nki:
            notes.append(f"note: with --tp-degree {run.tp_degree}, --enable-nki's o_proj, dense-MLP and LM-head "
                         "kernels give way to the row- and vocabulary-parallel layers")
    if run.skip_compile and "save_sharded_checkpoint" in run.explicit and run.mode in BUILDS:
        notes.append("note: --save_sharded_checkpoint has no effect with --skip-compile: the artifacts are reused as "
                     "they are")
    notes += combination_notes(run)
    for name in ("global_topk", "dynamic"):
        if name in run.explicit and not run.on_device_sampling:
            notes.append(f"note: --{name.replace('_', '-')} has no effect without --on-device-sampling")
    for name in ("context_encoding_buckets", "token_generation_buckets"):
        sizes = getattr(run, name)
        if sizes and max(sizes) > run.seq_len:
            raise MoebenchError(f"--{name.replace('_', '-')}: bucket {max(sizes)} is larger than --seq-len "
                                f"{run.seq_len}, the KV cache")
        if sizes and not run.enable_bucketing:
            notes.append(f"note: --{name.replace('_', '-')} has no effect without --enable-bucketing")
    if run.max_context_length is not None and run.max_context_length >= run.seq_len:
        raise MoebenchError(f"--max-context-length {run.max_context_length} must be below --seq-len {run.seq_len}")
    sizes = run.context_encoding_buckets
    if sizes and run.max_context_length is not None and max(sizes) > run.max_context_length:
        # (as NxDI: the largest context-encoding bucket is the longest prompt's, --max-context-length)
        raise MoebenchError(f"--context-encoding-buckets: bucket {max(sizes)} is larger than --max-context-length "
                            f"{run.max_context_length}, the longest prompt")
    if run.top_p > 1:
        raise MoebenchError(f"--top-p {run.top_p} must be in (0, 1]")
    if any(not p.strip() for p in run.prompt):
        raise MoebenchError("--prompt: a prompt is empty")
    return notes


def combination_notes(run: RunConfig) -> list[str]:
    """Flags that the mode uses, made moot by another flag of the same run."""
    moot = []
    if run.mode in SAMPLING and not run.do_sample:
        moot += [(n, "with --do-sample false (greedy decoding)") for n in ("temperature", "top_k", "top_p", "seed")]
    elif run.mode in SAMPLING and run.temperature == 0:
        moot += [(n, "with --temperature 0 (greedy decoding)") for n in ("top_k", "top_p", "seed")]
    if run.mode == "generate" and not run.benchmark:
        moot += [(n, "without --benchmark") for n in ("benchmark_runs", "warmup_runs")]
    if run.mode in SCORED and run.skip_accuracy:
        moot += [(n, "with --skip-accuracy") for n in ("tol_map", "divergence_difference_tol", "num_tokens_to_check")]
    if run.max_new_tokens is not None:
        moot.append(("max_length", "with --max-new-tokens, which sets the length"))
    if run.mode not in ("generate", "validate") or len(run.prompts) == 1:  # (each prompt of a file runs alone)
        moot.append(("padding_side", "with one prompt a request (nothing to pad)"))
    if run.mode == "generate" and len(run.prompts) == 1:  # (elsewhere it also keeps the fresh prompts' tokens)
        moot.append(("pad_token_id", "with one prompt (no row to pad, none finishing before another)"))
    if run.mode in VALIDATING and run.isolation == "none":  # (--audit-pairs 0 asks for no audit: nothing is lost)
        moot += [(n, "with --isolation none (the submission runs in this process, unchecked and unstopped)")
                 for n in ("audit_pairs", "phase_time_limit") if getattr(run, n)]
    return [f"note: --{name.replace('_', '-')} has no effect {why}" for name, why in moot if name in run.explicit]


def check_kernel_flags(run: RunConfig) -> list[str]:
    """Kernel flag combinations that cannot work stop with one line; settings with nothing to act on get a note."""
    if run.qkv_kernel_enabled and not (run.fused_qkv or run.enable_nki):
        raise MoebenchError("--qkv-kernel-enabled needs --fused-qkv: the kernel computes the fused qkv_proj "
                            "(as in the original)")
    if run.rmsnorm_quantize_kernel_enabled and not run.quantized_mlp_kernel_enabled:
        raise MoebenchError("--rmsnorm-quantize-kernel-enabled needs --quantized-mlp-kernel-enabled: its quantized "
                            "activations feed the quantized expert kernel")
    if run.mlp_kernel_fuse_residual_add and not (run.mlp_kernel_enabled or run.quantized_mlp_kernel_enabled
                                                 or run.enable_nki):
        raise MoebenchError("--mlp-kernel-fuse-residual-add needs an MoE kernel to fuse into: add "
                            "--mlp-kernel-enabled, --quantized-mlp-kernel-enabled or --enable-nki")
    notes = []
    if run.enable_nki and "fused_qkv" in run.explicit and not run.fused_qkv:
        notes.append("note: --fused-qkv false has no effect: --enable-nki implies --fused-qkv")
    for name in ("quantized_kernel_lower_bound", "quantized_dtype"):
        if name in run.explicit and not run.quantized_mlp_kernel_enabled:
            notes.append(f"note: --{name.replace('_', '-')} has no effect without --quantized-mlp-kernel-enabled")
    return notes
