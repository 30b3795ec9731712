"""The Mayor's loop against a real master, with the no-op runtime (containers are tested in test_container.py)."""

from __future__ import annotations

import json
import os

import pytest

import kid as kidlib

from conftest import MasterProcess, init_keg_with_token
from keg.transaction import Transaction, delete, put
from master import auth
from master.client import RemoteKeg
from mayor.daemon import Mayor
from mayor.runtime import NoopRuntime
from mayor.statefile import StateFile


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
    # Asked to stop; a runtime that stopped it at once lets the same step go on to remove it.
    assert [s.kind for s in mayor.step().steps] == ["stop", "remove"]
    assert not mayor.step()
    assert runtime.actual() == {}
    assert not admin.exists("/machines/m1/status/web.json")
    assert json.loads(admin.read("/machines/m1/status/mayor.json"))["processes"] == 0


def test_a_changed_spec_is_replaced_in_one_step_and_one_status_write(cluster):
    """With a runtime whose stop finishes at once the replacement starts in the same step: one status write
    (one revision), not two, which is what 1,000 Mayors converging on one change costs the master."""
    server, admin, mayor, runtime, clock = cluster
    mayor.register()
    admin.apply(Transaction((put("/machines/m1/procs/web.json", '{"image": "K-1", "args": ["v1"]}'),)))
    mayor.step()
    first = status(admin, "web")
    admin.apply(Transaction((put("/machines/m1/procs/web.json", '{"image": "K-1", "args": ["v2"]}'),)))
    head = admin.revision().number
    assert [s.kind for s in mayor.step().steps] == ["stop", "remove", "start"]
    now = status(admin, "web")
    assert (now["state"], now["spec_kid"]) == ("running", admin.kid("/machines/m1/procs/web.json"))
    assert now["kid"] != first["kid"] and now["previous"]["kid"] == first["kid"]
    assert admin.revision().number == head + 1
    assert not mayor.step()


def test_a_mayor_restarted_while_the_master_is_away_runs_the_table_it_kept(cluster, tmp_path):
    """The last table read is kept in DATA/state.json: a Mayor started again (on a machine whose containers
    are gone) with the master down starts what it was told. A data directory of an earlier version, with the
    table in DATA/desired.json, is read too."""
    server, admin, mayor, runtime, clock = cluster
    mayor.register()
    admin.apply(Transaction((put("/machines/m1/procs/web.json", '{"image": "K-1", "args": ["serve"]}'),)))
    mayor.step()
    kid = admin.kid("/machines/m1/procs/web.json")
    server.stop()
    data = mayor.data_dir
    kept = StateFile(os.path.join(data, "state.json")).load()["desired"]
    assert kept == {"web": {"kid": kid, "spec": {"image": "K-1", "args": ["serve"]}}}
    for where in (data, str(tmp_path / "old")):
        if where != data:  # as an earlier version left it
            os.makedirs(where)
            with open(os.path.join(where, "desired.json"), "w", encoding="utf-8") as f:
                json.dump(kept, f)
        again = Mayor(RemoteKeg(mayor.keg.urls[0], mayor.keg.token, timeout=1), "m1", NoopRuntime(), where,
                      clock=clock)
        assert [(s.kind, s.name, s.spec_kid) for s in again.step().steps] == [("start", "web", kid)]
        assert again.runtime.actual()["web"].state == "running"


def test_registration_keeps_what_others_wrote_and_processes_with_a_port_publish_an_endpoint(cluster, tmp_path):
    server, admin, mayor, runtime, clock = cluster
    mayor.register()
    path = "/machines/m1/machine.json"
    machine = json.loads(admin.read(path))
    assert machine["address"] == "127.0.0.1"
    machine["unschedulable"] = True                     # as drain-machine marks it
    admin.apply(Transaction((put(path, json.dumps(machine)),)))
    again = Mayor(mayor.keg, "m1", runtime, str(tmp_path / "mayor2"), address="10.0.0.7", cpus=1.5,
                  memory=1 << 30, clock=clock)
    again.register()
    machine = json.loads(admin.read(path))
    assert machine["unschedulable"] is True
    assert (machine["address"], machine["cpus"], machine["memory"]) == ("10.0.0.7", 1.5, 1 << 30)

    spec = {"image": "K-1", "port": 20001, "env": {"PORT": "20001"}, "health": {"http": {"path": "/ok"}}}
    admin.apply(Transaction((put("/machines/m1/procs/web.json", json.dumps(spec)),
                             put("/machines/m1/procs/bg.json", '{"image": "K-1"}'))))
    again.step()
    assert status(admin, "web")["endpoint"] == "10.0.0.7:20001"
    assert status(admin, "bg")["endpoint"] is None


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


