"""Decide, then act: what the Mayor should do, computed from what is desired and what is (DESIGN §5).

``plan(desired, actual, now)`` is a pure function: no I/O, no clock (``now``
is an argument), no randomness.  It returns an :class:`Actions` record that
the executor carries out in order and that is logged before it is applied.

Safety goes into the plan: a container in an unknown state, or running an
old spec, is stopped before its replacement is started, so two copies of a
process never run.

Stopping a running container does not hold up the machine: a ``stop`` step
asks it to stop (SIGTERM, with the runtime's supervisor sending SIGKILL after
the grace) and the plan waits for its exit like any other event; the
replacement starts then.  A stop the runtime has not finished by
``Actual.stopping_until`` (the supervisor was lost, say) is forced.
"""

from __future__ import annotations

from dataclasses import dataclass, field

RESTART_POLICIES = ("always", "on-failure", "never")
BACKOFF_START = 10.0     # seconds before the first restart (as Kubernetes)
BACKOFF_MAX = 300.0      # the delay doubles up to this
BACKOFF_RESET = 600.0    # running this long forgets earlier failures


@dataclass(frozen=True)
class Desired:
    """A process the process table asks for.

    ``spec_kid`` is the KID of its spec object: a different KID means a
    different process to run.
    """

    name: str
    spec_kid: str
    restart: str = "always"
    backoff_start: float = BACKOFF_START
    backoff_max: float = BACKOFF_MAX


@dataclass(frozen=True)
class Actual:
    """What the runtime says about the container of a process.

    ``state`` is ``running``, ``exited``, ``created`` (made, not started) or
    ``unknown`` (the runtime could not say).  ``failures`` counts the exits
    since the process last ran ``BACKOFF_RESET`` seconds; ``started`` and
    ``exited`` are times on the same clock as ``now``.  The fields after
    ``oom`` are reported in status; ``plan`` does not read them.
    """

    name: str
    container: str
    spec_kid: str
    state: str
    exit_code: int | None = None
    started: float | None = None
    exited: float | None = None
    failures: int = 0
    oom: bool = False
    pid: int | None = None          # the container's init on the host
    kid: str | None = None          # the process KID of this incarnation (DESIGN §1.2)
    incarnation: int = 0            # starts of this process name so far, this one included
    health: str | None = None       # "starting", "healthy", "unhealthy", or None without a check (nor a port)
    reason: str | None = None       # why it exited when the runtime knows more than the code ("unhealthy", "oom")
    stopping_until: float | None = None  # running, asked to stop: dead by then (SIGKILL after the grace)


@dataclass(frozen=True)
class Step:
    """One thing to do: ``kind`` is ``stop``, ``start`` or ``remove``.

    A ``stop`` asks and returns; with ``force`` it kills and waits (a stop that
    did not finish in time, or a container in an unknown state).
    """

    kind: str
    name: str
    container: str | None
    reason: str
    spec_kid: str | None = None
    force: bool = False


@dataclass(frozen=True)
class Actions:
    """The plan: ``steps`` in order, and when to look again at the earliest (``wake_at``, or None)."""

    steps: tuple = ()
    wake_at: float | None = None
    holding: tuple = field(default=())  # (name, reason) of processes deliberately left as they are

    def __bool__(self) -> bool:
        return bool(self.steps)

    def describe(self) -> list:
        """One line per step, for the log."""
        return [f"{s.kind} {s.name} ({s.container or 'new'}): {s.reason}" for s in self.steps]


def backoff(failures: int, start: float = BACKOFF_START, most: float = BACKOFF_MAX) -> float:
    """Seconds to wait before restarting after the ``failures``-th consecutive exit (10 s doubling to 5 min)."""
    if failures <= 0:
        return 0.0
    return min(most, start * 2 ** (failures - 1))


def _wants_restart(want: Desired, have: Actual) -> bool:
    if want.restart == "always":
        return True
    if want.restart == "on-failure":
        return have.exit_code != 0 or have.oom
    return False


