"""keg mayor run, run, kill, ps, wait, logs and exec against a real master.

Two kinds of test:

- the CLI side alone: status objects, logs and exec results are written here
  with an admin token, exactly as docs/operations-mayor.md says a Mayor
  writes them, so these test the commands whatever the daemon does;
- ``test_daemon_*``: the commands together with a real ``mayor.daemon.Mayor``
  (no-op runtime), stepped by hand or run in a thread, and ``keg mayor run``
  as a subprocess. Each names in its docstring the daemon behaviour it needs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pytest

from conftest import MasterProcess, init_keg_with_token, keg_command, wait_until
from keg.transaction import Transaction, delete, put
from master import auth
from master.client import RemoteKeg
from mayor.daemon import Mayor
from mayor.runtime import NoopRuntime
from test_cli import run

KID_A = "K-" + "a1" * 20
KID_B = "K-" + "b2" * 20
KID_C = "K-" + "c3" * 20


class Cluster:
    """A master, its admin, an image in the keg, and the machine token of m1."""

    def __init__(self, keg_dir, tmp_path):
        self.server = MasterProcess(keg_dir, init_keg_with_token(keg_dir))
        self.url, self.token = self.server.url, self.server.token
        self.admin = RemoteKeg(self.url, self.token)
        self.admin.apply(Transaction((put("/oci-images/app/1/index.json", '{"schemaVersion": 2}\n'),)))
        self.image = self.admin.kid("/oci-images/app/1")
        self.machine_token = auth.add_user(self.admin, "m1", machine=True)
        self.tmp_path = tmp_path

    def keg(self, *args, input=None):
        """``keg ARGS`` in process (CliRunner), against the master as admin (options before any ``--``)."""
        return run(args[0], "--url", self.url, "--token", self.token, *args[1:], input=input)

    def spawn(self, *args):
        """The installed ``keg ARGS`` as a subprocess, against the master as admin."""
        env = {"PATH": "/usr/bin:/bin", "HOME": str(self.tmp_path), "KEG_URL": self.url, "KEG_TOKEN": self.token}
        return subprocess.Popen([*keg_command(), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    def write(self, *ops):
        result = self.admin.apply(Transaction(tuple(ops)))
        assert result.ok, result.error
        return result

    def status(self, machine, name, **fields):
        """A put of a process status object, as a Mayor writes it."""
        obj = {"name": name, "kid": None, "spec_kid": None, "image": self.image, "state": "running", "pid": 4242,
               "container": f"c-{name}", "started": time.time() - 125, "exited": None, "exit_code": None,
               "oom": False, "reason": None, "restarts": 0, "last_error": None, "health": None, "log_bytes": 0,
               "previous": None}
        obj.update(fields)
        return put(f"/machines/{machine}/status/{name}.json", json.dumps(obj) + "\n")

    def heartbeat(self, machine, when=None):
        return put(f"/machines/{machine}/status/mayor.json",
                   json.dumps({"version": "1", "heartbeat": time.time() if when is None else when, "processes": 1,
                               "pids": {}, "runtime": "noop"}))

    def read_json(self, path):
        return json.loads(self.admin.read(path))

    def mayor(self, runtime=None, clock=time.time):
        runtime = runtime or NoopRuntime()
        return Mayor(RemoteKeg(self.url, self.machine_token, timeout=5), "m1", runtime,
                     str(self.tmp_path / "mayor-data"), clock=clock), runtime


@pytest.fixture
def cluster(keg_dir, tmp_path):
    c = Cluster(keg_dir, tmp_path)
    yield c
    c.server.stop()


def finish(proc, timeout=30):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


# ------------------------------------------------------------------ keg run / kill


def test_run_writes_a_spec_once_and_replace_changes_it(cluster):
    code, out, err = cluster.keg("run", "web", "--image", "app:1", "-m", "m1", "--memory", "64Mi", "--cpu", "0.5",
                                 "--pids", "20", "-e", "A=1", "-e", "B=x=y", "--restart", "on-failure",
                                 "--health-cmd", "wget -q localhost", "--", "serve", "--port", "80")
    assert code == 0, err
    path = "/machines/m1/procs/web.json"
    assert out.strip() == cluster.admin.kid(path)
    assert "machine m1 has not registered" in err
    spec = cluster.read_json(path)
    assert spec == {"image": cluster.image, "args": ["serve", "--port", "80"], "env": {"A": "1", "B": "x=y"},
                    "resources": {"cpu": 0.5, "memory": "64Mi", "pids": 20}, "restart": "on-failure",
                    "network": "private", "health": {"exec": ["/bin/sh", "-c", "wget -q localhost"]}}

    code, _, err = cluster.keg("run", "web", "--image", "app:1", "-m", "m1", "--", "other")
    assert code == 3 and "exists already" in err
    assert cluster.read_json(path)["args"] == ["serve", "--port", "80"]  # nothing changed

    short = cluster.image[:12]
    code, out, _ = cluster.keg("run", "web", "--image", short, "-m", "m1", "--replace", "--json", "--", "other")
    assert code == 0
    answer = json.loads(out)
    assert answer["spec_kid"] == cluster.admin.kid(path) and answer["spec"]["args"] == ["other"]
    assert cluster.read_json(path)["image"] == cluster.image  # the short KID is written in full


def test_run_says_to_use_replace_when_the_name_exists(cluster):
    assert cluster.keg("run", "web", "--image", "app:1", "-m", "m1")[0] == 0
    code, out, err = cluster.keg("run", "web", "--image", "app:1", "-m", "m1")
    assert code == 3 and out == ""
    assert "/machines/m1/procs/web.json" in err and "--replace" in err and "Traceback" not in err


@pytest.mark.parametrize("args, code, message", [
    (("Web", "--image", "app:1"), 2, "not a valid process name"),
    (("mayor", "--image", "app:1"), 2, "reserved"),
    (("web", "--image", "app:1", "--memory", "lots"), 2, "not a size"),
    (("web", "--image", "app:1", "--cpu", "-1"), 2, "resources.cpu"),
    (("web", "--image", "app:1", "-e", "NOEQUALS"), 2, "KEY=VALUE"),
    (("web", "--image", "app:1", "--cwd", "/proc/self/fd/7"), 2, "/proc"),
    (("web", "--image", "nothere:1"), 1, "no image nothere:1"),
    (("web", "--image", "K-00000000"), 1, ""),
    (("web", "--image", "K-zz"), 2, ""),
    (("web", "--image", "app:1", "--restart", "sometimes"), 2, "sometimes"),
    (("web", "--image", "app:1", "--health-http", "http"), 2, "PORT/PATH"),
    (("web", "--image", "app:1", "--health-http", "99999"), 2, "health.http.port"),
    (("web", "--image", "app:1", "--health-cmd", "[]"), 2, "health.exec"),
    (("web", "--image", "app:1", "--health-interval", "3"), 2, "needs --health-cmd"),
])
def test_run_refuses_bad_input_and_writes_nothing(cluster, args, code, message):
    got, _, err = cluster.keg("run", *args, "-m", "m1")
    assert got == code, err
    assert message in err and "Traceback" not in err
    assert not cluster.admin.exists("/machines/m1/procs")


def test_run_health_checks_by_http(cluster):
    code, out, err = cluster.keg("run", "web", "--image", "app:1", "-m", "m1", "--health-http", "8080/healthz",
                                 "--health-interval", "2.5", "--stop-grace", "3")
    assert code == 0, err
    spec = cluster.read_json("/machines/m1/procs/web.json")
    assert spec["health"] == {"http": {"port": 8080, "path": "/healthz"}, "interval": 2.5}
    assert spec["stop_grace"] == 3 and "args" not in spec  # the image's command runs


def test_run_by_path_of_a_file_is_not_an_image(cluster):
    kid = cluster.admin.kid("/oci-images/app/1/index.json")
    code, _, err = cluster.keg("run", "web", "--image", kid, "-m", "m1")
    assert code == 2 and "not an image" in err


def test_kill_deletes_the_spec_and_says_when_there_is_none(cluster):
    assert cluster.keg("run", "web", "--image", "app:1", "-m", "m1")[0] == 0
    code, out, _ = cluster.keg("kill", "web", "-m", "m1")
    assert code == 0 and "stopping web on m1" in out
    assert not cluster.admin.exists("/machines/m1/procs/web.json")
    code, _, err = cluster.keg("kill", "web", "-m", "m1")
    assert code == 1 and "no process web on machine m1" in err


# ----------------------------------------------------------------------- keg ps


@pytest.fixture
def reported(cluster):
    """Status of four processes on two machines, as their Mayors write it."""
    now = time.time()
    cluster.write(
        cluster.status("m1", "web", kid=KID_A, health="healthy", restarts=2),
        cluster.status("m1", "job", kid=KID_B, state="exited", exit_code=0, exited=now - 30),
        cluster.status("m2", "db", kid=KID_C, state="failed", pid=None, last_error="image K-1 not found"),
        put("/machines/m1/status/logs/web.log", "hello\n"),
        put("/machines/m1/status/exec/x-0123456789abcdef.json", '{"id": "x-0123456789abcdef", "state": "running"}'),
        cluster.heartbeat("m1"), cluster.heartbeat("m2", now - 3600),
        put("/machines/m1/procs/web.json", "{}"), put("/machines/m1/procs/new.json", "{}"))
    return cluster


def _table(out):
    lines = out.splitlines()
    return lines[0].split(), [line.split() for line in lines[1:]]


def test_ps_lists_processes_of_every_machine(reported):
    code, out, err = reported.keg("ps")
    assert code == 0
    header, rows = _table(out)
    assert header == ["MACHINE", "NAME", "STATE", "PID", "RESTARTS", "HEALTH", "AGE", "KID", "IMAGE"]
    assert [r[:2] for r in rows] == [["m1", "web"], ["m2", "db"]]  # job exited: only with --all
    web = rows[0]
    assert web[2:7] == ["running", "4242", "2", "healthy", "2m"]
    assert web[7] == KID_A[:14] and web[8] == reported.image[:14]
    assert rows[1][2] == "failed?"  # m2's Mayor has been silent for an hour
    assert "machine m2's Mayor last reported 1h ago" in err and "m1" not in err


def test_ps_all_machine_and_json(reported):
    code, out, _ = reported.keg("ps", "--all", "-m", "m1")
    _, rows = _table(out)
    assert [(r[1], r[2]) for r in rows] == [("job", "exited(0)"), ("new", "unreported"), ("web", "running")]
    code, out, _ = reported.keg("ps", "--json", "--all")
    objs = json.loads(out)
    assert [(o["machine"], o["name"]) for o in objs] == [("m1", "job"), ("m1", "new"), ("m1", "web"), ("m2", "db")]
    db = objs[-1]
    assert db["last_error"] == "image K-1 not found" and db["stale"] is True and db["kid"] == KID_C
    assert objs[2]["stale"] is False and objs[2]["log_bytes"] == 0
    code, _, err = reported.keg("ps", "-m", "m9")
    assert code == 1 and "no machine m9" in err


def test_ps_with_no_machines_prints_the_header(cluster):
    code, out, _ = cluster.keg("ps")
    assert code == 0 and out.split() == ["MACHINE", "NAME", "STATE", "PID", "RESTARTS", "HEALTH", "AGE", "KID",
                                         "IMAGE"]


# --------------------------------------------------------------------- keg wait


def test_wait_returns_at_once_for_ended_processes(reported):
    reported.write(reported.status("m1", "old", kid=KID_C[:-1] + "0", state="running",
                                   previous={"kid": "K-" + "d4" * 20, "exit_code": 7, "exited": 1.0, "oom": False,
                                             "reason": None}))
    code, out, _ = reported.keg("wait", KID_B)
    assert (code, out) == (0, f"{KID_B} exit 0\n")
    code, out, _ = reported.keg("wait", "K-d4d4d4d4", KID_B)
    assert code == 1 and out.splitlines() == ["K-d4d4d4d4 exit 7", f"{KID_B} exit 0"]
    code, out, _ = reported.keg("wait", KID_C)
    assert code == 1 and out == f"{KID_C} failed: image K-1 not found\n"


def test_wait_errors_name_the_kid(reported):
    code, _, err = reported.keg("wait", "K-" + "e5" * 20)
    assert code == 1 and "no process has KID K-" + "e5" * 20 in err
    code, _, err = reported.keg("wait", "K-xyz")
    assert code == 2 and "Traceback" not in err
    reported.write(reported.status("m1", "twin", kid=KID_A[:22] + "f" * 20))
    code, _, err = reported.keg("wait", KID_A[:12])
    assert code == 2 and "ambiguous" in err


def test_wait_follows_the_watch_stream_until_every_kid_ends(reported):
    proc = reported.spawn("wait", KID_A, KID_C[:10] + "", "--timeout", "60")
    # db (KID_C) failed already; web (KID_A) runs: wait must not return while it does.
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=1.0)
    reported.write(reported.status("m1", "web", kid=KID_B[:-1] + "9", state="running",
                                   previous={"kid": KID_A, "exit_code": 0, "exited": time.time(), "oom": False,
                                             "reason": None}))
    code, out, err = finish(proc)
    assert out.splitlines() == [f"{KID_C[:10]} failed: image K-1 not found", f"{KID_A} exit 0"], err
    assert code == 1  # one of them did not exit 0


def test_wait_exit_codes_and_removed_processes(reported):
    proc = reported.spawn("wait", KID_A)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.5)
    reported.write(reported.status("m1", "web", kid=KID_A, state="exited", exit_code=0, exited=time.time()))
    assert finish(proc)[:2] == (0, f"{KID_A} exit 0\n")

    reported.write(reported.status("m1", "web", kid=KID_A, state="running"))
    proc = reported.spawn("wait", KID_A, "--json")
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.5)
    reported.write(delete("/machines/m1/status/web.json"))
    code, out, _ = finish(proc)
    [answer] = json.loads(out)
    assert code == 1 and answer["state"] == "removed" and answer["exit_code"] is None and answer["name"] == "web"


def test_wait_times_out_with_124_naming_what_still_runs(reported):
    started = time.monotonic()
    code, out, err = reported.keg("wait", KID_A, KID_B, "--timeout", "1.5")
    assert time.monotonic() - started < 10
    assert code == 124 and out == f"{KID_B} exit 0\n"
    assert "timed out after 1.5s" in err and f"{KID_A} (m1/web)" in err


# --------------------------------------------------------------------- keg logs


def _log_ops(c, machine, name, data: bytes, total: int, **fields):
    return (c.status(machine, name, log_bytes=total, **fields),
            put(f"/machines/{machine}/status/logs/{name}.log", data))


def test_logs_prints_the_kept_tail(cluster):
    cluster.write(*_log_ops(cluster, "m1", "web", b"one\ntwo\nthree\n", 14, kid=KID_A))
    assert cluster.keg("logs", "web") == (0, "one\ntwo\nthree\n", "")
    assert cluster.keg("logs", "web", "--tail", "2", "-m", "m1")[1] == "two\nthree\n"
    assert cluster.keg("logs", KID_A[:10])[1] == "one\ntwo\nthree\n"
    cluster.write(*_log_ops(cluster, "m1", "web", b"three\n", 100_006, kid=KID_A))
    code, out, err = cluster.keg("logs", "web")
    assert out == "three\n" and "100000 earlier bytes not kept" in err


def test_logs_finds_the_machine_or_asks(cluster):
    cluster.write(*_log_ops(cluster, "m1", "web", b"1\n", 2), *_log_ops(cluster, "m2", "web", b"2\n", 2))
    code, _, err = cluster.keg("logs", "web")
    assert code == 2 and "several machines (m1, m2)" in err and "--machine" in err
    assert cluster.keg("logs", "web", "-m", "m2")[1] == "2\n"
    code, _, err = cluster.keg("logs", "nope")
    assert code == 1 and "no process named nope" in err
    code, _, err = cluster.keg("logs", "nope", "-m", "m1")
    assert code == 1 and "no process nope on machine m1" in err


def test_logs_follow_prints_only_new_bytes_until_the_process_ends(cluster):
    cluster.write(put("/machines/m1/procs/job.json", '{"restart": "never"}'),
                  *_log_ops(cluster, "m1", "job", b"a\n", 2, kid=KID_A))
    proc = cluster.spawn("logs", "job", "-f")
    assert proc.stdout.readline() == "a\n"
    cluster.write(*_log_ops(cluster, "m1", "job", b"a\nb\n", 4, kid=KID_A))
    assert proc.stdout.readline() == "b\n"
    cluster.write(put("/machines/m1/status/mayor.json", "{}"))   # other writes print nothing
    tail = bytes(range(97, 123)) * 3000 + b"\n"                  # 78,001 bytes more than 64 KiB could keep
    cluster.write(*_log_ops(cluster, "m1", "job", tail[-65536:], 4 + len(tail), kid=KID_A))
    assert proc.stdout.readline().encode() == tail[-65536:]
    cluster.write(*_log_ops(cluster, "m1", "job", tail[-65536:] + b"end\n", 8 + len(tail), kid=KID_A,
                            state="exited", exit_code=0))
    code, out, err = finish(proc)
    assert (code, out) == (0, "end\n")
    assert f"… {len(tail) - 65536} bytes not kept …" in err


def test_logs_follow_stops_when_the_process_is_removed(cluster):
    cluster.write(*_log_ops(cluster, "m1", "web", b"", 0, kid=KID_A))
    proc = cluster.spawn("logs", "web", "-f", "-m", "m1")
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.5)
    cluster.write(delete("/machines/m1/status/web.json"), delete("/machines/m1/status/logs/web.log"))
    code, out, err = finish(proc)
    assert code == 0 and "web on m1 was removed" in err


# --------------------------------------------------------------------- keg exec


def _answer_exec(cluster, since, results):
    """Play the Mayor's part of one exec: read the request, write ``results`` one revision each."""
    for event in cluster.admin.watch("/machines/m1/exec", since, timeout=20):
        if event.new_kid is not None:
            request = cluster.read_json(event.path)
            request_id = event.path.rsplit("/", 1)[1][:-len(".json")]
            for result in results:
                cluster.write(put(f"/machines/m1/status/exec/{request_id}.json",
                                  json.dumps({"id": request_id, "proc": request["proc"], **result})))
            return request_id, request
    raise AssertionError("no exec request came")


