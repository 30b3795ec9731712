"""The supervisor of one container: ``python -m mayor.shim``, started detached by ``RuncRuntime``.

One shim per container. It is started before it is needed (``RuncRuntime``
keeps one spare waiting, so that starting a container does not wait for
Python to start) and waits for one command line on its standard input,
``{"bundle": DIR}``; end of input makes it exit. Everything else it needs is
in ``DIR/shim.json``, written by the runtime. Then it:

1. becomes a child subreaper, so the container's init, orphaned when
   ``runc run --detach`` exits, becomes its child and its real exit status
   can be collected with ``waitpid``;
2. runs ``runc run --detach`` with the container's standard output and error
   on one pipe it reads (merged, in arrival order), and answers on its
   standard output with one JSON line, ``{"ok": true, "pid": …}`` or
   ``{"ok": false, "error": …}``; then its standard input and output become
   /dev/null (its standard error is ``DIR/shim.log``);
3. copies the output into ``LOGS/<offset>.log`` files, rotated at a size
   limit and named by the offset of their first byte in everything the
   process name ever wrote here, so totals survive rotation and restarts;
4. runs the health check, if any, at its interval and records the state in
   ``DIR/health.json``; with ``restart_on_failure`` it stops a container that
   became unhealthy (SIGTERM, SIGKILL after the stop grace); a check
   ``until_ready`` (readiness) is never unhealthy and ends at its first success;
5. when the init exits, reads the memory cgroup's OOM-kill count, writes
   ``DIR/exit.json`` atomically and exits.

Changes that matter to the Mayor (exit, health) are announced by writing a
byte into the runtime's event FIFO, if anyone has it open. The shim imports
only the standard library, and little of it: it starts once per container.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
CLONE_NEWNET = 0x40000000
RUNC_TIMEOUT = 60.0       # seconds for `runc run --detach`
DRAIN_SECONDS = 2.0       # after the init exited, how long to wait for the rest of its output
READ_SIZE = 65536
HEALTH_OUTPUT = 4096      # bytes of a health check's output kept in health.json
SLOW_INTERVAL = 2.0       # seconds between the readiness checks of a process not ready after its start period
# Signals reset to their default in runc and hence in the container (Python ignores SIGPIPE and SIGXFSZ).
DEFAULT_SIGNALS = {s for s in range(1, 32) if s not in (signal.SIGKILL, signal.SIGSTOP)}

_libc = ctypes.CDLL(None, use_errno=True)


# ---------------------------------------------------------------------------
# small helpers (shared with mayor.runc_runtime, which reads what these write)


def write_json(path: str, obj) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (a reader sees the old or the new file, whole)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str):
    """The JSON object in ``path``, or None if the file is missing or torn."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None


def start_time(pid: int):
    """The start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat), or None if it
    does not exist or is a zombie: with the pid, it names one process for good."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def pid_namespace(pid: int):
    """The pid namespace of ``pid`` (``pid:[inode]``), or None if it is gone."""
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def kill_inside(pid_file: str, namespace) -> bool:
    """SIGKILL the process named by a runc ``--pid-file`` if it still runs in the container's pid
    ``namespace`` (a pid read from a file may name another process by now); True if it was signalled."""
    try:
        with open(pid_file, encoding="ascii") as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return False
    if namespace is None or pid_namespace(pid) != namespace:
        return False
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def notify(fifo: str) -> None:
    """Wake the runtime's ``wait()``: one byte into its event FIFO, if it has it open."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return  # ENXIO: nobody is listening; the runtime reads the files when it comes back
    try:
        os.write(fd, b"!")
    except OSError:
        pass  # EAGAIN: the FIFO is full of wake-ups already
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _spawn(argv: list, stdout: str = "/dev/null", extra=(), append: bool = False) -> int:
    """posix_spawn ``argv`` with stdin from /dev/null, stdout (and stderr) into a file, default signals."""
    mode = os.O_APPEND if append else os.O_TRUNC
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, stdout, os.O_WRONLY | os.O_CREAT | mode, 0o600),
        (os.POSIX_SPAWN_DUP2, 1, 2),
        *extra,
    ]
    return os.posix_spawn(argv[0], argv, os.environ, file_actions=actions, setsigdef=DEFAULT_SIGNALS,
                          setsigmask=())


