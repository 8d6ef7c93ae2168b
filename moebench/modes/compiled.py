"""The compile step of the modes that build a submission: what its artifacts are made for, building the model
from a sharded checkpoint, exporting and compiling per bucket, and the MACs read back from the exported graphs."""

import hashlib
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from moebench.cli.args import RunConfig
from moebench.engine.artifacts import Artifacts, Fingerprint, config_hash, load_sharded_checkpoint, moebench_source_hash
from moebench.engine.parallel import writes_files
from moebench.evaluation.expected import weights_hash
from moebench.engine.generator import graph_runs
from moebench.evaluation.flops import (HARNESS_NAMESPACES, LIBRARY_PRODUCTS, BadCount, GraphRuns, RequestMacs,
                                      check_kernels, describe, described_macs, kernel_calls, library_op, request_macs,
                                      schema_of)
from moebench.kernels.registry import KERNELS, load_builtin_kernels
from moebench.progress import Progress
from moebench.model.loader import ModelSource, after_loading, construct, rope_on
from moebench.modes.parallel import parallelize
from moebench.modes.sandbox import SubmissionFault
from moebench.modes.setup import Request, buckets_of, on_device_sampling

CTE, TKG = "context_encoding_model", "token_generation_model"


def compile_flags(run: RunConfig, options) -> dict:
    """The resolved options that shape the compiled model (the sequence length and buckets are part of each graph's
    key instead: evaluate_all's prompts may differ there)."""
    kernels = sorted(options.kernels)
    quantized = "quantized_moe" in options.kernels
    ods = on_device_sampling(run)
    ods = None if ods is None else {**asdict(ods), "params": None if ods.dynamic else asdict(ods.params)}
    return {"torch_dtype": run.torch_dtype, "fused_qkv": options.fused_qkv, "kernels": kernels,
            "quant_dtype": options.quant_dtype if quantized else None,
            "quant_bound": options.quant_bound if quantized else None, "tp_degree": run.tp_degree,
            "vocab_parallel": run.vocab_parallel, "rpl_reduce_dtype": run.rpl_reduce_dtype,
            "sequence_parallel_enabled": run.sequence_parallel_enabled, "enable_bucketing": run.enable_bucketing,
            "on_device_sampling": ods}


def open_artifacts(run: RunConfig, module_path: Path, source: ModelSource, options, device,
                   extend: bool = False) -> Artifacts:
    """The --compiled-model-path folder of this run: checked against the run when --skip-compile, else cleared
    (extend: evaluate_all's later prompts add to what its first one compiled)."""
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    fp = Fingerprint(moebench_source=moebench_source_hash(), model=f"{source.name}:{config_hash(source.config)}",
                     weights=weights_hash(source), module=hashlib.sha256(Path(module_path).read_bytes()).hexdigest(),
                     flags=compile_flags(run, options), torch=torch.__version__, device=device_name)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Artifacts(Path(run.compiled_model_path), fp, reuse=run.skip_compile, extend=extend, rank=rank,
                     writes=writes_files())


def build_from_shards(model_cls, source: ModelSource, options, run: RunConfig, path: Path, device):
    """This rank's model straight from its sharded checkpoint: the structure built on the meta device (quantized
    and sharded as when it was saved), then every tensor read from the file."""
    model = parallelize(after_loading(construct(model_cls, source, options)), run)
    load_sharded_checkpoint(model, path, device)
    return rope_on(model.eval(), device)


def compiled_buckets(engine, req: Request) -> list[tuple[str, int]]:
    """What the compile step builds for a request: with bucketing every bucket of both submodels (as NxDI
    compiles them all), without it the prompt's width and the whole cache."""
    if engine.ctx_buckets or engine.tkg_buckets:
        ctx = engine.ctx_buckets or (engine.prefill_width(req.input_ids.shape[1]),)
        return [(CTE, b) for b in ctx] + [(TKG, b) for b in engine.tkg_buckets or (engine.max_len,)]
    return [(CTE, engine.prefill_width(req.input_ids.shape[1])), (TKG, engine.max_len)]


