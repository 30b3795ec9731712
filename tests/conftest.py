"""Shared fixtures: every test runs with a clean environment and its own keg."""

from __future__ import annotations

import contextlib
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
                match = re.search(r"at (https?://127\.0\.0\.1:\d+)", log.read())
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
            stop_waiting(self.proc)


def stop_waiting(proc, timeout: float = 20.0) -> int:
    """Wait for a process asked to stop; SIGKILL it after ``timeout`` seconds. Its exit status."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


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


# ---------------------------------------------------------------------------
# the Debian base image (builders/bootstrap.py), made once and shared by the build tests

DEBIAN_TARBALL = "/var/cache/keg/debian-bookworm.tgz"   # made by ./install.sh (debootstrap --make-tarball)
DEBIAN_LAYOUT = "/var/cache/keg/test-debian-oci"        # the image as an OCI layout, kept between sessions
DEBIAN_REFERENCE = "debian:bookworm"
NO_MIRROR = "http://127.0.0.1:9/debian"                 # tests never download: a mirror nothing listens on


def _debian_stamp() -> str:
    """What the cached layout was made from: the tarball and the recipe (builders/bootstrap.py)."""
    import hashlib
    import json
    st = os.stat(DEBIAN_TARBALL)
    with open(os.path.join(REPO, "builders", "bootstrap.py"), "rb") as f:
        recipe = hashlib.sha256(f.read()).hexdigest()
    return json.dumps({"tarball": DEBIAN_TARBALL, "size": st.st_size, "mtime": int(st.st_mtime),
                       "recipe": recipe}, sort_keys=True)


def debian_layout() -> str:
    """The Debian base image as an OCI layout at ``DEBIAN_LAYOUT``, made with ``keg image bootstrap debian
    --tarball`` (offline, without a network) unless a layout made from the same tarball and recipe is there; returns its path.

    Takes about a minute the first time; a lock file keeps concurrent sessions from making it twice.
    """
    import fcntl
    import tempfile
    stamp_path = DEBIAN_LAYOUT + ".stamp"
    stamp = _debian_stamp()
    os.makedirs(os.path.dirname(DEBIAN_LAYOUT), exist_ok=True)
    with open(DEBIAN_LAYOUT + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isdir(DEBIAN_LAYOUT) and os.path.exists(stamp_path):
            with open(stamp_path) as f:
                if f.read() == stamp:
                    return DEBIAN_LAYOUT
        scratch = tempfile.mkdtemp(prefix="keg-debian-", dir=os.path.dirname(DEBIAN_LAYOUT))
        try:
            kegdir = os.path.join(scratch, "keg")
            keg.init(kegdir, durable=False).close()
            env = {k: v for k, v in os.environ.items() if not k.startswith(("KEG_", "GIT_"))}
            env["KEG_NO_PROGRESS"] = "1"
            # In a network namespace of its own: the proof that the offline bootstrap downloads nothing.
            made = subprocess.run(["unshare", "--net", *keg_command(), "image", "bootstrap", "debian",
                                   "--tarball", DEBIAN_TARBALL, "--keg", kegdir], capture_output=True, text=True,
                                  env=env)
            assert made.returncode == 0, f"keg image bootstrap failed:\n{made.stdout}\n{made.stderr}"
            layout = os.path.join(scratch, "layout")
            exported = subprocess.run([*keg_command(), "image", "export", DEBIAN_REFERENCE, layout, "--keg", kegdir],
                                      capture_output=True, text=True, env=env)
            assert exported.returncode == 0, exported.stderr
            if os.path.exists(stamp_path):
                os.unlink(stamp_path)
            shutil.rmtree(DEBIAN_LAYOUT, ignore_errors=True)
            os.rename(layout, DEBIAN_LAYOUT)
            with open(stamp_path, "w") as f:
                f.write(stamp)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return DEBIAN_LAYOUT


@pytest.fixture
def net():
    """A network of namespaces (tests/netns.py) for the test, removed after; fails (never skips) without
    root and `ip`: ./install.sh provides iproute2 and CI runs as root."""
    import netns
    reason = netns.unavailable()
    if reason:
        pytest.fail(f"these tests need network namespaces: {reason}")
    with netns.Network() as network:
        yield network


@pytest.fixture(scope="session")
def debian_base():
    """The path of an OCI layout of the Debian base image (bookworm, python3, pip), made once.

    Import it into a keg with :func:`import_debian_base`. Fails (never skips) without root or without
    the tarball ./install.sh makes.
    """
    if os.geteuid() != 0:
        pytest.fail("the Debian base image needs root (debootstrap uses chroot)")
    if not os.path.isfile(DEBIAN_TARBALL):
        pytest.fail(f"{DEBIAN_TARBALL} is missing: ./install.sh makes it (debootstrap --make-tarball, "
                    "with the network); tests never download")
    return debian_layout()


def import_debian_base(store, layout: str = DEBIAN_LAYOUT, reference: str = DEBIAN_REFERENCE) -> str:
    """Import the Debian base image (the ``debian_base`` layout) into ``store`` as ``reference``; its KID.

    About a second: the layer's chunks are cut and stored once per keg.
    """
    from keg import oci
    return oci.import_image(store, layout, reference, kind="oci").kid


# ---------------------------------------------------------------------------
# small helpers the cluster tests share

def free_port() -> int:
    """A TCP port free on loopback right now."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_text(path: str) -> str:
    """A log file's text ("" while it does not exist yet)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def http_get(port: int, host: str, path: str = "/", address: str = "127.0.0.1", timeout: float = 5):
    """``(status, body)`` of a GET with ``Host: host`` (through a router), or ``(None, error)``."""
    import http.client
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host})
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    except OSError as err:
        return None, str(err)
    finally:
        conn.close()


class GitGate:
    """A ``git`` first on PATH that holds every ``git index-pack`` (or another subcommand) while the gate is
    closed, then runs the real git: a stand-in for a big pack whose indexing (or packing) takes long, at a
    moment the test chooses.  It also writes every git command line it runs into ``argv_file``, one per line.

    Args:
        directory: where the wrapper and the gate's files go.
        monkeypatch: pytest's, to put the wrapper first on PATH (for this process and what it starts).
    """

    def __init__(self, directory, monkeypatch):
        real = shutil.which("git")
        self.closed_file = os.path.join(directory, "gate-closed")
        self.held_file = os.path.join(directory, "gate-held")
        self.pass_file = os.path.join(directory, "gate-lets-one-pass")
        self.argv_file = os.path.join(directory, "gate-argv")
        bin_dir = os.path.join(directory, "gated-bin")
        os.makedirs(bin_dir, exist_ok=True)
        wrapper = os.path.join(bin_dir, "git")
        with open(wrapper, "w") as f:
            f.write(f"""#!/bin/sh
