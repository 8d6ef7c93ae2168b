"""`moebench report` and `moebench leaderboard`: the pages from a real evaluate_all, checked in headless Chromium
(skipped, saying why, where no browser is installed; .ci/run installs Debian's chromium)."""

import html.parser
import json
import re
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from moebench.report import svg
from moebench.report.leaderboard import load, ranking, terminal_table
from moebench.report.page import scores_section
from tests.test_modes import invoke

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
needs_browser = pytest.mark.skipif(BROWSER is None, reason="no headless browser installed (Debian: apt-get install "
                                                           "chromium; .ci/run does)")


def record(team, member, score, time, passed=True, sha="ab" * 32, **extra) -> dict:
    return {"time": time, "team_id": team, "member_id": member, "prompt_index": 0, "accuracy_checked": True,
            "score": {"accuracy": 1.0 if passed else 0.0, "final_score": score, "latency": 10.0, "throughput": 100.0,
                      "flop_ratio": 0.5, "base_latency": 20.0, "base_throughput": 50.0},
            "base": {"latency": 20.0, "throughput": 50.0,
                     "origin": "reference measured now, alternating with the submission on the same prompts"},
            "provenance": {"module_sha256": sha, "model": "m", "device": "cpu"}, **extra}


SCHEMA_BEFORE_BASE = """CREATE TABLE evaluations (
    source TEXT NOT NULL, line INTEGER NOT NULL, time TEXT, team TEXT NOT NULL, member TEXT NOT NULL,
    prompt_index INTEGER, passed INTEGER NOT NULL, final_score REAL, latency REAL, throughput REAL,
    flop_ratio REAL, module_sha256 TEXT, model TEXT, device TEXT, error TEXT,
    PRIMARY KEY (source, line))"""


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_charts_count_what_they_draw():
    assert 'data-marks="3"' in svg.bars([("a", 1.0), ("b", 2.0), ("c", 0.5)], "t", "x")
    hist = svg.histogram([1.0, 1.1, 1.2, 5.0], "latency", "ms", bins=4)
    assert 'data-marks="2"' in hist and "p50" in hist and "p99" in hist  # two non-empty bins
    assert 'data-marks="2"' in svg.lines({"a": [(0, 1), (1, 2)], "b": [(0, 0), (1, 3)]}, "t", "x", "y", {"tol": 2})
    assert 'data-marks="6"' in svg.lines({"a": [(0, 1), (1, 2)], "b": [(0, 0), (1, 3)]}, "t", "x", "y", points=True)
    assert 'data-marks="0"' in svg.histogram([], "nothing", "ms") and "no data" in svg.lines({}, "t", "x", "y")


def test_leaderboard_ranks_the_best_passing_run_of_each_team_and_member(tmp_path):
    a = write_jsonl(tmp_path / "alpha_m_score_records.jsonl", [
        record("alpha", "ann", 1.5, "2026-11-01T10:00:00"),
        record("alpha", "ann", 3.0, "2026-11-02T10:00:00", sha="cd" * 32),
        record("alpha", "ann", 9.0, "2026-11-03T10:00:00", passed=False),  # failed validation: never ranked
        record("alpha", "bob", 2.0, "2026-11-02T11:00:00"),
        record("alpha", "bob", 8.0, "2026-11-02T12:00:00", accuracy_checked=False)])  # --skip-accuracy: not ranked
    b = write_jsonl(tmp_path / "beta_m_score_records.jsonl", [
        record("beta", "", 2.5, "2026-11-01T09:00:00"),
        record("beta", "", 7.0, "2026-11-04T09:00:00", flagged=["caching"]),  # flagged: never ranked
        record("gamma", "", 4.0, "2026-11-01T09:00:00", error="the submission crashed")])
    (tmp_path / "beta_m_score_records.jsonl").open("a").write('{"torn": ')  # a writer killed mid-line
    db = sqlite3.connect(tmp_path / "lb.sqlite")
    assert load(db, [a, b]) == 8
    assert load(db, [a]) == 5  # loading a file again replaces its rows
    load(db, [b])
    rows = ranking(db)
    assert [(r[1], r[2], r[3], r[10]) for r in rows] == [
        ("alpha", "ann", 3.0, "cd" * 6), ("beta", "", 2.5, "ab" * 6), ("alpha", "bob", 2.0, "ab" * 6)]
    assert [r[0] for r in rows] == [1, 2, 3] and rows[0][11] == 2  # ann's two passing runs
    assert [(r[7], r[8]) for r in rows] == [(20.0, "in turn"), (20.0, "in turn"), (20.0, "in turn")]
    assert terminal_table(rows).splitlines()[2].split()[:3] == ["1", "alpha", "ann"]


