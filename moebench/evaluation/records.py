"""Files the evaluation reads and appends: score records, per-prompt baselines (prompt_data) and prompts.txt."""

import csv
import json
import fcntl
import functools
import io
import math
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from moebench.engine.parallel import shared_value, writes_files
from moebench.errors import MoebenchError
from moebench.evaluation.score import Score

# ---------------------------------------------------------------- score records

RECORD_COLUMNS = ["team_id", "member_id", "base_latency", "base_throughput", "accuracy", "latency", "throughput",
                  "nki_flop_ratio", "increased_throughput", "reduced_latency", "final_score", "timestamp"]
TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S"


def _csv_line(cells: list) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(cells)
    return out.getvalue()


def records_path(folder: Path, team_id: str | None, model: str) -> Path:
    """`{team_id}_{model}_score_records.csv`, or `{model}_score_records.csv` without a team."""
    name = f"{team_id}_{model}_score_records.csv" if team_id else f"{model}_score_records.csv"
    return Path(folder) / name


def record_row(team_id: str | None, member_id: str | None, score: Score, when: datetime | None = None) -> dict:
    """One score-record row, keyed by RECORD_COLUMNS in order; accuracy is written as 0 or 1."""
    when = when or datetime.now()
    return {"team_id": team_id or "", "member_id": member_id or "", "base_latency": score.base_latency,
            "base_throughput": score.base_throughput, "accuracy": int(score.accuracy), "latency": score.latency,
            "throughput": score.throughput, "nki_flop_ratio": score.flop_ratio,
            "increased_throughput": score.increased_throughput, "reduced_latency": score.reduced_latency,
            "final_score": score.final_score, "timestamp": when.strftime(TIMESTAMP_FORMAT)}


def _header_of(first_bytes: bytes) -> list[str] | None:
    """The CSV cells of the first line (a BOM, as a spreadsheet saves it, dropped), or None when not UTF-8 text."""
    try:
        line = first_bytes.split(b"\n", 1)[0].decode("utf-8-sig").rstrip("\r")
    except UnicodeDecodeError:
        return None
    return next(csv.reader([line]), [])


def append_record(path: Path, row: dict) -> None:
    """Append one row, writing the header first if the file is empty; safe with many concurrent writers.

    Every writer holds an exclusive flock while it checks the file and writes its whole line with one
    O_APPEND write, so rows never interleave and the header is written once. Existing content is never
    rewritten; a file whose header is not RECORD_COLUMNS is refused. Under tensor parallelism rank 0 writes.
    """
    if not writes_files():
        return
    if set(row) != set(RECORD_COLUMNS):
        raise ValueError(f"a score record has the keys {RECORD_COLUMNS}, got {list(row)}")

    def check(fd, path):
        if _header_of(os.pread(fd, 4096, 0)) != RECORD_COLUMNS:
            raise _not_records(path)

    _locked_append(Path(path), _csv_line([row[c] for c in RECORD_COLUMNS]).encode("utf-8"),
                   _csv_line(RECORD_COLUMNS).encode("utf-8"), check)


def _not_records(path: Path) -> MoebenchError:
    return MoebenchError(f"{path} is not a moebench score-record file (its header is not {','.join(RECORD_COLUMNS)}); "
                         "move or rename it, nothing was appended")


def _found_by_rank_0(check):
    """check(path) run where the files are written (rank 0 under tensor parallelism), its error raised on every
    rank: a rank that went on alone would wait in the long work's collectives for ranks that had stopped."""

    @functools.wraps(check)
    def on_every_rank(path: Path) -> None:
        why = None
        if writes_files():
            try:
                check(path)
            except MoebenchError as e:
                why = str(e)
        if (why := shared_value(why, f"the check of {Path(path).name}")) is not None:
            raise MoebenchError(why)

    return on_every_rank


@_found_by_rank_0
def check_records_file(path: Path) -> None:
    """What would stop append_record and append_json_record, found before an evaluation's long work: a folder
    that is missing or not writable, a file that cannot be written or is no score-record file."""
    for p in (Path(path), Path(path).with_suffix(".jsonl")):
        try:
            if not p.exists():
                if p.is_symlink():  # (to nothing, or a loop)
                    raise MoebenchError(f"cannot append a record to {p}: a link to nothing, or a loop of links")
                if why := _folder_problem(p):
                    raise MoebenchError(f"cannot append a record to {p}: {why}")
                continue
            if not p.is_file() or not os.access(p, os.W_OK):
                raise MoebenchError(f"cannot append a record to {p}: "
                                    f"{'not a file' if not p.is_file() else 'not writable'}")
            if p.suffix == ".csv" and p.stat().st_size:
                with open(p, "rb") as f:
                    if _header_of(f.read(4096)) != RECORD_COLUMNS:
                        raise _not_records(p)
        except OSError as e:  # (a name too long, say)
            raise MoebenchError(f"cannot append a record to {p}: {e.strerror}") from None


