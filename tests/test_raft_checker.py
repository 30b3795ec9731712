"""The linearizability checker itself: it accepts legal histories and rejects known illegal ones."""

from __future__ import annotations

import math

from raft_history import Op, check, check_register


def cas(invoke, complete, expected, value, ok=True, key="/k"):
    return Op(key, "cas", invoke, complete, value, expected, ok)


def read(invoke, complete, value, key="/k"):
    return Op(key, "read", invoke, complete, value)


def test_sequential_history_is_linearizable():
    assert check_register([cas(0, 1, None, "a"), read(2, 3, "a"), cas(4, 5, "a", "b"), read(6, 7, "b")])


def test_two_successful_cas_from_the_same_value_are_not():
    # Both found the key absent and both succeeded, one after the other: impossible.
    assert not check_register([cas(0, 1, None, "a"), cas(2, 3, None, "b")])


def test_stale_read_after_an_acknowledged_write_is_not():
    assert not check_register([cas(0, 1, None, "a"), read(2, 3, None)])


def test_lost_acknowledged_write_is_caught_by_a_final_read():
    history = [cas(0, 1, None, "a"), cas(2, 3, "a", "b"), read(10, 11, "a")]
    assert check(history) == ["/k"]


def test_concurrent_ops_may_take_either_order():
    # The read overlaps the write: seeing the old or the new value is fine.
    assert check_register([cas(0, 5, None, "a"), read(1, 2, None)])
    assert check_register([cas(0, 5, None, "a"), read(1, 2, "a")])


def test_failed_cas_must_have_seen_another_value():
    assert check_register([cas(0, 1, None, "a"), cas(2, 3, None, "b", ok=False)])
    assert not check_register([cas(2, 3, None, "b", ok=False)])  # the key was absent: it would have succeeded


def test_unknown_outcome_may_or_may_not_have_happened():
    assert check_register([cas(0, math.inf, None, "a", ok=None), read(5, 6, "a")])
    assert check_register([cas(0, math.inf, None, "a", ok=None), read(5, 6, None)])
    # ...but not before it was invoked.
    assert not check_register([read(0, 1, "a"), cas(2, math.inf, None, "a", ok=None)])


def test_keys_are_checked_separately():
    history = [cas(0, 1, None, "a", key="/x"), cas(0, 1, None, "a", key="/y"), read(2, 3, None, key="/y")]
    assert check(history) == ["/y"]


def test_a_larger_concurrent_history_is_checked_quickly():
    ops, value = [], None
    for i in range(60):  # 60 sequential CAS, each overlapped by a read of the previous or the new value
        ops.append(cas(2 * i, 2 * i + 1.5, value, f"v{i}"))
        ops.append(read(2 * i + 0.5, 2 * i + 1, value if i % 2 else f"v{i}"))
        value = f"v{i}"
    assert check_register(ops)
    ops.append(read(500, 501, "v3"))
    assert not check_register(ops)


def test_a_failed_cas_does_not_prove_that_an_unknown_write_happened():
    # c1's write of "a" timed out; c2 guessed "a" was current and its CAS failed: "a" may never have been written.
    history = [read(0, 1, None), cas(2, math.inf, None, "a", ok=None), cas(3, 4, "a", "b", ok=False),
               read(5, 6, None)]
    assert check_register(history)