def test_a_leaderboard_database_of_an_older_schema_gains_the_base_columns(tmp_path):
    """The base's latency and origin are newer columns: a database written before them is extended, not refused,
    and its older rows show no base."""
    db = sqlite3.connect(tmp_path / "old.sqlite")
    db.execute(SCHEMA_BEFORE_BASE)
    db.execute("INSERT INTO evaluations VALUES ('/x.jsonl', 0, '2026-11-01T10:00:00', 'old', '', 0, 1, 1.25, 10.0, "
               "100.0, 0.5, 'ef', 'm', 'cpu', NULL)")
    db.commit()
    a = write_jsonl(tmp_path / "alpha_m_score_records.jsonl", [
        record("alpha", "ann", 1.5, "2026-11-01T10:00:00", base={"latency": 20.0, "throughput": 50.0,
                                                                 "origin": "prompt_data_cpu.csv, prompt 0"})])
    assert load(db, [a]) == 1
    assert [(r[1], r[7], r[8]) for r in ranking(db)] == [("alpha", 20.0, "prompt_data_cpu.csv"), ("old", None, None)]



@pytest.mark.parametrize("origin, shown", [
    ("given", "given"),
    ("reference measured now, alternating with the submission on the same prompts", "in turn"),
    ("prompt_data_cpu.csv, prompt 2", "prompt_data_cpu.csv"),
    ("latency given; throughput: reference measured now, alternating with the submission on the same prompts",
     "latency given; throughput: in turn"),
    ("throughput given; latency: prompt_data_cpu.csv, prompt 0", "throughput given; latency: prompt_data_cpu.csv"),
])
def test_the_leaderboard_says_where_each_base_came_from(tmp_path, origin, shown):
    """One base given by a flag and the other measured (with_given's origin): both named, so scores group by it."""
    db = sqlite3.connect(tmp_path / "db.sqlite")
    a = write_jsonl(tmp_path / "a_m_score_records.jsonl", [
        record("a", "", 1.0, "2026-11-01T10:00:00", base={"latency": 20.0, "throughput": 50.0, "origin": origin})])
    assert load(db, [a]) == 1
    assert ranking(db)[0][8] == shown

def test_the_report_page_says_which_evaluations_were_not_checked():
    page = scores_section([record("t", "m", 1.0, "2026-11-01T10:00:00"),
                           record("t", "m", 2.0, "2026-11-01T11:00:00", accuracy_checked=False),
                           record("t", "m", 3.0, "2026-11-01T12:00:00", passed=False)])
    rows = re.findall(r'<tr class="([^"]+)"><td class="l">[^<]*</td>(?:<td[^>]*>[^<]*</td>){3}<td[^>]*>([^<]*)<', page)
    assert rows == [("pass", "pass"), ("not-checked", "not checked"), ("fail", "fail")]


def test_the_report_page_says_why_a_kernel_share_was_cut():
    from moebench.report.page import report_section

    flops = {"total_macs": 100, "kernel_macs": 40, "nki_flop_ratio": 0.25, "by_op": {"team.k.default": 40},
             "kernel_ops": ["team.k.default"], "by_graph": [{"submodel": "context_encoding_model", "bucket": 8,
                                                            "runs": 1, "total_macs_per_run": 100,
                                                            "kernel_macs_per_run": 40, "nki_flop_ratio": 0.4}],
             "kernels_calling_library": {"team.a.default": "aten.mm.default"}, "kernels_not_run": ["team.b.default"],
             "kernels_computing_in_torch": {"team.c.default": [2000, 1000]},
             "capped": "its library ops count 75 of the reference's 100 MACs <b>"}
    page = report_section("cut", {"kernel_flops": flops})
    items = re.findall(r"<li>(.*?)</li>", page)
    assert items == ["team.a.default calls aten.mm.default inside: a registered kernel that hands its products to "
                     "the library does not count as a kernel",
                     "team.c.default runs 2,000 elements of torch&#x27;s arithmetic in a call of 1,000 MACs: a "
                     "registered kernel that computes with torch does not count as a kernel",
                     "team.b.default is in the graphs but did not run when the request&#x27;s graphs ran eagerly: "
                     "it does not count as a kernel",
                     "kernel share: its library ops count 75 of the reference&#x27;s 100 MACs &lt;b&gt;"]
    assert "<li>" not in report_section("honest", {"kernel_flops": {**flops, "kernels_calling_library": {},
                                                                   "kernels_computing_in_torch": {},
                                                                   "kernels_not_run": [], "capped": None}})


