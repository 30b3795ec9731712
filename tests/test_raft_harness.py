"""The Raft test harness (tests/raft_harness.py) on what bench/raft.py relies on to tell a hung start.

A replica has started when its log, since the start, says it serves; the
log of a replica restarted many times holds earlier runs' output, which may
hold any text.  A replica that does not start must be reported with where it
waited: with ``Cluster(stacks=True)`` the stacks of its threads go to its log.
"""

from __future__ import annotations

import os

import pytest

import raft_harness
from raft_harness import Cluster


def test_a_replica_is_seen_to_start_whatever_its_log_held_before(tmp_path):
    cluster = Cluster(str(tmp_path / "cluster"), 3)
    earlier = "keg master: an earlier run said “…” — ünïcödé\n" * 200  # many more bytes than characters
    for r in cluster.replicas:
        with open(r.log_path, "w", encoding="utf-8") as f:
            f.write(earlier)
    try:
        cluster.start()
        assert all(r.start_seconds is not None and r.start_seconds < raft_harness.START_TIMEOUT
                   for r in cluster.replicas), cluster.start_seconds
        assert "as Raft replica" in cluster.replicas[0].log_since_start()
        assert earlier not in cluster.replicas[0].log_since_start()
        # A restart counts from its own start, not from the first one's output.
        r = cluster.replicas[1]
        r.kill()
        r.start(wait=False)
        cluster.wait_started([r])
        assert r.log_since_start().count("as Raft replica") == 1
        assert len(cluster.start_seconds) == 4
    finally:
        cluster.close()


def test_a_replica_that_hangs_on_start_is_reported_with_its_stacks(tmp_path, monkeypatch):
    monkeypatch.setattr(raft_harness, "START_TIMEOUT", 5.0)
    monkeypatch.setattr(raft_harness, "SLOW_START", 1.5)
    cluster = Cluster(str(tmp_path / "cluster"), 3, stacks=True)
    hung = cluster.replicas[0]
    config = os.path.join(hung.keg_path, "keg", "config.json")
    os.unlink(config)
    os.mkfifo(config)  # opening the keg blocks until a writer comes: none does
    try:
        hung.start(wait=False)
        with pytest.raises(AssertionError) as failed:
            hung.wait_started()
        message = str(failed.value)
        assert "replica 0 did not start within" in message and "(exit status None)" in message
        # faulthandler's dump names the frame it waits in: the keg's open, under the replica's start.
        assert "Current thread" in message and "keg/store.py" in message and "in serve_replica" in message
    finally:
        cluster.close()
