"""The shell policies (shell/policy/) against a real cluster, with HTTP load through the router.

A network of namespaces (tests/netns.py): ``ctl`` holds the master, the
scheduler (``keg scheduler run``), the router (``keg router run`` with
Debian's nginx) and every client: the load generators and the policy
scripts, run as a user runs them. ``m1``, ``m2`` and ``m3`` each hold a
``keg mayor run --runtime runc`` with real containers: busybox ``httpd`` on
``$PORT`` with the host network of its machine's namespace, serving a page
that names its image (v1, v2), or no page at all (the broken image, whose
health check fails). The Mayors enter their namespace with ``nsenter --net``
only, so they share the machine's mounts and cgroups as a Mayor does.
The scheduler's lease is ``LEASE_TTL`` (10 s, not the default 30) and the
Mayors heartbeat every second, so that "kill a Mayor: its replicas run
elsewhere within the lease TTL + 5 s" takes seconds, not half a minute.

Each test uses jobs of its own on the one cluster and checks what a user
sees: the scripts' exit status and messages, the jobs and process tables
afterwards, and that no request of the load failed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter

import pytest

import netns
from busybox import import_busybox, tar_entry, why_no_containers
from conftest import init_keg_with_token, keg_command, read_text, stop_waiting, wait_until
from keg.errors import KegError, NotFound
from master import auth
from master.client import RemoteKeg
from mayor.runc import Runc
from mayor.runc_runtime import RuncRuntime
from test_mayor_e2e import Away
from test_router import NGINX, Load

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLICY = os.path.join(REPO, "shell", "policy")
MACHINES = ("m1", "m2", "m3")
MASTER_PORT = 7480
ROUTER_PORT = 8080
DOMAIN = "keg.test"
WAIT = 90.0
LEASE_TTL = 10.0   # keg scheduler run --lease-ttl: ten heartbeats (keg mayor run --heartbeat), for a busy machine
HEARTBEAT = 1.0
HTTPD = ["/bin/sh", "-c", "exec httpd -f -p $PORT -h /www"]


def _site(index: bytes | None, app: bytes) -> list:
    """Files of the web root: /www/index.html (when given) and the CGI program /www/cgi-bin/app."""
    files = [tar_entry("www", "dir"), tar_entry("www/cgi-bin", "dir"),
             tar_entry("www/cgi-bin/app", data=b"#!/bin/sh\n" + app, mode=0o755)]
    return files + ([tar_entry("www/index.html", data=index)] if index is not None else [])


IMAGES = {
    "v1": _site(b"v1\n", b"echo 'Content-Type: text/plain'; echo; echo v1\n"),
    "v2": _site(b"v2\n", b"echo 'Content-Type: text/plain'; echo; echo v2\n"),
    "broken": _site(None, b"echo; echo broken\n"),  # / answers 404: the health check fails
    "erroring": _site(b"e\n", b"echo 'Status: 500 Broken'; echo; echo erroring\n"),  # healthy, but the app fails
}


def policy(name: str) -> str:
    return os.path.join(POLICY, name)


class Cluster:
    """The master, scheduler and router on ``ctl``; a runc Mayor on each of m1..m3; all in namespaces."""

    def __init__(self):
        why = why_no_containers() or netns.unavailable()
        if why is not None:
            pytest.fail(why)  # fail, never skip: ./install.sh provides runc, busybox and iproute2
        self.base = tempfile.mkdtemp(prefix="keg-policy-")
        os.chmod(self.base, 0o711)  # runc's containers and nginx's workers must reach their files
        self.logs = {}
        self.mayors = {}
        self.net = netns.Network().__enter__()
        self.ctl = self.net.host("ctl")
        self.hosts = {m: self.net.host(m) for m in MACHINES}
        keg_path = os.path.join(self.base, "keg")
        self.token = init_keg_with_token(keg_path)
        self.url = f"http://{self.ctl.address}:{MASTER_PORT}"
        self.env = {"PATH": os.path.dirname(keg_command()[0]) + ":" + os.environ["PATH"], "HOME": self.base,
                    "KEG_URL": self.url, "KEG_TOKEN": self.token, "PYTHONUNBUFFERED": "1"}
        self.spawn("master", [*keg_command(), "master", "serve", "--keg", keg_path, "--listen",
                              f"{self.ctl.address}:{MASTER_PORT}"])
        wait_until(self._master_up, "the master", timeout=30, log=self.log)
        self.images = {name: self.admin(lambda k, name=name, files=files: import_busybox(k, f"test/web:{name}", files))
                       for name, files in IMAGES.items()}
        for m in MACHINES:
            self.start_mayor(m)
        self.spawn("scheduler", [*keg_command(), "scheduler", "run", "--lease-ttl", str(LEASE_TTL)])
        self.router_data = os.path.join(self.base, "router")
        self.spawn("router", [*keg_command(), "router", "run", "--listen", f"{self.ctl.address}:{ROUTER_PORT}",
                              "--domain", DOMAIN, "--nginx", NGINX, "--data", self.router_data])
        wait_until(lambda: "listening on" in read_text(self.logs["router"]), "the router", timeout=30, log=self.log)
        for m in MACHINES:
            wait_until(lambda m=m: self.exists(f"/machines/{m}/status/mayor.json"), f"Mayor {m}", log=self.log)

    # ------------------------------------------------------------ processes

    def spawn(self, name: str, argv: list, host=None) -> subprocess.Popen:
        self.logs[name] = os.path.join(self.base, f"{name}.log")
        with open(self.logs[name], "a") as log:
            return self.net.popen(host or self.ctl, argv, stdout=log, stderr=subprocess.STDOUT, env=self.env)

    def start_mayor(self, m: str) -> None:
        """Start (or, after a kill, start again) the Mayor of ``m``; its machine user is made once."""
        token_file = os.path.join(self.base, f"{m}.token")
        if not os.path.exists(token_file):
            with open(token_file, "w") as f:
                f.write(self.admin(lambda k: auth.add_user(k, m, machine=True)) + "\n")
            os.chmod(token_file, 0o600)
        self.logs[m] = os.path.join(self.base, f"{m}.log")
        env = {"PATH": self.env["PATH"], "HOME": self.base, "PYTHONUNBUFFERED": "1"}
        with open(self.logs[m], "a") as log:
            # nsenter --net only: the Mayor keeps the machine's mounts and cgroups (ip netns exec remounts /sys).
            self.mayors[m] = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{self.hosts[m].netns}", *keg_command(), "mayor", "run",
                 "--url", self.url, "--token-file", token_file, "--name", m, "--data", self.data(m),
                 "--runtime", "runc", "--address", self.hosts[m].address, "--cpus", "2", "--memory", "2Gi",
                 "--heartbeat", str(HEARTBEAT)],
                stdout=log, stderr=subprocess.STDOUT, env=env)

    def data(self, m: str) -> str:
        return os.path.join(self.base, f"{m}.data")

    def log(self) -> str:
        return "".join(f"\n--- {name}\n{read_text(path)[-3000:]}" for name, path in self.logs.items())

    def close(self) -> None:
        try:
            for proc in self.mayors.values():
                if proc.poll() is None:
                    proc.terminate()
            for proc in self.mayors.values():
                stop_waiting(proc, timeout=30)
            for m in MACHINES:  # the containers outlive their Mayor: remove them as an operator would
                if os.path.isdir(self.data(m)):
                    rt = RuncRuntime(Away(), self.data(m), m)
                    try:
                        for have in rt.actual().values():
                            rt.remove(have.container)
                    finally:
                        rt.close()
        finally:
            self.net.close()  # the scheduler, router (and its nginx) and master, then the namespaces
            subprocess.run(["umount", "-R", "-l", self.base], capture_output=True, check=False)
            subprocess.run(["rm", "-rf", self.base], check=True)

    # -------------------------------------------------------------- the keg

    def admin(self, fn):
        """``fn(RemoteKeg)`` as admin, with its sockets made inside ctl."""
        with self.net.entered(self.ctl):
            with RemoteKeg(self.url, self.token, timeout=20) as k:
                return fn(k)

    def _master_up(self):
        try:
            return self.admin(lambda k: k.revision())
        except KegError:
            return None

    def exists(self, path: str) -> bool:
        return self.admin(lambda k: k.exists(path))

    def read_json(self, path: str):
        try:
            return json.loads(self.admin(lambda k: k.read(path)))
        except NotFound:
            return None

    def run(self, argv: list, timeout: float = 300) -> subprocess.CompletedProcess:
        """A command in ctl, as the user: ``KEG_URL``, ``KEG_TOKEN``, the keg command on ``PATH``."""
        return self.net.run(self.ctl, argv, env=self.env, capture_output=True, text=True, timeout=timeout)

    def keg(self, *args) -> str:
        done = self.run([*keg_command(), *args])
        assert done.returncode == 0, f"keg {' '.join(args)}: {done.stderr}"
        return done.stdout

    def apply_job(self, name: str, image: str, replicas: int, **more) -> None:
        job = {"image": self.images[image], "replicas": replicas, "port": True, "args": HTTPD,
               "resources": {"cpu": 0.1, "memory": 33554432},
               # Tolerant of a slow answer: on a busy two-core machine a probe can take a second.
               "health": {"http": "/", "interval": 0.5, "timeout": 3, "threshold": 3},
               "stop_grace": 2, "restart": "always", **more}
        done = self.net.run(self.ctl, [*keg_command(), "job", "apply", "--name", name, "-"], env=self.env,
                            input=json.dumps(job), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr

    def remove_job(self, *names: str) -> None:
        self.keg("job", "rm", *names)
        for name in names:
            wait_until(lambda name=name: not self.replicas(name), f"{name}'s replicas to go", timeout=WAIT,
                       log=self.log)

    # ---------------------------------------------------------- observation

    def replicas(self, job: str) -> dict:
        """``{name: (machine, spec)}`` of every process table entry of ``job``."""
        def read(k):
            rev = k.revision().number
            found = {}
            for m in MACHINES:
                try:
                    entries = k.list(f"/machines/{m}/procs", rev=rev)
                except NotFound:
                    continue
                for e in entries:
                    spec = json.loads(k.read(e.path, rev=rev))
                    if spec.get("job") == job:
                        found[e.path.rsplit("/", 1)[1][:-5]] = (m, spec)
            return found
        return self.admin(read)

    def healthy(self, job: str, service: str | None = None) -> list:
        """The healthy lines of the job in its service table."""
        try:
            text = self.admin(lambda k: k.read(f"/services/{service or job}.tsv")).decode()
        except NotFound:
            return []
        return [line.split("\t") for line in text.splitlines()
                if not line.startswith("#") and line.split("\t")[4] == "healthy" and line.split("\t")[5] == job]

    def wait_healthy(self, job: str, count: int, service: str | None = None) -> list:
        """Wait until the service table lists ``count`` healthy replicas of ``job`` and the router, which
        follows the table a moment later, answers for it."""
        found = wait_until(lambda: (lambda h: h if len(h) == count else None)(self.healthy(job, service)),
                           f"{count} healthy replicas of {job}", timeout=WAIT, log=self.log)
        wait_until(lambda: self.get(service or job, times=5)[0] == 200, f"the router to route {job}",
                   timeout=WAIT, log=self.log)
        return found

    def get(self, service: str, times: int = 1) -> tuple:
        """GETs of / through the router by host name: (status, body) of the first that is not 200, else
        of the last."""
        done = self.run([sys.executable, "-c", GET, self.ctl.address, str(ROUTER_PORT), f"{service}.{DOMAIN}",
                         str(times)], timeout=60)
        status, _, body = done.stdout.partition(" ")
        return int(status or 0), body

    def containers(self, m: str, job: str | None = None) -> dict:
        """``{process name: status}`` of the runc containers on machine ``m`` (of ``job``'s replicas only, when
        given), as runc itself lists them: what really runs, whatever the tables say."""
        listed = Runc(os.path.join(self.data(m), "runc")).list()
        found = {c["id"].split(".", 1)[1]: c["status"] for c in listed}
        return {n: st for n, st in found.items() if job is None or n.startswith(job + "-")}

    def running(self, job: str) -> dict:
        """``{process name: machine}`` of the running runc containers of ``job`` on every machine."""
        return {n: m for m in MACHINES for n, st in self.containers(m, job).items() if st == "running"}

    def load(self, service: str, clients: int = 2, path: str = "/") -> Load:
        return Load(ROUTER_PORT, path, f"{service}.{DOMAIN}", clients, self.ctl.address,
                    lambda argv, **kw: self.net.popen(self.ctl, argv, **kw))


GET = r"""
import http.client, sys
for _ in range(int(sys.argv[4])):
    conn = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=30)
    conn.request("GET", "/", headers={"Host": sys.argv[3]})
    r = conn.getresponse()
    status, body = r.status, r.read().decode()
    conn.close()
    if status != 200:
        break