def test_exec_prints_output_as_it_grows_and_exits_with_the_code(cluster):
    cluster.write(cluster.status("m1", "web", kid=KID_A), cluster.heartbeat("m1"))
    since = cluster.admin.revision().number
    proc = cluster.spawn("exec", "web", "--timeout", "30", "--", "sh", "-c", "echo hi; exit 3")
    request_id, request = _answer_exec(cluster, since, [
        {"state": "running", "exit_code": None, "output": "h", "error": None},
        {"state": "running", "exit_code": None, "output": "hi", "error": None},
        {"state": "exited", "exit_code": 3, "output": "hi\n", "error": None}])
    code, out, err = finish(proc)
    assert (code, out) == (3, "hi\n"), err
    assert request == {"proc": "web", "args": ["sh", "-c", "echo hi; exit 3"], "timeout": 30.0}
    assert request_id.startswith("x-") and len(request_id) == 18
    assert not cluster.admin.exists(f"/machines/m1/exec/{request_id}.json")  # the requester cleans up


def test_exec_says_when_the_mayor_kept_only_the_end_of_the_output(cluster):
    cluster.write(cluster.status("m1", "web", kid=KID_A))
    since = cluster.admin.revision().number
    proc = cluster.spawn("exec", "web", "--", "yes")
    _answer_exec(cluster, since, [
        {"state": "running", "exit_code": None, "output": "abc", "output_dropped": 0, "error": None},
        {"state": "running", "exit_code": None, "output": "defg", "output_dropped": 10, "error": None},
        {"state": "exited", "exit_code": 0, "output": "defgh\n", "output_dropped": 10, "error": None}])
    code, out, err = finish(proc)
    assert (code, out) == (0, "abcdefgh\n")
    assert "… 7 bytes not kept …" in err


