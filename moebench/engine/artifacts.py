"""The compile step (--compiled-model-path DIR) and its reuse (--skip-compile), the counterpart of NxDI's
model.compile() / model.load().

    DIR/manifest.json        what the artifacts were made for (moebench's source, the model's config, the weights,
                             the contestant module, the flags that shape the compiled model, torch, the device),
                             the graphs, and how long compiling took
    DIR/tokenizer/           a copy of the model's tokenizer files
    DIR/graphs/tp{r}/{submodel}_b{batch}_s{seq_len}_bk{bucket}.pt2
                             torch.export of each step function per bucket: the ATen graph (weights left out: they
                             are the checkpoint's) that the kernel FLOP ratio reads, like the original's HLO files
    DIR/compiled_code_tp{r}.bin
                             torch.compile's caches (Inductor's compiled decode step per bucket), when the run
                             compiles its decode steps
    DIR/weights/tp{r}_sharded_checkpoint.safetensors
                             --save_sharded_checkpoint: each rank's shard of the weights, loaded as is next time

--skip-compile reads it all back and refuses, in one line, artifacts made for anything else than this run.
"""

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import moebench
from moebench.errors import MoebenchError

MANIFEST = "manifest.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
SUBMODELS = ("context_encoding_model", "token_generation_model")

_SOURCE_HASH = []


def moebench_source_hash() -> str:
    """sha256 over moebench's own sources (Python, and the C++ of the CPU decode operators): the reference model and
    the kernels are part of every graph."""
    if not _SOURCE_HASH:
        root = Path(moebench.__file__).parent
        h = hashlib.sha256()
        for path in sorted([*root.rglob("*.py"), *root.rglob("*.cpp")]):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
        _SOURCE_HASH.append(h.hexdigest())
    return _SOURCE_HASH[0]


@dataclass(frozen=True)
class Fingerprint:
    """What a set of artifacts was made for; any difference makes them stale."""

    moebench_source: str
    model: str  # name and sha256 of its configuration
    weights: str
    module: str  # the contestant module's sha256
    flags: dict  # the resolved run options that shape the compiled model
    torch: str
    device: str

    def mismatch(self, stored: dict) -> str | None:
        """One line naming what differs from the stored fingerprint, or None."""
        what = {"moebench_source": "another version of moebench's source", "model": "another model",
                "weights": "other weights", "module": "another version of the contestant module",
                "torch": "another torch version", "device": "another device"}
        for key, text in what.items():
            if stored.get(key) != getattr(self, key):
                return f"{text} ({key} {str(stored.get(key))[:24]}, this run {str(getattr(self, key))[:24]})"
        theirs = stored.get("flags", {})
        differ = sorted(k for k in set(theirs) | set(self.flags) if theirs.get(k) != self.flags.get(k))
        if differ:
            k = differ[0]
            return f"other flags ({', '.join(differ)}; e.g. {k}: {theirs.get(k)!r}, this run {self.flags.get(k)!r})"
        return None


def config_hash(config) -> str:
    return hashlib.sha256(json.dumps(asdict(config), sort_keys=True, default=str).encode()).hexdigest()


def graph_name(submodel: str, batch: int, seq_len: int, bucket: int) -> str:
    return f"{submodel}_b{batch}_s{seq_len}_bk{bucket}.pt2"


def _describe(key) -> str:
    submodel, batch, seq_len, bucket = key
    return f"{submodel} (batch {batch}, seq-len {seq_len}, bucket {bucket})"


def _is_input(a) -> bool:
    """Tensors (and tuples of them) are graph inputs; other arguments (sampling settings) are its constants."""
    return isinstance(a, torch.Tensor) or isinstance(a, tuple) and bool(a) and all(isinstance(x, torch.Tensor) for x in a)


class _Step(torch.nn.Module):
    """A step function with the model's weights as module state and the KV cache as (mutated) inputs."""

    def __init__(self, engine, submodel: str, args: tuple):
        super().__init__()
        self.model, self.cache, self.fn = engine.model, engine.cache, engine.step_function(submodel)
        self.args = args

    def forward(self, k, v, *inputs):
        self.cache.k, self.cache.v = k, v
        it = iter(inputs)
        return self.fn(*(next(it) if _is_input(a) else a for a in self.args))


