"""Hold a process to a share of one core with the cgroup ``cpu`` controller (v2 or v1).

A benchmark that runs a 3-replica cluster on one host shares the host's cores
among the replicas, where a deployment gives each replica a machine of its
own.  ``CpuLimit`` stands in for "one machine per server, each like the
single node's": every server process (the single node, and each replica)
gets the same CPU share, so that what is compared is the software, not how
many servers share two cores.

    with CpuLimit("keg-bench", 0.6) as limit:
        limit.add("single", pid)     # this process and its future children

Each name gets a cgroup of its own with a quota of ``share`` of a core per
10 ms period; the cgroups are removed on exit (their processes must have
ended or moved).  Needs root and a mounted ``cpu`` controller.
"""

from __future__ import annotations

import os
import sys
import time

PERIOD_US = 10_000
V2_ROOT = "/sys/fs/cgroup"
V1_ROOT = "/sys/fs/cgroup/cpu"


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def cgroup_root() -> tuple:
    """(directory under which to make cgroups, version) of the host's cpu controller.

    Raises:
        RuntimeError: no cpu controller is mounted, or it cannot be used.
    """
    controllers = os.path.join(V2_ROOT, "cgroup.controllers")
    if os.path.exists(controllers):
        with open(controllers) as f:
            if "cpu" not in f.read().split():
                raise RuntimeError("cgroup v2 is mounted without the cpu controller")
        return V2_ROOT, 2
    if os.path.exists(os.path.join(V1_ROOT, "cpu.cfs_quota_us")):
        return V1_ROOT, 1
    raise RuntimeError(f"no cgroup cpu controller at {V2_ROOT} (v2) or {V1_ROOT} (v1)")


class CpuLimit:
    """A set of cgroups, one per name, each holding its processes to ``share`` of one core."""

    def __init__(self, prefix: str, share: float):
        if not 0.1 <= share <= 64:
            raise ValueError(f"CPU share {share}: give a share of one core (0.5) or a number of cores, "
                             "from 0.1 to 64")
        root, self.version = cgroup_root()
        self.base = os.path.join(root, f"{prefix}-{os.getpid()}")
        self.share = share
        self.groups: dict = {}

    def __enter__(self) -> "CpuLimit":
        """Make the base cgroup (under v2, with the cpu controller enabled for it and its children).

        Raises:
            RuntimeError: the cgroup cannot be made or the controller not enabled.
        """
        try:
            if self.version == 2:
                _enable_cpu(os.path.dirname(self.base))
            os.mkdir(self.base)
            if self.version == 2:
                _enable_cpu(self.base)
        except OSError as err:
            try:
                os.rmdir(self.base)
            except OSError:
                pass
            raise RuntimeError(f"cannot make a cgroup with the cpu controller at {self.base}: {err} "
                               "(needs root; under cgroup v2 the parent must hold no processes of its own)") from err
        return self

    def add(self, name: str, pid: int) -> None:
        """Move process ``pid`` (and so its later children) into the cgroup ``name``, made on first use."""
        path = self.groups.get(name)
        if path is None:
            path = os.path.join(self.base, name)
            os.mkdir(path)
            quota = round(self.share * PERIOD_US)
            if self.version == 2:
                _write(os.path.join(path, "cpu.max"), f"{quota} {PERIOD_US}")
            else:
                _write(os.path.join(path, "cpu.cfs_period_us"), str(PERIOD_US))
                _write(os.path.join(path, "cpu.cfs_quota_us"), str(quota))
            self.groups[name] = path
        _write(os.path.join(path, "cgroup.procs"), str(pid))

    def throttled_s(self, name: str) -> float:
        """Seconds the cgroup ``name`` was held back by its quota so far."""
        with open(os.path.join(self.groups[name], "cpu.stat")) as f:
            stat = dict(line.split() for line in f if line.strip())
        if self.version == 2:
            return int(stat.get("throttled_usec", 0)) / 1e6
        return int(stat.get("throttled_time", 0)) / 1e9

    def __exit__(self, *exc) -> None:
        for path in list(self.groups.values()) + [self.base]:
            for attempt in range(50):  # a killed process leaves its cgroup a moment after it is reaped
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError as err:
                    if attempt == 49:
                        print(f"cpu_limit: cgroup {path} left behind ({err}); remove it with rmdir once "
                              "its processes have ended", file=sys.stderr)
                    time.sleep(0.1)


def _enable_cpu(cgroup: str) -> None:
    """Enable the cpu controller for the children of the v2 ``cgroup`` unless it is already."""
    with open(os.path.join(cgroup, "cgroup.subtree_control")) as f:
        if "cpu" in f.read().split():
            return
    _write(os.path.join(cgroup, "cgroup.subtree_control"), "+cpu")