def test_exec_failures(cluster):
    cluster.write(cluster.status("m1", "web", kid=KID_A), cluster.status("m1", "job", state="exited", exit_code=0))
    since = cluster.admin.revision().number
    proc = cluster.spawn("exec", "web", "--", "nosuch")
    _answer_exec(cluster, since, [{"state": "failed", "exit_code": None, "output": "", "error": "nosuch: not found"}])
    code, _, err = finish(proc)
    assert code == 126 and "nosuch: not found" in err
    since = cluster.admin.revision().number
    proc = cluster.spawn("exec", "web", "--timeout", "2", "--", "sleep", "9")
    _answer_exec(cluster, since, [{"state": "failed", "exit_code": None, "output": "",
                                   "error": "timed out; the command was killed"}])
    code, _, err = finish(proc)
    assert code == 124 and "timed out" in err

    code, _, err = cluster.keg("exec", "job", "--", "true")
    assert code == 2 and "job on m1 is exited, not running" in err
    code, _, err = cluster.keg("exec", "web")
    assert code == 2 and "Traceback" not in err

    started = time.monotonic()
    code, _, err = cluster.keg("exec", "web", "--timeout", "1", "--", "true")  # no Mayor answers
    assert code == 124 and "did not pick up the request within 1s" in err
    assert time.monotonic() - started < 8
    assert not cluster.admin.exists("/machines/m1/exec")  # the request is gone again