print(status, body, end="")
"""


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    try:
        yield c
    finally:
        c.close()


# ---------------------------------------------------------------- help and usage


@pytest.mark.parametrize("script", ["rolling-restart", "canary", "drain-machine"])
def test_every_script_has_help_and_refuses_bad_usage(script):
    done = subprocess.run([policy(script), "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.startswith(f"Usage: {script} ") and "Exit status" in done.stdout
    done = subprocess.run([policy(script), "--bogus"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "unknown option --bogus" in done.stderr
    done = subprocess.run([policy(script)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "give" in done.stderr


def test_the_library_reads_and_writes_json_fields_by_compare_and_swap(master_server):
    env = {"PATH": os.path.dirname(keg_command()[0]) + ":" + os.environ["PATH"], "KEG_URL": master_server.url,
           "KEG_TOKEN": master_server.token, "HOME": os.environ["HOME"]}
    script = f""". {policy('keg.sh')}
printf '%s' '{{"a": {{"b": "x y"}}, "n": 2}}' | keg put /t.json >/dev/null
keg_json_field /t.json a.b
keg_json_field /t.json n
keg_json_field /t.json missing fallback
keg_json_field /t.json missing; echo "missing: $?"
keg_update_json /t.json a.c '[1]' n 3 >/dev/null && keg cat /t.json | keg_json get .
rev=$(keg_head)
(sleep 1; echo '{{}}' | keg put /t.json >/dev/null) &
keg_wait_change /t.json 20 "$rev" | cut -f3
keg_wait_change /t.json 1; echo "quiet: $?"
printf '# machine\\taddress\\tport\\tprocess\\thealth\\tjob\\trelease\\nm1\\t10.0.0.1\\t1\\tK-1\\thealthy\\tweb\\t1\\nm2\\t10.0.0.2\\t2\\tK-2\\tstarting\\tweb\\t1\\n' | keg_tsv_rows job=web health=healthy | cut -f1
"""
    done = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:4] == ["x y", "2", "fallback", "missing: 1"]
    assert json.loads("\n".join(lines[4:-3])) == {"a": {"b": "x y", "c": [1]}, "n": 3}
    assert lines[-3:] == ["/t.json", "quiet: 124", "m1"]


# ---------------------------------------------------------------- the policies, with load


def test_rolling_restart_replaces_every_replica_with_no_failed_request(cluster):
    cluster.apply_job("rr", "v1", 2)
    cluster.wait_healthy("rr", 2)
    before = set(cluster.replicas("rr"))
    load = cluster.load("rr")
    done = cluster.run([policy("rolling-restart"), "--timeout", "60", "rr"])
    result = load.finish()
    print(done.stderr, result)
    assert done.returncode == 0, done.stderr + cluster.log()
    assert "rr: done: 2 new replica(s) healthy" in done.stderr
    after = cluster.replicas("rr")
    assert len(after) == 2 and not set(after) & before, (before, after)
    assert all(spec["env"].get("KEG_RESTARTED_AT") for _, spec in after.values())
    assert result["failed"] == 0, result["errors"]
    assert result["ok"] > 50 and result["seen"] == {"v1": result["ok"]}
    assert len(cluster.healthy("rr")) == 2
    cluster.remove_job("rr")


# ---------------------------------------------------------------- scaling and a lost machine, with real containers


def test_keg_scale_starts_and_stops_real_containers_with_no_failed_request(cluster):
    cluster.apply_job("sc", "v1", 1)
    cluster.wait_healthy("sc", 1)
    assert cluster.keg("scale", "sc=4").split("\t")[:2] == ["sc", "1 -> 4"]

    # Up: four healthy replicas, spread over the three machines, each a running runc container there.
    lines = cluster.wait_healthy("sc", 4)
    assert sorted(Counter(line[0] for line in lines).values()) == [1, 1, 2], lines
    table = {name: m for name, (m, _) in cluster.replicas("sc").items()}
    assert len(table) == 4 and wait_until(lambda: cluster.running("sc") == table and table,
                                          "a running container for each replica", timeout=WAIT, log=cluster.log)
    ps = json.loads(cluster.keg("ps", "--json"))
    assert sorted((p["machine"], p["name"], p["state"], p["health"]) for p in ps if p["name"] in table) == \
        sorted((m, n, "running", "healthy") for n, m in table.items())

    # Down, under load: three containers stopped and removed on their machines (not only their table entries),
    # and no request failed: a replica leaves the service table in the transaction that removes it.
    load = cluster.load("sc")
    assert cluster.keg("scale", "sc=1").split("\t")[:2] == ["sc", "4 -> 1"]
    cluster.wait_healthy("sc", 1)
    kept = wait_until(lambda: (lambda r: r if len(r) == 1 else None)(cluster.replicas("sc")),
                      "one replica in the tables", timeout=WAIT, log=cluster.log)
    (name, (machine, _)), = kept.items()
    wait_until(lambda: all(set(cluster.containers(m, "sc")) == ({name} if m == machine else set())
                           for m in MACHINES), "the other three containers to be gone", timeout=WAIT, log=cluster.log)
    result = load.finish()
    print(result)
    assert cluster.running("sc") == {name: machine}
    assert [(p["machine"], p["name"]) for p in json.loads(cluster.keg("ps", "--json")) if p["name"].startswith("sc-")] \
        == [(machine, name)]
    assert result["failed"] == 0, result["errors"]
    assert result["ok"] > 20 and result["seen"] == {"v1": result["ok"]}
    cluster.remove_job("sc")
    wait_until(lambda: not cluster.running("sc"), "the last container to go", timeout=WAIT, log=cluster.log)


def test_a_killed_mayors_replicas_run_elsewhere_within_the_lease_ttl_plus_5_s(cluster):
    cluster.apply_job("ka", "v1", 3)
    lines = cluster.wait_healthy("ka", 3)
    assert sorted(line[0] for line in lines) == list(MACHINES)  # spread: one on each machine
    victim = "m2"
    others = [m for m in MACHINES if m != victim]
    lost = {name for name, (m, _) in cluster.replicas("ka").items() if m == victim}
    assert len(lost) == 1 and set(cluster.containers(victim, "ka")) == lost

    load = cluster.load("ka")
    cluster.mayors[victim].kill()  # SIGKILL: no goodbye, its heartbeat just stops
    killed = time.monotonic()
    cluster.mayors[victim].wait()

    def elsewhere():
        """The job's full count healthy in its service and really running, none of it on the victim."""
        lines = cluster.healthy("ka")
        if len(lines) != 3 or victim in {line[0] for line in lines}:
            return None
        table = {name: m for name, (m, _) in cluster.replicas("ka").items()}
        if len(table) != 3 or victim in table.values():
            return None
        running = {n: m for m in others for n, st in cluster.containers(m, "ka").items() if st == "running"}
        return (lines, table) if running == table else None

    lines, table = wait_until(elsewhere, "ka's replicas running off the dead machine", timeout=LEASE_TTL + 5 + WAIT,
                              log=cluster.log, poll=0.1)
    took = time.monotonic() - killed
    print(f"kill -> {len(table)} replicas running elsewhere: {took:.1f} s (lease TTL {LEASE_TTL:g} s)")
    assert took <= LEASE_TTL + 5, f"{took:.1f} s from the kill to running elsewhere, lease TTL {LEASE_TTL:g} s"
    assert sorted(Counter(table.values()).values()) == [1, 2] and set(table.values()) == set(others)
    # The dead machine's replica is not silently lost: its entry left the table for an eviction record.
    for name in lost:
        record = cluster.read_json(f"/machines/{victim}/evicted/{name}.json")
        assert record["job"] == "ka" and record["machine"] == victim, record
        assert f"machine {victim}'s lease expired" in record["reason"] and f"lease {LEASE_TTL:g} s" in record["reason"]
        assert record["replaced_by"] and all(table.get(r.split("@")[0]) == r.split("@")[1] != victim
                                             for r in record["replaced_by"]), (record, table)
    assert not cluster.exists(f"/machines/{victim}/procs")
    # Only the dead machine lost its lease (a heartbeat a second keeps the others' alive on a busy machine).
    evictions = [line for line in read_text(cluster.logs["scheduler"]).splitlines() if "scheduler: evict " in line]
    assert sorted(line.split()[3] for line in evictions if line.split()[3].startswith("ka-")) == sorted(lost), evictions
    assert all(f"from {victim}:" in line for line in evictions), evictions
    # …and its container outlives its Mayor: still running, though no longer routed to.
    assert cluster.containers(victim, "ka") == dict.fromkeys(lost, "running")
    result = load.finish()
    print(result)
    assert result["failed"] == 0, result["errors"]
    assert result["ok"] > 20 and result["seen"] == {"v1": result["ok"]}
    assert cluster.get("ka") == (200, "v1\n")

    # The Mayor comes back: what its table no longer lists is stopped and removed, and its status cleared.
    cluster.start_mayor(victim)
    wait_until(lambda: not cluster.containers(victim, "ka"), f"the evicted container on {victim} to go",
               timeout=WAIT, log=cluster.log)
    wait_until(lambda: json.loads(cluster.keg("ps", "-m", victim, "--json")) == [], f"{victim}'s status to clear",
               timeout=WAIT, log=cluster.log)
    assert cluster.read_json(f"/machines/{victim}/status/mayor.json")["heartbeat"] > time.time() - LEASE_TTL
    assert {name: m for name, (m, _) in cluster.replicas("ka").items()} == table  # nothing moved back by itself
    # …and the machine is usable again: a new replica goes there (it has the fewest of the job).
    cluster.keg("scale", "ka=4")
    lines = cluster.wait_healthy("ka", 4)
    assert sorted(line[0] for line in lines) == sorted([*table.values(), victim])
    wait_until(lambda: set(cluster.running("ka").values()) == set(MACHINES), f"a running container on {victim}",
               timeout=WAIT, log=cluster.log)
    cluster.remove_job("ka")
    wait_until(lambda: not cluster.running("ka"), "ka's containers to go", timeout=WAIT, log=cluster.log)


