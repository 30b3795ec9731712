"""``keg job``, ``keg scale`` and the scheduler's step on a local keg (the loop against a master and Mayors is in
test_scheduler_loop.py)."""

from __future__ import annotations

import json
import subprocess

import pytest
from click.testing import CliRunner

import keg
from conftest import keg_command
from keg.transaction import Transaction, put
from shell import scheduler as sched
from shell.cli import cli

IMAGE = "K-" + "ab" * 20
GI = 1 << 30


def run(keg_dir, *args, input=None):
    return CliRunner().invoke(cli, [*args[:2], "--keg", keg_dir, *args[2:]] if args[0] in ("job", "scheduler")
                              else [args[0], "--keg", keg_dir, *args[1:]], input=input, catch_exceptions=False)


def write_job(tmp_path, name="hello-web", **fields) -> str:
    obj = {"app": "hello", "type": "web", "image": IMAGE, "replicas": 2, "resources": {"cpu": 0.5}}
    obj.update(fields)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(obj))
    return str(path)


def read_json(keg_dir, path):
    with keg.Store(keg_dir) as store:
        return json.loads(store.read(path))


def test_job_apply_checks_writes_and_says_what_happened(new_keg, tmp_path):
    path = write_job(tmp_path, replica=3)
    done = run(new_keg, "job", "apply", path)
    assert done.exit_code == 0, done.output
    name, kid, action, revision = done.stdout.strip().split("\t")
    assert (name, action) == ("hello-web", "created") and kid.startswith("K-")
    assert "field 'replica' is not one the scheduler reads" in done.stderr
    assert read_json(new_keg, "/jobs/hello-web.json")["replicas"] == 2
    again = run(new_keg, "job", "apply", path)
    assert again.stdout.split("\t")[2] == "unchanged"
    changed = run(new_keg, "job", "apply", write_job(tmp_path, replicas=4))
    assert changed.stdout.split("\t")[2] == "updated"
    # From standard input, the name from --name.
    piped = run(new_keg, "job", "apply", "--name", "batch", "-", input=json.dumps({"image": IMAGE, "replicas": 1}))
    assert piped.exit_code == 0 and piped.stdout.startswith("batch\t")


def test_a_bad_job_is_refused_and_nothing_is_written(new_keg, tmp_path):
    with keg.Store(new_keg) as store:
        head = store.revision().number
    for fields, message in (({"replicas": -2}, "job hello-web: replicas must be a whole number"),
                            ({"image": "latest"}, "job hello-web: image 'latest' is not a KID"),
                            ({"constraints": {"labels": {"zone": 1}}}, "constraints.labels: 'zone': 1")):
        done = subprocess.run([*keg_command(), "job", "apply", "--keg", new_keg, write_job(tmp_path, **fields)],
                              capture_output=True, text=True)
        assert done.returncode == 2 and message in done.stderr, done.stderr
    done = subprocess.run([*keg_command(), "job", "apply", "--keg", new_keg, "-"], input="{", capture_output=True,
                          text=True)
    assert done.returncode == 2 and "is not valid JSON" in done.stderr
    with keg.Store(new_keg) as store:
        assert store.revision().number == head


def test_scale_sets_replicas_by_app_and_type_or_by_job(new_keg, tmp_path):
    run(new_keg, "job", "apply", write_job(tmp_path))
    run(new_keg, "job", "apply", write_job(tmp_path, "hello-worker", type="worker", replicas=1))
    done = run(new_keg, "scale", "hello", "web=3", "worker=0")
    assert done.exit_code == 0, done.output
    assert done.stdout.splitlines()[0].split("\t")[:2] == ["hello-web", "2 -> 3"]
    assert read_json(new_keg, "/jobs/hello-web.json")["replicas"] == 3
    assert read_json(new_keg, "/jobs/hello-worker.json")["replicas"] == 0
    assert read_json(new_keg, "/jobs/hello-web.json")["resources"] == {"cpu": 0.5}  # the rest is kept
    assert run(new_keg, "scale", "hello-web=1").exit_code == 0
    assert read_json(new_keg, "/jobs/hello-web.json")["replicas"] == 1
    missing = subprocess.run([*keg_command(), "scale", "--keg", new_keg, "hello", "db=1"], capture_output=True,
                             text=True)
    assert missing.returncode == 1 and "no job hello-db: /jobs/hello-db.json does not exist" in missing.stderr
    for bad in (["hello", "web=x"], ["hello"], ["web=-1"]):
        done = subprocess.run([*keg_command(), "scale", "--keg", new_keg, *bad], capture_output=True, text=True)
        assert done.returncode == 2, (bad, done.stderr)
    assert read_json(new_keg, "/jobs/hello-web.json")["replicas"] == 1


