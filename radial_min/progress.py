"""Progress bars: a label, a count, a rate and an honest time left, on one line of stderr.

    with Bar(total=600, label="train", unit="step") as bar:
        for step in ...:
            bar.update(1, info="loss 3.21")
    for ids in track(sequences, "profile", "seq"):   # the same, around an iterable
        ...

On a terminal the line is redrawn in place (at most 10 times a second, cut to the terminal's width); when
stderr is a file or a pipe, a plain line is written every PLAIN_EVERY seconds and one at the end, so a log
shows progress without a wall of carriage returns. The rate counts only the work done in this process (a
resumed run does not count the steps it starts from as fast ones) and not the time Numba spends compiling
kernels on a first run; the time left is shown only once there is a rate, and while the total may still grow
(`final=False`, e.g. passes that a sweep decides later) it reads "at least ...". A line too wide for the
terminal drops its info, then shortens its label, so the count and the time left stay in view.
"""

import shutil
import sys
import time

from .kernels import compile_seconds

PLAIN_EVERY = 30.0  # seconds between plain lines when stderr is not a terminal
REDRAW_EVERY = 0.1  # seconds between redraws on a terminal


def duration(seconds: float) -> str:
    """'0:07', '12:34', '1:02:03'."""
    s = int(round(seconds))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Bar:
    """A progress line for `total` items of `unit`, starting at `initial` (work a resumed run already has).
    `enabled=False` prints nothing; `leave=False` erases the line at the end on a terminal."""

    def __init__(
        self,
        total: int,
        label: str = "",
        unit: str = "it",
        initial: int = 0,
        enabled: bool = True,
        final: bool = True,
        leave: bool = True,
        stream=None,
    ):
        self.total, self.label, self.unit, self.final, self.leave = total, label, unit, final, leave
        self.n = self.start = initial
        self.stage = self.info = ""
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.t0 = self.shown = time.perf_counter()
        self.compiled0 = compile_seconds()  # compile time before this bar: not its own
        self._draw(force=self.tty)

    def update(self, n: int = 1, info: str | None = None, stage: str | None = None):
        self.n += n
        if info is not None:
            self.info = info
        if stage is not None:
            self.stage = stage
        self._draw()

    def set(self, stage: str | None = None, info: str | None = None):
        """What runs now (shown after the label, e.g. 'tau=0.2, drop') or info (loss, ...), at the next redraw."""
        self.update(0, info, stage)

    def set_postfix(self, **values):
        """Named values after the count ('loss 3.210  tok_s 1950'), as tqdm's set_postfix."""
        self.set(info="  ".join(f"{k} {v}" for k, v in values.items()))

    def skip(self, n: int):
        """`n` items done before this process started (a resumed run's): counted, but not in the rate."""
        self.n += n
        self.start += n
        self._draw()

    def extend(self, n: int, final: bool = True):
        """`n` more items than planned: for work that becomes known on the way; final=False if more may follow."""
        self.total += n
        self.final = final
        self._draw()

    def track(self, items, stage: str | None = None):
        """Iterate over `items`, counting each one after it is processed, with `stage` saying what runs."""
        if stage is not None:
            self.set(stage)
        for item in items:
            yield item
            self.update(1)

    def close(self):
        if not self.enabled:
            return
        if self.tty and not self.leave:
            self.stream.write("\r\x1b[K")
        else:
            self.stream.write(("\r\x1b[K" if self.tty else "") + self.line(done=True) + "\n")
        self.stream.flush()
        self.enabled = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def line(self, done: bool = False, width: int | None = None) -> str:
        """'simulate: tau=0.2, drop  340/1,000 seq (34%)  8.12 seq/s  0:42, about 1:21 left  info'; at the end,
        the label alone with the time it all took. With `width`, at most that many characters: the info goes
        first, then the label is shortened (ending in '~')."""
        elapsed = time.perf_counter() - self.t0
        working = elapsed - (compile_seconds() - self.compiled0)  # the time Numba compiled is not work
        rate = (self.n - self.start) / working if working > 0 else 0.0
        count = f"{self.n:,}" + (f"/{self.total:,}{'' if self.final else '+'}" if self.total else "") + f" {self.unit}"
        if self.total:
            count += f" ({self.n / self.total:.0%})"
        label = self.label + (f": {self.stage}" if self.stage and not done else "")
        parts = [label, count] if label else [count]
        if rate > 0:
            parts.append(f"{rate:.3g} {self.unit}/s" if rate >= 1 else f"{1 / rate:.3g} s/{self.unit}")
        if done:
            parts.append(f"in {duration(elapsed)}")
        elif rate > 0 and self.total >= self.n > 0:
            left = duration((self.total - self.n) / rate)
            parts.append(f"{duration(elapsed)}, {'about' if self.final else 'at least'} {left} left")
        else:
            parts.append(duration(elapsed))
        text = "  ".join(parts + ([self.info] if self.info else []))
        if width is None or len(text) <= width:
            return text
        rest = "  ".join(parts[1:] if label else parts)  # the count, rate and time left
        if not label or len(rest) + 3 > width:  # no room for a label: the numbers alone
            return rest[:width]
        room = width - len(rest) - 2  # for the label and its two spaces
        return (label if len(label) <= room else label[: room - 1] + "~") + "  " + rest

    def _draw(self, force: bool = False):
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self.shown < (REDRAW_EVERY if self.tty else PLAIN_EVERY):
            return
        self.shown = now
        if self.tty:
            width = shutil.get_terminal_size((120, 24)).columns - 1
            self.stream.write("\r\x1b[K" + self.line(width=width))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()


