"""Spec written → container running, against a bare ``runc run -d`` of the same bundle (DESIGN §9, issue 6).

Usage::

    .venv/bin/python bench/mayor_start.py [--quick] [--rounds N] [--idle-procs N] [--no-trace] [--keep-trace]
                                          [--check] [--tmp DIR] [--out DIR]

Needs root, runc and busybox-static (``./install.sh``). Results go to
``bench/out/mayor-start.json`` (``mayor-start-idleN.json`` with
``--idle-procs N``); figures and method in docs/benchmarks.md.

What runs, all on this machine:

- ``keg master serve`` on 127.0.0.1 (``bench/keg_master.py``), durable, its
  defaults; the busybox image of ``tests/busybox.py`` imported into it over
  HTTP; a machine principal ``bench`` with its own token.
- One Mayor with the runc runtime in a process of its own
  (``bench/mayor_start.py --mayor-child``): ``Mayor.run`` exactly as
  ``keg mayor run --runtime runc`` runs it, except that its containers' cgroup
  parent is a throwaway one (``keg-bench-<hex>``) so everything can be removed
  at the end. With tracing on (the default) the child wraps some of its
  objects' methods to log timestamps (JSON lines, ``time.time()``); the code
  that runs is unchanged.
- An observer in this process: one watch stream on
  ``/machines/bench/status`` as the admin; each event is timestamped as it
  comes off the socket, its value read afterwards by another thread.

Each round, after a warm-up that fetches and unpacks the image, does both of
these, in alternating order so drift hits both alike:

1. **Mayor.** Write ``/machines/bench/procs/sNNN.json`` (a new name each
   round: busybox ``/bin/sleep``, restart ``always``, stop grace 0) with an
   admin ``RemoteKeg``. From the write's acknowledgement, two times:
   *running at the host*, when the container's init (the pid in runc's
   ``state.json``) has exec'd ``sleep`` (its ``/proc/PID/comm`` says so; the
   state file and comm are polled every millisecond), and *status running*,
   when the watch event of ``status/sNNN.json`` whose value says ``running``
   arrives. Then **exit → status**: SIGKILL the container's init from the
   host and time from just before the kill to the arrival of the status
   event saying ``backoff`` or ``exited``. Then delete the spec and wait until
   the status object is deleted and the bundle and runc state are gone.
2. **Bare runc.** A bundle of the same kind: the same cached layer
   directories stacked with ``mayor.rootfs.mount_rootfs`` (untimed), the
   ``config.json`` the Mayor's runtime wrote in the warm-up with only the root
   path, host name and cgroup path changed. Timed: ``runc run --detach`` with
   the flags the shim uses, spawned with ``posix_spawn`` as the shim does, to
   the init having exec'd ``sleep`` (same poll), and to runc's exit. Then
   ``runc delete -f`` (timed), unmount, remove.

Goals (issue 6, DESIGN §9): spec → running ≤ 1.5× bare runc at p50, p99
≤ 1 s (issue) and p50 ≤ 300 ms (DESIGN); exit → status visible ≤ 100 ms p99.
With tracing, where the time goes: p50 and p99 of each stage of the
Mayor's path (watch event in the Mayor, step, reading the table,
``runtime.start`` and its parts, the shim's answer, status publish and its
commit at the master, event back at the observer; the time in
``runtime.actual()`` and ``log_tail()`` calls). ``--idle-procs N`` keeps N
more sleeping processes on the machine all along, to show what grows with
the size of the process table.

Everything is removed at the end, on Ctrl-C too: containers, shims, mounts,
the cgroup parent, the data and the master.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if "--mayor-child" not in sys.argv[1:]:
    from etcd_anchor import _die_with_parent
    from keg_master import KegMasterServer, cpu_seconds
    from measure import LABEL_WIDTH, Report, environment, percentile, summarize
# bench/mayor.py would shadow the ``mayor`` package: take bench/ off the path once its helpers are imported.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
if REPO not in sys.path:
    sys.path.insert(0, REPO)

MACHINE = "bench"
SLEEP_ARGS = ["/bin/sleep", "1000000"]
POLL_SECONDS = 0.001       # host-side poll of runc's state file and the init's comm
TIMEOUT = 30.0             # for any one thing to happen
SETTLE_SECONDS = 0.3       # pause before each timed part: the previous part's stragglers finish
EXIT_SETTLE_SECONDS = 0.3  # after status running, before the kill
WARMUP_ROUNDS = 2
GOAL_RATIO = 1.5           # issue 6: spec → running ≤ 1.5× bare runc at p50
GOAL_P99_MS = 1000.0       # issue 6
GOAL_P50_MS = 300.0        # DESIGN §9
GOAL_EXIT_P99_MS = 100.0   # issue 6


class BenchError(Exception):
    """Something the benchmark waited for did not happen."""


# ====================================================================== the Mayor's process

class Tracer:
    """Timestamps as JSON lines in a file; safe from several threads."""

    def __init__(self, path: str):
        self.f = open(path, "a", encoding="utf-8", buffering=1)
        self.lock = threading.Lock()

    def log(self, ev: str, t0: float, t1: float | None = None, **detail) -> None:
        line = json.dumps({"ev": ev, "t0": t0, "t1": t1 if t1 is not None else t0, **detail}, default=str)
        with self.lock:
            self.f.write(line + "\n")

    def wrap(self, obj, attr: str, ev: str, detail=None, when=None) -> None:
        """Replace ``obj.attr`` by a wrapper logging its start and end (``when(result)`` may skip a call)."""
        original = getattr(obj, attr)

        def traced(*args, **kwargs):
            t0 = time.time()
            result = None
            try:
                result = original(*args, **kwargs)
                return result
            finally:
                if when is None or when(result):
                    self.log(ev, t0, time.time(), **(detail(args, kwargs, result) if detail else {}))

        setattr(obj, attr, traced)


def _instrument(tracer: Tracer, the_mayor, runtime, store) -> None:
    """Log the steps of the Mayor's path, wrapping methods of these instances (and three module functions)."""
    from mayor import rootfs, runtime_spec

    for attr in ("step", "read_desired", "apply", "report", "publish", "read_exec_requests", "tick"):
        tracer.wrap(the_mayor, attr, attr)
    tracer.wrap(runtime, "start", "runtime.start", lambda a, k, r: {"name": a[0]})
    tracer.wrap(runtime, "stop", "runtime.stop", lambda a, k, r: {"container": a[0]})
    tracer.wrap(runtime, "remove", "runtime.remove", lambda a, k, r: {"container": a[0]})
    tracer.wrap(runtime, "image", "runtime.image")
    tracer.wrap(runtime, "_layer_dirs", "runtime.layers")
    tracer.wrap(runtime, "_launch", "runtime.launch",
                lambda a, k, r: {"name": a[0], "shim_started": (r or {}).get("started")})
    tracer.wrap(runtime, "_new_shim", "runtime.new_shim")
    tracer.wrap(runtime, "wait", "runtime.wait", when=bool)
    tracer.wrap(runtime, "actual", "runtime.actual")
    tracer.wrap(runtime, "log_tail", "runtime.log_tail")
    tracer.wrap(rootfs, "mount_rootfs", "mount")
    tracer.wrap(runtime_spec, "build_config", "build_config")
    tracer.wrap(runtime_spec, "write_config", "write_config")
    for attr in ("list", "read", "apply"):
        tracer.wrap(store, attr, f"http.{attr}", lambda a, k, r: {"path": str(a[0])[:120] if a else None})
    original_watch = store.watch

    def watch(*args, **kwargs):
        for event in original_watch(*args, **kwargs):
            tracer.log("watch", time.time(), path=event.path, revision=event.revision)
            yield event

    store.watch = watch


