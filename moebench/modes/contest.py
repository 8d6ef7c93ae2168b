"""What validate, evaluate_* and generate_accuracy_baselines share: the reference's expected logits and
baseline timings, and the submission under test (built, checked, validated, benchmarked, its MACs counted)."""

import hashlib
import json
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from moebench import __version__
from moebench.cli.args import RunConfig
from moebench.errors import MoebenchError
from moebench.evaluation.accuracy import (DEFAULT_DIVERGENCE_TOL, DEFAULT_FAILED_FRACTION, DEFAULT_TOL_MAP,
                                          ValidationReport, validate_logits)
from moebench.evaluation.benchmark import answer_request, benchmark_report, run_benchmark, time_request
from moebench.evaluation.checked import banned_tokens, checked_benchmark, private_seed
from moebench.evaluation.expected import ExpectedMeta, compute_expected, find_stored, load_expected, weights_hash
from moebench.engine.parallel import shared_value, writes_files
from moebench.engine.artifacts import Artifacts
from moebench.evaluation.records import write_whole
from moebench.evaluation.submission import Submission, check_logits
from moebench.model.loader import ModelSource, build_model
from moebench.model.presets import PRESETS
from moebench.model.qwen3_moe import (KERNEL_BLOCKS, Attention, DenseMLP, ModelOptions, Qwen3MoeForCausalLM, RMSNorm,
                                      SparseMoE)
from moebench.modes.compiled import (build_from_shards, compile_step, described_graphs, open_artifacts,
                                     request_flops)
from moebench.modes.parallel import parallelize
from moebench.modes.setup import Request, make_engine
from moebench.progress import Progress

WIDE = "qwen3-30b-a3b"


def record_model_name(source: ModelSource) -> str:
    """`qwen3-30b-a3b` for a checkpoint of that model's dimensions, else the checkpoint's name."""
    same = replace(source.config, name=WIDE, torch_dtype="bfloat16", eos_token_id=None, bos_token_id=None,
                   pad_token_id=None, max_position_embeddings=40960, rope_scaling=None, sliding_window=None)
    want = replace(PRESETS[WIDE], eos_token_id=None, bos_token_id=None, pad_token_id=None)
    return WIDE if same == want else source.name


def progress(total: int, desc: str) -> Progress:
    return Progress(total, desc, "run")


# The building blocks each per-kernel flag switches to its kernel (moebench.model.qwen3_moe.KERNEL_BLOCKS).
FLAG_BLOCKS = {
    "qkv_kernel_enabled": {"qkv"},
    "attn_kernel_enabled": {"attention"},
    "flash_decoding_enabled": {"flash_decoding"},
    "mlp_kernel_enabled": {"moe_router", "fused_moe"},
    "mlp_kernel_fuse_residual_add": {"moe_residual"},
    "quantized_mlp_kernel_enabled": {"quantized_moe"},
    "rmsnorm_quantize_kernel_enabled": {"rms_norm_quantize"},
}
QUANTIZED_BLOCKS = {"quantized_moe", "rms_norm_quantize"}  # they change the numbers: only their own flags


def options_of(run: RunConfig) -> ModelOptions:
    """How the submission is built: --enable-nki switches every block that has a kernel except the quantized
    ones (and implies --fused-qkv, as CONTRACTS says); each per-kernel flag adds its blocks. The quantized
    experts replace the unquantized ones."""
    kernels = set(KERNEL_BLOCKS) - QUANTIZED_BLOCKS if run.enable_nki else set()
    for flag, blocks in FLAG_BLOCKS.items():
        if getattr(run, flag):
            kernels |= blocks
    if "quantized_moe" in kernels:
        kernels.discard("fused_moe")
    return ModelOptions(fused_qkv=run.fused_qkv or run.enable_nki, kernels=frozenset(kernels),
                        quant_dtype=run.quantized_dtype, quant_bound=run.quantized_kernel_lower_bound)


