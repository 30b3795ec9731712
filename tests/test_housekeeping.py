"""Disk layout stays tidy: no loose objects, a bounded number of packs, stock git agrees."""

import os
import shutil
import threading
import time

import keg
from keg import Transaction, put
from keg.store import PACKS_BEFORE_REPACK
from master.single import SingleMaster
from shell.master_cli import _housekeeping_problems

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


def _git_wrapper(tmp_path, monkeypatch, repack_script: str) -> None:
    """Put a ``git`` first on PATH that runs ``repack_script`` (sh, "$@" the arguments) for a repack."""
    real = shutil.which("git")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "git"
    wrapper.write_text(f'#!/bin/sh\nREAL_GIT="{real}"\n'
                       f'for a in "$@"; do if [ "$a" = repack ]; then\n{repack_script}\nfi; done\n'
                       'exec "$REAL_GIT" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def _checkpoint_until_repack(store) -> int:
    """Commit and checkpoint (a pack each) until one starts a repack; the number of revisions written."""
    for i in range(PACKS_BEFORE_REPACK + 2):
        store.apply(Transaction((put(f"/hk/k{i}", f"value {i}"),)))
        store.checkpoint()
        if store.stats["repacks"]:
            return i + 1
    raise AssertionError(f"{PACKS_BEFORE_REPACK + 2} checkpoints started no repack")


def _wait_for(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def _all_revisions_readable(keg_dir, written: int) -> None:
    assert git(keg_dir, "fsck", "--strict").returncode == 0
    reopened = keg.Store(keg_dir)
    for i in range(written):
        assert reopened.read(f"/hk/k{i}", rev=i + 2) == f"value {i}".encode()


def test_a_repack_runs_beside_the_writes_and_ends_by_close(keg_dir, tmp_path, monkeypatch):
    # git's repack first waits for the test's word: the checkpoint that starts it must return before that.
    started, ended, release = (tmp_path / n for n in ("started", "ended", "release"))
    _git_wrapper(tmp_path, monkeypatch, f'touch "{started}"; n=0\n'
                 f'while [ ! -e "{release}" ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n+1)); done\n'
                 f'"$REAL_GIT" "$@"; rc=$?; touch "{ended}"; exit $rc')
    store = keg.init(keg_dir, durable=False)
    store.background_checkpoints = True  # as the master opens it
    store.checkpoint_revisions = 10_000  # packs only where the test checkpoints
    written = _checkpoint_until_repack(store)
    assert _wait_for(started.exists, 10)
    assert not ended.exists(), "the checkpoint waited for the repack"
    assert store.poll_checkpoint() is True
    assert store.read("/hk/k0") == b"value 0"
    # Then the real repack runs while writes and checkpoints (a new pack each) go on beside it.
    release.touch()
    while store.poll_checkpoint() and written < 200:
        store.apply(Transaction((put(f"/hk/k{written}", f"value {written}"),)))
        store.checkpoint()
        written += 1
    store.close()
    assert ended.exists()
    assert store.stats["repacks"] == 1 and store.last_repack_error is None
    assert len(_packs(keg_dir)) < PACKS_BEFORE_REPACK
    _all_revisions_readable(keg_dir, written)


def test_a_failed_repack_is_kept_as_an_error_and_loses_nothing(keg_dir, tmp_path, monkeypatch):
    _git_wrapper(tmp_path, monkeypatch, 'echo "fatal: the disk is full (test)" >&2; exit 1')
    store = keg.init(keg_dir, durable=False)
    store.background_checkpoints = True
    store.checkpoint_revisions = 10_000
    written = _checkpoint_until_repack(store)
    assert _wait_for(lambda: not store.poll_checkpoint(), 10)
    error = store.last_repack_error
    assert error is not None and "git repack" in str(error) and "the disk is full (test)" in str(error)
    # The checkpoints go on and succeed; the repack is not tried again at once.
    store.apply(Transaction((put(f"/hk/k{written}", f"value {written}"),)))
    store.checkpoint()
    written += 1
    assert store.last_checkpoint_error is None and store.stats["repacks"] == 1
    # The master says so (GET /v1/status), and keg master status names it under its table.
    status = SingleMaster(store).status()
    assert status["housekeeping"]["repack_error"] == str(error) and status["housekeeping"]["repacks"] == 1
    assert status["housekeeping"]["checkpoint_error"] is None and status["revision"] == store.revision().number
    shown = _housekeeping_problems([{**status, "url": "http://keg1:7480"}])
    assert shown == [f"http://keg1:7480: the last repack failed (the old packs stay; tried again later): {error}"]
    store.close()
    assert len(_packs(keg_dir)) > PACKS_BEFORE_REPACK  # the old packs are all still there
    _all_revisions_readable(keg_dir, written)


def test_a_process_with_threads_repacks_in_the_checkpoint(keg_dir, tmp_path, monkeypatch):
    # A child forked by a thread dies with that thread (PR_SET_PDEATHSIG): with threads, repack here.
    ended = tmp_path / "ended"
    _git_wrapper(tmp_path, monkeypatch, f'"$REAL_GIT" "$@"; rc=$?; touch "{ended}"; exit $rc')
    store = keg.init(keg_dir, durable=False)
    store.background_checkpoints = True
    store.checkpoint_revisions = 10_000
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)
    worker.start()
    try:
        written = _checkpoint_until_repack(store)
        assert ended.exists(), "the repack was left running after the checkpoint"
        assert store.poll_checkpoint() is False
    finally:
        stop.set()
        worker.join()
    store.close()
    assert len(_packs(keg_dir)) < PACKS_BEFORE_REPACK
    _all_revisions_readable(keg_dir, written)


def test_revision_index_is_rebuilt_when_lost(keg_dir):
    with keg.init(keg_dir, durable=False) as store:
        for i in range(20):
            store.apply(Transaction((put("/r", str(i)),)))
    os.unlink(os.path.join(keg_dir, "keg", "revs"))
    store = keg.Store(keg_dir)
    assert store.head_revision == 21 and store.read("/r", rev=7) == b"5"
    with open(os.path.join(keg_dir, "keg", "revs"), "rb") as f:
        assert len(f.read()) == 22 * 20
