"""Diff and watch cost what changed, not the size of the namespace."""

import pytest

from keg import Transaction, put

MACHINES, PROCS = 1000, 20
DEPTH = 4  # /, /machines, /machines/mXXXX, /machines/mXXXX/procs


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    import keg
    store = keg.init(str(tmp_path_factory.mktemp("scale") / "keg"), durable=False)
    ops = tuple(put(f"/machines/m{m:04d}/procs/p{p:02d}.json", f'{{"m": {m}, "p": {p}}}')
                for m in range(MACHINES) for p in range(PROCS))
    assert store.apply(Transaction(ops)).ok
    store.apply(Transaction((put("/machines/m0500/procs/p07.json", '{"changed": true}'),)))
    store.checkpoint()
    yield store
    store.close()


def test_namespace_has_twenty_thousand_entries(big):
    assert len(big.list("/machines")) == MACHINES
    assert len(big.list("/machines/m0999/procs")) == PROCS


def test_diff_of_one_changed_file_reads_o_depth_trees(big):
    big.drop_caches()  # cold: nothing cached
    before = big.stats["tree_reads"]
    changes = big.diff(big.head_revision - 1, big.head_revision)
    reads = big.stats["tree_reads"] - before
    assert [c[0] for c in changes] == ["/machines/m0500/procs/p07.json"]
    assert reads <= 2 * DEPTH, f"diff read {reads} trees for one changed file"


def test_watch_events_of_one_changed_file_read_o_depth_trees(big):
    big.drop_caches()
    before = big.stats["tree_reads"]
    events = list(big.events("/machines", big.head_revision - 1))
    reads = big.stats["tree_reads"] - before
    assert [(e.path, e.action) for e in events] == [("/machines/m0500/procs/p07.json", "update")]
    assert reads <= 2 * DEPTH


def test_a_prefix_outside_the_change_reads_only_the_path_to_it(big):
    big.drop_caches()
    before = big.stats["tree_reads"]
    assert big.diff(big.head_revision - 1, big.head_revision, "/machines/m0001") == []
    assert big.stats["tree_reads"] - before <= 2 * (DEPTH - 1)


def test_one_path_commit_rebuilds_only_the_trees_on_its_path(big):
    big.drop_caches()
    before = big.stats["tree_reads"]
    big.apply(Transaction((put("/machines/m0042/procs/p01.json", "{}"),)))
    assert big.stats["tree_reads"] - before <= DEPTH


def test_new_versions_of_a_wide_directory_do_not_push_narrow_ones_out_of_the_cache(big, monkeypatch):
    """Each commit under /machines makes a new 1,000-entry /machines tree; the version it replaces goes out
    of the tree cache first, so the machines' own small directories stay parsed (with 150,000 entries,
    re-reading them was an eighth of a commit)."""
    from keg import store as store_module
    monkeypatch.setattr(store_module, "TREE_CACHE_ENTRIES", 30_000)  # all the narrow trees, and a few wide ones
    big.drop_caches()
    for m in range(MACHINES):
        big.list(f"/machines/m{m:04d}/procs")
    for n in range(60):  # 60 new versions of /machines: 60,000 entries, twice the cache
        big.apply(Transaction((put("/machines/m0000/procs/p00.json", f'{{"n": {n}}}'),)))
    before = big.stats["tree_parses"]
    for m in range(MACHINES):
        big.list(f"/machines/m{m:04d}/procs")
    assert big.stats["tree_parses"] - before == 0
