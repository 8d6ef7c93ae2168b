"""The command line: parse, run the mode, turn user errors into one line and an exit code."""

import sys

from torch import distributed as dist

from moebench import interrupts
from moebench.cli.args import parse_args
from moebench.errors import MoebenchError


def run_mode(run) -> int:
    from moebench.modes.evaluate import run_evaluate_all, run_evaluate_single
    from moebench.modes.generate import run_generate
    from moebench.modes.validate import run_generate_accuracy_baselines, run_validate

    modes = {"generate": run_generate, "validate": run_validate, "evaluate_single": run_evaluate_single,
             "evaluate_all": run_evaluate_all, "generate_accuracy_baselines": run_generate_accuracy_baselines}
    return modes[run.mode](run)


def one_line(message: str) -> str:
    """A message on one line: its lines (a contestant's exception may have several) joined by "; "."""
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    with interrupts.handled():
        return _main(argv)


def _main(argv: list[str]) -> int:
    try:
        if argv and argv[0] in ("report", "leaderboard"):
            from moebench.report.cli import leaderboard_main, report_main

            try:
                return (report_main if argv[0] == "report" else leaderboard_main)(argv[1:])
            except SystemExit as e:
                return e.code if isinstance(e.code, int) else 2
        try:
            run, notes = parse_args(argv)
        except SystemExit as e:  # --help (0) or a usage error, already printed on one line (2)
            return e.code if isinstance(e.code, int) else 2
        if run.tp_degree > 1 and not dist.is_initialized():
            from moebench.modes.parallel import run_tensor_parallel

            return run_tensor_parallel(run, argv)  # the ranks run main() again, notes included
        for note in notes:
            print(note, file=sys.stderr)
        code = run_mode(run)
        interrupts.check()  # a Ctrl-C dropped after the last progress update
        return code
    except MoebenchError as e:
        print(f"moebench: error: {one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("moebench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
