"""git push of an app to a 3-replica Raft master: the source is on a majority before /src/<app> names it.

Real replicas on loopback (tests/raft_harness.py), stock git pushing to one of
them; no builder runs, so each push ends with "no builder took the build up"
after its source is committed (as in test_push.py).
"""

from __future__ import annotations

import http.client
import os
import subprocess
import time
import urllib.parse

import pytest

from conftest import GitGate, git, wait_until
from master.raft import peer_token
from raft_harness import Cluster
from test_push import make_repo, push, run


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("KEG_BUILD_START_WAIT", "1")   # the replicas hand KEG_BUILD_* to the push hook
    gate = GitGate(str(tmp_path), monkeypatch)          # open: git as usual, until a test closes it
    c = Cluster(str(tmp_path / "cluster"), 3).start()
    c.gate = gate
    yield c
    gate.open()
    c.close()


def push_url(cluster, replica, app="hello") -> str:
    return replica.url.replace("http://", f"http://admin:{cluster.token}@") + f"/git/apps/{app}.git"


def source_ref(replica, app="hello") -> str | None:
    done = git(replica.keg_path, "rev-parse", "--verify", "--quiet", f"refs/keg/src/{app}")
    return done.stdout.strip() or None


def holds(replica, commit: str) -> bool:
    """The replica's keg has the commit, its whole tree and history (what a builder fetches)."""
    done = git(replica.keg_path, "rev-list", "--objects", "--quiet", commit)
    return done.returncode == 0


def commit_of(repo) -> str:
    return run("git", "rev-parse", "HEAD", cwd=repo).stdout.strip()


def test_a_push_is_on_a_majority_before_its_pointer_and_reaches_every_replica(cluster, tmp_path):
    leader = cluster.wait_leader()
    target, other = [r for r in cluster.replicas if r is not leader]
    other.stop()   # the push must still reach a majority: the follower it came to, and the leader
    repo = make_repo(tmp_path / "app", {"Procfile": "web: python3 app.py\n", "app.py": "print('one')\n"})
    done = push(repo, push_url(cluster, target))
    first = commit_of(repo)
    assert f"source K-{first}" in done.stderr, done.stderr
    assert "no builder took the build up" in done.stderr
    for r in (leader, target):
        assert source_ref(r) == first and holds(r, first), f"r{r.index} lacks the pushed source"
    assert cluster.call(leader, "GET", "/v1/keg/src/hello/app.py")[2] == b"print('one')\n"

    # The replica that was down applies the pointer from the log, then fetches the source it lacks.
    other.start()
    cluster.wait_converged()
    wait_until(lambda: source_ref(other) == first and holds(other, first), "the source on the replica that was down",
               timeout=20)

    # A second push sends only what is new; every replica has the rest by now.
    (repo / "app.py").write_text("print('two')\n")
    run("git", "-c", "user.name=Dev", "-c", "user.email=dev@example.org", "commit", "-qam", "two", cwd=repo)
    second = commit_of(repo)
    done = push(repo, push_url(cluster, leader))
    assert f"source K-{second}" in done.stderr, done.stderr
    assert sum(source_ref(r) == second and holds(r, second) for r in cluster.replicas) >= 2
    for r in cluster.replicas:
        wait_until(lambda: source_ref(r) == second and holds(r, second), f"the second source on r{r.index}",
                   timeout=20)
        check = git(r.keg_path, "fsck", "--strict", "--no-dangling")
        assert check.returncode == 0, check.stdout + check.stderr
    for r in cluster.replicas:
        assert cluster.call(r, "GET", "/v1/keg/src/hello/app.py")[2] == b"print('two')\n"


def test_a_push_that_reaches_no_majority_is_refused_and_commits_nothing(cluster, tmp_path):
    leader = cluster.wait_leader()
    repo = make_repo(tmp_path / "app", {"app.py": "print('one')\n"})
    first = commit_of(repo)
    assert f"source K-{first}" in push(repo, push_url(cluster, leader)).stderr
    cluster.wait_converged()
    head = cluster.status(leader)["revision"]
    for r in cluster.replicas:
        if r is not leader:
            r.stop()
    (repo / "app.py").write_text("print('two')\n")
    run("git", "-c", "user.name=Dev", "-c", "user.email=dev@example.org", "commit", "-qam", "two", cwd=repo)
    done = push(repo, push_url(cluster, leader))
    assert done.returncode != 0
    assert "stored on 1 of 3 replicas" in done.stderr and "a majority (2) is needed" in done.stderr, done.stderr
    assert cluster.status(leader)["revision"] == head, "the namespace changed"
    status, headers, _ = cluster.call(leader, "HEAD", "/v1/keg/src/hello")
    assert status == 200 and headers["etag"].strip('"') == "K-" + first
    # The leader keeps the refused objects for a while, but what git fetch and builders see is the committed one.
    assert source_ref(leader) == first and holds(leader, first)


