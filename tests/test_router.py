"""``keg router run``: nginx configured from /services/*.tsv, reloaded without dropping a connection.

Unit tests cover the table parser and the configuration (checked by the real
``nginx -t``). Integration tests run a master, the installed ``keg router
run`` (with Debian's nginx as its child) and small HTTP back ends on loopback,
write service tables by hand, and look at what a client of the router sees.

The helpers here (``Backend``, ``RouterProcess``, ``Load``, ``free_port``)
are shared with the policy tests (tests/test_policy.py).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import MasterProcess, free_port, init_keg_with_token, keg_command, wait_until
from keg.transaction import Transaction, delete, put
from master.client import RemoteKeg
from shell import router

NGINX = "/usr/sbin/nginx"
HEADER = "# machine\taddress\tport\tprocess\thealth\tjob\trelease\n"

# A back end: answers "NAME PATH PREFIX"; /slow?s=S sends the first half, waits S seconds, sends the rest.
BACKEND = r"""
import http.server, sys, time, urllib.parse
name = sys.argv[1]
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        body = f"{name} {self.path} {self.headers.get('X-Forwarded-Prefix', '-')}\n".encode()
        if url.path.endswith("/slow"):
            wait = float(urllib.parse.parse_qs(url.query).get("s", ["2"])[0])
            body = b"slow-start " + b"x" * 1000 + b" slow-end\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:500])
            self.wfile.flush()
            time.sleep(wait)
            self.wfile.write(body[500:])
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2]) if len(sys.argv) > 2 else 0), Handler)
server.daemon_threads = True
print(server.server_address[1], flush=True)
server.serve_forever()
"""

# A load: GETs through the router, one connection per request, until stdin closes; prints a JSON summary.
LOAD = r"""
import http.client, json, select, sys, time
host, port, path, hostname = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ok, failed, errors, seen = 0, 0, [], {}
while not select.select([sys.stdin], [], [], 0)[0]:
    try:
        conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.request("GET", path, headers={"Host": hostname} if hostname != "-" else {})
        response = conn.getresponse()
        body = response.read()
        conn.close()
        if response.status == 200:
            ok += 1
            key = (body.split() or [b"-"])[0].decode()
            seen[key] = seen.get(key, 0) + 1
        else:
            failed += 1
            errors.append(f"{response.status} {body[:200]!r}")
    except Exception as err:
        failed += 1
        errors.append(repr(err))
    time.sleep(0.005)