# ------------------------------------------------------- with the real daemon


def test_daemon_run_ps_kill(cluster):
    """Needs: status "kid" (the process KID of the incarnation) and "image"."""
    mayor, runtime = cluster.mayor()
    mayor.register()
    spec_kid = cluster.keg("run", "web", "--image", "app:1", "-m", "m1", "--", "serve")[1].strip()
    mayor.step()
    assert runtime.actual()["web"].state == "running"
    [row] = json.loads(cluster.keg("ps", "--json")[1])
    assert (row["machine"], row["name"], row["state"], row["spec_kid"]) == ("m1", "web", "running", spec_kid)
    assert row["kid"] and row["kid"].startswith("K-") and row["image"] == cluster.image
    _, rows = _table(cluster.keg("ps")[1])
    assert rows[0][:3] == ["m1", "web", "running"] and rows[0][7] == row["kid"][:14]
    assert cluster.keg("kill", "web", "-m", "m1")[0] == 0
    mayor.step()  # stop
    mayor.step()  # remove
    assert runtime.actual() == {}
    assert json.loads(cluster.keg("ps", "--json", "--all")[1]) == []


def test_daemon_wait_for_an_exit(cluster):
    """Needs: status "kid", and "state" exited with "exit_code" after the process exits (restart never)."""
    mayor, runtime = cluster.mayor()
    cluster.keg("run", "job", "--image", "app:1", "-m", "m1", "--restart", "never")
    mayor.step()
    kid = cluster.read_json("/machines/m1/status/job.json")["kid"]
    assert kid
    proc = cluster.spawn("wait", kid, "--timeout", "60")
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.5)
    runtime.exit("job", 3, time.time())
    mayor.step()
    assert finish(proc)[:2] == (1, f"{kid} exit 3\n")


