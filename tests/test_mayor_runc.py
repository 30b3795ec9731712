"""The runc runtime of the Mayor, with real runc, real shims and a busybox image imported into a real keg."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pytest

import keg
from busybox import busybox_layer, import_busybox, import_image, remove_cgroup_parent, snapshot, tar_entry, \
    why_no_containers
from conftest import MasterProcess, init_keg_with_token
from keg.errors import KegError, NotFound
from master.client import RemoteKeg
from mayor import runtime_spec
from mayor.layers import LayerError
from mayor.runc import Runc
from mayor.runc_runtime import ContainerError, ImageError, RuncRuntime
from mayor.runtime_spec import SpecError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MACHINE = "t1"
LOOP = ["/bin/sh", "-c", "echo up; while :; do sleep 0.1; done"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A keg holding the busybox image and one with a crafted layer; their KIDs."""
    why = why_no_containers()
    if why is not None:
        pytest.fail(why)  # fail, never skip: ./install.sh provides runc and busybox
    store = keg.init(str(tmp_path_factory.mktemp("keg") / "keg"), durable=False)
    busybox = import_busybox(store, "test/busybox:1")
    evil = busybox_layer([tar_entry("../evil", data=b"x")])
    crafted = import_image(store, "test/crafted:1", [busybox_layer(), evil])
    yield store, busybox, crafted
    store.close()


class Host:
    """A data directory searchable by the container's root, a cgroup parent of its own, and runtimes on them."""

    def __init__(self, store):
        self.store = store
        self.base = tempfile.mkdtemp(prefix="keg-runc-test-")
        os.chmod(self.base, 0o711)
        self.data_dir = os.path.join(self.base, "data")
        self.cgroup_parent = f"keg-test-{uuid.uuid4().hex[:12]}"
        self.runtimes = []

    def runtime(self, store=None, **options) -> RuncRuntime:
        rt = RuncRuntime(store or self.store, self.data_dir, MACHINE, cgroup_parent=self.cgroup_parent, **options)
        self.runtimes.append(rt)
        return rt

    def runc_ids(self) -> list:
        return [c["id"] for c in Runc(os.path.join(self.data_dir, "runc")).list()]

    def mounts(self) -> list:
        with open("/proc/self/mountinfo") as f:
            return [line.split()[4] for line in f if line.split()[4].startswith(self.base)]

    def cleanup(self) -> None:
        """Remove every container (through a fresh runtime, which must see them all), then check nothing is left."""
        try:
            if os.path.isdir(self.data_dir):
                rt = self.runtime()
                for have in rt.actual().values():
                    rt.remove(have.container)
                assert rt.actual() == {}
                assert self.runc_ids() == []
            assert self.mounts() == []
        finally:
            for rt in self.runtimes:
                rt.close()
            remove_cgroup_parent(self.cgroup_parent)
            subprocess.run(["umount", "-R", "-l", self.base], capture_output=True, check=False)
            subprocess.run(["rm", "-rf", self.base], check=True)


@pytest.fixture
def host(images):
    h = Host(images[0])
    yield h
    h.cleanup()


def spec(image, args, **more) -> dict:
    return {"image": image, "args": args, **more}


def wait_until(rt, predicate, timeout=10.0, tick=1.0):
    """Wait on the runtime (event-driven) until ``predicate(rt.actual())`` holds; returns that actual()."""
    deadline = time.monotonic() + timeout
    while True:
        found = rt.actual()
        if predicate(found):
            return found
        left = deadline - time.monotonic()
        assert left > 0, f"gave up waiting; the runtime says {found}"
        rt.wait(min(left, tick))


