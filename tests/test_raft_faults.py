"""Faults against a 3-replica Raft master, each replica in a network namespace of its own.

Under every fault a CAS workload on three hot keys runs through all replicas;
afterwards the history must be linearizable (``raft_history``), every
acknowledged write must be on every replica, and the replicas' kegs must be
identical.  Cycle counts are small for CI; bench/raft.py runs the long loops
(``--leader-kills 100 --restarts 50``).  KEG_RAFT_CYCLES overrides the counts.
"""

from __future__ import annotations

import os
import time

import pytest

from raft_harness import Cluster, Workload, git_heads

CYCLES = int(os.environ.get("KEG_RAFT_CYCLES", "0") or 0)
FAILOVER_GOAL = 3.0


@pytest.fixture
def cluster(net, tmp_path):
    c = Cluster(str(tmp_path / "cluster"), 3, net=net).start()
    yield c
    c.close()


def _assert_identical(cluster):
    cluster.wait_leader()
    head = cluster.wait_converged()
    cluster.close()
    assert [r.proc.returncode for r in cluster.replicas] == [0, 0, 0]
    assert set(git_heads([r.keg_path for r in cluster.replicas])) == {head[2:]}


def test_leader_killed_again_and_again_loses_nothing_and_fails_over_fast(cluster):
    cycles = CYCLES or 8
    work = Workload(cluster).start()
    failovers = []
    for cycle in range(cycles):
        seconds, dead = cluster.kill_leader_and_measure(f"/probe/{cycle}")
        failovers.append(seconds)
        dead.start()
    time.sleep(1.0)
    work.stop()
    work.verify()
    assert len(work.acked) > 20
    failovers.sort()
    print(f"failover after leader kill: median {failovers[len(failovers) // 2]:.2f}s max {failovers[-1]:.2f}s")
    assert failovers[-1] < FAILOVER_GOAL, failovers
    _assert_identical(cluster)


@pytest.mark.parametrize("fault", ["leader-isolated", "minority-isolated", "symmetric-split"])
def test_partitions_keep_the_history_linearizable(cluster, fault):
    work = Workload(cluster).start()
    time.sleep(1.0)
    leader = cluster.wait_leader()
    follower = next(r for r in cluster.replicas if r is not leader)
    if fault == "leader-isolated":
        cluster.isolate(leader)
    elif fault == "minority-isolated":
        cluster.isolate(follower)
    else:
        for i, a in enumerate(cluster.replicas):  # nobody reaches anybody: no majority anywhere
            for b in cluster.replicas[i + 1:]:
                cluster.cut(a, b)
    time.sleep(4.0)
    if fault != "symmetric-split":
        # The majority side elects (or keeps) a leader and goes on accepting writes.
        majority = [r for r in cluster.replicas if r is not (leader if fault == "leader-isolated" else follower)]
        new_leader = cluster.wait_leader(among=majority, timeout=10)
        with cluster.client():
            assert cluster.write(new_leader, f"/during/{fault}", "x")[0] == 200
    cluster.heal()
    time.sleep(2.0)
    work.stop()
    work.verify()
    _assert_identical(cluster)


def test_all_replicas_killed_at_once_and_restarted_under_writes(cluster):
    cycles = CYCLES or 4
    work = Workload(cluster).start()
    for _ in range(cycles):
        time.sleep(0.7)
        assert cluster.restart_all(leader_timeout=15) < 15, "a replica hung on start"
    time.sleep(1.0)
    work.stop()
    work.verify()
    _assert_identical(cluster)