def test_status_names_each_incarnation_by_its_process_kid(cluster):
    server, admin, mayor, runtime, clock = cluster
    admin.apply(Transaction((put("/machines/m1/procs/job.json", '{"image": "K-1", "restart": "always"}'),)))
    mayor.step()
    first = status(admin, "job")
    spec_kid = admin.stat("/machines/m1/procs/job.json").kid
    assert first["kid"] == str(kidlib.process_kid(kidlib.machine_kid("m1"), "job", spec_kid, 0))
    assert first["previous"] is None and first["spec_kid"] == spec_kid and first["image"] == "K-1"

    runtime.exit("job", 3, clock.now)
    clock.now += 11
    mayor.step()
    second = status(admin, "job")
    assert second["kid"] == str(kidlib.process_kid(kidlib.machine_kid("m1"), "job", spec_kid, 1))
    assert second["previous"]["kid"] == first["kid"] and second["previous"]["exit_code"] == 3
    heartbeat = json.loads(admin.read("/machines/m1/status/mayor.json"))
    assert heartbeat["pids"] == {} and heartbeat["in_use"]["processes"] == 1  # the no-op runtime has no pids


def test_incarnations_and_failures_survive_a_restart_of_the_mayor(cluster, tmp_path):
    server, admin, mayor, runtime, clock = cluster
    admin.apply(Transaction((put("/machines/m1/procs/job.json", '{"image": "K-1", "restart": "always"}'),)))
    mayor.step()
    runtime.exit("job", 1, clock.now)
    clock.now += 1
    mayor.step()  # counts the failure, holds for the back-off
    again = Mayor(mayor.keg, "m1", runtime, str(tmp_path / "mayor"), clock=clock)
    assert again.failures == {"job": 1}
    clock.now += 10
    again.step()
    assert status(admin, "job")["kid"].endswith(
        str(kidlib.process_kid(kidlib.machine_kid("m1"), "job", admin.stat("/machines/m1/procs/job.json").kid, 1))[2:])


def test_the_heartbeat_keeps_its_phase_when_a_change_is_sent_between_beats(cluster):
    """mayor.json goes out on a change (with a fresh heartbeat) and every heartbeat interval; a change does not
    move the periodic beat, so machines changed together do not beat together ever after."""
    server, admin, mayor, runtime, clock = cluster
    start = clock.now
    mayor.register()
    mayor.step()
    beats = []
    for second in range(1, 41):
        clock.now = start + second
        if second == 13:  # a process with resources: in_use changes, mayor.json is sent at once
            admin.apply(Transaction((put("/machines/m1/procs/web.json",
                                         '{"image": "K-1", "resources": {"cpu": 0.5}}'),)))
            mayor._table_dirty.set()
            mayor.step()
        mayor.tick()
        sent = json.loads(admin.read("/machines/m1/status/mayor.json"))["heartbeat"] - start
        if not beats or sent != beats[-1]:
            beats.append(sent)
    assert 13 in beats, beats
    periodic = [b for b in beats if b != 13]
    assert 5 <= periodic[1] <= 10 and [b - a for a, b in zip(periodic[1:], periodic[2:])] == [10] * (len(periodic) - 2), beats


def test_an_idle_step_writes_nothing(cluster):
    server, admin, mayor, runtime, clock = cluster
    admin.apply(Transaction((put("/machines/m1/procs/web.json", '{"image": "K-1"}'),)))
    mayor.step()
    head = admin.revision().number
    clock.now += 1
    mayor.step()
    mayor.tick()
    assert admin.revision().number == head  # nothing changed: no commit
    clock.now += 11
    mayor.tick()
    assert admin.revision().number == head + 1  # the heartbeat is due
    assert json.loads(admin.read("/machines/m1/status/mayor.json"))["heartbeat"] == clock.now


