"""Histories of compare-and-swap registers and a linearizability checker for them (Wing & Gong, Lowe).

A client workload records one ``Op`` per request: when it was invoked, when
its answer came (``math.inf`` when the answer never came or said the outcome
is unknown), and what it asked and got.  Each key is a register; a
history is linearizable when the ops of each key can be put in one order that
(a) respects real time (an op that completed before another was invoked comes
first) and (b) is a legal run of the register: a read returns the current
value; a successful CAS found its expected value; a failed CAS did not.  An op
whose outcome is unknown may have taken effect at any point after it was
invoked, or never.

The search is the WGL one: linearize, one at a time, an op that no remaining
op precedes in real time, backtracking, with a memo of (remaining ops,
register value) already found to fail.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

ABSENT = None


@dataclass(frozen=True)
class Op:
    """One request of the workload against one key.

    ``kind`` is ``read`` (``value`` is what it returned) or ``cas`` (from
    ``expected`` to ``value``; ``ok`` True when applied, False when the compare
    failed, None when the outcome is unknown).
    """

    key: str
    kind: str
    invoke: float
    complete: float
    value: str | None
    expected: str | None = None
    ok: bool | None = True
    client: str = ""

    @property
    def unknown(self) -> bool:
        """The client never learnt whether the op took effect."""
        return self.ok is None or self.complete == math.inf


def _step(state, op: Op):
    """The register's value after ``op`` from ``state``, or raise ValueError when ``op`` is not legal there."""
    if op.kind == "read":
        if state != op.value:
            raise ValueError
        return state
    if op.ok is False:
        if state == op.expected:
            raise ValueError
        return state
    if state != op.expected:
        raise ValueError
    return op.value


def _settle_unknown(ops: list) -> list:
    """Ops of unknown outcome made definite where the history says, so the search stays small.

    Written values are unique.  A CAS of unknown outcome whose value nobody
    observed (no read returned it, no CAS expected it) either never took
    effect or was overwritten unseen — impossible, since the next write
    expected it; so it is dropped (unless it may be the last write, which a
    read would see: there is always a final read).  One whose value was
    observed did take effect, before its first observer completed: it
    becomes a successful CAS completing then.
    """
    observed: dict = {}
    for op in ops:
        if op.ok is not True:
            continue  # an unknown op observed nothing; a failed CAS only learnt its guess was wrong
        seen = op.value if op.kind == "read" else op.expected
        if seen is not None and op.complete != math.inf:
            observed[seen] = min(observed.get(seen, math.inf), op.complete)
    out = []
    for op in ops:
        if op.kind == "cas" and op.unknown:
            if op.value not in observed:
                continue
            op = Op(op.key, op.kind, op.invoke, max(op.invoke, observed[op.value]), op.value, op.expected, True,
                    op.client)
        out.append(op)
    return out


def check_register(ops: list, initial=ABSENT) -> bool:
    """True when the ops of one register are linearizable."""
    ops = sorted(_settle_unknown(ops), key=lambda o: o.invoke)
    count = len(ops)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * count + 1000))
    failed: set = set()

    def search(remaining: frozenset, state) -> bool:
        if all(ops[i].unknown for i in remaining):
            return True
        if (remaining, state) in failed:
            return False
        horizon = min(ops[i].complete for i in remaining)
        for i in sorted(remaining):
            op = ops[i]
            if op.invoke > horizon:
                break  # sorted by invocation: every later op comes after an op that already completed
            try:
                after = _step(state, op)
            except ValueError:
                continue
            if search(remaining - {i}, after):
                return True
        # An unknown op may also never take effect: that is covered by leaving it in the set, since
        # a set of only unknown ops succeeds; but it must not block others, so drop it as well.
        for i in sorted(remaining):
            if ops[i].unknown and ops[i].invoke <= horizon and search(remaining - {i}, state):
                return True
        failed.add((remaining, state))
        return False

    try:
        return search(frozenset(range(count)), initial)
    finally:
        sys.setrecursionlimit(limit)


def check(history: list, initial=ABSENT) -> list:
    """The keys whose ops are not linearizable (an empty list when the history is)."""
    by_key: dict = {}
    for op in history:
        by_key.setdefault(op.key, []).append(op)
    return sorted(key for key, ops in by_key.items() if not check_register(ops, initial))
