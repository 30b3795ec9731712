"""A thin wrapper of the runc command line (DESIGN §5.4): the only code of the Mayor that runs runc.

Every call passes ``--root`` with the Mayor's own state directory, so the
Mayor (and its tests) see and touch only their own containers. Detached
containers write straight into the log files they were given: with
``terminal: false`` runc hands its standard output and error to the container
process, so no process of ours has to stay alive to carry the logs.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile

from keg.errors import KegError

# Upstream runc fixed CVE-2024-21626 (a working directory reaching host file descriptors) in 1.1.12.
FIXED_UPSTREAM = (1, 1, 12)
# Debian backported the fix without changing the upstream version: release -> first fixed "+debNuM".
DEBIAN_FIXED = {12: 1, 11: 3}  # bookworm 1.1.5+ds1-1+deb12u1, bullseye 1.0.0~rc93+ds1-5+deb11u3
TIMEOUT = 60  # seconds for one runc command; runc itself never takes that long
LIST_ATTEMPTS = 5  # runc list calls before a container deleted under it is reported as an error
PR_SET_CHILD_SUBREAPER = 36


class RuncError(KegError):
    """runc is missing, too old, or a runc command failed."""


class ContainerNotFound(RuncError):
    """No container with that id in the Mayor's runc state directory."""

    exit_code = 1


# ---------------------------------------------------------------------------
# the version check


def parse_runc_version(text: str) -> tuple:
    """The upstream version tuple and the Debian "+debNuM" suffix (or None) from ``runc --version``.

    Raises:
        RuncError: the text has no "runc version X.Y.Z" line.
    """
    match = re.search(r"runc version (\d+)\.(\d+)\.(\d+)(\S*)", text)
    if not match:
        raise RuncError(f"cannot read a version from `runc --version`: {text.strip()[:200]!r}")
    version = tuple(int(match.group(i)) for i in (1, 2, 3))
    debian = re.search(r"\+deb(\d+)u(\d+)", text)
    return version, (int(debian.group(1)), int(debian.group(2))) if debian else None


def check_runc_version(text: str) -> str:
    """Accept a runc that has the CVE-2024-21626 fix, from its ``--version`` output.

    Accepted: upstream 1.1.12 or later (1.2 pre-releases included), or a Debian
    build whose version carries the security backport (``+deb12u1`` or later
    on bookworm, ``+deb11u3`` or later on bullseye).

    Returns:
        A one-line description, e.g. "runc 1.1.5 (Debian deb12u1 backport)".

    Raises:
        RuncError: saying which version was found and why it is refused.
    """
    version, debian = parse_runc_version(text)
    shown = ".".join(map(str, version))
    if version >= FIXED_UPSTREAM:
        return f"runc {shown}"
    if debian is not None:
        release, update = debian
        first_fixed = DEBIAN_FIXED.get(release)
        if first_fixed is not None and update >= first_fixed:
            return f"runc {shown} (Debian deb{release}u{update} backport)"
    suffix = f" (Debian deb{debian[0]}u{debian[1]})" if debian else ""
    raise RuncError(
        f"runc {shown}{suffix} is vulnerable to CVE-2024-21626 (container escape through a working directory "
        f"in /proc/self/fd); install runc {'.'.join(map(str, FIXED_UPSTREAM))} or later, or your distribution's "
        "security update (Debian bookworm: 1.1.5+ds1-1+deb12u1)"
    )


DEFAULT_INIT = "tini-static"   # Debian's tini package; bound into every container at /dev/init


def _is_static_elf(path: str) -> bool:
    """True for an ELF executable without a program interpreter (PT_INTERP): it runs in any image."""
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:   # 64-bit ELF only
            return False
        order = "<" if head[5] == 1 else ">"
        phoff, = struct.unpack_from(order + "Q", head, 32)
        phentsize, phnum = struct.unpack_from(order + "HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from(order + "I", table, i * phentsize)[0] != 3 for i in range(phnum))


def check_init(init: str | None = DEFAULT_INIT) -> str | None:
    """The host path of the init every container runs under, checked; None when ``init`` is None.

    Without an init the process is PID 1 of its pid namespace, and the kernel
    drops every signal it has no handler for: SIGTERM would not stop it, and
    each stop would wait the whole grace for SIGKILL.

    Raises:
        RuncError: the init is missing, not executable by the containers, or
            dynamically linked (it could not run in an image without a libc).
    """
    if init is None:
        return None
    path = shutil.which(init)
    if path is None:
        raise RuncError(f"the container init {init} is not installed (apt-get install tini); without one, "
                        "processes run as PID 1 and ignore SIGTERM: pass --init none to accept that")
    path = os.path.realpath(path)
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode) or mode & 0o005 != 0o005:
        raise RuncError(f"the container init {path} must be a file others may read and execute (mode o+rx)")
    if not _is_static_elf(path):
        raise RuncError(f"the container init {path} is not a statically linked executable; use tini-static")
    return path


