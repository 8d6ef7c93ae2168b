"""The command line: every option parses, unsupported features stop with one line, and --mode generate runs
end to end on the embedded model (its logits equal Hugging Face transformers')."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moebench.cli import args as cli_args
from moebench.cli.args import DEFAULT_PROMPT, OPTIONS, RunConfig, build_parser, flag_names, parse_args
from moebench.cli.main import main
from moebench.errors import MoebenchError
from tests.conftest import error_line, run_cli as run

pytestmark = pytest.mark.usefixtures("in_tmp")

REPO = Path(__file__).resolve().parents[1]
TOL_MAP_TEXT = "{None: (1e-5, 0.05), 50: (1e-5, 0.03)}"
TOL_MAP = {None: (1e-5, 0.05), 50: (1e-5, 0.03)}
# float32: exact comparisons, and faster on the CPU; without bucketing: 2 graphs exported, not 6 (~6 s a run)
FAST = ["--mode", "generate", "--torch-dtype", "float32", "--enable-bucketing", "false"]








def prompt_len(text=DEFAULT_PROMPT) -> int:
    from moebench.model.loader import open_model

    return len(open_model(None).tokenizer.encode(text))


def saved_logits(out: str, cwd: Path) -> torch.Tensor:
    paths = [line.removeprefix("logits: ") for line in out.splitlines() if line.startswith("logits: ")]
    assert paths == [str(cwd / "output_logits.pt")]
    return torch.load(paths[0])


# ---------------------------------------------------------------------------------------------------------------
# Parsing every option


def sample_value(f) -> tuple[list[str], object]:
    """Command-line words for a valid value of option `f` (not its default where possible), and the parsed value."""
    m = f.metadata
    if m["bool_flag"]:
        return [str(not f.default).lower()], not f.default
    if m["append"]:
        return ["a prompt"], ("a prompt",)
    if m["many"]:
        return ["16", "32"], (16, 32)
    if m["choices"]:
        choice = next(c for c in m["choices"] if c != f.default)
        return [choice], choice
    if f.type is dict:
        return [TOL_MAP_TEXT], TOL_MAP
    if f.type is int:
        return ["7"], 7
    if f.type is float:
        return ["0.5"], 0.5
    if f.type is str:
        return ["some-name"], "some-name"
    raise AssertionError(f"option {f.name}: no sample value for type {f.type!r}; extend sample_value")


def argv_for(f, flag, words):
    return [flag, *words] if f.name == "mode" else ["--mode", "generate", flag, *words]


@pytest.mark.parametrize("f, flag", [pytest.param(f, flag, id=flag.lstrip("-")) for f in OPTIONS
                                     for flag in flag_names(f)])
def test_every_option_parses_into_the_run_config(f, flag, monkeypatch):
    monkeypatch.setattr(cli_args, "check", lambda run: [])  # combinations are checked elsewhere; parsing here
    words, expected = sample_value(f)
    run, _ = parse_args(argv_for(f, flag, words))
    assert getattr(run, f.name) == expected
    assert run.explicit == {"mode", f.name}
    assert isinstance(run, RunConfig)


def test_no_flags_gives_the_defaults():
    run, notes = parse_args(["--mode", "generate"])
    assert notes == []
    assert run.explicit == {"mode"}
    for f in OPTIONS:
        if f.name != "mode":
            assert getattr(run, f.name) == f.default, f.name
    assert run.prompts == [DEFAULT_PROMPT]


def test_mode_is_required(capsys):
    assert main(["--max-new-tokens", "3"]) == 2
    assert "--mode" in error_line(capsys.readouterr().err)


def test_prompt_appends():
    run, _ = parse_args(["--mode", "generate", "--prompt", "first one", "--prompt", "second"])
    assert run.prompt == ("first one", "second")
    assert run.prompts == ["first one", "second"]


def test_bucket_flags_take_several_ints(monkeypatch):
    monkeypatch.setattr(cli_args, "check", lambda run: [])
    run, _ = parse_args(["--mode", "generate", "--context-encoding-buckets", "128", "256", "512",
                         "--token-generation-buckets", "640"])
    assert run.context_encoding_buckets == (128, 256, 512)
    assert run.token_generation_buckets == (640,)
    with pytest.raises(SystemExit):
        parse_args(["--mode", "generate", "--context-encoding-buckets", "128", "x"])


@pytest.mark.parametrize("flag", ["--save_sharded_checkpoint", "--save-sharded-checkpoint"])
def test_save_sharded_checkpoint_both_spellings(flag, monkeypatch):
    monkeypatch.setattr(cli_args, "check", lambda run: [])
    assert parse_args(["--mode", "generate", flag])[0].save_sharded_checkpoint is True
    assert parse_args(["--mode", "generate", flag, "false"])[0].save_sharded_checkpoint is False


def test_enable_kernels_is_an_alias_of_enable_nki(monkeypatch):
    monkeypatch.setattr(cli_args, "check", lambda run: [])
    for argv in (["--enable-kernels"], ["--enable-kernels", "yes"], ["--enable-nki"]):
        assert parse_args(["--mode", "generate", *argv])[0].enable_nki is True
    assert parse_args(["--mode", "generate", "--enable-kernels", "0"])[0].enable_nki is False
    actions = {a.dest: a.option_strings for a in build_parser()._actions}
    assert set(actions["enable_nki"]) == {"--enable-nki", "--enable-kernels"}


# ---------------------------------------------------------------------------------------------------------------
# Bool flags


@pytest.mark.parametrize("text, value", [("False", False), ("false", False), ("0", False), ("no", False),
                                         ("true", True), ("True", True), ("1", True), ("yes", True)])
def test_bool_flag_values(text, value):
    run, _ = parse_args(["--mode", "generate", "--do-sample", text, "--output-logits", text])
    assert run.do_sample is value and run.output_logits is value


def test_bare_bool_flag_is_true():
    run, _ = parse_args(["--mode", "generate", "--output-logits", "--do-sample", "--fused-qkv"])
    assert run.output_logits is True and run.do_sample is True and run.fused_qkv is True


def test_bad_bool_value_is_a_usage_error(capsys):
    assert main(["--mode", "generate", "--do-sample", "maybe"]) == 2
    err = error_line(capsys.readouterr().err)
    assert "--do-sample" in err and "maybe" in err


# ---------------------------------------------------------------------------------------------------------------
# Features not built yet, modes, platform, tol map


@pytest.mark.parametrize("f", OPTIONS, ids=lambda f: f.name)
def test_no_flag_is_left_unsupported(f):
    """Every flag of the guide is built: a non-default value is accepted, noted, or refused for a reason of its
    own (another flag it needs), never for a missing feature."""
    words, value = sample_value(f)
    try:
        parse_args(argv_for(f, flag_names(f)[0], words))
    except MoebenchError as e:
        assert "not supported" not in str(e)


@pytest.mark.parametrize("flags, needs", [
    (["--qkv-kernel-enabled"], "needs --fused-qkv"),
    (["--rmsnorm-quantize-kernel-enabled"], "needs --quantized-mlp-kernel-enabled"),
    (["--mlp-kernel-fuse-residual-add"], "needs an MoE kernel"),
])
def test_kernel_flags_that_cannot_work_together_stop(flags, needs, capsys):
    code, out, err = run(capsys, "--mode", "validate", *flags)
    assert code == 2 and out == ""
    line = error_line(err)
    assert needs in line and any(f in line for f in flags)


@pytest.mark.parametrize("flags", [["--qkv-kernel-enabled", "--fused-qkv"], ["--qkv-kernel-enabled", "--enable-nki"],
                                   ["--mlp-kernel-enabled", "--mlp-kernel-fuse-residual-add"],
                                   ["--quantized-mlp-kernel-enabled", "--rmsnorm-quantize-kernel-enabled"],
                                   ["--quantized-mlp-kernel-enabled", "--mlp-kernel-fuse-residual-add"]])
def test_kernel_flags_that_work_together_parse(flags):
    parse_args(["--mode", "validate", *flags])


def test_quantization_settings_without_the_quantized_kernel_get_a_note():
    _, notes = parse_args(["--mode", "validate", "--quantized-kernel-lower-bound", "100", "--quantized-dtype", "fp8"])
    assert any("--quantized-kernel-lower-bound has no effect without --quantized-mlp-kernel-enabled" in n
               for n in notes)
    assert any("--quantized-dtype has no effect" in n for n in notes)


@pytest.mark.parametrize("target", ["trn2", "trn3"])
def test_trainium_target_is_one_clear_line(target, capsys):
    code, out, err = run(capsys, "--mode", "generate", "--platform-target", target)
    assert code == 2
    assert target in error_line(err)


def test_tol_map_parses_to_a_dict():
    run, notes = parse_args(["--mode", "generate", "--tol-map", TOL_MAP_TEXT])
    assert run.tol_map == TOL_MAP
    assert any("--tol-map has no effect" in n for n in notes)  # only the evaluate modes use it


@pytest.mark.parametrize("text", ["{None: (1e-5, 0.05)", "{None: (1e-5,)}", "[(1e-5, 0.05)]", "{}",
                                  "{0: (1e-5, 0.05)}", "{None: (-1e-5, 0.05)}", "{None: (1e-999, 1e999)}",
                                  "{'a': (1e-5, 0.05)}",
                                  "__import__('os')"])
def test_malformed_tol_map_is_a_usage_error(text, capsys):
    assert main(["--mode", "generate", "--tol-map", text]) == 2
    assert "--tol-map" in error_line(capsys.readouterr().err)


@pytest.mark.parametrize("argv, words", [
    (["--top-p", "1.5"], "--top-p"),
    (["--top-p", "nan"], "--top-p"),  # nan passes every comparison
    (["--phase-time-limit", "inf"], "--phase-time-limit"),  # it overflowed the pipe's poll and hung the exit
    (["--base-latency", "nan"], "--base-latency"),  # it stopped the score after the whole evaluation
    (["--base-throughput", "inf"], "--base-throughput"),
    (["--divergence-difference-tol", "nan"], "--divergence-difference-tol"),
    (["--max-context-length", "640"], "--max-context-length"),
    (["--prompt", "  "], "--prompt"),
])
def test_invalid_values_stop_with_one_line(argv, words, capsys):
    code, out, err = run(capsys, "--mode", "generate", *argv)
    assert code == 2 and words in error_line(err)


def test_seed_range():
    assert parse_args(["--mode", "generate", "--seed", str(2 ** 64 - 1)])[0].seed == 2 ** 64 - 1
    for bad in (str(2 ** 64), "-1", "x"):
        with pytest.raises(SystemExit) as e:
            parse_args(["--mode", "generate", "--seed", bad])
        assert e.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_target_without_cuda_is_one_clear_line(capsys):
    code, out, err = run(capsys, "--mode", "generate", "--platform-target", "cuda", "--max-new-tokens", 1)
    assert code == 2 and "cuda" in error_line(err)


# ---------------------------------------------------------------------------------------------------------------
# Notes for flags without effect


@pytest.mark.parametrize("argv, note", [
    (["--n-positions", "10"], "--n-positions has no effect"),
    (["--team-id", "x"], "--team-id has no effect in --mode generate"),
])
def test_flags_without_effect_print_a_note(argv, note, capsys):
    code, out, err = run(capsys, *FAST, "--max-new-tokens", "1", *argv)
    assert code == 0
    assert any(line.startswith("note: ") and note in line for line in err.splitlines()), err


@pytest.mark.parametrize("mode", ["evaluate_all", "generate_accuracy_baselines"])
def test_prompt_notes_that_the_prompts_txt_modes_read_that_file(mode):
    _, notes = parse_args(["--mode", mode, "--prompt", "hi"])
    assert f"note: --prompt has no effect in --mode {mode}" in notes
    for other in ("evaluate_single", "validate", "generate"):
        assert not any("--prompt" in n for n in parse_args(["--mode", other, "--prompt", "hi"])[1])


@pytest.mark.parametrize("moot, flag, note", [
    (["--do-sample", "false"], ["--temperature", "0.8"], "--temperature has no effect with --do-sample false"),
    (["--do-sample", "false"], ["--seed", "3"], "--seed has no effect with --do-sample false"),
    (["--temperature", "0"], ["--top-k", "5"], "--top-k has no effect with --temperature 0"),
    ([], ["--benchmark-runs", "3"], "--benchmark-runs has no effect without --benchmark"),
    (["--skip-accuracy"], ["--num-tokens-to-check", "3"], "--num-tokens-to-check has no effect with --skip-accuracy"),
    (["--max-new-tokens", "3"], ["--max-length", "30"], "--max-length has no effect with --max-new-tokens"),
    (["--isolation", "none"], ["--audit-pairs", "7"], "--audit-pairs has no effect with --isolation none"),
    (["--isolation", "none"], ["--phase-time-limit", "9"], "--phase-time-limit has no effect with --isolation none"),
])
def test_flags_made_moot_by_another_flag_print_a_note(moot, flag, note):
    mode = ["--mode", "evaluate_single" if {"--skip-accuracy", "--isolation"} & {*moot} else "generate"]
    _, notes = parse_args(mode + moot + flag)
    assert any(note in n for n in notes), notes
    unmoot = ["--benchmark"] if not moot else []  # the same flag where nothing makes it moot: no note
    _, notes = parse_args(mode + unmoot + flag)
    assert not any(f"{flag[0]} has no effect" in n for n in notes), notes



@pytest.mark.parametrize("mode", ["generate", "validate", "evaluate_single", "evaluate_all"])
def test_padding_flags_note_that_one_prompt_has_nothing_to_pad(mode):
    """Each request of one prompt (evaluate_all's prompts run one at a time) pads nothing: --padding-side says so;
    --pad-token-id too in generate (evaluation also keeps it out of its fresh prompts)."""
    flags = ["--padding-side", "left", "--pad-token-id", "7"]
    _, notes = parse_args(["--mode", mode, *flags])
    assert any("--padding-side has no effect with one prompt" in n for n in notes), notes
    assert any("--pad-token-id has no effect" in n for n in notes) == (mode == "generate"), notes
    if mode in ("generate", "validate"):  # two prompts: both pad
        _, notes = parse_args(["--mode", mode, "--prompt", "a", "--prompt", "b c", *flags])
        assert not any("--pad" in n for n in notes), notes

def test_no_audit_asked_under_isolation_none_needs_no_note():
    _, notes = parse_args(["--mode", "evaluate_single", "--isolation", "none", "--audit-pairs", "0"])
    assert not any("--audit-pairs" in n for n in notes), notes


def test_sampling_flags_note_that_evaluation_is_greedy():
    _, notes = parse_args(["--mode", "validate", "--temperature", "0.8", "--output-logits"])
    assert any("--temperature has no effect in --mode validate" in n for n in notes)
    assert any("--output-logits has no effect in --mode validate" in n for n in notes)


# ---------------------------------------------------------------------------------------------------------------
# generate, end to end


def test_generate_greedy_writes_logits(capsys, in_tmp):
    code, out, err = run(capsys, *FAST, "--max-new-tokens", 4, "--do-sample", "false", "--output-logits")
    assert code == 0, err
    assert "Output 0: I believe the meaning of life is" in out
    logits = saved_logits(out, in_tmp)
    assert logits.shape == (4, 1, 4096) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_generate_two_prompts(capsys, in_tmp):
    code, out, err = run(capsys, *FAST, "--max-new-tokens", 4, "--do-sample", "false", "--output-logits",
                         "--prompt", "Hello world", "--prompt", DEFAULT_PROMPT)
    assert code == 0, err
    assert "Output 0: Hello world" in out and f"Output 1: {DEFAULT_PROMPT}" in out
    logits = saved_logits(out, in_tmp)
    assert logits.shape == (4, 2, 4096)
    # each row equals that prompt run alone (padding does not change the numbers)
    code, out, _ = run(capsys, *FAST, "--max-new-tokens", 4, "--do-sample", "false", "--output-logits",
                       "--prompt", "Hello world")
    alone = saved_logits(out, in_tmp)  # fewer steps where that prompt alone reaches the end of text first
    torch.testing.assert_close(logits[:len(alone), :1], alone, atol=1e-5, rtol=1e-5)


def test_padding_side_does_not_change_the_logits(capsys, in_tmp):
    prompts = ["--prompt", "Hello world", "--prompt", DEFAULT_PROMPT]
    got = {}
    for side in ("left", "right"):
        code, out, err = run(capsys, *FAST, "--max-new-tokens", 3, "--do-sample", "false", "--output-logits",
                             "--padding-side", side, *prompts)
        assert code == 0, err
        got[side] = (generated_text(out), saved_logits(out, in_tmp))
    assert got["left"][0] == got["right"][0]
    torch.testing.assert_close(got["left"][1], got["right"][1], atol=1e-5, rtol=1e-5)


def test_generate_logits_equal_transformers(capsys, in_tmp):
    from transformers import Qwen3MoeForCausalLM

    from moebench.model.loader import open_model
    from moebench.model.presets import preset_dir

    code, out, err = run(capsys, *FAST, "--max-new-tokens", 4, "--do-sample", "false", "--output-logits")
    assert code == 0, err
    ours = saved_logits(out, in_tmp)

    tok = open_model(None).tokenizer
    ids = torch.tensor([tok.encode(DEFAULT_PROMPT)])
    hf = Qwen3MoeForCausalLM.from_pretrained(preset_dir("moebench-tiny"), dtype=torch.float32).eval()
    with torch.no_grad():
        res = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                          output_logits=True, return_dict_in_generate=True)
    expected = torch.stack(res.logits)  # [new_tokens, batch, vocab], raw (before any logits processor)
    assert expected.shape == ours.shape == (4, 1, 4096)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    new_text = tok.decode(res.sequences[0, ids.shape[1]:].tolist())
    assert f"Output 0: {DEFAULT_PROMPT}{new_text}\n" in out


def generated_text(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("Output ")]


def test_sampling_is_reproducible_by_seed(capsys):
    texts = {}
    for key, seed in (("a", 3), ("b", 3), ("c", 4)):
        code, out, err = run(capsys, *FAST, "--max-new-tokens", 20, "--seed", seed)
        assert code == 0, err
        # the whole continuation: the trained model's often starts on a new line
        texts[key] = out.split("Generated outputs:", 1)[1].split(" steps in ", 1)[0]
    assert texts["a"] == texts["b"]
    assert texts["a"] != texts["c"]


# ---------------------------------------------------------------------------------------------------------------
# Length rules (CONTRACTS.md "Lengths")


def test_prompt_longer_than_seq_len_stops(capsys):
    n = prompt_len()
    code, out, err = run(capsys, *FAST, "--seq-len", 4)
    assert code == 2
    line = error_line(err)
    assert f"{n} tokens" in line and "--seq-len 4" in line


def test_prompt_longer_than_max_context_length_stops(capsys):
    n = prompt_len()
    code, out, err = run(capsys, *FAST, "--max-context-length", n - 1)
    assert code == 2
    line = error_line(err)
    assert f"{n} tokens" in line and f"--max-context-length {n - 1}" in line


def new_tokens(capsys, in_tmp, *argv) -> int:
    return generated(capsys, in_tmp, *argv)[0]


def generated(capsys, in_tmp, *argv) -> tuple[int, str]:
    """(the new tokens, the output) of a greedy run."""
    code, out, err = run(capsys, *FAST, "--do-sample", "false", "--output-logits", *argv)
    assert code == 0, err
    return saved_logits(out, in_tmp).shape[0], out


def test_max_new_tokens_gives_exactly_that_many(capsys, in_tmp):
    assert new_tokens(capsys, in_tmp, "--max-new-tokens", 3) == 3


def test_max_new_tokens_is_capped_by_seq_len(capsys, in_tmp):
    n = prompt_len()
    new, out = generated(capsys, in_tmp, "--seq-len", n + 2, "--max-new-tokens", 10)
    note = f"note: --max-new-tokens 10 is capped by --seq-len {n + 2}: 2 new tokens after the {n}-token prompt"
    assert new == 2 and note in out.splitlines()
    new, out = generated(capsys, in_tmp, "--seq-len", n + 2, "--max-length", n + 5)
    assert new == 2 and f"note: --max-length {n + 5} is capped by --seq-len {n + 2}: 2 new tokens" in out
    new, out = generated(capsys, in_tmp, "--seq-len", n + 5, "--max-new-tokens", 5)
    assert new == 5 and "is capped by" not in out


def test_prompts_of_a_file_capped_alike_get_one_note(capsys):
    from moebench.modes.setup import open_source, prompt_requests

    run, _ = parse_args(["--mode", "validate", "--seq-len", "24", "--max-new-tokens", "50"])
    source = open_source(run)
    prompts = ["The capital of France is", "The capital of France is", "The capital of France is a city"]
    reqs = prompt_requests([run] * 3, source, prompts, "prompts.txt")
    lengths = [r.input_ids.shape[1] for r in reqs]
    assert [r.max_new_tokens for r in reqs] == [24 - n for n in lengths] and lengths[0] < lengths[2]
    notes = [line for line in capsys.readouterr().out.splitlines() if "is capped by" in line]
    assert notes == [f"note: --max-new-tokens 50 is capped by --seq-len 24: {24 - n} new tokens after the {n}-token "
                     "prompt" for n in (lengths[0], lengths[2])]


def test_default_new_tokens_fill_seq_len(capsys, in_tmp):
    assert new_tokens(capsys, in_tmp, "--seq-len", prompt_len() + 5) == 5


def test_explicit_max_length_is_honoured(capsys, in_tmp):
    n = prompt_len()
    assert new_tokens(capsys, in_tmp, "--max-length", n + 5) == 5
    assert new_tokens(capsys, in_tmp, "--seq-len", n + 3, "--max-length", n + 10) == 3  # capped by --seq-len


def test_max_length_without_room_stops(capsys):
    n = prompt_len()
    code, out, err = run(capsys, *FAST, "--max-length", n)
    assert code == 2 and "--max-length" in error_line(err)


# ---------------------------------------------------------------------------------------------------------------
# The driver script


def test_main_py_driver_runs():
    proc = subprocess.run([sys.executable, "main.py", "--mode", "generate", "--max-new-tokens", "3"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"Output 0: {DEFAULT_PROMPT}" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_ctrl_c_is_the_harness_line_not_a_traceback_of_the_submissions_process(tmp_path):
    """Ctrl-C reaches the terminal's whole process group, the submission's process too: it leaves Ctrl-C to the
    harness, which stops it (it printed the traceback of its KeyboardInterrupt, or of the pipe the harness had
    closed)."""
    import os
    import signal

    proc = subprocess.Popen([sys.executable, "-u", str(REPO / "main.py"), "--mode", "evaluate_single", "--seq-len",
                             "20", "--benchmark-runs", "2", "--warmup-runs", "0"], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    for line in proc.stdout:
        if line.startswith("isolation: "):  # the submission's process is built, waiting for the harness's calls
            break
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and err.endswith("moebench: interrupted\n") and "Traceback" not in err, err
