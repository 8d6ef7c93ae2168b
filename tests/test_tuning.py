"""Launch options tuned on a GPU: bench/gpu_kernels.py's sweep names each launch and the options it ran with, its
fastest become a tuned file, and MOEBENCH_TUNED=FILE hands them to the kernels' _tiles on a GPU of that name."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from moebench.kernels import router, tuning

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def gpu_kernels(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_kernels", ROOT / "bench" / "gpu_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    timings = iter([3.0, 2.0, 5.0])  # the default, then the two choices
    monkeypatch.setattr(module, "bench", lambda fn: (fn(), next(timings))[1])  # no CUDA graphs on the CPU
    return module


def test_sweep_rows_name_the_launch_and_its_whole_options_and_the_fastest_are_kept(gpu_kernels, monkeypatch):
    monkeypatch.setattr(router, "_tiles", lambda T, D: dict(SPLIT_D=0))  # the interpreter's default, made explicit
    x = torch.randn(1, 64).bfloat16()
    w = (torch.randn(16, 64) * 0.1).bfloat16()
    choices = [dict(SPLIT_D=16, BLOCK_T=1, num_warps=1), dict(SPLIT_D=32, BLOCK_T=None)]
    rows = gpu_kernels.sweep("router", router, lambda: router.moe_router_triton(x, w, 4, True)[1], 2048, choices)
    assert [r["us"] for r in rows] == [2.0, 3.0, 5.0]  # fastest first
    assert rows[0]["options"] == choices[0] and rows[1]["options"] == "default"
    assert all(r["launch"] == "router 1,64" for r in rows)
    assert rows[0]["run"] == dict(SPLIT_D=16, BLOCK_T=1, num_warps=1) and rows[2]["run"] == dict(SPLIT_D=32)
    assert gpu_kernels.fastest({"router": rows}) == {"router 1,64": rows[0]["run"]}
    assert router._tiles(1, 64) == dict(SPLIT_D=0)  # put back


def tuned_file(tmp_path, device, launches) -> Path:
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(dict(device=device, launches=launches)))
    return path


@pytest.fixture
def tuned_env(monkeypatch):
    def use(path):
        monkeypatch.setenv(tuning.ENV, str(path))
        tuning._table.cache_clear()
    yield use
    tuning._table.cache_clear()


def here() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"


def test_a_file_tuned_on_this_device_replaces_the_default_for_its_launches_only(tmp_path, tuned_env):
    tuned_env(tuned_file(tmp_path, here(), {"router 1,2048": dict(SPLIT_D=64, BLOCK_T=1, num_warps=2)}))
    assert tuning.tuned("router", (1, 2048), dict(SPLIT_D=32)) == dict(SPLIT_D=64, BLOCK_T=1, num_warps=2)
    assert tuning.tuned("router", (2, 2048), dict(SPLIT_D=32)) == dict(SPLIT_D=32)  # another shape
    assert tuning.tuned("qkv", (1,), dict(BK=128)) == dict(BK=128)


@pytest.mark.parametrize("content, said", [
    (json.dumps(dict(device="NVIDIA H100 80GB HBM3", launches={"qkv 1": {"BK": 64}})), "tuned on NVIDIA H100"),
    ("{not json", "JSONDecodeError"),
    (json.dumps(dict(device="x")), "KeyError"),
    (json.dumps(dict(device="x", launches={"qkv 1": 3})), "must map each launch"),
])
def test_a_file_for_another_device_or_malformed_is_said_and_the_defaults_hold(tmp_path, tuned_env, capsys,
                                                                               content, said):
    path = tmp_path / "tuned.json"
    path.write_text(content)
    tuned_env(path)
    assert tuning.tuned("qkv", (1,), dict(BK=128)) == dict(BK=128)
    err = capsys.readouterr().err
    assert f"MOEBENCH_TUNED={path} not used" in err and said in err and len(err.strip().splitlines()) == 1


def test_a_missing_file_is_said(tmp_path, tuned_env, capsys):
    tuned_env(tmp_path / "nowhere.json")
    assert tuning.tuned("qkv", (1,), dict(BK=128)) == dict(BK=128)
    assert "FileNotFoundError" in capsys.readouterr().err
