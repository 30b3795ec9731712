"""Membership changes and catch-up from a snapshot (the log trimmed below what the new replica needs)."""

from __future__ import annotations

import os
import subprocess

from conftest import GitGate, keg_command, wait_until
from master.raft import peer_token
from raft_harness import Cluster
from test_push import make_repo, push
from test_raft_sources import commit_of, holds, push_url, source_ref


def test_a_replica_is_added_catches_up_from_a_snapshot_and_another_is_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("KEG_BUILD_START_WAIT", "1")   # no builder runs: a push waits for one this long
    gate = GitGate(str(tmp_path), monkeypatch)          # never closed: it records the replicas' git commands
    cluster = Cluster(str(tmp_path / "cluster"), 3, extra=["--raft-compact-entries", "20"])
    cluster.keep_seed()
    cluster.start()
    env = {**os.environ, "KEG_TOKEN": cluster.token}
    try:
        leader = cluster.wait_leader()
        repo = make_repo(tmp_path / "app", {"app.py": "print('hi')\n"})
        assert f"source K-{commit_of(repo)}" in push(repo, push_url(cluster, leader)).stderr
        for i in range(60):
            assert cluster.write(cluster.replicas[i % 3], f"/before/{i}", str(i))[0] == 200
        assert cluster.status(leader)["snapshots_written"] >= 1  # the log was trimmed
        new = cluster.add_replica()
        new.start()
        done = subprocess.run([*keg_command(), "master", "member", "add", new.raft, "--url", leader.url],
                              capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 0 and f"added {new.raft}" in done.stdout, done.stderr
        head = cluster.wait_converged(timeout=60)
        status = cluster.status(new)
        assert status["revision_kid"] == head and status["snapshots_loaded"] == 1
        assert cluster.call(new, "GET", "/v1/keg/before/59")[2] == b"59"
        # The snapshot came by git fetch with the peer token, which no local user could read on its command line.
        with open(cluster.password_file) as f:
            token = peer_token(f.read().strip())
        fetches = [c for c in gate.commands() if " fetch " in f" {c} " and "/v1/raft/git/keg.git" in c]
        assert fetches and not [c for c in gate.commands() if token in c]
        # The snapshot's git fetch brought the namespace; the pushed source /src/hello names follows.
        commit = commit_of(repo)
        wait_until(lambda: source_ref(new) == commit and holds(new, commit), "the pushed source on the new replica",
                   timeout=20)
        assert sorted(cluster.status(leader)["members"]) == sorted(r.raft for r in cluster.replicas)
        # Writes through the new replica reach everyone.
        assert cluster.write(new, "/from-new", "hello")[0] == 200
        cluster.wait_converged()
        # Remove a follower, then stop it: the other three go on.
        leader = cluster.wait_leader()
        gone = next(r for r in cluster.replicas[:3] if r is not leader)
        done = subprocess.run([*keg_command(), "master", "member", "remove", gone.raft, "--url", leader.url],
                              capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        gone.stop()
        assert gone.raft not in cluster.status(leader)["members"]
        for i in range(5):
            assert cluster.write(new, f"/after/{i}", str(i))[0] == 200
        cluster.wait_converged()
        done = subprocess.run([*keg_command(), "master", "member", "remove", "nonsense", "--url", leader.url],
                              capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode != 0 and "HOST:PORT" in done.stderr
    finally:
        cluster.close()
