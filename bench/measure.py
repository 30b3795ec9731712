"""Timing samples, goals and result records for the benchmarks in ``bench/``.

Every benchmark produces one ``Report``: figures (each printed as one table
line the moment it is known), goals checked against those figures, and a JSON
file in ``bench/out/`` holding all of it plus the parameters and the machine.
"""

from __future__ import annotations

import cProfile
import json
import math
import os
import platform
import pstats
import time
from contextlib import contextmanager
from dataclasses import dataclass

LABEL_WIDTH = 58


# ------------------------------------------------------------------- samples

def percentile(values, pct: float) -> float:
    """The nearest-rank percentile of ``values`` (``pct`` in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values) -> float:
    """The median of ``values`` (the mean of the middle two for an even count)."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def summarize(seconds) -> dict:
    """Mean, p50, p99 and max of latencies given in seconds, as milliseconds."""
    seconds = list(seconds)
    return {
        "n": len(seconds),
        "mean_ms": 1000 * sum(seconds) / len(seconds),
        "p50_ms": 1000 * percentile(seconds, 50),
        "p99_ms": 1000 * percentile(seconds, 99),
        "max_ms": 1000 * max(seconds),
    }


def latency_text(summary: dict) -> str:
    """``mean … p50 … p99 … max …`` in milliseconds, for a table line."""
    return (f"mean {summary['mean_ms']:.3f}  p50 {summary['p50_ms']:.3f}  "
            f"p99 {summary['p99_ms']:.3f}  max {summary['max_ms']:.3f} ms")


class Stopwatch:
    """Times a loop as a whole and each step in it (``perf_counter``)."""

    def __init__(self):
        self.steps: list = []
        self.total = 0.0
        self._start = None

    def __enter__(self):
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.total = time.perf_counter() - self._start

    @contextmanager
    def step(self):
        """Time one step; its duration is appended to ``steps``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.steps.append(time.perf_counter() - start)


# --------------------------------------------------------------------- goals

@dataclass(frozen=True)
class Goal:
    """A figure that must be at least (``>=``) or at most (``<=``) a target."""

    name: str
    value: float
    op: str
    target: float
    source: str = "brief"

    @property
    def met(self) -> bool:
        """True when the measured value satisfies the goal."""
        return self.value >= self.target if self.op == ">=" else self.value <= self.target

    def to_json(self) -> dict:
        """The goal as stored in the result file."""
        return {"name": self.name, "value": self.value, "op": self.op, "target": self.target,
                "met": self.met, "source": self.source}


# -------------------------------------------------------------------- report

class Report:
    """The figures and goals of one benchmark, printed as they come in."""

    def __init__(self, name: str, params: dict):
        self.name = name
        self.params = params
        self.figures: list = []
        self.goals: list = []
        self.started = time.time()
        print(f"\n== {name}  " + "  ".join(f"{k}={v}" for k, v in params.items()), flush=True)

    def figure(self, label: str, value: float, unit: str, detail: str = "", **extra) -> float:
        """Record one figure and print its table line; returns ``value``."""
        self.figures.append({"label": label, "value": value, "unit": unit, **extra})
        text = f"{value:,.1f}" if abs(value) >= 100 else f"{value:,.3f}"
        print(f"  {label:<{LABEL_WIDTH}} {text:>12} {unit:<8} {detail}".rstrip(), flush=True)
        return value

    def goal(self, name: str, value: float, op: str, target: float, source: str = "brief") -> Goal:
        """Check one goal and print whether it is met."""
        goal = Goal(name, value, op, target, source)
        self.goals.append(goal)
        verdict = "MET" if goal.met else "MISSED"
        print(f"  {'GOAL ' + name:<{LABEL_WIDTH}} {value:>12,.2f} {'':<8} goal {op} {target:g}: {verdict}",
              flush=True)
        return goal

    def to_json(self, environment: dict) -> dict:
        """Everything measured, with the parameters and the machine."""
        return {"benchmark": self.name, "params": self.params, "started": self.started,
                "seconds": time.time() - self.started, "environment": environment,
                "figures": self.figures, "goals": [g.to_json() for g in self.goals]}

    def write(self, out_dir: str, environment: dict) -> str:
        """Write ``<out_dir>/<name>.json``; returns its path."""
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"{self.name}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_json(environment), f, indent=2)
            f.write("\n")
        return path


def environment(etcd_version: str | None) -> dict:
    """The machine and software a result was measured on."""
    mem_kib = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_kib = int(line.split()[1])
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "mem_gib": None if mem_kib is None else round(mem_kib / 2**20, 1),
            "python": platform.python_version(), "platform": platform.platform(),
            "etcd": etcd_version, "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}


# ------------------------------------------------------------------ profiling

class KegProfiler:
    """A cProfile that runs only inside the Keg parts of the benchmarks (``--profile``)."""

    def __init__(self, enabled: bool):
        self.profile = cProfile.Profile() if enabled else None
        self.used = False  # a section ran (the HTTP benchmarks profile the master process instead)

    @contextmanager
    def section(self):
        """Profile the code in this block (a no-op unless enabled)."""
        if self.profile is None:
            yield
            return
        self.used = True
        self.profile.enable()
        try:
            yield
        finally:
            self.profile.disable()

    def dump(self, path: str, top: int = 30) -> None:
        """Save the raw profile to ``path`` and print the top entries by own time and by total time."""
        if self.profile is None or not self.used:
            return  # pstats refuses a profile that never ran
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.profile.dump_stats(path)
        stats = pstats.Stats(self.profile)
        stats.strip_dirs()
        print(f"\n== profile of the Keg sections (saved to {path})")
        stats.sort_stats("tottime").print_stats(top)
        stats.sort_stats("cumulative").print_stats(top)
