"""Shared reporting for the benchmarks: where they ran, interleaved repetitions, median and spread.

A figure from a shared machine is only worth quoting as the median of several repetitions with
its spread, the two sides compared interleaved (so drift in the machine's load hits both), and the
ratio taken per repetition pair. Every benchmark prints :func:`machine_line` with its figures.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """Short hash of the checkout holding ``path`` (default: this package), ``+dirty`` when tracked
    files differ from it; None outside a git checkout or without git."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0 or not head.stdout.strip():
            return None
        dirty = subprocess.run(["git", "-C", str(where), "diff", "--quiet", "HEAD", "--"],
                               capture_output=True, timeout=30).returncode == 1
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def machine_line(threads: int | None = None) -> str:
    """One line naming the machine, the thread count, torch's version and the commit."""
    import torch

    commit = git_commit()
    threads = torch.get_num_threads() if threads is None else threads
    return (f"machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__} with {threads} "
            f"thread{'s' if threads != 1 else ''}; commit {commit or 'unknown (not a git checkout)'}")


@dataclass(frozen=True)
class Spread:
    """Median of repeated measurements, with their minimum and maximum."""

    median: float
    low: float
    high: float
    n: int

    def format(self, unit: str = "", digits: int = 2) -> str:
        """``12.34 s [12.01-13.20]``: the median, then min-max over the repetitions."""
        u = f" {unit}" if unit and unit != "x" else unit
        return f"{self.median:.{digits}f}{u} [{self.low:.{digits}f}-{self.high:.{digits}f}]"


def spread(values: Sequence[float]) -> Spread:
    """Median and min-max of ``values`` (at least one)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values to summarise")
    return Spread(statistics.median(values), min(values), max(values), len(values))


@dataclass(frozen=True)
class Timing:
    """One run of one side: wall and process-CPU seconds, and what it returned."""

    wall: float
    cpu: float
    result: Any


def time_call(fn: Callable[[], Any], before: Callable[[], None] | None = None,
              after: Callable[[], None] | None = None) -> Timing:
    """Wall and process CPU time of ``fn()``; ``before``/``after`` run inside the timing (e.g. a
    device synchronisation)."""
    if before is not None:
        before()
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    if after is not None:
        after()
    return Timing(time.perf_counter() - wall, time.process_time() - cpu, result)


def interleaved(sides: Mapping[str, Callable[[], Any]], repeats: int, *,
                before: Callable[[], None] | None = None, after: Callable[[], None] | None = None,
                on_run: Callable[[int, str, Timing], None] | None = None) -> dict[str, list[Timing]]:
    """Run each side ``repeats`` times, interleaved: repetition i runs every side once, in the
    given order when i is even and reversed when odd (A B, B A, A B, ...), so a slow drift of the
    machine's load falls on both sides alike. ``on_run(i, side, timing)`` is called after each run."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    names = list(sides)
    timings: dict[str, list[Timing]] = {n: [] for n in names}
    for i in range(repeats):
        for name in (names if i % 2 == 0 else names[::-1]):
            t = time_call(sides[name], before, after)
            timings[name].append(t)
            if on_run is not None:
                on_run(i, name, t)
    return timings


def pair_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """``numerator[i] / denominator[i]`` for each repetition pair."""
    if len(numerator) != len(denominator):
        raise ValueError("ratios need the same number of repetitions on both sides")
    return [a / b for a, b in zip(numerator, denominator)]


def compare_line(label: str, slow: Sequence[float], fast: Sequence[float], unit: str = "s",
                 digits: int = 2) -> str:
    """``label: slow S [..] vs fast F [..], ratio R x [..] (n pairs)``: each side's median and
    min-max, and the slow/fast ratio's median and min-max over the repetition pairs."""
    r = spread(pair_ratios(slow, fast))
    return (f"{label}: {spread(fast).format(unit, digits)} vs {spread(slow).format(unit, digits)}, "
            f"ratio {r.format('x', 2)} over {r.n} interleaved pairs")