def test_canary_is_promoted_with_no_failed_request(cluster):
    cluster.apply_job("cn", "v1", 2)
    cluster.wait_healthy("cn", 2)
    load = cluster.load("cn")
    done = cluster.run([policy("canary"), "cn", "--image", cluster.images["v2"], "--window", "4",
                        "--access-log", os.path.join(cluster.router_data, "access.log"), "--min-requests", "5",
                        "--max-error-rate", "0", "--release", "2", "--timeout", "60"])
    result = load.finish()
    print(done.stderr, result)
    assert done.returncode == 0, done.stderr + cluster.log()
    assert "cn: promoted" in done.stderr and "failed" not in done.stderr.replace(", 0 failed", "")
    job = cluster.read_json("/jobs/cn.json")
    assert job["image"] == cluster.images["v2"] and job["release"] == 2
    assert not cluster.exists("/jobs/cn-canary.json")
    wait_until(lambda: not cluster.replicas("cn-canary"), "the canary's replica to go", log=cluster.log)
    assert {spec["image"] for _, spec in cluster.replicas("cn").values()} == {cluster.images["v2"]}
    assert result["failed"] == 0, result["errors"]
    # Both releases answered while it ran: the canary got its share during the window.
    assert result["seen"].get("v1", 0) > 10 and result["seen"].get("v2", 0) > 10, result["seen"]
    assert cluster.get("cn") == (200, "v2\n")
    cluster.remove_job("cn")


