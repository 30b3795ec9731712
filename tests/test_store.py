"""The store: reads, transactions, group commit, history, diff and watch."""

import json
import multiprocessing
import os
import time

import pytest

import keg
from keg import Transaction, compare, delete, put
from keg.errors import AmbiguousKid, BadPath, BadRequest, CompareFailed, NotFound, PathConflict

from conftest import git


def tx(*ops, compares=()):
    return Transaction(tuple(ops), tuple(compares))


def test_put_read_and_kid_is_the_git_blob_id(store, keg_dir):
    r = store.apply(tx(put("/a/b.txt", "hi\n")))
    assert r.ok and r.revision == 2
    assert store.read("/a/b.txt") == b"hi\n"
    store.checkpoint()
    blob = git(keg_dir, "rev-parse", "main:a/b.txt").stdout.strip()
    assert store.kid("/a/b.txt") == "K-" + blob == r.kids["/a/b.txt"]
    assert git(keg_dir, "show", "main:a/b.txt").stdout == "hi\n"


def test_stat_and_list_report_kind_size_and_kid(store):
    store.apply(tx(put("/d/x.json", '{"a": 1}'), put("/d/sub/y", "yy"), put("/d/run.sh", "#!", mode=0o100755)))
    entries = {e.name: e for e in store.list("/d")}
    assert entries["x.json"].kind == "file" and entries["x.json"].size == 8
    assert entries["sub"].kind == "tree" and entries["sub"].size == 1
    assert entries["run.sh"].mode == 0o100755
    assert store.stat("/d").kind == "tree"
    assert [e.path for e in store.list("/")] == ["/d"]


def test_list_values_gives_small_files_bytes_at_one_revision(store):
    first = store.apply(tx(put("/d/x.json", '{"a": 1}'), put("/d/sub/y", "yy"), put("/d/big", b"z" * (64 * 1024 + 1))))
    store.apply(tx(put("/d/x.json", '{"a": 2}')))
    now = {e.name: (e.kind, v) for e, v in store.list_values("/d")}
    assert now == {"x.json": ("file", b'{"a": 2}'), "sub": ("tree", None), "big": ("file", None)}
    assert dict((e.name, v) for e, v in store.list_values("/d", rev=first.revision))["x.json"] == b'{"a": 1}'
    with pytest.raises(BadRequest):
        store.list_values("/d/x.json")
    with pytest.raises(NotFound):
        store.list_values("/nothing")


def test_time_travel_by_number_and_by_revision_kid(store):
    first = store.apply(tx(put("/v", "one")))
    store.apply(tx(put("/v", "two")))
    assert store.read("/v") == b"two"
    assert store.read("/v", rev=first.revision) == b"one"
    assert store.read("/v", rev=first.revision_kid) == b"one"
    assert store.read("/v", rev=first.revision_kid[:12]) == b"one"
    assert store.read("/v", rev=-1) == b"two"
    with pytest.raises(NotFound, match="revision 99 does not exist"):
        store.read("/v", rev=99)
    with pytest.raises(NotFound):
        store.read("/v", rev=1)  # revision 1 is the empty namespace


def test_failed_compare_changes_nothing(store):
    store.apply(tx(put("/cfg.json", "{}")))
    head = store.head_revision
    r = store.apply(tx(put("/cfg.json", '{"x": 1}'), put("/other", "o"),
                       compares=[compare("/cfg.json", "K-" + "0" * 40)]))
    assert not r.ok and isinstance(r.error, CompareFailed) and r.error.path == "/cfg.json"
    assert store.head_revision == head
    assert store.read("/cfg.json") == b"{}" and not store.exists("/other")


def test_compare_absent_and_compare_equal(store):
    assert store.apply(tx(put("/new", "1"), compares=[compare("/new", None)])).ok
    assert not store.apply(tx(put("/new", "2"), compares=[compare("/new", None)])).ok
    current = store.kid("/new")
    assert store.apply(tx(put("/new", "3"), compares=[compare("/new", current)])).ok
    assert store.read("/new") == b"3"