def track(items, label: str = "", unit: str = "it", enabled: bool = True, leave: bool = False):
    """A bar around an iterable (its len() is the total when it has one); erased at the end on a terminal."""
    total = len(items) if hasattr(items, "__len__") else 0
    with Bar(total, label, unit, enabled=enabled, leave=leave) as bar:
        yield from bar.track(items)


class Passes:
    """A fresh bar for each pass, `track(items, label)`, when how many passes will run is not known up front."""

    def __init__(self, unit: str = "it", enabled: bool = True):
        self.unit, self.enabled = unit, enabled

    def track(self, items, stage: str = ""):
        yield from track(items, stage, self.unit, self.enabled)


class BlockBar:
    """Progress of a command's streamed passes (layer_major.py) on one bar that counts each sequence through each
    step (a block, then the head), labelled with the pass and its block. Told the work to come (`extend`: sequences
    to run through whole passes, as oracle.sweep counts them), its time left covers all of it; a pass not announced
    has a bar of its own, named after it. Work an interrupted run kept (a pass it
    finished, or the blocks of a pass resumed at its block) counts as done, but not in the rate."""

    def __init__(self, model_name, steps_per_pass):
        self.model_name, self.steps_per_pass = model_name, steps_per_pass
        self.bar = self.steps = None
        self.stage = ""  # the pass's label before its block, on a bar shared by passes

    def extend(self, n_sequences, final=True):
        self._open(self.model_name).extend(n_sequences * self.steps_per_pass, final)

    def begin(self, label, steps, start, n_seq):
        self.stage, self.steps = ("" if self.bar is None else f"{label}: "), steps
        bar = self._open(f"{self.model_name}: {label}")
        if bar.final and bar.n + len(steps) * n_seq > bar.total:  # a pass nobody announced: its own work
            bar.extend(bar.n + len(steps) * n_seq - bar.total)
        bar.skip(start * n_seq)
        self._close_when_done()

    def __call__(self, items, i):
        yield from self.bar.track(items, f"{self.stage}{self.steps[i]} ({i + 1}/{len(self.steps)})")
        self._close_when_done()

    def _open(self, label):
        if self.bar is None:
            self.bar = Bar(0, label, "seq-block", leave=False)
        return self.bar

    def _close_when_done(self):
        if self.bar.final and self.bar.n >= self.bar.total:
            self.bar.close()
            self.bar = None