def test_a_canary_whose_health_check_fails_reverts_by_itself(cluster):
    cluster.apply_job("cb", "v1", 2)
    cluster.wait_healthy("cb", 2)
    kid_before = cluster.admin(lambda k: k.kid("/jobs/cb.json"))
    load = cluster.load("cb", clients=1)
    done = cluster.run([policy("canary"), "cb", "--image", cluster.images["broken"], "--window", "3",
                        "--timeout", "60"])
    result = load.finish()
    print(done.stderr, result)
    assert done.returncode == 1, done.stderr
    assert "cb: reverting: the canary" in done.stderr and "cb: reverted" in done.stderr
    assert "unhealthy" in done.stderr or "backoff" in done.stderr
    assert cluster.admin(lambda k: k.kid("/jobs/cb.json")) == kid_before  # the job was never touched
    assert not cluster.exists("/jobs/cb-canary.json")
    wait_until(lambda: not cluster.replicas("cb-canary"), "the canary's replica to go", log=cluster.log)
    assert result["failed"] == 0 and result["seen"] == {"v1": result["ok"]}, result
    cluster.remove_job("cb")


def test_drain_machine_moves_every_replica_off_with_the_service_answering(cluster):
    cluster.apply_job("dr", "v1", 2)
    cluster.wait_healthy("dr", 2)
    machine = sorted(m for m, _ in cluster.replicas("dr").values())[0]
    load = cluster.load("dr")
    done = cluster.run([policy("drain-machine"), "--timeout", "120", machine])
    result = load.finish()
    print(done.stderr, result)
    assert done.returncode == 0, done.stderr + cluster.log()
    assert f"{machine}: drained: no processes left" in done.stderr
    assert cluster.read_json(f"/machines/{machine}/machine.json")["unschedulable"] is True
    assert not cluster.exists(f"/machines/{machine}/procs")  # an empty directory is no directory in git
    assert json.loads(cluster.keg("ps", "-m", machine, "--json")) == []
    assert machine not in {m for m, _ in cluster.replicas("dr").values()} and len(cluster.replicas("dr")) == 2
    assert result["failed"] == 0, result["errors"]
    assert result["ok"] > 20 and cluster.get("dr") == (200, "v1\n")

    done = cluster.run([policy("drain-machine"), "--undo", machine])
    assert done.returncode == 0 and "schedulable again" in done.stderr
    assert cluster.read_json(f"/machines/{machine}/machine.json")["unschedulable"] is False
    cluster.remove_job("dr")


