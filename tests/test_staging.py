"""A group commit gives what its transactions give one commit each: failed ones leave nothing behind."""

import os
import shutil
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

import keg
from keg import Transaction, compare, delete, put

# A few directories and names, so that transactions meet: a put where another made a directory,
# a recursive delete of a directory an earlier transaction of the group filled, a compare of a
# path an earlier transaction changed.
paths = st.sampled_from(["/a", "/a/x", "/a/y", "/a/b/x", "/a/b/y", "/c", "/c/x", "/w/k0", "/w/k1", "/w/k9"])
ops = st.one_of(
    st.builds(lambda p, v: put(p, v), paths, st.sampled_from(["1", "2", "22"])),
    st.builds(lambda p, r: delete(p, recursive=r), paths, st.booleans()),
)
transactions = st.builds(
    lambda o, c: (o, c),
    st.lists(ops, min_size=1, max_size=3),
    st.lists(st.tuples(paths, st.booleans()), max_size=1),  # (path, expect absent?)
)


def _store(root: str, name: str):
    store = keg.init(os.path.join(root, name), durable=False)
    # A wide directory, so its changes are the ones that edit a directory in place.
    store.commit([Transaction(ops=tuple(put(f"/w/k{i}", "v") for i in range(40)))])
    return store


def _transaction(store, spec) -> Transaction:
    op_list, compares = spec
    checks = []
    for path, absent in compares:
        # "absent" compares fail where the path exists; the others name its KID as it is now
        # in the store (earlier transactions of the group may have changed it since).
        checks.append(compare(path, None if absent else (store.kid(path) if store.exists(path) else None)))
    return Transaction(ops=tuple(op_list), compares=tuple(checks))


@settings(max_examples=150, deadline=None)
@given(st.lists(transactions, min_size=1, max_size=8))
def test_a_group_gives_the_tree_and_results_of_its_transactions_applied_one_by_one(specs):
    root = tempfile.mkdtemp(prefix="keg-staging-")
    try:
        grouped, single = _store(root, "grouped"), _store(root, "single")
        group = [_transaction(grouped, spec) for spec in specs]
        expected = [single.commit([t])[0] for t in group]
        got = grouped.commit(group)
        assert [r.ok for r in got] == [r.ok for r in expected]
        assert [type(r.error) for r in got] == [type(r.error) for r in expected]
        assert [r.kids for r in got] == [r.kids for r in expected]
        assert grouped.kid("/") == single.kid("/")
        grouped.close()
        single.close()
    finally:
        shutil.rmtree(root)