@pytest.mark.parametrize("held", ["on the replica the push reached", "on the leader, sent it by that replica"])
def test_raft_goes_on_while_pushed_packs_are_indexed(cluster, tmp_path, held):
    """Replicas store a pushed pack in a child process: with the pack's ``index-pack`` held for longer than an
    election timeout on the replica the push reached, or on the leader it sent the pack to, the cluster keeps
    its leader and term and accepts writes through both; the push completes once the packs are let go."""
    leader = cluster.wait_leader()
    target = next(r for r in cluster.replicas if r is not leader)
    term = cluster.status(leader)["term"]
    repo = make_repo(tmp_path / "app", {"app.py": "print('one')\n"})
    cluster.gate.close(let_one_pass=held.startswith("on the leader"))
    pusher = subprocess.Popen(["git", "push", push_url(cluster, target), "main"], cwd=repo, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=dict(os.environ, GIT_TERMINAL_PROMPT="0"))
    try:
        wait_until(lambda: cluster.gate.held() >= 1, f"the index-pack {held} to start", timeout=30)
        held_since = time.monotonic()
        n = 0
        while time.monotonic() - held_since < 3.0:   # three times the longest election timeout (1 s)
            for r in (target, leader):
                n += 1
                status, answer = cluster.write(r, f"/notes/during-push-{n}", "still serving\n")
                assert status == 200, answer
            time.sleep(0.2)
        assert pusher.poll() is None
        now = cluster.status(target)
        assert (now["leader"], now["term"]) == (leader.raft, term), now
    finally:
        cluster.gate.open()
    out, _ = pusher.communicate(timeout=60)
    commit = commit_of(repo)
    assert f"source K-{commit}" in out, out
    assert sum(holds(r, commit) for r in cluster.replicas) >= 2
    assert cluster.status(leader)["term"] == term


@pytest.mark.parametrize("held", ["index-pack", "pack-objects"])
def test_raft_goes_on_while_a_missed_source_is_fetched(cluster, tmp_path, held):
    """A replica that missed a push fetches the source in a child process, and the replica it asks streams the
    pack from ``git pack-objects``: with the fetching replica's ``index-pack``, or the asked replica's
    ``pack-objects``, held for longer than an election timeout, every replica accepts writes and the leader
    and term do not change; the source arrives once git is let go."""
    leader = cluster.wait_leader()
    target, other = [r for r in cluster.replicas if r is not leader]
    other.stop()
    repo = make_repo(tmp_path / "app", {"app.py": "print('one')\n"})
    commit = commit_of(repo)
    assert f"source K-{commit}" in push(repo, push_url(cluster, target)).stderr
    cluster.gate.close(command=held)
    try:
        other.start()   # it applies the pointer, lacks the commit, and asks the others for it
        wait_until(lambda: cluster.gate.held() >= 1, f"the {held} of the missed source to start", timeout=30)
        cluster.wait_converged()
        term = cluster.status(leader)["term"]
        held_since, n = time.monotonic(), 0
        while time.monotonic() - held_since < 3.0:   # three times the longest election timeout (1 s)
            for r in cluster.replicas:
                n += 1
                status, answer = cluster.write(r, f"/notes/during-fetch-{n}", "still serving\n")
                assert status == 200, answer
            time.sleep(0.2)
        assert not holds(other, commit)
        for r in cluster.replicas:
            now = cluster.status(r)
            assert (now["leader"], now["term"]) == (leader.raft, term), now
    finally:
        cluster.gate.open()
    wait_until(lambda: source_ref(other) == commit and holds(other, commit), "the source on the replica that missed it",
               timeout=20)
    check = git(other.keg_path, "fsck", "--strict", "--no-dangling")
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_replica_lacking_the_base_of_a_pack_asks_for_the_whole_source(cluster, tmp_path):
    """The peer endpoint: a pack leaning on objects the replica lacks gets 422 (and changes nothing); the
    whole pack of the commit is accepted; a GET returns the whole pack to another replica."""
    repo = make_repo(tmp_path / "app", {"app.py": "print('one')\n"})
    first = commit_of(repo)
    (repo / "lib.py").write_text("x = 1\n")
    run("git", "add", "lib.py", cwd=repo)
    run("git", "-c", "user.name=Dev", "-c", "user.email=dev@example.org", "commit", "-qm", "two", cwd=repo)
    second = commit_of(repo)

    def pack(*revs: str) -> bytes:
        return subprocess.run(["git", "pack-objects", "--stdout", "--revs", "--quiet"], cwd=repo, check=True,
                              input="".join(r + "\n" for r in revs).encode(), capture_output=True).stdout

    with open(cluster.password_file) as f:
        token = peer_token(f.read().strip())
    replica = cluster.replicas[0]

    def call(method: str, commit: str, body: bytes | None = None, bearer: str = token) -> tuple:
        url = urllib.parse.urlsplit(replica.url)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        try:
            conn.request(method, f"/v1/raft/sources/hello?commit={commit}", body=body,
                         headers={"Authorization": f"Bearer {bearer}"})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    status, answer = call("POST", second, pack(second, "^" + first))
    assert status == 422 and b"did not receive expected object" in answer, answer
    assert source_ref(replica) is None and not holds(replica, second)
    assert call("POST", second, pack(second), bearer=cluster.token)[0] == 403   # peers only
    status, answer = call("POST", second, pack(second))
    assert status == 200, answer
    assert holds(replica, second)
    assert source_ref(replica) is None, "a source no pointer names yet is served as the app's"
    status, whole = call("GET", second)
    assert status == 200
    receiver = cluster.replicas[1]
    indexed = subprocess.run(["git", "--git-dir", receiver.keg_path, "index-pack", "--stdin"], input=whole,
                             capture_output=True)
    assert indexed.returncode == 0, indexed.stderr
    assert holds(receiver, second)
    assert call("GET", "0" * 40)[0] == 404
    assert call("POST", "not-a-commit", b"")[0] == 400
    assert os.path.isdir(os.path.join(replica.keg_path, "keg", "incoming"))
    assert not os.listdir(os.path.join(replica.keg_path, "keg", "incoming")), "a quarantine was left behind"
