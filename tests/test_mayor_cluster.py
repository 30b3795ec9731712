"""Several machines: a master and three Mayors, each in a network namespace of its own (DESIGN §5).

The master (``keg master serve``) and every Mayor run as real processes, each
inside its own namespace from ``tests/netns.py``, joined by a bridge: a Mayor
reaches the master only at the master's veth address.  The test itself works
as an operator from a fourth namespace.  Mayors run the no-op runtime
(containers are tested in test_container.py); what is shown here is that each
Mayor registers itself, acts on its own process table only, and reports
status under its own machine only.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

import keg
import netns
from conftest import init_keg_with_token, keg_command, read_text, wait_until
from keg.errors import NotFound
from keg.transaction import Transaction, delete, put
from master import auth
from master.client import RemoteKeg


@pytest.fixture(autouse=True)
def namespaces_available():
    """Fail, never skip, without root and `ip`: ./install.sh provides iproute2 and CI runs as root."""
    why = netns.unavailable()
    if why is not None:
        pytest.fail(why)

MACHINES = ("m1", "m2", "m3")
WAIT = 20.0
START_TIMEOUT = 20.0
SPEC = '{"image": "K-1", "args": ["serve"], "restart": "always"}'


def mayor_command(url: str, token_file: str, name: str, data: str) -> list:
    """The installed ``keg mayor run`` with the no-op runtime."""
    return [*keg_command(), "mayor", "run", "--url", url, "--token-file", token_file, "--name", name,
            "--data", data, "--runtime", "noop"]


def wait_for(what: str, condition, logs=(), timeout: float = WAIT):
    """``wait_until``, failing with the tails of the Mayors' logs."""
    return wait_until(condition, what, timeout,
                      log=lambda: "".join(f"\n--- {path}\n{read_text(path)[-2000:]}" for path in logs))


class Cluster:
    """The running network: master URL, admin token, the operator's host, and each Mayor's process and log."""

    def __init__(self, net, url, token, operator, mayors, logs, hosts):
        self.net, self.url, self.token, self.operator = net, url, token, operator
        self.mayors, self.logs, self.hosts = mayors, logs, hosts

    @staticmethod
    def read_json(admin, path: str):
        """The parsed object at ``path``, or None when there is none."""
        try:
            return json.loads(admin.read(path))
        except NotFound:
            return None

    def status(self, admin, machine: str, name: str):
        """The parsed status object of process ``name`` on ``machine``, or None."""
        return self.read_json(admin, f"/machines/{machine}/status/{name}.json")

    def actions(self, machine: str) -> list:
        """The plan lines a Mayor has logged (``keg mayor: start web (new): …``)."""
        return re.findall(r"^keg mayor: ((?:start|stop|remove) \S+ .*)$", read_text(self.logs[machine]), re.M)


def _start_master(net, host, keg_dir: str, log_path: str) -> str:
    with open(log_path, "w") as log:
        proc = net.popen(host, [*keg_command(), "master", "serve", "--keg", keg_dir,
                                "--listen", f"{host.address}:0"], stdout=subprocess.DEVNULL, stderr=log)
    pattern = re.compile(rf"at (http://{re.escape(host.address)}:\d+)")
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        match = pattern.search(read_text(log_path))
        if match:
            return match.group(1)
        assert proc.poll() is None, f"keg master serve exited: {read_text(log_path)}"
        time.sleep(0.02)
    raise AssertionError(f"keg master serve did not start: {read_text(log_path)}")


@pytest.fixture
def cluster(keg_dir, tmp_path):
    admin_token = init_keg_with_token(keg_dir)
    with keg.Store(keg_dir) as store:  # machine principals, before the master owns the keg
        tokens = {name: auth.add_user(store, name, machine=True) for name in MACHINES}
    with netns.Network() as net:
        master_host = net.host("master")
        operator = net.host("ops")
        hosts = {name: net.host(name) for name in MACHINES}
        url = _start_master(net, master_host, keg_dir, str(tmp_path / "master.log"))
        mayors, logs = {}, {}
        for name in MACHINES:
            token_file = tmp_path / f"token-{name}"
            token_file.write_text(tokens[name] + "\n")
            token_file.chmod(0o600)
            logs[name] = str(tmp_path / f"mayor-{name}.log")
            with open(logs[name], "w") as log:
                mayors[name] = net.popen(hosts[name], mayor_command(url, str(token_file), name,
                                                                    str(tmp_path / f"data-{name}")),
                                         stdout=log, stderr=subprocess.STDOUT)
        yield Cluster(net, url, admin_token, operator, mayors, logs, hosts)


