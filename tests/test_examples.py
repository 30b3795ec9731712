"""The examples in examples/ work as their READMEs say, against one ``keg up``.

Each example's README is run as written: its ```sh blocks, in order, in one ``bash`` with ``set -e``,
from the Keg directory, with stock git and curl and the installed ``keg``, in a fresh HOME where
``keg up --data ~/.local/share/keg`` keeps its admin token (the README's
``cat ~/.local/share/keg/admin-token`` reads it there, and ``~/.local/share/keg/router/access.log`` is
the router's log). One thing is changed: ``keg up`` here listens on free ports, not 7480 and 8080 (other
tests may hold those), so the text ``127.0.0.1:7480`` and ``keg.localhost:8080`` in the blocks is
replaced with the two ports it got; no other port is named in them.

The test then checks what a user sees: the README's own output, and the apps answering through the
router. One cluster serves the examples in order: static-site, keg-build, worker, then policy, which
works on static-site's app ``site`` (its README says to deploy that first).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import threading

import pytest

from conftest import REPO, http_get, wait_until
from keg_up import Up

EXAMPLES = os.path.join(REPO, "examples")
MASTER, ROUTER = "127.0.0.1:7480", "keg.localhost:8080"   # the README's addresses, as keg up's defaults


def _shell_blocks(text: str) -> list:
    return re.findall(r"```sh\n(.*?)```", text, re.S)


class Examples:
    """``keg up`` in a fresh HOME, and each example's README run once against it."""

    def __init__(self, debian_base: str):
        # Not pytest's tmp_path: runc mounts the containers' root filesystems as an unprivileged user,
        # so every directory above them must be searchable by others.
        self.home = tempfile.mkdtemp(prefix="keg-examples-")
        os.chmod(self.home, 0o711)
        os.makedirs(os.path.join(self.home, ".local", "share"))
        self.up = Up(os.path.join(self.home, ".local", "share", "keg"), debian_base)
        self.ran: dict = {}

    def script(self, name: str) -> str:
        """The README's shell blocks as one script, with keg up's ports in place of 7480 and 8080."""
        with open(os.path.join(EXAMPLES, name, "README.md"), encoding="utf-8") as f:
            blocks = _shell_blocks(f.read())
        assert blocks, f"examples/{name}/README.md has no ```sh block"
        text = "\n".join(blocks)
        assert MASTER in text, f"examples/{name}/README.md does not name the master's address"
        text = text.replace(MASTER, f"127.0.0.1:{self.up.port}").replace(ROUTER, f"keg.localhost:{self.up.router_port}")
        assert not re.search(r"\b(7480|8080)\b", text), f"examples/{name}/README.md names a port another way"
        return "set -e\n" + text

    def run(self, name: str) -> subprocess.CompletedProcess:
        """Run the README of ``examples/NAME`` (once: later calls give the first run's result)."""
        if name not in self.ran:
            env = {"HOME": self.home, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "GIT_CONFIG_NOSYSTEM": "1",
                   "GIT_AUTHOR_NAME": "Ada", "GIT_AUTHOR_EMAIL": "ada@example.org",
                   "GIT_COMMITTER_NAME": "Ada", "GIT_COMMITTER_EMAIL": "ada@example.org"}
            self.ran[name] = subprocess.run(["bash", "-c", self.script(name)], cwd=REPO, env=env,
                                            capture_output=True, text=True, timeout=300)
        done = self.ran[name]
        assert done.returncode == 0, (f"examples/{name}/README.md failed ({done.returncode}):\n{done.stdout}\n"
                                      f"{done.stderr}\n{self.up.logs()[-4000:]}")
        return done

    def get(self, app: str, path: str = "/"):
        return http_get(self.up.router_port, f"{app}.keg.localhost", path)

    def ps(self, prefix: str) -> list:
        """Status objects of the processes whose name starts with ``prefix``."""
        return [s for s in json.loads(self.up.keg("ps", "--json").stdout) if s["name"].startswith(prefix)]

    def close(self) -> None:
        code = self.up.stop()
        shutil.rmtree(self.home, ignore_errors=True)
        assert code == 0, self.up.text()


@pytest.fixture(scope="module")
def examples(debian_base):
    cluster = Examples(debian_base)
    yield cluster
    cluster.close()


def test_the_index_lists_every_example():
    with open(os.path.join(EXAMPLES, "README.md"), encoding="utf-8") as f:
        index = f.read()
    links = re.findall(r"\]\(([^)]+)\)", index)
    for link in links:
        assert os.path.exists(os.path.normpath(os.path.join(EXAMPLES, link))), link
    for name in sorted(os.listdir(EXAMPLES)):
        if name != "packages" and os.path.isdir(os.path.join(EXAMPLES, name)):
            assert any(link.startswith(name + "/") for link in links), f"examples/README.md misses {name}"


def test_static_site(examples):
    done = examples.run("static-site")
    assert "remote: -----> Static site detected" in done.stderr, done.stderr
    assert "remote: -----> Released v1" in done.stderr and "remote: -----> Released v2" in done.stderr
    for heading in ("<h1>A static site on Keg</h1>", "<h1>About</h1>", "<h1>News</h1>"):
        assert heading in done.stdout, done.stdout
    assert re.search(r"^\* v2\t", done.stdout, re.M), done.stdout
    status, body = examples.get("site", "/style.css")
    assert status == 200 and "font-family" in body
    assert examples.get("site", "/README.md")[0] == 404     # only public/ is the site


