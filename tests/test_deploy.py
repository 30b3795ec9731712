"""Deploying with git push, end to end: `keg up` (master, Mayor with runc, builder, scheduler, router),
the example Python app pushed with stock git, built in a container, released, answering through the router.

One `keg up` serves the whole story, in order: release 1 answers; a second push is release 2; the same
tree pushed again is a cache hit, not a build; a push that cannot build is refused and release 2 keeps
serving; rollback brings release 1's answers back; Ctrl-C leaves no container, process or mount behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

import pytest

from conftest import REPO, http_get as get, wait_until
from keg_up import Up, commit, git

EXAMPLE = os.path.join(REPO, "examples", "python-web")
WHEEL = os.path.join(REPO, "examples", "packages", "keg_greeting-1.0-py3-none-any.whl")
DOMAIN = "keg.localhost"


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