def test_group_commit_one_revision_with_per_transaction_results(store):
    results = store.commit([
        tx(put("/g/a", "a")),
        tx(put("/g/b", "b"), compares=[compare("/g/a", "K-" + "1" * 40)]),  # fails
        tx(put("/g/c", "c")),
        tx(put("/g/a/x", "under a file")),  # fails: /g/a is a file
    ])
    assert [r.ok for r in results] == [True, False, True, False]
    assert results[0].revision == results[2].revision == store.head_revision
    assert isinstance(results[3].error, PathConflict)
    assert sorted(e.name for e in store.list("/g")) == ["a", "c"]


def test_compare_sees_earlier_transactions_of_the_same_group(store):
    results = store.commit([tx(put("/k", "v1")), tx(put("/k", "v2"), compares=[compare("/k", None)])])
    assert results[0].ok and not results[1].ok
    assert store.read("/k") == b"v1"


def test_failed_transaction_in_a_group_leaves_no_partial_writes(store):
    results = store.commit([tx(put("/p/ok", "1"), put("/p/ok/bad", "2"))])
    assert not results[0].ok
    assert not store.exists("/p")
    assert store.head_revision == 1


def test_delete_file_directory_and_missing(store):
    store.apply(tx(put("/d/a", "1"), put("/d/e/b", "2"), put("/keep", "k")))
    with pytest.raises(PathConflict, match="recursively"):
        _raise(store.apply(tx(delete("/d"))))
    assert store.apply(tx(delete("/d/e/b"))).ok
    assert not store.exists("/d/e")  # empty directories vanish, as in git
    assert store.apply(tx(delete("/d", recursive=True))).ok
    assert [e.path for e in store.list("/")] == ["/keep"]
    with pytest.raises(NotFound):
        _raise(store.apply(tx(delete("/nothing"))))


def _raise(result):
    if not result.ok:
        raise result.error


def test_put_where_a_directory_is_is_refused(store):
    store.apply(tx(put("/dir/f", "1")))
    with pytest.raises(PathConflict, match="is a directory"):
        _raise(store.apply(tx(put("/dir", "x"))))


@pytest.mark.parametrize("bad", ["relative", "/a/../b", "/a//b", "/.git/x", "/x\x00y"])
def test_bad_paths_never_reach_the_store(store, bad):
    with pytest.raises(BadPath):
        store.apply(tx(put(bad, "x")))
    assert store.head_revision == 1


def test_transaction_json_form_is_validated_before_anything_is_written(store):
    good = keg.parse_transaction({"compare": [{"path": "/n.json", "kid": None}],
                                  "ops": [{"op": "put", "path": "/n.json", "value": "{}"},
                                          {"op": "put", "path": "/bin", "base64": "AAEC"}]})
    assert store.apply(good).ok and store.read("/bin") == b"\x00\x01\x02"
    for bad, message in [
        ({"ops": []}, "at least one op"),
        ({"ops": [{"op": "put", "path": "/x"}]}, "exactly one of"),
        ({"ops": [{"op": "put", "path": "/x", "base64": "!!"}]}, "not valid base64"),
        ({"ops": [{"op": "move", "path": "/x"}]}, "unknown op"),
        ({"ops": [{"op": "put", "path": "/x", "value": 1}]}, "wrong type"),
        ({"compare": [{"path": "/x", "kid": "K-1234abcd"}], "ops": [{"op": "delete", "path": "/x"}]}, "full KID"),
        ({"compare": [{"path": "/x"}], "ops": [{"op": "delete", "path": "/x"}]}, "missing field 'kid'"),
        ({"ops": [{"op": "put", "path": "../x", "value": ""}]}, "absolute"),
        ({"ops": [], "extra": 1}, "unknown fields"),
        ([], "JSON object"),
    ]:
        with pytest.raises(BadRequest, match=message):
            keg.parse_transaction(bad)
    assert store.head_revision == 2


def test_log_lists_revisions_that_changed_a_path(store):
    store.apply(tx(put("/a", "1")))
    store.apply(tx(put("/b", "1")))
    store.apply(tx(put("/a", "2")))
    store.apply(tx(delete("/a")))
    log = store.log("/a")
    assert [r.number for r, _ in log] == [5, 4, 2]
    assert log[0][1] is None and log[1][1] == keg.Store.kid(store, "/a", 4)
    assert [r.number for r, _ in store.log("/", limit=2)] == [5, 4]


