"""Progress of long work: a bar on a terminal, plain lines with the time left in logs, silence for short work."""

import contextlib
import io
import sys
import time
from types import SimpleNamespace

import pytest

from moebench.errors import SubmissionFault
from moebench.progress import Progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_plain_lines_with_the_time_left_and_the_total():
    out, clock = io.StringIO(), Clock()
    bar = Progress(20, "benchmark submission", "run", every=10, file=out, clock=clock)
    for _ in range(20):
        clock.now += 2.0
        bar.update()
    bar.close()
    lines = [line.removeprefix("[progress] ") for line in out.getvalue().splitlines()]
    assert lines[0] == "benchmark submission: 5/20 runs (25%), 10 s, about 30 s left"
    assert lines[1] == "benchmark submission: 10/20 runs (50%), 20 s, about 20 s left"
    assert lines[-1] == "benchmark submission: 20/20 runs (100%) in 40.0 s"
    assert len(lines) == 4  # one line per 10 s while unfinished, and the end


def test_short_work_prints_nothing_in_a_log_and_unknown_totals_count():
    out, clock = io.StringIO(), Clock()
    with Progress(3, "compile", "step", every=10, file=out, clock=clock) as bar:
        bar.update(3)
    assert out.getvalue() == ""
    with Progress(None, "validation", "generate call", every=10, file=out, clock=clock) as bar:
        clock.now += 11
        bar.update()
    assert out.getvalue().splitlines() == ["[progress] validation: 1 generate calls, 11 s",
                                           "[progress] validation: 1 generate calls in 11.0 s"]
    out.truncate(0)
    with Progress(3, "compile", "step", every=10, file=out, clock=clock) as bar:
        bar.update(2)
        clock.now += 30
        bar.update()  # one long last step: no line, nothing said before
    assert out.getvalue().strip("\0") == ""


def test_a_terminal_gets_a_bar_with_the_time_left():
    out = Terminal()
    with Progress(4, "generate", "token", file=out) as bar:
        for _ in range(4):
            bar.update()
    text = out.getvalue()
    assert "generate:" in text and "/4 [00:00<" in text and "token/s" in text  # tqdm: count, elapsed<left, rate


def test_the_compile_step_counts_the_graphs_a_folder_already_holds(tmp_path):
    """evaluate_all's later prompts find the decode graph already exported: it counts as a done step, so the
    compile's last progress line reaches its total."""
    from types import SimpleNamespace

    from moebench.engine.artifacts import Artifacts

    art = Artifacts(tmp_path / "traced_model", None, reuse=False)
    art.graphs = {("context_encoding_model", 1, 64, 16): "a.pt2", ("token_generation_model", 1, 64, 64): "b.pt2"}
    steps = []
    art.compile_graphs(SimpleNamespace(batch=1, max_len=64),
                       [("context_encoding_model", 16), ("token_generation_model", 64)], lambda: steps.append(1))
    assert len(steps) == 2


def test_a_submission_process_sends_its_progress_lines_as_they_are_printed_and_the_harness_shows_them(capsys):
    """The submission's process loads and compiles with its output kept for its reply, but for the progress lines:
    each goes to the harness at once, which prints it while it waits (a minute's cold compile is not silent)."""
    from multiprocessing import Pipe

    from moebench.modes import sandbox

    harness, child = Pipe()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), sandbox._progress_sent(child):
        bar = Progress(3, "compile", unit="step", every=0, clock=Clock())
        print("a warning", file=sys.stderr)
        bar.update()
        line = "[progress] compile: 1/3 steps (33%), 0 s, about 0 s left\n"
        assert harness.poll(0) and (sent := sandbox._receive(harness)) == ("progress", line)
        print("unfinished", end="", file=sys.stderr)
    assert err.getvalue() == "a warning\nunfinished" and not harness.poll(0)  # the rest comes with the reply
    for message in (sent, ("ok", 7, "out\n", err.getvalue())):
        sandbox._send(child, message)
    box = sandbox.Sandbox.__new__(sandbox.Sandbox)  # the harness's end, without a process behind it
    box.conn, box.time_limit, box.process = harness, 5, SimpleNamespace(is_alive=lambda: False)
    assert box._answer("load and compile", time.monotonic() + 5) == 7
    out, printed = capsys.readouterr()
    assert out == "out\n" and printed == line + "a warning\nunfinished"
    # only before the start's replies, and never past the time limit: a child that floods the pipe is stopped
    for message in [sent] * 3:
        sandbox._send(child, message)
    with pytest.raises(SubmissionFault, match="did not finish load and compile within the time limit"):
        box._answer("load and compile", time.monotonic() - 1)
    assert capsys.readouterr().err == ""  # none of its lines printed past the deadline
    box.conn, child = Pipe()  # (stopped, it closed its end)
    sandbox._send(child, sent)
    with pytest.raises(SubmissionFault, match="malformed reply during benchmark"):
        box._answer("benchmark")


def test_a_ctrl_c_that_a_garbage_collectors_callback_dropped_is_raised_at_the_next_update(capsys):
    """Python runs the SIGINT handler wherever the main thread is; raised in a weakref's callback, its
    KeyboardInterrupt is printed as "Exception ignored" and dropped (the mode went on to its end). While a mode runs
    (interrupts.handled) it is remembered and raised at the next progress update, and not printed."""
    import gc
    import os
    import signal
    import weakref

    from moebench import interrupts

    class Thing:
        pass

    def callback(ref):
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs here, inside the callback
        for _ in range(1000):
            pass

    with interrupts.handled():
        thing = Thing()
        ref = weakref.ref(thing, callback)
        del thing
        gc.collect()
        assert ref() is None
        with pytest.raises(KeyboardInterrupt):
            Progress(3, "work", file=io.StringIO()).update()
    assert "Exception ignored" not in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's own again


def test_an_ignored_ctrl_c_stays_ignored():
    """A job a script started in the background ignores SIGINT: a mode run there keeps ignoring it."""
    import signal

    from moebench import interrupts

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts.handled():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
