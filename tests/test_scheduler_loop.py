"""The scheduler's loop against a real master and three real Mayors (no-op runtime), all separate processes.

``keg master serve`` on loopback, three ``keg mayor run --runtime noop``
(containers are the router's and the container tests' business) and
``keg scheduler run --lease-ttl 3``.  The test acts as an operator through
the installed ``keg`` and reads the namespace as anyone could.

For a 3 s lease the Mayors here refresh their heartbeat every second
(``keg mayor run --heartbeat 1``; 10 s by default), so a test of "dead within
lease TTL + 5 s" takes seconds, not half a minute.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

import keg
from conftest import MasterProcess, init_keg_with_token, keg_command, read_text, stop_waiting, wait_until
from keg.errors import NotFound
from master import auth
from master.client import RemoteKeg

MACHINES = ("m1", "m2", "m3")
LEASE_TTL = 3.0
IMAGE = "K-" + "ab" * 20
IMAGE2 = "K-" + "cd" * 20


class Cluster:
    """A master, a Mayor per machine and the scheduler, each a process with a log."""

    def __init__(self, tmp_path, keg_dir):
        self.tmp = tmp_path
        token = init_keg_with_token(keg_dir)
        with keg.Store(keg_dir) as store:
            self.tokens = {m: auth.add_user(store, m, machine=True) for m in MACHINES}
        self.master = MasterProcess(keg_dir, token)
        self.url, self.token = self.master.url, token
        self.admin = RemoteKeg(self.url, token, timeout=10)
        self.mayors, self.logs = {}, {"master": self.master.log_path}
        self.scheduler = None

    def start_mayor(self, name: str, cpus="2", labels=()) -> None:
        token_file = self.tmp / f"token-{name}"
        token_file.write_text(self.tokens[name] + "\n")
        token_file.chmod(0o600)
        self.logs[name] = str(self.tmp / f"mayor-{name}.log")
        with open(self.logs[name], "a") as log:
            self.mayors[name] = subprocess.Popen(
                [*keg_command(), "mayor", "run", "--heartbeat", "1", "--url", self.url,
                 "--token-file", str(token_file), "--name", name, "--data", str(self.tmp / f"data-{name}"),
                 "--runtime", "noop", "--cpus", cpus, "--memory", "4Gi",
                 "--address", f"127.0.0.{MACHINES.index(name) + 11}", *[f"--label={x}" for x in labels]],
                stdout=log, stderr=subprocess.STDOUT)

    def start_scheduler(self) -> None:
        self.logs["scheduler"] = str(self.tmp / "scheduler.log")
        with open(self.logs["scheduler"], "w") as log:
            self.scheduler = subprocess.Popen([*keg_command(), "scheduler", "run", "--url", self.url, "--token",
                                               self.token, "--lease-ttl", str(LEASE_TTL)],
                                              stdout=log, stderr=subprocess.STDOUT)

    def keg(self, *args, input=None) -> subprocess.CompletedProcess:
        done = subprocess.run([*keg_command(), *args, "--url", self.url, "--token", self.token], input=input,
                              capture_output=True, text=True)
        assert done.returncode == 0, f"keg {' '.join(args)}: {done.stderr}"
        return done

    def log(self) -> str:
        return "".join(f"\n--- {name}\n{read_text(path)[-2500:]}" for name, path in self.logs.items())

    def wait(self, condition, what: str, timeout: float = 20.0):
        return wait_until(condition, what, timeout, log=self.log, poll=0.05)

    def stop(self) -> None:
        for proc in [self.scheduler, *self.mayors.values()]:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in [self.scheduler, *self.mayors.values()]:
            if proc is not None:
                stop_waiting(proc)
        self.admin.close()
        self.master.stop()

    # ------------------------------------------------------- observation

    def snapshot(self) -> dict:
        """Every process table entry with its status, read at one revision: ``{(machine, name): (spec, status)}``."""
        rev = self.admin.revision().number
        out = {}
        try:
            machines = self.admin.list("/machines", rev=rev)
        except NotFound:
            return out  # no Mayor has written its status yet (a slow start): nothing runs
        for m in machines:
            try:
                entries = self.admin.list(f"{m.path}/procs", rev=rev)
            except NotFound:
                continue
            for e in entries:
                spec = json.loads(self.admin.read(e.path, rev=rev))
                try:
                    status = json.loads(self.admin.read(f"{m.path}/status/{e.name}", rev=rev))
                except NotFound:
                    status = None
                if status is not None and status.get("spec_kid") != e.kid:
                    status = None
                out[(m.name, e.name[:-5])] = (spec, status)
        return out

    def replicas(self, job: str, running_only: bool = False) -> dict:
        return {k: v for k, v in self.snapshot().items() if v[0].get("job") == job
                and (not running_only or (v[1] or {}).get("state") == "running")}

    def all_running(self, job: str, count: int):
        """The replicas, when exactly ``count`` exist and every one is running on a live Mayor."""
        reps = self.replicas(job)
        live = {m for m, p in self.mayors.items() if p.poll() is None}
        ok = len(reps) == count and all((st or {}).get("state") == "running" and m in live
                                        for (m, _), (_, st) in reps.items())
        return reps if ok else None

    def service(self, name: str) -> list:
        try:
            text = self.admin.read(f"/services/{name}.tsv").decode()
        except NotFound:
            return []
        return [line.split("\t") for line in text.splitlines() if not line.startswith("#")]


@pytest.fixture
def cluster(tmp_path, keg_dir):
    c = Cluster(tmp_path, keg_dir)
    try:
        yield c
    finally:
        c.stop()


def per_machine(reps: dict) -> list:
    counts = {}
    for machine, _ in reps:
        counts[machine] = counts.get(machine, 0) + 1
    return sorted(counts.values())


def job_file(tmp_path, **fields) -> str:
    obj = {"app": "hello", "type": "web", "image": IMAGE, "release": 1, "replicas": 3, "port": True,
           "service": "hello", "resources": {"cpu": 0.5, "memory": "256Mi"}}
    obj.update(fields)
    path = tmp_path / f"job-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(obj))
    return str(path)


def test_replicas_are_placed_scaled_and_moved_off_a_dead_machine(cluster, tmp_path):
    c = cluster
    for name in MACHINES:
        c.start_mayor(name, labels=["zone=b"] if name == "m3" else ["zone=a"])
    c.start_scheduler()
    for name in MACHINES:
        c.wait(lambda n=name: c.admin.exists(f"/machines/{n}/status/mayor.json"), f"{name}'s heartbeat")

    # Apply: one replica per machine, each with its own port, running, published in /services/hello.tsv.
    c.keg("job", "apply", job_file(tmp_path))
    reps = c.wait(lambda: c.all_running("hello-web", 3), "3 replicas running")
    assert per_machine(reps) == [1, 1, 1]
    for (machine, name), (spec, status) in reps.items():
        assert name.startswith("hello-web-") and len(name) == len("hello-web-") + 5
        assert spec["env"]["PORT"] == str(spec["port"]) and 20000 <= spec["port"] <= 29999
        assert spec["job"] == "hello-web" and spec["release"] == 1 and spec["network"] == "host"
    lines = c.wait(lambda: len(s := c.service("hello")) == 3 and s, "3 endpoints in /services/hello.tsv")
    expected = {(m, f"127.0.0.{MACHINES.index(m) + 11}", str(spec["port"]), st["kid"], "healthy", "hello-web", "1")
                for (m, _), (spec, st) in reps.items()}
    assert {tuple(line) for line in lines} == expected

    # Scale up: spread, then least loaded; capacity (2 cpus a machine, 0.5 each) is never exceeded.
    c.keg("scale", "hello", "web=5")
    reps = c.wait(lambda: c.all_running("hello-web", 5), "5 replicas running")
    assert per_machine(reps) == [1, 2, 2]
    c.keg("scale", "hello-web=14")
    c.wait(lambda: c.all_running("hello-web", 12), "12 replicas (all that fit) running")
    report = c.wait(lambda: (r := json.loads(c.admin.read("/scheduler/jobs/hello-web.json")))["unplaced"] == 2 and r,
                    "the report of 2 unplaced replicas")
    assert "2 replica(s) not placed: none of the 3 machine(s) that fit has 0.5 cpu" in report["problem"]
    assert "job hello-web: 2 replica(s) not placed" in read_text(c.logs["scheduler"])
    for (machine, _), _ in c.replicas("hello-web").items():
        assert sum(0.5 for (m, _) in c.replicas("hello-web") if m == machine) <= 2

    # Constraints: a job for zone b runs on m3 only, the one machine labelled so.
    c.keg("scale", "hello", "web=2")
    c.wait(lambda: c.all_running("hello-web", 2), "scaled down to 2")
    c.keg("job", "apply", "--name", "zoned", job_file(tmp_path, app=None, type=None, port=False, service=None,
                                                      replicas=2, constraints={"labels": {"zone": "b"}}))
    zoned = c.wait(lambda: c.all_running("zoned", 2), "2 zoned replicas running")
    assert {m for m, _ in zoned} == {"m3"}

    # keg job ls.
    rows = {r["job"]: r for r in json.loads(c.keg("job", "ls", "--json").stdout)}
    assert (rows["hello-web"]["wanted"], rows["hello-web"]["running"], rows["hello-web"]["healthy"]) == (2, 2, 2)
    line = next(x for x in c.keg("job", "ls").stdout.splitlines() if x.startswith("hello-web"))
    assert line.split()[:4] == ["hello-web", "2/2/2", "1", IMAGE[:10]]

    # Kill m1's Mayor (after putting a hello-web replica there if the scale-down left none).
    victim = next(iter({m for m, _ in c.replicas("hello-web")} - {"m3"}), "m1")
    lost = {k for k in c.replicas("hello-web") if k[0] == victim}
    c.mayors[victim].kill()
    killed = time.monotonic()
    moved = c.wait(lambda: (r := c.all_running("hello-web", 2)) and not any(m == victim for m, _ in r) and r,
                   f"hello-web running off {victim}", timeout=LEASE_TTL + 5)
    took = time.monotonic() - killed
    assert took <= LEASE_TTL + 5
    for machine, name in lost:
        record = json.loads(c.admin.read(f"/machines/{machine}/evicted/{name}.json"))
        assert record["job"] == "hello-web" and "lease expired" in record["reason"]
        assert record["spec"]["job"] == "hello-web" and record["replaced_by"]
    assert not any(m == victim for m, _ in c.snapshot())
    lines = c.wait(lambda: (s := c.service("hello")) and {x[0] for x in s} == {m for m, _ in moved} and s,
                   "the service to list the moved replicas only")
    assert len(lines) == 2
    assert c.scheduler.poll() is None

    # The machine comes back: nothing moves back to it by itself.
    c.start_mayor(victim)
    c.wait(lambda: c.admin.exists(f"/machines/{victim}/machine.json") and
           json.loads(c.admin.read(f"/machines/{victim}/status/mayor.json"))["heartbeat"] > time.time() - 2,
           f"{victim}'s Mayor back")
    time.sleep(1.5)  # a few scheduler turns: a move would show in this time
    assert set(c.replicas("hello-web")) == set(moved)


def test_a_rolling_update_keeps_the_replicas_running_and_job_rm_removes_them(cluster, tmp_path):
    c = cluster
    for name in MACHINES:
        c.start_mayor(name)
    c.start_scheduler()
    c.keg("job", "apply", job_file(tmp_path))
    old = c.wait(lambda: c.all_running("hello-web", 3), "3 replicas running")
    c.wait(lambda: len(c.service("hello")) == 3, "3 endpoints")

    c.keg("job", "apply", job_file(tmp_path, release=2, image=IMAGE2))
    lowest, most, endpoints = 3, 3, 3
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        snap = {k: v for k, v in c.snapshot().items() if v[0].get("job") == "hello-web"}
        running = [k for k, (_, st) in snap.items() if (st or {}).get("state") == "running"]
        lowest, most = min(lowest, len(running)), max(most, len(snap))
        endpoints = min(endpoints, sum(1 for x in c.service("hello") if x[4] == "healthy"))
        if len(snap) == 3 and len(running) == 3 and all(spec["release"] == 2 for spec, _ in snap.values()):
            break
        time.sleep(0.02)
    else:
        raise AssertionError(f"the update did not finish: {c.log()}")
    assert lowest >= 3, "fewer than 3 replicas were running during the update"
    assert endpoints >= 3, "fewer than 3 healthy endpoints were published during the update"
    assert most <= 4, "more than one replica was added at a time (max_surge 1)"
    new = c.all_running("hello-web", 3)
    assert not set(new) & set(old) and per_machine(new) == [1, 1, 1]
    assert all(spec["image"] == IMAGE2 for spec, _ in new.values())
    c.wait(lambda: {x[6] for x in c.service("hello")} == {"2"} and len(c.service("hello")) == 3,
           "the service to list release 2 only")
    assert "rolling update" in read_text(c.logs["scheduler"])

    c.keg("job", "rm", "hello-web")
    c.wait(lambda: not c.replicas("hello-web"), "the replicas removed")
    c.wait(lambda: not c.admin.exists("/services/hello.tsv"), "the service table removed")
    c.wait(lambda: all(not [e for e in c.admin.list(f"/machines/{m}/status") if e.name.startswith("hello-web")]
                       for m in MACHINES), "the Mayors to stop them")