def test_mayors_in_their_own_namespaces_each_act_on_their_own_table(cluster):
    c = cluster
    logs = list(c.logs.values())
    with c.net.entered(c.operator), RemoteKeg(c.url, c.token, timeout=5) as admin:
        # 1. Every Mayor registers its machine and reports a heartbeat.
        for name in MACHINES:
            machine = wait_for(f"{name} to register", 
                               lambda n=name: c.read_json(admin, f"/machines/{n}/machine.json"), logs)
            assert machine["name"] == name and machine["kid"].startswith("K-") and machine["runtime"] == "noop"
            wait_for(f"{name}'s heartbeat", lambda n=name: c.status(admin, n, "mayor"), logs)

        # 2. A process for m2 runs on m2 only.
        admin.apply(Transaction((put("/machines/m2/procs/web.json", SPEC),)))
        spec_kid = admin.kid("/machines/m2/procs/web.json")
        web = wait_for("web running on m2", lambda: (s := c.status(admin, "m2", "web")) and
                       s["state"] == "running" and s, logs)
        assert web["spec_kid"] == spec_kid
        assert c.status(admin, "m1", "web") is None and c.status(admin, "m3", "web") is None
        assert [line.split()[:2] for line in c.actions("m2")] == [["start", "web"]]

        # Control: m1 and m3 are alive and act on their own tables (so the silence above means something).
        admin.apply(Transaction((put("/machines/m1/procs/db.json", SPEC), put("/machines/m3/procs/db.json", SPEC))))
        for name in ("m1", "m3"):
            wait_for(f"db running on {name}", lambda n=name: (c.status(admin, n, "db") or {}).get("state")
                     == "running", logs)
        assert c.status(admin, "m2", "db") is None

        # 3. Deleting the spec stops the process and removes its status.
        admin.apply(Transaction((delete("/machines/m2/procs/web.json"),)))
        wait_for("web's status gone from m2", lambda: c.status(admin, "m2", "web") is None, logs)
        assert wait_for("m2's heartbeat to count 0 processes",
                        lambda: c.status(admin, "m2", "mayor")["processes"] == 0, logs)
        assert c.status(admin, "m1", "db")["state"] == "running"  # others untouched

    assert [line.split()[:2] for line in c.actions("m2")] == [["start", "web"], ["stop", "web"], ["remove", "web"]]
    for name in ("m1", "m3"):
        assert [line.split()[:2] for line in c.actions(name)] == [["start", "db"]]
        assert "web" not in read_text(c.logs[name])
    for name, proc in c.mayors.items():
        assert proc.poll() is None, f"the Mayor of {name} exited: {read_text(c.logs[name])}"


def test_a_network_is_isolated_and_removed_even_when_the_test_fails():
    with pytest.raises(RuntimeError, match="the test failed"):
        with netns.Network() as net:
            a, b = net.host("a"), net.host("b")
            made = net.names()
            routes = net.run(a, ["ip", "-4", "route", "show"], capture_output=True, text=True, check=True).stdout
            assert routes.split()[0] == f"10.231.{net.subnet}.0/24" and len(routes.strip().splitlines()) == 1
            # b listens on its veth address; a reaches it through the bridge.
            server = net.popen(b, [sys.executable, "-c", "import socket, sys\n"
                                   f"s = socket.create_server(('{b.address}', 7001))\n"
                                   "print('ready', flush=True)\nc, _ = s.accept()\nc.sendall(b'hello')\n"],
                               stdout=subprocess.PIPE, text=True)
            assert server.stdout.readline() == "ready\n"
            got = net.run(a, [sys.executable, "-c", "import socket\n"
                              f"print(socket.create_connection(('{b.address}', 7001), timeout=5).recv(5))"],
                          capture_output=True, text=True, check=True).stdout
            assert got.strip() == "b'hello'"
            sleeper = net.popen(a, ["sleep", "600"])
            raise RuntimeError("the test failed")
    assert sleeper.poll() is not None
    left = set(netns._namespaces())
    assert made and not left & set(made)
    assert not os.path.exists(f"/run/netns/{made[0]}")
