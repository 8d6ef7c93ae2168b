"""`moebench leaderboard`: every team's JSON-lines score records into an SQLite database, then the best passing
evaluation per team and member, ranked by final score: a table in the terminal and an HTML page."""

import sqlite3
from pathlib import Path

from moebench.evaluation.records import IN_TURN
from moebench.report.page import page, read_records, table, verdict

SCHEMA = """CREATE TABLE IF NOT EXISTS evaluations (
    source TEXT NOT NULL, line INTEGER NOT NULL, time TEXT, team TEXT NOT NULL, member TEXT NOT NULL,
    prompt_index INTEGER, passed INTEGER NOT NULL, final_score REAL, latency REAL, throughput REAL,
    flop_ratio REAL, module_sha256 TEXT, model TEXT, device TEXT, error TEXT,
    PRIMARY KEY (source, line))"""
ADDED = {"base_latency": "REAL", "base_from": "TEXT"}  # columns newer than the first databases: added to those
COLUMNS = ["rank", "team", "member", "final score", "latency ms", "throughput", "FLOP ratio", "base ms", "base from",
           "date", "module", "evaluations"]


def base_from(origin: str | None) -> str | None:
    """A record's base origin, short: given, in turn (timed alternating with the submission), reference measured
    now (before it), or the prompt-data file; one number given, the other's ("latency given; throughput: in turn")."""
    if origin is None:
        return None
    given, sep, other = origin.partition("; ")
    if sep and given in ("latency given", "throughput given"):  # (with_given's form)
        name, _, rest = other.partition(": ")
        return f"{given}; {name}: {base_from(rest)}"
    return "in turn" if origin == IN_TURN else origin.split(",")[0]


def load(db: sqlite3.Connection, paths: list[Path]) -> int:
    """Adds the records of each file (again loading a file replaces its rows); returns how many were read."""
    db.execute(SCHEMA)
    have = {row[1] for row in db.execute("PRAGMA table_info(evaluations)")}
    for name, kind in ADDED.items():
        if name not in have:
            db.execute(f"ALTER TABLE evaluations ADD COLUMN {name} {kind}")
    n = 0
    for path in paths:
        source = str(Path(path).resolve())
        db.execute("DELETE FROM evaluations WHERE source = ?", (source,))
        for i, r in enumerate(read_records(path)):
            score, prov = r["score"], r.get("provenance") or {}
            passed = verdict(r) == "pass"
            row = {"source": source, "line": i, "time": r.get("time"), "team": r.get("team_id") or "",
                   "member": r.get("member_id") or "", "prompt_index": r.get("prompt_index"), "passed": int(passed),
                   "final_score": score.get("final_score"), "latency": score.get("latency"),
                   "throughput": score.get("throughput"), "flop_ratio": score.get("flop_ratio"),
                   "module_sha256": prov.get("module_sha256"), "model": prov.get("model"),
                   "device": prov.get("device"), "error": r.get("error"), "base_latency": score.get("base_latency"),
                   "base_from": base_from((r.get("base") or {}).get("origin"))}
            db.execute(f"INSERT INTO evaluations ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                       tuple(row.values()))
            n += 1
    db.commit()
    return n


def ranking(db: sqlite3.Connection) -> list[list]:
    """The best passing evaluation of each (team, member), best first; ties go to the earlier run."""
    rows = db.execute("""
        WITH best AS (
            SELECT *, ROW_NUMBER() OVER (PARTITION BY team, member ORDER BY final_score DESC, time ASC) AS k,
                   COUNT(*) OVER (PARTITION BY team, member) AS runs
            FROM evaluations WHERE passed = 1 AND final_score IS NOT NULL)
        SELECT team, member, final_score, latency, throughput, flop_ratio, base_latency, base_from, time,
               module_sha256, runs
        FROM best WHERE k = 1 ORDER BY final_score DESC, time ASC""").fetchall()
    return [[i + 1, team or "(no team)", member, score, latency, throughput, ratio, base, origin,
             (time or "")[:19].replace("T", " "), (sha or "")[:12], runs]
            for i, (team, member, score, latency, throughput, ratio, base, origin, time, sha, runs) in enumerate(rows)]


def terminal_table(rows: list[list]) -> str:
    cells = [COLUMNS] + [[_text(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i in (1, 2, 8, 9, 10) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _text(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else "" if v is None else str(v)


def leaderboard_page(rows: list[list], evaluations: int, sources: int) -> str:
    note = (f'<p class="muted">best passing evaluation per team and member (accuracy checked and passed, not '
            f'flagged, not failed), from {evaluations} evaluations in {sources} record files. A score is against '
            'its base: scores compare where their bases do (given with --base-latency / --base-throughput, the '
            'prompt data, or the reference timed on the same machine, in turn with the submission or before it)</p>')
    return page("moebench leaderboard", [note, '<div id="leaderboard">' + table(COLUMNS, rows, left=0) + "</div>"])
