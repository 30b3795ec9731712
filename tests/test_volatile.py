"""Volatile directories read like any other, and their old history can be compacted away."""

import pytest

import keg
from keg import Transaction, put
from keg.errors import NotFound

from conftest import git


def _write(store, path, value):
    assert store.apply(Transaction((put(path, value),))).ok
    return store.head_revision


def test_volatile_directory_reads_lists_and_diffs_like_a_directory(store, keg_dir):
    rev = _write(store, "/machines/m1/status/mayor.json", '{"beat": 1}')
    assert store.stat("/machines/m1/status").kind == "tree"
    assert [e.name for e in store.list("/machines/m1")] == ["status"]
    assert store.read("/machines/m1/status/mayor.json") == b'{"beat": 1}'
    _write(store, "/machines/m1/status/mayor.json", '{"beat": 2}')
    assert [e.path for e in store.events("/machines", rev - 1)] == ["/machines/m1/status/mayor.json"] * 2
    store.checkpoint()
    # git stores it as a gitlink, which is what keeps it out of git's reachability
    assert git(keg_dir, "ls-tree", "main:machines/m1").stdout.startswith("160000 commit")


def test_a_file_cannot_replace_a_volatile_directory(store):
    _write(store, "/machines/m1/status/a.json", "{}")
    r = store.apply(Transaction((put("/machines/m1/status", "x"),)))
    assert not r.ok and "is a directory" in str(r.error)


def test_compact_drops_old_volatile_history_and_keeps_everything_else(store, keg_dir):
    early_status = _write(store, "/machines/m1/status/mayor.json", "beat 0")
    _write(store, "/machines/m1/procs/web.json", "spec 0")
    early_status_blob = store.kid("/machines/m1/status/mayor.json")[2:]
    early_spec_blob = store.kid("/machines/m1/procs/web.json")[2:]
    for i in range(1, 60):
        _write(store, "/machines/m1/status/mayor.json", f"beat {i}")
        _write(store, "/machines/m2/status/mayor.json", f"beat {i}")
        if i % 10 == 0:
            _write(store, "/machines/m1/procs/web.json", f"spec {i}")
    head = store.head_revision
    kids_before = [store.revision(n).kid for n in range(1, head + 1)]

    done = store.compact(window=10)
    assert done["from_revision"] == head - 9

    assert store.read("/machines/m1/status/mayor.json") == b"beat 59"
    assert store.read("/machines/m1/status/mayor.json", rev=head - 9) in (b"beat 54", b"beat 55")
    with pytest.raises(NotFound, match="compacted"):
        store.read("/machines/m1/status/mayor.json", rev=early_status)
    assert store.read("/machines/m1/procs/web.json", rev=early_status + 1) == b"spec 0"  # not volatile: kept
    assert [store.revision(n).kid for n in range(1, head + 1)] == kids_before
    # the old heartbeat's bytes are gone from disk; the old spec's are not
    assert git(keg_dir, "cat-file", "-e", early_status_blob).returncode != 0
    assert git(keg_dir, "cat-file", "-e", early_spec_blob).returncode == 0
    assert git(keg_dir, "fsck", "--strict").returncode == 0
    # writes go on, and a fresh reader sees the same
    _write(store, "/machines/m1/status/mayor.json", "beat 60")
    store.close()
    assert keg.Store(keg_dir).read("/machines/m1/status/mayor.json") == b"beat 60"
    assert len(keg.Store(keg_dir).log("/machines/m1/status/mayor.json")) <= 12


def test_compact_from_the_command_line(keg_dir):
    from test_cli import run
    run("init", "--keg", keg_dir)
    for i in range(5):
        run("put", "/machines/a/status/s", "--keg", keg_dir, input=str(i))
    code, out, _ = run("compact", "--window", "2", "--keg", keg_dir)
    assert code == 0 and out.startswith("volatile history kept from revision 5")
    assert run("cat", "/machines/a/status/s", "--rev", "2", "--keg", keg_dir)[0] == 1
    assert run("cat", "/machines/a/status/s", "--keg", keg_dir)[1] == "4"