def test_output_is_published_as_a_bounded_tail(cluster):
    server, admin, mayor, runtime, clock = cluster
    admin.apply(Transaction((put("/machines/m1/procs/web.json", '{"image": "K-1"}'),)))
    mayor.step()
    runtime.write_log("web", b"hello\n")
    mayor.tick()
    assert admin.read("/machines/m1/status/logs/web.log") == b"hello\n"
    assert status(admin, "web")["log_bytes"] == 6
    runtime.write_log("web", b"x" * (70 << 10))
    mayor.tick()
    tail = admin.read("/machines/m1/status/logs/web.log")
    assert len(tail) == 64 << 10 and set(tail) == {ord("x")}
    assert status(admin, "web")["log_bytes"] == 6 + (70 << 10)
    admin.apply(Transaction((delete("/machines/m1/procs/web.json"),)))
    mayor.step()  # stop
    mayor.step()  # remove
    assert not admin.exists("/machines/m1/status/logs/web.log") and not admin.exists("/machines/m1/status/web.json")


def test_exec_requests_are_carried_out_and_answered(cluster):
    server, admin, mayor, runtime, clock = cluster
    admin.apply(Transaction((put("/machines/m1/procs/web.json", '{"image": "K-1"}'),)))
    mayor.step()
    admin.apply(Transaction((put("/machines/m1/exec/x-1.json", '{"proc": "web", "args": ["echo", "hi"]}'),
                             put("/machines/m1/exec/x-2.json", '{"proc": "nope", "args": ["true"]}'),
                             put("/machines/m1/exec/x-3.json", '{"proc": "web", "args": []}'))))
    mayor.step()
    ok = json.loads(admin.read("/machines/m1/status/exec/x-1.json"))
    assert ok["state"] == "exited" and ok["exit_code"] == 0 and ok["output"] == "echo hi\n"
    missing = json.loads(admin.read("/machines/m1/status/exec/x-2.json"))
    assert missing["state"] == "failed" and "nope is not running" in missing["error"]
    bad = json.loads(admin.read("/machines/m1/status/exec/x-3.json"))
    assert bad["state"] == "failed" and "args must be a non-empty list" in bad["error"]

    admin.apply(Transaction(tuple(delete(f"/machines/m1/exec/x-{i}.json") for i in (1, 2, 3))))
    mayor.step()
    assert not admin.exists("/machines/m1/status/exec/x-1.json")
    assert not admin.exists("/machines/m1/status/exec/x-2.json")


class Refusing(NoopRuntime):
    """Refuses to start one process, as a runtime does with an unknown image."""

    def start(self, name, spec_kid, spec, process_kid=None, incarnation=0, now=0.0):
        if name == "bad":
            from keg.errors import NotFound
            self.refused = getattr(self, "refused", 0) + 1
            raise NotFound("image K-0000 is not in /oci-images")
        return super().start(name, spec_kid, spec, process_kid, incarnation, now)


def test_a_failed_start_backs_off_and_is_retried(keg_dir, tmp_path):
    token = init_keg_with_token(keg_dir)
    server = MasterProcess(keg_dir, token)
    try:
        admin = RemoteKeg(server.url, token)
        clock, runtime = Clock(), Refusing()
        mayor = Mayor(RemoteKeg(server.url, token), "m1", runtime, str(tmp_path / "m"), clock=clock)
        admin.apply(Transaction((put("/machines/m1/procs/bad.json", '{"image": "K-0000"}'),)))
        mayor.step()
        assert runtime.refused == 1 and "not in /oci-images" in status(admin, "bad")["last_error"]
        clock.now += 5
        mayor.step()
        assert runtime.refused == 1                      # held: the first back-off is 10 s
        assert mayor.last_actions.wake_at == pytest.approx(1010.0)
        clock.now += 5
        mayor.step()
        assert runtime.refused == 2                      # tried again; now 20 s
        clock.now += 19
        mayor.step()
        assert runtime.refused == 2 and status(admin, "bad")["state"] == "failed"
        admin.apply(Transaction((put("/machines/m1/procs/bad.json", '{"image": "K-0001"}'),)))
        mayor.step()
        assert runtime.refused == 3                      # a new spec is tried at once
    finally:
        server.stop()
