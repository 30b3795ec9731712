"""The container runtime behind the Mayor: one small interface, a real backend (runc) and a no-op one.

The Mayor's ``apply`` is the only caller of ``start``/``stop``/``remove``.
``NoopRuntime`` keeps processes as records in memory and "runs" them until
told otherwise: it stands in for runc where containers are not the point
(the 1,000-Mayor convergence benchmark, tests of sync and status), never
where the test is about containers.  The runc backend is
``mayor.runc_runtime.RuncRuntime``.
"""

from __future__ import annotations

import abc
import dataclasses
import itertools
import threading

from keg.errors import NotFound
from mayor.plan import Actual


class ExecHandle(abc.ABC):
    """A command running inside a container (``keg exec``), polled by the Mayor's loop."""

    @abc.abstractmethod
    def poll(self) -> tuple:
        """``(output, exit_code)``: the output (stdout and stderr merged) since the last poll, and the
        exit code once the command has ended (None before). Never blocks."""

    @abc.abstractmethod
    def kill(self) -> None:
        """Stop the command (its timeout passed, or the Mayor is stopping)."""


class Runtime(abc.ABC):
    """What the Mayor needs from a container runtime."""

    version: str = "none"

    @abc.abstractmethod
    def actual(self) -> dict:
        """``{process name: Actual}`` for every container this Mayor owns, re-adopted ones included."""

    @abc.abstractmethod
    def start(self, name: str, spec_kid: str, spec: dict, process_kid: str = None, incarnation: int = 0) -> str:
        """Create and start a container for a process; returns its container id.

        Raises:
            KegError: (a subclass) with a message for the process's status when it cannot start:
                unknown image, bad spec, a refused layer, runc failing.
        """

    @abc.abstractmethod
    def stop(self, container: str, grace: float | None = None, wait: bool = True, drain: bool = False) -> None:
        """Stop a container (SIGTERM, SIGKILL after ``grace`` seconds; None: the spec's stop grace).

        With ``wait`` False it only asks: the runtime sees to the SIGKILL, ``actual()`` reports the
        container running with ``stopping_until`` set, and ``wait()`` returns when it exits.
        ``drain`` (with ``wait`` False) first lets the spec's ``stop_drain`` seconds pass, for
        routers to stop sending the process requests.
        """

    @abc.abstractmethod
    def remove(self, container: str) -> None:
        """Forget a stopped container and free what it held."""

    @abc.abstractmethod
    def wait(self, timeout: float) -> bool:
        """Block until a container exits (or its health changes) or ``timeout`` passes; True when something did."""

    def wake(self) -> None:
        """Make a ``wait`` in progress return now (called from the Mayor's watch thread on a table change)."""

    def exec(self, name: str, args: list, timeout: float = 60.0) -> ExecHandle:
        """Start ``args`` inside the running container of ``name``.

        Raises:
            NotFound: no running container for ``name``.
        """
        raise NotFound(f"process {name} is not running here")

    def log_tail(self, name: str, most: int) -> tuple:
        """``(total, tail)``: bytes the process has written to stdout and stderr in all its incarnations
        here, and the last at most ``most`` of them. ``(0, b"")`` when there are none."""
        return 0, b""


class _NoopExec(ExecHandle):
    def __init__(self, args):
        self._out, self._code = (" ".join(args) + "\n").encode(), 0

    def poll(self) -> tuple:
        out, self._out = self._out, b""
        return out, self._code

    def kill(self) -> None:
        pass


class NoopRuntime(Runtime):
    """Processes as in-memory records: started ones run until stopped or ``exit`` is called.

    ``exec`` echoes its arguments; ``write_log`` adds output to a process's log (tests).
    """

    version = "noop"

    def __init__(self):
        self._records: dict = {}
        self._logs: dict = {}
        self._ids = itertools.count(1)
        self._changed = threading.Condition()
        self._exited = False
        self.started = 0

    def actual(self) -> dict:
        with self._changed:
            return dict(self._records)

    def start(self, name, spec_kid, spec, process_kid=None, incarnation=0, now: float = 0.0) -> str:
        container = f"noop-{name}-{next(self._ids)}"
        with self._changed:
            self._records[name] = Actual(name, container, spec_kid, "running", started=now, kid=process_kid,
                                         incarnation=incarnation)
            self.started += 1
        return container

    def exit(self, name: str, code: int, when: float) -> None:
        """Make a process exit (tests)."""
        with self._changed:
            have = self._records[name]
            self._records[name] = dataclasses.replace(have, state="exited", exit_code=code, exited=when)
            self._exited = True
            self._changed.notify_all()

    def stop(self, container, grace=None, wait=True, drain=False) -> None:
        with self._changed:
            for name, have in self._records.items():
                if have.container == container and have.state != "exited":
                    self._records[name] = dataclasses.replace(have, state="exited", exit_code=-15, exited=0.0)

    def remove(self, container) -> None:
        with self._changed:
            for name in [n for n, a in self._records.items() if a.container == container]:
                del self._records[name]

    def wait(self, timeout: float) -> bool:
        with self._changed:
            woken = self._changed.wait(timeout)
            exited, self._exited = self._exited, False
            return woken and exited

    def wake(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def exec(self, name, args, timeout=60.0) -> ExecHandle:
        with self._changed:
            have = self._records.get(name)
        if have is None or have.state != "running":
            raise NotFound(f"process {name} is not running here")
        return _NoopExec(args)

    def write_log(self, name: str, data: bytes) -> None:
        """Add to a process's output (tests)."""
        with self._changed:
            self._logs[name] = self._logs.get(name, b"") + data

    def log_tail(self, name, most) -> tuple:
        with self._changed:
            data = self._logs.get(name, b"")
        return len(data), data[-most:] if most else b""
