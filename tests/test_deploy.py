"""Deploying with git push, end to end: `keg up` (master, Mayor with runc, builder, scheduler, router),
the example Python app pushed with stock git, built in a container, released, answering through the router.

One `keg up` serves the whole story, in order: release 1 answers; a second push is release 2; the same
tree pushed again is a cache hit, not a build; a push that cannot build is refused and release 2 keeps
serving; rollback brings release 1's answers back; Ctrl-C leaves no container, process or mount behind.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile

import pytest

from conftest import REPO, keg_command, wait_until

EXAMPLE = os.path.join(REPO, "examples", "python-web")
WHEEL = os.path.join(REPO, "examples", "packages", "keg_greeting-1.0-py3-none-any.whl")
DOMAIN = "keg.localhost"


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, host: str, path: str = "/"):
    """``(status, body)`` of a GET through the router, or ``(None, error)``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers={"Host": host})
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    except OSError as err:
        return None, str(err)
    finally:
        conn.close()


class Up:
    """``keg up`` in the background, as the README starts it."""

    def __init__(self, data: str, base_from: str):
        self.data = data
        self.port, self.router_port = free_port(), free_port()
        self.out = open(os.path.join(os.path.dirname(data), "keg-up.out"), "w+")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KEG_", "GIT_"))}
        self.proc = subprocess.Popen([*keg_command(), "up", "--data", data, "--port", str(self.port),
                                      "--router-port", str(self.router_port), "--base-from", base_from],
                                     stdout=self.out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_until(lambda: "Keg is up" in self.text() or self.proc.poll() is not None, "keg up to start",
                   timeout=180, log=self.text)
        assert self.proc.poll() is None, self.text()
        self.token = re.search(r"^admin token: (\S+)$", self.text(), re.M).group(1)
        self.url = f"http://127.0.0.1:{self.port}"

    def text(self) -> str:
        self.out.seek(0)
        return self.out.read()

    def logs(self) -> str:
        out = [self.text()]
        try:
            from master.client import RemoteKeg
            with RemoteKeg(self.url, self.token) as remote:
                for entry in remote.list("/machines/local/status/logs"):
                    out.append(f"--- {entry.path}\n" + remote.read(entry.path).decode(errors="replace")[-1500:])
        except Exception as err:  # the logs are for a failure message; never hide the failure
            out.append(f"(no process logs: {err})")
        for name in sorted(os.listdir(os.path.join(self.data, "logs"))):
            with open(os.path.join(self.data, "logs", name), errors="replace") as f:
                out.append(f"--- {name}\n{f.read()[-3000:]}")
        return "\n".join(out)

    def keg(self, *args, check=True):
        env = dict(os.environ, KEG_URL=self.url, KEG_TOKEN=self.token)
        done = subprocess.run([*keg_command(), *args], capture_output=True, text=True, env=env, timeout=120)
        if check:
            assert done.returncode == 0, done.stderr
        return done

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def git(repo, *args, check=True, env=None):
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, GIT_TERMINAL_PROMPT="0", **(env or {})))
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def commit(repo, message):
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=Alice", "-c", "user.email=alice@example.org", "commit", "-q", "--allow-empty",
        "-m", message)


@pytest.fixture
def up(debian_base):
    # Not pytest's tmp_path: runc mounts the containers' root filesystems as an unprivileged user,
    # so every directory above them must be searchable by others.
    base = tempfile.mkdtemp(prefix="keg-deploy-")
    os.chmod(base, 0o711)
    cluster = Up(os.path.join(base, "keg-data"), debian_base)
    yield cluster
    cluster.stop()
    shutil.rmtree(base, ignore_errors=True)


def test_push_build_release_rollback_and_a_clean_stop(up, tmp_path):
    up.keg("pkg", "import", WHEEL)
    repo = tmp_path / "hello"
    shutil.copytree(EXAMPLE, repo)
    git(repo, "init", "-q", "-b", "main")
    commit(repo, "first")
    git(repo, "remote", "add", "keg", f"http://admin:{up.token}@127.0.0.1:{up.port}/git/apps/hello.git")
    host = f"hello.{DOMAIN}"

    # Release 1: the push shows the build as it happens and ends with the release and the address.
    first = git(repo, "push", "keg", "main")
    assert "remote: -----> Python app detected" in first.stderr, first.stderr
    assert "remote: -----> Released v1" in first.stderr and f"http://{host}:{up.router_port}/" in first.stderr
    wait_until(lambda: get(up.router_port, host) == (200, "Hello, Keg! This is release one.\n"),
               "release 1 to answer through the router", timeout=90, log=up.logs)
    assert get(up.router_port, f"127.0.0.1:{up.router_port}", "/hello/")[1] == "Hello, Keg! This is release one.\n"

    # Release 2: a new source.
    app_py = repo / "app.py"
    app_py.write_text(app_py.read_text().replace('MESSAGE = "release one"', 'MESSAGE = "release two"'))
    commit(repo, "second")
    second = git(repo, "push", "keg", "main")
    assert "remote: -----> Released v2" in second.stderr, second.stderr
    wait_until(lambda: get(up.router_port, host)[1] == "Hello, Keg! This is release two.\n",
               "release 2 to answer", timeout=90, log=up.logs)

    # The same tree again (a new commit, nothing changed): no build, the cached image is released.
    commit(repo, "nothing changed")
    again = git(repo, "push", "keg", "main")
    assert "Cache hit" in again.stderr and "Python app detected" not in again.stderr, again.stderr
    assert "remote: -----> Released v3" in again.stderr
    releases = json.loads(up.keg("releases", "hello", "--json").stdout)["releases"]
    assert releases[2]["image"] == releases[1]["image"]

    # A push that cannot build is refused with the reason; the app keeps serving release two.
    (repo / "requirements.txt").write_text("keg-greeting==1.0\nno-such-package\n")
    commit(repo, "broken")
    broken = git(repo, "push", "keg", "main", check=False)
    assert broken.returncode != 0
    assert "no-such-package" in broken.stderr and "pre-receive hook declined" in broken.stderr, broken.stderr
    assert get(up.router_port, host)[1] == "Hello, Keg! This is release two.\n"
    assert json.loads(up.keg("releases", "hello", "--json").stdout)["current"] == 3

    # Rollback to release 1: its answers come back.
    assert "rollback to v1 as v4" in up.keg("rollback", "hello", "--to", "1").stdout
    wait_until(lambda: get(up.router_port, host)[1] == "Hello, Keg! This is release one.\n",
               "release 1's answers after the rollback", timeout=90, log=up.logs)

    # Ctrl-C: everything stops; no container, child process or mount is left.
    assert up.stop() == 0, up.text()
    assert "keg up: stopped" in up.text(), up.logs()
    runc_root = os.path.join(up.data, "mayor", "runc")
    listed = subprocess.run(["runc", "--root", runc_root, "list", "-q"], capture_output=True, text=True)
    assert listed.stdout.strip() == "", listed.stdout + up.logs()
    with open("/proc/self/mounts") as f:
        assert up.data not in f.read()
    leftovers = subprocess.run(["pgrep", "-f", up.data], capture_output=True, text=True).stdout.split()
    assert leftovers == [], subprocess.run(["ps", "-fp", ",".join(leftovers)], capture_output=True, text=True).stdout