def child_main() -> int:
    """``--mayor-child``: run one Mayor with the runc runtime; its configuration comes as a JSON line on stdin."""
    from master.client import RemoteKeg
    from mayor.daemon import Mayor
    from mayor.runc_runtime import RuncRuntime

    config = json.loads(sys.stdin.readline())
    stop = threading.Event()
    for signo in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signo, lambda *_: stop.set())
    store = RemoteKeg(config["url"], config["token"], timeout=10.0)
    runtime = RuncRuntime(store, config["data_dir"], config["name"], cgroup_parent=config["cgroup_parent"])
    the_mayor = Mayor(store, config["name"], runtime, config["data_dir"])
    if config.get("trace"):
        _instrument(Tracer(config["trace"]), the_mayor, runtime, store)
    the_mayor.register()
    try:
        the_mayor.run(stop)
    finally:
        runtime.close()
        store.close()
    return 0


# ====================================================================== host side

def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None


def _comm(pid: int):
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().strip()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _runs_sleep(pid: int) -> bool:
    """The init is ``sleep``, or (under the machine's init, /dev/init) one of its children is."""
    if _comm(pid) == b"sleep":
        return True
    try:
        with open(f"/proc/{pid}/task/{pid}/children", "rb") as f:
            children = f.read().split()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return any(_comm(int(child)) == b"sleep" for child in children)


def wait_running(state_path: str, deadline: float, runc_pid: int | None = None) -> dict:
    """Poll until the init named by runc's ``state_path`` has exec'd ``sleep`` (and ``runc_pid`` has exited).

    Returns:
        ``{"running": time, "pid": init pid, "runc_exit": time or None}``.
    """
    pid, t_run, t_exit = None, None, None
    while True:
        if runc_pid is not None and t_exit is None:
            done, status = os.waitpid(runc_pid, os.WNOHANG)
            if done:
                t_exit = time.time()
                if os.waitstatus_to_exitcode(status) != 0:
                    raise BenchError(f"runc run failed with status {os.waitstatus_to_exitcode(status)}")
        if pid is None:
            state = _read_json(state_path)
            if state is not None:
                pid = state.get("init_process_pid")
        if pid is not None and t_run is None and _runs_sleep(pid):
            t_run = time.time()
        if t_run is not None and (runc_pid is None or t_exit is not None):
            return {"running": t_run, "pid": pid, "runc_exit": t_exit}
        if time.time() > deadline:
            raise BenchError(f"{state_path}: the container's sleep was not seen running in time (pid {pid})")
        time.sleep(POLL_SECONDS)


