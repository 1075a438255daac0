"""Progress bars: the counts, rates and time left they print, on a terminal and in a log."""

import io

import pytest

from radial_min import progress


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", c)
    return c


def test_rate_and_time_left_count_only_this_runs_work(clock):
    """A resumed run starts at step 100 of 200: 10 steps in 5 s is 2 steps/s and 45 s left, not 22/s."""
    bar = progress.Bar(200, "train", "step", initial=100, stream=Terminal())
    for _ in range(10):
        clock.t += 0.5
        bar.update(1)
    assert bar.line() == "train  110/200 step (55%)  2 step/s  0:05, about 0:45 left"


def test_work_skipped_on_the_way_counts_as_done_not_in_the_rate(clock):
    """A streamed pass resumed at its block: the blocks an earlier run did are skipped, the rate is this run's."""
    bar = progress.Bar(200, "simulate", "seq-block", stream=Terminal())
    clock.t += 5
    bar.update(10)
    bar.skip(100)
    assert bar.line() == "simulate  110/200 seq-block (55%)  2 seq-block/s  0:05, about 0:45 left"


def test_growing_total_reads_at_least_and_stage_follows_the_label(clock):
    out = Terminal()
    bar = progress.Bar(0, "simulate", "seq", final=False, stream=out)
    bar.extend(4, final=False)
    for _ in bar.track(range(2), "tau=0.2, drop"):
        clock.t += 2.0
    assert bar.line() == "simulate: tau=0.2, drop  2/4+ seq (50%)  2 s/seq  0:04, at least 0:04 left"
    bar.extend(2, final=True)
    assert "2/6 seq (33%)" in bar.line() and "about 0:08 left" in bar.line()
    assert out.getvalue().startswith("\r\x1b[Ksimulate")  # redrawn in place on a terminal
    bar.close()
    assert out.getvalue().endswith("\r\x1b[Ksimulate  2/6 seq (33%)  2 s/seq  in 0:04\n")  # the label alone


def test_plain_lines_when_not_a_terminal(clock):
    """In a log: nothing for the first PLAIN_EVERY seconds, then one line, and one at the end."""
    log = io.StringIO()
    bar = progress.Bar(100, "profile", "seq", stream=log)
    clock.t += 1.0
    bar.update(10)
    assert log.getvalue() == ""
    clock.t += progress.PLAIN_EVERY
    bar.update(10, info="loss 3.2")
    assert log.getvalue() == "profile  20/100 seq (20%)  1.55 s/seq  0:31, about 2:04 left  loss 3.2\n"
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].startswith("profile  20/100 seq (20%)") and "\r" not in log.getvalue()


def test_disabled_and_erased_bars_print_nothing(clock):
    quiet = Terminal()
    with progress.Bar(5, "x", enabled=False, stream=quiet) as bar:
        bar.update(5)
    assert quiet.getvalue() == ""
    term = Terminal()
    for _ in progress.Bar(3, "tmp", leave=False, stream=term).track(range(3)):
        clock.t += 1
    bar = progress.Bar(3, "tmp", leave=False, stream=term)
    bar.close()
    assert term.getvalue().endswith("\r\x1b[K")  # the line is erased, nothing left behind


def test_duration():
    assert [progress.duration(s) for s in (0, 7.4, 754, 3723)] == ["0:00", "0:07", "12:34", "1:02:03"]


def test_compile_time_is_not_in_the_rate(clock, monkeypatch):
    """A first run: 3 of the first 5 s went to Numba compiling kernels; 10 items in the other 2 s are 5 items/s."""
    compiled = [7.0]  # seconds compiled before the bar: not its own
    monkeypatch.setattr(progress, "compile_seconds", lambda: compiled[0])
    bar = progress.Bar(20, "profile", "seq", stream=Terminal())
    clock.t += 5
    compiled[0] += 3
    bar.update(10)
    assert bar.line() == "profile  10/20 seq (50%)  5 seq/s  0:05, about 0:02 left"


def test_a_line_too_wide_keeps_its_count_and_time_left(clock, monkeypatch):
    """On a narrow terminal the info goes, then the label is shortened: the count and the time left stay."""
    out = Terminal()
    bar = progress.Bar(200, "opt-kjv-wiki", "seq-block", stream=out)
    bar.set("static, lowest-ratio 3 dropped: L4.att (9/13)", info="loss 3.21")
    clock.t += 5
    bar.update(10)
    full = bar.line()
    assert full.endswith("2 seq-block/s  0:05, about 1:35 left  loss 3.21")
    assert bar.line(width=len(full)) == full
    short = bar.line(width=80)
    assert len(short) == 80 and short.endswith("(5%)  2 seq-block/s  0:05, about 1:35 left")
    assert short.startswith("opt-kjv-wiki: stat~  10/200 seq-block")
    monkeypatch.setattr(progress.shutil, "get_terminal_size", lambda fallback: type("S", (), {"columns": 71})())
    clock.t += 1
    bar.update(1)
    drawn = out.getvalue().split("\r\x1b[K")[-1]
    assert len(drawn) == 70 and drawn.startswith("opt-k~  11/200") and drawn.endswith("left")
