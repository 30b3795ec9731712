"""Power loss under a 3-replica Raft master: what was not fsynced is gone, and no acknowledged write with it.

Each replica runs in a network namespace of its own with its directory (its
keg and its Raft journal) on a lazyfs mount of its own (``tests/lazyfs.py``):
a cut kills the replica with SIGKILL and drops everything its disk had not
synced — file data after the last fsync, and directory entries after the last
fsync of their directory — or, for a *torn* cut, keeps a random part of the
unsynced data.  A CAS workload runs through all replicas throughout (the
workload and checker of ``test_raft_faults``); afterwards the history must be
linearizable, every acknowledged write must be on every replica, the
replicas must have the same revisions (same commit ids: same KIDs, byte for
byte), and so must what their disks hold after a last cut.  Every restart
must reach "serving" (the harness waits at most 30 s).

Counts are small for CI; ``KEG_RAFT_POWER_CUTS=N`` (one replica at a time,
default 10) and ``KEG_RAFT_POWER_RESTARTS=M`` (all at once, default 5) raise
them, and ``KEG_RAFT_POWER_COMPACT=E`` sets ``--raft-compact-entries`` (default
100, far below the server's 5000, so that followers install snapshots
between cuts).  The lazyfs tests at the top show what a cut keeps and drops.
"""

from __future__ import annotations

import io
import os
import subprocess
import time

import pytest

import lazyfs
from keg.fsio import fsync_dir
from raft_harness import Cluster, Workload, git_heads, revision_kids

POWER_CUTS = int(os.environ.get("KEG_RAFT_POWER_CUTS", "0") or 0) or 10
POWER_RESTARTS = int(os.environ.get("KEG_RAFT_POWER_RESTARTS", "0") or 0) or 5
# Small: followers install snapshots between cuts.
COMPACT_ENTRIES = int(os.environ.get("KEG_RAFT_POWER_COMPACT", "0") or 0) or 100
LEADER_TIMEOUT = 15.0


@pytest.fixture
def fuse_ok():
    reason = lazyfs.unavailable()
    if reason:
        pytest.fail(f"these tests need FUSE (fusepy, libfuse2, /dev/fuse): {reason}")


# ------------------------------------------------------------------ lazyfs itself

def _write(path: str, data: bytes, sync: bool = False, mode: str = "wb") -> None:
    with open(path, mode) as f:
        f.write(data)
        f.flush()
        if sync:
            os.fsync(f.fileno())


def _tree(root: str) -> dict:
    out = {}
    for base, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(base, name), "rb") as f:
                out[os.path.relpath(os.path.join(base, name), root)] = f.read()
    return out


@pytest.fixture
def disk(fuse_ok, tmp_path):
    os.makedirs(tmp_path / "disk" / "old")
    _write(str(tmp_path / "disk" / "old" / "kept"), b"before the mount")
    d = lazyfs.Disk(str(tmp_path / "disk"), str(tmp_path / "mnt")).mount()
    yield d
    d.close()


def test_a_cut_keeps_exactly_what_was_synced(disk):
    m = disk.mountpoint
    _write(f"{m}/never-synced", b"lost")                           # data never synced; name synced below
    _write(f"{m}/atomic.tmp", b"new", sync=True)                  # the careful way: file, rename, directory
    os.rename(f"{m}/atomic.tmp", f"{m}/atomic")
    fsync_dir(m)
    _write(f"{m}/file-synced-only", b"data", sync=True)           # data synced, its name never
    _write(f"{m}/atomic", b" appended", mode="ab")                # after the last fsync of the file
    os.unlink(f"{m}/old/kept")                                    # its directory never synced again
    os.mkdir(f"{m}/newdir")                                       # synced inside, but not in its parent
    _write(f"{m}/newdir/x", b"x", sync=True)
    fsync_dir(f"{m}/newdir")
    os.rename(f"{m}/atomic", f"{m}/renamed")                      # a rename nobody synced
    assert sorted(os.listdir(m)) == ["file-synced-only", "never-synced", "newdir", "old", "renamed"]
    before = disk.stats()
    assert before["unsynced_files"] >= 1 and before["unsynced_entries"] >= 4, before

    dropped = disk.power_cut()

    assert not lazyfs.mounted(m)
    assert dropped["unsynced_bytes"] == before["unsynced_bytes"] > 0
    assert _tree(disk.backing) == {"never-synced": b"", "atomic": b"new", "old/kept": b"before the mount"}
    disk.mount()
    assert _tree(m) == _tree(disk.backing)


def test_a_large_value_acknowledged_on_a_new_keg_survives_a_power_cut(disk):
    """A keg made on the disk, a large value put (its chunks go into directories made for them), then the
    power goes: the value reads back whole. Before keg.fsio.make_dirs the chunks' new directories were
    never synced into their parents, and a cut took chunks a put had acknowledged."""
    import keg
    path = os.path.join(disk.mountpoint, "k")
    value = os.urandom(3 << 20)  # above the 1 MiB threshold: chunks
    store = keg.init(path)
    op = store.put_stream("/big.bin", io.BytesIO(value))  # chunks stored; the op is then committed
    assert store.commit([keg.Transaction((op,))])[0].ok
    disk.power_cut()
    disk.mount()
    again = keg.Store(path)
    again.lock()  # the next writer replays the journal, as a master does when it starts
    try:
        with again.open("/big.bin") as f:
            assert f.read() == value
    finally:
        again.close()