def compile_step(run: RunConfig, artifacts: Artifacts, model, engine, req: Request, source: ModelSource,
                 compile_code: bool, started: float) -> None:
    """Export every graph of the request's buckets, compile the decode step per bucket when the engine compiles,
    save the sharded checkpoint and the tokenizer; with --skip-compile, load what is there. Prints the time."""
    buckets = compiled_buckets(engine, req)
    before = artifacts.compile_seconds
    tkg_buckets = [b for s, b in buckets if s == TKG]
    with Progress(None if artifacts.reuse else len(buckets) + len(tkg_buckets) * compile_code, "compile",
                  "step") as bar:
        artifacts.compile_graphs(engine, buckets, bar.update)
        if compile_code:
            artifacts.compile_code(engine, tkg_buckets, bar.update)
    if not artifacts.reuse:
        if run.save_sharded_checkpoint and not artifacts.checkpoint_path.is_file():
            artifacts.save_checkpoint(model)
        artifacts.copy_tokenizer(source.tokenizer.folder)
        artifacts.write_manifest()
    names = ", ".join(f"{'cte' if s == CTE else 'tkg'} {b}" for s, b in buckets)
    if artifacts.reuse:
        what = [f"{len(buckets)} graphs ({names})"] if not artifacts.export_error else []
        what += ["compiled code"] * compile_code
        what += ["sharded weights"] * artifacts.checkpoint_path.is_file()
        artifacts.load_seconds += time.perf_counter() - started
        print(f"compile: skipped (--skip-compile); reusing {', '.join(what) or 'the manifest'} from "
              f"{artifacts.folder}, checked against this run, in {time.perf_counter() - started:.1f} s")
    else:
        tkg = sum(s == TKG for s, _ in buckets)
        done = [f"exported {len(buckets)} graphs ({names})" if not artifacts.export_error else "no graphs exported"]
        done += [f"compiled the decode step for {tkg} bucket{'s' * (tkg != 1)}"] * compile_code
        done += ["saved the sharded checkpoint"] * bool(run.save_sharded_checkpoint)
        print(f"compile: {', '.join(done)} in {artifacts.compile_seconds - before:.1f} s -> {artifacts.folder}")


def described_graphs(artifacts: Artifacts, model, engine, req: Request, seq_len: int, run: RunConfig) -> list:
    """The graphs of one request's buckets as `describe` gives them, each {"submodel", "bucket", "nodes"}: read
    from the exported graphs, or traced while running when the model could not be exported. Made where the
    submission runs; `request_flops` counts them."""
    if artifacts.export_error:
        counted, graphs = request_macs(model, req.input_ids, req.attention_mask, req.max_new_tokens, seq_len,
                                       **buckets_of(run))
        keys = [(g.submodel, g.bucket) for g in counted.graphs]
    else:
        keys = [(submodel, bucket) for submodel, bucket, _ in engine.graph_runs(req.input_ids.shape[1],
                                                                                 req.max_new_tokens)]
        graphs = [artifacts.graph((submodel, engine.batch, engine.max_len, bucket)) for submodel, bucket in keys]
    # the kernels the submission's module registers (their formulas its own: not another module's of this process)
    registered = sorted(k for k, kernel in KERNELS.items() if k.partition("::")[0] not in HARNESS_NAMESPACES
                        and getattr(kernel.macs, "__module__", None) == type(model).__module__)
    described = [{"submodel": s, "bucket": b, "nodes": describe(gm), "kernels_registered": registered}
                 for (s, b), gm in zip(keys, graphs)]
    if any(schema_of(node[0]) in KERNELS for g in described for node in g["nodes"]):  # (none: nothing to check)
        check = check_kernels(model, req.input_ids, req.attention_mask, req.max_new_tokens, seq_len,
                              **buckets_of(run), cache=engine.cache)  # (the request's: no second cache)
        for g, graph in zip(described, graphs):
            g["calling_library"], g["computing_in_torch"] = check.calling_library, check.computing_in_torch
            g["kernels_run"], g["library_macs_run"] = check.called, check.library_macs.get((g["submodel"], g["bucket"]))
            # Each compiled decode step once more, as the timed ones run: the kernels its compiled code calls at the
            # graph's arguments (under CUDA graphs a replay calls none that the profiler sees: not checked)
            if g["submodel"] == TKG and engine.compiled and not engine.cuda_graphs:
                g["kernel_calls_compiled"] = kernel_calls(lambda: engine.warm_decode(g["bucket"]), graph)
    return described


def request_flops(run: RunConfig, req: Request, described: list) -> dict:
    """benchmark_report.json's kernel_flops (RequestMacs.report): the described graphs counted by the harness's
    formulas, each weighted by the runs the harness's own bucket rules give this request. A description it cannot
    count from is the submission's fault: a failed evaluation."""
    try:
        return _request_flops(run, req, described)
    except BadCount as e:
        raise SubmissionFault(f"the kernel FLOP count failed: {e}") from None


