"""`moebench report` and `moebench leaderboard` (also `python main.py report|leaderboard`)."""

import argparse
import re
import sqlite3
import sys
from pathlib import Path

from moebench.errors import MoebenchError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as the main command line's usage errors
        print(f"moebench {self.prog.split()[-1]}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _reports(folder: Path) -> list[Path]:
    """benchmark_report.json, then evaluate_all's benchmark_report_{i}.json in prompt order."""
    numbered = sorted(folder.glob("benchmark_report_*.json"),
                      key=lambda p: int(m.group(1)) if (m := re.search(r"_(\d+)\.json$", p.name)) else 1 << 30)
    single = folder / "benchmark_report.json"
    return ([single] if single.is_file() else []) + numbered


def _not_an_input(flag: str, out: Path, inputs: list[Path]) -> None:
    """A file written (--out's page, --db) may not be one the page is made from (a records file would be replaced)."""
    if out.exists() and any(out.resolve() == Path(p).resolve() for p in inputs):
        raise MoebenchError(f"{flag} {out}: it is one of the files read; writing it would replace it")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        raise MoebenchError(f"{path}: cannot write ({e.strerror})") from None


def report_main(argv: list[str]) -> int:
    from moebench.report.page import build_report

    p = _Parser(prog="moebench report", description="An HTML page with plots of benchmark reports and score records.")
    p.add_argument("--report", action="append", type=Path, help="a benchmark_report*.json (repeatable; default: "
                   "those in the working directory)")
    p.add_argument("--records", action="append", type=Path, help="a *_score_records.jsonl (repeatable; default: "
                   "those in the working directory)")
    p.add_argument("--out", type=Path, default=Path("moebench_report.html"), help="the page (default: %(default)s)")
    args = p.parse_args(argv)
    reports = args.report if args.report is not None else _reports(Path.cwd())
    records = args.records if args.records is not None else sorted(Path.cwd().glob("*_score_records.jsonl"))
    if not reports and not records:
        raise MoebenchError(f"no benchmark report or score records in {Path.cwd()}; run an evaluate mode first, or "
                            "name them with --report / --records")
    _not_an_input("--out", args.out, [*reports, *records])
    _write(args.out, build_report(reports, records))
    print(f"report: {args.out.resolve()} ({len(reports)} benchmark reports, {len(records)} record files)")
    return 0


def leaderboard_main(argv: list[str]) -> int:
    from moebench.report.leaderboard import leaderboard_page, load, ranking, terminal_table

    p = _Parser(prog="moebench leaderboard", description="Ranks every team's best passing evaluation.")
    p.add_argument("paths", nargs="*", type=Path, help="score-record files (*_score_records.jsonl) or folders "
                   "searched for them (default: the working directory)")
    p.add_argument("--db", type=Path, default=Path("leaderboard.sqlite"), help="SQLite database (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("leaderboard.html"), help="the page (default: %(default)s)")
    args = p.parse_args(argv)
    files = []
    for path in args.paths or [Path.cwd()]:
        if path.is_dir():
            files += sorted(path.rglob("*_score_records.jsonl"))
        elif path.is_file():
            files.append(path)
        else:
            raise MoebenchError(f"{path}: no such file or folder")
    if not files:
        raise MoebenchError(f"no *_score_records.jsonl under {', '.join(map(str, args.paths or [Path.cwd()]))}")
    _not_an_input("--out", args.out, [*files, args.db])
    _not_an_input("--db", args.db, files)
    try:
        db = sqlite3.connect(args.db)
    except sqlite3.Error as e:
        raise MoebenchError(f"--db {args.db}: {e}") from None
    try:
        n = load(db, files)
        rows = ranking(db)  # over the whole database: files loaded before count too
        total, sources = db.execute("SELECT COUNT(*), COUNT(DISTINCT source) FROM evaluations").fetchone()
    except sqlite3.DatabaseError as e:
        raise MoebenchError(f"--db {args.db}: {e}") from None
    finally:
        db.close()
    print(terminal_table(rows))
    _write(args.out, leaderboard_page(rows, total, sources))
    print(f"leaderboard: {args.out.resolve()} ({len(rows)} {'entry' if len(rows) == 1 else 'entries'} from {total} "
          f"evaluations in {sources} record files; {n} read now; database {args.db})")
    return 0