IN_TURN = "reference measured now, alternating with the submission on the same prompts"  # a base's origin


@_found_by_rank_0
def check_output_file(path: Path) -> None:
    """What would stop writing `path` whole (a new file in its folder, then renamed over it), found before the long
    work: a folder that is missing or not writable, a folder or other non-file in its place."""
    p = Path(path)
    if (p.exists() or p.is_symlink()) and not p.is_file():
        raise MoebenchError(f"cannot write {p}: {'a folder' if p.is_dir() else 'something other than a file'} is "
                            "in its place")
    if why := _folder_problem(p):
        raise MoebenchError(f"cannot write {p}: {why}")


def _folder_problem(path: Path) -> str | None:
    """Why a new file cannot be made in path's folder, or None."""
    if not path.parent.is_dir():
        return "no such folder"
    return None if os.access(path.parent, os.W_OK | os.X_OK) else "the folder is not writable"


def append_json_record(path: Path, record: dict) -> None:
    """Append one evaluation as one JSON line (the JSON-lines twin of the CSV, with provenance), with the CSV's
    guarantees: one locked O_APPEND write per record, fsync'd; a line torn by a writer killed mid-write stays
    alone on its line (the next record starts on a new one) and readers skip it."""
    if writes_files():
        line = json.dumps(_json_safe(record), default=str, allow_nan=False) + "\n"
        _locked_append(Path(path), line.encode("utf-8"), b"", None)


def _json_safe(value):
    """NaN and the infinities (a failed run's latency) as null: JSON has no such numbers, and the NaN Python
    would write makes other readers refuse the whole line."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def read_json_records(path: Path) -> tuple[list[dict], int]:
    """(the records of a JSON-lines file in order, the number of torn or unreadable lines skipped)."""
    records, torn = [], 0
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            torn += bool(line.strip())
    return records, torn


def _locked_append(path: Path, line: bytes, header: bytes, check) -> None:
    """Append `line` under an exclusive flock, `header` first when the file is empty; check(fd, path) vets a
    non-empty file first. Existing content is never rewritten."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise MoebenchError(f"cannot append a record to {path}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size  # read under the lock: another writer may just have written the header
        if size == 0:
            data = header + line
        else:
            if check is not None:
                check(fd, path)
            # a hand-edited (or torn) file may lack its final newline; add one instead of gluing two lines together
            data = line if os.pread(fd, 1, size - 1) == b"\n" else b"\n" + line
        try:
            written = os.write(fd, data)
            while written < len(data):  # a short write on a regular file is rare (full disk); finish under the lock
                written += os.write(fd, data[written:])
            os.fsync(fd)
        except OSError as e:  # a full disk, say: the file as it was, no torn line left
            try:
                os.ftruncate(fd, size)
                kept = "the file is as it was"
            except OSError:
                kept = f"what follows its first {size} bytes may be a torn line"
            raise MoebenchError(f"cannot append a record to {path}: {e.strerror}; {kept}") from None
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def read_records(path: Path) -> list[dict]:
    """All rows of a score-record file as dicts of strings (column -> cell), in file order."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != RECORD_COLUMNS:
                raise MoebenchError(f"{path} is not a moebench score-record file (its header is not "
                                    f"{','.join(RECORD_COLUMNS)})")
            return [dict(r) for r in reader]
    except FileNotFoundError:
        raise MoebenchError(f"score-record file {path} not found") from None
    except UnicodeDecodeError:
        raise MoebenchError(f"{path} is not UTF-8 text") from None


# ---------------------------------------------------------------- per-prompt baselines

PROMPT_DATA_HEADER = ["Prompt ID", "Context Length", "Sequence Length", "Base latency", "Base throughput"]


@dataclass(frozen=True)
class PromptData:
    """One prompt's baseline: lengths in tokens, latency in ms (e2e p99), throughput in tokens/s."""

    prompt_id: int
    context_length: int
    seq_len: int
    base_latency: float
    base_throughput: float


def prompt_data_path(folder: Path, platform: str) -> Path | None:
    """`prompt_data_<platform>.csv` in folder, else the guide's `prompt_data_<platform>.txt`, else None."""
    for suffix in (".csv", ".txt"):
        path = Path(folder) / f"prompt_data_{platform}{suffix}"
        if path.is_file():
            return path
    return None