class StatusWatch:
    """A watch stream on a machine's status: every event timestamped on arrival, its value resolved after."""

    def __init__(self, url: str, token: str, machine: str):
        from master.client import RemoteKeg
        self.prefix = f"/machines/{machine}/status"
        self.watch_keg = RemoteKeg(url, token)
        self.read_keg = RemoteKeg(url, token)
        self.cond = threading.Condition()
        self.arrived: list = []                # (time, event) not resolved yet
        self.history = defaultdict(list)       # name -> [(time, state or None when deleted, object)]
        self.error = None

    def start(self) -> None:
        threading.Thread(target=self._watch, daemon=True, name="status-watch").start()
        threading.Thread(target=self._resolve, daemon=True, name="status-resolve").start()

    def _watch(self) -> None:
        try:
            for event in self.watch_keg.watch(self.prefix):
                t = time.time()
                with self.cond:
                    self.arrived.append((t, event))
                    self.cond.notify_all()
        except Exception as err:  # noqa: BLE001 - reported to the waiting main thread
            with self.cond:
                self.error = err
                self.cond.notify_all()

    def _resolve(self) -> None:
        from keg.errors import NotFound
        while True:
            with self.cond:
                while not self.arrived:
                    self.cond.wait()
                t, event = self.arrived.pop(0)
            rest = event.path[len(self.prefix) + 1:]
            if "/" in rest or not rest.endswith(".json") or rest == "mayor.json":
                continue
            name, obj = rest[:-5], None
            if event.new_kid is not None:
                try:
                    obj = json.loads(self.read_keg.read(event.path, rev=event.revision))
                except (NotFound, ValueError):
                    obj = {}
            with self.cond:
                self.history[name].append((t, None if obj is None else obj.get("state"), obj))
                self.cond.notify_all()

    def wait_for(self, name: str, want, after: float, timeout: float = TIMEOUT) -> tuple:
        """The first ``(time, object)`` of ``name`` that arrived after ``after`` with ``want(state)`` true."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for t, state, obj in self.history[name]:
                    if t >= after and want(state):
                        return t, obj
                if self.error is not None:
                    raise BenchError(f"the status watch failed: {self.error}")
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(round(t - after, 3), s) for t, s, _ in self.history[name]]
                    raise BenchError(f"status of {name}: not seen as wanted in {timeout:g} s; seen {seen}")
                self.cond.wait(left)


class MayorProcess:
    """The Mayor, ``Mayor.run`` with the runc runtime, in a child process (``--mayor-child``)."""

    def __init__(self, url: str, token: str, data_dir: str, cgroup_parent: str, log: str, trace: str | None):
        config = {"url": url, "token": token, "name": MACHINE, "data_dir": data_dir,
                  "cgroup_parent": cgroup_parent, "trace": trace}
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--mayor-child"],
                                         stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                         env={**os.environ, "PYTHONPATH": REPO}, preexec_fn=_die_with_parent,
                                         start_new_session=True)  # Ctrl-C is the benchmark's to handle
        self.proc.stdin.write((json.dumps(config) + "\n").encode())
        self.proc.stdin.close()
        self.log = log

    def check(self) -> None:
        if self.proc.poll() is not None:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                raise BenchError(f"the Mayor exited ({self.proc.returncode}); its log ends:\n{f.read()[-3000:]}")

    def stop(self) -> None:
        """SIGTERM (it stops after its current step), SIGKILL after 30 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Bench:
    """The master, the Mayor, the observer and the bare-runc side, and their clean-up."""

    def __init__(self, args, master):
        from master import auth
        from master.client import RemoteKeg
        self.args, self.master = args, master
        self.url = f"http://127.0.0.1:{master.port}"
        self.base = tempfile.mkdtemp(prefix="keg-bench-start-", dir=args.tmp)
        os.chmod(self.base, 0o711)  # runc mounts the root filesystems as the containers' unprivileged root
        self.data_dir = os.path.join(self.base, "mayor")
        self.bare_dir = os.path.join(self.base, "bare")
        self.bare_root = os.path.join(self.base, "bare-runc")
        os.makedirs(self.bare_dir, mode=0o711)
        os.makedirs(self.bare_root, mode=0o700)
        self.cgroup_parent = f"keg-bench-{secrets.token_hex(6)}"
        self.trace_path = os.path.join(self.base, "trace.jsonl") if args.trace else None
        self.admin = RemoteKeg(self.url, master.token)
        user = auth.user_object(MACHINE, "", machine=True)
        _, self.token, record = auth.make_token()
        user["tokens"].append(record)
        master.tx([{"op": "put", "path": f"/users/{MACHINE}/user.json", "value": json.dumps(user) + "\n"}])
        self.mayor = None
        self.watch = None
        self.image = None
        self.bare_config = None
        self.layer_dirs = None
        self.runc = shutil.which("runc")
        self.trace = None

    # ---------------------------------------------------------------- set-up

    def start(self) -> None:
        sys.path.append(os.path.join(REPO, "tests"))
        from busybox import import_busybox
        self.image = import_busybox(self.admin, "bench/busybox:1")
        self.watch = StatusWatch(self.url, self.master.token, MACHINE)
        self.watch.start()
        self.mayor = MayorProcess(self.url, self.token, self.data_dir, self.cgroup_parent,
                                  os.path.join(self.base, "mayor.log"), self.trace_path)
        deadline = time.monotonic() + TIMEOUT
        while not self.admin.exists(f"/machines/{MACHINE}/status/mayor.json"):
            self.mayor.check()
            if time.monotonic() > deadline:
                raise BenchError("the Mayor did not report within 30 s")
            time.sleep(0.05)
        if self.args.idle_procs:
            self._start_idle(self.args.idle_procs)

    def _start_idle(self, count: int) -> None:
        """``count`` more sleeping processes on the machine, for the whole run (one transaction)."""
        from keg.transaction import Transaction, put
        names = [f"idle{j:03d}" for j in range(count)]
        sent = time.time()
        self.admin.apply(Transaction(tuple(put(f"/machines/{MACHINE}/procs/{n}.json", self.spec()) for n in names)))
        for name in names:
            self.watch.wait_for(name, lambda s: s == "running", sent, timeout=TIMEOUT + count)

    def spec(self) -> bytes:
        return (json.dumps({"image": self.image, "args": SLEEP_ARGS, "restart": "always", "stop_grace": 0},
                           sort_keys=True) + "\n").encode()

    # ---------------------------------------------------------------- the Mayor's path

    def mayor_round(self, name: str, keep_config: bool = False) -> dict:
        """Spec written → running (host and status), exit → status, then removal; times in seconds."""
        from keg.transaction import Transaction, delete, put
        path = f"/machines/{MACHINE}/procs/{name}.json"
        cid = f"{MACHINE}.{name}"
        bundle = os.path.join(self.data_dir, "containers", name)
        state_path = os.path.join(self.data_dir, "runc", cid, "state.json")
        time.sleep(SETTLE_SECONDS)
        self.mayor.check()
        sent = time.time()
        result = self.admin.apply(Transaction((put(path, self.spec()),)))
        acked = time.time()
        if not result.ok:
            raise BenchError(f"writing {path} failed: {result.error}")
        host = wait_running(state_path, time.time() + TIMEOUT)
        t_status, running = self.watch.wait_for(name, lambda s: s == "running", sent)
        if running.get("pid") != host["pid"]:
            raise BenchError(f"{name}: status says pid {running.get('pid')}, runc says {host['pid']}")
        if keep_config:
            self._keep_bundle_config(bundle)

        time.sleep(EXIT_SETTLE_SECONDS)
        killed = time.time()
        os.kill(host["pid"], signal.SIGKILL)
        t_exit, ended = self.watch.wait_for(name, lambda s: s in ("exited", "backoff"), killed)
        exit_obj = _read_json(os.path.join(bundle, "exit.json")) or {}

        deleting = time.time()
        self.admin.apply(Transaction((delete(path),)))
        t_deleted, _ = self.watch.wait_for(name, lambda s: s is None, deleting)
        deadline = time.time() + TIMEOUT
        while os.path.exists(bundle) or os.path.exists(os.path.dirname(state_path)):
            if time.time() > deadline:
                raise BenchError(f"{name}: the container was not removed within {TIMEOUT:g} s")
            time.sleep(0.005)
        gone = time.time()
        return {"name": name, "sent": sent, "acked": acked, "host_running": host["running"], "pid": host["pid"],
                "status_running": t_status, "killed": killed, "status_exited": t_exit, "exit_state": ended["state"],
                "shim_reaped": exit_obj.get("exited"),
                "delete_sent": deleting, "status_deleted": t_deleted, "gone": gone,
                "spec_to_running": host["running"] - acked, "spec_to_status": t_status - acked,
                "exit_to_status": t_exit - killed, "removal": gone - deleting}

    def _keep_bundle_config(self, bundle: str) -> None:
        """The Mayor's config.json and image layers, for bare runc bundles of the same kind."""
        from mayor.layers import LayerCache
        from mayor.runtime_spec import ID_BASE
        with open(os.path.join(bundle, "config.json"), encoding="utf-8") as f:
            self.bare_config = json.load(f)
        image = _read_json(os.path.join(self.data_dir, "images", self.image + ".json"))
        cache = LayerCache(os.path.join(self.data_dir, "layers"), uid_shift=ID_BASE)
        self.layer_dirs = [cache.path(layer["digest"]) for layer in image["layers"]]

    # ---------------------------------------------------------------- bare runc

    def _runc_argv(self, *args: str) -> list:
        return [self.runc, "--root", self.bare_root, *args]

    def bare_round(self, cid: str) -> dict:
        """``runc run --detach`` of a bundle like the Mayor's → running; ``runc delete -f``."""
        from mayor import rootfs, runtime_spec
        bundle = os.path.join(self.bare_dir, cid)
        target = os.path.join(bundle, "rootfs")
        time.sleep(SETTLE_SECONDS)
        t_prepare = time.time()
        os.mkdir(bundle, 0o711)
        rootfs.mount_rootfs(self.layer_dirs, os.path.join(bundle, "upper"), os.path.join(bundle, "work"), target)
        config = json.loads(json.dumps(self.bare_config))
        config["root"]["path"] = target
        config["hostname"] = cid
        config["linux"]["cgroupsPath"] = f"/{self.cgroup_parent}/{cid}"
        runtime_spec.write_config(bundle, config)
        prepared = time.time()
        argv = self._runc_argv("--log", os.path.join(bundle, "runc.log"), "--log-format", "json", "run",
                               "--detach", "--bundle", bundle, "--pid-file", os.path.join(bundle, "init.pid"), cid)
        actions = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                   (os.POSIX_SPAWN_OPEN, 1, os.path.join(bundle, "out.log"), os.O_WRONLY | os.O_CREAT, 0o600),
                   (os.POSIX_SPAWN_DUP2, 1, 2)]
        started = time.time()
        pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=actions)
        host = wait_running(os.path.join(self.bare_root, cid, "state.json"), time.time() + TIMEOUT, pid)
        time.sleep(SETTLE_SECONDS)
        deleting = time.time()
        done = subprocess.run(self._runc_argv("delete", "--force", cid), capture_output=True, check=False)
        deleted = time.time()
        if done.returncode != 0:
            raise BenchError(f"runc delete -f {cid} failed: {done.stderr.decode(errors='replace')}")
        rootfs.unmount_rootfs(target)
        shutil.rmtree(bundle)
        return {"name": cid, "prepare": prepared - t_prepare, "started": started, "runc_exit": host["runc_exit"],
                "host_running": host["running"], "run_to_running": host["running"] - started,
                "run_to_exit": host["runc_exit"] - started, "delete": deleted - deleting}

    # ---------------------------------------------------------------- clean-up

    def cleanup(self) -> list:
        """Stop the Mayor, remove every container, shim, mount and cgroup it or we made; what was left over."""
        from mayor import rootfs
        from mayor.runc_runtime import RuncRuntime
        leftovers = []
        if self.mayor is not None:
            self.mayor.stop()
        if os.path.isdir(os.path.join(self.data_dir, "containers")):

            class Away:
                def __getattr__(self, name):
                    from keg.errors import KegError
                    raise KegError("not needed to remove containers")

            rt = RuncRuntime(Away(), self.data_dir, MACHINE, cgroup_parent=self.cgroup_parent)
            try:
                for have in rt.actual().values():
                    if not have.name.startswith("idle"):
                        leftovers.append(have.container)
                    rt.remove(have.container)
            finally:
                rt.close()
        listed = subprocess.run(self._runc_argv("list", "--format", "json"), capture_output=True, text=True,
                                check=False)
        for container in json.loads(listed.stdout or "null") or []:
            leftovers.append(container["id"])
            subprocess.run(self._runc_argv("delete", "--force", container["id"]), capture_output=True, check=False)
        if os.path.isdir(self.bare_dir):
            for cid in os.listdir(self.bare_dir):
                rootfs.unmount_rootfs(os.path.join(self.bare_dir, cid, "rootfs"))
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            stuck = [line.split()[4] for line in f if line.split()[4].startswith(self.base + "/")]
        for mount_point in sorted(stuck, reverse=True):
            leftovers.append(mount_point)
            rootfs.unmount_rootfs(mount_point)
        try:
            sys.path.append(os.path.join(REPO, "tests"))
            from busybox import remove_cgroup_parent
            remove_cgroup_parent(self.cgroup_parent)
        except OSError as err:
            leftovers.append(f"cgroup {self.cgroup_parent}: {err}")
        if self.trace_path and os.path.exists(self.trace_path):  # complete: the Mayor has stopped
            self.trace = load_trace(self.trace_path)
            if self.args.keep_trace:
                os.makedirs(self.args.out, exist_ok=True)
                shutil.copy(self.trace_path, os.path.join(self.args.out, f"{self.args.name}-trace.jsonl"))
        shutil.rmtree(self.base, ignore_errors=True)
        self.admin.close()
        return leftovers