def test_rolling_restart_stops_and_puts_the_job_back_when_a_new_replica_fails(cluster):
    # The job's program fails once it finds the restart's mark in its environment.
    args = ["/bin/sh", "-c", 'if [ -n "$KEG_RESTARTED_AT" ]; then echo no; exit 1; fi; exec httpd -f -p $PORT -h /www']
    cluster.apply_job("rf", "v1", 2, args=args, backoff={"start": 1, "max": 2})
    cluster.wait_healthy("rf", 2)
    before = set(cluster.replicas("rf"))
    kid_before = cluster.admin(lambda k: k.kid("/jobs/rf.json"))
    load = cluster.load("rf")
    done = cluster.run([policy("rolling-restart"), "--timeout", "60", "rf"])
    result = load.finish()
    print(done.stderr, result)
    assert done.returncode == 1, done.stderr
    assert "rf: stopped: new replica rf-" in done.stderr and "put back as it was" in done.stderr
    assert cluster.admin(lambda k: k.kid("/jobs/rf.json")) == kid_before
    # The scheduler removes the failing replica; the old ones served all along and stay (unless one of them
    # failed a health check meanwhile: then the scheduler replaced it, on the old spec).
    wait_until(lambda: (lambda r: len(r) == 2 and not any(s.get("env", {}).get("KEG_RESTARTED_AT")
                                                          for _, s in r.values()))(cluster.replicas("rf")),
               "the failing replica to go", timeout=WAIT, log=cluster.log)
    assert before & set(cluster.replicas("rf"))
    cluster.wait_healthy("rf", 2)
    assert result["failed"] == 0 and result["seen"] == {"v1": result["ok"]}, result
    cluster.remove_job("rf")


