"""Disk layout stays tidy: no loose objects, a bounded number of packs, stock git agrees."""

import os

import keg
from keg import Transaction, put
from keg.store import PACKS_BEFORE_REPACK

from conftest import git


def _packs(keg_dir):
    return [n for n in os.listdir(os.path.join(keg_dir, "objects", "pack")) if n.endswith(".pack")]


def _loose(keg_dir):
    objects = os.path.join(keg_dir, "objects")
    return [d for d in os.listdir(objects) if len(d) == 2 and os.listdir(os.path.join(objects, d))]


def test_many_checkpoints_leave_few_packs_and_no_loose_objects(keg_dir):
    store = keg.init(keg_dir, durable=False)
    store.checkpoint_revisions = 5
    for i in range(600):  # 120 checkpoints
        store.apply(Transaction((put(f"/hk/k{i % 30}", f"value {i}"),)))
    store.close()
    assert store.stats["checkpoints"] >= 120
    assert len(_packs(keg_dir)) <= PACKS_BEFORE_REPACK + 1
    assert _loose(keg_dir) == []
    assert git(keg_dir, "fsck", "--strict").returncode == 0
    assert git(keg_dir, "rev-list", "--count", "main").stdout.strip() == "601"
    reopened = keg.Store(keg_dir)
    assert reopened.read("/hk/k9", rev=11) == b"value 9"  # old revisions survive repacking


def test_revision_index_is_rebuilt_when_lost(keg_dir):
    with keg.init(keg_dir, durable=False) as store:
        for i in range(20):
            store.apply(Transaction((put("/r", str(i)),)))
    os.unlink(os.path.join(keg_dir, "keg", "revs"))
    store = keg.Store(keg_dir)
    assert store.head_revision == 21 and store.read("/r", rev=7) == b"5"
    with open(os.path.join(keg_dir, "keg", "revs"), "rb") as f:
        assert len(f.read()) == 22 * 20