class _Dom(html.parser.HTMLParser):
    """The plots (their attributes after the page's script ran) and the table rows of a dumped DOM."""

    def __init__(self, text: str):
        super().__init__()
        self.plots, self.rows, self.body, self._row = [], [], {}, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "svg" and "plot" in attrs.get("class", ""):
            self.plots.append(attrs)
        elif tag == "body":
            self.body = attrs
        elif tag == "tr":
            self._row = []
        elif tag == "td" and self._row is not None:
            self._row.append("")

    def handle_data(self, data):
        if self._row:
            self._row[-1] += data

    def handle_endtag(self, tag):
        if tag == "tr" and self._row:
            self.rows.append(self._row)
        if tag == "tr":
            self._row = None


def in_browser(page: Path) -> _Dom:
    """The page's DOM after Chromium loaded and laid it out and its script measured every plot."""
    result = subprocess.run(
        [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={page.parent / '.chromium'}", "--virtual-time-budget=5000", "--dump-dom",
         page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    dom = _Dom(result.stdout)
    assert dom.body.get("data-rendered") == "1", "the page's script did not run"
    return dom


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Two prompts evaluated (with accuracy checks) by evaluate_all, then the two commands."""
    import os

    folder = tmp_path_factory.mktemp("evaluated")
    before = os.getcwd()
    os.chdir(folder)
    try:
        Path("prompts.txt").write_text("Hello world\n\nOnce upon a time\n")
        code, out, err = invoke("--mode", "generate_accuracy_baselines", "--seq-len", "16", "--benchmark-runs", "2",
                                "--warmup-runs", "0")
        assert code == 0, out + err
        code, out, err = invoke("--mode", "evaluate_all", "--team-id", "alpha", "--member-id", "ann",
                                "--benchmark-runs", "3", "--warmup-runs", "0", "--audit-pairs", "0")
        assert code == 0, out + err
        code, out, err = invoke("report")
        assert code == 0, out + err
        assert "report: " in out
        code, out, err = invoke("leaderboard")
        assert code == 0, out + err
        yield folder, out
    finally:
        os.chdir(before)


def test_report_and_leaderboard_after_evaluate_all(evaluated):
    folder, out = evaluated
    text = (folder / "moebench_report.html").read_text()
    assert text.count('class="plot"') == 2 * 6 + 1  # six per prompt, and the scores over time
    assert "<script src" not in text and 'href="http' not in text and "<img" not in text  # self-contained
    assert out.splitlines()[2].split()[:3] == ["1", "alpha", "ann"]
    assert (folder / "leaderboard.sqlite").is_file() and (folder / "leaderboard.html").is_file()


@needs_browser
def test_the_pages_of_evaluate_all_render_with_every_plot_drawn(evaluated):
    folder, _ = evaluated
    dom = in_browser(folder / "moebench_report.html")
    assert len(dom.plots) == 13
    for plot in dom.plots:  # laid out at full size, every mark drawn with a real extent
        assert int(plot["data-rendered-width"]) > 500 and int(plot["data-rendered-height"]) > 50, plot
        assert int(plot["data-marks"]) > 0 and int(plot["data-drawn"]) >= int(plot["data-marks"]) > 0, plot
    board = in_browser(folder / "leaderboard.html")
    assert [(r[0], r[1], r[2]) for r in board.rows] == [("1", "alpha", "ann")]  # evaluate_all's best prompt


@needs_browser
def test_the_leaderboard_page_lists_teams_in_rank_order(tmp_path):
    write_jsonl(tmp_path / "alpha_m_score_records.jsonl", [record("alpha", "ann", 1.5, "2026-11-01T10:00:00"),
                                                           record("alpha", "ann", 3.5, "2026-11-02T10:00:00")])
    write_jsonl(tmp_path / "beta_m_score_records.jsonl", [record("beta", "bo", 2.5, "2026-11-01T09:00:00")])
    code, out, err = invoke("leaderboard", tmp_path, "--db", tmp_path / "lb.sqlite", "--out", tmp_path / "lb.html")
    assert code == 0, out + err
    dom = in_browser(tmp_path / "lb.html")
    assert [(r[0], r[1], r[2], r[3]) for r in dom.rows] == [("1", "alpha", "ann", "3.5"), ("2", "beta", "bo", "2.5")]


def test_the_leaderboards_counts_are_the_databases_it_ranks(tmp_path):
    """A database keeps earlier loads: the summary counts what the ranking ranks, and what this load read."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_jsonl(tmp_path / "a" / "alpha_m_score_records.jsonl", [record("alpha", "ann", 1.5, "2026-11-01T10:00:00"),
                                                                 record("alpha", "ann", 3.5, "2026-11-02T10:00:00")])
    write_jsonl(tmp_path / "b" / "beta_m_score_records.jsonl", [record("beta", "bo", 2.5, "2026-11-01T09:00:00")])
    db, out_html = tmp_path / "lb.sqlite", tmp_path / "lb.html"
    assert invoke("leaderboard", tmp_path / "a", "--db", db, "--out", out_html)[0] == 0
    code, out, err = invoke("leaderboard", tmp_path / "b", "--db", db, "--out", out_html)
    assert code == 0 and "(2 entries from 3 evaluations in 2 record files; 1 read now;" in out, out + err
    assert "from 3 evaluations in 2 record files" in out_html.read_text()