# ====================================================================== the breakdown

def load_trace(path: str) -> list:
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                pass  # a line cut by the Mayor's end
    records.sort(key=lambda r: r["t0"])
    return records


def _first(records, ev: str, after: float, before: float = float("inf"), key: str = "t0", **match):
    """The first record of ``ev`` whose ``key`` time lies in [after, before] and whose fields match."""
    for r in records:
        if r["ev"] == ev and after <= r[key] <= before and all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def _ms(a: float, b: float) -> float:
    return 1000 * (b - a)


def _total_ms(records: list, ev: str, after: float, before: float) -> float:
    """Milliseconds spent in all calls of ``ev`` that began in [after, before]."""
    return sum(_ms(r["t0"], r["t1"]) for r in records if r["ev"] == ev and after <= r["t0"] <= before)


def start_stages(records: list, rnd: dict) -> dict | None:
    """Milliseconds of each stage from the spec's acknowledgement to its running status at the observer.

    Lines in brackets are parts of, or views across, the stages above them; the others add up.
    """
    name = rnd["name"]
    watch = _first(records, "watch", rnd["sent"] - 0.001, path=f"/machines/{MACHINE}/procs/{name}.json")
    start = _first(records, "runtime.start", rnd["sent"], name=name)
    if watch is None or start is None:
        return None
    step = next((r for r in records if r["ev"] == "step" and r["t0"] <= start["t0"] <= r["t1"]), None)
    read = _first(records, "read_desired", step["t0"], start["t0"]) if step else None
    mount = _first(records, "mount", start["t0"], start["t1"])
    launch = _first(records, "runtime.launch", start["t0"], start["t1"])
    spare = _first(records, "runtime.new_shim", start["t0"], start["t1"])
    publish = None
    for r in records:  # the publish that said "running": the last one begun before its event arrived
        if r["ev"] == "publish" and start["t1"] <= r["t0"] <= rnd["status_running"]:
            publish = r
    if None in (read, mount, launch, spare, publish):
        return None
    execs = _first(records, "read_exec_requests", start["t1"], publish["t0"])
    commit = _first(records, "http.apply", publish["t0"], publish["t1"])
    stages = {
        "ack → Mayor's watch event (negative: before the ack)": _ms(rnd["acked"], watch["t0"]),
        "watch event → step starts": _ms(watch["t0"], step["t0"]),
        "read the process table (HTTP list + a read per spec)": _ms(read["t0"], read["t1"]),
        "table read → runtime.start (actual, plan)": _ms(read["t1"], start["t0"]),
        "runtime.start: validate, image, layers (cached)": _ms(start["t0"], mount["t0"]),
        "runtime.start: mount overlayfs": _ms(mount["t0"], mount["t1"]),
        "runtime.start: build + write config, shim.json": _ms(mount["t1"], launch["t0"]),
        "runtime.start: bundle to the spare shim → its answer": _ms(launch["t0"], spare["t0"]),
        "runtime.start: start the next spare shim (Popen)": _ms(spare["t0"], spare["t1"]),
        "start returned → publish begins (state, exec lists, report)": _ms(start["t1"], publish["t0"]),
        "publish begins → event at the observer (commit, fan-out)": _ms(publish["t0"], rnd["status_running"]),
        "[host] bundle to the shim → sleep running": _ms(launch["t0"], rnd["host_running"]),
        "[host] sleep running → shim's answer read": _ms(rnd["host_running"], spare["t0"]),
    }
    if launch.get("shim_started"):
        stages["[shim] runc returned, running.json → answer read"] = _ms(launch["shim_started"], spare["t0"])
    if execs is not None:
        stages["[Mayor] of which read_exec_requests (2 HTTP lists)"] = _ms(execs["t0"], execs["t1"])
    stages["[step] runtime.actual() calls, watch event → publish"] = _total_ms(records, "runtime.actual",
                                                                             watch["t0"], publish["t0"])
    stages["[step] runtime.log_tail() calls, watch event → publish"] = _total_ms(records, "runtime.log_tail",
                                                                               watch["t0"], publish["t0"])
    if commit is not None:
        stages["[publish] its POST /v1/tx, sent → answer read"] = _ms(commit["t0"], commit["t1"])
    return stages