# ---------------------------------------------------------------------------
# logs


class LogFiles:
    """The output of one process name: ``<dir>/<offset:020d>.log``, newest last, at most ``keep`` files."""

    def __init__(self, directory: str, file_bytes: int, keep: int):
        self.directory, self.file_bytes, self.keep = directory, file_bytes, max(1, keep)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        names = log_files(directory)
        self.offset, self.size = 0, 0
        if names:
            last = names[-1]
            self.offset, self.size = last[0], os.path.getsize(last[1])
            if self.size >= file_bytes:
                self.offset, self.size = self.offset + self.size, 0
        self.fd = self._open()

    def _open(self) -> int:
        path = os.path.join(self.directory, f"{self.offset:020d}.log")
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    def write(self, data: bytes) -> None:
        _write_all(self.fd, data)
        self.size += len(data)
        if self.size >= self.file_bytes:
            os.close(self.fd)
            self.offset, self.size = self.offset + self.size, 0
            self.fd = self._open()
            for _, path in log_files(self.directory)[:-self.keep]:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def close(self) -> None:
        os.close(self.fd)


def log_files(directory: str) -> list:
    """``[(offset, path)]`` of a name's log files, oldest first."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        if name.endswith(".log") and name[:-4].isdigit():
            found.append((int(name[:-4]), os.path.join(directory, name)))
    return sorted(found)


# ---------------------------------------------------------------------------
# the memory cgroup


def _cgroup_mounts() -> dict:
    """``{"memory": (mount point, root)}`` for cgroup v1 and ``{"": (…)}`` for the v2 hierarchy."""
    found = {}
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            fstype, options = fields[sep + 1], fields[sep + 3].split(",")
            if fstype == "cgroup" and "memory" in options:
                found.setdefault("memory", (fields[4], fields[3]))
            elif fstype == "cgroup2":
                found.setdefault("", (fields[4], fields[3]))
    return found


def oom_counter(pid: int):
    """The file counting OOM kills in ``pid``'s memory cgroup (v1 memory.oom_control, v2 memory.events)."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8") as f:
            lines = f.read().splitlines()
        mounts = _cgroup_mounts()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        key = "memory" if "memory" in controllers.split(",") else "" if controllers == "" else None
        if key is None or key not in mounts:
            continue
        mount, root = mounts[key]
        if root != "/" and path.startswith(root):
            path = path[len(root):]
        name = "memory.oom_control" if key == "memory" else "memory.events"
        candidate = os.path.join(mount, path.lstrip("/"), name)
        if os.path.exists(candidate):
            return candidate
    return None


def oom_kills(counter) -> int:
    """OOM kills so far in the cgroup of ``counter`` (0 when unknown)."""
    if counter is None:
        return 0
    try:
        with open(counter, encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


# ---------------------------------------------------------------------------
# health checks


def _enter_network(init_pid: int) -> None:
    """Join the network namespace of the container whose init is ``init_pid`` (in a probe's child)."""
    fd = os.open(f"/proc/{init_pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


def _http_probe(init_pid: int, port: int, path: str, timeout: float, output: str) -> int:
    """GET ``path`` on 127.0.0.1:``port`` inside the container's network namespace (in a forked child).

    Returns the exit code: 0 for a 2xx or 3xx answer, 1 otherwise."""
    import socket  # only in the probe's child

    _enter_network(init_pid)
    request = f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: keg-health\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request.encode())
        data = b""
        while b"\r\n" not in data and len(data) < HEALTH_OUTPUT:
            chunk = s.recv(HEALTH_OUTPUT)
            if not chunk:
                break
            data += chunk
    line = data.split(b"\r\n", 1)[0]
    with open(output, "wb") as f:
        f.write(line + b"\n")
    parts = line.split()
    code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    return 0 if 200 <= code < 400 else 1


def _tcp_probe(init_pid: int, port: int, timeout: float, output: str) -> int:
    """Connect to 127.0.0.1:``port`` inside the container's network namespace (in a forked child).

    Returns the exit code: 0 when something accepted the connection; a refusal raises (the caller
    writes the error as the check's output and exits 2)."""
    import socket  # only in the probe's child

    _enter_network(init_pid)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout):
        pass
    with open(output, "w", encoding="utf-8") as f:
        f.write(f"listening on port {port}\n")
    return 0