def test_a_canary_that_answers_errors_is_reverted_on_its_error_rate(cluster):
    cluster.apply_job("ce", "v1", 2)
    cluster.wait_healthy("ce", 2)
    kid_before = cluster.admin(lambda k: k.kid("/jobs/ce.json"))
    load = cluster.load("ce", path="/cgi-bin/app")
    done = cluster.run([policy("canary"), "ce", "--image", cluster.images["erroring"], "--window", "60",
                        "--access-log", os.path.join(cluster.router_data, "access.log"), "--min-requests", "10",
                        "--max-error-rate", "0.2", "--timeout", "60"])
    wait_until(lambda: not cluster.replicas("ce-canary"), "the canary's replica to go", log=cluster.log)
    result = load.finish()
    print(done.stderr, result)
    assert done.returncode == 1, done.stderr
    assert "ce: reverting: the canary failed" in done.stderr and "ce: reverted" in done.stderr
    assert cluster.admin(lambda k: k.kid("/jobs/ce.json")) == kid_before
    assert not cluster.exists("/jobs/ce-canary.json")
    # What failed is what the canary answered (a 500 is the application's answer: nginx does not retry it),
    # and it was reverted well before the 60 s window was over.
    assert result["failed"] > 0 and all(e.startswith("500 b'erroring") for e in result["errors"]), result
    assert result["seen"] == {"v1": result["ok"]}
    assert cluster.get("ce") == (200, "v1\n")
    cluster.remove_job("ce")
