"""Raft clusters of real ``keg master serve`` processes for tests and bench/raft.py.

``Cluster`` starts N replicas of one keg (``keg init`` once, copied N times),
either on loopback ports (``net=None``) or each in a network namespace of its
own on one bridge (``tests/netns.py``), where the harness can also cut links
with iptables inside the namespaces.  Clients then run inside a ``client``
namespace (``cluster.client()`` as a context manager, per thread).

``Workload`` runs compare-and-swap clients on a few hot keys through any
replica, with transaction ids and retries of unknown outcomes, and records
the history that ``raft_history.check`` verifies; it also keeps every
acknowledged write, to prove none is lost.

With ``disks=True`` each replica's directory (its keg and its Raft journal)
is a lazyfs mount (``tests/lazyfs.py``) over ``r<i>.disk``, and
``Replica.power_cut`` / ``Cluster.power_cut_all`` kill replicas and drop
everything their disks had not synced.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import math
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse

from conftest import init_keg_with_token, keg_command, stop_waiting
from raft_history import Op

RAFT_PORT = 7481
HTTP_PORT = 7480
START_TIMEOUT = 30.0
SLOW_START = 5.0        # a start slower than this gets its threads' stacks dumped into its log (``stacks``)
# ``keg`` with faulthandler on SIGUSR1: the stacks of a replica that is slow to start go to its log.
STACKS_MAIN = ("import faulthandler, signal, sys; faulthandler.register(signal.SIGUSR1, all_threads=True); "
               "sys.argv[0] = 'keg'; from shell.cli import entry_point; sys.exit(entry_point())")


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def blob_kid(data: bytes) -> str:
    """The KID of a file holding ``data`` (its git blob id)."""
    return "K-" + hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Replica:
    """One ``keg master serve --raft-self`` process (restartable)."""

    def __init__(self, cluster: "Cluster", index: int, keg_path: str, raft: str, url: str, host=None):
        self.cluster = cluster
        self.index = index
        self.keg_path = keg_path
        self.raft = raft
        self.url = url
        self.host = host
        self.proc = None
        self.log_path = keg_path.rstrip("/") + ".log"
        self.disk = None               # a lazyfs.Disk when the cluster has disks
        self.started_at = None         # monotonic time of the last start
        self._next_dump = None         # when a slow start gets its stacks dumped next (``poll_started``)
        self.start_seconds = None      # how long the last start took until the replica said it serves

    def argv(self) -> list:
        listen = urllib.parse.urlsplit(self.url).netloc
        command = [sys.executable, "-c", STACKS_MAIN] if self.cluster.stacks else keg_command()
        return [*command, "master", "serve", "--keg", self.keg_path, "--listen", listen,
                "--raft-self", self.raft, "--raft-peers", self.cluster.peers_arg,
                "--raft-password-file", self.cluster.password_file, *self.cluster.extra]

    def start(self, wait: bool = True) -> None:
        """Start the process; with ``wait``, return once it listens."""
        with open(self.log_path, "ab") as log:
            self.log_start = log.tell()  # a byte offset: see ``log_since_start``
            self.start_seconds = None
            self.started_at = time.monotonic()
            self._next_dump = self.started_at + SLOW_START
            if self.host is not None:
                self.proc = self.cluster.net.popen(self.host, self.argv(), stdout=subprocess.DEVNULL, stderr=log,
                                                   env=self.cluster.env)
            else:
                self.proc = subprocess.Popen(self.argv(), stdout=subprocess.DEVNULL, stderr=log, env=self.cluster.env)
        if wait:
            self.wait_started()

    def wait_started(self) -> None:
        """Wait until the process printed that it serves (or fail with its log)."""
        while not self.poll_started():
            time.sleep(0.02)

    def poll_started(self) -> bool:
        """True once the process printed that it serves; raises when it died or did not within ``START_TIMEOUT``.

        With the cluster's ``stacks``, a start slower than ``SLOW_START``
        gets the stacks of the replica's threads written into its log, again
        every ``SLOW_START`` seconds, so the failure says where it waited.
        """
        if self.start_seconds is not None:
            return True
        if "as Raft replica" in self.log_since_start():
            self.start_seconds = time.monotonic() - self.started_at
            self.cluster.start_seconds.append(self.start_seconds)
            return True
        now = time.monotonic()
        if self.proc.poll() is None and now < self.started_at + START_TIMEOUT:
            if self.cluster.stacks and now > self._next_dump:
                self._next_dump += SLOW_START
                if self._catches(signal.SIGUSR1):  # else still in ip netns exec or Python's start: it would die
                    self.proc.send_signal(signal.SIGUSR1)  # faulthandler writes every thread's stack to the log
                else:
                    with open(self.log_path, "ab") as log:
                        log.write(b"raft_harness: slow start, and the process does not catch SIGUSR1 yet\n")
            return False
        raise AssertionError(f"replica {self.index} did not start within {now - self.started_at:.1f} s "
                             f"(exit status {self.proc.poll()}), log {self.log_path}:\n"
                             f"{self.log_since_start()[-6000:]}")

    def _catches(self, signo: int) -> bool:
        """Whether the process has a handler for ``signo`` now (its ``SigCgt`` in /proc)."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
        except (OSError, StopIteration):
            return False
        return bool(caught & (1 << (signo - 1)))

    def log(self) -> str:
        """Everything the replica wrote to stderr so far."""
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def log_since_start(self) -> str:
        """What the replica wrote to stderr since its last start.

        The start offset is in bytes: slicing the decoded text there would skip
        one character of the new output per multi-byte character before it.
        """
        with open(self.log_path, "rb") as f:
            f.seek(self.log_start)
            return f.read().decode(errors="replace")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash."""
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def power_cut(self, torn_seed=None) -> dict:
        """SIGKILL and a power cut of the replica's disk (see ``lazyfs``), then mount it again; not restarted.

        Returns:
            lazyfs's account of what the cut dropped.
        """
        self.kill()
        dropped = self.disk.power_cut(torn_seed)
        self.disk.mount()
        return dropped

    def stop(self, signalled: bool = False) -> int:
        """SIGTERM (unless ``signalled`` already) and wait; returns the exit status."""
        if self.alive:
            if not signalled:
                self.proc.terminate()
            stop_waiting(self.proc)
        return self.proc.returncode if self.proc is not None else 0


class Cluster:
    """N replicas of one new keg (see the module's docstring).

    Args:
        root: a directory for the kegs, logs and password.
        size: number of replicas.
        net: a ``netns.Network`` to put each replica in a namespace of its own; None for loopback.
        extra: more ``keg master serve`` options for every replica.
        disks: put each replica's directory on a lazyfs mount of its own (see the module's docstring).
        stacks: run the replicas with faulthandler on SIGUSR1 and dump the stacks of one slow to start.
        tls: a ``tls_certs.Certificates`` for 127.0.0.1: the replicas serve HTTPS with it and trust its CA
            (loopback only).
    """

    def __init__(self, root: str, size: int = 3, net=None, extra=(), disks: bool = False, stacks: bool = False,
                 tls=None):
        self.root = root
        self.net = net
        self.tls = tls
        self.scheme = "http" if tls is None else "https"
        self.extra = list(extra) + ([] if tls is None else ["--tls-cert", tls.cert, "--tls-key", tls.key])
        self.env = None if tls is None else {**os.environ, "SSL_CERT_FILE": tls.ca}
        self.stacks = stacks
        self.start_seconds: list = []  # every start's time until the replica said it serves, in order
        os.makedirs(root, exist_ok=True)
        self.password_file = os.path.join(root, "password")
        with open(self.password_file, "w") as f:
            f.write(os.urandom(24).hex() + "\n")
        first = os.path.join(root, "r0")
        self.token = init_keg_with_token(first)
        self.replicas: list = []
        self._ports: set = set()
        self.client_host = net.host("client") if net is not None else None
        for i in range(size):
            self._make_replica(i, first)
        self.peers_arg = ",".join(f"{r.raft}={r.url}" for r in self.replicas)
        if disks:
            self._mount_disks()

    def _mount_disks(self) -> None:
        """Move each replica's directory to ``<dir>.disk`` and mount lazyfs over it at the old place."""
        from lazyfs import Disk
        try:
            for r in self.replicas:
                os.rename(r.keg_path, r.keg_path + ".disk")
                r.disk = Disk(r.keg_path + ".disk", r.keg_path).mount()
        except BaseException:
            self.close_disks()
            raise

    def close_disks(self) -> None:
        """Unmount every replica's lazyfs (a power cut: call it once the replicas are stopped)."""
        for r in self.replicas:
            if r.disk is not None:
                r.disk.close()

    def _new_port(self) -> int:
        """A loopback port free now and not given to another replica of this cluster (the kernel may
        offer a port again once the probe socket is closed)."""
        while True:
            port = free_port()
            if port not in self._ports:
                self._ports.add(port)
                return port

    def _make_replica(self, i: int, first: str) -> Replica:
        path = os.path.join(self.root, f"r{i}")
        if i:
            shutil.copytree(first, path, symlinks=True)
            shutil.rmtree(os.path.join(path, "keg", "raft"), ignore_errors=True)
        if self.net is not None:
            host = self.net.host(f"r{i}")
            replica = Replica(self, i, path, f"{host.address}:{RAFT_PORT}", f"http://{host.address}:{HTTP_PORT}",
                              host)
        else:
            replica = Replica(self, i, path, f"127.0.0.1:{self._new_port()}",
                              f"{self.scheme}://127.0.0.1:{self._new_port()}")
        self.replicas.append(replica)
        return replica

    def add_replica(self) -> Replica:
        """A new replica from a copy of replica 0's initial keg state (not started; peers include it)."""
        i = len(self.replicas)
        seed = os.path.join(self.root, "seed")
        if not os.path.exists(seed):
            raise AssertionError("call keep_seed() before the cluster starts writing")
        replica = self._make_replica(i, seed)
        self.peers_arg = ",".join(f"{r.raft}={r.url}" for r in self.replicas)
        return replica

    def keep_seed(self) -> None:
        """Keep a copy of the initial keg, from which later replicas start."""
        shutil.copytree(os.path.join(self.root, "r0"), os.path.join(self.root, "seed"), symlinks=True)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "Cluster":
        """Start every replica and wait for a leader; on a failure, stop the ones started and raise."""
        try:
            for r in self.replicas:
                r.start(wait=False)
            self.wait_started()
            self.wait_leader()
        except BaseException:
            self.close()  # a replica that failed must not leave the others running with no owner
            raise
        return self

    def wait_started(self, replicas=None) -> None:
        """Wait until every replica (or each of ``replicas``) printed that it serves, watching all at once."""
        waiting = list(replicas or self.replicas)
        while waiting:
            waiting = [r for r in waiting if not r.poll_started()]
            if waiting:
                time.sleep(0.02)

    def close(self) -> None:
        """Stop every replica (the network, if any, is closed by its owner)."""
        signalled = []
        for r in self.replicas:
            if r.alive:
                r.proc.terminate()
                signalled.append(r)
        for r in self.replicas:
            r.stop(signalled=r in signalled)

    def live(self) -> list:
        return [r for r in self.replicas if r.alive]

    # ------------------------------------------------------------ clients

    @contextlib.contextmanager
    def client(self):
        """Run the block where the replicas can be reached (the client namespace, for this thread)."""
        if self.net is None:
            yield
        else:
            with self.net.entered(self.client_host):
                yield

    def call(self, replica: Replica, method: str, target: str, body: bytes | None = None, headers=None,
             timeout: float = 5.0) -> tuple:
        """One request (in the caller's namespace): ``(status, headers, body)``."""
        parsed = urllib.parse.urlsplit(replica.url)
        if self.tls is not None:
            context = ssl.create_default_context(cafile=self.tls.ca)
            conn = http.client.HTTPSConnection(parsed.hostname, parsed.port, timeout=timeout, context=context)
        else:
            conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=timeout)
        try:
            sent = {"Authorization": f"Bearer {self.token}", **(headers or {})}
            conn.request(method, target, body=body, headers=sent)
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def reads(self, replica: Replica, path: str, data: bytes) -> bool:
        """True when ``replica`` answers ``GET /v1/keg<path>`` with ``data``.

        Until a replica's background fetch brought the chunks of a large value, its read fails (a known
        gap, see docs/operations-raft.md): the stream is cut after the headers.  That is "not yet", not
        the answer.
        """
        try:
            return self.call(replica, "GET", "/v1/keg" + path)[2] == data
        except (OSError, http.client.HTTPException):
            return False

    def status(self, replica: Replica, timeout: float = 2.0) -> dict | None:
        """The replica's ``/v1/raft/status``, or None when it does not answer."""
        try:
            code, _, body = self.call(replica, "GET", "/v1/raft/status", timeout=timeout)
        except (OSError, http.client.HTTPException):
            return None
        return json.loads(body) if code == 200 else None

    def _kill_all(self) -> None:
        for r in self.replicas:
            if r.alive:
                r.proc.kill()
        for r in self.replicas:
            r.proc.wait()

    def _start_all(self, leader_timeout: float) -> float:
        """Start every replica at once and wait for a leader; the seconds it took."""
        started = time.monotonic()
        for r in self.replicas:
            r.start(wait=False)
        self.wait_started()
        self.wait_leader(timeout=leader_timeout)
        return time.monotonic() - started

    def restart_all(self, leader_timeout: float = 15.0) -> float:
        """SIGKILL every replica at once, start them all again, wait for a leader; returns the seconds it took."""
        self._kill_all()
        return self._start_all(leader_timeout)

    def power_cut_all(self, leader_timeout: float = 15.0, torn_seed=None) -> tuple:
        """SIGKILL every replica and cut the power of every disk at once; restart them all, wait for a leader.

        Args:
            torn_seed: make the cuts torn (``lazyfs``), with seeds from this one.

        Returns:
            ``(seconds from the restart to a leader, [what each disk's cut dropped])``.
        """
        self._kill_all()
        dropped = [r.disk.power_cut(None if torn_seed is None else torn_seed + r.index) for r in self.replicas]
        for r in self.replicas:
            r.disk.mount()
        return self._start_all(leader_timeout), dropped

    def kill_leader_and_measure(self, probe_path: str, within: float = 10.0) -> tuple:
        """Kill -9 the leader; ``(seconds until a write through a surviving replica is acknowledged, the
        killed replica)``.

        Raises:
            AssertionError: no write was accepted ``within`` seconds of the leader's death.
        """
        leader = self.wait_leader()
        others = [r for r in self.replicas if r is not leader]
        leader.kill()
        killed_at = time.monotonic()
        with self.client():
            attempt = 0
            while time.monotonic() - killed_at < within:
                try:
                    status, _ = self.write(others[attempt % len(others)], probe_path, str(attempt), timeout=2.0)
                except OSError:
                    status = None
                if status == 200:
                    return time.monotonic() - killed_at, leader
                attempt += 1
                time.sleep(0.02)
        raise AssertionError(f"no write was accepted within {within:g} s of the leader's death")

    def wait_leader(self, timeout: float = 20.0, among=None) -> Replica:
        """The replica that is leader, as soon as one (among ``among``, default the live ones) says so."""
        deadline = time.monotonic() + timeout
        with self.client():
            while time.monotonic() < deadline:
                for r in among or self.live():
                    s = self.status(r, timeout=0.5)
                    if s and s["role"] == "leader" and s["has_quorum"]:
                        return r
                time.sleep(0.05)
        raise AssertionError("no leader within %gs:\n%s" % (timeout, "\n".join(
            f"--- r{r.index}\n{r.log()[-1500:]}" for r in self.replicas)))

    def write(self, replica: Replica, path: str, value: str, timeout: float = 5.0, tx_id=None) -> tuple:
        """``PUT /v1/keg<path>`` on ``replica``: ``(status, answer)``."""
        headers = {"Idempotency-Key": tx_id} if tx_id else {}
        code, _, body = self.call(replica, "PUT", "/v1/keg" + path, value.encode(), headers, timeout)
        return code, json.loads(body) if body.startswith(b"{") else body

    def wait_converged(self, timeout: float = 30.0, replicas=None) -> str:
        """Wait until every live replica (or ``replicas``) has the same head; returns its revision KID."""
        deadline = time.monotonic() + timeout
        replicas = replicas or self.live()
        with self.client():
            while True:
                heads = []
                for r in replicas:
                    s = self.status(r)
                    heads.append(s and s["revision_kid"])
                if heads and None not in heads and len(set(heads)) == 1:
                    return heads[0]
                if time.monotonic() > deadline:
                    raise AssertionError(f"replicas did not converge: {heads}")
                time.sleep(0.1)

    # ------------------------------------------------------------ faults (namespaces only)

    def _iptables(self, replica: Replica, *args: str) -> None:
        done = self.net.run(replica.host, ["iptables", "-w", *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise AssertionError(f"iptables {' '.join(args)} in r{replica.index}: {done.stderr}")

    def cut(self, a: Replica, b: Replica) -> None:
        """Drop every packet between ``a`` and ``b`` (both directions, in both namespaces)."""
        for x, y in ((a, b), (b, a)):
            address = y.host.address
            self._iptables(x, "-A", "INPUT", "-s", address, "-j", "DROP")
            self._iptables(x, "-A", "OUTPUT", "-d", address, "-j", "DROP")

    def isolate(self, replica: Replica) -> None:
        """Cut ``replica`` from every other replica (clients still reach it)."""
        for other in self.replicas:
            if other is not replica:
                self.cut(replica, other)

    def heal(self) -> None:
        """Remove every cut."""
        for r in self.replicas:
            self._iptables(r, "-F", "INPUT")
            self._iptables(r, "-F", "OUTPUT")


class Workload:
    """CAS clients on a few hot keys through every replica, recording a history (see the module's docstring).

    Args:
        cluster: the cluster.
        keys: the hot keys (paths).
        clients: number of client threads.
        retries: how often an unknown outcome is retried with the same transaction id.
    """

    def __init__(self, cluster: Cluster, keys=("/hot/a", "/hot/b", "/hot/c"), clients: int = 6, retries: int = 3):
        self.cluster = cluster
        self.keys = list(keys)
        self.clients = clients
        self.retries = retries
        self.history: list = []
        self.acked: list = []          # (key, value, revision) of every successful CAS
        self.stop_event = threading.Event()
        self.threads: list = []
        self.started = time.monotonic()
        self.lock = threading.Lock()

    def start(self) -> "Workload":
        for n in range(self.clients):
            t = threading.Thread(target=self._run, args=(n,), daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def stop(self) -> None:
        """Stop the clients and wait for them (each finishes its current request)."""
        self.stop_event.set()
        for t in self.threads:
            t.join(60)
            assert not t.is_alive(), "a workload client hung"

    def _now(self) -> float:
        return time.monotonic() - self.started

    def _record(self, op: Op) -> None:
        with self.lock:
            self.history.append(op)

    def _read(self, replica, key, name):
        invoke = self._now()
        try:
            code, _, body = self.cluster.call(replica, "GET", f"/v1/keg{key}?linearizable=1", timeout=3.0)
        except (OSError, http.client.HTTPException):
            return False, None
        if code == 200:
            value = body.decode()
        elif code == 404:
            value = None
        else:
            return False, None
        self._record(Op(key, "read", invoke, self._now(), value, client=name))
        return True, value

    def _cas(self, replica_list, key, expected, value, name, seq):
        tx = {"id": f"{name}-{seq}", "ops": [{"op": "put", "path": key, "value": value}],
              "compare": [{"path": key, "kid": blob_kid(expected.encode()) if expected is not None else None}]}
        body = json.dumps(tx).encode()
        invoke = self._now()
        for attempt in range(1 + self.retries):
            replica = replica_list[(seq + attempt) % len(replica_list)]
            try:
                code, _, answer = self.cluster.call(replica, "POST", "/v1/tx", body, timeout=4.0)
            except (OSError, http.client.HTTPException):
                continue
            if code == 200:
                revision = json.loads(answer)["revision"]
                self._record(Op(key, "cas", invoke, self._now(), value, expected, True, name))
                with self.lock:
                    self.acked.append((key, value, revision))
                return
            if code == 412:
                self._record(Op(key, "cas", invoke, self._now(), value, expected, False, name))
                return
            if code not in (503, 500):
                raise AssertionError(f"unexpected answer {code}: {answer[:300]!r}")
            if self.stop_event.is_set():
                break
            time.sleep(0.1)
        self._record(Op(key, "cas", invoke, math.inf, value, expected, None, name))

    def _run(self, n: int) -> None:
        name = f"c{n}"
        with self.cluster.client():
            seq = 0
            known: dict = {}
            while not self.stop_event.is_set():
                seq += 1
                replicas = self.cluster.replicas
                replica = replicas[(n + seq) % len(replicas)]
                key = self.keys[(n * 7 + seq) % len(self.keys)]
                if seq % 3 == 1 or key not in known:
                    ok, value = self._read(replica, key, name)
                    if not ok:
                        time.sleep(0.05)
                        continue
                    known[key] = value
                new = f"{name}-{seq}"
                self._cas(replicas[n % len(replicas):] + replicas[:n % len(replicas)], key, known[key], new,
                          name, seq)
                known[key] = new  # a guess: a failed CAS is followed by a read soon

    # ------------------------------------------------------------ verdicts

    def verify(self, replicas=None) -> None:
        """No acknowledged write is lost on any live replica, and the history is linearizable.

        Ends the history with a linearizable read of every key on every live replica.
        """
        from raft_history import check
        replicas = replicas or self.cluster.live()
        with self.cluster.client():
            for r in replicas:
                for key in self.keys:
                    for _ in range(50):
                        if self._read(r, key, "final")[0]:
                            break
                        time.sleep(0.2)
                    else:
                        raise AssertionError(f"r{r.index} never answered a linearizable read of {key}")
            for r in replicas:
                for key, value, revision in self.acked:
                    code, _, body = self.cluster.call(r, "GET", f"/v1/keg{key}?rev={revision}")
                    assert code == 200 and body.decode() == value, \
                        f"acknowledged write {key}={value} at revision {revision} lost on r{r.index}: {code} {body!r}"
        bad = check(self.history)
        assert not bad, f"not linearizable on {bad}: " + "\n".join(
            repr(o) for o in sorted(self.history, key=lambda o: o.invoke) if o.key in bad[:1])


def git_heads(kegs: list) -> list:
    """``git rev-parse main`` of each keg directory."""
    out = []
    for path in kegs:
        done = subprocess.run(["git", "--git-dir", path, "rev-parse", "main"], capture_output=True, text=True)
        out.append(done.stdout.strip())
    return out


def revision_kids(path: str) -> list:
    """Every revision's commit id, oldest first (stock git)."""
    done = subprocess.run(["git", "--git-dir", path, "rev-list", "--first-parent", "--reverse", "main"],
                          capture_output=True, text=True, check=True)
    return done.stdout.split()


def match(pattern: str, text: str):
    """``re.search`` for tests."""
    return re.search(pattern, text)


class RaftMasterServer:
    """A 3-replica cluster on loopback behind the interface of ``conftest.MasterProcess``.

    Clients talk to replica 0 (``url``, ``proc``, ``keg_path``); ``start`` and
    ``stop`` act on it, ``close`` stops them all.  So the single-node API
    suite runs unchanged against a replica of a Raft master.
    """

    def __init__(self, root: str):
        self.cluster = Cluster(root, 3).start()
        self.replica = self.cluster.replicas[0]
        self.token = self.cluster.token
        self.keg_path = self.replica.keg_path
        self.extra: list = []

    @property
    def url(self) -> str:
        return self.replica.url

    @property
    def proc(self):
        return self.replica.proc

    def start(self) -> None:
        """(Re)start replica 0 and wait until it has caught up with the others."""
        self.replica.start()
        self.cluster.wait_leader()
        self.cluster.wait_converged()

    def kill(self) -> None:
        self.replica.kill()

    def stop(self) -> None:
        self.replica.stop()

    def close(self) -> None:
        self.cluster.close()