def test_a_torn_cut_keeps_a_prefix_of_the_unsynced_data_and_a_shutdown_keeps_all(disk):
    m = disk.mountpoint
    _write(f"{m}/log", b"synced|", sync=True)
    fsync_dir(m)
    _write(f"{m}/log", b"0123456789" * 100, mode="ab")
    disk.power_cut(torn_seed=7)
    kept = _tree(disk.backing)["log"]
    assert kept.startswith(b"synced|") and (b"synced|" + b"0123456789" * 100).startswith(kept)

    disk.mount()
    _write(f"{m}/log", b"more", mode="ab")
    os.mkdir(f"{m}/d")
    _write(f"{m}/d/f", b"f")
    disk.shutdown()
    assert _tree(disk.backing) == {"log": kept + b"more", "d/f": b"f", "old/kept": b"before the mount"}


# ------------------------------------------------------------------ a cluster on lazyfs

@pytest.fixture
def cluster(fuse_ok, net, tmp_path):
    c = Cluster(str(tmp_path / "cluster"), 3, net=net, disks=True,
                extra=["--raft-compact-entries", str(COMPACT_ENTRIES)])
    try:
        c.start()
        yield c
    finally:
        c.close()
        c.close_disks()


def _assert_identical_and_durable(cluster):
    """Same revisions everywhere, then the same after a cut of every disk of the stopped cluster."""
    cluster.wait_leader()
    head = cluster.wait_converged()
    with cluster.client():
        statuses = [cluster.status(r) for r in cluster.replicas]
    snapshots = {"written": sum(s["snapshots_written"] for s in statuses),
                 "loaded": sum(s["snapshots_loaded"] for s in statuses)}
    cluster.close()
    assert [r.proc.returncode for r in cluster.replicas] == [0, 0, 0]
    kegs = [r.keg_path for r in cluster.replicas]
    assert set(git_heads(kegs)) == {head[2:]}
    history = revision_kids(kegs[0])
    assert all(revision_kids(k) == history for k in kegs[1:])
    cluster.close_disks()
    disks = [r.disk.backing for r in cluster.replicas]
    assert set(git_heads(disks)) == {head[2:]}, "a cleanly stopped replica's disk lost its head"
    for path in disks:
        assert revision_kids(path) == history
        done = subprocess.run(["git", "--git-dir", path, "fsck", "--connectivity-only", "--no-progress"],
                              capture_output=True, text=True)
        assert done.returncode == 0, f"{path}: {done.stderr[-2000:]}"
    return history, snapshots


def _dropped(cuts: list) -> dict:
    total = {"unsynced_bytes": 0, "unsynced_entries": 0, "unsynced_files": 0}
    for cut in cuts:
        for key in total:
            total[key] += cut[key]
    return total


def _finish(cluster, work, cuts: list, what: str, began: float, waited: str, times: list) -> None:
    """Stop the workload and check what every power-loss run must show; print its figures."""
    time.sleep(1.0)
    work.stop()
    work.verify()
    history, snapshots = _assert_identical_and_durable(cluster)
    dropped = _dropped(cuts)
    times = sorted(times)
    print(f"{what} in {time.monotonic() - began:.0f}s, "
          f"{len(work.acked)} acknowledged CAS of {len(work.history)} ops, {len(history)} revisions, "
          f"snapshots since each replica's last start {snapshots}, dropped {dropped}, "
          f"{waited} median {times[len(times) // 2]:.2f}s max {times[-1]:.2f}s")
    assert len(work.acked) > 5 * len(times)
    assert dropped["unsynced_bytes"] + dropped["unsynced_entries"] > 0, "no cut dropped anything: not a test"


def test_one_replica_after_another_loses_power_and_no_acknowledged_write_is_lost(cluster):
    work = Workload(cluster).start()
    cuts, starts = [], []
    began = time.monotonic()
    for cycle in range(POWER_CUTS):
        time.sleep(0.5)
        leader = cluster.wait_leader(timeout=LEADER_TIMEOUT)
        victim = leader if cycle % 2 == 0 else next(r for r in cluster.replicas if r is not leader)
        cuts.append(victim.power_cut(torn_seed=cycle if cycle % 4 >= 2 else None))
        started = time.monotonic()
        victim.start()   # fails when it does not serve within 30 s
        starts.append(time.monotonic() - started)
        print(f"cut {cycle}: r{victim.index} ({'leader' if victim is leader else 'follower'}), "
              f"{'torn, ' if cycle % 4 >= 2 else ''}dropped {cuts[-1]['unsynced_bytes']} bytes "
              f"{cuts[-1]['unsynced_entries']} entries, serving after {starts[-1]:.2f}s")
    _finish(cluster, work, cuts, f"power cuts of one replica: {POWER_CUTS}", began, "restart to serving", starts)


def test_all_replicas_lose_power_at_once_under_writes_and_come_back(cluster):
    work = Workload(cluster).start()
    cuts, leaders = [], []
    began = time.monotonic()
    for cycle in range(POWER_RESTARTS):
        time.sleep(0.7)
        seconds, dropped = cluster.power_cut_all(leader_timeout=LEADER_TIMEOUT,
                                                 torn_seed=100 * cycle if cycle % 2 else None)
        leaders.append(seconds)
        cuts.extend(dropped)
    _finish(cluster, work, cuts, f"all 3 replicas cut at once: {POWER_RESTARTS} times", began, "restart to leader",
            leaders)
