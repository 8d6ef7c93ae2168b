"""Bad input the harness reads, one row per case: each ends in exactly one `moebench: error: ...` line on stderr
naming the problem, and exit code 2. Only cases no other test file covers are here (docs/bad-input.md maps every
case to its test)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import error_line, run_cli

pytestmark = pytest.mark.usefixtures("in_tmp", "one_thread")

HEADER = "Prompt ID,Context Length,Sequence Length,Base latency,Base throughput"
PROMPT = "Hello world"
GENERATE = ["--mode", "generate", "--seq-len", "16", "--max-new-tokens", "1"]
BASELINES = ["--mode", "generate_accuracy_baselines", "--seq-len", "16", "--benchmark-runs", "1",
             "--warmup-runs", "0"]
EVALUATE_ALL = ["--mode", "evaluate_all", "--seq-len", "16", "--benchmark-runs", "1", "--audit-pairs", "0",
                "--warmup-runs", "0"]


# ---------------------------------------------------------------------------------------------------------------
# Setups: each writes the bad input into the working folder (a fresh temporary one)


def nothing(tmp: Path) -> None:
    pass


def empty_model_folder(tmp: Path) -> None:
    (tmp / "model").mkdir()


def config_not_utf8(tmp: Path) -> None:
    from moebench.model.presets import preset_dir

    shutil.copytree(preset_dir("moebench-tiny"), tmp / "model")
    text = (tmp / "model" / "config.json").read_text(encoding="utf-8")
    (tmp / "model" / "config.json").write_bytes(text.encode("utf-16"))  # a BOM and NUL bytes: not UTF-8


def eos_outside_vocab(tmp: Path) -> None:
    from moebench.model.presets import preset_dir

    shutil.copytree(preset_dir("moebench-tiny"), tmp / "model")
    path = tmp / "model" / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "eos_token_id": [0, 99999]}))


def prompts(content: bytes):
    def setup(tmp: Path) -> None:
        (tmp / "prompts.txt").write_bytes(content)
    return setup


def prompt_data(csv_text: str, prompts_txt: str = PROMPT + "\n"):
    def setup(tmp: Path) -> None:
        (tmp / "prompts.txt").write_text(prompts_txt)
        (tmp / "prompt_data_cpu.csv").write_text(csv_text)
    return setup


def stored_expected(run_seq_len: int = 8, stored_seq_len: int = 8, damage=None):
    """prompts.txt (one prompt), its prompt_data_cpu.csv row (Sequence Length run_seq_len), and expected_logits_0.pt
    and .json saved by save_expected with the metadata evaluate_all computes for a run at stored_seq_len (so they match
    the run except where run_seq_len asks for more tokens); then damage(tmp)."""
    def setup(tmp: Path) -> None:
        from moebench.cli.args import parse_args
        from moebench.evaluation.expected import save_expected
        from moebench.modes.contest import expected_meta
        from moebench.modes.setup import dtype_of, make_request, open_source

        run, _ = parse_args(["--mode", "evaluate_all", "--seq-len", str(stored_seq_len)])
        source = open_source(run)
        req = make_request(run, source, [PROMPT])
        meta = expected_meta(run, source, req, dtype_of(run))
        save_expected(tmp, 0, torch.zeros(meta.new_tokens, 1, source.config.vocab_size), meta)
        context = int(req.attention_mask.sum())
        prompt_data(f"{HEADER}\n0,{context},{run_seq_len},100.0,50.0\n")(tmp)
        if damage:
            damage(tmp)
    return setup


def folder(name: str):
    def setup(tmp: Path) -> None:
        (tmp / name).mkdir()
    return setup


def both(*setups):
    def setup(tmp: Path) -> None:
        for one in setups:
            one(tmp)
    return setup


def link(name: str, to: str):
    def setup(tmp: Path) -> None:
        (tmp / name).symlink_to(to)
    return setup


def write_file(name: str, content: bytes):
    def damage(tmp: Path) -> None:
        (tmp / name).write_bytes(content)
    return damage


def edit_json(name: str, **fields):
    def damage(tmp: Path) -> None:
        (tmp / name).write_text(json.dumps({**json.loads((tmp / name).read_text()), **fields}))
    return damage


def save_tensor(name: str, shape: list[int] | None, dtype=torch.float32):
    """name replaced by zeros of `shape` (None: the stored tensor's) and dtype."""
    def damage(tmp: Path) -> None:
        old = torch.load(tmp / name)
        torch.save(torch.zeros(shape or old.shape, dtype=dtype), tmp / name)
    return damage


def truncate(name: str):
    def damage(tmp: Path) -> None:
        data = (tmp / name).read_bytes()
        (tmp / name).write_bytes(data[:len(data) // 2])
    return damage


# ---------------------------------------------------------------------------------------------------------------
# The table: id, setup, argv, what the one error line must contain

def case(id: str, setup, argv: list[str], words: str):
    return pytest.param(setup, argv, words, id=id)


CASES = [
    # --model-path
    case("model-path-empty-folder", empty_model_folder, [*GENERATE, "--model-path", "model"],
         "model/config.json: config.json not found"),
    case("eos-id-outside-the-vocabulary", eos_outside_vocab, [*GENERATE, "--model-path", "model"],
         "the model's EOS ids [0, 99999] (config.json, generation_config.json, tokenizer) are not all inside its "
         "vocabulary (4096)"),
    case("config-json-not-utf8", config_not_utf8, [*GENERATE, "--model-path", "model"],
         "config.json: not valid JSON ('utf-8' codec can't decode"),
    # prompts.txt
    case("prompts-txt-missing-baselines", nothing, BASELINES, "prompts.txt not found in"),
    case("prompts-txt-empty-evaluate-all", prompts(b""), EVALUATE_ALL, "prompts.txt holds no prompt"),
    case("prompts-txt-empty-baselines", prompts(b"\n  \n\t\n"), BASELINES, "prompts.txt holds no prompt"),
    case("prompts-txt-not-utf8-evaluate-all", prompts("Hello world\n\nWhat is AI?\n".encode("utf-16")),
         EVALUATE_ALL, "prompts.txt:1: not UTF-8 text"),
    case("prompts-txt-not-utf8-baselines", prompts("Hello world\n\nUn café ?\n".encode("latin-1")), BASELINES,
         "prompts.txt:3: not UTF-8 text"),
    # prompt_data_cpu.csv (evaluate_all)
    case("prompt-data-malformed-number", prompt_data(f"{HEADER}\n0,2,16,fast,50.0\n"), EVALUATE_ALL,
         "prompt_data_cpu.csv:2: expected three integers and two numbers, got '0,2,16,fast,50.0'"),
    case("prompt-data-wrong-header", prompt_data("id,ctx,seq,latency,throughput\n0,2,16,100.0,50.0\n"),
         EVALUATE_ALL, "prompt_data_cpu.csv:1: wrong header 'id,ctx,seq,latency,throughput'"),
    case("prompt-data-seq-len-shorter-than-prompt",
         prompt_data(f"{HEADER}\n0,2,4,100.0,50.0\n", "A prompt of clearly more than four tokens\n"), EVALUATE_ALL,
         "prompt_data_cpu.csv"),
    # expected_logits_{i}.pt / .json: every prompt's checked (metadata, the tensor memory-mapped) before any long work
    case("expected-pt-not-a-torch-file",
         stored_expected(damage=write_file("expected_logits_0.pt", b"not a torch file\n")), EVALUATE_ALL,
         "expected_logits_0.pt: cannot load it as a tensor file"),
    case("expected-pt-truncated", stored_expected(damage=truncate("expected_logits_0.pt")), EVALUATE_ALL,
         "expected_logits_0.pt: cannot load it as a tensor file"),
    case("expected-json-malformed", stored_expected(damage=write_file("expected_logits_0.json", b"{ not json")),
         EVALUATE_ALL, "expected_logits_0.json: not valid expected-logits metadata"),
    case("expected-json-new-tokens-a-string",
         stored_expected(damage=edit_json("expected_logits_0.json", new_tokens="8")), EVALUATE_ALL,
         "expected_logits_0.json: not valid expected-logits metadata (new_tokens is '8', not an integer)"),
    case("expected-json-prompt-ids-null", stored_expected(damage=edit_json("expected_logits_0.json", prompt_ids=None)),
         EVALUATE_ALL, "expected_logits_0.json: not valid expected-logits metadata (prompt_ids is None, not a list)"),
    case("expected-pt-other-vocabulary", stored_expected(damage=save_tensor("expected_logits_0.pt", [8, 1, 100])),
         EVALUATE_ALL, "expected_logits_0.pt: holds a torch.float32 tensor of shape [8, 1, 100], not the float logits"),
    case("expected-pt-integers", stored_expected(damage=save_tensor("expected_logits_0.pt", None, torch.int64)),
         EVALUATE_ALL, "expected_logits_0.pt: holds a torch.int64 tensor"),
    case("prompt-data-base-of-another-dtype", stored_expected(), [*EVALUATE_ALL, "--skip-accuracy", "--torch-dtype",
                                                                   "float32"],
         "prompt_data_cpu.csv: prompt 0's base was measured with dtype bfloat16, this run float32"),
    case("prompt-data-base-of-other-tp", stored_expected(damage=edit_json("expected_logits_0.json", tp_degree=2)),
         [*EVALUATE_ALL, "--skip-accuracy"], "prompt 0's base was measured with tp_degree 2, this run 1"),
    case("expected-logits-of-an-older-moebench", stored_expected(damage=edit_json("expected_logits_0.json",
                                                                                   moebench_version="0.1.0")),
         EVALUATE_ALL, "expected_logits_0.pt does not match this run: moebench_version differs (stored 0.1.0, needed"),
    case("expected-meta-other-seq-len", stored_expected(run_seq_len=12, stored_seq_len=8), EVALUATE_ALL,
         "expected_logits_0.pt does not match this run: it holds 4 tokens, 8 are needed"),
    # an output file with a folder in its place: refused before the long work (after it, a traceback lost the score)
    case("report-path-a-folder", folder("benchmark_report.json"),
         ["--mode", "evaluate_single", "--seq-len", "16", "--benchmark-runs", "1"],
         "benchmark_report.json: a folder is in its place"),
    case("prompt-data-path-a-folder-baselines", both(prompts(b"Hello world\n"), folder("prompt_data_cpu.csv")),
         BASELINES, "prompt_data_cpu.csv: a folder is in its place"),
    case("report-i-path-a-folder-evaluate-all", both(prompts(b"Hello world\n"), folder("benchmark_report_0.json")),
         EVALUATE_ALL, "benchmark_report_0.json: a folder is in its place"),
    case("logits-path-a-folder-generate", folder("output_logits.pt"), [*GENERATE, "--output-logits"],
         "output_logits.pt: a folder is in its place"),
    # flags
    case("tol-map-malformed", nothing, ["--mode", "validate", "--tol-map", "{None: (1e-5,"],
         "argument --tol-map: not a Python literal"),
    case("seq-len-0", nothing, ["--mode", "generate", "--seq-len", "0"],
         "argument --seq-len: must be > 0, got 0"),
    case("max-new-tokens-negative", nothing, ["--mode", "generate", "--max-new-tokens", "-1"],
         "argument --max-new-tokens: must be > 0, got -1"),
    case("bucket-not-a-number", nothing, [*GENERATE, "--enable-bucketing", "--context-encoding-buckets", "5,abc"],
         "argument --context-encoding-buckets: expected a whole number, got '5,abc'"),
    case("context-encoding-bucket-larger-than-seq-len", nothing,
         [*GENERATE, "--enable-bucketing", "--context-encoding-buckets", "32"],
         "--context-encoding-buckets: bucket 32 is larger than --seq-len 16"),
    case("team-id-names-another-folder", nothing, ["--mode", "evaluate_single", "--team-id", "../esc"],
         "argument --team-id: '../esc' would not name a file in the working folder"),
    case("qwen-missing-py-file", nothing, ["--mode", "validate", "--seq-len", "16", "--qwen", "my_qwen.py"],
         "--qwen my_qwen.py: file not found"),
    # found before the long work (after it, the score was lost): the records file a link to nothing or a loop
    case("records-a-link-loop", link("moebench-tiny_score_records.csv", "moebench-tiny_score_records.csv"),
         ["--mode", "evaluate_single", "--seq-len", "16", "--benchmark-runs", "1"],
         "moebench-tiny_score_records.csv: a link to nothing, or a loop of links"),
    case("records-jsonl-a-link-to-nothing", link("moebench-tiny_score_records.jsonl", "/nonexistent/x"),
         ["--mode", "evaluate_single", "--seq-len", "16", "--benchmark-runs", "1"],
         "moebench-tiny_score_records.jsonl: a link to nothing"),
    case("team-id-too-long", nothing, ["--mode", "evaluate_single", "--team-id", "t" * 250],
         "argument --team-id: 250 characters: too long for a file name"),
    case("member-id-not-utf8", nothing, ["--mode", "evaluate_single", "--member-id", "m\udce9"],
         "--member-id: 'm\\udce9' is not UTF-8 text"),
    case("prompt-not-utf8", nothing, [*GENERATE, "--prompt", "caf\udce9"], "--prompt: 'caf\\udce9' is not UTF-8 text"),
    case("phase-time-limit-huge", nothing, ["--mode", "validate", "--phase-time-limit", "1e300"],
         "argument --phase-time-limit: must be <= 1e+06, got 1e300"),
    case("base-throughput-tiny", nothing, ["--mode", "evaluate_single", "--base-throughput", "1e-300"],
         "argument --base-throughput: must be >= 1e-06, got 1e-300"),
    case("base-latency-huge", nothing, ["--mode", "evaluate_single", "--base-latency", "1e308"],
         "argument --base-latency: must be <= 1e+09, got 1e308"),
    case("model-path-empty", nothing, [*GENERATE, "--model-path", ""], "--model-path: an empty path"),
    case("compiled-model-path-empty", nothing, [*GENERATE, "--compiled-model-path", ""],
         "--compiled-model-path: an empty path"),
    case("prompts-txt-a-folder", folder("prompts.txt"), BASELINES, "prompts.txt: a folder is in its place"),
    # a KV cache whose size does not fit 64 bits: torch says "overflow" (a TypeError or a RuntimeError)
    *(case(f"seq-len-{n}", nothing, ["--mode", "generate", "--seq-len", str(n)],
           f"--seq-len {n}: the KV cache needs") for n in (10 ** 17, 10 ** 20)),
    case("seq-len-past-64-bits-in-the-baselines", write_file("prompts.txt", b"Hello world\n"),
         [*BASELINES, "--seq-len", str(10 ** 17)], f"--seq-len {10 ** 17}: the KV cache needs"),
    # a contestant's exception of several lines, on one line
    case("qwen-raises-lines-at-import", write_file("m.py", b"raise RuntimeError('first\\nsecond\\nthird')\n"),
         ["--mode", "validate", "--seq-len", "16", "--qwen", "m.py"], "RuntimeError: first; second; third"),
]


@pytest.mark.parametrize("setup, argv, words", CASES)
def test_bad_input_is_one_error_line_and_exit_2(setup, argv, words, capsys, in_tmp):
    setup(in_tmp)
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, f"exit code {code}\nstderr:\n{err}"
    line = error_line(err)
    assert line.startswith("moebench: error: "), line
    assert words in line, line
