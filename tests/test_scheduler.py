"""The scheduler's placement (a pure function), its job checks and service tables: table and property tests.

``place`` is fed builders (``machine``, ``job``) and its decisions are
carried out by ``settle``, which plays the Mayors: a new replica is running
(and healthy, unless told otherwise) at the next turn.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from shell import scheduler as sched
from shell.scheduler import InvalidJob, JobError, Machine, Proc, check_job, decision_transaction, place, \
    service_tables

NOW = 10_000.0
GI = 1 << 30
MI = 1 << 20
IMAGE = "K-" + "ab" * 20
IMAGE2 = "K-" + "cd" * 20


def machine(name: str, cpus=2, memory=4 * GI, labels=None, heartbeat=NOW, **extra) -> Machine:
    return Machine(name, float(cpus), memory, dict(labels or {}), extra.pop("address", "127.0.0.1"), heartbeat,
                   **extra)


def machines(*items) -> dict:
    return {m.name: m for m in items}


def job(name="web", **overrides):
    obj = {"image": IMAGE, "replicas": 1, "resources": {"cpu": 0.5, "memory": 256 * MI}}
    obj.update(overrides)
    return check_job(name, obj)


def jobs(*items) -> dict:
    return {j.name: j for j in items}


def fake_kid(spec: dict) -> str:
    return "K-" + hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def running(proc: Proc, health=None) -> Proc:
    status = {"state": "running", "spec_kid": proc.kid, "health": health, "kid": "K-" + "9" * 40}
    return Proc(proc.machine, proc.name, proc.kid, proc.spec, status)


def hand_written(machine_name: str, name: str, **spec) -> Proc:
    return Proc(machine_name, name, fake_kid(spec), spec, None)


def settle(decision, procs, health=None) -> list:
    """Carry out a decision as the Mayors would: removed entries go, new ones run (``health``)."""
    gone = {(r.machine, r.name) for r in decision.removals} | {(e.machine, e.name) for e in decision.evictions}
    out = [p for p in procs if (p.machine, p.name) not in gone]
    for p in decision.placements:
        out.append(running(Proc(p.machine, p.name, fake_kid(p.spec), p.spec), health))
    return out


def on(procs, job_name=None) -> dict:
    """``{machine: count}`` of replicas (of one job)."""
    out = {}
    for p in procs:
        if job_name is None or p.job == job_name:
            out[p.machine] = out.get(p.machine, 0) + 1
    return out


def converge(js, ms, procs=(), turns=10, now=NOW):
    procs = list(procs)
    for _ in range(turns):
        decision = place(js, ms, procs, now)
        if not decision:
            return procs, decision
        procs = settle(decision, procs)
    raise AssertionError("did not converge")


# ---------------------------------------------------------------- tables


def test_nothing_to_schedule_changes_nothing():
    decision = place({}, machines(machine("m1")), [], NOW)
    assert not decision and decision.reports == {}


def test_everything_as_desired_does_nothing():
    js, ms = jobs(job(replicas=3)), machines(machine("m1"), machine("m2"))
    procs, _ = converge(js, ms)
    again = place(js, ms, procs, NOW + 5)
    assert not again and again.placements == again.removals == again.evictions == ()
    assert again.reports["web"]["placed"] == 3 and again.reports["web"]["problem"] is None


def test_replicas_spread_over_machines_then_go_to_the_least_loaded():
    ms = machines(machine("m1"), machine("m2"), machine("m3"))
    decision = place(jobs(job(replicas=3)), ms, [], NOW)
    assert on(settle(decision, [])) == {"m1": 1, "m2": 1, "m3": 1}

    busy = [hand_written("m1", "db", image=IMAGE, resources={"cpu": 1.5})]
    decision = place(jobs(job(replicas=5)), ms, busy, NOW)
    assert on(settle(decision, []), "web") == {"m1": 1, "m2": 2, "m3": 2}


def test_without_spread_replicas_go_to_the_least_loaded_machine():
    ms = machines(machine("m1", cpus=4), machine("m2", cpus=4))
    busy = [hand_written("m1", "db", image=IMAGE, resources={"cpu": 3})]
    decision = place(jobs(job(replicas=3, spread=False)), ms, busy, NOW)
    assert on(settle(decision, []), "web") == {"m2": 3}


def test_label_constraints_are_honoured_and_an_impossible_job_is_reported():
    ms = machines(machine("m1", labels={"zone": "a"}), machine("m2", labels={"zone": "b"}),
                  machine("m3", labels={"zone": "b", "disk": "ssd"}))
    decision = place(jobs(job(replicas=4, constraints={"labels": {"zone": "b"}})), ms, [], NOW)
    assert on(settle(decision, [])) == {"m2": 2, "m3": 2}

    decision = place(jobs(job(replicas=2, constraints={"labels": {"zone": "c"}})), ms, [], NOW)
    assert not decision.placements
    assert decision.reports["web"]["unplaced"] == 2
    assert "no live, schedulable machine has the labels zone=c" in decision.reports["web"]["problem"]


def test_no_machine_is_overcommitted_and_what_does_not_fit_is_reported():
    ms = machines(machine("m1", cpus=1, memory=GI), machine("m2", cpus=1, memory=GI))
    decision = place(jobs(job(replicas=5, resources={"cpu": 0.5, "memory": 256 * MI})), ms, [], NOW)
    assert on(settle(decision, [])) == {"m1": 2, "m2": 2}
    report = decision.reports["web"]
    assert report["placed"] == 4 and report["unplaced"] == 1
    assert report["problem"] == ("1 replica(s) not placed: none of the 2 machine(s) that fit has 0.5 cpu and "
                                 "268435456 bytes of memory free")

    # Memory binds too, and entries written by hand count.
    hand = [hand_written("m1", "cache", image=IMAGE, resources={"memory": "900Mi"})]
    decision = place(jobs(job(replicas=4, resources={"cpu": 0.1, "memory": 256 * MI})), ms, hand, NOW)
    assert on(settle(decision, []), "web") == {"m2": 4}


def test_ports_are_unique_per_machine_and_published_as_PORT():
    ms = machines(machine("m1", cpus=8))
    hand = [hand_written("m1", "legacy", image=IMAGE, port=20000)]
    decision = place(jobs(job(replicas=3, port=True, env={"A": "1"}), job("api", replicas=1, port=True,
                                                                           service="web-api")),
                     ms, hand, NOW, ports=(20000, 20010))
    specs = {p.name: p.spec for p in decision.placements}
    ports = sorted(s["port"] for s in specs.values())
    assert len(set(ports)) == 4 and all(20001 <= p <= 20010 for p in ports)   # 20000 is the hand-written one's
    for spec in specs.values():
        assert spec["env"]["PORT"] == str(spec["port"]) and spec["network"] == "host"
        assert spec["job"] in ("web", "api") and spec["service"] == ("web-api" if spec["job"] == "api" else "web")
    web = next(s for s in specs.values() if s["job"] == "web")
    assert web["env"]["A"] == "1" and web["image"] == IMAGE

    # A full port range is a reason, not a crash.
    decision = place(jobs(job(replicas=2, port=True, resources={})), ms, hand, NOW, ports=(20000, 20001))
    assert len(decision.placements) == 1 and "no free port" in decision.reports["web"]["problem"]


def test_a_new_replica_rarely_gets_the_port_of_the_one_it_replaces():
    # The old process may still be stopping when its replacement starts on the same machine.
    ms = machines(machine("m1", cpus=8))
    ports = []
    procs, _ = converge(jobs(job(replicas=1, port=True, release=1)), ms)
    for release in range(2, 12):
        before = procs[0].spec["port"]
        procs, _ = converge(jobs(job(replicas=1, port=True, release=release)), ms, [running(p) for p in procs])
        ports.append((before, procs[0].spec["port"]))
    assert sum(a == b for a, b in ports) <= 1, ports


def test_replica_names_are_job_and_five_hex_digits_unique_and_never_taken():
    ms = machines(machine("m1", cpus=64))
    decision = place(jobs(job(replicas=40, resources={"cpu": 0.1})), ms, [], NOW)
    names = [p.name for p in decision.placements]
    assert len(set(names)) == 40
    assert all(n.startswith("web-") and len(n) == 9 and int(n[4:], 16) >= 0 for n in names)
    procs = settle(decision, [])
    decision = place(jobs(job(replicas=80, resources={"cpu": 0.1})), ms, procs, NOW)  # the same `now`
    assert not set(p.name for p in decision.placements) & set(names)


def test_a_dead_machine_s_replicas_are_evicted_and_placed_elsewhere():
    ms = machines(machine("m1"), machine("m2"), machine("m3"))
    js = jobs(job(replicas=3))
    procs, _ = converge(js, ms)
    dead = machines(machine("m1", heartbeat=NOW - 31), machine("m2"), machine("m3"))
    decision = place(js, dead, procs, NOW, lease_ttl=30)
    assert [(e.machine, e.job) for e in decision.evictions] == [("m1", "web")]
    assert "m1's lease expired: last heartbeat 31.0 s ago, lease 30 s" in decision.evictions[0].why
    assert [p.machine for p in decision.placements] != ["m1"] and len(decision.placements) == 1
    assert on(settle(decision, procs)) == {"m2": 2, "m3": 1} or on(settle(decision, procs)) == {"m2": 1, "m3": 2}
    # Hand-written entries on a dead machine are people's: left alone.
    hand = [hand_written("m1", "mine", image=IMAGE)]
    assert not place({}, dead, hand, NOW).evictions
    # A machine just inside its lease is alive.
    assert not place(js, machines(machine("m1", heartbeat=NOW - 29), machine("m2"), machine("m3")), procs, NOW)


def test_a_machine_that_comes_back_gets_only_new_placements():
    ms = machines(machine("m1"), machine("m2"))
    js = jobs(job(replicas=2))
    procs, _ = converge(js, ms)
    procs, _ = converge(js, machines(machine("m1", heartbeat=NOW - 100), machine("m2")), procs)
    assert on(procs) == {"m2": 2}
    back = machines(machine("m1"), machine("m2"))
    assert not place(js, back, procs, NOW)  # no churn: nothing moves back
    decision = place(jobs(job(replicas=3)), back, procs, NOW)
    assert [p.machine for p in decision.placements] == ["m1"]


def test_an_unschedulable_machine_gets_nothing_new_and_is_drained_one_replica_at_a_time():
    js = jobs(job(replicas=2, update={"max_surge": 1}))
    procs = settle(place(js, machines(machine("m1"), machine("m2")), [], NOW), [])
    assert on(procs) == {"m1": 1, "m2": 1}
    drained = machines(machine("m1", unschedulable=True), machine("m2"), machine("m3"))
    decision = place(js, drained, procs, NOW)
    assert not decision.removals and [p.machine for p in decision.placements] == ["m3"]  # a new one first
    procs = settle(decision, procs)
    decision = place(js, drained, procs, NOW)
    assert [(r.machine, r.why) for r in decision.removals] == [("m1", "machine m1 is unschedulable (drain)")]
    procs = settle(decision, procs)
    assert on(procs) == {"m2": 1, "m3": 1} and not place(js, drained, procs, NOW)


def test_scaling_down_lets_unhealthy_and_doubled_up_replicas_go_first():
    ms = machines(machine("m1", cpus=8), machine("m2", cpus=8))
    js = jobs(job(replicas=4))
    procs, _ = converge(js, ms)
    sick = next(p for p in procs if p.machine == "m1")
    procs = [running(p, "unhealthy") if p is sick else p for p in procs]
    decision = place(jobs(job(replicas=2)), ms, procs, NOW)
    removed = {r.name for r in decision.removals}
    assert sick.name in removed and len(removed) == 2
    assert on(settle(decision, procs)) == {"m1": 1, "m2": 1}
    assert all(r.why == "scaled down" for r in decision.removals)


def test_scaling_down_keeps_the_rest_spread():
    ms = machines(machine("m1", cpus=8), machine("m2", cpus=8), machine("m3", cpus=8))
    procs, _ = converge(jobs(job(replicas=12)), ms)
    assert on(procs) == {"m1": 4, "m2": 4, "m3": 4}
    for keep, spread in ((3, [1, 1, 1]), (5, [1, 2, 2]), (1, [1])):
        decision = place(jobs(job(replicas=keep)), ms, procs, NOW)
        assert sorted(on(settle(decision, procs)).values()) == spread


def test_a_removed_job_s_replicas_are_removed_and_an_invalid_job_s_are_kept():
    ms = machines(machine("m1"))
    procs, _ = converge(jobs(job(replicas=2)), ms)
    decision = place({}, ms, procs, NOW)
    assert sorted(r.why for r in decision.removals) == ["job web was removed"] * 2
    broken = {"web": InvalidJob("web", "job web: replicas must be a whole number")}
    decision = place(broken, ms, procs, NOW)
    assert not decision
    assert decision.reports["web"]["error"] == "job web: replicas must be a whole number"
    assert len(decision.reports["web"]["replicas"]) == 2


def test_existing_replicas_stay_where_they_are_when_machines_join():
    procs, _ = converge(jobs(job(replicas=4)), machines(machine("m1", cpus=4)))
    more = machines(machine("m1", cpus=4), machine("m2", cpus=4), machine("m3", cpus=4))
    assert not place(jobs(job(replicas=4)), more, procs, NOW)


def test_a_rolling_update_keeps_the_wanted_replicas_healthy_at_every_step():
    ms = machines(machine("m1"), machine("m2"), machine("m3"))
    procs, _ = converge(jobs(job(replicas=3, release=1)), ms)
    js = jobs(job(replicas=3, release=2, image=IMAGE2, update={"max_surge": 1}))
    seen_total = []
    for turn in range(20):
        procs = [running(p) for p in procs]  # what was started last turn is healthy now
        decision = place(js, ms, procs, NOW + turn)
        if not decision:
            break
        assert len(decision.placements) <= 1  # max_surge 1
        procs = settle(decision, procs, health="starting")
        healthy = [p for p in procs if sched.replica_health(p) == "healthy"]
        assert len(healthy) >= 3, f"turn {turn}: only {len(healthy)} healthy"
        seen_total.append(len(procs))
    assert max(seen_total) <= 4
    assert {p.spec["release"] for p in procs} == {2} and len(procs) == 3
    assert {p.spec["image"] for p in procs} == {IMAGE2}
    assert on(procs) == {"m1": 1, "m2": 1, "m3": 1}


def test_a_job_with_an_empty_env_and_a_port_converges():
    # A release writes "env": {} for an app without config; its replicas carry env {"PORT": …}.
    ms = machines(machine("m1"))
    for release in (1, 2):
        js = jobs(job(replicas=1, release=release, env={}, port=True, image=IMAGE if release == 1 else IMAGE2))
        procs, _ = converge(js, ms, procs if release == 2 else ())
        procs = [running(p) for p in procs]
        assert not place(js, ms, procs, NOW + 1), "the current replica was replaced again"
        assert [p.spec["release"] for p in procs] == [release]


def test_an_update_whose_new_replicas_never_get_healthy_keeps_the_old_ones():
    ms = machines(machine("m1"), machine("m2"))
    procs, _ = converge(jobs(job(replicas=2, release=1)), ms)
    js = jobs(job(replicas=2, release=2))
    for turn in range(5):
        decision = place(js, ms, procs, NOW + turn)
        procs = settle(decision, [running(p, p.status.get("health")) for p in procs], health="unhealthy")
    assert sorted(p.spec["release"] for p in procs) == [1, 1, 2]
    assert "rolling update: waiting for web-" in place(js, ms, procs, NOW + 9).reports["web"]["problem"]


def test_an_update_without_room_for_a_new_replica_replaces_an_old_one_in_place():
    ms = machines(machine("m1", cpus=1), machine("m2", cpus=1))
    procs, _ = converge(jobs(job(replicas=2, release=1, resources={"cpu": 1})), ms)
    js = jobs(job(replicas=2, release=2, resources={"cpu": 1}))
    decision = place(js, ms, procs, NOW)
    assert not decision.placements and len(decision.removals) == 1
    assert "no room for a new replica beside it" in decision.removals[0].why
    procs, _ = converge(js, ms, procs)
    assert sorted(p.spec["release"] for p in procs) == [2, 2]


def test_a_job_s_label_change_moves_its_replicas():
    ms = machines(machine("m1", labels={"zone": "a"}), machine("m2", labels={"zone": "b"}))
    procs, _ = converge(jobs(job(replicas=1, constraints={"labels": {"zone": "a"}})), ms)
    procs, _ = converge(jobs(job(replicas=1, constraints={"labels": {"zone": "b"}})), ms, procs)
    assert on(procs) == {"m2": 1}


def test_a_machine_without_machine_json_gets_nothing():
    ms = {"m1": sched.machine_from("m1", None, NOW), "m2": sched.machine_from("m2", {"cpus": "lots"}, NOW),
          "m3": sched.machine_from("m3", {"cpus": 2, "memory": "4Gi", "unschedulable": True}, NOW)}
    decision = place(jobs(job(replicas=1)), ms, [], NOW)
    assert not decision.placements and decision.reports["web"]["unplaced"] == 1
    assert ms["m2"].problem == "machine.json: cpus 'lots' is not a number of cores"
    assert ms["m3"].memory == 4 * GI and ms["m3"].unschedulable


# -------------------------------------------------------------- services


def test_service_tables_list_running_replicas_with_their_health():
    ms = machines(machine("m1", address="10.0.0.1"), machine("m2", address="10.0.0.2"))
    js = jobs(job(replicas=3, port=True, release=7, service="hello"), job("batch", replicas=1))
    procs = settle(place(js, ms, [], NOW), [])
    procs = [running(p, "starting") if p.machine == "m2" and p.job == "web" else p for p in procs]
    first = next(p for p in procs if p.machine == "m1" and p.job == "web")
    procs = [Proc(p.machine, p.name, p.kid, p.spec, {**p.status, "endpoint": "192.0.2.9:31000"})
             if p is first else p for p in procs]
    tables = service_tables(js, ms, procs)
    assert set(tables) == {"hello"}
    lines = tables["hello"].splitlines()
    assert lines[0] == "# machine\taddress\tport\tprocess\thealth\tjob\trelease"
    rows = [line.split("\t") for line in lines[1:]]
    assert len(rows) == 3 and {r[5] for r in rows} == {"web"} and {r[6] for r in rows} == {"7"}
    assert ["m1", "192.0.2.9", "31000", "K-" + "9" * 40, "healthy"] in [r[:5] for r in rows]
    assert any(r[0] == "m2" and r[1] == "10.0.0.2" and r[4] == "starting" for r in rows)
    # Not running, or going away: not listed. A job whose file is broken keeps its lines.
    pending = [Proc(p.machine, p.name, p.kid, p.spec, None) for p in procs]
    assert service_tables(js, ms, pending)["hello"] == sched.SERVICE_HEADER
    assert len(service_tables(js, ms, procs, gone={(first.machine, first.name)})["hello"].splitlines()) == 3
    broken = {"web": InvalidJob("web", "bad"), "batch": js["batch"]}
    assert service_tables(broken, ms, procs) == tables


def test_the_transaction_guards_every_table_change_and_writes_outputs_only_when_they_change():
    ms = machines(machine("m1"), machine("m2", heartbeat=NOW - 100))
    old = hand_written("m2", "web-00000", image=IMAGE, job="web")
    js = jobs(job(replicas=1))
    decision = place(js, ms, [old], NOW)
    tx = decision_transaction(decision, {"web": sched.SERVICE_HEADER}, {}, NOW)
    new = decision.placements[0]
    assert {(c.path, c.kid) for c in tx.compares} == {("/machines/m2/procs/web-00000.json", old.kid),
                                                      (f"/machines/m1/procs/{new.name}.json", None)}
    written = {op.path: getattr(op, "data", None) for op in tx.ops}
    record = json.loads(written["/machines/m2/evicted/web-00000.json"])
    assert record["spec"] == old.spec and record["spec_kid"] == old.kid and record["time"] == NOW
    assert record["replaced_by"] == [f"{new.name}@m1"] and "lease expired" in record["reason"]
    assert written["/machines/m2/procs/web-00000.json"] is None
    assert json.loads(written["/scheduler/jobs/web.json"])["replicas"] == {new.name: "m1"}
    assert written["/services/web.tsv"] == sched.SERVICE_HEADER.encode()
    outputs = {p: d for p, d in written.items() if p.startswith(("/services/", "/scheduler/"))}
    outputs["/services/gone.tsv"] = b"x"
    again = decision_transaction(sched.Decision(reports=decision.reports), {"web": sched.SERVICE_HEADER}, outputs,
                                 NOW)
    assert [(type(op).__name__, op.path) for op in again.ops] == [("Delete", "/services/gone.tsv")]
    del outputs["/services/gone.tsv"]
    assert decision_transaction(sched.Decision(reports=decision.reports), {"web": sched.SERVICE_HEADER},
                                outputs, NOW) is None


# ------------------------------------------------------------------ jobs


@pytest.mark.parametrize("overrides, message", [
    ({"image": None}, "image is missing"),
    ({"image": "nginx"}, "image 'nginx' is not a KID"),
    ({"replicas": -1}, "replicas must be a whole number from 0 to 100000, not -1"),
    ({"replicas": "3"}, "replicas must be a whole number"),
    ({"replicas": True}, "replicas must be a whole number"),
    ({"resources": {"cpu": -1}}, "resources.cpu must be a positive number of cores"),
    ({"resources": {"memory": "lots"}}, "memory 'lots' is not a size"),
    ({"resources": {"gpu": 1}}, "unknown resources ['gpu']"),
    ({"constraints": {"labels": ["zone"]}}, "constraints.labels must be an object"),
    ({"constraints": {"nodes": "m1"}}, "constraints must be an object like"),
    ({"spread": "yes"}, "spread must be true or false"),
    ({"port": 8080}, "port must be true or false"),
    ({"port": True, "network": "private"}, "network 'private' does not fit \"port\": true"),
    ({"port": True, "env": {"PORT": "1"}}, "env.PORT is set by the scheduler"),
    ({"service": "web"}, "it needs \"port\": true"),
    ({"port": True, "service": "Web"}, "service 'Web' is not valid"),
    ({"update": {"strategy": "recreate"}}, "update.strategy 'recreate' is not known"),
    ({"update": {"max_surge": 0}}, "an update could never start"),
    ({"update": {"surge": 1}}, "unknown keys in update: ['surge']"),
    ({"restart": "sometimes"}, "unknown restart policy 'sometimes'"),
    ({"args": "python app.py"}, "args"),
    ({"health": {"http": 80}}, "health.http must be an object"),
    ({"release": [1]}, "release must be a number or a string"),
    ({"name": "other"}, "name 'other' differs from the job's path name 'web'"),
    ({"app": "Hello"}, "app 'Hello' is not valid"),
])
def test_a_bad_job_is_refused_with_the_field_named(overrides, message):
    obj = {"image": IMAGE, "replicas": 1}
    obj.update(overrides)
    obj = {k: v for k, v in obj.items() if v is not None}
    with pytest.raises(JobError) as caught:
        check_job("web", obj)
    assert str(caught.value).startswith("job web: ") and message in str(caught.value)


def test_job_names_leave_room_for_the_replica_suffix():
    check_job("a" * 57, {"image": IMAGE, "replicas": 1})
    for bad in ("a" * 58, "Web", "1web", "web_1", ""):
        with pytest.raises(JobError, match="is not valid"):
            check_job(bad, {"image": IMAGE, "replicas": 1})


def test_a_job_s_health_check_and_defaults_become_the_replicas_spec():
    j = check_job("hello-web", {"app": "hello", "type": "web", "release": 2, "image": IMAGE, "replicas": 2,
                                "port": True, "health": {"http": "/", "interval": 2}, "args": ["serve"],
                                "resources": {"cpu": 0.25, "memory": "128Mi"}, "unknown": 1})
    assert j.template == {"image": IMAGE, "args": ["serve"], "resources": {"cpu": 0.25, "memory": "128Mi"},
                          "network": "host", "health": {"http": {"path": "/"}, "interval": 2}, "job": "hello-web",
                          "service": "hello-web", "release": 2}
    assert (j.cpu, j.memory, j.spread, j.max_surge, j.max_unavailable) == (0.25, 128 * MI, True, 1, 0)
    assert sched.unknown_fields({"image": IMAGE, "replicas": 1, "replica": 2}) == ["replica"]


# -------------------------------------------------------------- properties

LABELS = st.sampled_from([{}, {"zone": "a"}, {"zone": "b"}, {"zone": "a", "disk": "ssd"}])


@st.composite
def clusters(draw):
    count = draw(st.integers(1, 8))
    ms = {}
    for i in range(count):
        name = f"m{i}"
        ms[name] = Machine(name, float(draw(st.integers(0, 4))), draw(st.integers(0, 8)) * 512 * MI,
                           draw(LABELS), "127.0.0.1",
                           draw(st.sampled_from([NOW, NOW - 5, NOW - 100, None])),
                           draw(st.booleans()) and draw(st.booleans()))
    hand = []
    for i in range(draw(st.integers(0, 4))):
        m = draw(st.sampled_from(sorted(ms)))
        hand.append(hand_written(m, f"hand{i}", image=IMAGE, port=20000 + i % 2,
                                 resources={"cpu": draw(st.sampled_from([0.5, 1, 3])),
                                            "memory": draw(st.sampled_from([0, 256 * MI, 2 * GI]))}))
    js = {}
    for i in range(draw(st.integers(1, 5))):
        name = f"job{i}"
        labels = draw(st.sampled_from([{}, {"zone": "a"}, {"zone": "b"}, {"disk": "ssd"}]))
        js[name] = check_job(name, {
            "image": IMAGE, "replicas": draw(st.integers(0, 7)),
            "resources": {"cpu": draw(st.sampled_from([0.25, 0.5, 1, 2])),
                          "memory": draw(st.sampled_from([64 * MI, 512 * MI, GI]))},
            "constraints": {"labels": labels}, "spread": draw(st.booleans()), "port": draw(st.booleans())})
    return ms, hand, js


def _eligible(ms, j, m):
    machine = ms[m]
    return (sched.alive(machine, NOW, 30) and not machine.unschedulable
            and all(machine.labels.get(k) == v for k, v in j.labels.items()))


def _room(ms, procs, m, j, ports) -> bool:
    cpu = sum(sched.spec_cpu(p.spec) for p in procs if p.machine == m)
    mem = sum(sched.spec_memory(p.spec) for p in procs if p.machine == m)
    used = {sched.spec_port(p.spec) for p in procs if p.machine == m}
    port_free = not j.port or any(port not in used for port in range(ports[0], ports[1] + 1))
    return cpu + j.cpu <= ms[m].cpus + 1e-9 and mem + j.memory <= ms[m].memory and port_free


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters())
def test_property_no_overcommit_constraints_spread_and_every_satisfiable_replica_placed(cluster):
    ms, hand, js = cluster
    ports = (20000, 20009)
    decision = place(js, ms, hand, NOW, lease_ttl=30, ports=ports)
    assert not decision.removals and not decision.evictions  # nothing was placed before
    procs = settle(decision, hand)
    # No overcommit: only what the hand-written entries already used may exceed a machine.
    for m, machine in ms.items():
        placed = [p for p in decision.placements if p.machine == m]
        if not placed:
            continue
        assert sum(sched.spec_cpu(p.spec) for p in procs if p.machine == m) <= machine.cpus + 1e-9
        assert sum(sched.spec_memory(p.spec) for p in procs if p.machine == m) <= machine.memory
        new_ports = [p.spec["port"] for p in placed if "port" in p.spec]
        assert len(set(new_ports)) == len(new_ports) and not set(new_ports) & set(
            sched.spec_port(h.spec) for h in hand if h.machine == m)
        assert all(ports[0] <= port <= ports[1] for port in new_ports)
    names = [p.name for p in procs]
    assert len(names) == len(set(names))
    for name, j in js.items():
        mine = [p for p in decision.placements if p.job == name]
        assert len(mine) <= j.replicas
        # Constraints: live, schedulable machines with the labels only.
        assert all(_eligible(ms, j, p.machine) for p in mine)
        counts = on(mine)
        eligible = [m for m in ms if _eligible(ms, j, m)]
        # Every satisfiable replica placed: one left out means no eligible machine has room for it now
        # (room only shrinks during a turn).
        if len(mine) < j.replicas:
            assert not any(_room(ms, procs, m, j, ports) for m in eligible), (name, decision.reports[name])
            assert decision.reports[name]["unplaced"] == j.replicas - len(mine)
        # Spread: a second replica on a machine only when no eligible machine without one had room.
        if j.spread and any(c > 1 for c in counts.values()):
            empty = [m for m in eligible if counts.get(m, 0) == 0]
            assert not any(_room(ms, procs, m, j, ports) for m in empty), (name, counts)
    # And then: everything as desired, nothing to do.
    assert not place(js, ms, procs, NOW, lease_ttl=30, ports=ports)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 8)), min_size=1, max_size=8),
       st.sampled_from([0.25, 0.5, 1.0, 1.5]), st.sampled_from([128 * MI, 512 * MI, 1536 * MI]),
       st.integers(0, 40))
def test_property_one_job_alone_gets_exactly_the_slots_there_are(capacities, cpu, memory, replicas):
    ms = {f"m{i}": Machine(f"m{i}", float(c), g * 512 * MI, {}, "127.0.0.1", NOW)
          for i, (c, g) in enumerate(capacities)}
    j = check_job("web", {"image": IMAGE, "replicas": replicas, "resources": {"cpu": cpu, "memory": memory}})
    slots = sum(min(int(m.cpus / cpu + 1e-9), m.memory // memory) for m in ms.values())
    decision = place({"web": j}, ms, [], NOW)
    assert len(decision.placements) == min(replicas, slots)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.integers(1, 3), st.integers(0, 1))
def test_property_rolling_updates_never_drop_below_the_wanted_healthy_replicas(replicas, machine_count, surge,
                                                                            unavailable):
    ms = {f"m{i}": Machine(f"m{i}", 8.0, 16 * GI, {}, "127.0.0.1", NOW) for i in range(machine_count)}
    update = {"max_surge": surge, "max_unavailable": unavailable}
    procs, _ = converge({"web": job(replicas=replicas, release=1, update=update)}, ms)
    js = {"web": job(replicas=replicas, release=2, update=update)}
    for turn in range(4 * replicas + 4):
        procs = [running(p) for p in procs]  # what was started last turn is healthy now
        decision = place(js, ms, procs, NOW)
        if not decision:
            break
        assert len(decision.placements) <= surge + unavailable
        procs = settle(decision, procs, health="starting")
        assert sum(sched.replica_health(p) == "healthy" for p in procs) >= replicas - unavailable
    else:
        raise AssertionError("the update did not finish")
    assert sorted(p.spec["release"] for p in procs) == [2] * replicas