def benchmark(run: RunConfig, engine, req: Request, what: str, fresh_from: ModelSource | None = None) -> dict:
    """benchmark_report.json's content for a compiled `engine` (compiled_engine) on this request. fresh_from:
    every run gets a fresh prompt of the request's shape from this model's vocabulary, as a submission's timed
    runs do (checked_benchmark), instead of the request's own prompt."""
    bar = progress(run.benchmark_runs, f"benchmark {what}")
    shape = req.input_ids.shape[1], req.max_new_tokens, req.input_ids.shape[0]
    if fresh_from is None:
        timings = run_benchmark(engine, req.input_ids, req.attention_mask, req.max_new_tokens, run.benchmark_runs,
                                run.warmup_runs, on_run=lambda i: bar.update())
        bar.close()
        return benchmark_report(timings, *shape)
    seed = private_seed()
    timings = checked_benchmark(lambda ids, mask, n: answer_request(engine, ids, mask, n), req.input_ids,
                                req.attention_mask, req.max_new_tokens, run.benchmark_runs, run.warmup_runs, 0,
                                fresh_from.config.vocab_size, banned_tokens(req, fresh_from.tokenizer), seed,
                                on_run=lambda i: bar.update())[0]
    bar.close()
    return {**benchmark_report(timings, *shape), "inputs": {"fresh_prompts": True, "seed": seed}}


def compiled_engine(run: RunConfig, model, req: Request):
    """An engine whose steps for this request's shape are compiled, by one untimed request whatever --warmup-runs
    says: a submission compiles in its compile step, and a first timed run must not hold the other's compilation."""
    engine = make_engine(model, run, batch=req.input_ids.shape[0], compile=True, banned=req.eos_ids)
    time_request(engine, req.input_ids, req.attention_mask, req.max_new_tokens, None)
    return engine


def reference_model(run: RunConfig, source: ModelSource, device, dtype):
    return parallelize(build_model(Qwen3MoeForCausalLM, source, ModelOptions(), dtype, device), run)


def reference_benchmark(run: RunConfig, source: ModelSource, req: Request, device, dtype) -> dict:
    return benchmark(run, compiled_engine(run, reference_model(run, source, device, dtype), req), req, "reference",
                     fresh_from=source)


def reference_request(run: RunConfig, source: ModelSource, req: Request, device, dtype):
    """The reference answering timed requests as a submission's process does (checked_benchmark's request)."""
    engine = compiled_engine(run, reference_model(run, source, device, dtype), req)
    return lambda ids, mask, new_tokens: answer_request(engine, ids, mask, new_tokens)


