"""Shared fixtures: every test runs with a clean environment and its own keg."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

import keg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """Results must not depend on the developer's HOME, git or Keg settings."""
    for name in list(os.environ):
        if name.startswith(("GIT_", "KEG_")):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")


@pytest.fixture
def keg_dir(tmp_path):
    """A path for a new keg."""
    return str(tmp_path / "keg")


@pytest.fixture
def new_keg(keg_dir):
    """A new keg (not durable, for speed) that no process holds open; returns its directory."""
    keg.init(keg_dir, durable=False).close()
    return keg_dir


def head_of(keg_dir: str) -> int:
    """The newest checkpointed revision of a keg, as another process sees it."""
    with keg.Store(keg_dir) as s:
        return s.head_revision


@pytest.fixture
def store(keg_dir):
    """A new keg, not fsynced (durability has its own crash tests)."""
    s = keg.init(keg_dir, durable=False)
    yield s
    s.close()


def keg_command() -> list:
    """The installed ``keg`` console script, next to the running Python."""
    script = os.path.join(os.path.dirname(sys.executable), "keg")
    if os.path.exists(script):
        return [script]
    found = shutil.which("keg")
    assert found, "the keg command is not installed; run ./install.sh"
    return [found]


def git(keg_path: str, *args: str) -> subprocess.CompletedProcess:
    """Run stock git on a keg."""
    return subprocess.run(["git", "--git-dir", keg_path, *args], capture_output=True, text=True, check=False)


class MasterProcess:
    """A ``keg master serve`` subprocess on a free loopback port, with the keg's admin token."""

    def __init__(self, keg_path: str, token: str, extra=()):
        self.keg_path = keg_path
        self.token = token
        self.extra = list(extra)
        self.proc = None
        self.url = None
        self.start()

    def start(self, port: int = 0) -> None:
        """Start (or restart on the same port) and wait until it listens."""
        import re
        import time
        if port == 0 and self.url:
            port = int(self.url.rsplit(":", 1)[1])
        self.log_path = self.keg_path.rstrip("/") + ".master.log"
        with open(self.log_path, "a") as log:
            start = log.tell()
            self.proc = subprocess.Popen([*keg_command(), "master", "serve", "--keg", self.keg_path,
                                          "--listen", f"127.0.0.1:{port}", *self.extra],
                                         stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with open(self.log_path) as log:
                log.seek(start)
                match = re.search(r"at (http://127\.0\.0\.1:\d+)", log.read())
            if match:
                self.url = match.group(1)
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        with open(self.log_path) as log:
            raise AssertionError(f"keg master serve did not start: {log.read()[start:]}")

    def kill(self) -> None:
        """SIGKILL, as a crash."""
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        """SIGTERM, a clean stop."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def init_keg_with_token(keg_path: str) -> str:
    """``keg init`` a keg and return the admin token it prints."""
    done = subprocess.run([*keg_command(), "init", "--keg", keg_path], capture_output=True, text=True, check=True)
    return next(line.split()[2] for line in done.stdout.splitlines() if line.startswith("admin token: "))


@pytest.fixture
def master_server(keg_dir):
    """A running master over a new keg: ``.url``, ``.token`` (admin), ``.keg_path``."""
    token = init_keg_with_token(keg_dir)
    server = MasterProcess(keg_dir, token)
    yield server
    server.stop()


def wait_until(condition, what: str = "the condition", timeout: float = 60.0, log=None, poll: float = 0.05):
    """Poll ``condition`` (another process's doing, which a test cannot be told about) until it returns
    something true, and return that value.

    Args:
        what: named in the failure.
        log: a callable giving text to show with the failure (a process's log).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = f"\n--- log:\n{log()[-4000:]}" if log is not None else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{tail}")
        time.sleep(poll)