def exit_stages(records: list, rnd: dict) -> dict | None:
    """Milliseconds of each stage from the kill to the exited/back-off status at the observer."""
    woke = _first(records, "runtime.wait", rnd["killed"], key="t1")
    if woke is None:
        return None
    step = _first(records, "step", woke["t1"])
    publish = None
    for r in records:  # the publish that said "exited"/"backoff": the last one begun before its event arrived
        if r["ev"] == "publish" and woke["t1"] <= r["t0"] <= rnd["status_exited"]:
            publish = r
    if step is None or publish is None:
        return None
    read = _first(records, "read_desired", step["t0"], publish["t0"])
    execs = _first(records, "read_exec_requests", step["t0"], publish["t0"])
    commit = _first(records, "http.apply", publish["t0"], publish["t1"])
    stages = {}
    if rnd.get("shim_reaped"):
        stages["kill → shim reaps the init"] = _ms(rnd["killed"], rnd["shim_reaped"])
        stages["reaped → Mayor's wait() returns (exit.json, FIFO)"] = _ms(rnd["shim_reaped"], woke["t1"])
    else:
        stages["kill → Mayor's wait() returns"] = _ms(rnd["killed"], woke["t1"])
    stages["wait() returned → step starts"] = _ms(woke["t1"], step["t0"])
    stages["step starts → publish begins (table, plan, exec lists, report)"] = _ms(step["t0"], publish["t0"])
    stages["publish begins → event at the observer (commit, fan-out)"] = _ms(publish["t0"], rnd["status_exited"])
    if read is not None:
        stages["[step] of which read the process table"] = _ms(read["t0"], read["t1"])
    if execs is not None:
        stages["[step] of which read_exec_requests (2 HTTP lists)"] = _ms(execs["t0"], execs["t1"])
    stages["[step] of which runtime.actual() calls"] = _total_ms(records, "runtime.actual", step["t0"], publish["t0"])
    stages["[step] of which runtime.log_tail() calls"] = _total_ms(records, "runtime.log_tail", step["t0"],
                                                                   publish["t0"])
    if commit is not None:
        stages["[publish] its POST /v1/tx, sent → answer read"] = _ms(commit["t0"], commit["t1"])
    return stages