def prompt_rows(req: Request) -> list[list[int]]:
    """Each row's real prompt tokens, padding removed."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(req.input_ids, req.attention_mask)]


def expected_meta(run: RunConfig, source: ModelSource, req: Request, dtype) -> ExpectedMeta:
    return ExpectedMeta(model=source.name, weights_hash=weights_hash(source), prompt_ids=prompt_rows(req),
                        dtype=str(dtype).removeprefix("torch."), seq_len=run.seq_len,
                        new_tokens=req.max_new_tokens, tp_degree=run.tp_degree, eos_ids=list(req.eos_ids))


def expected_logits(run: RunConfig, source: ModelSource, req: Request, device, dtype, index: int | None,
                    folder: Path) -> tuple[torch.Tensor, ExpectedMeta]:
    """Stored expected logits when their metadata matches (refused when they do not), else computed now by
    the reference. index: prompts.txt position; None looks for the same prompt under any index."""
    meta = expected_meta(run, source, req, dtype)
    vocab = source.config.vocab_size
    stored = load_expected(folder, index, meta, vocab) if index is not None else find_stored(folder, meta, vocab)
    if stored is not None:
        print(f"expected logits: stored ({folder})")
        return stored, meta
    print("expected logits: computed by the reference model")
    # The reference runs in the submission's dtype (as the original's baseline model did), so honest
    # rounding differences stay well inside the guide's tolerances. Under tensor parallelism every rank takes rank
    # 0's: from its expected tokens each rank's validation chooses the requests that the submission's ranks answer
    # together, and two references on GPUs need not decode alike (their MoE sums run in a nondeterministic order).
    # (Every rank computes them, so that none waits in the broadcast longer than the group's timeout.)
    logits = compute_expected(source, req.input_ids, req.attention_mask, req.max_new_tokens, run.seq_len, dtype,
                              device, req.eos_ids)
    return shared_value(logits.cpu(), "the expected logits"), meta


@dataclass
class Validation:
    report: ValidationReport
    expected_text: list[str]
    actual_text: list[str]


def build_submission(run: RunConfig, sub: Submission, source: ModelSource, device, dtype, batch: int,
                     artifacts: Artifacts | None = None):
    """The contestant's model, built exactly like the reference (or read from the sharded checkpoint of the reused
    artifacts), with a broken forward reported on one line."""
    try:
        if artifacts is not None and artifacts.reuse and artifacts.checkpoint_path.is_file():
            model = build_from_shards(sub.cls, source, options_of(run), run, artifacts.checkpoint_path, device)
        else:
            model = parallelize(build_model(sub.cls, source, options_of(run), dtype, device), run)
    except MoebenchError:
        raise
    except Exception as e:
        raise sub.fail(f"could not be built and loaded: {type(e).__name__}: {e}") from None
    _check_forward(sub, model, batch, source.config.vocab_size)
    replaced = replaced_blocks(model) if model.options.kernels else []
    if replaced:
        print(f"note: the submission's own {', '.join(replaced)} run instead of moebench's kernels for those blocks")
    return model


def replaced_blocks(model) -> list[str]:
    """The names of the reference's building blocks that a submission replaced (its own class, or its own module in
    place of an nn.Linear): moebench's kernels do not run there."""
    blocks = (Attention, SparseMoE, DenseMLP, RMSNorm)
    names = {type(m).__name__ for m in model.modules() if isinstance(m, blocks) and type(m) not in blocks}
    linears = ("qkv_proj", "o_proj", "gate", "gate_up_proj", "down_proj", "lm_head")  # kernels read their weights
    names |= {type(m).__name__ for name, m in model.named_modules()
              if name.rsplit(".", 1)[-1] in linears and type(m) is not torch.nn.Linear
              and not type(m).__module__.startswith("moebench.")}  # tensor parallelism's layers are moebench's
    return sorted(names)


def _check_forward(sub: Submission, model, batch: int, vocab: int) -> None:
    """One context-encoding and one decode call, eagerly, checking the logits' type and shape."""
    from moebench.engine.generator import smallest_run

    original = model.forward

    def checked(*args, **kwargs):
        try:
            logits = original(*args, **kwargs)
        except Exception as e:
            raise sub.fail(f"forward failed: {type(e).__name__}: {e}") from None
        ids, step = args[:2]  # (the engine calls forward(input_ids, step, cache))
        check_logits(sub, logits, batch, vocab, 1 if step.last is not None else ids.shape[1])
        return logits

    model.forward = checked
    try:
        smallest_run(model, batch)
    finally:
        del model.forward  # back to the class's method