def _decode(path: Path, data: bytes) -> str:
    """UTF-8 text (a leading BOM dropped), or one-line MoebenchError naming the line of the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        raise MoebenchError(f"{path}:{lineno}: not UTF-8 text; save the file as UTF-8") from None


def _lines(text: str) -> list[str]:
    """Lines split only at LF, CRLF or CR (not at form feeds etc.), so line numbers match what an editor shows."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _parse_prompt_data(path: Path, text: str) -> list[PromptData]:
    lines = [(i, line) for i, line in enumerate(_lines(text), start=1) if line.strip()]
    if not lines:
        raise MoebenchError(f"{path}:1: empty file; expected the header {','.join(PROMPT_DATA_HEADER)}")
    (lineno, first), rows, seen = lines[0], [], {}
    if [c.strip() for c in next(csv.reader([first]))] != PROMPT_DATA_HEADER:
        raise MoebenchError(f"{path}:{lineno}: wrong header {first.strip()!r}; expected "
                            f"{','.join(PROMPT_DATA_HEADER)}")
    for lineno, line in lines[1:]:
        cells = [c.strip() for c in next(csv.reader([line]))]
        if len(cells) != len(PROMPT_DATA_HEADER):
            raise MoebenchError(f"{path}:{lineno}: {len(cells)} columns, expected {len(PROMPT_DATA_HEADER)} "
                                f"({','.join(PROMPT_DATA_HEADER)})")
        try:
            ints = [int(c) for c in cells[:3]]
            floats = [float(c) for c in cells[3:]]
        except ValueError:
            raise MoebenchError(f"{path}:{lineno}: expected three integers and two numbers, got {line.strip()!r}") \
                from None
        if ints[0] < 0 or min(ints[1:]) <= 0 or not all(math.isfinite(v) and v > 0 for v in floats):
            raise MoebenchError(f"{path}:{lineno}: prompt id must be >= 0 and lengths, latency and throughput "
                                f"positive, got {line.strip()!r}")
        if ints[0] in seen:
            raise MoebenchError(f"{path}:{lineno}: prompt id {ints[0]} already given on line {seen[ints[0]]}")
        seen[ints[0]] = lineno
        rows.append(PromptData(*ints, *floats))
    return rows


def read_prompt_data(path: Path) -> list[PromptData]:
    """The rows of a prompt_data file in file order; any defect is a one-line MoebenchError naming file and line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MoebenchError(f"cannot read {path}: {e.strerror}") from None
    return _parse_prompt_data(path, _decode(path, data))


def write_prompt_data(path: Path, rows: list[PromptData]) -> None:
    """Write a prompt_data file atomically (temp file in the same folder, then os.replace)."""
    if not writes_files():
        return
    path = Path(path)
    text = _csv_line(PROMPT_DATA_HEADER) + "".join(
        _csv_line([r.prompt_id, r.context_length, r.seq_len, repr(float(r.base_latency)),
                   repr(float(r.base_throughput))]) for r in rows)
    try:
        _parse_prompt_data(path, text)  # never write a file that read_prompt_data would refuse
    except MoebenchError as e:
        raise ValueError(f"refusing to write invalid prompt data: {e}") from None
    write_whole(path, text)


def write_whole(path: Path, text: str | bytes | memoryview) -> None:
    """`path` replaced by `text` (or bytes) at once (a temporary file in the same folder, fsync'd, then renamed over
    it): a reader never sees half of it. A failure is one line naming the file."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8") if isinstance(text, str) else text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise MoebenchError(f"cannot write {path}: {e.strerror or e}") from None
        raise


# ---------------------------------------------------------------- prompts.txt


def read_prompts(path: Path) -> list[str]:
    """Prompts separated by one or more blank (empty or whitespace-only) lines; each stripped, inner newlines kept."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise MoebenchError(f"{path}: a {'folder' if path.is_dir() else 'non-file'} is in its place; evaluate_all and "
                            "generate_accuracy_baselines read prompts from it")
    if not path.is_file():
        raise MoebenchError(f"{path.name} not found in {path.absolute().parent}: "
                            "evaluate_all and generate_accuracy_baselines need it")
    text = _decode(path, path.read_bytes())
    prompts, block = [], []
    for line in _lines(text) + [""]:
        if line.strip():
            block.append(line)
        elif block:
            prompts.append("\n".join(block).strip())
            block = []
    if not prompts:
        raise MoebenchError(f"{path} holds no prompt; write prompts separated by blank lines")
    return prompts
