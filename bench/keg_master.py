"""A throwaway ``keg master serve`` for the HTTP benchmarks, like ``EtcdServer`` for etcd.

``KegMasterServer`` runs ``keg init`` in a fresh temporary directory, keeps
the admin token it prints, starts ``keg master serve --listen 127.0.0.1:0``
(the installed ``keg`` next to this Python) and reads the port from the line
``keg master: serving DIR at http://127.0.0.1:PORT`` on its stderr.  It always
stops the server (TERM, then KILL) and removes the directory on exit, and the
kernel kills the server if the benchmark process dies first.

With ``profile_to`` set the server runs under ``python -m cProfile -o PATH``,
which writes the profile when the server stops cleanly on SIGTERM.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from etcd_anchor import ThrowawayServer, _die_with_parent

STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0  # a profiled server writes its profile before it exits
LISTENING = re.compile(r"keg master: serving .* at http://127\.0\.0\.1:(\d+)")


class KegMasterError(Exception):
    """``keg init`` or ``keg master serve`` failed."""


def keg_command() -> list:
    """The installed ``keg`` console script, next to the running Python."""
    script = os.path.join(os.path.dirname(sys.executable), "keg")
    if not os.path.exists(script):
        found = shutil.which("keg")
        if not found:
            raise KegMasterError("the keg command is not installed; run ./install.sh")
        script = found
    return [script]


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far (from ``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class KegMasterServer(ThrowawayServer):
    """A new keg served by ``keg master serve`` on 127.0.0.1, started on enter and removed on exit.

    Args:
        base_dir: where the temporary directory goes (default: the system's).
        profile_to: run the server under cProfile and write its stats here.
    """

    stop_timeout = STOP_TIMEOUT

    def __init__(self, base_dir: str | None = None, profile_to: str | None = None):
        self.base_dir = base_dir
        self.profile_to = profile_to
        self.port = None
        self.token = None
        self.proc = None
        self._tmp = None

    @property
    def keg_path(self) -> str:
        return os.path.join(self._tmp, "keg")

    @property
    def log_path(self) -> str:
        """The server's stderr."""
        return os.path.join(self._tmp, "master.log")

    def start(self) -> None:
        """``keg init``, then start the server and wait until it listens.

        Raises:
            KegMasterError: either command failed (the message holds its output).
        """
        self._tmp = tempfile.mkdtemp(prefix="keg-bench-master-", dir=self.base_dir)
        done = subprocess.run([*keg_command(), "init", "--keg", self.keg_path], capture_output=True, text=True,
                              check=False)
        tokens = [line.split()[2] for line in done.stdout.splitlines() if line.startswith("admin token: ")]
        if done.returncode != 0 or not tokens:
            raise KegMasterError(f"keg init failed ({done.returncode}): {done.stdout}{done.stderr}")
        self.token = tokens[0]
        command = keg_command()
        if self.profile_to:
            command = [sys.executable, "-m", "cProfile", "-o", self.profile_to, *command]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([*command, "master", "serve", "--keg", self.keg_path,
                                          "--listen", "127.0.0.1:0"], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=log, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            match = LISTENING.search(self._log())
            if match:
                self.port = int(match.group(1))
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise KegMasterError(f"keg master serve did not start; its stderr:\n{self._log()[-2000:]}")

    def _log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def tx(self, ops: list) -> dict:
        """One ``POST /v1/tx`` of ``ops`` (their JSON form) as the admin, for setting up; returns the answer.

        Raises:
            KegMasterError: the master did not answer 200.
        """
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request("POST", "/v1/tx", json.dumps({"ops": ops}),
                         {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            raise KegMasterError(f"POST /v1/tx answered {resp.status}: {body[:300]!r}")
        return json.loads(body)
