"""Progress of long work (loading, compiling, generation, validation, benchmark runs), on stderr.

On a terminal: a tqdm bar with the rate and the time left. Elsewhere (CI logs, a file): plain lines, so a log
reads top to bottom: nothing for work that ends within `every` seconds, then at most one line per `every`
seconds with the count and the time left, and a last line with the total time; each starts with PREFIX."""

import sys
import time

from tqdm import tqdm

from moebench import interrupts

PREFIX = "[progress] "  # every plain line starts so: easy to find in a log, or to leave out


class Progress:
    def __init__(self, total: int | None, desc: str, unit: str = "run", every: float = 10.0, file=None,
                 clock=time.monotonic):
        self.total, self.desc, self.unit, self.every, self.clock = total, desc, unit, every, clock
        self.file = file or sys.stderr
        self.n, self.start, self.printed = 0, clock(), None
        tty = getattr(self.file, "isatty", lambda: False)()
        self.bar = tqdm(total=total, desc=desc, unit=unit, file=self.file, leave=False) if tty else None

    def update(self, n: int = 1) -> None:
        interrupts.check()  # a Ctrl-C that a garbage collector's callback dropped
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = self.clock()
        unfinished = not self.total or self.n < self.total  # the last step is said by close()
        if unfinished and now - (self.printed if self.printed is not None else self.start) >= self.every:
            self.printed = now
            print(f"{PREFIX}{self.desc}: {self._count()}, {now - self.start:.0f} s{self._left(now)}", file=self.file,
                  flush=True)

    def _count(self) -> str:
        if self.total:
            return f"{self.n}/{self.total} {self.unit}s ({100 * self.n / self.total:.0f}%)"
        return f"{self.n} {self.unit}s"

    def _left(self, now: float) -> str:
        if not self.total or not self.n or self.n >= self.total:
            return ""
        return f", about {(now - self.start) / self.n * (self.total - self.n):.0f} s left"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.printed is not None:  # long work that said it had started also says it ended
            print(f"{PREFIX}{self.desc}: {self._count()} in {self.clock() - self.start:.1f} s", file=self.file,
                  flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