class Health:
    """The health check of one container: when to run it, its state, and the check running now."""

    def __init__(self, conf: dict, started: float):
        self.conf = conf
        self.started = started
        self.status = "starting"
        self.failures = 0
        self.next_at = started + conf["interval"]
        self.check = None  # (pid, deadline) of the check running now

    def timeout(self, now: float) -> float | None:
        """Seconds until the health check needs attention; None when it has no more checks to run."""
        at = self.check[1] if self.check else self.next_at
        return None if at is None else max(0.0, at - now)

    def result(self, ok: bool, now: float) -> bool:
        """Record a check's result; True when the status changed.

        A check ``until_ready`` (the runtime's readiness check of a process with a port) is
        ``starting`` until its first success, never ``unhealthy``, and not run after that success;
        past its start period it runs every ``SLOW_INTERVAL`` seconds instead of its quick interval.
        """
        before = self.status
        starting = now - self.started < self.conf["start_period"]
        until_ready = self.conf.get("until_ready", False)
        if ok:
            self.failures, self.status = 0, "healthy"
        elif until_ready:
            self.failures += 1  # counted for health.json; the process stays "starting"
        elif self.status == "starting" and starting:
            pass  # failures in the start period do not count
        else:
            self.failures += 1
            if self.failures >= self.conf["threshold"]:
                self.status = "unhealthy"
        self.check = None
        if until_ready:
            self.next_at = None if ok else now + (self.conf["interval"] if starting else SLOW_INTERVAL)
        else:
            self.next_at = now + self.conf["interval"]
        return self.status != before


# ---------------------------------------------------------------------------
# the supervisor


