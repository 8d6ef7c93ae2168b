"""`moebench report`: one self-contained HTML page (inline SVG charts, no scripts fetched) from benchmark reports
and the JSON-lines score records: latency distributions per submodel, decode latency along the sequence, the
FLOP share per operator, the accuracy error per token position against its tolerance, and scores over time."""

import json
from datetime import datetime
from html import escape
from pathlib import Path

from moebench.errors import MoebenchError
from moebench.evaluation.flops import uncredited_kernels
from moebench.evaluation.records import read_json_records
from moebench.report import svg

SUBMODELS = (("e2e_model", "end to end, per request"), ("context_encoding_model", "context encoding, per request"),
             ("token_generation_model", "token generation, per decode step"))
STYLE = """body{font-family:sans-serif;margin:24px;max-width:1340px;color:#222}h1{margin-bottom:4px}
section{margin:18px 0;border-top:1px solid #ccc}.plots{display:flex;flex-wrap:wrap;gap:12px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}.pass{color:#109618}.fail{color:#dc3912}
.not-checked,.muted{color:#777}"""


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MoebenchError(f"{path}: not found") from None
    except OSError as e:  # a folder, no permission
        raise MoebenchError(f"cannot read {path}: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MoebenchError(f"{path}: not a JSON benchmark report ({e})") from None
    if not isinstance(data, dict) or "e2e_model" not in data:
        raise MoebenchError(f"{path}: not a benchmark report (no e2e_model section)")
    for key in ("config", "reference", "kernel_flops", "accuracy", *(k for k, _ in SUBMODELS)):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise MoebenchError(f"{path}: not a benchmark report (its {key} section is {type(data[key]).__name__}, "
                                "not an object)")
    return data


NUMBERS = ("final_score", "latency", "throughput", "flop_ratio", "base_latency", "base_throughput")  # or null
TEXTS = {"provenance": ("module_sha256", "model", "device"), "base": ("origin",)}  # each a string or null


def _not_a_record(r: dict) -> str | None:
    """What makes a JSON line with a score object no score record moebench wrote, or None."""
    for key in NUMBERS:
        v = r["score"].get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            return f"its score's {key} is {v!r}, not a number"
    for key in ("team_id", "member_id", "time", "error"):
        if r.get(key) is not None and not isinstance(r[key], str):
            return f"its {key} is {r[key]!r}, not a string"
    for section, keys in TEXTS.items():
        part = r.get(section)
        if part is None:
            continue
        if not isinstance(part, dict):
            return f"its {section} is {part!r}, not an object"
        for key in keys:
            if part.get(key) is not None and not isinstance(part[key], str):
                return f"its {section}'s {key} is {part[key]!r}, not a string"
    return None


def read_records(path: Path) -> list[dict]:
    """The JSON-lines score records (read_json_records: a line torn by a writer killed mid-write is skipped). A
    file with lines but no score record (the records CSV, say) is refused: read as records it would show nothing."""
    path = Path(path)
    try:
        lines, torn = read_json_records(path)
    except FileNotFoundError:
        raise MoebenchError(f"{path}: not found") from None
    except OSError as e:
        raise MoebenchError(f"cannot read {path}: {e.strerror}") from None
    records = [r for r in lines if isinstance(r, dict) and isinstance(r.get("score"), dict)]
    for i, r in enumerate(records):
        if why := _not_a_record(r):
            raise MoebenchError(f"{path}: score record {i + 1}: {why} (moebench writes no such record; move the file "
                                "or mend that line)")
    if not records and (lines or torn):
        twin = f"; its JSON-lines twin is {path.with_suffix('.jsonl').name}" if path.suffix == ".csv" else ""
        raise MoebenchError(f"{path}: no JSON score record in it (moebench reads the *_score_records.jsonl "
                            f"files{twin})")
    return records


# Once laid out, each chart notes its rendered size and how many of its marks have a real extent (read by the
# browser tests; harmless elsewhere).
MEASURE = """addEventListener("load", () => {
  for (const s of document.querySelectorAll("svg.plot")) {
    const r = s.getBoundingClientRect();
    let drawn = 0;
    for (const e of s.querySelectorAll("rect, polyline, circle")) {
      const b = e.getBBox();
      if (b.width > 0 || b.height > 0) drawn++;
    }
    Object.assign(s.dataset, {renderedWidth: Math.round(r.width), renderedHeight: Math.round(r.height), drawn});
  }
  document.body.dataset.rendered = "1";
});"""


def page(title: str, body: list[str]) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<style>{STYLE}</style><script>{MEASURE}</script></head><body><h1>{escape(title)}</h1>\n'
            + "\n".join(body) + "\n</body></html>\n")