def validate_submission(run: RunConfig, greedy, expected: torch.Tensor, req: Request, tokenizer) -> Validation:
    """Logit validation of `greedy(ids, mask, n_new) -> (tokens [B, n], logits [n, B, V])` against `expected`."""
    first = []

    def generate_fn(prompts: list[list[int]], n_new: int):
        L = max(map(len, prompts))
        ids = torch.full((len(prompts), L), req.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(prompts):
            ids[b, :len(p)], mask[b, :len(p)] = torch.tensor(p), 1
        n_new = min(n_new, run.seq_len - L + 1)
        tokens, logits = greedy(ids, mask, n_new)
        bar.update()
        if not first:
            first.append(tokens)
        return logits, tokens

    bar = Progress(None, "validation", "generate call")  # 1 + a teacher-forced call per divergence
    report = validate_logits(prompt_rows(req), generate_fn, expected, run.tol_map or DEFAULT_TOL_MAP,
                             divergence_tol(run), run.num_tokens_to_check, DEFAULT_FAILED_FRACTION[run.torch_dtype])
    bar.close()
    n = expected.shape[0] if run.num_tokens_to_check is None else min(run.num_tokens_to_check, expected.shape[0])
    exp_text = [tokenizer.decode(expected[:n, b].argmax(-1).tolist()) for b in range(expected.shape[1])]
    act_text = [tokenizer.decode(first[0][b, :n].tolist()) for b in range(expected.shape[1])]
    return Validation(report, exp_text, act_text)


def divergence_tol(run: RunConfig) -> tuple:
    """(absolute, relative to the top logit): --divergence-difference-tol is absolute, else the dtype's default."""
    if run.divergence_difference_tol is not None:
        return run.divergence_difference_tol, 0.0
    return DEFAULT_DIVERGENCE_TOL[run.torch_dtype]


class UnderTest:
    """The submission's model and what the harness does with it: validate, benchmark, count MACs."""

    def __init__(self, run: RunConfig, sub: Submission, source: ModelSource, device, dtype, req: Request,
                 artifacts: Artifacts | None = None, extend: bool = False):
        """Builds the model and runs the compile step for `req` (artifacts: evaluate_all's, shared by its prompts;
        extend: a later prompt's, adding to the folder)."""
        started = time.perf_counter()
        self.run, self.sub, self.source, self.batch = run, sub, source, req.input_ids.shape[0]
        self.artifacts = artifacts or open_artifacts(run, sub.path, source, options_of(run), device, extend)
        self.model = build_submission(run, sub, source, device, dtype, self.batch, self.artifacts)
        self.engine = make_engine(self.model, run, batch=self.batch, compile=True, banned=req.eos_ids)
        compile_step(run, self.artifacts, self.model, self.engine, req, source, compile_code=True, started=started)
        # then one request, as the original's load() runs every bucket once: a first timed run pays no first-call
        # costs (the prompt's graph, its lazily allocated buffers), whatever --warmup-runs says
        time_request(self.engine, req.input_ids, req.attention_mask, req.max_new_tokens, None)

    def validate(self, expected: torch.Tensor, req: Request, tokenizer) -> Validation:
        return validate_submission(self.run, self.engine.greedy, expected, req, tokenizer)

    def benchmark(self, req: Request) -> dict:
        return benchmark(self.run, self.engine, req, "submission", fresh_from=self.source)

    def kernel_flops(self, req: Request) -> dict:
        """benchmark_report.json's kernel_flops for this request (RequestMacs.report), from the compiled graphs."""
        described = described_graphs(self.artifacts, self.model, self.engine, req, self.run.seq_len, self.run)
        return request_flops(self.run, req, described)


def _clip(text: str, n: int = 300) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def print_validation(v: Validation) -> None:
    print(v.report.summary())
    for b, (e, a) in enumerate(zip(v.expected_text, v.actual_text)):
        print(f"expected text [{b}]: {_clip(e)}")
        print(f"actual text   [{b}]: {_clip(a)}")


def provenance(run: RunConfig, sub: Submission, source: ModelSource, device) -> dict:
    """What produced a result, for the JSON-lines records: moebench and its commit, the contestant module's sha256,
    the model and weights, the device, the library versions and the flags given."""
    import platform

    import triton

    package, commit = Path(__file__).resolve().parents[2], None
    if (package / ".git").exists():  # a checkout of moebench itself, not a package inside someone else's repo
        try:
            git = ["git", "-C", str(package)]
            commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=5).stdout.strip() or None
            dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, timeout=5).stdout.strip()
            commit = f"{commit}+dirty" if commit and dirty else commit
        except (OSError, subprocess.SubprocessError):
            commit = None
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
        device_name = f"{names[0]} x{len(names)}" if names else platform.processor() or "unknown"
    return {"moebench_version": __version__, "moebench_commit": commit, "module": str(sub.path),
            "module_sha256": hashlib.sha256(Path(sub.path).read_bytes()).hexdigest(), "model": source.name,
            "weights_hash": weights_hash(source), "device": f"{device.type}: {device_name}",
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "flags": {name: getattr(run, name) for name in sorted(run.explicit)}}


def write_json(path: Path, data: dict) -> None:
    if writes_files():  # tensor parallelism: rank 0 writes
        write_whole(path, json.dumps(data, indent=2))