def test_job_ls_and_rm(new_keg, tmp_path):
    run(new_keg, "job", "apply", write_job(tmp_path, release=4))
    with keg.Store(new_keg) as store:
        store.apply(Transaction((put("/jobs/broken.json", "{"),)))
    done = run(new_keg, "job", "ls")
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["JOB", "REPLICAS", "RELEASE", "IMAGE", "NOTE"]
    assert lines[1].split()[:2] == ["broken", "?/0/0"] and "not valid JSON" in lines[1]
    assert lines[2].split() == ["hello-web", "2/0/0", "4", IMAGE[:10]]
    rows = json.loads(run(new_keg, "job", "ls", "--json").stdout)
    assert rows[1]["job"] == "hello-web" and rows[1]["wanted"] == 2 and rows[1]["replicas"] == []
    done = run(new_keg, "job", "rm", "hello-web", "broken")
    assert done.exit_code == 0 and "removed job hello-web" in done.stdout
    assert run(new_keg, "job", "ls", "--json").stdout.strip() == "[]"
    gone = subprocess.run([*keg_command(), "job", "rm", "--keg", new_keg, "hello-web"], capture_output=True,
                          text=True)
    assert gone.returncode == 1


class Clock:
    def __init__(self):
        self.now = 50_000.0

    def __call__(self):
        return self.now


def register(store, name, now, cpus=2, labels=None, address="127.0.0.1"):
    machine = {"name": name, "cpus": cpus, "memory": 4 * GI, "labels": labels or {}, "address": address}
    store.apply(Transaction((put(f"/machines/{name}/machine.json", json.dumps(machine)),
                             put(f"/machines/{name}/status/mayor.json", json.dumps({"heartbeat": now})))))


def report_running(store, machine=None):
    """Play the Mayors: every spec in a table gets a running status (with an endpoint when it has a port)."""
    ops = []
    for m in store.list("/machines"):
        if machine and m.name != machine:
            continue
        try:
            entries = store.list(f"{m.path}/procs")
        except keg.NotFound:
            continue
        for e in entries:
            spec = json.loads(store.read(e.path))
            status = {"state": "running", "spec_kid": e.kid, "kid": "K-" + "7" * 40, "health": None}
            if "port" in spec:
                status["endpoint"] = f"10.1.0.{m.name[1:]}:{spec['port']}"
            ops.append(put(f"{m.path}/status/{e.name}", json.dumps(status)))
    if ops:
        store.apply(Transaction(tuple(ops)))


def table(store) -> dict:
    out = {}
    for m in store.list("/machines"):
        try:
            out[m.name] = sorted(e.name[:-5] for e in store.list(f"{m.path}/procs"))
        except keg.NotFound:
            out[m.name] = []
    return out


