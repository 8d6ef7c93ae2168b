"""Ctrl-C while a mode runs: KeyboardInterrupt, as Python raises it, and remembered. Python runs the signal handler
wherever the main thread is, and one raised inside a callback of the garbage collector's (a weakref's, a __del__)
is printed as "Exception ignored" and dropped: the mode went on to its end (1 Ctrl-C in 5 while the harness computed
the reference's expected logits, on the Xeon VM). Remembered, it is raised again at the next progress update
(`check`), and the dropped one is not printed."""

import contextlib
import signal
import sys
import threading

_pending = False


def _on_sigint(signum, frame):
    global _pending
    _pending = True
    raise KeyboardInterrupt


def check() -> None:
    """Raises the KeyboardInterrupt of a Ctrl-C that a garbage collector's callback dropped."""
    if _pending:
        raise KeyboardInterrupt


@contextlib.contextmanager
def handled():
    """Ctrl-C handled so while the block runs, where Python's own handling is in place (the main thread; not where
    SIGINT is ignored, as for a job a script started in the background)."""
    global _pending
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    _pending = False
    previous, hook = signal.signal(signal.SIGINT, _on_sigint), sys.unraisablehook

    def unraisable(u):
        if not (_pending and isinstance(u.exc_value, KeyboardInterrupt)):  # (remembered: check() raises it again)
            hook(u)

    sys.unraisablehook = unraisable
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = hook
        _pending = False
