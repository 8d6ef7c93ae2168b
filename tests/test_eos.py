"""Greedy decoding never picks EOS: the original's min_new_tokens = max_new_tokens sets its scores to -inf at every
step (spec/nxdi-semantics.md §2.1, §6.2). Checked against transformers' generate(min_new_tokens=n)."""

import pytest
import torch

from moebench.cli.args import DEFAULT_PROMPT
from moebench.engine.generator import Engine
from moebench.engine.sampling import OnDeviceSampling, SamplingParams
from moebench.evaluation.benchmark import time_request
from moebench.model.loader import build_model, open_model
from moebench.model.qwen3_moe import ModelOptions, Qwen3MoeForCausalLM
from tests.conftest import make_hf_checkpoint, run_cli

EOS, NEW = 0, 12


@pytest.fixture(scope="module")
def eos_prone(tmp_path_factory):
    """A transformers checkpoint whose EOS row of lm_head is 1.05x the row of the token its greedy decoding picks
    most: EOS becomes the argmax there. (folder, transformers model, prompts)."""
    path = tmp_path_factory.mktemp("eos_prone")
    hf = make_hf_checkpoint(path)
    ids = torch.randint(1, 4096, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                          eos_token_id=None, pad_token_id=EOS)[:, ids.shape[1]:]
        values, counts = out.unique(return_counts=True)
        hf.lm_head.weight[EOS] = 1.05 * hf.lm_head.weight[int(values[counts.argmax()])]
    hf.save_pretrained(path)
    return path, hf, ids


def model_of(path):
    return build_model(Qwen3MoeForCausalLM, open_model(str(path)), ModelOptions(), torch.float32, "cpu")


def test_greedy_bans_eos_as_transformers_min_new_tokens(eos_prone):
    path, hf, ids = eos_prone
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                           eos_token_id=EOS, pad_token_id=EOS, output_scores=True, return_dict_in_generate=True)
    model = model_of(path)
    free, _ = Engine(model, 2, 20).greedy(ids, mask, NEW)
    assert (free == EOS).any()  # without the ban this checkpoint picks EOS: the test can fail
    tokens, scores = Engine(model, 2, 20, banned=(EOS,)).greedy(ids, mask, NEW)
    assert torch.equal(tokens, want.sequences[:, ids.shape[1]:])
    torch.testing.assert_close(scores, torch.stack(want.scores), atol=1e-4, rtol=1e-4)  # EOS -inf on both sides
    assert bool((scores[..., EOS] == float("-inf")).all())


@pytest.mark.parametrize("compile", [False, True])
def test_timed_requests_ban_eos_on_the_host_and_in_the_on_device_graph(eos_prone, compile):
    path, _, ids = eos_prone
    mask = torch.ones_like(ids)
    model = model_of(path)
    want, _ = Engine(model, 2, 20, banned=(EOS,)).greedy(ids, mask, NEW)
    host = time_request(Engine(model, 2, 20, compile=compile, banned=(EOS,)), ids, mask, NEW, None)
    on_device = Engine(model, 2, 20, compile=compile, banned=(EOS,), sampling=OnDeviceSampling(SamplingParams()))
    assert torch.equal(host.cpu(), want) and torch.equal(time_request(on_device, ids, mask, NEW, None).cpu(), want)
    unbanned = Engine(model, 2, 20, compile=compile, sampling=OnDeviceSampling(SamplingParams()))
    assert (time_request(unbanned, ids, mask, NEW, None) == EOS).any()


@pytest.mark.usefixtures("in_tmp")
def test_evaluation_decodes_the_default_prompt_as_greedy_generate(capsys):
    """The embedded model's greedy argmax is EOS at the default prompt's 5th new token (bfloat16, on the AMD VM):
    evaluation's expected text must be what generate's greedy decoding (EOS banned on the host for min = max new
    tokens) says. (Without the ban in evaluation it read '\nrequired.', generate '\nrequired.\n'.)"""
    code, out, err = run_cli(capsys, "--mode", "generate", "--do-sample", "false", "--seq-len", "17")
    assert code == 0, out + err
    text = out.split(f"Output 0: {DEFAULT_PROMPT}", 1)[1].removesuffix("\n")  # the last line of stdout
    code, out, err = run_cli(capsys, "--mode", "evaluate_single", "--seq-len", "17", "--benchmark-runs", "1",
                             "--warmup-runs", "0", "--isolation", "none")
    assert code == 0, out + err
    assert f"expected text [0]: {text!r}" in out and "logit validation PASS" in out