def test_a_step_on_a_local_keg_places_evicts_and_publishes(store):
    clock = Clock()
    for name in ("m1", "m2", "m3"):
        register(store, name, clock.now)
    job = {"image": IMAGE, "replicas": 3, "port": True, "service": "hello", "release": 1,
           "resources": {"cpu": 0.5}}
    store.apply(Transaction((put("/jobs/hello-web.json", json.dumps(job)),)))
    scheduler = sched.Scheduler(store, lease_ttl=10, clock=clock, log=lambda line: None)
    decision = scheduler.step()
    assert len(decision.placements) == 3
    assert {m: len(names) for m, names in table(store).items()} == {"m1": 1, "m2": 1, "m3": 1}
    spec = json.loads(store.read(f"/machines/m1/procs/{table(store)['m1'][0]}.json"))
    port = spec["port"]
    assert 20000 <= port <= 29999 and spec["env"] == {"PORT": str(port)} and spec["job"] == "hello-web"
    assert store.read("/services/hello.tsv") == sched.SERVICE_HEADER.encode()  # nothing running yet
    assert not scheduler.step()  # as desired: nothing to do, nothing written
    head = store.revision().number
    scheduler.step()
    assert store.revision().number == head

    report_running(store)
    scheduler.step()
    lines = store.read("/services/hello.tsv").decode().splitlines()[1:]
    ports = {m: json.loads(store.read(f"/machines/{m}/procs/{names[0]}.json"))["port"]
             for m, names in table(store).items()}
    assert sorted(line.split("\t")[:3] for line in lines) == [
        ["m1", "10.1.0.1", str(ports["m1"])], ["m2", "10.1.0.2", str(ports["m2"])], ["m3", "10.1.0.3", str(ports["m3"])]]
    report = json.loads(store.read("/scheduler/jobs/hello-web.json"))
    assert report["placed"] == 3 and report["problem"] is None

    # m3 stops sending heartbeats: after the lease its replica is evicted and placed again.
    lost = table(store)["m3"][0]
    clock.now += 11
    for name in ("m1", "m2"):
        register(store, name, clock.now)
    decision = scheduler.step()
    assert [e.name for e in decision.evictions] == [lost] and len(decision.placements) == 1
    assert table(store)["m3"] == [] and sum(len(v) for v in table(store).values()) == 3
    record = json.loads(store.read(f"/machines/m3/evicted/{lost}.json"))
    assert record["job"] == "hello-web" and "lease expired" in record["reason"] and record["time"] == clock.now
    lines = store.read("/services/hello.tsv").decode().splitlines()[1:]
    assert len(lines) == 2 and not any(line.startswith("m3\t") for line in lines)

    # A concurrent writer wins: the step writes nothing and the next one decides again.
    store.apply(Transaction((put("/jobs/hello-web.json", json.dumps({**job, "replicas": 2})),)))
    real_apply = store.apply

    def racing(tx):  # someone edits every entry just before the scheduler's transaction arrives
        store.apply = real_apply
        edits = [put(f"/machines/{m}/procs/{n}.json", json.dumps({**json.loads(store.read(
            f"/machines/{m}/procs/{n}.json")), "note": "edited"})) for m, names in table(store).items() for n in names]
        real_apply(Transaction(tuple(edits)))
        return real_apply(tx)

    store.apply = racing
    assert not scheduler.step()
    assert sum(len(v) for v in table(store).values()) == 3
    assert len(scheduler.step().removals) == 1
    assert sum(len(v) for v in table(store).values()) == 2


def test_scheduler_run_once_is_the_installed_command(new_keg, tmp_path):
    with keg.Store(new_keg) as store:
        import time
        register(store, "m1", time.time())
    run(new_keg, "job", "apply", write_job(tmp_path, replicas=1))
    done = subprocess.run([*keg_command(), "scheduler", "run", "--keg", new_keg, "--once"], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert "keg scheduler: place hello-web-" in done.stdout and "on m1: scaling up" in done.stdout
    bad = subprocess.run([*keg_command(), "scheduler", "run", "--keg", new_keg, "--once", "--ports", "9-2"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "give LOW-HIGH" in bad.stderr


def test_after_losing_the_master_leases_count_from_its_return(store):
    from master.client import Unreachable
    clock = Clock()
    for name in ("m1", "m2"):
        register(store, name, clock.now)
    store.apply(Transaction((put("/jobs/web.json", json.dumps({"image": IMAGE, "replicas": 2})),)))
    scheduler = sched.Scheduler(store, lease_ttl=10, clock=clock, log=lambda line: None)
    assert len(scheduler.step().placements) == 2

    def unreachable(*args, **kwargs):
        raise Unreachable("cannot reach the master")

    store.revision = unreachable
    clock.now += 100  # no heartbeat arrives while the master is away
    with pytest.raises(Unreachable):
        scheduler.step()
    del store.revision
    assert not scheduler.step().evictions  # the heartbeats are old, but so is everything the master held
    clock.now += 11
    assert len(scheduler.step().evictions) == 2
