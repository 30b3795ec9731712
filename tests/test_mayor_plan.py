"""The Mayor's plan: a pure function from desired and actual processes to ordered steps (table-driven)."""

from __future__ import annotations

import pytest

from mayor.plan import Actual, Desired, backoff, failures_after_exit, plan

NOW = 1000.0
W = Desired("web", "K-1")
W2 = Desired("web", "K-2")


def run(name="web", kid="K-1", state="running", **kw):
    return Actual(name, f"c-{name}-{kid}", kid, state, **kw)


CASES = [
    ("everything is as desired: do nothing",
     {"web": W}, {"web": run()}, []),
    ("nothing desired, nothing running: do nothing", {}, {}, []),
    ("new process: start it",
     {"web": W}, {}, [("start", "web", None)]),
    ("process removed from the table: ask it to stop; removed once it exited",
     {}, {"web": run()}, [("stop", "web", "c-web-K-1")]),
    ("removed, asked to stop, still within its grace: wait",
     {}, {"web": run(stopping_until=NOW + 5)}, []),
    ("removed, asked to stop, overdue: force the stop, then remove",
     {}, {"web": run(stopping_until=NOW)}, [("stop!", "web", "c-web-K-1"), ("remove", "web", "c-web-K-1")]),
    ("removed and already exited: remove only",
     {}, {"web": run(state="exited", exit_code=0)}, [("remove", "web", "c-web-K-1")]),
    ("spec changed: ask the old to stop; no start while it runs",
     {"web": W2}, {"web": run()}, [("stop", "web", "c-web-K-1")]),
    ("spec changed, the old one stopping: wait for it",
     {"web": W2}, {"web": run(stopping_until=NOW + 1)}, []),
    ("spec changed, the old one's stop overdue: force it, then start the new",
     {"web": W2}, {"web": run(stopping_until=NOW - 1)},
     [("stop!", "web", "c-web-K-1"), ("remove", "web", "c-web-K-1"), ("start", "web", None)]),
    ("spec changed, the old one exited: remove it, start the new",
     {"web": W2}, {"web": run(state="exited", exit_code=143, exited=NOW)},
     [("remove", "web", "c-web-K-1"), ("start", "web", None)]),
    ("same spec, asked to stop by an earlier run: let it exit, the restart follows",
     {"web": W}, {"web": run(stopping_until=NOW + 1)}, []),
    ("unknown state: stop it before starting its replacement",
     {"web": W}, {"web": run(state="unknown")},
     [("stop!", "web", "c-web-K-1"), ("remove", "web", "c-web-K-1"), ("start", "web", None)]),
    ("created but never started: start afresh",
     {"web": W}, {"web": run(state="created")},
     [("stop!", "web", "c-web-K-1"), ("remove", "web", "c-web-K-1"), ("start", "web", None)]),
    ("crashed, backoff elapsed: restart",
     {"web": W}, {"web": run(state="exited", exit_code=1, exited=NOW - 11, failures=1)},
     [("remove", "web", "c-web-K-1"), ("start", "web", None)]),
    ("crashed, within backoff: wait",
     {"web": W}, {"web": run(state="exited", exit_code=1, exited=NOW - 5, failures=1)}, []),
    ("on-failure and exit 0: leave it exited",
     {"web": Desired("web", "K-1", "on-failure")}, {"web": run(state="exited", exit_code=0, exited=0)}, []),
    ("on-failure and OOM-killed: restart",
     {"web": Desired("web", "K-1", "on-failure")},
     {"web": run(state="exited", exit_code=137, oom=True, exited=0, failures=1)},
     [("remove", "web", "c-web-K-1"), ("start", "web", None)]),
    ("never: leave it exited even after a crash",
     {"web": Desired("web", "K-1", "never")}, {"web": run(state="exited", exit_code=3, exited=0)}, []),
    ("several processes: each on its own, in name order",
     {"a": Desired("a", "K-a"), "b": Desired("b", "K-b")},
     {"b": run("b", "K-b"), "c": run("c", "K-c")},
     [("start", "a", None), ("stop", "c", "c-c-K-c")]),
]


@pytest.mark.parametrize("desired, actual, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan(desired, actual, expected):
    actions = plan(desired, actual, NOW)
    assert [(s.kind + "!" * s.force, s.name, s.container) for s in actions.steps] == expected  # stop! forces
    assert bool(actions) == bool(expected)
    for step in actions.steps:
        if step.kind == "start":
            assert step.spec_kid == desired[step.name].spec_kid


def test_a_stop_in_progress_is_waited_for_until_it_is_due():
    actions = plan({}, {"web": run(stopping_until=NOW + 12)}, NOW)
    assert actions.wake_at == NOW + 12 and actions.holding == (("web", "stopping (no longer in the process table)"),)
    assert plan({}, {"web": run(stopping_until=NOW + 12)}, NOW + 12).describe() == [
        "stop web (c-web-K-1): no longer in the process table; the stop is overdue",
        "remove web (c-web-K-1): no longer in the process table"]


def test_plan_is_pure_and_says_when_to_look_again():
    desired, actual = {"web": W}, {"web": run(state="exited", exit_code=1, exited=NOW - 5, failures=2)}
    first, again = plan(desired, actual, NOW), plan(desired, actual, NOW)
    assert first == again
    assert first.wake_at == NOW - 5 + 20  # second failure: 20 s
    assert first.holding[0][0] == "web" and "back-off" in first.holding[0][1]
    assert plan(desired, actual, NOW + 15).describe() == [
        "remove web (c-web-K-1): exited with 1", "start web (new): restart policy always after exit 1"]


@pytest.mark.parametrize("failures, delay", [(0, 0), (1, 10), (2, 20), (3, 40), (5, 160), (6, 300), (30, 300)])
def test_backoff_doubles_from_10s_to_5min(failures, delay):
    assert backoff(failures) == delay


def test_failures_reset_after_ten_minutes_of_running():
    assert failures_after_exit(4, started=0, exited=599) == 5
    assert failures_after_exit(4, started=0, exited=600) == 1
    assert failures_after_exit(0, started=None, exited=5) == 1