def test_a_malformed_score_record_is_one_line_and_a_null_score_is_left_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = record("alpha", "ann", 1.5, "2026-11-01T10:00:00")
    for field, value, words in (("provenance", "x", "score record 2: its provenance is 'x', not an object"),
                                ("score", {**good["score"], "final_score": "high"},
                                 "score record 2: its score's final_score is 'high', not a number"),
                                ("provenance", {"module_sha256": 5}, "its provenance's module_sha256 is 5")):
        path = write_jsonl(tmp_path / "alpha_m_score_records.jsonl", [good, {**good, field: value}])
        for argv in (["leaderboard", path], ["report", "--records", path]):  # tracebacks before
            code, out, err = invoke(*argv)
            assert code == 2 and err.count("\n") == 1 and words in err, err
    nulls = [{**good, "score": {**good["score"], "final_score": None}, "provenance": {"module_sha256": None}}, good]
    write_jsonl(tmp_path / "alpha_m_score_records.jsonl", nulls)  # (a score that was not finite is written null)
    code, out, err = invoke("report", "--records", tmp_path / "alpha_m_score_records.jsonl", "--out", "r.html")
    assert code == 0, err
    assert "final score over time" in (tmp_path / "r.html").read_text()
    before = (tmp_path / "alpha_m_score_records.jsonl").read_bytes()
    for argv in (["report", "--out", "alpha_m_score_records.jsonl"], ["leaderboard", "--out",  # a page over its input
                 "alpha_m_score_records.jsonl"], ["leaderboard", "--db", "alpha_m_score_records.jsonl"]):
        code, out, err = invoke(*argv)
        assert code == 2 and err.count("\n") == 1 and "it is one of the files read" in err, err
    assert (tmp_path / "alpha_m_score_records.jsonl").read_bytes() == before


def test_bad_input_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = invoke("report")
    assert code == 2 and err.count("\n") == 1 and "no benchmark report or score records" in err
    (tmp_path / "benchmark_report.json").write_text("{not json")
    code, out, err = invoke("report")
    assert code == 2 and "benchmark_report.json: not a JSON benchmark report" in err
    for text, words in (('{"e2e_model": 5}', "its e2e_model section is int, not an object"),
                        ('{"e2e_model": {}, "accuracy": 5}', "its accuracy section is int"),
                        ('{"e2e_model": {"samples_ms": 5}}', "not a benchmark report moebench can draw (TypeError")):
        (tmp_path / "benchmark_report.json").write_text(text)  # a traceback before
        code, out, err = invoke("report")
        assert code == 2 and err.count("\n") == 1 and words in err, err
    code, out, err = invoke("leaderboard", tmp_path / "missing")
    assert code == 2 and "missing: no such file or folder" in err
    code, out, err = invoke("report", "--bogus")
    assert code == 2 and err.count("\n") == 1
    (tmp_path / "benchmark_report.json").unlink()
    (tmp_path / "folder").mkdir()
    for flag in ("--report", "--records"):  # a folder where a file is wanted: a traceback before
        code, out, err = invoke("report", flag, tmp_path / "folder")
        assert code == 2 and err.count("\n") == 1 and "folder: Is a directory" in err, err
    csv = tmp_path / "t_m_score_records.csv"  # the file evaluate prints: read as JSON lines it held no record
    csv.write_text("team_id,member_id\nt,m\n")
    for argv in (["leaderboard", csv], ["report", "--records", csv]):
        code, out, err = invoke(*argv)
        assert code == 2 and err.count("\n") == 1 and "its JSON-lines twin is t_m_score_records.jsonl" in err, err