def test_daemon_wait_for_an_incarnation_that_was_restarted(cluster):
    """Needs: status "kid" changes on restart and "previous" holds the ended incarnation's kid and exit code."""
    class Clock:
        now = time.time()

        def __call__(self):
            return self.now

    clock = Clock()
    mayor, runtime = cluster.mayor(clock=clock)
    cluster.keg("run", "web", "--image", "app:1", "-m", "m1", "--restart", "always")
    mayor.step()
    first = cluster.read_json("/machines/m1/status/web.json")["kid"]
    runtime.exit("web", 0, clock.now)
    clock.now += 1
    mayor.step()        # back-off
    clock.now += 60
    mayor.step()        # restarted: a new incarnation
    status = cluster.read_json("/machines/m1/status/web.json")
    assert status["state"] == "running" and status["kid"] != first
    assert status["previous"]["kid"] == first and status["previous"]["exit_code"] == 0
    assert cluster.keg("wait", first, "--timeout", "10")[:2] == (0, f"{first} exit 0\n")


def test_daemon_logs(cluster):
    """Needs: status/logs/<p>.log (the last 64 KiB) and "log_bytes" published with the status."""
    mayor, runtime = cluster.mayor()
    cluster.keg("run", "web", "--image", "app:1", "-m", "m1")
    mayor.step()
    runtime.write_log("web", b"hello\n")
    mayor.step()
    assert cluster.keg("logs", "web") == (0, "hello\n", "")
    proc = cluster.spawn("logs", "web", "-f")
    assert proc.stdout.readline() == "hello\n"
    runtime.write_log("web", b"world\n")
    mayor.step()
    assert proc.stdout.readline() == "world\n"
    proc.send_signal(signal.SIGINT)
    done = finish(proc)
    assert done[0] == 130, done


