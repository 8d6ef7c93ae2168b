"""A damaged or mismatched checkpoint stops --mode generate with exit code 2 and one line naming what is wrong,
never a traceback."""

import json
import shutil
import stat
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from moebench.cli.main import main
from tests.conftest import make_hf_checkpoint


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """Pristine checkpoints written by transformers, copied by each test before damaging them."""
    plain = tmp_path_factory.mktemp("plain") / "ckpt"
    sharded = tmp_path_factory.mktemp("sharded") / "ckpt"
    make_hf_checkpoint(plain)
    make_hf_checkpoint(sharded, shard="30KB")
    return {"plain": plain, "sharded": sharded}


@pytest.fixture
def plain(originals, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return shutil.copytree(originals["plain"], tmp_path / "plain")


@pytest.fixture
def sharded(originals, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return shutil.copytree(originals["sharded"], tmp_path / "sharded")


def generate(capsys, folder):
    code = main(["--mode", "generate", "--model-path", str(folder), "--max-new-tokens", "2",
                 "--torch-dtype", "float32"])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(capsys, folder) -> str:
    code, out, err = generate(capsys, folder)
    assert code == 2, err
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    assert lines[0].startswith("moebench: error: ")
    return lines[0]


@pytest.mark.parametrize("which", ["plain", "sharded"])
def test_intact_copies_run(which, request, capsys):
    """The control: the undamaged copies generate, so every failure below comes from the damage."""
    code, out, err = generate(capsys, request.getfixturevalue(which))
    assert code == 0, err
    assert "Output 0: " in out


def test_missing_folder(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "/nonexistent" in one_error_line(capsys, "/nonexistent")


def test_truncated_safetensors(plain, capsys):
    f = plain / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:len(data) // 2])
    assert str(f) in one_error_line(capsys, plain)


def test_sharded_checkpoint_with_a_shard_deleted(sharded, capsys):
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    assert str(shards[1]) in one_error_line(capsys, sharded)


def test_sharded_checkpoint_with_a_truncated_shard(sharded, capsys):
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:100])
    assert str(shard) in one_error_line(capsys, sharded)


def test_invalid_index_json(sharded, capsys):
    (sharded / "model.safetensors.index.json").write_text("{ not json")
    assert "model.safetensors.index.json" in one_error_line(capsys, sharded)


def test_no_weights_at_all(plain, capsys):
    (plain / "model.safetensors").unlink()
    assert "model.safetensors" in one_error_line(capsys, plain)


def test_invalid_config_json(plain, capsys):
    (plain / "config.json").write_text('{"vocab_size": 4096,')
    line = one_error_line(capsys, plain)
    assert str(plain / "config.json") in line and "JSON" in line


def test_missing_config_json(plain, capsys):
    (plain / "config.json").unlink()
    assert "config.json" in one_error_line(capsys, plain)


def test_missing_tokenizer_json(plain, capsys):
    (plain / "tokenizer.json").unlink()
    assert str(plain / "tokenizer.json") in one_error_line(capsys, plain)


def test_extra_unexpected_tensor(plain, capsys):
    f = plain / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.0.mlp.surprise.weight"] = torch.zeros(3, 4)
    save_file(tensors, f, metadata={"format": "pt"})
    assert "model.layers.0.mlp.surprise.weight" in one_error_line(capsys, plain)


def test_missing_tensor(plain, capsys):
    f = plain / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    assert "model.layers.1.self_attn.k_norm.weight" in one_error_line(capsys, plain)


def test_tensor_with_the_wrong_shape(plain, capsys):
    f = plain / "model.safetensors"
    tensors = load_file(f)
    name = "model.layers.2.mlp.experts.3.up_proj.weight"
    expected = list(tensors[name].shape)
    tensors[name] = torch.zeros(expected[0] + 1, expected[1])
    save_file(tensors, f, metadata={"format": "pt"})
    line = one_error_line(capsys, plain)
    assert name in line and str(expected) in line and str([expected[0] + 1, expected[1]]) in line


def test_config_of_another_model_type(plain, capsys):
    cfg = json.loads((plain / "config.json").read_text())
    cfg["model_type"] = "llama"
    (plain / "config.json").write_text(json.dumps(cfg))
    assert "llama" in one_error_line(capsys, plain)


def test_unsupported_rope_scaling_type(plain, capsys):
    cfg = json.loads((plain / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    (plain / "config.json").write_text(json.dumps(cfg))
    assert "rope type 'dynamic' is not supported" in one_error_line(capsys, plain)


# ---------------------------------------------------------------- the embedded model's shipped weights


def test_embedded_model_is_the_shipped_weights(tmp_path, monkeypatch):
    """preset_dir copies the trained weights into a folder named after their sha256, readable by everyone."""
    from moebench.model.presets import EMBEDDED, EMBEDDED_WEIGHTS, embedded_sha256, preset_dir

    monkeypatch.setenv("MOEBENCH_CACHE", str(tmp_path))
    folder = preset_dir(EMBEDDED)
    sha = embedded_sha256()
    assert folder.name.endswith(sha[:12])  # new weights, new folder: an old cache is never reused
    assert (folder / "model.safetensors").read_bytes() == (EMBEDDED_WEIGHTS / "model.safetensors").read_bytes()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert {stat.S_IMODE(f.stat().st_mode) for f in folder.iterdir()} == {0o644}
    assert {f.name for f in folder.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                                   "tokenizer_config.json", "generation_config.json"}
    assert preset_dir(EMBEDDED) == folder  # reused, after checking the weights again


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # still a readable safetensors file: only the checksum notices
    path.write_bytes(bytes(data))


def test_damaged_cached_embedded_weights(tmp_path, monkeypatch, capsys):
    from moebench.model.presets import EMBEDDED, preset_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MOEBENCH_CACHE", str(tmp_path / "cache"))
    f = preset_dir(EMBEDDED) / "model.safetensors"
    flip_last_byte(f)
    code = main(["--mode", "generate", "--max-new-tokens", "2"])
    _, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"moebench: error: {f}: sha256 ") and "delete" in lines[0]


def test_damaged_shipped_embedded_weights(tmp_path, monkeypatch):
    from moebench.errors import MoebenchError
    from moebench.model import presets

    monkeypatch.setenv("MOEBENCH_CACHE", str(tmp_path / "cache"))
    shipped = shutil.copytree(presets.EMBEDDED_WEIGHTS, tmp_path / "assets")
    flip_last_byte(shipped / "model.safetensors")
    monkeypatch.setattr(presets, "EMBEDDED_WEIGHTS", shipped)
    with pytest.raises(MoebenchError, match="reinstall moebench"):
        presets.preset_dir(presets.EMBEDDED)
    assert not list((tmp_path / "cache" / "models").glob("*"))  # no half-written folder left behind


@pytest.mark.parametrize("kind", ["subclass", "options"])
def test_a_preset_built_in_memory_refuses_a_submission_before_drawing_its_weights(kind, monkeypatch):
    """preset:qwen3-30b-a3b has no checkpoint: only the reference with default options runs on it, and that is
    said before its 61 GB of weights would be drawn (random_model is never called)."""
    from moebench.errors import MoebenchError
    from moebench.model import loader
    from moebench.model.qwen3_moe import ModelOptions, Qwen3MoeForCausalLM

    monkeypatch.setattr(loader, "random_model", lambda *a, **k: pytest.fail("the weights were drawn first"))
    source = loader.open_model("preset:qwen3-30b-a3b")
    cls, options = (type("Sub", (Qwen3MoeForCausalLM,), {}), ModelOptions()) if kind == "subclass" else \
        (Qwen3MoeForCausalLM, ModelOptions(fused_qkv=True))
    with pytest.raises(MoebenchError, match="preset qwen3-30b-a3b has no checkpoint on disk"):
        loader.build_model(cls, source, options, torch.bfloat16, "cpu")


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 768.00 MiB. GPU 0 has a total capacity of 79.19 GiB"),
    RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 4000000000000 bytes. Error code 12 (Cannot allocate memory)"),
])
def test_weights_that_do_not_fit_the_devices_memory_are_one_line_with_what_to_do(error, monkeypatch):
    """A full-size model on one GPU: the harness's reference and the submission's process each load a copy; the
    line says how big the weights are and that stored expected logits and bases let evaluate_all do without the
    reference's copy. Only the loading is read so: an error of the module's own code stays its own."""
    from moebench.errors import MoebenchError
    from moebench.model import loader
    from moebench.model.qwen3_moe import ModelOptions, Qwen3MoeForCausalLM

    source = loader.open_model(None)
    gb = sum(p.numel() for p in loader.construct(Qwen3MoeForCausalLM, source, ModelOptions()).parameters()) * 2 / 1e9

    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(loader, "load_weights", fails)
    monkeypatch.setattr(loader, "random_model", fails)
    for weights in (source.weights_dir, None):  # a checkpoint's, a preset's drawn
        with pytest.raises(MoebenchError) as e:
            loader.build_model(Qwen3MoeForCausalLM, replace(source, weights_dir=weights), ModelOptions(),
                               torch.bfloat16, "cuda")
        assert str(e.value) == (
            f"moebench-tiny: its weights ({gb:.3g} GB in bfloat16) do not fit in the free cuda memory "
            f"({str(error).splitlines()[0]}). The evaluation modes hold the reference's copy beside the submission "
            "process's, unless evaluate_all reads stored expected logits and bases: --mode "
            "generate_accuracy_baselines stores them holding one copy")

    class Broken(Qwen3MoeForCausalLM):
        def after_loading(self):
            raise MemoryError("its own")

    monkeypatch.setattr(loader, "load_weights", lambda *args: (_ for _ in ()).throw(RuntimeError("a shape bug")))
    with pytest.raises(RuntimeError, match="a shape bug"):  # not about memory: as it is
        loader.build_model(Qwen3MoeForCausalLM, source, ModelOptions(), torch.bfloat16, "cuda")
    monkeypatch.setattr(loader, "load_weights", lambda *args: None)
    with pytest.raises(MemoryError, match="its own"):  # the module's own code, after the loading
        loader.build_model(Broken, source, ModelOptions(), torch.bfloat16, "cpu")
