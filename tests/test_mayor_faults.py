"""Faults, with the real thing: the master killed under a running Mayor, and a Mayor SIGKILLed 20 times.

Integrity on its own (DESIGN §5.6): with the master gone, every process
keeps running and crashed ones restart by their policy, from the Mayor's
cached process table and image; status catches up when the master is back.
After a Mayor crash the next one re-adopts what runs: checked after 20
SIGKILLs during churn against ``runc list``, the process table, the shims,
the mounts and the cgroups of the machine.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest

from conftest import wait_until
from test_mayor_e2e import MayorProcess, Site, cgroups_of, running, shim_processes

SEED = 20250606
ROUNDS = 20
NAMES = ("p0", "p1", "p2", "p3", "p4")


@pytest.fixture
def site():
    """A master of this test's own: it gets killed."""
    s = Site()
    yield s
    s.close()


def sleeper(site: Site, seconds: int, **more) -> dict:
    """A spec whose container's init is ``sleep SECONDS`` (the number tells incarnations of specs apart)."""
    return {"image": site.image, "args": ["/bin/sleep", str(seconds)], "stop_grace": 0, **more}


def start_time(pid: int):
    """Field 22 of /proc/PID/stat: with the pid, it names one process for good (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def test_processes_outlive_the_master_and_status_catches_up(site):
    mayor = MayorProcess(site, "away")
    mayor.wait_ready(mayor.start())
    m = mayor.name
    try:
        procs = f"/machines/{m}/procs"
        site.put(f"{procs}/steady.json", sleeper(site, 100001))
        site.put(f"{procs}/crasher.json", sleeper(site, 100002, restart="on-failure", backoff={"start": 1, "max": 4}))
        site.put(f"{procs}/once.json", sleeper(site, 100003, restart="never"))
        before = {name: running(site, mayor, name) for name in ("steady", "crasher", "once")}
        born = {name: start_time(s["pid"]) for name, s in before.items()}

        site.master.kill()
        gone_at = time.monotonic()
        os.kill(before["crasher"]["pid"], signal.SIGKILL)  # both crash while the master is away
        os.kill(before["once"]["pid"], signal.SIGKILL)
        killed_at = time.time()

        def crasher_back():
            # runc lists the new container as running a moment before its shim records it (running.json).
            c = mayor.runc_list().get(mayor.cid("crasher"), {})
            if c.get("status") != "running" or c["pid"] == before["crasher"]["pid"]:
                return None
            try:
                with open(os.path.join(mayor.data, "containers", "crasher", "running.json")) as f:
                    record = json.load(f)
            except (FileNotFoundError, ValueError):
                return None
            return (c, record["started"]) if record.get("pid") == c["pid"] else None
        again, restarted = wait_until(crasher_back, "the crasher to be restarted without the master", log=mayor.log)
        assert restarted - killed_at >= 0.9  # after its back-off (1 s), not at once

        containers = mayor.runc_list()
        assert containers[mayor.cid("once")]["status"] == "stopped"  # restart never: left as it ended
        assert containers[mayor.cid("steady")]["pid"] == before["steady"]["pid"]
        assert start_time(before["steady"]["pid"]) == born["steady"]  # the same process, never restarted
        assert mayor.proc.poll() is None
        assert "status kept for later" in mayor.log()  # it knew the master was away, and kept supervising
        def queued_status():
            try:
                with open(os.path.join(mayor.data, "outbox.json")) as f:
                    queued = json.load(f)
            except (FileNotFoundError, ValueError):
                return None
            status = queued.get(f"/machines/{m}/status/crasher.json")
            return status and json.loads(status)["pid"] == again["pid"]
        wait_until(queued_status, "the crasher's new status kept in the outbox", timeout=10, log=mayor.log)

        time.sleep(max(0.0, 4.0 - (time.monotonic() - gone_at)))  # away for a while: four seconds at least
        assert mayor.runc_list()[mayor.cid("crasher")]["pid"] == again["pid"]  # restarted once, running since
        site.master.start()

        crasher = running(site, mayor, "crasher", pid=again["pid"])
        assert crasher["restarts"] == 1 and crasher["kid"] != before["crasher"]["kid"]
        assert crasher["previous"]["kid"] == before["crasher"]["kid"] and crasher["previous"]["exit_code"] == 137
        once = wait_until(lambda: (s := site.status(m, "once")) and s["state"] == "exited" and s,
                          "once's exit to be published", log=mayor.log)
        assert (once["kid"], once["exit_code"]) == (before["once"]["kid"], 137)
        steady = site.status(m, "steady")
        assert (steady["state"], steady["pid"], steady["kid"], steady["restarts"]) == (
            "running", before["steady"]["pid"], before["steady"]["kid"], 0)
        wait_until(lambda: not os.path.exists(os.path.join(mayor.data, "outbox.json")), "the outbox to empty",
                   log=mayor.log)
        heartbeat = json.loads(site.admin.read(f"/machines/{m}/status/mayor.json"))
        assert heartbeat["pids"] == {str(before["steady"]["pid"]): steady["kid"], str(again["pid"]): crasher["kid"]}

        # Connected again: a change to the table is acted on.
        assert site.keg("kill", "once", "-m", m)[0] == 0
        wait_until(lambda: site.status(m, "once") is None, "once to be removed", log=mayor.log)
        assert sorted(mayor.runc_list()) == [mayor.cid("crasher"), mayor.cid("steady")]
        assert start_time(before["steady"]["pid"]) == born["steady"]
    finally:
        mayor.cleanup()


class Churn:
    """Seeded changes to one machine's process table: add, change (a new spec) and remove processes."""

    def __init__(self, site: Site, machine: str, rng: random.Random):
        self.site, self.machine, self.rng = site, machine, rng
        self.procs = f"/machines/{machine}/procs"
        self.desired = {}      # name -> (spec KID, sleep seconds)
        self.removed = set()
        self.first = self.version = 100 * (os.getpid() % 10000 + 1) * 1000  # sleep lengths no other test uses
        self.done = []

    def step(self) -> None:
        absent = [n for n in NAMES if n not in self.desired]
        present = sorted(self.desired)
        # Adds as likely as there are free names, removals as there are processes: the table hovers half full.
        what = self.rng.choice(["add"] * len(absent) + ["remove"] * len(present) + ["change"] * 2 * bool(present))
        if what == "remove":
            name = self.rng.choice(present)
            code, _, err = self.site.keg("kill", name, "-m", self.machine)
            assert code == 0, err
            self.removed.add(name)
            del self.desired[name]
        else:
            name = self.rng.choice(absent if what == "add" else present)
            self.version += 1
            kid = self.site.put(f"{self.procs}/{name}.json", sleeper(self.site, self.version))
            self.desired[name] = (kid, self.version)
            self.removed.discard(name)
        self.done.append((what, name))