echo "$*" >> {self.argv_file}
held=$(cat {self.closed_file} 2>/dev/null)
if [ -n "$held" ]; then
    case " $* " in
    *" $held "*)
        if ! rm {self.pass_file} 2>/dev/null; then
            echo "$$" >> {self.held_file}
            i=0
            while [ -e {self.closed_file} ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i + 1)); done
        fi;;
    esac
fi
exec {real} "$@"
""")
        os.chmod(wrapper, 0o755)
        monkeypatch.setenv("PATH", bin_dir + os.pathsep + os.environ["PATH"])

    def close(self, let_one_pass: bool = False, command: str = "index-pack") -> None:
        """Hold every ``git COMMAND`` that starts from now on (for at most a minute), but the first one if
        ``let_one_pass``."""
        if let_one_pass:
            open(self.pass_file, "w").close()
        with open(self.closed_file + ".new", "w") as f:
            f.write(command)
        os.replace(self.closed_file + ".new", self.closed_file)   # never seen empty

    def commands(self) -> list:
        """The command lines (arguments after ``git``, space-separated) git ran with so far."""
        try:
            with open(self.argv_file) as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []

    def held(self) -> int:
        """How many git runs the gate has held so far."""
        try:
            with open(self.held_file) as f:
                return len(f.read().split())
        except FileNotFoundError:
            return 0

    def open(self) -> None:
        """Let every held git run go on."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.closed_file)