def test_diff_between_revisions_with_prefix(store):
    store.apply(tx(put("/m/1/procs/a.json", "a"), put("/m/2/procs/b.json", "b")))
    base = store.head_revision
    store.apply(tx(put("/m/1/procs/a.json", "a2"), delete("/m/2/procs/b.json"), put("/m/3/x", "x")))
    changes = store.diff(base, store.head_revision)
    assert [c[0] for c in changes] == ["/m/1/procs/a.json", "/m/2/procs/b.json", "/m/3/x"]
    assert changes[1][2] is None and changes[2][1] is None
    assert [c[0] for c in store.diff(base, store.head_revision, "/m/1")] == ["/m/1/procs/a.json"]


def test_diff_when_a_file_becomes_a_directory(store):
    store.apply(tx(put("/x", "file")))
    a = store.head_revision
    store.apply(tx(delete("/x")))
    store.apply(tx(put("/x/inner", "now a dir")))
    assert [(p, o is None, n is None) for p, o, n in store.diff(a, store.head_revision)] == \
        [("/x", False, True), ("/x/inner", True, False)]


def test_events_are_ordered_gap_free_and_resumable(store):
    for i in range(10):
        store.apply(tx(put(f"/w/{i % 3}", str(i)), put("/other", str(i))))
    events = list(store.events("/w", since=0))
    assert [e.revision for e in events] == list(range(2, 12))
    assert [e.action for e in events[:4]] == ["create", "create", "create", "update"]
    resumed = list(store.events("/w", since=6))
    assert resumed == events[5:]
    with pytest.raises(BadRequest):
        list(store.events("/w", since=99))


def test_watch_follows_revisions_written_by_another_process(keg_dir):
    keg.init(keg_dir, durable=False).close()
    reader = keg.Store(keg_dir)
    start = reader.head_revision
    proc = multiprocessing.get_context("spawn").Process(target=_write_three, args=(keg_dir,))
    proc.start()
    seen = []
    for event in reader.watch("/live", since=start, timeout=10):
        seen.append((event.path, event.action))
        if len(seen) == 3:
            break
    proc.join(10)
    assert seen == [("/live/0", "create"), ("/live/1", "create"), ("/live/2", "create")]


def _write_three(keg_dir):
    for i in range(3):
        with keg.Store(keg_dir, durable=False) as s:
            s.apply(Transaction((put(f"/live/{i}", "x"),)))


