"""bench/cpu_limit.py, on which `bench/raft.py --cpu-per-server` relies: a process in a ``CpuLimit`` gets
no more than its share of a core, and the cgroups go away afterwards.

Needs root and the cgroup cpu controller (CI runs as root); fails, never skips, without them.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time

import pytest


def _load_cpu_limit():
    # Loaded by path: bench/ on sys.path would hide the packages of the same names (bench/mayor.py).
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "cpu_limit.py")
    spec = importlib.util.spec_from_file_location("bench_cpu_limit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CpuLimit = _load_cpu_limit().CpuLimit


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_busy_process_gets_its_share_of_a_core_and_no_more():
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    with CpuLimit("keg-test-cpu-limit", 0.2) as limit:
        try:  # the spinner ends before the cgroups are removed, also when the test fails
            limit.add("spin", spin.pid)
            before, start = _cpu_seconds(spin.pid), time.monotonic()
            time.sleep(2.0)
            share = (_cpu_seconds(spin.pid) - before) / (time.monotonic() - start)
            throttled = limit.throttled_s("spin")
            with open(os.path.join(limit.groups["spin"], "cgroup.procs")) as f:
                members = f.read().split()
        finally:
            spin.kill()
            spin.wait()
    assert members == [str(spin.pid)]
    assert share < 0.3, f"the process used {share:.2f} of a core; its limit is 0.2"
    assert throttled > 0.5, f"the quota held the process back only {throttled:.2f} s of 2 s"
    assert not os.path.exists(limit.base), "the cgroups are left behind"


@pytest.mark.parametrize("share", [0, 0.05, -1, 100])
def test_a_share_out_of_range_is_refused_before_any_cgroup_is_made(share):
    with pytest.raises(ValueError, match="CPU share"):
        CpuLimit("keg-test-cpu-limit", share)
