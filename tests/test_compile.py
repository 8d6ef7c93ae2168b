"""The compile step (--compiled-model-path) and --skip-compile: the artifacts written per submodel and bucket, the
FLOP ratio read back from the exported graphs, the sharded checkpoint, and the refusal of stale artifacts."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import moebench.engine.artifacts as artifacts_mod
from moebench.engine.artifacts import load_sharded_checkpoint, save_sharded_checkpoint
from moebench.engine.generator import Engine
from moebench.evaluation.flops import request_macs
from moebench.model.loader import after_loading, build_model, construct, open_model
from moebench.model.qwen3_moe import ModelOptions, Qwen3MoeForCausalLM
from moebench.model.presets import preset_dir
from tests.conftest import error_line
from tests.test_modes import invoke

pytestmark = pytest.mark.usefixtures("one_thread")

SUBMISSIONS = Path(__file__).parent / "submissions"
RUN = ["--mode", "evaluate_single", "--seq-len", "20", "--benchmark-runs", "1", "--audit-pairs", "0",
       "--warmup-runs", "1", "--base-latency", "100", "--base-throughput", "100"]


def report(folder: Path) -> dict:
    return json.loads((folder / "benchmark_report.json").read_text())


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """An evaluate_single that compiled into DIR, with its report."""
    folder = tmp_path_factory.mktemp("compiled")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        code, out, err = invoke(*RUN, "--compiled-model-path", "DIR", "--save_sharded_checkpoint")
    assert code == 0, out + err
    return folder, out, report(folder)


def test_compile_writes_graphs_code_tokenizer_weights_and_a_manifest(compiled):
    folder, out, rep = compiled
    d = folder / "DIR"
    manifest = json.loads((d / "manifest.json").read_text())
    names = sorted(p.name for p in (d / "graphs" / "tp0").iterdir())
    assert names == sorted(g["file"] for g in manifest["graphs"])
    assert [(g["submodel"], g["bucket"]) for g in manifest["graphs"]] == [
        ("context_encoding_model", rep["kernel_flops"]["by_graph"][0]["bucket"]), ("token_generation_model", 20)]
    assert (d / "compiled_code_tp0.bin").stat().st_size > 0 and manifest["compiled_code"]
    assert (d / "weights" / "tp0_sharded_checkpoint.safetensors").is_file() and manifest["sharded_checkpoint"]
    assert (d / "tokenizer" / "tokenizer.json").read_bytes() == (preset_dir("moebench-tiny") /
                                                                 "tokenizer.json").read_bytes()
    fp = manifest["fingerprint"]
    assert fp["flags"]["torch_dtype"] == "bfloat16" and fp["weights"] and fp["module"] and fp["moebench_source"]
    assert "compile: exported 2 graphs" in out and manifest["compile_seconds"] > 0
    assert rep["compile"]["skipped"] is False and rep["compile"]["compile_seconds"] > 0


def test_skip_compile_reuses_everything_without_exporting(compiled, monkeypatch):
    folder, _, first = compiled
    monkeypatch.chdir(folder)

    def no_export(*args):
        raise AssertionError("--skip-compile exported a graph")

    monkeypatch.setattr(artifacts_mod, "export_step", no_export)
    loads = []
    real_load = artifacts_mod.load_sharded_checkpoint
    monkeypatch.setattr("moebench.modes.compiled.load_sharded_checkpoint",
                        lambda *a: loads.append(a[1]) or real_load(*a))
    code, out, err = invoke(*RUN, "--compiled-model-path", "DIR", "--skip-compile", "--isolation", "none")
    assert code == 0, out + err
    assert "compile: skipped (--skip-compile); reusing 2 graphs" in out and "sharded weights" in out
    assert loads == [Path("DIR") / "weights" / "tp0_sharded_checkpoint.safetensors"]
    second = report(folder)
    assert first.keys() - {"checks", "measured_by"} == second.keys()  # (in one process: no checks)
    assert second["kernel_flops"] == first["kernel_flops"]  # the same graphs, read back
    assert second["compile"]["skipped"] is True and second["compile"]["compile_seconds"] == 0


@pytest.mark.parametrize("change, why", [
    (["--torch-dtype", "float32"], "other flags (torch_dtype"),
    (["--fused-qkv"], "other flags (fused_qkv"),
    (["--qwen", str(SUBMISSIONS / "honest_reordered.py")], "another version of the contestant module"),
    (["--seq-len", "24"], "has no graph for context_encoding_model (batch 1, seq-len 24"),
])
def test_skip_compile_refuses_artifacts_made_for_another_run(compiled, monkeypatch, capsys, change, why):
    folder, _, _ = compiled
    monkeypatch.chdir(folder)
    code, _, err = invoke(*RUN, "--compiled-model-path", "DIR", "--skip-compile", *change)
    assert code == 2
    assert why in error_line(err) and "compile again" in err or "compile for this request" in err


def test_skip_compile_refuses_other_weights_and_missing_or_broken_manifests(compiled, tmp_path, monkeypatch):
    folder, _, _ = compiled
    model_dir = tmp_path / "model"
    shutil.copytree(preset_dir("moebench-tiny"), model_dir)
    monkeypatch.chdir(folder)
    # the same model under another folder: its name differs, so it is another model
    code, _, err = invoke(*RUN, "--compiled-model-path", "DIR", "--skip-compile", "--model-path", model_dir)
    assert code == 2 and "compiled for another model" in error_line(err)
    code, _, err = invoke(*RUN, "--compiled-model-path", "nowhere", "--skip-compile")
    assert code == 2 and "nowhere/manifest.json not found" in error_line(err)
    bad = folder / "BAD"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    code, _, err = invoke(*RUN, "--compiled-model-path", "BAD", "--skip-compile")
    assert code == 2 and "is not a moebench manifest" in error_line(err)
    good = json.loads((folder / "DIR" / "manifest.json").read_text())
    for edit in ({"fingerprint": "x"}, {"graphs": [{}]}, {"fingerprint": {**good["fingerprint"], "flags": [1]}}):
        (bad / "manifest.json").write_text(json.dumps({**good, **edit}))  # JSON, not of moebench's shape: tracebacks
        code, _, err = invoke(*RUN, "--compiled-model-path", "BAD", "--skip-compile")
        assert code == 2 and "is not a moebench manifest" in error_line(err), (edit, err)


@pytest.mark.parametrize("damage, words", [
    (lambda d: (d / "compiled_code_tp0.bin").write_bytes(b"garbage"), "compiled_code_tp0.bin cannot be read back"),
    (lambda d: [p.write_bytes(p.read_bytes()[:100]) for p in (d / "graphs" / "tp0").iterdir()],
     "cannot load the exported graph"),
])
def test_skip_compile_refuses_damaged_artifacts_before_any_long_work(compiled, tmp_path, monkeypatch, damage, words):
    folder, _, _ = compiled
    shutil.copytree(folder / "DIR", tmp_path / "DIR")
    damage(tmp_path / "DIR")
    monkeypatch.chdir(tmp_path)
    code, out, err = invoke(*RUN, "--compiled-model-path", "DIR", "--skip-compile", "--isolation", "none")
    assert code == 2 and words in error_line(err) and err.count("\n") == 1, err
    assert "logit validation" not in out and "reusing" not in out


def test_a_compile_replaces_only_moebenchs_own_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "DIR" / "tokenizer").mkdir(parents=True)
    (tmp_path / "DIR" / "tokenizer" / "notes.txt").write_text("mine")
    (tmp_path / "DIR" / "manifest.json").write_text('{"my": "app manifest"}')
    gen = ["--mode", "generate", "--seq-len", "16", "--max-new-tokens", "1", "--compiled-model-path", "DIR"]
    code, _, err = invoke(*gen)
    assert code == 2 and "its manifest.json is not one moebench wrote" in error_line(err)
    assert (tmp_path / "DIR" / "manifest.json").read_text() == '{"my": "app manifest"}'
    (tmp_path / "DIR" / "manifest.json").unlink()
    for _ in range(2):  # a compile, then a compile over it
        code, out, err = invoke(*gen)
        assert code == 0, out + err
    assert (tmp_path / "DIR" / "tokenizer" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "DIR" / "tokenizer" / "tokenizer.json").is_file()


def test_other_weights_of_the_same_model_are_refused(tmp_path, monkeypatch):
    """Compile on a copy of the embedded model, then change one weight byte: --skip-compile refuses."""
    model_dir = tmp_path / "model"
    shutil.copytree(preset_dir("moebench-tiny"), model_dir)
    monkeypatch.chdir(tmp_path)
    args = [*RUN, "--model-path", model_dir, "--compiled-model-path", "DIR", "--skip-accuracy"]
    code, out, err = invoke(*args)
    assert code == 0, out + err
    weights = next(model_dir.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    artifacts_mod_hashes = __import__("moebench.evaluation.expected", fromlist=["_HASHES"])._HASHES
    artifacts_mod_hashes.clear()  # a new process would hash the files again
    code, _, err = invoke(*args, "--skip-compile")
    assert code == 2 and "compiled for other weights" in error_line(err)


@pytest.mark.parametrize("options", [ModelOptions(), ModelOptions(fused_qkv=True, kernels=frozenset({"quantized_moe"}))],
                         ids=["plain", "quantized"])
def test_sharded_checkpoint_round_trip(tmp_path, options):
    source = open_model(None)
    model = build_model(Qwen3MoeForCausalLM, source, options, torch.bfloat16, torch.device("cpu"))
    path = tmp_path / "tp0_sharded_checkpoint.safetensors"
    save_sharded_checkpoint(model, path)
    again = after_loading(construct(Qwen3MoeForCausalLM, source, options))
    load_sharded_checkpoint(again, path, torch.device("cpu"))
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    if options.kernels:
        assert any(t.dtype == torch.int8 for t in b.values())  # stored quantized, loaded as is


@pytest.mark.parametrize("kernels, buckets", [(False, {}), (True, dict(ctx_buckets=(8, 16), tkg_buckets=(12, 20)))],
                         ids=["reference", "kernels-bucketed"])
def test_macs_of_exported_graphs_equal_macs_traced_while_running(kernels, buckets):
    """The exported graphs (fake tensors, nothing runs) count what the model does when it runs."""
    from moebench.modes.compiled import CTE, TKG

    source = open_model(None)
    options = ModelOptions(fused_qkv=True, kernels=frozenset({"rms_norm", "qkv", "fused_moe", "lm_head"})) \
        if kernels else ModelOptions()
    model = build_model(Qwen3MoeForCausalLM, source, options, torch.float32, torch.device("cpu"))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    traced, _ = request_macs(model, ids, torch.ones_like(ids), 9, 20, **buckets)
    engine = Engine(model, batch=1, max_len=20, **buckets)
    runs = engine.graph_runs(ids.shape[1], 9)
    assert [(g.submodel, g.bucket, g.runs) for g in traced.graphs] == runs
    for g, (submodel, bucket, _) in zip(traced.graphs, runs):
        ep = artifacts_mod.export_step(engine, submodel, bucket)
        from moebench.evaluation.flops import graph_macs

        exported = graph_macs(ep.graph_module)
        assert (exported.total, exported.kernel) == (g.macs.total, g.macs.kernel), (submodel, bucket)
    assert {CTE, TKG} == {s for s, _, _ in runs}


def test_a_model_torch_export_cannot_trace_still_runs_and_is_counted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # (--audit-pairs 0: its decode step recompiles for every new token value, so a repeated prompt is faster)
    code, out, err = invoke(*RUN, "--qwen", SUBMISSIONS / "honest_data_dependent.py", "--skip-accuracy",
                            "--audit-pairs", "0")
    assert code == 0, out + err
    assert "note: torch.export cannot export the submission's context_encoding_model" in out
    flops = report(tmp_path)["kernel_flops"]
    assert flops["total_macs"] > 0 and report(tmp_path)["compile"]["export_error"]
    manifest = json.loads((tmp_path / "traced_model" / "manifest.json").read_text())
    assert manifest["export_error"] and manifest["graphs"] == []
    code, out, err = invoke(*RUN, "--qwen", SUBMISSIONS / "honest_data_dependent.py", "--skip-accuracy",
                            "--audit-pairs", "0", "--skip-compile")
    assert code == 0, out + err
    assert report(tmp_path)["kernel_flops"]["total_macs"] == flops["total_macs"]


def test_compiled_model_path_that_is_a_file_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    code, _, err = invoke(*RUN, "--compiled-model-path", "afile")
    assert code == 2 and "exists and is not a directory" in error_line(err)


def test_compiled_model_path_that_cannot_be_made_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    code, _, err = invoke(*RUN, "--compiled-model-path", "afile/traced")
    assert code == 2 and "--compiled-model-path afile/traced: cannot create it (Not a directory)" in error_line(err)
    assert (tmp_path / "afile").read_text() == "x"


def test_a_failure_after_the_submissions_process_started_stops_it(tmp_path, monkeypatch):
    """The artifacts cannot be published once the isolated submission compiled them (a full disk, say): the error
    propagates and the submission's process is gone with it (left running, it would hold the harness's exit)."""
    import multiprocessing

    from moebench.modes import confine

    def publish(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(confine, "publish", publish)
    with pytest.raises(OSError, match="No space left"):
        invoke(*RUN)
    assert [p for p in multiprocessing.active_children() if p.name == "moebench-submission"] == []
