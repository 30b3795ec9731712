"""The Mayor's loop against a real master, with the no-op runtime (containers are tested in test_container.py)."""

from __future__ import annotations

import json

import pytest

from conftest import MasterProcess, init_keg_with_token
from keg.transaction import Transaction, delete, put
from master import auth
from master.client import RemoteKeg
from mayor.daemon import Mayor
from mayor.runtime import NoopRuntime


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def cluster(keg_dir, tmp_path):
    token = init_keg_with_token(keg_dir)
    server = MasterProcess(keg_dir, token)
    admin = RemoteKeg(server.url, token)
    machine_token = auth.add_user(admin, "m1", machine=True)
    clock = Clock()
    runtime = NoopRuntime()
    mayor = Mayor(RemoteKeg(server.url, machine_token, timeout=5), "m1", runtime, str(tmp_path / "mayor"),
                  labels={"zone": "a"}, clock=clock)
    yield server, admin, mayor, runtime, clock
    server.stop()


def status(admin, name):
    return json.loads(admin.read(f"/machines/m1/status/{name}.json"))


def test_a_process_table_becomes_processes_and_status(cluster):
    server, admin, mayor, runtime, clock = cluster
    mayor.register()
    machine = json.loads(admin.read("/machines/m1/machine.json"))
    assert machine["kid"].startswith("K-") and machine["labels"] == {"zone": "a"} and machine["cpus"] >= 1
    assert not mayor.step()  # empty table: nothing to do

    admin.apply(Transaction((put("/machines/m1/procs/web.json", '{"image": "K-1", "args": ["serve"]}'),)))
    actions = mayor.step()
    assert [(s.kind, s.name) for s in actions.steps] == [("start", "web")]
    assert runtime.actual()["web"].state == "running"
    assert status(admin, "web")["state"] == "running"
    assert not mayor.step()  # as desired: nothing more

    admin.apply(Transaction((delete("/machines/m1/procs/web.json"),)))
    assert [s.kind for s in mayor.step().steps] == ["stop", "remove"]
    assert runtime.actual() == {}
    assert not admin.exists("/machines/m1/status/web.json")
    assert json.loads(admin.read("/machines/m1/status/mayor.json"))["processes"] == 0


def test_crashes_restart_with_backoff_while_the_master_is_down(cluster):
    server, admin, mayor, runtime, clock = cluster
    admin.apply(Transaction((put("/machines/m1/procs/job.json", '{"image": "K-1", "restart": "on-failure"}'),)))
    mayor.step()
    server.stop()
    runtime.exit("job", 1, clock.now)
    clock.now += 1
    assert not mayor.step()             # from the kept table; first back-off is 10 s
    assert mayor.last_actions.wake_at == pytest.approx(clock.now - 1 + 10)
    clock.now += 10
    assert [s.kind for s in mayor.step().steps] == ["remove", "start"]
    assert runtime.started == 2
    assert mayor.outbox  # status waits for the master

    server.start()
    mayor.keg.close()
    mayor.step()
    job = status(admin, "job")
    assert job["state"] == "running" and job["restarts"] == 1
    assert not mayor.outbox


def test_a_bad_spec_is_reported_and_others_run(cluster):
    server, admin, mayor, runtime, clock = cluster
    admin.apply(Transaction((put("/machines/m1/procs/bad.json", "{not json"),
                             put("/machines/m1/procs/good.json", '{"image": "K-1"}'))))
    mayor.step()
    assert set(runtime.actual()) == {"good"}
    bad = status(admin, "bad")
    assert bad["state"] == "failed" and "not a valid spec" in bad["last_error"]