class Shim:
    """Starts and supervises the container of one bundle."""

    def __init__(self, bundle: str):
        self.bundle = bundle
        self.conf = read_json(self._path("shim.json"))
        if self.conf is None:
            raise SystemExit(f"keg shim: {self._path('shim.json')} is missing or not JSON")
        self.cid, self.runc = self.conf["id"], self.conf["runc"]
        self.init_pid = None
        self.started = None
        self.init_status = None
        self.exited = None
        self.reason = None
        self.term_at = None  # a stop asked with a drain: SIGTERM then (routers stop sending to it first)
        self.kill_at = None
        self.health = None
        self.oom_counter = None
        self.pidns = None

    def _path(self, name: str) -> str:
        return os.path.join(self.bundle, name)

    def _runc(self, *args: str) -> list:
        return [self.runc, "--root", self.conf["root"], *args]

    # ---- start

    def launch(self) -> dict:
        """``runc run --detach`` with the output on a pipe; the answer for the runtime."""
        me = os.getpid()
        with open(self._path("shim.pid"), "w", encoding="ascii") as f:
            f.write(f"{me} {start_time(me)}\n")
        self.logs = LogFiles(self.conf["logs"], self.conf["log_file_bytes"], self.conf["log_files"])
        self.out_r, out_w = os.pipe()
        os.set_blocking(self.out_r, False)
        pid_file = self._path("init.pid")
        argv = self._runc("--log", self._path("runc.log"), "--log-format", "json", "run", "--detach",
                          "--bundle", self.bundle, "--pid-file", pid_file, self.cid)
        try:
            runc = _spawn(argv, extra=[(os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, out_w, 2)])
        finally:
            os.close(out_w)
        status = self._wait_runc(runc)
        if status != 0:
            self._copy_output()
            message = self._runc_errors() or f"runc exited with status {status}"
            self._spawn_wait(self._runc("delete", "--force", self.cid))
            return {"ok": False, "error": f"runc run {self.cid} failed: {message}"}
        with open(pid_file, encoding="ascii") as f:
            self.init_pid = int(f.read().strip())
        os.unlink(pid_file)
        self.started = time.time()
        self.oom_counter = oom_counter(self.init_pid)
        self.pidns = pid_namespace(self.init_pid)
        write_json(self._path("running.json"), {"pid": self.init_pid, "pid_start": start_time(self.init_pid),
                                                "pidns": self.pidns, "started": self.started})
        if self.conf.get("health"):
            self.health = Health(self.conf["health"], self.started)
            self._write_health("")
        return {"ok": True, "pid": self.init_pid, "started": self.started}

    def _wait_runc(self, pid: int) -> int:
        """Wait for runc (killing it after RUNC_TIMEOUT); its exit status."""
        fd = os.pidfd_open(pid)
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            if not poller.poll(int(RUNC_TIMEOUT * 1000)):
                os.kill(pid, signal.SIGKILL)
        finally:
            os.close(fd)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)

    def _spawn_wait(self, argv: list) -> int:
        return self._wait_runc(_spawn(argv, stdout=self._path("shim.log"), append=True))

    def _runc_errors(self) -> str:
        messages = []
        try:
            with open(self._path("runc.log"), encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue
                    if entry.get("level") in ("error", "fatal") and entry.get("msg"):
                        messages.append(entry["msg"])
        except FileNotFoundError:
            pass
        return "; ".join(messages)

    def _copy_output(self) -> bool:
        """Copy what the container wrote so far into the logs; False at end of output."""
        while True:
            try:
                data = os.read(self.out_r, READ_SIZE)
            except BlockingIOError:
                return True
            if not data:
                return False
            self.logs.write(data)

    # ---- supervise

    def supervise(self) -> None:
        """Copy output, run health checks, until the init exits; then write exit.json."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        poller = select.poll()
        poller.register(wake_r, select.POLLIN)
        poller.register(self.out_r, select.POLLIN)
        output_open = True
        self._stop_asked()  # a request may have come before the wakeup fd was set
        while True:
            self._reap()
            if self.init_status is not None:
                break
            now = time.time()
            self._tick(now)
            timeout = self._timeout(now)
            for fd, _ in poller.poll(None if timeout is None else int(timeout * 1000) + 1):
                if fd == wake_r:
                    while True:
                        try:
                            got = os.read(wake_r, 512)
                        except BlockingIOError:
                            break
                        if not got:
                            break
                        if signal.SIGUSR1 in got:
                            self._stop_asked()
                elif fd == self.out_r and not self._copy_output():
                    poller.unregister(self.out_r)
                    output_open = False
        self._finish(poller, output_open)

    def _stop_asked(self) -> None:
        """The runtime asked for a stop (SIGUSR1 after writing stop-requested): SIGTERM at its term_at when
        it has one (the runtime sent it already otherwise), SIGKILL at its kill_at."""
        asked = read_json(self._path("stop-requested"))
        if not isinstance(asked, dict):
            return
        term_at, kill_at = asked.get("term_at"), asked.get("kill_at")
        if isinstance(term_at, (int, float)) and (self.term_at is None or term_at < self.term_at):
            self.term_at = term_at
        if isinstance(kill_at, (int, float)) and (self.kill_at is None or kill_at < self.kill_at):
            self.kill_at = kill_at

    def _timeout(self, now: float):
        waits = []
        due = None if self.health is None or self.kill_at is not None else self.health.timeout(now)
        if due is not None:
            waits.append(due)
        for at in (self.term_at, self.kill_at):
            if at is not None:
                waits.append(max(0.0, at - now))
        return min(waits) if waits else None

    def _reap(self) -> None:
        """Collect every child that exited: the init, a health check, or an orphan reparented to us."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.init_pid:
                self.init_status, self.exited = status, time.time()
            elif self.health is not None and self.health.check and pid == self.health.check[0]:
                self._health_result(os.waitstatus_to_exitcode(status) == 0, time.time())

    def _tick(self, now: float) -> None:
        if self.term_at is not None and now >= self.term_at:
            self.term_at = None
            self._signal_init(signal.SIGTERM)
        if self.kill_at is not None and now >= self.kill_at:
            self.kill_at = None
            os.kill(self.init_pid, signal.SIGKILL)  # our child, not yet reaped: the pid is still its
        health = self.health
        if health is None or self.reason == "unhealthy":
            return
        if health.check is not None and now >= health.check[1]:
            self._kill_check()
            self._health_result(False, now, f"timed out after {health.conf['timeout']:g} s\n")
        elif health.check is None and health.next_at is not None and now >= health.next_at:
            self._start_check(now)

    def _start_check(self, now: float) -> None:
        conf = self.health.conf
        output = self._path("health.out")
        if "exec" in conf:
            try:
                os.unlink(self._path("health.pid"))  # never kill a pid of an earlier check
            except FileNotFoundError:
                pass
            argv = self._runc("exec", "--pid-file", self._path("health.pid"), self.cid, *conf["exec"])
            pid = _spawn(argv, stdout=output)
        else:
            pid = os.fork()
            if pid == 0:  # the probe: enter the container's network namespace, GET, exit
                code = 2
                try:
                    signal.set_wakeup_fd(-1)
                    if "tcp" in conf:
                        code = _tcp_probe(self.init_pid, conf["tcp"]["port"], conf["timeout"], output)
                    else:
                        code = _http_probe(self.init_pid, conf["http"]["port"], conf["http"]["path"],
                                           conf["timeout"], output)
                except BaseException as e:  # noqa: BLE001 - a child's last words go into the check output
                    try:
                        with open(output, "w", encoding="utf-8") as f:
                            f.write(f"{type(e).__name__}: {e}\n")
                    except OSError:
                        pass
                finally:
                    os._exit(code)
        self.health.check = (pid, now + conf["timeout"])

    def _kill_check(self) -> None:
        """Kill the command of a check; runc exec then reaps it and ends by itself (killing runc exec
        first would orphan the command, whose zombie keeps the container's pid namespace from closing)."""
        if kill_inside(self._path("health.pid"), self.pidns):
            return
        try:
            os.kill(self.health.check[0], signal.SIGKILL)  # not started inside yet, or gone: stop the check
        except ProcessLookupError:
            pass

    def _health_result(self, ok: bool, now: float, message: str = None) -> None:
        if message is None:
            try:
                with open(self._path("health.out"), "rb") as f:
                    message = f.read(HEALTH_OUTPUT).decode("utf-8", "replace")
            except FileNotFoundError:
                message = ""
        changed = self.health.result(ok, now)
        self._write_health(message)
        if changed:
            notify(self.conf["events"])
        if changed and self.health.status == "unhealthy" and self.health.conf["restart_on_failure"]:
            self.reason = "unhealthy"
            self._signal_init(signal.SIGTERM)
            self.kill_at = now + float(self.conf.get("stop_grace", 10.0))

    def _signal_init(self, signo: int) -> None:
        try:
            os.kill(self.init_pid, signo)
        except ProcessLookupError:
            pass

    def _write_health(self, output: str) -> None:
        h = self.health
        write_json(self._path("health.json"),
                   {"status": h.status, "failures": h.failures, "checked": time.time(), "output": output})

    # ---- the end

    def _finish(self, poller, output_open: bool) -> None:
        if self.health is not None and self.health.check is not None:
            self._kill_check()
        deadline = time.time() + DRAIN_SECONDS
        while output_open and time.time() < deadline:
            if poller.poll(int((deadline - time.time()) * 1000) + 1) and not self._copy_output():
                break
        self.logs.close()
        status = self.init_status
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        code = 128 + sig if sig is not None else os.WEXITSTATUS(status)
        oom = oom_kills(self.oom_counter) > 0
        reason = self.reason
        if reason is None and oom:
            reason = "oom"
        if reason is None and os.path.exists(self._path("stop-requested")):
            reason = "stopped"
        write_json(self._path("exit.json"),
                   {"exit_code": code, "signal": sig, "exited": self.exited, "oom": oom, "reason": reason})
        notify(self.conf["events"])


def _answer(reply: dict) -> None:
    try:
        os.write(1, (json.dumps(reply) + "\n").encode())
    except BrokenPipeError:
        pass  # the Mayor went away while we started; it re-adopts the container from the bundle
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)


def main() -> int:
    """Wait for a command, start the container, supervise it until it exits."""
    signal.signal(signal.SIGUSR1, lambda *_: None)  # "read stop-requested"; never the default (death)
    if _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"keg shim: cannot become a subreaper: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 1
    line = sys.stdin.buffer.readline()
    if not line:
        return 0  # a spare that was never used
    bundle = json.loads(line)["bundle"]
    log = os.open(os.path.join(bundle, "shim.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.dup2(log, 2)
    os.close(log)
    shim = Shim(bundle)
    try:
        reply = shim.launch()
    except Exception as e:  # noqa: BLE001 - the runtime must hear why, whatever it was
        reply = {"ok": False, "error": f"the container supervisor failed: {type(e).__name__}: {e}"}
        _answer(reply)
        raise
    _answer(reply)
    if not reply["ok"]:
        return 1
    shim.supervise()
    return 0


if __name__ == "__main__":
    sys.exit(main())