def test_concurrent_writers_to_different_paths_both_succeed(keg_dir):
    keg.init(keg_dir, durable=False).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_many, args=(keg_dir, f"/writer{w}", 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with keg.Store(keg_dir) as s:
        assert s.head_revision == 1 + 4 * 25
        for w in range(4):
            assert len(s.list(f"/writer{w}")) == 25
    assert git(keg_dir, "fsck", "--strict").returncode == 0


def _write_many(keg_dir, prefix, n):
    for i in range(n):
        with keg.Store(keg_dir, durable=False) as s:
            result = s.apply(Transaction((put(f"{prefix}/{i}", str(i)),)))
            assert result.ok


def test_reopen_after_checkpoint_and_from_journal(keg_dir):
    s = keg.init(keg_dir, durable=False)
    s.apply(tx(put("/a", "1")))
    s.checkpoint()
    s.apply(tx(put("/b", "2")))  # only in the journal
    s._journal.close()
    os.close(s._lock_fd)  # drop the lock without a checkpoint, as a crash would
    s._lock_fd = None
    reopened = keg.Store(keg_dir)
    assert reopened.head_revision == 2  # a reader sees the checkpoint
    reopened.apply(tx(put("/c", "3")))  # the next writer replays the journal first
    assert reopened.read("/b") == b"2" and reopened.head_revision == 4
    reopened.close()
    assert git(keg_dir, "fsck", "--strict").returncode == 0
    assert git(keg_dir, "log", "--format=%s", "main").stdout.split("\n")[:3] == ["put /c", "put /b", "put /a"]


def test_resolve_kids_values_revisions_identities_and_ambiguity(store):
    r = store.apply(tx(put("/users/ann/user.json", json.dumps({"email": "ann@example.com",
                                                               "kid": keg_kid_user("ann@example.com")})),
                       put("/docs/a.md", "# A"), put("/copy/a.md", "# A")))
    value = store.resolve_kid(store.kid("/docs/a.md")[:10])
    assert value["kind"] == "file" and value["paths"] == ["/copy/a.md", "/docs/a.md"]
    rev = store.resolve_kid(r.revision_kid)
    assert rev["kind"] == "revision" and rev["revision"] == 2
    user = store.resolve_kid(keg_kid_user("ann@example.com"))
    assert user["kind"] == "user" and user["name"] == "ann"
    with pytest.raises(NotFound):
        store.resolve_kid("K-" + "f" * 40)
    with pytest.raises(BadRequest):
        store.resolve_kid("K-xyz")


def keg_kid_user(email):
    import kid
    return kid.user_kid(email)


def test_ambiguous_short_kid_names_its_candidates(store):
    from keg.objects import OBJ_BLOB, object_id
    seen, i = {}, 0
    while True:  # a birthday search: two values whose KIDs share 8 hex digits (about 80,000 tries)
        data = f"value {i}".encode()
        oid = object_id(OBJ_BLOB, data).hex()
        if oid[:8] in seen:
            break
        seen[oid[:8]] = (data, oid)
        i += 1
    other_data, other_oid = seen[oid[:8]]
    store.apply(tx(put("/one", other_data), put("/two", data)))
    with pytest.raises(AmbiguousKid) as err:
        store.resolve_kid("K-" + oid[:8])
    assert sorted(err.value.candidates) == sorted(["K-" + oid, "K-" + other_oid])
    assert "give more hex digits" in str(err.value)
    store.checkpoint()  # once packed, libgit2 reports the ambiguity and Keg lists the candidates
    with pytest.raises(AmbiguousKid):
        store.resolve_kid("K-" + oid[:8])
    assert store.resolve_kid("K-" + oid[:12])["paths"] == ["/two"]


def test_a_second_writer_waits_then_reports_busy(keg_dir):
    holder = keg.init(keg_dir, durable=False)
    holder.lock()
    other = keg.Store(keg_dir, lock_timeout=0.2)
    with pytest.raises(keg.KegBusy, match=f"pid {os.getpid()}"):
        other.apply(Transaction((put("/x", "1"),)))
    holder.close()
    assert other.apply(Transaction((put("/x", "1"),))).ok
    other.close()


def test_reader_follows_many_checkpoints_incrementally(keg_dir):
    writer = keg.init(keg_dir, durable=False)
    reader = keg.Store(keg_dir)
    for i in range(5):
        writer.apply(Transaction((put("/n", str(i)),)))
        writer.checkpoint()
        assert reader.refresh() == writer.head_revision
        assert reader.read("/n") == str(i).encode()
    writer.close()


def test_a_failed_journal_sync_acknowledges_nothing_and_stops_writes(keg_dir, monkeypatch):
    store = keg.init(keg_dir)  # durable: the journal is fdatasync'ed
    assert store.apply(Transaction((put("/a", "1"),))).ok

    def failing(fd):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(OSError):
        store.apply(Transaction((put("/b", "never acknowledged"),)))
    monkeypatch.undo()
    assert store.head_revision == 2 and not store.exists("/b")
    with pytest.raises(keg.CorruptKeg, match="reopen"):
        store.apply(Transaction((put("/c", "3"),)))
    store._journal.close()
    os.close(store._lock_fd)
    store._lock_fd = None
    again = keg.Store(keg_dir)
    again.lock()  # replay: the failed record was cut off, so it cannot shadow a later revision 3
    assert again.apply(Transaction((put("/d", "4"),))).revision == 3
    assert not again.exists("/b") and again.read("/d") == b"4"
    again.close()


def test_background_checkpoints_pack_in_a_child_while_commits_go_on(keg_dir, monkeypatch):
    keg.init(keg_dir).close()
    forks = []
    real_fork = os.fork

    def counting_fork():
        pid = real_fork()
        if pid:
            forks.append(pid)
        return pid
    monkeypatch.setattr(os, "fork", counting_fork)
    store = keg.Store(keg_dir, checkpoint_revisions=10, background_checkpoints=True)
    reader = keg.Store(keg_dir)
    kids = {}
    for i in range(95):
        r = store.apply(tx(put(f"/bg/k{i % 7}", f"value {i}"), put("/bg/count", str(i))))
        kids[r.revision] = r.revision_kid
        assert store.read("/bg/count") == str(i).encode()  # packing or not, every value reads back
    assert len(forks) >= 5  # one child per ten revisions, save those that waited for the previous one
    while store.poll_checkpoint():
        time.sleep(0.01)
    installed = reader.refresh()  # another process sees what the children packed, through git
    assert 2 <= store.head_revision - installed < 20 and reader.read("/bg/count") == str(installed - 2).encode()
    assert [n for n in os.listdir(os.path.join(keg_dir, "keg", "journal")) if n.startswith("sealed-")] == []
    store.close()
    reopened = keg.Store(keg_dir)
    assert reopened.head_revision == 96 and reopened.read("/bg/count") == b"94"
    assert all(reopened.revision(n).kid == kid for n, kid in kids.items())
    assert git(keg_dir, "fsck", "--strict", "--no-dangling").returncode == 0


def test_a_failed_background_checkpoint_loses_nothing(keg_dir, monkeypatch, capfd):
    keg.init(keg_dir).close()
    store = keg.Store(keg_dir, checkpoint_revisions=5, background_checkpoints=True)

    def broken_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("keg.store.write_pack", broken_disk)  # the forked children inherit it
    store.apply(tx(*[put(f"/f/o{k}", "x") for k in range(40)]))  # /f wide enough to be kept as deltas
    for i in range(12):  # values go back and forth: trees made while a child packs repeat ones it packs
        assert store.apply(tx(put("/f/n", str(i % 2)))).ok
    while store.poll_checkpoint():
        time.sleep(0.01)
    assert "background checkpoint failed: [Errno 28] No space left on device" in capfd.readouterr().err
    assert "the next checkpoint writes them" in str(store.last_checkpoint_error)
    assert keg.Store(keg_dir).head_revision == 1  # nothing was installed
    assert store.read("/f/n") == b"1"
    monkeypatch.undo()
    store.close()  # the foreground checkpoint writes everything, and drops every journal segment
    assert os.listdir(os.path.join(keg_dir, "keg", "journal")) == []
    reopened = keg.Store(keg_dir)
    assert reopened.head_revision == 14 and [reopened.read("/f/n", n) for n in (3, 8, 14)] == [b"0", b"1", b"1"]
    assert git(keg_dir, "fsck", "--strict", "--no-dangling").returncode == 0


def test_a_writer_with_threads_checkpoints_in_the_foreground(keg_dir, monkeypatch):
    import threading
    keg.init(keg_dir).close()
    forks = []
    monkeypatch.setattr(os, "fork", lambda: forks.append(1) or 0)  # a fork here would run the child's code
    store = keg.Store(keg_dir, checkpoint_revisions=3, background_checkpoints=True)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        for i in range(7):
            store.apply(tx(put("/t", str(i))))
    finally:
        stop.set()
        other.join()
    assert forks == [] and keg.Store(keg_dir).head_revision >= 6
    store.close()


def test_changed_since_tells_which_top_level_directories_a_writer_changed(keg_dir):
    store = keg.init(keg_dir, durable=False)
    assert store.changed_since("users", 1) is None  # nothing committed by this process yet
    store.apply(tx(put("/users/ann/user.json", "{}")))
    store.apply(tx(put("/apps/web/spec.json", "{}")))
    assert store.changed_since("users", 2) is False and store.changed_since("apps", 2) is True
    assert store.changed_since("users", 1) is True and store.changed_since("users", 0) is None  # before it began
    store.apply(tx(delete("/users", recursive=True)))
    assert store.changed_since("users", 3) is True and store.changed_since("apps", 3) is False
    store.close()
    other = keg.Store(keg_dir)  # another writer: it knows only what it commits itself
    other.apply(tx(put("/policy/acl.tsv", "")))
    assert other.changed_since("users", 3) is None  # revision 4 came from the other writer
    assert other.changed_since("users", 4) is False and other.changed_since("policy", 4) is True
    other.close()


def test_new_versions_of_a_wide_directory_are_packed_as_small_deltas_that_git_reads(keg_dir):
    keg.init(keg_dir).close()
    store = keg.Store(keg_dir)
    store.apply(tx(*[put(f"/wide/k{k:03d}", f"v{k:03d}") for k in range(300)]))
    for i in range(30):  # same-length values: each new /wide and / is the old one with entries overwritten
        # Far apart, so that comparing the bytes (a common prefix and suffix) would keep kilobytes.
        assert store.commit([tx(put(f"/wide/k{(7 * i + 100 * j) % 300:03d}", f"w{i:03d}"))
                             for j in range(3)])[0].ok
    store.close()  # the checkpoint packs them
    pack_dir = os.path.join(keg_dir, "objects", "pack")
    listing = git(keg_dir, "verify-pack", "-v",
                  *[os.path.join(pack_dir, name) for name in os.listdir(pack_dir) if name.endswith(".idx")]).stdout
    wide_trees = [line.split() for line in listing.splitlines() if " tree " in line and len(line.split()) >= 5]
    # the first /wide is whole (about 300 x 33 bytes); the 30 new versions are deltas of a few entries
    assert sum(1 for fields in wide_trees if len(fields) == 7 and int(fields[2]) < 200) >= 30
    assert git(keg_dir, "fsck", "--strict", "--no-dangling").returncode == 0
    reopened = keg.Store(keg_dir)
    assert reopened.head_revision == 32
    assert [reopened.read(f"/wide/k{(7 * 29 + 100 * j) % 300:03d}") for j in range(3)] == [b"w029"] * 3
    for rev in (2, 15, 32):
        tree = git(keg_dir, "ls-tree", f"{reopened.revision(rev).kid[2:]}:wide").stdout
        assert len(tree.splitlines()) == 300


def test_a_journal_that_could_not_cut_its_allocated_space_appends_after_its_records(keg_dir, monkeypatch):
    store = keg.init(keg_dir)
    assert store.apply(tx(put("/a", "1"))).ok

    def failing(fd, size):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(os, "ftruncate", failing)
    with pytest.raises(OSError):
        store._journal.close()  # the zeros allocated ahead stay in the file
    monkeypatch.undo()
    journal = os.path.join(keg_dir, "keg", "journal", "current.log")
    assert os.path.getsize(journal) > store._journal.size
    assert store.apply(tx(put("/b", "2"))).ok and store.apply(tx(put("/c", "3"))).ok
    store._journal.close()
    os.close(store._lock_fd)
    store._lock_fd = None
    again = keg.Store(keg_dir)
    again.lock()  # replay finds every acknowledged record, none hidden behind the zeros
    assert again.head_revision == 4 and [again.read(p) for p in ("/a", "/b", "/c")] == [b"1", b"2", b"3"]
    again.close()


def test_a_failed_sync_when_sealing_the_journal_stops_writes_until_reopened(keg_dir, monkeypatch):
    keg.init(keg_dir).close()
    store = keg.Store(keg_dir, checkpoint_revisions=1000)
    assert store.commit([tx(put("/a", "1"))], sync=False)[0].ok  # a Raft replica's way: its log is the WAL

    def failing(fd):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(OSError):
        store._journal.seal(store.head_revision)
    monkeypatch.undo()
    with pytest.raises(keg.CorruptKeg, match="reopen"):
        store.commit([tx(put("/b", "2"))], sync=False)
    assert not store.exists("/b")
    store._journal.close()
    os.close(store._lock_fd)
    store._lock_fd = None
    again = keg.Store(keg_dir)
    again.lock()  # replays the record the failed seal left in the current segment
    assert again.read("/a") == b"1" and not again.exists("/b")
    again.close()