def test_daemon_exec(cluster):
    """Needs: the Mayor runs /machines/<m>/exec/<id>.json requests and writes status/exec/<id>.json."""
    mayor, runtime = cluster.mayor()
    cluster.keg("run", "web", "--image", "app:1", "-m", "m1")
    stop = threading.Event()
    loop = threading.Thread(target=mayor.run, args=(stop,), daemon=True)
    loop.start()
    try:
        wait_until(lambda: runtime.actual().get("web"), what="web to start")
        wait_until(lambda: cluster.admin.exists("/machines/m1/status/web.json")
                   and cluster.read_json("/machines/m1/status/web.json")["state"] == "running", what="web's status")
        code, out, err = finish(cluster.spawn("exec", "web", "--timeout", "20", "--", "echo", "hi"))
        assert (code, out) == (0, "echo hi\n"), err
        assert not cluster.admin.exists("/machines/m1/exec")
    finally:
        stop.set()
        loop.join(timeout=30)


@pytest.mark.slow
def test_daemon_keg_mayor_run_as_a_service(cluster, tmp_path):
    """keg mayor run --runtime noop as a real subprocess: registers, runs what keg run writes, stops on SIGTERM."""
    token_file = tmp_path / "token"
    token_file.write_text(cluster.machine_token + "\n")
    os.chmod(token_file, 0o600)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    mayor = subprocess.Popen([*keg_command(), "mayor", "run", "--url", cluster.url, "--token-file", str(token_file),
                              "--name", "m1", "--data", str(tmp_path / "data"), "--label", "zone=a",
                              "--runtime", "noop"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        wait_until(lambda: cluster.admin.exists("/machines/m1/machine.json") or mayor.poll() is not None,
                   what="the Mayor to register")
        assert mayor.poll() is None, mayor.communicate()
        machine = cluster.read_json("/machines/m1/machine.json")
        assert machine["labels"] == {"zone": "a"} and machine["name"] == "m1"
        assert cluster.keg("run", "web", "--image", "app:1", "-m", "m1", "--", "serve")[0] == 0

        def web_running():
            rows = json.loads(cluster.keg("ps", "--json")[1])
            return rows and rows[0]["state"] == "running" and rows[0]["name"] == "web"
        wait_until(web_running, what="web to run")
        mayor.send_signal(signal.SIGTERM)
        out, err = mayor.communicate(timeout=30)
    finally:
        if mayor.poll() is None:
            mayor.kill()
            mayor.wait()
    assert mayor.returncode == 0, err
    assert "stopped" in err and "Traceback" not in err


def test_keg_mayor_run_refuses_a_token_of_another_machine(cluster, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "KEG_TOKEN": cluster.machine_token}
    done = subprocess.run([*keg_command(), "mayor", "run", "--url", cluster.url, "--name", "m2",
                           "--data", str(tmp_path / "data"), "--runtime", "noop"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 6, done.stderr
    assert "machine user m2" in done.stderr and "keg user add m2 --machine" in done.stderr
    assert "Traceback" not in done.stderr


def test_keg_mayor_run_usage_errors(cluster, tmp_path):
    code, _, err = run("mayor", "run", "--url", cluster.url, "--name", "m1", "--data", str(tmp_path / "d"),
                       "--token-file", str(tmp_path / "missing"), "--runtime", "noop")
    assert code == 2 and "cannot read the token file" in err
    (tmp_path / "t").write_text(cluster.machine_token)
    code, _, err = run("mayor", "run", "--url", cluster.url, "--name", "m1", "--data", str(tmp_path / "d"),
                       "--token-file", str(tmp_path / "t"), "--token", "x", "--runtime", "noop")
    assert code == 2 and "not both" in err
    code, _, err = run("mayor", "run", "--url", cluster.url, "--name", "Bad", "--data", str(tmp_path / "d"),
                       "--runtime", "noop")
    assert code == 2 and "not a valid machine name" in err
    code, _, err = run("mayor", "run", "--url", cluster.url, "--name", "m1", "--data", str(tmp_path / "d"),
                       "--token-file", str(tmp_path / "t"), "--cgroup-parent", "../escape")
    assert code != 0 and "cgroup parent '../escape' must be a relative cgroup path" in err, err
