"""The whole path, every part real: ``keg master serve``, ``keg mayor run --runtime runc``, runc, busybox, the CLI.

A master serves a keg holding a busybox image (tests/busybox.py). Each test
starts its own ``keg mayor run --runtime runc`` subprocess for a machine of
its own, drives it with the CLI (``keg run/kill/ps/wait/logs -f/exec``, in
process or as the installed command) or by writing specs with an admin
token, and checks what a user sees: status objects, command output, exit
codes, and on the machine itself ``runc list``, mounts and processes.

Every test ends by stopping its Mayor and removing its containers through a
fresh runtime on the same data directory, then checks that nothing is left:
no runc container, overlay mount, cgroup or shim process of that machine.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import signal
import subprocess
import tempfile
import time

import pytest

from busybox import busybox_layer, import_busybox, import_image, make_tar, snapshot, tar_entry, why_no_containers
from conftest import MasterProcess, init_keg_with_token, keg_command, wait_until
from keg.errors import KegError
from keg.transaction import Transaction, put
from master import auth
from master.client import RemoteKeg
from mayor.runc import Runc
from mayor.runc_runtime import RuncRuntime
from test_cli import run

WAIT = 60.0          # seconds for the Mayor to get somewhere; generous for a busy two-core machine
BUSYBOX_REF = "test/busybox:1"
FOREVER = ["/bin/sh", "-c", "echo up; exec sleep 100000"]


# ---------------------------------------------------------------------------
# the site: a master with images, and Mayors as subprocesses


class Away:
    """A keg that is never there: the runtime used for cleaning up needs none."""

    def __getattr__(self, name):
        raise KegError("no master while cleaning up")


class Site:
    """A master over a keg with the busybox image, in a base directory the containers' root can search."""

    def __init__(self):
        why = why_no_containers()
        if why is not None:
            pytest.fail(why)  # fail, never skip: ./install.sh provides runc and busybox
        self.base = tempfile.mkdtemp(prefix="keg-e2e-")
        os.chmod(self.base, 0o711)
        keg_path = os.path.join(self.base, "keg")
        self.master = MasterProcess(keg_path, init_keg_with_token(keg_path))
        self.url, self.token = self.master.url, self.master.token
        self.admin = RemoteKeg(self.url, self.token, timeout=20)
        self.image = import_busybox(self.admin, BUSYBOX_REF)
        # A PATH entry no other process has: the shims of this site's Mayors inherit it (tells them apart).
        self.marker = os.path.join(self.base, "shim-marker")
        self.mayors = []

    def keg(self, *args):
        """``keg ARGS`` in process, as admin (options go before any ``--``): (code, stdout, stderr)."""
        return run(args[0], "--url", self.url, "--token", self.token, *args[1:])

    def spawn(self, *args) -> subprocess.Popen:
        """The installed ``keg ARGS`` as a subprocess, as admin."""
        env = {"PATH": os.environ["PATH"], "HOME": self.base, "KEG_URL": self.url, "KEG_TOKEN": self.token}
        return subprocess.Popen([*keg_command(), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    def put(self, path: str, body) -> str:
        """Write ``body`` (an object as JSON, or text as it is) at ``path``; its KID."""
        text = body if isinstance(body, str) else json.dumps(body, indent=2) + "\n"
        result = self.admin.apply(Transaction((put(path, text),)))
        assert result.ok, result.error
        return result.kids[path]

    def status(self, machine: str, name: str):
        """The status object of ``name`` on ``machine``, or None."""
        try:
            return json.loads(self.admin.read(f"/machines/{machine}/status/{name}.json"))
        except KegError:
            return None

    def close(self) -> None:
        self.admin.close()
        self.master.stop()
        subprocess.run(["umount", "-R", "-l", self.base], capture_output=True, check=False)
        subprocess.run(["rm", "-rf", self.base], check=True)


def follow_status(site: Site, machine: str, name: str, since: int, until, timeout: float = WAIT) -> list:
    """Every version of ``name``'s status published after revision ``since`` (None: deleted), oldest first,
    through the watch stream, up to the first list of versions for which ``until(versions)`` holds."""
    path = f"/machines/{machine}/status/{name}.json"
    deadline = time.monotonic() + timeout
    versions = []
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"timed out waiting on {path}; versions seen: {json.dumps(versions, indent=1)}"
        with contextlib.closing(site.admin.watch(f"/machines/{machine}/status", since, timeout=min(left, 4))) as s:
            for event in s:
                since = event.revision
                if event.path != path:
                    continue
                obj = None if event.new_kid is None else json.loads(site.admin.read(path, event.revision))
                versions.append(obj)
                if until(versions):
                    return versions
                if time.monotonic() > deadline:
                    break


def shim_processes(marker: str) -> list:
    """``{pid, ppid, stderr}`` of every live shim whose environment carries ``marker`` (zombies left out)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"mayor.shim" not in f.read():
                    continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker.encode() not in f.read():
                    continue
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            fields = stat[stat.rindex(b")") + 2:].split()
            if fields[0] in (b"Z", b"X"):
                continue
            found.append({"pid": int(entry), "ppid": int(fields[1]), "stderr": os.readlink(f"/proc/{entry}/fd/2")})
        except (FileNotFoundError, ProcessLookupError):
            continue  # it ended while we looked
    return found


CGROUP_PARENT = "keg-e2e"  # the tests' Mayors run with --cgroup-parent keg-e2e


def cgroups_of(prefix: str) -> list:
    """Cgroup directories of containers whose id starts with ``prefix``, in every hierarchy."""
    found = set()
    for pattern in (f"/sys/fs/cgroup/*/{CGROUP_PARENT}/{prefix}*", f"/sys/fs/cgroup/{CGROUP_PARENT}/{prefix}*"):
        found |= {p for p in glob.glob(pattern) if os.path.isdir(p)}
    return sorted(found)


class MayorProcess:
    """``keg mayor run --runtime runc`` of one machine, as a subprocess with a data directory of its own."""

    def __init__(self, site: Site, name: str):
        self.site, self.name = site, name
        self.token_file = os.path.join(site.base, f"{name}.token")
        with open(self.token_file, "w") as f:
            f.write(auth.add_user(site.admin, name, machine=True) + "\n")
        os.chmod(self.token_file, 0o600)
        self.data = os.path.join(site.base, f"{name}.data")
        self.log_path = os.path.join(site.base, f"{name}.mayor.log")
        self.proc = None
        site.mayors.append(self)

    def start(self) -> int:
        """Start it; returns where in its log this run begins."""
        env = {"PATH": f"{os.environ['PATH']}:{self.site.marker}", "HOME": self.site.base, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log:
            offset = log.tell()
            self.proc = subprocess.Popen([*keg_command(), "mayor", "run", "--url", self.site.url, "--token-file",
                                          self.token_file, "--name", self.name, "--data", self.data,
                                          "--runtime", "runc", "--cgroup-parent", CGROUP_PARENT],
                                         env=env, stdout=log, stderr=subprocess.STDOUT)
        return offset

    def wait_ready(self, offset: int) -> None:
        """Wait until the run started at ``offset`` says it is about to step (registered, runtime made)."""
        line = f"keg mayor: machine {self.name} "
        wait_until(lambda: line in self.log(offset) or self.proc.poll() is not None, "the Mayor to start",
                   log=self.log)
        assert self.proc.poll() is None, f"keg mayor run exited: {self.log(offset)}"

    def log(self, offset: int = 0) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            f.seek(offset)
            return f.read()

    def kill(self) -> None:
        """SIGKILL, as a crash."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        """SIGTERM, as systemd stops it; it must exit 0 and leave the containers running."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            assert self.proc.wait(timeout=30) == 0, self.log()[-4000:]
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"keg mayor run did not stop on SIGTERM: {self.log()[-4000:]}") from None

    def cid(self, process: str) -> str:
        return f"{self.name}.{process}"

    def runc_list(self) -> dict:
        """``runc --root DATA/runc list``: {container id: state}."""
        root = os.path.join(self.data, "runc")
        if not os.path.isdir(root):
            return {}
        return {c["id"]: c for c in Runc(root).list()}

    def mounts(self) -> list:
        with open("/proc/self/mountinfo") as f:
            return sorted(line.split()[4] for line in f if line.split()[4].startswith(self.data + "/"))

    def bundles(self) -> list:
        try:
            return sorted(os.listdir(os.path.join(self.data, "containers")))
        except FileNotFoundError:
            return []

    def local_log(self, process: str) -> bytes:
        """Everything ``process`` wrote, from the Mayor's own log files (they outlive the process's status)."""
        directory = os.path.join(self.data, "logs", process)
        out = b""
        for name in sorted(os.listdir(directory)):
            with open(os.path.join(directory, name), "rb") as f:
                out += f.read()
        return out

    def cleanup(self) -> None:
        """Stop the Mayor, remove its containers with a fresh runtime, and check nothing of them is left."""
        try:
            self.stop()
        finally:
            if os.path.isdir(self.data):
                rt = RuncRuntime(Away(), self.data, self.name)
                try:
                    for have in rt.actual().values():
                        rt.remove(have.container)
                    assert rt.actual() == {}
                finally:
                    rt.close()
        assert self.runc_list() == {}
        assert self.mounts() == []
        assert cgroups_of(self.name + ".") == []
        # The spare shims end when their Mayor or runtime goes; container shims when their container does.
        wait_until(lambda: not [s for s in shim_processes(self.site.marker) if self.data in s["stderr"]
                                or s["stderr"] == "/dev/null"], "the shims to end", timeout=15)
        assert "Traceback" not in self.log(), self.log()[-4000:]


@pytest.fixture(scope="module")
def site():
    s = Site()
    yield s
    s.close()


@pytest.fixture
def mayor(site, request):
    """A running ``keg mayor run --runtime runc`` for a machine named after the test."""
    name = "e2e-" + request.node.name.removeprefix("test_").replace("_", "-")[:40].rstrip("-")
    m = MayorProcess(site, name)
    m.wait_ready(m.start())
    yield m
    m.cleanup()


def running(site: Site, mayor: MayorProcess, name: str, **more) -> dict:
    """Wait until ``name``'s status says running (and ``more`` fields have those values); that status."""
    def check():
        s = site.status(mayor.name, name)
        return s if s and s["state"] == "running" and all(s.get(k) == v for k, v in more.items()) else None
    return wait_until(check, f"{name} to run with {more}", log=mayor.log)


def finish(proc: subprocess.Popen, timeout: float = WAIT) -> tuple:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


# ---------------------------------------------------------------------------
# start, stop, back-off


def test_start_and_stop(site, mayor):
    m = mayor.name
    script = "trap 'echo bye; exit 0' TERM; echo up; sleep 100000 & wait"
    code, out, err = site.keg("run", "web", "--image", BUSYBOX_REF, "-m", m, "--stop-grace", "20",
                              "--", "/bin/sh", "-c", script)
    assert code == 0, err
    spec_kid = out.strip()
    web = running(site, mayor, "web")
    assert web["spec_kid"] == spec_kid and web["image"] == site.image and web["kid"].startswith("K-")
    assert web["restarts"] == 0 and web["last_error"] is None and web["container"] == mayor.cid("web")

    # On the machine: one runc container, its init the pid the status gives, an overlay root.
    containers = mayor.runc_list()
    assert list(containers) == [mayor.cid("web")] and containers[mayor.cid("web")]["status"] == "running"
    assert containers[mayor.cid("web")]["pid"] == web["pid"]
    assert mayor.mounts() == [os.path.join(mayor.data, "containers", "web", "rootfs")]
    heartbeat = json.loads(site.admin.read(f"/machines/{m}/status/mayor.json"))
    assert heartbeat["pids"] == {str(web["pid"]): web["kid"]}

    code, out, _ = site.keg("ps", "-m", m)
    [row] = [line.split() for line in out.splitlines()[1:]]
    assert row[:4] == [m, "web", "running", str(web["pid"])] and row[7] == web["kid"][:14]
    wait_until(lambda: site.keg("logs", "web", "-m", m)[1] == "up\n", "web's output", log=mayor.log)

    code, out, _ = site.keg("kill", "web", "-m", m)
    assert code == 0 and "stopping web" in out
    wait_until(lambda: site.status(m, "web") is None, "web's status to go", log=mayor.log)
    assert mayor.runc_list() == {} and mayor.mounts() == [] and mayor.bundles() == []
    assert cgroups_of(mayor.cid("web")) == []
    assert mayor.local_log("web") == b"up\nbye\n"  # SIGTERM first: it ended by its own trap
    assert json.loads(site.keg("ps", "-m", m, "--all", "--json")[1]) == []
    plan = re.findall(r"^keg mayor: ((?:start|stop|remove) \S+) ", mayor.log(), re.M)
    assert plan == ["start web", "stop web", "remove web"], mayor.log()  # each step logged before it is taken


def test_restart_on_crash_backs_off_1_2_4_4_seconds(site, mayor):
    m = mayor.name
    since = site.admin.revision().number
    site.put(f"/machines/{m}/procs/crash.json",
             {"image": site.image, "args": ["/bin/sh", "-c", "echo crashing; exit 3"], "restart": "always",
              "backoff": {"start": 1, "max": 4}})

    def kids(versions):
        return list(dict.fromkeys(v["kid"] for v in versions if v and v.get("kid")))

    # Five incarnations: four restarts, after 1, 2, 4 and (the maximum) 4 s.
    versions = follow_status(site, m, "crash", since, lambda vs: len(kids(vs)) >= 5, timeout=WAIT)
    order = kids(versions)
    by_kid = {}
    for v in versions:
        if v and v.get("kid") and v.get("started") is not None:
            by_kid.setdefault(v["kid"], v)
    gaps, exits = [], {}
    for v in versions:
        if v and v.get("exited") is not None:
            exits[v["kid"]] = v["exited"]
    for i, kid in enumerate(order[1:], start=1):
        first = by_kid[kid]
        previous = first["previous"]
        assert previous["kid"] == order[i - 1] and previous["exit_code"] == 3
        assert previous["exited"] == exits[order[i - 1]]  # what the ended incarnation reported
        assert first["restarts"] == i
        gaps.append(first["started"] - previous["exited"])
    for gap, expected in zip(gaps, (1, 2, 4, 4)):
        # never before the back-off; late by at most the time runc takes to start a container on a busy machine
        assert expected <= gap < expected + 2.0, gaps
    assert any(v and v["state"] == "backoff" for v in versions)  # shown as such while it waits
    assert not any(v and v["state"] == "failed" for v in versions)
    assert len(mayor.runc_list()) == 1  # one container for the process, whatever its incarnation


# ---------------------------------------------------------------------------
# wait, logs -f, exec


def test_wait_logs_follow_and_exec(site, mayor):
    m = mayor.name
    script = "echo first; while [ ! -e /tmp/go ]; do sleep 0.1; done; echo second; exit 5"
    code, _, err = site.keg("run", "job", "--image", BUSYBOX_REF, "-m", m, "--restart", "never",
                            "--", "/bin/sh", "-c", script)
    assert code == 0, err
    job = running(site, mayor, "job")

    logs = site.spawn("logs", "job", "-f", "-m", m)
    waiter = site.spawn("wait", job["kid"], "--timeout", str(WAIT))
    try:
        assert logs.stdout.readline() == "first\n"  # shown while the process still waits for /tmp/go
        with pytest.raises(subprocess.TimeoutExpired):
            waiter.wait(timeout=0.5)  # it has not exited: wait waits

        exe = site.spawn("exec", "job", "--timeout", "30", "--", "/bin/sh", "-c",
                         "echo out; echo err >&2; touch /tmp/go; exit 3")
        code, out, err = finish(exe)
        assert code == 3, err
        assert sorted(out.splitlines()) == ["err", "out"]

        assert logs.stdout.readline() == "second\n"
        code, rest, err = finish(logs)
        assert (code, rest) == (0, ""), err  # ended with the process: restart never

        code, out, err = finish(waiter)
        assert (code, out) == (1, f"{job['kid']} exit 5\n"), err  # 1: it did not exit 0
    finally:
        for proc in (logs, waiter):
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    ended = site.status(m, "job")
    assert (ended["state"], ended["exit_code"], ended["kid"]) == ("exited", 5, job["kid"])

    code, _, err = site.keg("exec", "job", "-m", m, "--", "/bin/true")
    assert code == 2 and "job on " + m + " is exited, not running" in err
    assert site.keg("wait", job["kid"])[:2] == (1, f"{job['kid']} exit 5\n")  # at once, once ended


# ---------------------------------------------------------------------------
# health and memory


def test_a_failing_health_check_marks_it_unhealthy_then_restarts_it(site, mayor):
    m = mayor.name
    health = {"exec": ["/bin/test", "-e", "/tmp/ok"], "interval": 0.3, "timeout": 5, "threshold": 2}
    site.put(f"/machines/{m}/procs/live.json",
             {"image": site.image, "args": ["/bin/sh", "-c", "touch /tmp/ok; exec sleep 100000"],
              "health": health, "stop_grace": 1, "backoff": {"start": 1, "max": 4}})
    first = running(site, mayor, "live", health="healthy")
    since = site.admin.revision().number

    code, out, err = finish(site.spawn("exec", "live", "--", "/bin/rm", "/tmp/ok"))
    assert code == 0, err

    def healthy_again(vs):
        return any(v and v["kid"] != first["kid"] and v["state"] == "running" and v["health"] == "healthy"
                   for v in vs)
    versions = [v for v in follow_status(site, m, "live", since, healthy_again) if v]
    mine = [v for v in versions if v["kid"] == first["kid"]]
    assert any(v["health"] == "unhealthy" for v in mine), versions  # reported before it was stopped
    ended = [v for v in mine if v["exited"] is not None]
    assert ended and ended[-1]["reason"] == "unhealthy" and ended[-1]["exit_code"] == 143  # SIGTERM ended sleep
    again = versions[-1]
    assert again["previous"]["kid"] == first["kid"] and again["previous"]["reason"] == "unhealthy"
    assert again["restarts"] == 1 and again["pid"] != first["pid"]
    assert list(mayor.runc_list()) == [mayor.cid("live")]


def test_a_process_past_its_memory_limit_is_oom_killed_and_reported(site, mayor):
    m = mayor.name
    hog = "echo start; x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived"
    code, _, err = site.keg("run", "hog", "--image", BUSYBOX_REF, "-m", m, "--memory", "32Mi", "--restart", "never",
                            "--", "/bin/sh", "-c", hog)
    assert code == 0, err
    ended = wait_until(lambda: (s := site.status(m, "hog")) and s["state"] == "exited" and s, "hog to end",
                       log=mayor.log)
    assert ended["oom"] is True and ended["reason"] == "oom" and ended["exit_code"] == 137
    code, out, _ = site.keg("ps", "-m", m, "--all")
    assert out.splitlines()[1].split()[2] == "exited(oom)"
    assert site.keg("wait", ended["kid"])[:2] == (1, f"{ended['kid']} exit 137\n")
    logged = mayor.local_log("hog")
    assert logged.startswith(b"start\n") and b"survived" not in logged


# ---------------------------------------------------------------------------
# bad input


@pytest.fixture(scope="module")
def crafted(site):
    """Images whose second layer is crafted to escape: {name: (image KID, outside dir it aims at)}."""
    outside = os.path.join(site.base, "outside")
    os.mkdir(outside)
    layers = {
        "traversal": [tar_entry("../../../../../../evil-traversal", data=b"x")],
        "symlink": [tar_entry("lnk", "symlink", target=outside), tar_entry("lnk/evil-symlink", data=b"x")],
        "device": [tar_entry("dev", "dir"), tar_entry("dev/sda", "chr", dev=(8, 0))],
    }
    return outside, {name: import_image(site.admin, f"test/crafted-{name}:1",
                                        [busybox_layer(), make_tar([tar_entry("ok", data=b"fine"), *entries])])
                     for name, entries in layers.items()}


def test_bad_specs_fail_clearly_and_others_keep_running(site, mayor, crafted):
    m = mayor.name
    outside, images = crafted
    procs = f"/machines/{m}/procs"
    code, _, err = site.keg("run", "good", "--image", BUSYBOX_REF, "-m", m, "--", *FOREVER)
    assert code == 0, err
    good = running(site, mayor, "good")
    layer_dirs = os.listdir(os.path.join(mayor.data, "layers", "sha256"))
    before = snapshot(site.base)

    unknown = "K-" + "0badc0de" * 5
    site.put(f"{procs}/unknown.json", {"image": unknown, "args": ["/bin/true"]})
    site.put(f"{procs}/malformed.json", '{"image": "' + site.image + '", "args": ["/bin/true"]')
    code, _, err = site.keg("run", "huge", "--image", BUSYBOX_REF, "-m", m, "--memory", "64Ti", "--", "/bin/true")
    assert code == 0, err  # the client cannot know the machine: its Mayor refuses
    site.put(f"{procs}/greedy.json", {"image": site.image, "args": ["/bin/true"], "resources": {"cpu": 512}})
    for name, kid in images.items():
        site.put(f"{procs}/crafted-{name}.json", {"image": kid, "args": ["/bin/true"]})

    expected = {
        "unknown": [f"image {unknown} is not in /oci-images"],
        "malformed": [f"{procs}/malformed.json is not a valid spec"],
        "huge": ["resources.memory", "exceeds this machine's"],
        "greedy": ["resources.cpu 512", "exceeds this machine's"],
        "crafted-traversal": [images["traversal"], "'../../../../../../evil-traversal'", "'..'"],
        "crafted-symlink": [images["symlink"], "'lnk/evil-symlink'", "symlink"],
        "crafted-device": [images["device"], "'dev/sda'", "device node refused"],
    }

    def all_failed():
        found = {name: site.status(m, name) for name in expected}
        return found if all(s and s["state"] == "failed" for s in found.values()) else None
    statuses = wait_until(all_failed, "every bad process to be reported failed", log=mayor.log)
    for name, words in expected.items():
        error = statuses[name]["last_error"]
        assert all(w in error for w in words), (name, error)
        assert statuses[name]["pid"] is None and statuses[name]["kid"] is None
    rows = {r["name"]: r for r in json.loads(site.keg("ps", "-m", m, "--json")[1])}
    assert {n for n, r in rows.items() if r["state"] == "failed"} == set(expected)

    # Nothing escaped and nothing was kept: no file outside, no new layer, no container, no mount.
    assert os.listdir(outside) == [] and not glob.glob("/evil-*")
    new = snapshot(site.base) - before
    assert not [p for p in new if "evil" in p or ".unpack-" in p], sorted(new)
    assert os.listdir(os.path.join(mayor.data, "layers", "sha256")) == layer_dirs
    assert mayor.bundles() == ["good"] and list(mayor.runc_list()) == [mayor.cid("good")]
    assert mayor.mounts() == [os.path.join(mayor.data, "containers", "good", "rootfs")]

    # The good one ran on, untouched: the same incarnation, the same container init.
    now = running(site, mayor, "good")
    assert (now["kid"], now["pid"], now["restarts"]) == (good["kid"], good["pid"], 0)
    assert mayor.runc_list()[mayor.cid("good")]["pid"] == good["pid"]

    # A fixed spec runs: the error was about that spec, not a state the Mayor got stuck in.
    site.put(f"{procs}/malformed.json", {"image": site.image, "args": FOREVER})
    fixed = running(site, mayor, "malformed")
    assert fixed["last_error"] is None
