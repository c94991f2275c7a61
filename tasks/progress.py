"""Progress a person can read in a plain log (a terminal, `ray job logs`, a CI page): what a
long step is doing and how long it took (`timed`), and how far a set of items (a grid's
cells, the runs a re-evaluation scores) has got, with an estimate of the time left
(`Progress`). Log lines only, no live bar: a bar's carriage returns turn into one
unreadable line in a captured log.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

PROGRESS_SECONDS = 30.0   # between two progress lines: often enough to see movement,
#                           rare enough that a two-hour grid's log stays a few pages long
ESTIMATING = "estimating…"


def duration(seconds: float) -> str:
    """`seconds` as a person says it: '45 s', '3 min 05 s', '2 h 07 min'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


@contextmanager
def timed(log: logging.Logger, what: str):
    """Log `what` when it starts and, when it ends, how long it took."""
    log.info("%s …", what)
    tic = time.perf_counter()
    yield
    log.info("%s: done in %s", what, duration(time.perf_counter() - tic))


@dataclass
class Progress:
    """Items, each with a number of units of work (a cell's edits, a run's snapshots).
    The driver reports where each item stands (`update`, `resume`, `finish`); `report`
    logs a line such as

        grid cpu-demo: 3/12 cells done, 71/240 edits; running smollm2-135m-memit-s0
        14/20, smollm2-135m-ft-s0 5/20; 7 waiting; 9.2 edits/min; about 18 min 20 s left

    The time left is the units still to do over the rate measured since this driver
    started (units applied by it, not those found done), "estimating…" until it has one.
    Items that have done all their units but are not finished (a cell whose last
    snapshot is being scored) count as running."""

    title: str
    totals: dict[str, int]
    unit: str = "edits"
    items: str = "cells"
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("rlsedit.progress"))
    every_s: float = PROGRESS_SECONDS
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self):
        self.done = dict.fromkeys(self.totals, 0)
        self.finished: set[str] = set()
        self.applied = 0            # units done by this driver: the rate's numerator
        self.started = self.clock()
        self.last_report: float | None = None

    def found_done(self, name: str) -> None:
        """`name` was finished before this driver started."""
        self.done[name] = self.totals[name]
        self.finished.add(name)

    def resume(self, name: str, done: int) -> None:
        """`name` goes on from `done` units (a checkpoint): not counted in the rate."""
        self.done[name] = done

    def update(self, name: str, done: int) -> None:
        """`name` has done `done` units; logs a line when one is due."""
        self._count(name, done)
        self.report()

    def finish(self, name: str) -> None:
        """`name` is complete; always logs a line."""
        self._count(name, self.totals[name])
        self.finished.add(name)
        self.report(force=True)

    def _count(self, name: str, done: int) -> None:
        self.applied += max(0, done - self.done[name])
        self.done[name] = done

    def rate(self) -> float | None:
        """Units per second since this driver started, None before the first."""
        elapsed = self.clock() - self.started
        return self.applied / elapsed if self.applied and elapsed > 0 else None

    def time_left(self) -> str:
        remaining = sum(self.totals[n] - self.done[n] for n in self.totals
                        if n not in self.finished)
        if remaining == 0:
            return ("all done" if len(self.finished) == len(self.totals)
                    else f"all {self.unit} done; finishing")
        rate = self.rate()
        return f"about {duration(remaining / rate)} left" if rate else ESTIMATING

    def line(self) -> str:
        total, done = sum(self.totals.values()), sum(self.done.values())
        running = [f"{n} {self.done[n]}/{self.totals[n]}" for n in self.totals
                   if n not in self.finished and self.done[n]]
        waiting = sum(1 for n in self.totals if n not in self.finished and not self.done[n])
        parts = [f"{self.title}: {len(self.finished)}/{len(self.totals)} {self.items} done, "
                 f"{done}/{total} {self.unit}"]
        if running:
            parts.append("running " + ", ".join(running))
        if waiting:
            parts.append(f"{waiting} waiting")
        if (rate := self.rate()) is not None:
            parts.append(f"{rate:.2f} {self.unit}/s" if rate >= 1
                         else f"{60 * rate:.1f} {self.unit}/min")
        parts.append(self.time_left())
        return "; ".join(parts)

    def report(self, force: bool = False) -> None:
        """Log `line()` when forced or when `every_s` has passed since the last one."""
        now = self.clock()
        if force or self.last_report is None or now - self.last_report >= self.every_s:
            self.log.info("%s", self.line())
            self.last_report = now