print(json.dumps({"ok": ok, "failed": failed, "errors": errors[:20], "seen": seen}), flush=True)
"""


# ---------------------------------------------------------------- helpers


class Backend:
    """A small HTTP server on loopback that names itself in every answer."""

    def __init__(self, name: str):
        self.name = name
        self.proc = subprocess.Popen([sys.executable, "-c", BACKEND, name], stdout=subprocess.PIPE, text=True)
        self.port = int(self.proc.stdout.readline())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def table(*rows) -> str:
    """A /services table: rows of (port, health[, address])."""
    lines = [HEADER]
    for i, row in enumerate(rows):
        port, health, address = (*row, "127.0.0.1")[:3]
        lines.append(f"m{i}\t{address}\t{port}\tK-{i:040x}\t{health}\tweb\t1\n")
    return "".join(lines)


class RouterProcess:
    """The installed ``keg router run`` on a free loopback port, with a data directory under ``base``."""

    def __init__(self, url: str, token: str, base: str, domain: str = "keg.localhost"):
        self.port = free_port()
        self.domain = domain
        self.data = os.path.join(base, f"router-{self.port}")
        self.log_path = self.data + ".log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [*keg_command(), "router", "run", "--url", url, "--token", token, "--listen",
                 f"127.0.0.1:{self.port}", "--domain", domain, "--nginx", NGINX, "--data", self.data],
                stdout=log, stderr=subprocess.STDOUT, env={"PATH": os.environ["PATH"], "HOME": base})
        wait_until(lambda: "listening on" in self.log() or self.proc.poll() is not None, "the router to start",
                   timeout=30, log=self.log)
        assert self.proc.poll() is None, self.log()

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def access_log(self) -> str:
        try:
            with open(os.path.join(self.data, "access.log")) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def nginx_pids(self) -> list:
        """Pids of nginx processes (master and workers) serving this router's data directory."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read()
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if stat[stat.rindex(b")") + 2:].split()[0] in (b"Z", b"X"):
                continue
            if cmd.startswith(b"nginx: ") or b"/nginx\0" in cmd:
                if self.data.encode() in cmd or self._child_of_ours(int(entry)):
                    found.append(int(entry))
        return found

    def _child_of_ours(self, pid: int) -> bool:
        try:
            with open(os.path.join(self.data, "nginx.pid")) as f:
                master = int(f.read())
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            return int(stat[stat.rindex(b")") + 2:].split()[1]) == master
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return False

    def get(self, path: str, host: str | None = None, timeout: float = 30):
        """``(status, body text, headers)`` of a GET through the router."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path, headers={"Host": host} if host else {})
            response = conn.getresponse()
            return response.status, response.read().decode(), dict(response.getheaders())
        finally:
            conn.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"keg router run did not stop on SIGTERM: {self.log()}") from None
        return self.proc.returncode


class Load:
    """Clients sending GETs through a router as fast as they can, until ``finish()``; counts failures."""

    def __init__(self, port: int, path: str = "/", host: str = "-", clients: int = 2, address: str = "127.0.0.1",
                 popen=subprocess.Popen):
        """``popen``: how to start a client (a network namespace's own, to load from inside it)."""
        self.procs = [popen([sys.executable, "-c", LOAD, address, str(port), path, host],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                      for _ in range(clients)]

    def finish(self) -> dict:
        """Stop the clients; ``{"ok": N, "failed": N, "errors": [...], "seen": {backend: N}}`` of them all."""
        total = {"ok": 0, "failed": 0, "errors": [], "seen": {}}
        for proc in self.procs:
            out, _ = proc.communicate(input="", timeout=60)
            one = json.loads(out)
            total["ok"] += one["ok"]
            total["failed"] += one["failed"]
            total["errors"] += one["errors"]
            for k, v in one["seen"].items():
                total["seen"][k] = total["seen"].get(k, 0) + v
        return total


@pytest.fixture(scope="module")
def base():
    """A directory nginx's unprivileged workers can search (they write temporary files under the data dir)."""
    path = tempfile.mkdtemp(prefix="keg-router-")
    os.chmod(path, 0o711)
    yield path
    subprocess.run(["rm", "-rf", path], check=True)


@pytest.fixture(scope="module")
def master(base):
    keg_path = os.path.join(base, "keg")
    server = MasterProcess(keg_path, init_keg_with_token(keg_path))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def admin(master):
    client = RemoteKeg(master.url, master.token, timeout=20)
    yield client
    client.close()


@pytest.fixture
def backends():
    made = []

    def make(name: str) -> Backend:
        made.append(Backend(name))
        return made[-1]

    yield make
    for b in made:
        b.stop()


@pytest.fixture
def services(admin):
    """Write /services tables by hand (the scheduler's job); removed after the test."""
    written = set()

    def write(service: str, text: str) -> None:
        path = f"/services/{service}.tsv"
        assert admin.apply(Transaction((put(path, text),))).ok
        written.add(path)

    yield write
    left = [delete(p) for p in written if admin.exists(p)]
    if left:
        assert admin.apply(Transaction(tuple(left))).ok


@pytest.fixture
def the_router(master, base):
    r = RouterProcess(master.url, master.token, base)
    yield r
    assert r.stop() == 0, r.log()
    assert r.nginx_pids() == [], "nginx outlived the router"
    assert "Traceback" not in r.log(), r.log()


def settled(r: RouterProcess, path: str, want, what: str, host=None) -> None:
    """Wait until 5 answers in a row satisfy ``want((status, body))``.

    For a moment after a reload, a new connection may still be accepted by an old worker, on the previous
    configuration (nginx closes the old workers' listening sockets just after starting the new ones).
    """
    wait_until(lambda: all(want(answer(r, path, host)) for _ in range(5)), what, log=r.log)


def answer(r: RouterProcess, path: str, host=None):
    try:
        status, body, _ = r.get(path, host)
        return status, body
    except OSError as err:
        return None, repr(err)


# ---------------------------------------------------------------- unit


def test_a_table_is_read_by_its_header_and_bad_lines_are_left_out():
    text = ("# port\tmachine\textra\taddress\thealth\n"
            "20001\tm1\tx\t10.0.0.1\thealthy\n"
            "99999\tm2\tx\t10.0.0.2\thealthy\n"
            "20003\tm3\tx\t10.0.0.3; evil\thealthy\n"
            "\n"
            "20004\tm4\tx\tfd00::4\tstarting\n")
    warnings = []
    endpoints = router.parse_services_tsv(text, warnings.append)
    assert [(e.machine, e.hostport, e.health) for e in endpoints] == [
        ("m1", "10.0.0.1:20001", "healthy"), ("m4", "[fd00::4]:20004", "starting")]
    assert len(warnings) == 2 and "99999" in warnings[0] and "evil" in warnings[1]
    # Without a header: the columns of docs/namespace.md.
    [e] = router.parse_services_tsv("m1\t127.0.0.1\t20001\tK-1\thealthy\tweb\t1\n")
    assert (e.address, e.port, e.health, e.process) == ("127.0.0.1", 20001, "healthy", "K-1")
    assert [e.port for e in router.healthy(router.parse_services_tsv(table((1, "healthy"), (2, "unhealthy"),
                                                                          (3, "starting"), (1, "healthy"))))] == [1]


def test_the_configuration_is_checked_by_nginx_and_is_a_function_of_its_input(tmp_path):
    services = {
        "web": router.parse_services_tsv(table((20001, "healthy"), (20002, "starting"), (20003, "healthy", "fd00::3"))),
        "idle": router.parse_services_tsv(table((20004, "unhealthy"))),
        "none": [],
    }
    text = router.render_config(services, "127.0.0.1:8080", "apps.example.com", str(tmp_path))
    assert text == router.render_config(dict(reversed(services.items())), "127.0.0.1:8080", "apps.example.com",
                                        str(tmp_path))
    assert "server 127.0.0.1:20001" in text and "server [fd00::3]:20003" in text and ":20002" not in text
    assert "upstream keg-idle" not in text and "service idle has no healthy endpoint" in text
    assert "server_name web.apps.example.com;" in text and "/etc/nginx" not in text
    nginx = router.Nginx(NGINX, str(tmp_path))
    nginx.check(text)  # raises when nginx -t refuses it
    nginx.check(router.render_config({}, "[::1]:8080", "keg.localhost", str(tmp_path)))
    with pytest.raises(router.RouterError, match="nginx -t refused"):
        nginx.check(text.replace("events {", "events { bogus_directive 1;"))


def test_bad_options_are_refused_before_anything_starts(tmp_path):
    done = subprocess.run([*keg_command(), "router", "run", "--url", "http://127.0.0.1:1", "--listen", "nowhere",
                           "--data", str(tmp_path / "r")], capture_output=True, text=True)
    assert done.returncode == 2 and "is not HOST:PORT" in done.stderr
    assert not (tmp_path / "r").exists()
    done = subprocess.run([*keg_command(), "router", "run", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "/SERVICE/" in done.stdout


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")   # the dropped exception, on purpose
def test_a_stop_signal_dropped_by_a_finalizer_still_stops_the_loop(monkeypatch):
    # SIGTERM can arrive while the garbage collector closes a watch stream's connection; Python then prints the
    # handler's exception ("Exception ignored in ...") and drops it.  The loop must stop all the same.
    class ClosedByTheCollector:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)   # the handler runs here, inside the finalizer

    rounds = []

    def step(timeout=router.IDLE_CHECK):
        rounds.append(timeout)
        assert len(rounds) < 5, "the router went on after SIGTERM"
        ClosedByTheCollector()

    loop = router.Router(None, None, "127.0.0.1:1", "keg.localhost")
    monkeypatch.setattr(loop, "step", step)
    monkeypatch.setattr(router._STOP, "requested", "")
    previous = signal.signal(signal.SIGTERM, router._raise_stopped)
    try:
        with pytest.raises(router.Stopped, match="SIGTERM"):
            loop.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert len(rounds) == 1


# ---------------------------------------------------------------- integration


def test_hosts_and_path_prefixes_reach_healthy_endpoints_only(the_router, services, backends):
    a, b = backends("a"), backends("b")
    services("web", table((a.port, "healthy"), (b.port, "unhealthy")))
    services("empty", HEADER)
    r = the_router
    settled(r, "/empty/", lambda a: a[0] == 503, "the router to know web and empty")
    settled(r, "/web/x", lambda a: a[0] == 200, "the router to route web")

    status, body, headers = r.get("/hello?q=1", host="web.keg.localhost")
    assert (status, body) == (200, "a /hello?q=1 -\n") and headers["Server"] == "nginx"
    status, body, _ = r.get("/web/deep/path?q=1")  # the prefix is removed and passed on
    assert (status, body) == (200, "a /deep/path?q=1 /web\n")
    status, _, headers = r.get("/web?x=1")
    assert status == 301 and headers["Location"].endswith("/web/?x=1")
    assert {r.get("/web/")[1].split()[0] for _ in range(10)} == {"a"}  # never the unhealthy one

    status, body, _ = r.get("/", host="empty.keg.localhost")
    assert status == 503 and "service empty has no healthy endpoint" in body
    assert r.get("/empty/")[0] == 503
    status, body, _ = r.get("/", host="nope.keg.localhost")
    assert status == 404 and "no service named nope under keg.localhost" in body
    status, body, _ = r.get("/nope/")
    assert status == 404 and "http://<service>.keg.localhost/" in body and "services: empty web" in body

    lines = [line.split("\t") for line in r.access_log().splitlines()]
    assert ["web", "200", f"127.0.0.1:{a.port}", "200"] in [line[1:5] for line in lines]


def test_changes_are_followed_and_a_dead_endpoint_costs_no_failed_request(the_router, services, backends):
    a, b = backends("a"), backends("b")
    # Listed healthy, bound but not listening (so no other process can take the port): refused, retried.
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead = closed.getsockname()[1]
    services("web", table((a.port, "healthy"), (dead, "healthy")))
    r = the_router
    settled(r, "/web/", lambda a: a[0] == 200, "web to be routed")
    answers = [answer(r, "/web/") for _ in range(20)]
    assert set(answers) == {(200, "a / /web\n")}, answers

    services("web", table((a.port, "healthy"), (b.port, "healthy"), (dead, "healthy")))
    wait_until(lambda: answer(r, "/web/")[1].startswith("b"), "b to be routed", log=r.log)
    services("web", table((b.port, "healthy"), (a.port, "starting")))
    settled(r, "/web/", lambda a: a[1].startswith("b"), "a to leave")
    b.stop()  # the last endpoint goes away before the table says so: 502 from nginx, not a hang
    assert answer(r, "/web/")[0] == 502
    services("web", table((b.port, "unhealthy")))
    settled(r, "/web/", lambda a: a[0] == 503, "web to have no healthy endpoint")
    closed.close()


def test_a_slow_request_in_flight_survives_a_reload_and_the_stop(master, base, services, backends):
    slow = backends("slow")
    services("web", table((slow.port, "healthy")))
    r = RouterProcess(master.url, master.token, base)
    try:
        wait_until(lambda: answer(r, "/web/")[0] == 200, "web to be routed", log=r.log)
        first_master = r.nginx_pids()

        def start_slow(seconds: float):
            conn = http.client.HTTPConnection("127.0.0.1", r.port, timeout=30)
            conn.request("GET", f"/web/slow?s={seconds}")
            response = conn.getresponse()  # the headers and half the body are here; the rest is on its way
            assert response.status == 200
            return conn, response, response.read(100)

        conn, response, head = start_slow(5)
        started = time.monotonic()
        services("other", table((slow.port, "healthy")))  # a new configuration: nginx reloads
        wait_until(lambda: answer(r, "/other/")[0] == 200, "the reload", log=r.log)
        reloaded = time.monotonic() - started
        assert reloaded < 4.5, f"the reload took {reloaded:.1f} s, past the slow answer: the test proves nothing"
        with open(os.path.join(r.data, "error.log")) as f:
            assert "reconfiguring" in f.read()
        rest = response.read()
        assert head + rest == b"slow-start " + b"x" * 1000 + b" slow-end\n"
        conn.close()
        assert set(first_master) & set(r.nginx_pids()), "the nginx master was replaced, not reloaded"

        # SIGTERM to the router: nginx stops gracefully, finishing what it serves.
        conn, response, head = start_slow(2)
        r.proc.send_signal(signal.SIGTERM)
        rest = response.read()
        assert head + rest == b"slow-start " + b"x" * 1000 + b" slow-end\n"
        conn.close()
        assert r.proc.wait(timeout=30) == 0, r.log()
        assert r.nginx_pids() == []
        assert "stopping nginx" in r.log() and "Traceback" not in r.log()
        with pytest.raises(OSError):
            r.get("/web/")
    finally:
        r.stop()


def test_the_router_keeps_routing_while_the_master_is_away(base, backends):
    keg_path = os.path.join(base, "keg-away")
    m = MasterProcess(keg_path, init_keg_with_token(keg_path))
    a = backends("a")
    with RemoteKeg(m.url, m.token) as client:
        assert client.apply(Transaction((put("/services/web.tsv", table((a.port, "healthy"))),))).ok
    r = RouterProcess(m.url, m.token, base)
    try:
        wait_until(lambda: answer(r, "/web/")[0] == 200, "web to be routed", log=r.log)
        m.stop()
        until = time.monotonic() + 3  # longer than the router's idle look (IDLE_CHECK, 2 s)
        while time.monotonic() < until:
            assert answer(r, "/web/")[0] == 200
        assert r.proc.poll() is None, r.log()
        m.start()
        with RemoteKeg(m.url, m.token) as client:
            assert client.apply(Transaction((put("/services/web.tsv", table((a.port, "unhealthy"))),))).ok
        wait_until(lambda: answer(r, "/web/")[0] == 503, "the router to catch up", log=r.log)
    finally:
        assert r.stop() == 0, r.log()
        m.stop()
