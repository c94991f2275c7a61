"""Progress lines: durations as a person says them, the time left from the measured rate,
'estimating…' before there is one, a line every `every_s` and at each finished item."""

import logging

from tasks.progress import ESTIMATING, Progress, duration, timed


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def grid_progress(clock, every_s=30.0):
    return Progress("grid demo", {"a": 20, "b": 20, "c": 20}, clock=clock, every_s=every_s,
                    log=logging.getLogger("test.progress"))


def test_durations_read_as_spoken():
    assert [duration(s) for s in (0.4, 45, 59.6, 61, 3599, 3725)] == [
        "0 s", "45 s", "1 min 00 s", "1 min 01 s", "59 min 59 s", "1 h 02 min"]


def test_time_left_is_the_remaining_edits_over_the_measured_rate():
    clock = Clock()
    progress = grid_progress(clock)
    assert progress.line() == "grid demo: 0/3 cells done, 0/60 edits; 3 waiting; " + ESTIMATING
    clock.now += 60
    progress.update("a", 10)
    progress.update("b", 5)
    # 15 edits in 60 s: 0.25 edits/s; 45 to go: 180 s
    assert progress.line() == ("grid demo: 0/3 cells done, 15/60 edits; running a 10/20, "
                               "b 5/20; 1 waiting; 15.0 edits/min; about 3 min 00 s left")
    clock.now += 40
    progress.finish("a")
    assert progress.line().startswith("grid demo: 1/3 cells done, 25/60 edits; running b 5/20")


def test_work_found_done_or_resumed_is_not_counted_in_the_rate():
    clock = Clock()
    progress = grid_progress(clock)
    progress.found_done("a")       # finished by an earlier driver
    progress.resume("b", 16)       # goes on from its checkpoint
    clock.now += 10
    assert progress.time_left() == ESTIMATING
    progress.update("b", 18)       # 2 edits in 10 s; 2 + 20 to go: 110 s
    assert progress.time_left() == "about 1 min 50 s left"
    assert progress.line().startswith("grid demo: 1/3 cells done, 38/60 edits; running b 18/20")


def test_an_item_with_all_its_units_but_not_finished_is_still_running():
    progress = grid_progress(Clock())
    for name in ("a", "b", "c"):
        progress.update(name, 20)
    assert progress.time_left() == "all edits done; finishing"
    for name in ("a", "b", "c"):
        progress.finish(name)
    assert progress.line().endswith("all done")


def test_lines_come_every_interval_and_at_each_finished_item(caplog):
    caplog.set_level(logging.INFO, logger="test.progress")
    clock = Clock()
    progress = grid_progress(clock, every_s=30)
    progress.report(force=True)
    for step in range(1, 7):       # an update every 10 s: a line every third
        clock.now += 10
        progress.update("a", step)
    progress.finish("b")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4
    assert lines[1].startswith("grid demo: 0/3 cells done, 3/60 edits")
    assert lines[3].startswith("grid demo: 1/3 cells done, 26/60 edits")


def test_a_timed_step_says_what_it_does_and_how_long_it_took(caplog):
    caplog.set_level(logging.INFO, logger="test.timed")
    with timed(logging.getLogger("test.timed"), "anchor statistics of tiny-llama"):
        pass
    assert [r.getMessage() for r in caplog.records] == [
        "anchor statistics of tiny-llama …", "anchor statistics of tiny-llama: done in 0 s"]