def check_runc(runc: str = "runc") -> str:
    """Run ``runc --version`` and refuse a runc without the CVE-2024-21626 fix.

    Returns:
        The description from ``check_runc_version``.

    Raises:
        RuncError: runc is not installed, does not answer, or is vulnerable.
    """
    try:
        out = subprocess.run([runc, "--version"], capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except FileNotFoundError as e:
        raise RuncError(f"{runc} is not installed; the Mayor runs processes with runc (apt-get install runc)") from e
    except subprocess.TimeoutExpired as e:
        raise RuncError(f"`{runc} --version` did not answer") from e
    if out.returncode != 0:
        raise RuncError(f"`{runc} --version` failed: {out.stderr.strip()}")
    return check_runc_version(out.stdout)


def become_subreaper() -> None:
    """Make this process the reaper of orphaned descendants, so it can wait for detached containers'
    init processes and learn their exit status (runc exits as soon as they started)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise RuncError(f"cannot become a child subreaper: {os.strerror(err)}")


# ---------------------------------------------------------------------------
# the wrapper


@contextlib.contextmanager
def _output(target, mode: str = "ab"):
    """A file descriptor for ``target``: a path (opened for appending), an open file, an fd, or None."""
    if target is None:
        yield subprocess.DEVNULL
    elif isinstance(target, (str, os.PathLike)):
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        try:
            yield fd
        finally:
            os.close(fd)
    elif isinstance(target, int):
        yield target
    else:
        yield target.fileno()


def _lost_list_race(message: str, root: str) -> bool:
    """Whether a failed ``runc list`` only lost a container deleted while it listed: runc stats each directory
    it read under the root and gives up when one has gone (``stat ROOT/ID: no such file or directory``)."""
    return f"stat {root}/" in message and "no such file or directory" in message


def _runc_message(log_path: str) -> str:
    """The error lines runc wrote to its JSON log, or "" if it wrote none."""
    messages = []
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("level") in ("error", "fatal"):
                    messages.append(entry.get("msg", ""))
    except FileNotFoundError:
        pass
    return "; ".join(m for m in messages if m)


class Runc:
    """runc commands on the containers under one state directory.

    Args:
        root: runc's state directory for the Mayor (``--root``), e.g.
            ``/run/keg/runc``; created mode 0700 if missing.
        runc: the runc executable.
    """

    def __init__(self, root: str, runc: str = "runc"):
        self.root = os.path.abspath(root)
        self.runc = runc
        os.makedirs(self.root, mode=0o700, exist_ok=True)

    def _argv(self, *args: str, log: str = None) -> list:
        argv = [self.runc, "--root", self.root]
        if log:
            argv += ["--log", log, "--log-format", "json"]
        return argv + list(args)

    def _call(self, *args: str, what: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
        """Run a runc command whose output we want; RuncError with runc's message on failure."""
        try:
            out = subprocess.run(
                self._argv(*args),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise RuncError(f"runc {what} did not finish in {timeout} s") from e
        if out.returncode != 0:
            message = out.stderr.strip()
            if "does not exist" in message or "not found" in message:
                raise ContainerNotFound(f"runc {what}: {message}")
            raise RuncError(f"runc {what} failed: {message}")
        return out

    def _with_stdio(self, args: list, container_id: str, what: str, stdout, stderr, timeout) -> tuple:
        """Run ``runc <args>`` handing it the container's stdio; returns its exit status and logged errors."""
        fd, log = tempfile.mkstemp(prefix=f".{container_id}.", suffix=".log", dir=self.root)
        os.close(fd)
        try:
            with _output(stdout) as out, _output(stderr) as err:
                try:
                    proc = subprocess.run(
                        self._argv(*args, log=log),
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=err,
                        timeout=timeout,
                        check=False,
                    )
                except subprocess.TimeoutExpired as e:
                    raise RuncError(f"runc {what} {container_id} did not finish in {timeout} s") from e
            return proc.returncode, _runc_message(log)
        finally:
            os.unlink(log)

    def run_detached(self, container_id: str, bundle: str, stdout=None, stderr=None) -> int:
        """Create and start a container in the background (``runc run --detach``).

        Args:
            container_id: the container's id (unique under this root).
            bundle: the bundle directory holding ``config.json``.
            stdout, stderr: where the process writes: a path (appended to), an
                open file, a file descriptor, or None for /dev/null. runc's
                own failure message also lands in ``stderr``.

        Returns:
            The host pid of the container's init process. It is not our child:
            to collect its exit status, call ``become_subreaper()`` once at
            start-up and ``os.waitpid`` it; otherwise poll ``state``.

        Raises:
            RuncError: the container did not start (runc's message included);
                call ``delete(container_id, force=True)`` before retrying.
        """
        return self._start_with_pid("run", ["--detach"], container_id, bundle, stdout, stderr)

    def run(self, container_id: str, bundle: str, stdout=None, stderr=None, timeout: float = TIMEOUT) -> int:
        """Run a container in the foreground until it exits, then delete it (``runc run``).

        Returns:
            The process's exit status; 128+N when killed by signal N (137 for SIGKILL, e.g. the OOM killer).

        Raises:
            RuncError: runc could not create the container, or the timeout
                passed (runc is killed then, the container is not: call
                ``delete(container_id, force=True)``).
        """
        args = ["run", "--bundle", os.path.abspath(bundle), container_id]
        code, message = self._with_stdio(args, container_id, "run", stdout, stderr, timeout)
        if code != 0 and message:
            # runc logs errors only when it failed itself; a process that exits non-zero logs nothing.
            raise RuncError(f"runc run {container_id} failed: {message}")
        return code

    def create(self, container_id: str, bundle: str, stdout=None, stderr=None) -> int:
        """Create a container without starting its process (``runc create``); returns its init's pid.

        Raises:
            RuncError: with runc's message.
        """
        return self._start_with_pid("create", [], container_id, bundle, stdout, stderr)

    def _start_with_pid(self, verb: str, flags: list, container_id: str, bundle: str, stdout, stderr) -> int:
        """``runc VERB FLAGS --pid-file …``; the pid runc wrote, or RuncError with runc's message."""
        pid_file = os.path.join(self.root, f".{container_id}.pid")
        args = [verb, *flags, "--bundle", os.path.abspath(bundle), "--pid-file", pid_file, container_id]
        try:
            code, message = self._with_stdio(args, container_id, verb, stdout, stderr, TIMEOUT)
            if code != 0:
                raise RuncError(f"runc {verb} {container_id} failed: {message or 'exit status ' + str(code)}")
            with open(pid_file, encoding="ascii") as f:
                return int(f.read().strip())
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(pid_file)

    def start(self, container_id: str) -> None:
        """Start the process of a created container (``runc start``)."""
        self._call("start", container_id, what=f"start {container_id}")

    def state(self, container_id: str):
        """runc's state of a container (id, pid, status, bundle, created…), or None if it does not exist."""
        try:
            out = self._call("state", container_id, what=f"state {container_id}")
        except ContainerNotFound:
            return None
        return json.loads(out.stdout)

    def list(self) -> list:
        """The states of every container under this root.

        ``runc list`` fails outright when a container is deleted between its reading of the root and its stat
        of the container's directory (``stat ROOT/ID: no such file or directory``); that race is retried, as
        the container is simply gone.

        Raises:
            RuncError: runc failed for another reason, or kept losing the race.
        """
        attempt = 1
        while True:
            try:
                out = self._call("list", "--format", "json", what="list")
            except RuncError as e:
                if attempt == LIST_ATTEMPTS or not _lost_list_race(str(e), self.root):
                    raise
                attempt += 1
                continue
            return json.loads(out.stdout or "null") or []

    def kill(self, container_id: str, signal: str = "TERM", all_processes: bool = False) -> None:
        """Send ``signal`` (a name like "TERM" or a number) to the container's init, or to all its processes."""
        args = ["kill", *(["--all"] if all_processes else []), container_id, str(signal)]
        self._call(*args, what=f"kill {container_id}")

    def delete(self, container_id: str, force: bool = False) -> None:
        """Delete a container and its cgroup; ``force`` kills a running one first. Absent ones are ignored."""
        args = ["delete", *(["--force"] if force else []), container_id]
        try:
            self._call(*args, what=f"delete {container_id}")
        except ContainerNotFound:
            pass

    def exec(self, container_id: str, args: list, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
        """Run ``args`` inside a running container, confined like its init; returns stdout, stderr, returncode."""
        if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
            raise RuncError(f"exec needs a non-empty list of strings, not {args!r}")
        try:
            return subprocess.run(
                self._argv("exec", container_id, *args),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise RuncError(f"runc exec in {container_id} did not finish in {timeout} s") from e