def wait_for_log(rt, name, text: bytes, timeout=10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in rt.log_tail(name, 1 << 20)[1]:
        assert time.monotonic() < deadline, f"{text!r} never appeared in the log: {rt.log_tail(name, 500)}"
        rt.wait(0.02)


def finish(handle, timeout=15.0) -> tuple:
    """Poll an exec handle until it ends: (all output, exit code)."""
    out, deadline = b"", time.monotonic() + timeout
    while True:
        data, code = handle.poll()
        out += data
        if code is not None:
            return out, code
        assert time.monotonic() < deadline, f"exec never ended; output so far {out!r}"
        time.sleep(0.02)


# ---------------------------------------------------------------------------
# running, exiting, logs


def test_a_process_runs_exits_and_is_removed(host, images):
    _, busybox, _ = images
    rt = host.runtime()
    script = "echo hi; echo err >&2; sleep 0.3; exit 7"
    cid = rt.start("hello", "K-5bec0001", spec(busybox[:12], ["/bin/sh", "-c", script]), "K-9f0c0001", 1)
    assert cid == "t1.hello" and host.runc_ids() == [cid]
    have = rt.actual()["hello"]
    assert (have.state, have.container, have.spec_kid, have.kid, have.incarnation) == (
        "running", cid, "K-5bec0001", "K-9f0c0001", 1)
    with open(f"/proc/{have.pid}/status") as f:
        assert f"Uid:\t{runtime_spec.ID_BASE}\t" in f.read()  # the container's init, as the shifted root

    found = wait_until(rt, lambda a: a["hello"].state == "exited")
    noticed = time.time()
    done = found["hello"]
    assert done.exit_code == 7 and not done.oom and done.reason is None
    assert noticed - done.exited < 1.0, "the exit was noticed late"
    assert 0.25 <= done.exited - done.started < 2.0  # started is stamped when runc returns, a little late
    assert rt.log_tail("hello", 1000) == (7, b"hi\nerr\n")
    assert rt.log_tail("hello", 3) == (7, b"rr\n")

    rt.remove(cid)
    assert rt.actual() == {} and host.runc_ids() == [] and host.mounts() == []
    assert rt.log_tail("hello", 1000) == (7, b"hi\nerr\n")  # logs belong to the name, not the container
    with pytest.raises(NotFound):
        rt.exec("hello", ["true"])


def test_stop_asks_then_kills_after_the_grace(host, images):
    _, busybox, _ = images
    rt = host.runtime()
    polite = "trap 'echo bye; exit 0' TERM; echo up; while :; do sleep 0.1; done"
    stubborn = "trap '' TERM; echo up; while :; do sleep 0.1; done"
    rt.start("polite", "K-1", spec(busybox, ["/bin/sh", "-c", polite]))
    rt.start("stubborn", "K-1", spec(busybox, ["/bin/sh", "-c", stubborn], stop_grace=1))
    wait_for_log(rt, "polite", b"up\n")
    wait_for_log(rt, "stubborn", b"up\n")

    began = time.monotonic()
    rt.stop("t1.polite", grace=10)
    assert time.monotonic() - began < 3
    polite_now = rt.actual()["polite"]
    assert (polite_now.state, polite_now.exit_code, polite_now.reason) == ("exited", 0, "stopped")
    assert rt.log_tail("polite", 100)[1].endswith(b"bye\n")

    began = time.monotonic()
    rt.stop("t1.stubborn")  # the spec's stop_grace
    took = time.monotonic() - began
    assert 1.0 <= took < 5, took
    stubborn_now = rt.actual()["stubborn"]
    assert (stubborn_now.state, stubborn_now.exit_code, stubborn_now.reason) == ("exited", 137, "stopped")
    rt.stop("t1.stubborn")  # stopping an exited container does nothing


def test_a_stop_without_waiting_is_finished_by_the_shim(host, images):
    """``stop(wait=False)`` returns at once; the container reports ``stopping_until`` while it runs, and
    its shim sends the SIGKILL when the grace is over, with no further call."""
    _, busybox, _ = images
    rt = host.runtime()
    stubborn = "trap '' TERM; echo up; while :; do sleep 0.1; done"
    rt.start("stubborn", "K-1", spec(busybox, ["/bin/sh", "-c", stubborn], stop_grace=1.5))
    wait_for_log(rt, "stubborn", b"up\n")
    assert rt.actual()["stubborn"].stopping_until is None
    began = time.monotonic()
    rt.stop("t1.stubborn", wait=False)
    assert time.monotonic() - began < 0.5
    now = rt.actual()["stubborn"]
    assert now.state == "running" and time.time() + 1 < now.stopping_until < time.time() + 1.5 + 11
    found = wait_until(rt, lambda a: a["stubborn"].state == "exited", timeout=10)
    assert 1.5 <= time.monotonic() - began < 5
    assert (found["stubborn"].exit_code, found["stubborn"].reason) == (137, "stopped")


def test_a_stop_with_a_drain_keeps_the_process_serving_before_its_sigterm(host, images):
    """``stop(wait=False, drain=True)`` lets the spec's ``stop_drain`` pass before the shim sends SIGTERM (what
    routers still send the process is served meanwhile); the grace counts from the SIGTERM. Without ``drain``
    (a Mayor's shutdown, say) the SIGTERM goes at once."""
    _, busybox, _ = images
    rt = host.runtime()
    polite = "trap 'echo bye; exit 0' TERM; echo up; while :; do sleep 0.1; done"
    rt.start("drained", "K-1", spec(busybox, ["/bin/sh", "-c", polite], stop_drain=1.5, stop_grace=5))
    rt.start("hurried", "K-1", spec(busybox, ["/bin/sh", "-c", polite], stop_drain=30))
    wait_for_log(rt, "drained", b"up\n")
    wait_for_log(rt, "hurried", b"up\n")
    began = time.monotonic()
    rt.stop("t1.drained", wait=False, drain=True)
    rt.stop("t1.hurried", wait=False)
    now = rt.actual()["drained"]
    assert now.state == "running" and time.time() + 1.5 + 5 <= now.stopping_until < time.time() + 1.5 + 5 + 11
    time.sleep(1.0)
    assert rt.actual()["drained"].state == "running" and rt.log_tail("drained", 100)[1] == b"up\n"
    found = wait_until(rt, lambda a: a["drained"].state == "exited", timeout=10)
    assert 1.5 <= time.monotonic() - began < 4.5
    assert (found["drained"].exit_code, found["drained"].reason) == (0, "stopped")
    assert rt.log_tail("drained", 100)[1] == b"up\nbye\n"
    assert (found["hurried"].state, found["hurried"].exit_code) == ("exited", 0)  # long before the drained one


def test_the_init_makes_sigterm_stop_a_process_that_does_not_handle_it(host, images):
    """Under the machine's init (tini at /dev/init, PID 1) the process is an ordinary process: SIGTERM
    ends it at once, and the orphans it leaves are reaped. With ``"init": false`` it is PID 1 itself,
    where the kernel drops SIGTERM it has no handler for, and only SIGKILL after the grace stops it."""
    _, busybox, _ = images
    rt = host.runtime()
    args = ["/bin/sh", "-c", "(sleep 0.5 &); echo pid $$; exec sleep 1000"]  # an orphan, ending after the exec
    rt.start("inited", "K-1", spec(busybox, args))
    rt.start("bare", "K-1", spec(busybox, args, init=False, stop_grace=1))
    wait_for_log(rt, "inited", b"pid ")
    wait_for_log(rt, "bare", b"pid ")
    assert rt.log_tail("inited", 100)[1] != b"pid 1\n" and rt.log_tail("bare", 100)[1] == b"pid 1\n"
    deadline = time.monotonic() + 5
    while b" Z " not in (out := finish(rt.exec("bare", ["/bin/busybox", "ps", "-o", "pid,stat,args"]))[0]):
        assert time.monotonic() < deadline, out  # sleep 1000 as PID 1 never reaps the orphan
        time.sleep(0.2)
    out, code = finish(rt.exec("inited", ["/bin/busybox", "ps", "-o", "pid,stat,args"]))
    assert code == 0 and b"/dev/init -- /bin/sh -c" in out and b" Z " not in out, out  # its orphan, older, was reaped

    began = time.monotonic()
    rt.stop("t1.inited")  # the default grace is 10 s: not needed
    assert time.monotonic() - began < 2
    assert (rt.actual()["inited"].exit_code, rt.actual()["inited"].reason) == (143, "stopped")
    began = time.monotonic()
    rt.stop("t1.bare")
    assert time.monotonic() - began >= 1.0
    assert (rt.actual()["bare"].exit_code, rt.actual()["bare"].reason) == (137, "stopped")


def test_logs_rotate_and_totals_span_incarnations(host, images):
    _, busybox, _ = images
    rt = host.runtime(log_file_bytes=64 * 1024, log_files=2)
    noisy = "head -c 300000 /dev/zero | tr '\\0' a; echo; echo END"
    rt.start("noisy", "K-1", spec(busybox, ["/bin/sh", "-c", noisy]), incarnation=1)
    wait_until(rt, lambda a: a["noisy"].state == "exited")
    total, tail = rt.log_tail("noisy", 4)
    assert (total, tail) == (300005, b"END\n")
    files = sorted(os.listdir(os.path.join(host.data_dir, "logs", "noisy")))
    assert len(files) == 2 and all(f.endswith(".log") for f in files)
    assert sum(os.path.getsize(os.path.join(host.data_dir, "logs", "noisy", f)) for f in files) < 300005
    assert int(files[-1][:-4]) + os.path.getsize(os.path.join(host.data_dir, "logs", "noisy", files[-1])) == total
    total, tail = rt.log_tail("noisy", 60000)  # may span the two files
    assert total == 300005 and tail == b"a" * 59995 + b"\nEND\n"

    rt.remove("t1.noisy")
    rt.start("noisy", "K-1", spec(busybox, ["/bin/echo", "second"]), incarnation=2)
    wait_until(rt, lambda a: a["noisy"].state == "exited")
    assert rt.log_tail("noisy", 11) == (300012, b"END\nsecond\n")
    assert rt.log_tail("nothing-here", 10) == (0, b"")


# ---------------------------------------------------------------------------
# exec and health


def test_exec_merges_output_reports_the_code_and_times_out(host, images):
    _, busybox, _ = images
    rt = host.runtime()
    rt.start("box", "K-1", spec(busybox, LOOP))
    out, code = finish(rt.exec("box", ["/bin/sh", "-c", "echo out; echo err >&2; id -u; exit 3"]))
    # both streams, in one output; runc exec copies them through two pipes, so their interleaving may vary
    assert (sorted(out.splitlines()), code) == ([b"0", b"err", b"out"], 3)

    began = time.monotonic()
    out, code = finish(rt.exec("box", ["/bin/sleep", "30"], timeout=0.5))
    assert code == 137 and b"timeout" in out and time.monotonic() - began < 5
    with pytest.raises(NotFound):
        rt.exec("absent", ["true"])
    with pytest.raises(SpecError):
        rt.exec("box", "true")


def test_an_unhealthy_container_is_killed_with_reason_unhealthy(host, images):
    _, busybox, _ = images
    rt = host.runtime()
    check = {"exec": ["/bin/test", "-e", "/tmp/ok"], "interval": 0.2, "timeout": 5, "threshold": 2}
    args = ["/bin/sh", "-c", "touch /tmp/ok; exec sleep 1000"]
    rt.start("live", "K-1", spec(busybox, args, health=check, stop_grace=0.5))
    assert rt.actual()["live"].health == "starting"
    rt.start("kept", "K-1", spec(busybox, args, health={**check, "restart_on_failure": False}))
    slow = {"exec": ["/bin/sleep", "30"], "interval": 0.2, "timeout": 0.3, "threshold": 1, "restart_on_failure": False}
    rt.start("slow", "K-1", spec(busybox, args, health=slow))
    wait_until(rt, lambda a: a["live"].health == a["kept"].health == "healthy")
    wait_until(rt, lambda a: a["slow"].health == "unhealthy")  # its check never answers in time
    with open(os.path.join(host.data_dir, "containers", "slow", "health.json")) as f:
        assert "timed out after 0.3 s" in json.load(f)["output"]

    for name in ("live", "kept"):
        assert finish(rt.exec(name, ["/bin/rm", "/tmp/ok"]))[1] == 0
    found = wait_until(rt, lambda a: a["live"].state == "exited" and a["kept"].health == "unhealthy")
    live = found["live"]
    assert (live.reason, live.health, live.exit_code) == ("unhealthy", "unhealthy", 143)  # SIGTERM ended sleep
    assert found["kept"].state == "running"  # restart_on_failure false: reported, left running


def test_http_health_check_inside_the_private_network(host, images):
    _, busybox, _ = images
    rt = host.runtime()
    serve = "mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p 127.0.0.1:8080 -h /www"
    check = {"http": {"port": 8080, "path": "/index.html"}, "interval": 0.2, "timeout": 2, "threshold": 1,
             "restart_on_failure": False}
    rt.start("web", "K-1", spec(busybox, ["/bin/sh", "-c", serve], health=check))
    wait_until(rt, lambda a: a["web"].health == "healthy")
    assert finish(rt.exec("web", ["/bin/rm", "/www/index.html"]))[1] == 0
    found = wait_until(rt, lambda a: a["web"].health == "unhealthy")  # 404 now
    assert found["web"].state == "running"
    with open(os.path.join(host.data_dir, "containers", "web", "health.json")) as f:
        assert "404" in json.load(f)["output"]


def test_a_process_with_a_port_is_starting_until_it_listens(host, images):
    """A process with a ``port`` and no check of its own gets the runtime's: ``starting`` (so no router sends
    it requests) until something accepts connections on the port, then ``healthy``, and no more checks.
    Counting it healthy once it ran sent requests to a port nobody listened on yet."""
    _, busybox, _ = images
    rt = host.runtime()
    serve = ("mkdir -p /www && echo ok > /www/index.html && echo up; while [ ! -e /tmp/go ]; do sleep 0.1; done; "
             "exec httpd -f -p 127.0.0.1:8080 -h /www")
    rt.start("web", "K-1", spec(busybox, ["/bin/sh", "-c", serve], port=8080))
    rt.start("plain", "K-1", spec(busybox, ["/bin/sh", "-c", "echo up; exec sleep 60"]))
    wait_for_log(rt, "web", b"up\n")
    wait_for_log(rt, "plain", b"up\n")
    time.sleep(1.0)  # four quick checks, all refused
    found = rt.actual()
    assert (found["web"].state, found["web"].health) == ("running", "starting")
    assert (found["plain"].state, found["plain"].health) == ("running", None)  # no port, no check
    assert finish(rt.exec("web", ["/bin/touch", "/tmp/go"]))[1] == 0
    wait_until(rt, lambda a: a["web"].health == "healthy", timeout=5)
    path = os.path.join(host.data_dir, "containers", "web", "health.json")
    with open(path) as f:
        first = json.load(f)
    assert first["output"] == "listening on port 8080\n"
    time.sleep(1.0)
    with open(path) as f:
        assert json.load(f)["checked"] == first["checked"]  # ready once is enough: not checked again


def test_out_of_memory_is_reported(host, images):
    _, busybox, _ = images
    rt = host.runtime()
    hog = "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived"
    rt.start("hog", "K-1", spec(busybox, ["/bin/sh", "-c", hog], resources={"memory": "32Mi"}))
    hog_now = wait_until(rt, lambda a: a["hog"].state == "exited", timeout=30)["hog"]
    assert hog_now.oom and hog_now.reason == "oom" and hog_now.exit_code == 137
    assert b"survived" not in rt.log_tail("hog", 100)[1]


# ---------------------------------------------------------------------------
# crashes of the Mayor and of shims


MAYOR_SCRIPT = """
import sys, time
from keg.errors import KegError
from mayor.runc_runtime import RuncRuntime

class Away:
    def __getattr__(self, name):
        raise KegError("the master is unreachable")

data_dir, cgroup_parent, image = sys.argv[1:4]
rt = RuncRuntime(Away(), data_dir, "t1", cgroup_parent=cgroup_parent)
rt.start("orphan", "K-2", {"image": image, "args": ["/bin/sleep", "1000"]}, "K-7", 3)
print("started", rt.actual()["orphan"].pid, flush=True)
time.sleep(1000)
"""


def test_containers_are_readopted_after_the_mayor_dies(host, images):
    _, busybox, _ = images
    rt = host.runtime()
    rt.start("long", "K-1", spec(busybox, ["/bin/sleep", "1000"]), "K-3", 5)
    rt.start("short", "K-1", spec(busybox, ["/bin/sh", "-c", "sleep 0.5; exit 3"]))
    before = rt.actual()
    rt.close()
    del rt

    # a Mayor killed with SIGKILL while its container runs; the image comes from the local cache
    mayor = subprocess.Popen([sys.executable, "-c", MAYOR_SCRIPT, host.data_dir, host.cgroup_parent, busybox],
                             stdout=subprocess.PIPE, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    line = mayor.stdout.readline().decode()
    assert line.startswith("started"), line
    mayor.send_signal(signal.SIGKILL)
    mayor.wait()
    mayor.stdout.close()

    again = host.runtime()
    found = again.actual()
    assert found["long"] == before["long"]  # same pid, started, KIDs, incarnation: re-adopted, not restarted
    assert found["orphan"].state == "running" and found["orphan"].pid == int(line.split()[1])
    assert (found["orphan"].kid, found["orphan"].incarnation) == ("K-7", 3)
    found = wait_until(again, lambda a: a["short"].state == "exited")
    assert found["short"].exit_code == 3

    Runc(os.path.join(host.data_dir, "runc")).kill("t1.long", "KILL")  # behind the runtime's back
    found = wait_until(again, lambda a: a["long"].state == "exited", timeout=5)
    assert found["long"].exit_code == 137 and found["long"].reason is None
    assert sorted(host.runc_ids()) == ["t1.long", "t1.orphan", "t1.short"]


def test_a_killed_shim_is_reported_not_fatal(host, images):
    _, busybox, _ = images
    rt = host.runtime()
    rt.start("victim", "K-1", spec(busybox, ["/bin/sleep", "1000"]))
    assert rt.actual()["victim"].state == "running"
    with open(os.path.join(host.data_dir, "containers", "victim", "shim.pid")) as f:
        shim = int(f.read().split()[0])
    os.kill(shim, signal.SIGKILL)
    found = wait_until(rt, lambda a: a["victim"].state != "running", timeout=3)
    assert found["victim"].state == "unknown" and found["victim"].reason == "supervisor lost"
    rt.stop("t1.victim", grace=1)
    gone = rt.actual()["victim"]
    assert (gone.state, gone.exit_code, gone.reason) == ("exited", None, "supervisor lost")
    rt.remove("t1.victim")
    assert rt.actual() == {} and host.runc_ids() == []


def test_a_half_made_container_is_reported_created(host, images):
    rt = host.runtime()
    half = os.path.join(host.data_dir, "containers", "half")
    os.mkdir(half)
    with open(os.path.join(half, "meta.json"), "w") as f:
        json.dump({"name": "half", "spec_kid": "K-1"}, f)
    have = rt.actual()["half"]
    assert (have.state, have.container, have.spec_kid) == ("created", "t1.half", "K-1")
    rt.stop(have.container)
    rt.remove(have.container)
    assert rt.actual() == {}


# ---------------------------------------------------------------------------
# refusals


def test_bad_starts_leave_nothing_behind(host, images):
    store, busybox, crafted = images
    rt = host.runtime()
    before = snapshot(host.base)
    cases = [
        (("web", spec("K-deadbeef00", ["/bin/true"])), ImageError, "K-deadbeef00 is not in /oci-images"),
        (("web", spec("busybox", ["/bin/true"])), SpecError, "KID"),
        (("web", {"args": ["/bin/true"]}), SpecError, "no image"),
        (("Web", spec(busybox, ["/bin/true"])), ContainerError, "not valid"),
        (("../x", spec(busybox, ["/bin/true"])), ContainerError, "not valid"),
        (("web", spec(busybox, ["/bin/true"], health={"exec": []})), SpecError, "health.exec is empty"),
        (("web", spec(busybox, ["/bin/true"], resources={"memory": "1Mi"})), SpecError, "below the minimum"),
        (("web", spec(busybox, ["/bin/no-such-program"])), SpecError, "'/bin/no-such-program': no such executable"),
        (("web", spec(busybox, ["no-such-program"])), SpecError, "'no-such-program': no such executable file on PATH"),
        (("web", spec(busybox, ["/etc/passwd"])), SpecError, "no such executable"),
        (("web", spec(busybox, ["/bin/true"], user="nobody-here")), SpecError, "not in the image's /etc/passwd"),
    ]
    for args, error, message in cases:
        name, process = args
        with pytest.raises(error, match=message):
            rt.start(name, "K-1", process)
        assert os.listdir(os.path.join(host.data_dir, "containers")) == []
        assert host.runc_ids() == [] and host.mounts() == []

    with pytest.raises(LayerError) as refused:
        rt.start("web", "K-1", spec(crafted, ["/bin/true"]))
    assert "'../evil'" in str(refused.value) and "'..'" in str(refused.value) and crafted in str(refused.value)
    assert not os.path.exists("/evil") and not os.path.exists(os.path.join(host.data_dir, "evil"))
    assert os.listdir(os.path.join(host.data_dir, "containers")) == [] and host.runc_ids() == []
    layer_dirs = os.listdir(os.path.join(host.data_dir, "layers", "sha256"))
    assert len(layer_dirs) == 1  # the busybox layer (the crafted image's base too), and no evil one
    new_paths = snapshot(host.base) - before
    assert not any("evil" in p or ".unpack-" in p for p in new_paths)

    rt.start("web", "K-1", spec(busybox, LOOP))
    with pytest.raises(ContainerError, match="already has a container"):
        rt.start("web", "K-1", spec(busybox, LOOP))
    assert rt.actual()["web"].state == "running" and host.runc_ids() == ["t1.web"]


def test_starts_from_the_cache_while_the_master_is_away(host, images):
    _, busybox, _ = images
    rt = host.runtime()
    rt.start("app", "K-1", spec(busybox, ["/bin/true"]))
    rt.remove("t1.app")

    class Away:
        def __getattr__(self, name):
            raise KegError("the master is unreachable")

    away = host.runtime(store=Away())
    for ref in (busybox, busybox[:12]):
        away.start("app", "K-1", spec(ref, ["/bin/echo", "from the cache"]))
        wait_until(away, lambda a: a["app"].state == "exited")
        away.remove("t1.app")
    assert away.log_tail("app", 100)[1].endswith(b"from the cache\nfrom the cache\n")
    with pytest.raises(ImageError, match="not read here before"):
        away.start("app", "K-1", spec("K-0123456789", ["/bin/true"]))


def test_an_image_comes_from_the_master(host, keg_dir):
    server = MasterProcess(keg_dir, init_keg_with_token(keg_dir))
    try:
        remote = RemoteKeg(server.url, server.token)
        image = import_busybox(remote, "remote/busybox:2", image_config={"Cmd": ["/bin/echo", "from the master"]})
        rt = host.runtime(store=remote)
        rt.start("app", "K-1", {"image": image[:10]})
        assert wait_until(rt, lambda a: a["app"].state == "exited")["app"].exit_code == 0
        assert rt.log_tail("app", 100) == (16, b"from the master\n")
        remote.close()
    finally:
        server.stop()


def test_runc_list_survives_containers_deleted_while_it_lists(tmp_path):
    """``runc list`` gives up when a directory it read under its root is gone by the time it stats it (a
    container deleted meanwhile). With real runc and directories coming and going under its root, every
    listing succeeds: the lost races are retried (counted by a wrapper that logs each runc call)."""
    root = tmp_path / "runc"
    calls = tmp_path / "calls"
    wrapper = tmp_path / "runc-counted"
    wrapper.write_text(f"#!/bin/sh\necho call >> {calls}\nexec runc \"$@\"\n")
    wrapper.chmod(0o755)
    runc = Runc(str(root), runc=str(wrapper))
    stop = threading.Event()

    def churn():
        for i in itertools.count():
            if stop.is_set():
                return
            entry = root / f"{MACHINE}.gone-{i % 50}"
            entry.mkdir()
            entry.rmdir()

    churner = threading.Thread(target=churn)
    churner.start()
    lists = 0

    def retries() -> int:
        return (calls.read_text().count("call") if calls.exists() else 0) - lists

    try:
        while lists < 3000 and retries() < 3:
            assert runc.list() == []
            lists += 1
    finally:
        stop.set()
        churner.join()
    assert retries() >= 3, f"runc lost no race to the deletes in {lists} listings"