def summarize_stages(per_round: list) -> dict:
    """``{stage: {p50_ms, p99_ms, n}}`` over the rounds that could be traced."""
    by_stage = defaultdict(list)
    for stages in per_round:
        for key, value in (stages or {}).items():
            by_stage[key].append(value)
    return {k: {"n": len(v), "p50_ms": percentile(v, 50), "p99_ms": percentile(v, 99), "max_ms": max(v)}
            for k, v in by_stage.items()}


def print_stages(title: str, summary: dict) -> None:
    print(f"\n  {title}")
    print(f"    {'stage':<64} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for stage, s in summary.items():
        print(f"    {stage:<64} {s['p50_ms']:>8.1f} {s['p99_ms']:>8.1f} {s['max_ms']:>8.1f}")


# ====================================================================== main

def run(args, report: Report) -> dict:
    """Set up, warm up, run the interleaved rounds; returns the raw rounds (and the trace)."""
    out = {"mayor": [], "bare": [], "warmup": []}
    with KegMasterServer(args.tmp) as master:
        bench = Bench(args, master)
        out["leftovers_removed"] = []
        try:
            bench.start()
            for w in range(WARMUP_ROUNDS):  # the first fetches the image and unpacks its layer
                out["warmup"].append(bench.mayor_round(f"w{w}", keep_config=(w == 0)))
                out["warmup"].append(bench.bare_round(f"warm{w}"))
            report.figure("warm-up: first start (image fetched, layer unpacked)",
                          1000 * out["warmup"][0]["spec_to_running"], "ms")
            cpu_before = {"master": cpu_seconds(master.proc.pid), "mayor": cpu_seconds(bench.mayor.proc.pid)}
            for i in range(args.rounds):
                parts = [("mayor", f"s{i:03d}", bench.mayor_round), ("bare", f"b{i:03d}", bench.bare_round)]
                for kind, name, part in parts if i % 2 == 0 else reversed(parts):
                    out[kind].append(part(name))
                m, b = out["mayor"][-1], out["bare"][-1]
                m["load"] = b["load"] = os.getloadavg()[0]
                print(f"    round {i + 1:>3}/{args.rounds}: Mayor {1000 * m['spec_to_running']:6.1f} ms "
                      f"(status {1000 * m['spec_to_status']:6.1f})  bare {1000 * b['run_to_running']:6.1f} ms  "
                      f"exit→status {1000 * m['exit_to_status']:6.1f} ms", flush=True)
            out["cpu_seconds"] = {"master": cpu_seconds(master.proc.pid) - cpu_before["master"],
                                  "mayor_process": cpu_seconds(bench.mayor.proc.pid) - cpu_before["mayor"]}
        finally:
            handler = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
            try:
                out["leftovers_removed"] = bench.cleanup()
            finally:
                signal.signal(signal.SIGINT, handler)
        if bench.trace is not None:
            out["trace"] = bench.trace
    return out


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through every finally: containers, mounts, master removed


_INTERRUPTED = threading.Event()


def _interrupt(signum, frame):
    _INTERRUPTED.set()  # Ctrl-C reaches the master too: what fails first may be a request to it
    raise KeyboardInterrupt


def main() -> int:
    if "--mayor-child" in sys.argv[1:]:
        return child_main()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds of each kind (default 50; quick 10)")
    parser.add_argument("--quick", action="store_true", help="10 rounds")
    parser.add_argument("--idle-procs", type=int, default=0, metavar="N",
                        help="keep N other sleeping processes on the machine all along (default 0)")
    parser.add_argument("--no-trace", dest="trace", action="store_false",
                        help="do not timestamp the Mayor's steps (no breakdown)")
    parser.add_argument("--keep-trace", action="store_true", help="copy the raw trace to OUT/<name>-trace.jsonl")
    parser.add_argument("--tmp", default=None, help="where the keg and the Mayor's data go (default: the system's)")
    parser.add_argument("--out", default=os.path.join(HERE, "out"))
    parser.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    args = parser.parse_args()
    args.rounds = args.rounds or (10 if args.quick else 50)
    if os.geteuid() != 0 or shutil.which("runc") is None or not os.path.exists("/bin/busybox"):
        print("mayor_start: needs root, runc and /bin/busybox (./install.sh)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)

    env = environment(None)
    env.pop("etcd", None)
    env["runc"] = subprocess.run(["runc", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    env["kernel"] = platform.release()
    env["load_before"] = os.getloadavg()
    args.name = "mayor-start" + (f"-idle{args.idle_procs}" if args.idle_procs else "")
    report = Report(args.name, {"rounds": args.rounds, "warmup": WARMUP_ROUNDS, "trace": args.trace,
                           "idle_procs": args.idle_procs, "poll_ms": 1000 * POLL_SECONDS,
                           "settle_s": SETTLE_SECONDS})
    print(f"  {env['cpus']} CPUs, {env['mem_gib']} GiB, {env['runc']}, kernel {env['kernel']}, "
          f"load average {env['load_before'][0]:.2f}", flush=True)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        measured = run(args, report)
    except Exception:
        if not _INTERRUPTED.is_set():
            raise
        measured = None
    except KeyboardInterrupt:
        measured = None
    if measured is None:
        print("\ninterrupted: containers, mounts, cgroups and temporary directories were removed", file=sys.stderr)
        return 130
    env["load_after"] = os.getloadavg()

    mayor, bare = measured["mayor"], measured["bare"]
    start = summarize(r["spec_to_running"] for r in mayor)
    status = summarize(r["spec_to_status"] for r in mayor)
    runc_run = summarize(r["run_to_running"] for r in bare)
    exits = summarize(r["exit_to_status"] for r in mayor)
    rows = [("Mayor: spec acked → sleep running at the host", start),
            ("Mayor: spec acked → status running at a watcher", status),
            ("bare: runc run -d → sleep running at the host", runc_run),
            ("bare: runc run -d → runc exited", summarize(r["run_to_exit"] for r in bare)),
            ("Mayor: exit (SIGKILL) → status at a watcher", exits),
            ("Mayor: spec write sent → acked", summarize(r["acked"] - r["sent"] for r in mayor)),
            ("Mayor: spec deleted → container gone", summarize(r["removal"] for r in mayor)),
            ("bare: runc delete -f", summarize(r["delete"] for r in bare)),
            ("bare: bundle prepared (mount, config; not timed above)", summarize(r["prepare"] for r in bare))]
    print(f"\n  {'':<{LABEL_WIDTH}} {'p50':>12} {'':<8} p99, max, p50 as a multiple of bare runc's")
    for label, s in rows:
        report.figure(label, s["p50_ms"], "ms", f"p99 {s['p99_ms']:7.1f}  max {s['max_ms']:7.1f}  "
                      f"{s['p50_ms'] / runc_run['p50_ms']:5.2f}× bare", summary=s)
    ratio = start["p50_ms"] / runc_run["p50_ms"]
    report.figure("ratio spec→running / bare runc run, p50", ratio, "×")
    report.figure("ratio spec→status / bare runc run, p50", status["p50_ms"] / runc_run["p50_ms"], "×")
    report.goal("spec → running ≤ 1.5× bare runc at p50 (×)", ratio, "<=", GOAL_RATIO, "issue 6")
    report.goal("spec → running p99 (ms)", start["p99_ms"], "<=", GOAL_P99_MS, "issue 6")
    report.goal("spec → running p50 (ms)", start["p50_ms"], "<=", GOAL_P50_MS, "DESIGN §9")
    report.goal("exit → status visible p99 (ms)", exits["p99_ms"], "<=", GOAL_EXIT_P99_MS, "issue 6")

    extra = {"measured": {k: v for k, v in measured.items() if k != "trace"}}
    if "trace" in measured:
        starts = [start_stages(measured["trace"], r) for r in mayor]
        ends = [exit_stages(measured["trace"], r) for r in mayor]
        extra["breakdown"] = {"start": summarize_stages(starts), "exit": summarize_stages(ends),
                              "rounds_traced": {"start": sum(s is not None for s in starts),
                                                "exit": sum(s is not None for s in ends)}}
        for r, s, e in zip(mayor, starts, ends):
            r["stages_ms"], r["exit_stages_ms"] = s, e
        traced = extra["breakdown"]["rounds_traced"]
        print_stages(f"where spec → status running goes ({traced['start']} rounds traced)",
                     extra["breakdown"]["start"])
        print_stages(f"where exit → status goes ({traced['exit']} rounds traced)", extra["breakdown"]["exit"])
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{report.name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({**report.to_json(env), **extra}, f, indent=2)
        f.write("\n")
    print(f"\nresults in {os.path.relpath(path)}")
    if measured["leftovers_removed"]:
        print(f"  removed at the end: {', '.join(measured['leftovers_removed'])}")
    return 1 if args.check and not all(g.met for g in report.goals) else 0


if __name__ == "__main__":
    sys.exit(main())
