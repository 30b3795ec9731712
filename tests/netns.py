"""Network namespaces for tests: a private network of hosts joined by one bridge, always removed.

A ``Network`` is a set of namespaces named ``kegt-<pid>-<random>-<role>``:
one holds only a bridge (the switch), and every ``host()`` is a namespace of
its own with a veth pair whose one end (``eth0``) is in the host and whose
other end is on the bridge.  Hosts get addresses in ``10.231.<k>.0/24``
(``k`` random, ``.1`` for the first host) and a route only to that subnet:
they reach each other and nothing else, not even the machine's loopback.
The veth pairs are created directly inside their namespaces, so no interface
ever appears in the machine's own network namespace.

    with Network() as net:
        server = net.host("master")
        client = net.host("m1")
        proc = net.popen(server, ["keg", "master", "serve", "--listen", f"{server.address}:0", ...])
        with net.entered(client):       # this thread's sockets are made inside m1
            RemoteKeg(url, token).read("/")

Leaving the ``with`` block, also on an error, ends every process started
with ``popen`` (TERM, then KILL) and deletes every namespace, which deletes
their interfaces.  Namespaces left by a test process that was killed before
it could clean up (its pid is no longer alive) are deleted by the next
``Network``.

Needs root and iproute2's ``ip``; ``unavailable()`` says why not, for a skip.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import shutil
import signal
import subprocess
from dataclasses import dataclass

PREFIX = "kegt"
CLONE_NEWNET = 0x40000000
STOP_GRACE = 5.0
NAME_RE = re.compile(rf"^{PREFIX}-(\d+)-[0-9a-f]+-")


class NetnsError(Exception):
    """An ``ip`` command failed while building or removing a network."""


def unavailable() -> str | None:
    """Why network namespaces cannot be made here (the tests then fail, saying so), or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's ip command is not installed"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def _namespaces() -> list:
    out = _ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list:
    """Delete the namespaces of test processes that died without cleaning up; returns their names."""
    removed = []
    for name in _namespaces():
        match = NAME_RE.match(name)
        if match and not _alive(int(match.group(1))):
            _ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


def _setns(fd: int) -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


@dataclass(frozen=True)
class Host:
    """One namespace on the network: its role, namespace name and address."""

    role: str
    netns: str
    address: str


class Started:
    """A context manager over ``start()`` and ``close()``: what a failed start made is closed again."""

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Network(Started):
    """A bridge in a namespace of its own and hosts attached to it (see the module's docstring).

    Args:
        subnet: the ``k`` of ``10.231.k.0/24``; random when not given.
    """

    def __init__(self, subnet: int | None = None):
        self.subnet = subnet if subnet is not None else 1 + secrets.randbelow(254)
        self.tag = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
        self.switch = f"{self.tag}-sw"
        self.hosts: list = []
        self.procs: list = []
        self._made: list = []

    # --------------------------------------------------------------- building

    def start(self) -> None:
        """Make the switch namespace with its bridge."""
        remove_stale()
        self._add_namespace(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def host(self, role: str) -> Host:
        """A new namespace with ``eth0`` on the bridge and the next address of the subnet.

        Args:
            role: a short name (letters, digits, '-'), part of the namespace's name.
        """
        if not re.match(r"^[a-z0-9-]{1,20}$", role):
            raise ValueError(f"{role!r} is not a short role name")
        number = len(self.hosts) + 1
        if number > 253:
            raise ValueError("a /24 holds at most 253 hosts here")
        name = f"{self.tag}-{role}"
        self._add_namespace(name)
        port = f"p{number}"
        _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", name)
        _ip("-n", self.switch, "link", "set", port, "master", "br0")
        _ip("-n", self.switch, "link", "set", port, "up")
        address = f"10.231.{self.subnet}.{number}"
        _ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", name, "link", "set", "eth0", "up")
        host = Host(role, name, address)
        self.hosts.append(host)
        return host

    # ------------------------------------------------------------ processes

    @staticmethod
    def command(host: Host, argv: list) -> list:
        """``argv`` wrapped to run inside ``host`` (``ip netns exec``, which execs it: same pid)."""
        return ["ip", "netns", "exec", host.netns, *argv]

    def popen(self, host: Host, argv: list, **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside ``host``; it is ended when the network is closed."""
        proc = subprocess.Popen(self.command(host, argv), **kwargs)
        self.procs.append(proc)
        return proc

    def run(self, host: Host, argv: list, **kwargs) -> subprocess.CompletedProcess:
        """Run ``argv`` inside ``host`` to the end (``subprocess.run`` arguments)."""
        kwargs.setdefault("timeout", 60)
        return subprocess.run(self.command(host, argv), **kwargs)

    @contextlib.contextmanager
    def entered(self, host: Host):
        """Move the calling thread into ``host``'s network namespace for the block.

        Sockets made inside the block stay in that namespace after it; a
        client that reconnects later must do so inside another such block.
        """
        here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            there = os.open(f"/run/netns/{host.netns}", os.O_RDONLY)
            try:
                _setns(there)
            finally:
                os.close(there)
            try:
                yield host
            finally:
                _setns(here)
        finally:
            os.close(here)

    # -------------------------------------------------------------- removal

    def stop(self, proc: subprocess.Popen, grace: float = STOP_GRACE) -> int:
        """End one process started here (TERM, then KILL after ``grace`` s); returns its exit status."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def close(self) -> None:
        """End the processes started here and delete every namespace made here (their interfaces go too)."""
        errors = []
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                self.stop(proc)
            except OSError as err:
                errors.append(str(err))
        self.procs = []
        for name in reversed(self._made):
            done = _ip("netns", "del", name, check=False)
            if done.returncode != 0 and name in _namespaces():
                errors.append(done.stderr.strip())
        self._made = []
        self.hosts = []
        if errors:
            raise NetnsError("could not remove everything: " + "; ".join(errors))

    def names(self) -> list:
        """The namespaces this network has made and not yet deleted."""
        return list(self._made)
