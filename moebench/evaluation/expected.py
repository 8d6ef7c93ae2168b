"""Expected logits: computed by moebench's reference model, stored as expected_logits_{i}.pt + .json, and
refused when their metadata does not match what is being checked."""

import hashlib
import io
import json
import re
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from moebench import __version__
from moebench.engine.generator import engine_for
from moebench.engine.parallel import writes_files
from moebench.errors import MoebenchError
from moebench.evaluation.records import write_whole
from moebench.model.loader import ModelSource, build_model
from moebench.model.qwen3_moe import ModelOptions, Qwen3MoeForCausalLM

_HASHES: dict[str, str] = {}  # weights folder -> hash: a large checkpoint is read once per process


def weights_hash(source: ModelSource) -> str:
    """sha256 over the checkpoint's safetensors files (names and bytes); presets built in memory hash their name."""
    if source.weights_dir is None:
        return f"random-weights:{source.name}:seed0"
    if str(source.weights_dir) in _HASHES:
        return _HASHES[str(source.weights_dir)]
    h = hashlib.sha256()
    for path in sorted(source.weights_dir.glob("*.safetensors")):
        h.update(path.name.encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return _HASHES.setdefault(str(source.weights_dir), h.hexdigest())


@dataclass(frozen=True)
class ExpectedMeta:
    model: str
    weights_hash: str
    prompt_ids: list  # [B][L] token ids of each prompt row
    dtype: str  # the dtype the reference ran in: the run's --torch-dtype, as the submission
    seq_len: int
    new_tokens: int
    moebench_version: str = __version__
    tp_degree: int = 1  # what the bases beside it were timed with (the logits do not depend on it)
    eos_ids: list = field(default_factory=list)  # the ids banned at every step (-inf in the scores): the EOS ids
    # [latency ms, throughput] of the prompt_data row generate_accuracy_baselines wrote with it: a row that is not
    # this comes from another run (one stopped between the files, or prompt data of other prompts or dtype)
    base: list | None = None

    def mismatch(self, wanted: "ExpectedMeta") -> str | None:
        """What makes stored logits (self) unusable for `wanted`, or None."""
        for name in ("model", "weights_hash", "prompt_ids", "dtype", "moebench_version", "eos_ids"):
            if getattr(self, name) != getattr(wanted, name):
                return f"{name} differs (stored {str(getattr(self, name))[:60]}, needed {str(getattr(wanted, name))[:60]})"
        if self.new_tokens < wanted.new_tokens:
            return f"it holds {self.new_tokens} tokens, {wanted.new_tokens} are needed"
        return None

    def other_base(self, row) -> str | None:
        """Where a prompt_data row is not the one written with this metadata: the row's numbers and these."""
        if self.base is None or self.base == [row.base_latency, row.base_throughput]:
            return None
        return (f"{row.base_latency:g} ms and {row.base_throughput:g} tokens/s, written with "
                f"{self.base[0]:g} ms and {self.base[1]:g} tokens/s")

    def base_mismatch(self, wanted: "ExpectedMeta") -> str | None:
        """What makes the bases measured with these logits (self) unlike a run of `wanted`, or None."""
        for name in ("model", "weights_hash", "dtype", "tp_degree"):
            if getattr(self, name) != getattr(wanted, name):
                return f"{name} {str(getattr(self, name))[:60]}, this run {str(getattr(wanted, name))[:60]}"
        return None


def compute_expected(source: ModelSource, input_ids, attention_mask, new_tokens: int, seq_len: int,
                     dtype: torch.dtype, device, banned: tuple[int, ...]) -> torch.Tensor:
    """Greedy decoding of the reference, no early stop: float32 scores [new_tokens, B, vocab], the raw logits with
    the `banned` ids (EOS) at -inf, as the original's scores after its min_new_tokens processor."""
    model = build_model(Qwen3MoeForCausalLM, source, ModelOptions(), dtype, device)
    engine = engine_for(model, input_ids.shape[0], seq_len, compile=new_tokens >= 64, banned=banned)
    return engine.greedy(input_ids, attention_mask, new_tokens)[1]


def save_tensor(path: Path, tensor: torch.Tensor) -> None:
    """torch.save, written whole (write_whole); a failure (a full disk, a folder in its place) is one line naming
    the file."""
    data = io.BytesIO()
    torch.save(tensor, data)
    write_whole(path, data.getbuffer())


def save_expected(folder: Path, i: int, logits: torch.Tensor, meta: ExpectedMeta) -> Path:
    """expected_logits_{i}.pt and its .json, each written whole. An older .json goes first: a run stopped between
    the two leaves logits that no metadata vouches for (refused, saying so), never new logits under the metadata of
    another run (another dtype, say) that a later run might match."""
    path = folder / f"expected_logits_{i}.pt"
    if not writes_files():  # tensor parallelism: rank 0 writes
        return path
    meta_path = path.with_suffix(".json")
    try:
        meta_path.unlink(missing_ok=True)
    except OSError as e:
        raise MoebenchError(f"cannot replace {meta_path}: {e.strerror or e}") from None
    save_tensor(path, logits.float().contiguous())
    write_whole(meta_path, json.dumps(asdict(meta), indent=1))
    return path


def read_meta(path: Path) -> ExpectedMeta:
    """An expected_logits_{i}.json file, checked; a clear error when malformed."""
    try:
        meta = ExpectedMeta(**json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise MoebenchError(f"{path}: not valid expected-logits metadata ({e})") from None
    except OSError as e:
        raise MoebenchError(f"cannot read {path}: {e.strerror}") from None
    for name, kind in (("model", str), ("weights_hash", str), ("dtype", str), ("moebench_version", str),
                       ("seq_len", int), ("new_tokens", int), ("tp_degree", int), ("prompt_ids", list),
                       ("eos_ids", list)):
        value = getattr(meta, name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise MoebenchError(f"{path}: not valid expected-logits metadata ({name} is {value!r}, not "
                                f"{'a string' if kind is str else 'an integer' if kind is int else 'a list'})")
    if not all(isinstance(row, list) and all(type(t) is int for t in row) for row in meta.prompt_ids):
        raise MoebenchError(f"{path}: not valid expected-logits metadata (prompt_ids is not a list of token-id lists)")
    if not all(type(t) is int for t in meta.eos_ids):
        raise MoebenchError(f"{path}: not valid expected-logits metadata (eos_ids is not a list of token ids)")
    return meta


def check_stored(folder: Path, i: int, wanted: ExpectedMeta, vocab: int) -> torch.Tensor | None:
    """The stored logits of prompt i, memory-mapped (read only where used: evaluate_all checks every prompt's
    files this way before any long work), when their metadata and shape match `wanted`; None when absent; an
    error when they do not match or do not load."""
    pt, meta_path = folder / f"expected_logits_{i}.pt", folder / f"expected_logits_{i}.json"
    if not pt.exists():
        return None
    if not meta_path.is_file():
        raise MoebenchError(f"{pt} has no metadata file {meta_path.name}; regenerate it with "
                            "--mode generate_accuracy_baselines")
    why = read_meta(meta_path).mismatch(wanted)
    if why:
        raise MoebenchError(f"{pt} does not match this run: {why}; regenerate it with "
                            "--mode generate_accuracy_baselines or remove it")
    if not zipfile.is_zipfile(pt):  # (a truncated file too: its zip directory is at the end)
        raise MoebenchError(f"{pt}: cannot load it as a tensor file (not the zip format torch.save writes); "
                            "regenerate it with --mode generate_accuracy_baselines")
    try:
        logits = torch.load(pt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch's messages run over several lines: the first says what went wrong
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise MoebenchError(f"{pt}: cannot load it as a tensor file ({type(e).__name__}: {first[:200]}); "
                            "regenerate it with --mode generate_accuracy_baselines") from None
    B = len(wanted.prompt_ids)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 3 or logits.shape[1:] != (B, vocab) or \
            not logits.is_floating_point():
        what = f"a {logits.dtype} tensor of shape {list(logits.shape)}" if isinstance(logits, torch.Tensor) else \
            type(logits).__name__
        raise MoebenchError(f"{pt}: holds {what}, not the float logits [new_tokens, {B}, {vocab}] of this model; "
                            "regenerate it with --mode generate_accuracy_baselines")
    if logits.shape[0] < wanted.new_tokens:
        raise MoebenchError(f"{pt}: holds {logits.shape[0]} tokens, {wanted.new_tokens} are needed")
    return logits


def load_expected(folder: Path, i: int, wanted: ExpectedMeta, vocab: int) -> torch.Tensor | None:
    """Stored logits for prompt i when they match `wanted`, in memory; None when absent; an error when they do not
    match."""
    logits = check_stored(folder, i, wanted, vocab)
    return None if logits is None else logits[:wanted.new_tokens].to(torch.float32, copy=True)


def stored_index(folder: Path, wanted: ExpectedMeta) -> int | None:
    """The index i of the expected_logits_{i} file made for the same prompt, or None. Only those names are the
    harness's: another file that starts so (a copy `expected_logits_0.bak.json`, say) is not read."""
    for meta_path in sorted(folder.glob("expected_logits_*.json")):
        index = re.fullmatch(r"expected_logits_(\d+)\.json", meta_path.name)
        if index and read_meta(meta_path).prompt_ids == wanted.prompt_ids:
            return int(index[1])
    return None


def find_stored(folder: Path, wanted: ExpectedMeta, vocab: int) -> torch.Tensor | None:
    """Stored logits for the same prompt under any index (for --prompt runs); None when no file has it."""
    i = stored_index(folder, wanted)
    return None if i is None else load_expected(folder, i, wanted, vocab)