def export_step(engine, submodel: str, bucket: int) -> torch.export.ExportedProgram:
    """torch.export of one call of `submodel` at `bucket`, with fake tensors: nothing runs, the cache is untouched."""
    args = engine.example_step(submodel, bucket)
    k, v = engine.cache.k, engine.cache.v
    try:
        with torch.inference_mode(False), torch.no_grad():
            return torch.export.export(_Step(engine, submodel, args), (k, v, *filter(_is_input, args)),
                                       strict=False)
    finally:
        engine.cache.k, engine.cache.v = k, v


def _without_weights(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The program with its weights replaced by meta tensors of the same shapes: the graph is what is kept."""
    for name, t in list(ep.state_dict.items()):
        meta = torch.empty_like(t, device="meta")
        ep.state_dict[name] = torch.nn.Parameter(meta, requires_grad=False) if isinstance(t, torch.nn.Parameter) \
            else meta
    for name, t in list(ep.constants.items()):
        if isinstance(t, torch.Tensor):
            ep.constants[name] = torch.empty_like(t, device="meta")
    return ep


# ---- sharded weights ----

def save_sharded_checkpoint(model: torch.nn.Module, path: Path) -> None:
    """Every tensor of the model's state dict (this rank's shard, quantized weights included), tied ones once."""
    from safetensors.torch import save_file

    tensors, aliases, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"aliases": json.dumps(aliases)})
    tmp.replace(path)


def load_sharded_checkpoint(model: torch.nn.Module, path: Path, device) -> None:
    """Fill a model built on the meta device (with this rank's structure) from its shard."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
        state = load_file(str(path), device=str(device))
    except Exception as e:
        raise MoebenchError(f"{path}: cannot read the sharded checkpoint ({e})") from None
    for name, target in aliases.items():
        state[name] = state[target]
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise MoebenchError(f"{path}: the sharded checkpoint does not fit the model ({str(e).splitlines()[0]})") \
            from None
    if hasattr(model, "tie_weights"):
        model.tie_weights()


# ---- the artifacts folder ----

def _manifest_of(path: Path) -> dict:
    """A manifest.json as moebench writes it; ValueError (JSON's and Unicode's errors are ones) when it is not."""
    try:
        stored = json.loads(path.read_text())
        for key in ("fingerprint", "graphs"):
            if key not in stored:
                raise ValueError(f"no {key!r}")
        if not isinstance(stored["fingerprint"], dict) or not all(
                isinstance(g, dict) and {"submodel", "batch", "seq_len", "bucket", "file"} <= g.keys()
                for g in stored["graphs"]) or not isinstance(stored["fingerprint"].get("flags", {}), dict):
            raise ValueError("its fingerprint or graphs are not what moebench writes")
    except TypeError as e:  # a list or a number where a mapping belongs
        raise ValueError(str(e)) from None
    return stored


def make_folder(folder: Path) -> None:
    """Makes the --compiled-model-path folder (its parents too) before anything is timed or written, or says in
    one line why it cannot be."""
    if folder.exists() and not folder.is_dir():
        raise MoebenchError(f"--compiled-model-path {folder}: exists and is not a directory")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MoebenchError(f"--compiled-model-path {folder}: cannot create it ({e.strerror})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise MoebenchError(f"--compiled-model-path {folder}: not writable")


@dataclass
class Artifacts:
    """The artifacts folder of one run; `reuse` is --skip-compile. Graphs are keyed (submodel, batch, seq_len,
    bucket): evaluate_all's prompts may each have their own sequence length."""

    folder: Path
    fingerprint: Fingerprint
    reuse: bool
    extend: bool = False  # a later prompt of the same run: add to the folder (when it was made for this run)
    rank: int = 0
    writes: bool = True  # this rank writes the shared files (manifest, tokenizer)
    graphs: dict = field(default_factory=dict)  # key -> file name, as in the manifest
    warmed: set = field(default_factory=set)  # (seq_len, bucket) decode steps compiled by this run
    compile_seconds: float = 0.0  # this run's compiling (export, compiled code, checkpoint)
    load_seconds: float = 0.0  # --skip-compile: reading it all back
    export_error: str | None = None  # torch.export could not export the model: MACs are then counted as it runs
    stored: dict = field(default_factory=dict)  # the manifest read back (--skip-compile)
    _loaded: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.folder.exists() and not self.folder.is_dir():
            raise MoebenchError(f"--compiled-model-path {self.folder}: exists and is not a directory")
        if self.reuse or self.extend and (self.folder / MANIFEST).is_file():
            self.stored = self._read_manifest()
            self.graphs = {(g["submodel"], g["batch"], g["seq_len"], g["bucket"]): g["file"]
                           for g in self.stored["graphs"]}
            self.export_error = self.stored.get("export_error")
            self.compile_seconds = 0.0 if self.reuse else self.stored.get("compile_seconds", 0.0)
        else:
            make_folder(self.folder)
            self._clear()

    def summary(self) -> dict:
        """benchmark_report.json's "compile"."""
        return {"path": str(self.folder), "skipped": self.reuse, "graphs": len(self.graphs),
                "compile_seconds": round(self.compile_seconds, 3), "load_seconds": round(self.load_seconds, 3),
                "export_error": self.export_error}

    # paths
    @property
    def graph_dir(self) -> Path:
        return self.folder / "graphs" / f"tp{self.rank}"

    @property
    def code_path(self) -> Path:
        return self.folder / f"compiled_code_tp{self.rank}.bin"

    @property
    def checkpoint_path(self) -> Path:
        return self.folder / "weights" / f"tp{self.rank}_sharded_checkpoint.safetensors"

    def _read_manifest(self) -> dict:
        path = self.folder / MANIFEST
        if not path.is_file():  # (extend: checked before)
            raise MoebenchError(f"--skip-compile: {path} not found; compile first (run without --skip-compile)")
        try:
            stored = _manifest_of(path)
        except ValueError as e:
            raise MoebenchError(f"--skip-compile: {path} is not a moebench manifest ({e}); compile again") from None
        if stored.get("sharded_checkpoint") and not self.checkpoint_path.is_file():
            raise MoebenchError(f"--skip-compile: {self.checkpoint_path} is missing; compile again")
        why = self.fingerprint.mismatch(stored["fingerprint"])
        if why:
            raise MoebenchError(f"--skip-compile: the artifacts in {self.folder} were compiled for {why}; "
                                "compile again (run without --skip-compile)")
        return stored

    def _clear(self) -> None:
        """A new compile replaces moebench's own files in the folder (never anything else there): each rank its
        own, the writing rank the shared ones. A manifest.json that is not moebench's stops it: the folder is
        someone else's."""
        manifest = self.folder / MANIFEST
        if self.writes and manifest.exists():
            try:
                _manifest_of(manifest)
            except (OSError, ValueError):
                raise MoebenchError(f"--compiled-model-path {self.folder}: its {MANIFEST} is not one moebench wrote; "
                                    "give an empty folder or one moebench compiled into") from None
        for path in self.graph_dir.glob("*_b*_s*_bk*.pt2"):
            path.unlink()
        self.code_path.unlink(missing_ok=True)
        self.checkpoint_path.unlink(missing_ok=True)
        if self.writes:
            manifest.unlink(missing_ok=True)
            for name in TOKENIZER_FILES:
                (self.folder / "tokenizer" / name).unlink(missing_ok=True)

    # the compile step
    def compile_graphs(self, engine, buckets: list[tuple[str, int]], on_step=None) -> None:
        """Export each (submodel, bucket) this folder lacks for the engine's batch; --skip-compile instead checks
        that they are all there."""
        keys = [(submodel, engine.batch, engine.max_len, bucket) for submodel, bucket in buckets]
        missing = [k for k in keys if k not in self.graphs]
        if self.reuse:
            if missing and not self.export_error:
                have = "; ".join(map(_describe, sorted(self.graphs))) or "none"
                raise MoebenchError(f"--skip-compile: {self.folder} has no graph for {_describe(missing[0])} (it has: "
                                    f"{have}); compile for this request (without --skip-compile)")
            for key in keys if not self.export_error else ():  # read now: a damaged graph stops before long work
                self.graph(key)
            return
        start = time.perf_counter()
        self.graph_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(len(keys) - len(missing) if on_step is not None else 0):  # those already here: done
            on_step()
        for key in missing if not self.export_error else ():
            submodel, bucket = key[0], key[3]
            try:
                ep = export_step(engine, submodel, bucket)
            except MoebenchError:
                raise
            except Exception as e:  # data-dependent Python in a submission, say: it still runs and is counted
                self.export_error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                print(f"note: torch.export cannot export the submission's {submodel} ({self.export_error[:200]}); "
                      "its multiply-accumulates are counted on graphs traced as it runs")
                break
            self._loaded[key] = ep.graph_module
            torch.export.save(_without_weights(ep), self.graph_dir / graph_name(*key))
            self.graphs[key] = graph_name(*key)
            if on_step is not None:
                on_step()
        self.compile_seconds += time.perf_counter() - start

    def graph(self, key: tuple) -> torch.fx.GraphModule:
        """The exported graph of key (submodel, batch, seq_len, bucket), read from the folder once."""
        if key not in self._loaded:
            if key not in self.graphs:
                raise MoebenchError(f"{self.folder}: no graph for {_describe(key)}")
            path = self.graph_dir / self.graphs[key]
            try:
                self._loaded[key] = torch.export.load(path).graph_module
            except Exception as e:
                raise MoebenchError(f"{path}: cannot load the exported graph ({type(e).__name__}: {e})") from None
        return self._loaded[key]

    def compile_code(self, engine, buckets: list[int], on_step=None) -> None:
        """Compile the engine's decode step for each token-generation bucket now (one real call each), and keep
        torch.compile's caches; --skip-compile loads them instead, before anything compiles."""
        if self.reuse:
            if not self.code_path.is_file():
                raise MoebenchError(f"--skip-compile: {self.code_path} not found (the run that compiled {self.folder} "
                                    "did not compile its decode step); compile again (run without --skip-compile)")
            cache_log = logging.getLogger("torch.compiler._cache")  # its traceback of a damaged file: ours is one line
            level = cache_log.level
            cache_log.setLevel(logging.CRITICAL)
            try:
                loaded = torch.compiler.load_cache_artifacts(self.code_path.read_bytes())
            finally:
                cache_log.setLevel(level)
            if loaded is None:
                raise MoebenchError(f"--skip-compile: {self.code_path} cannot be read back (damaged); compile again "
                                    "(run without --skip-compile)")
            return
        start = time.perf_counter()
        for bucket in buckets:
            if (engine.max_len, bucket) not in self.warmed:
                engine.warm_decode(bucket)
                self.warmed.add((engine.max_len, bucket))
            if on_step is not None:
                on_step()
        saved = torch.compiler.save_cache_artifacts()
        if saved is not None:
            tmp = self.code_path.with_suffix(".tmp")
            tmp.write_bytes(saved[0])
            tmp.replace(self.code_path)
        self.compile_seconds += time.perf_counter() - start

    def save_checkpoint(self, model) -> None:
        start = time.perf_counter()
        save_sharded_checkpoint(model, self.checkpoint_path)
        self.compile_seconds += time.perf_counter() - start

    def copy_tokenizer(self, tokenizer_folder: Path) -> None:
        if not self.writes:
            return
        (self.folder / "tokenizer").mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            if (tokenizer_folder / name).is_file():
                shutil.copyfile(tokenizer_folder / name, self.folder / "tokenizer" / name)

    def write_manifest(self) -> None:
        if not self.writes:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        data = {"moebench_version": moebench.__version__, "fingerprint": asdict(self.fingerprint),
                "graphs": [{"submodel": s, "batch": b, "seq_len": n, "bucket": k, "file": f}
                           for (s, b, n, k), f in sorted(self.graphs.items())],
                "compiled_code": self.code_path.is_file(),  # compiled_code_tp{r}.bin, one per rank
                "sharded_checkpoint": self.checkpoint_path.is_file(),  # weights/tp{r}_sharded_checkpoint...
                "export_error": self.export_error, "compile_seconds": round(self.compile_seconds, 3)}
        tmp = self.folder / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.folder / MANIFEST)
