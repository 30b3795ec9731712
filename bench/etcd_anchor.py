"""The anchor: a throwaway etcd 3.4 server and a keep-alive client for its HTTP/JSON gateway.

``EtcdServer`` starts etcd on 127.0.0.1 only, on free ports, with a fresh
temporary ``--data-dir`` and etcd's default durability (WAL fsync before a
write is acknowledged).  It waits until ``/health`` answers, and always kills
the process and removes the directory on exit, also when the benchmark fails.

``EtcdClient`` speaks etcd's v3 JSON gateway (``/v3/kv/put``, ``/v3/kv/txn``,
``/v3/kv/range``; keys and values base64) over one keep-alive
``http.client.HTTPConnection``: one client, one request at a time.
"""

from __future__ import annotations

import base64
import ctypes
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
START_ATTEMPTS = 3
QUOTA_BACKEND_BYTES = 8 << 30
PR_SET_PDEATHSIG = 1


class EtcdError(Exception):
    """etcd would not start, or answered a request with an error."""


def etcd_version(binary: str = "etcd") -> str:
    """The server version ``etcd --version`` reports (e.g. ``3.4.23``)."""
    try:
        out = subprocess.run([binary, "--version"], check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise EtcdError(f"cannot run {binary} --version; install etcd (Debian: apt-get install etcd-server)") \
            from err
    for line in out.splitlines():
        if line.startswith("etcd Version:"):
            return line.split(":", 1)[1].strip()
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def _free_ports(count: int) -> list:
    """Ports free on 127.0.0.1 right now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    """In the child: have the kernel kill etcd if the benchmark process dies without cleaning up."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


class ThrowawayServer:
    """A server process in a temporary directory of its own.

    Started on enter; on exit, also when starting failed, stopped (TERM, then
    KILL after ``stop_timeout`` seconds) and its directory removed.  Subclasses set
    ``proc`` and ``_tmp`` in ``start`` and may close more in ``_release``.
    """

    proc = None
    _tmp = None
    stop_timeout = STOP_TIMEOUT

    def start(self) -> None:
        """Start the server and wait until it answers."""
        raise NotImplementedError

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _release(self) -> None:
        """Close what the subclass keeps open besides the process."""

    def _kill(self) -> None:
        """End the process (TERM, then KILL) and release what the subclass holds; keep the directory."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
        self._release()

    def stop(self) -> None:
        """Stop the server and remove its temporary directory."""
        try:
            self._kill()
        finally:
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None


class EtcdServer(ThrowawayServer):
    """A single-member etcd on 127.0.0.1, started on enter and removed on exit.

    Args:
        binary: the etcd executable.
        base_dir: where the temporary directory goes (default: the system's).
        quota_bytes: ``--quota-backend-bytes``, large so the benchmark never hits it.
    """

    def __init__(self, binary: str = "etcd", base_dir: str | None = None,
                 quota_bytes: int = QUOTA_BACKEND_BYTES):
        self.binary = binary
        self.base_dir = base_dir
        self.quota_bytes = quota_bytes
        self.port = None
        self.proc = None
        self._tmp = None
        self._log = None

    @property
    def log_path(self) -> str:
        """etcd's own log (stdout and stderr), inside the temporary directory."""
        return os.path.join(self._tmp, "etcd.log")

    def _args(self, client_port: int, peer_port: int) -> list:
        client = f"http://127.0.0.1:{client_port}"
        peer = f"http://127.0.0.1:{peer_port}"
        return [self.binary, "--name", "bench", "--data-dir", os.path.join(self._tmp, "data"),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"bench={peer}", "--initial-cluster-state", "new",
                "--quota-backend-bytes", str(self.quota_bytes), "--log-level", "warn"]

    def start(self) -> None:
        """Start etcd and wait until it serves; retries on a port race.

        Raises:
            EtcdError: it did not become healthy (the message holds its log's tail).
        """
        self._tmp = tempfile.mkdtemp(prefix="keg-bench-etcd-", dir=self.base_dir)
        last = ""
        for _ in range(START_ATTEMPTS):
            client_port, peer_port = _free_ports(2)
            shutil.rmtree(os.path.join(self._tmp, "data"), ignore_errors=True)
            self._log = open(self.log_path, "ab")
            self.proc = subprocess.Popen(self._args(client_port, peer_port), stdin=subprocess.DEVNULL,
                                         stdout=self._log, stderr=subprocess.STDOUT,
                                         preexec_fn=_die_with_parent)
            self.port = client_port
            if self._wait_healthy():
                return
            last = self._log_tail()
            self._kill()
        raise EtcdError(f"etcd did not become healthy after {START_ATTEMPTS} attempts; its log ends:\n{last}")

    def _wait_healthy(self) -> bool:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                try:
                    conn.request("GET", "/health")
                    resp = conn.getresponse()
                    body = resp.read()
                finally:
                    conn.close()
                if resp.status == 200 and json.loads(body).get("health") == "true":
                    return True
            except (OSError, http.client.HTTPException, ValueError):
                pass
            time.sleep(0.05)
        return False

    def _log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return b"\n".join(f.read().splitlines()[-lines:]).decode(errors="replace")
        except OSError:
            return "(no log)"

    def _release(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def prefix_end(prefix: bytes) -> bytes:
    """etcd's ``range_end`` for every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\x00"  # every key


class EtcdClient:
    """One keep-alive HTTP connection to etcd's v3 JSON gateway."""

    def __init__(self, port: int, timeout: float = 30.0):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def __enter__(self) -> "EtcdClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()

    def _post(self, path: str, obj: dict) -> dict:
        self.conn.request("POST", path, json.dumps(obj), {"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        body = resp.read()  # read it all, or the connection cannot be reused
        if resp.status != 200:
            raise EtcdError(f"etcd {path} answered {resp.status}: {body[:300]!r}")
        return json.loads(body)

    def put(self, key: bytes, value: bytes) -> int:
        """One durable put; returns the revision etcd gave it."""
        answer = self._post("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})
        return int(answer["header"]["revision"])

    def put_many(self, items) -> int:
        """Many puts in one ``/v3/kv/txn`` (at most etcd's ``--max-txn-ops``, 128 by default)."""
        ops = [{"requestPut": {"key": _b64(k), "value": _b64(v)}} for k, v in items]
        answer = self._post("/v3/kv/txn", {"success": ops})
        if not answer.get("succeeded"):
            raise EtcdError(f"etcd txn of {len(ops)} puts did not succeed: {answer}")
        return int(answer["header"]["revision"])

    def range_prefix(self, prefix: bytes) -> list:
        """Every ``(key, value)`` whose key starts with ``prefix``."""
        answer = self._post("/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))})
        return [(base64.b64decode(kv["key"]), base64.b64decode(kv.get("value", "")))
                for kv in answer.get("kvs", [])]