def test_keg_build_app(examples):
    done = examples.run("keg-build")
    assert "remote: -----> keg.build script detected" in done.stderr, done.stderr
    assert "page recipe.html: The recipe" in done.stderr and "page third.html: A third page" in done.stderr
    assert '<li><a href="recipe.html">The recipe</a></li>' in done.stdout, done.stdout
    assert "<h1>The recipe</h1>" in done.stdout
    assert '<li><a href="third.html">A third page</a></li>' in done.stdout
    status, body = examples.get("pages", "/third.html")
    assert status == 200 and "<p>Written as text, built into HTML by keg.build.</p>" in body, body
    status, body = examples.get("pages", "/")
    assert status == 200 and re.search(r"Built from source K-[0-9a-f]{40}\.", body), body


def test_worker(examples):
    done = examples.run("worker")
    assert "remote: -----> Process types: worker (python3 worker.py)" in done.stderr, done.stderr
    assert "http://ticker." not in done.stderr, done.stderr  # no web process: no address is promised
    # keg logs -f | head -n 4: the first worker's first lines, as they came.
    assert "ticker: a prime every 2 s\ntick 1: prime 2\ntick 2: prime 3\ntick 3: prime 5\n" in done.stdout, done.stdout
    assert "ticker: a prime every 1 s\ntick 1: prime 2\n" in done.stdout, done.stdout
    # Two workers of release 2, each finding primes once a second; no route, no service.
    def two_new_workers():
        workers = [s for s in examples.ps("ticker-worker-") if s["state"] == "running"]
        logs = [examples.up.keg("logs", s["name"]).stdout for s in workers]
        return len(workers) == 2 and all(log.startswith("ticker: a prime every 1 s\ntick 1: prime 2\ntick 2: prime 3\n")
                                         for log in logs)
    wait_until(two_new_workers, "two workers of release 2 at their second prime", timeout=60, log=examples.up.logs)
    job = json.loads(examples.up.keg("cat", "/jobs/ticker-worker.json").stdout)
    assert job["replicas"] == 2 and job["env"] == {"TICK_SECONDS": "1"} and not job.get("port")
    assert examples.up.keg("cat", "/services/ticker.tsv", check=False).returncode != 0


def _router_errors(examples) -> str:
    """What the router logged about failed requests: its access log's 5xx lines and its error log's end."""
    router = os.path.join(examples.home, ".local", "share", "keg", "router")
    try:
        with open(os.path.join(router, "access.log"), encoding="utf-8", errors="replace") as f:
            bad = [line for line in f if re.match(r"[^\t]*\tsite\t5", line)]
        with open(os.path.join(router, "error.log"), encoding="utf-8", errors="replace") as f:
            errors = f.read()[-3000:]
    except OSError as err:
        return f"(the router's logs: {err})"
    return "access.log 5xx:\n" + "".join(bad[:40]) + "error.log:\n" + errors


def test_policy(examples):
    examples.run("static-site")                 # the policy README works on its app, site
    answers, stop = [], threading.Event()

    def load():
        while not stop.is_set():
            answers.append(examples.get("site"))
            stop.wait(0.05)
    client = threading.Thread(target=load)
    client.start()
    try:
        done = examples.run("policy")
    finally:
        stop.set()
        client.join()
    out, err = done.stdout, done.stderr
    # Scale and a rolling restart: exit 0, two fresh replicas.
    assert "rolling-restart: site-web: done: 2 new replica(s) healthy, none of the old left" in err, err
    # The canary judged on the requests the README sent, then promoted; the site shows the second edition.
    served = re.search(r"the canary served (\d+) attempt\(s\) in the window, (\d+) failed", err)
    assert served and int(served.group(1)) > 0 and served.group(2) == "0", err
    assert "canary: site-web: promoted: 2 replica(s) on K-" in err
    assert out.count("<h1>A static site on Keg, second edition</h1>") == 3, out
    # The drain on the only machine: nowhere to go, exit status 1 with the scheduler's reason; undone.
    assert "exit status 1" in out and "no live, schedulable machine" in err, out + err
    assert "drain-machine: local: schedulable again" in err
    machine = json.loads(examples.up.keg("cat", "/machines/local/machine.json").stdout)
    assert machine["unschedulable"] is False
    # What is left: site-web on the canary's image with 1 replica, the canary job gone, staging at 0.
    site, staging = (json.loads(examples.up.keg("cat", f"/jobs/{job}.json").stdout)
                     for job in ("site-web", "site-next-web"))
    assert site["replicas"] == 1 and staging["replicas"] == 0 and site["image"] == staging["image"]
    assert examples.up.keg("cat", "/jobs/site-web-canary.json", check=False).returncode != 0
    # The site answered every request all along, first or second edition.
    assert len(answers) > 100
    failed = [a for a in answers if a[0] != 200 or "<h1>A static site on Keg" not in a[1]]
    assert failed == [], f"{len(failed)} of {len(answers)} failed, first {failed[0]!r}\n{_router_errors(examples)}"
    wait_until(lambda: len([s for s in examples.ps("site-web-") if s["state"] == "running"]) == 1,
               "site-web to be down to 1 replica", timeout=60, log=examples.up.logs)
