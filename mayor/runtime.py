"""The container runtime behind the Mayor: one small interface, a real backend (runc) and a no-op one.

The Mayor's ``apply`` is the only caller.  ``NoopRuntime`` keeps processes
as records in memory and "runs" them until told otherwise: it stands in for
runc where containers are not the point (the 1,000-Mayor convergence
benchmark, tests of sync and status), never where the test is about
containers.
"""

from __future__ import annotations

import abc
import itertools
import threading

from mayor.plan import Actual


class Runtime(abc.ABC):
    """What the Mayor needs from a container runtime."""

    @abc.abstractmethod
    def actual(self) -> dict:
        """``{process name: Actual}`` for every container this Mayor owns."""

    @abc.abstractmethod
    def start(self, name: str, spec_kid: str, spec: dict) -> str:
        """Create and start a container for a process; returns its container id."""

    @abc.abstractmethod
    def stop(self, container: str, grace: float = 10.0) -> None:
        """Stop a container (SIGTERM, SIGKILL after ``grace`` seconds)."""

    @abc.abstractmethod
    def remove(self, container: str) -> None:
        """Forget a stopped container and free what it held."""

    @abc.abstractmethod
    def wait(self, timeout: float) -> bool:
        """Block until a container exits or ``timeout`` passes; True when something exited."""


class NoopRuntime(Runtime):
    """Processes as in-memory records: started ones run until stopped or ``exit`` is called."""

    def __init__(self):
        self._records: dict = {}
        self._ids = itertools.count(1)
        self._changed = threading.Condition()
        self.started = 0

    def actual(self) -> dict:
        with self._changed:
            return dict(self._records)

    def start(self, name, spec_kid, spec, now: float = 0.0) -> str:
        container = f"noop-{name}-{next(self._ids)}"
        with self._changed:
            self._records[name] = Actual(name, container, spec_kid, "running", started=now)
            self.started += 1
        return container

    def exit(self, name: str, code: int, when: float) -> None:
        """Make a process exit (tests)."""
        with self._changed:
            have = self._records[name]
            self._records[name] = Actual(name, have.container, have.spec_kid, "exited", code, have.started, when)
            self._changed.notify_all()

    def stop(self, container, grace=10.0) -> None:
        with self._changed:
            for name, have in self._records.items():
                if have.container == container and have.state != "exited":
                    self._records[name] = Actual(name, container, have.spec_kid, "exited", -15, have.started, 0.0)

    def remove(self, container) -> None:
        with self._changed:
            for name in [n for n, a in self._records.items() if a.container == container]:
                del self._records[name]

    def wait(self, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait(timeout)