def _stop_running(have: Actual, why: str, now: float, steps: list, holding: list) -> tuple:
    """Ask a running container to stop, or wait for the stop asked earlier; force it once overdue.

    Returns ``(when to look again or None, True when it is gone once the steps ran)``.
    """
    if have.stopping_until is not None and now < have.stopping_until:
        holding.append((have.name, f"stopping ({why})"))
        return have.stopping_until, False
    overdue = have.stopping_until is not None
    steps.append(Step("stop", have.name, have.container, why + ("; the stop is overdue" if overdue else ""),
                      force=overdue))
    return None, overdue


def _plan_one(want: Desired | None, have: Actual | None, now: float, steps: list, holding: list):
    """Steps for one process name; returns the time to look again, or None."""
    if want is None:
        if have is not None:
            if have.state == "running":
                wake, gone = _stop_running(have, "no longer in the process table", now, steps, holding)
                if not gone:
                    return wake
            elif have.state in ("created", "unknown"):
                steps.append(Step("stop", have.name, have.container, "no longer in the process table", force=True))
            steps.append(Step("remove", have.name, have.container, "no longer in the process table"))
        return None
    if have is None:
        steps.append(Step("start", want.name, None, "in the process table, not running", want.spec_kid))
        return None
    if have.spec_kid != want.spec_kid or have.state == "unknown":
        why = "the spec changed" if have.spec_kid != want.spec_kid else "its state is unknown"
        if have.state == "running":
            wake, gone = _stop_running(have, why, now, steps, holding)
            if not gone:
                return wake
        elif have.state != "exited":
            steps.append(Step("stop", have.name, have.container, why, force=True))
        steps.append(Step("remove", have.name, have.container, why))
        steps.append(Step("start", want.name, None, f"replacing it: {why}", want.spec_kid))
        return None
    if have.state == "created":
        steps.append(Step("stop", have.name, have.container, "created but never started", force=True))
        steps.append(Step("remove", have.name, have.container, "created but never started"))
        steps.append(Step("start", want.name, None, "starting it afresh", want.spec_kid))
        return None
    if have.state == "running":
        if have.stopping_until is not None:  # asked to stop (by an earlier Mayor, say): let it go, then restart
            wake, gone = _stop_running(have, "a stop was asked", now, steps, holding)
            if not gone:
                return wake
            steps.append(Step("remove", have.name, have.container, "a stop was asked"))
            steps.append(Step("start", want.name, None, "starting it afresh", want.spec_kid))
        return None
    # exited
    if not _wants_restart(want, have):
        holding.append((want.name, f"exited with {have.exit_code}; restart policy {want.restart}"))
        return None
    due = (now if have.exited is None else have.exited) + backoff(have.failures, want.backoff_start, want.backoff_max)
    if now < due:
        holding.append((want.name, f"back-off: restarting in {due - now:.1f}s"))
        return due
    steps.append(Step("remove", have.name, have.container, f"exited with {have.exit_code}"))
    steps.append(Step("start", want.name, None,
                      f"restart policy {want.restart} after exit {have.exit_code}"
                      + (" (out of memory)" if have.oom else ""), want.spec_kid))
    return None


def plan(desired: dict, actual: dict, now: float) -> Actions:
    """What to do to make ``actual`` what ``desired`` says.

    Args:
        desired: ``{name: Desired}`` from the process table.
        actual: ``{name: Actual}`` from the runtime (one container per name at most).
        now: the current time, on the clock of ``Actual.started``/``exited``.

    Returns:
        ``Actions`` with the steps in order: every stop and remove of a name
        comes before its start, and a name whose container is still running
        gets no start until a later plan sees it exited.  Everything as
        desired gives empty steps.
    """
    steps, holding, wakes = [], [], []
    for name in sorted(set(desired) | set(actual)):
        wake = _plan_one(desired.get(name), actual.get(name), now, steps, holding)
        if wake is not None:
            wakes.append(wake)
    return Actions(tuple(steps), min(wakes) if wakes else None, tuple(holding))


def failures_after_exit(previous: int, started: float | None, exited: float) -> int:
    """The consecutive-failure count after an exit: reset when the process had run ``BACKOFF_RESET`` seconds."""
    if started is not None and exited - started >= BACKOFF_RESET:
        return 1
    return previous + 1