def table(header: list[str], rows: list[list], left: int = 1, row_class=None) -> str:
    head = "".join(f'<th class="{"l" if i < left else ""}">{escape(h)}</th>' for i, h in enumerate(header))
    body = []
    for r, row in enumerate(rows):
        cells = "".join(f'<td class="{"l" if i < left else ""}">{escape(_cell(v))}</td>' for i, v in enumerate(row))
        cls = f' class="{row_class(r)}"' if row_class else ""
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def report_section(name: str, report: dict) -> str:
    parts = [f"<section><h2>{escape(name)}</h2>"]
    cfg = report.get("config", {})
    if cfg:
        parts.append(f'<p class="muted">{cfg.get("runs")} timed runs, batch {cfg.get("batch")}, '
                     f'{cfg.get("prompt_tokens")} prompt tokens + {cfg.get("new_tokens")} new tokens</p>')
    def row(label: str, s: dict) -> list:
        return [label, *(s.get(f"latency_ms_p{q}") for q in (50, 90, 99, 100)), s.get("throughput")]

    rows = [row(key, report.get(key) or {}) for key, _ in SUBMODELS]  # (None: the submodel never ran)
    base = (report.get("reference") or {}).get("e2e_model")
    if base:  # the base, timed in turn with the submission on the same prompts
        rows.append(row("reference e2e_model (the base, timed in turn)", base))
    parts.append(table(["submodel", "p50 ms", "p90 ms", "p99 ms", "max ms", "throughput"], rows))
    plots = [svg.histogram((report.get(key) or {}).get("samples_ms", []), f"{key}: latency ({label})", "ms")
             for key, label in SUBMODELS]
    by_step = (report.get("token_generation_model") or {}).get("decode_ms_by_step_p50", [])
    prompt = cfg.get("prompt_tokens", 0)
    plots.append(svg.lines({"median over runs": [(prompt + 1 + i, v) for i, v in enumerate(by_step)]},
                           "decode latency along the sequence", "position of the token generated", "ms"))
    plots.append(flop_plot(report.get("kernel_flops")))
    plots.append(accuracy_plot(report.get("accuracy")))
    parts.append(f'<div class="plots">{"".join(plots)}</div>')
    flops = report.get("kernel_flops") or {}
    if flops.get("by_graph"):
        parts.append(table(["graph", "bucket", "runs", "MACs per run", "kernel MACs per run", "kernel share"],
                           [[g["submodel"], g["bucket"], g["runs"], g["total_macs_per_run"], g["kernel_macs_per_run"],
                             g["nki_flop_ratio"]] for g in flops["by_graph"]]))
    if notes := kernel_share_notes(flops):
        parts.append("<ul>" + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ul>")
    return "".join(parts) + "</section>"


def kernel_share_notes(flops: dict) -> list[str]:
    """Why the kernel share is less than the graphs' kernel ops would make it: the harness's checks."""
    return uncredited_kernels(flops) + [f"kernel share: {flops[k]}" for k in ("not_credited", "capped")
                                        if flops.get(k)]


def flop_plot(flops: dict | None) -> str:
    """Share of the request's multiply-accumulates per operator; custom-kernel operators in the second color."""
    title = "multiply-accumulates per operator (kernels highlighted)"
    if not flops or not flops.get("total_macs"):
        return svg.empty(title)
    total = flops["total_macs"]
    items = sorted(((op, 100 * macs / total) for op, macs in flops.get("by_op", {}).items()), key=lambda x: -x[1])
    ratio = flops.get("nki_flop_ratio", 0.0)
    return svg.bars(items, f"MACs per operator, % (kernel share {100 * ratio:.1f}%)", "% of the request's MACs",
                    set(flops.get("kernel_ops", [])))


def accuracy_plot(acc: dict | None) -> str:
    """Each top-k set's worst normalised logit error per generated token, with its tolerance."""
    title = "logit error per token position"
    if not acc or not acc.get("errors_by_step"):
        return svg.empty(title + " (accuracy not checked)")
    series = {f"top-{k}": [(i, e) for i, e in enumerate(v) if e is not None] for k, v in acc["errors_by_step"].items()}
    limits = {f"rtol top-{k}": rtol for k, rtol in acc.get("rtol", {}).items()}
    limits = {", ".join(n for n, v in limits.items() if v == rtol): rtol for rtol in sorted(set(limits.values()))}
    verdict = "PASS" if acc.get("passed") else "FAIL"
    return svg.lines(series, f"{title} ({verdict})", "generated token (0 = first)", "error", limits, points=True)


def scores_section(records: list[dict]) -> str:
    """Each team's (and member's) final scores over time, and the table of evaluations."""
    if not records:
        return '<section><h2>Scores over time</h2><p class="muted">no records</p></section>'
    times = [_time(r) for r in records]
    first = min(times)
    series: dict[str, list] = {}
    for r, t in zip(records, times):
        who = r.get("team_id") or "(no team)"
        if r.get("member_id"):
            who += f" / {r['member_id']}"
        score = r["score"].get("final_score")
        if score is not None:  # (null: a score that was not finite)
            series.setdefault(who, []).append(((t - first).total_seconds() / 86400, score))
    plot = svg.lines(series, "final score over time", f"days since {first:%Y-%m-%d %H:%M}", "final score", points=True)
    rows = [[r.get("time"), r.get("team_id"), r.get("member_id"), r.get("prompt_index"),
             verdict(r),
             r["score"].get("latency"), r["score"].get("throughput"), r["score"].get("flop_ratio"),
             r["score"].get("final_score"), ((r.get("provenance") or {}).get("module_sha256") or "")[:12]]
            for r in records]
    return (f'<section><h2>Scores over time</h2><div class="plots">{plot}</div>'
            + table(["time", "team", "member", "prompt", "verdict", "latency ms", "throughput", "FLOP ratio",
                     "final score", "module"], rows, left=3,
                    row_class=lambda i: rows[i][4].replace(" ", "-")) + "</section>")


def verdict(record: dict) -> str:
    """pass, fail, or not checked (--skip-accuracy: its score counts accuracy as 1, so it is never a pass)."""
    if record.get("error") or record.get("flagged") or not record["score"].get("accuracy"):
        return "fail"
    return "pass" if record.get("accuracy_checked") is True else "not checked"


def _time(record: dict) -> datetime:
    try:
        return datetime.fromisoformat(record.get("time", ""))
    except (TypeError, ValueError):
        return datetime.fromtimestamp(0)


def build_report(reports: list[Path], records: list[Path]) -> str:
    body = []
    for path in reports:
        report = read_json(path)
        try:
            body.append(report_section(path.name, report))
        except (AttributeError, TypeError, KeyError, ValueError, IndexError) as e:  # a section's content is amiss
            raise MoebenchError(f"{path}: not a benchmark report moebench can draw ({type(e).__name__}: {e})") from None
    body.append(scores_section([r for path in records for r in read_records(path)]))
    return page("moebench report", body)