def _request_flops(run: RunConfig, req: Request, described: list) -> dict:
    load_builtin_kernels()  # moebench's kernels count by the formulas of this process
    if not isinstance(described, list) or not all(isinstance(g, dict) for g in described):
        raise BadCount("the graphs' description is not a list of graphs")
    graphs = {(g.get("submodel"), g.get("bucket")): g for g in described
              if isinstance(g.get("submodel"), str) and type(g.get("bucket")) is int}
    # kernels that hand their products to the library, that compute them with torch's arithmetic, that ran, that
    # a compiled step calls fewer times than its graph holds them
    calling, in_torch, ran, targets, not_compiled, unregistered, registered = {}, {}, set(), set(), {}, set(), set()
    for g in described:
        found, run_here = g.get("calling_library", {}), g.get("kernels_run", [])
        if not (isinstance(found, dict) and all(isinstance(k, str) and isinstance(v, str) and
                                                schema_of(v) in LIBRARY_PRODUCTS for k, v in found.items())):
            raise BadCount("the kernels calling library products are not described as {kernel: library product}")
        computing = g.get("computing_in_torch", {})
        if not (isinstance(computing, dict) and all(
                isinstance(k, str) and isinstance(v, list) and len(v) == 2 and
                all(type(n) is int and 0 <= n < 2**62 for n in v) for k, v in computing.items())):
            raise BadCount("the kernels computing in torch are not described as {kernel: [elements, MACs]}")
        if not (isinstance(run_here, list) and all(isinstance(k, str) for k in run_here)):
            raise BadCount("the kernels that ran are not described as a list of their names")
        own = g.get("kernels_registered", [])
        if not (isinstance(own, list) and all(isinstance(k, str) for k in own)):
            raise BadCount("the kernels registered are not described as a list of their names")
        registered.update(own)
        ran_library = g.get("library_macs_run")  # the step's, run eagerly (check_kernels)
        if not (ran_library is None or (type(ran_library) is int and 0 <= ran_library < 2**62)):
            raise BadCount("the MACs of the library products run are not described as a whole number")
        listed = g.get("nodes") if isinstance(g.get("nodes"), list) else []
        ops = [node for node in listed if isinstance(node, list) and len(node) == 3 and isinstance(node[0], str)]
        targets |= {node[0] for node in ops}
        # the submission's own ops that declare no MACs (not registered kernels): what they compute goes uncounted
        unregistered |= {schema_of(t) for t, _, declared in ops
                         if declared is None and not library_op(schema_of(t))}
        not_compiled.update(_not_compiled(listed, g.get("kernel_calls_compiled")))
        calling.update(found)
        in_torch.update(computing)
        ran.update(run_here)
    calling = {k: v for k, v in calling.items() if k in targets}  # the graphs' own kernels only
    in_torch = {k: v for k, v in in_torch.items() if k in targets and k not in calling}
    uncredited = {*calling, *in_torch, *(targets - ran), *not_compiled}
    counted, cut = [], []
    for submodel, bucket, n in graph_runs(**buckets_of(run), max_len=run.seq_len, T=req.input_ids.shape[1],
                                          new_tokens=req.max_new_tokens):
        g = graphs.get((submodel, bucket))
        if g is None:
            raise BadCount(f"no graph described for the {submodel} at bucket {bucket}")
        count = described_macs(g.get("nodes"), uncredited)
        ran_library = g.get("library_macs_run")
        credit = max(0, count.total - ran_library) if ran_library is not None else 0
        if count.kernel > credit:  # the library did more of the work than the graph leaves it
            cut.append({"submodel": submodel, "bucket": bucket, "kernel_macs_per_run": count.kernel,
                        "library_macs_in_graph": count.total - count.kernel, "library_macs_run": ran_library,
                        "credited_kernel_macs_per_run": credit})
            count.kernel = credit
        counted.append(GraphRuns(submodel, bucket, count, n))
    not_run = {k for g in counted for k in g.macs.uncredited if k in targets - ran}
    not_compiled = {k: v for k, v in not_compiled.items() if k not in {*calling, *in_torch, *not_run}}
    return {**RequestMacs(counted).report(), "kernels_calling_library": calling, "kernels_computing_in_torch": in_torch,
            "kernels_not_run": sorted(not_run), "kernels_not_compiled": not_compiled, "kernel_macs_cut": cut,
            "ops_not_registered": sorted(unregistered),
            "kernels_not_in_graphs": sorted(registered - {schema_of(t) for t in targets})}


def _not_compiled(nodes: list, calls) -> dict:
    """{kernel target: [calls, nodes]} for the kernels of a decode step's graph (`nodes`, as described) that its
    compiled code called fewer times than the graph holds them (`calls`: {op name: calls}, kernel_calls' of one
    compiled step, for the kernels it could count; None where not checked)."""
    if calls is None:
        return {}
    if not (isinstance(calls, dict) and all(isinstance(k, str) and type(n) is int and n >= 0
                                            for k, n in calls.items())):
        raise BadCount("the kernels' calls in a compiled step are not described as {kernel: calls}")
    held = Counter(node[0] for node in nodes if isinstance(node, list) and len(node) == 3 and isinstance(node[0], str)
                   and (node[2] is not None or schema_of(node[0]) in KERNELS))
    return {k: [calls[schema_of(k)], n] for k, n in held.items() if calls.get(schema_of(k), n) < n}
