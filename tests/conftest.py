"""Shared fixtures: small Hugging Face checkpoints that transformers itself writes, and a private cache folder."""

import shutil

import pytest
import torch

from moebench.model.presets import ASSETS

# Each entry: a checkpoint exercising one config feature that changes the math.
HF_CONFIGS = {
    "sharded": dict(norm_topk_prob=True, shard="30KB"),
    "no_norm_topk": dict(norm_topk_prob=False),
    "dense_layers": dict(mlp_only_layers=[0], decoder_sparse_step=2, num_hidden_layers=4),
    "tied": dict(tie_word_embeddings=True),
    "head_dim": dict(head_dim=24),  # 4 heads x 24 != hidden 32
    "bias_mha": dict(attention_bias=True, num_key_value_heads=4),
    "yarn": dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                  "rope_theta": 10000.0}),
    "linear_rope": dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}),
    "sliding": dict(use_sliding_window=True, sliding_window=5),
}


def make_hf_checkpoint(path, seed=0, **overrides):
    """A random Qwen3-MoE saved by transformers' save_pretrained, with moebench's tokenizer beside it."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    shard = overrides.pop("shard", None)
    fields = dict(vocab_size=4096, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, num_experts=6,
                  num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=256,
                  rms_norm_eps=1e-6, eos_token_id=0, pad_token_id=0)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**fields)).eval()
    with torch.no_grad():  # transformers inits norms to ones; perturb them so a skipped norm weight is caught
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, max_shard_size=shard) if shard else model.save_pretrained(path)
    shutil.copy(ASSETS / "tokenizer.json", path / "tokenizer.json")
    (path / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}')
    return model


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """name -> (folder, transformers model) for every entry of HF_CONFIGS."""
    out = {}
    for name, overrides in HF_CONFIGS.items():
        path = tmp_path_factory.mktemp(name)
        out[name] = (path, make_hf_checkpoint(path, **overrides))
    return out


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """The embedded model is written into a per-session cache, so tests start from nothing."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MOEBENCH_CACHE", str(tmp_path_factory.mktemp("cache")))
    # The confined submission processes of the tests run trusted modules: one compile cache for all of them.
    mp.setenv("MOEBENCH_SANDBOX_CACHE", str(tmp_path_factory.mktemp("sandbox-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: the tiny model gains nothing from two, and on a busy two-core machine two threads
    spin at every op's barrier, making each request many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # every file a mode writes lands here
    return tmp_path


def run_cli(capsys, *argv):
    """moebench's command line in-process: (exit code, stdout, stderr)."""
    from moebench.cli.main import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    """The one line a user error prints, checked to be alone (but for progress lines of long work done before the
    problem showed) and without a traceback."""
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[progress] ")]
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    assert "Traceback" not in err
    return lines[0]


# The reference's MACs by hand (test_flops, test_bucketing; kept here: a test module imported by another is imported
# twice, as its file and as tests.<name>, and its custom ops defined twice).
def reference_macs(cfg, L: int, N: int, S: int) -> tuple[int, int]:
    """(prefill MACs, MACs of one decode step) of the reference for an L-token prompt, cache of S slots.

    Per token and layer: q, k, v and o projections, the router (D·E) and the k chosen experts (gate, up, down:
    3·D·I each). Attention: scores plus context, 2·H·Lq·Lk·hd, with Lk = L in the prefill and S (the decode
    mask spans the whole cache) in each decode step. The LM head runs on one token per step (the prefill keeps
    only the last column)."""
    D, V, E, k, I = cfg.hidden_size, cfg.vocab_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    H, Hkv, hd, layers = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    q, kv = H * hd, Hkv * hd
    per_token = layers * (D * q + 2 * D * kv + q * D + D * E + k * 3 * D * I)
    head = D * V
    prefill = L * per_token + layers * 2 * H * L * L * hd + head
    decode = per_token + layers * 2 * H * 1 * S * hd + head
    return prefill, decode