def sleep_inits(versions) -> dict:
    """{sleep seconds: [parent pids]} of the processes running ``/bin/sleep N`` for N in ``versions``: the
    parent is the container's init (/dev/init), the pid runc reports."""
    wanted = {str(v).encode() for v in versions}
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if len(argv) >= 2 and argv[0] == b"/bin/sleep" and argv[1] in wanted:
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    parent = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError):
                continue
            found.setdefault(int(argv[1]), []).append(parent)
    return found


def test_mayor_sigkilled_20_times_during_churn_leaves_no_duplicates_or_orphans(site):
    rng = random.Random(SEED)
    mayor = MayorProcess(site, "churn")
    churn = Churn(site, mayor.name, rng)
    try:
        for _ in range(ROUNDS):
            offset = mayor.start()
            for _ in range(rng.randint(0, 2)):   # changes it finds when it starts
                churn.step()
            mayor.wait_ready(offset)
            for _ in range(rng.randint(1, 3)):   # changes it sees through the watch stream
                churn.step()
            time.sleep(rng.uniform(0.0, 1.5))     # a random-but-seeded moment in its reaction
            mayor.kill()
        assert len(churn.desired) >= 2 and churn.removed, churn.done  # the seed makes both cases happen

        offset = mayor.start()
        mayor.wait_ready(offset)
        want = {mayor.cid(n): kid for n, (kid, _) in churn.desired.items()}

        def settled():
            containers = mayor.runc_list()
            if set(containers) != set(want) or any(c["status"] != "running" for c in containers.values()):
                return None
            for name, (kid, _) in churn.desired.items():
                s = site.status(mayor.name, name)
                if not s or s["state"] != "running" or s["spec_kid"] != kid:
                    return None
                if s["pid"] != containers[mayor.cid(name)]["pid"]:
                    return None
            if any(site.status(mayor.name, n) is not None for n in churn.removed):
                return None
            return containers
        containers = wait_until(settled, "the Mayor to settle", log=mayor.log)

        # Exactly one container per desired spec, running that spec; none for removed ones.
        assert sorted(containers) == sorted(want)
        assert mayor.bundles() == sorted(churn.desired)
        for name, (kid, _) in churn.desired.items():
            with open(os.path.join(mayor.data, "containers", name, "meta.json")) as f:
                assert json.load(f)["spec_kid"] == kid
        # One container init per desired spec and none of any earlier or removed spec, whatever runc knows.
        versions = range(churn.first, churn.version + 1)
        inits = sleep_inits(versions)
        assert inits == {version: [containers[mayor.cid(n)]["pid"]] for n, (_, version) in churn.desired.items()}
        # A shim per container and one spare of the running Mayor; none left by the 20 dead ones.
        shims = shim_processes(site.marker)
        spares = [s for s in shims if s["stderr"] == "/dev/null"]
        assert [s["ppid"] for s in spares] == [mayor.proc.pid], shims
        supervising = sorted(s["stderr"] for s in shims if s not in spares)
        assert supervising == sorted(os.path.join(mayor.data, "containers", n, "shim.log") for n in churn.desired)
        # Overlay mounts and cgroups only for the desired processes.
        assert mayor.mounts() == sorted(os.path.join(mayor.data, "containers", n, "rootfs") for n in churn.desired)
        assert {os.path.basename(p) for p in cgroups_of(mayor.name + ".")} == set(want)
        assert "Traceback" not in mayor.log(), mayor.log()[-4000:]
    finally:
        mayor.cleanup()
