"""A 3-replica Raft master on loopback: forwarding, identical commits, idempotency, chunks, status, membership."""

from __future__ import annotations

import json
import http.client
import os
import pickle
import signal
import socket
import struct
import subprocess
import time
import urllib.parse
import zlib

import blake3
import pytest

from conftest import keg_command, wait_until
from keg.chunkworker import encode_group
from raft_harness import Cluster, git_heads, revision_kids


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(str(tmp_path / "cluster"), 3).start()
    yield c
    c.close()


def followers(c, leader):
    return [r for r in c.replicas if r is not leader]


def test_writes_through_any_replica_make_the_same_commits_byte_for_byte(cluster):
    leader = cluster.wait_leader()
    answers = []
    for i in range(12):
        r = cluster.replicas[i % 3]
        status, answer = cluster.write(r, f"/d/k{i}", f"value {i}")
        assert status == 200, answer
        answers.append(answer)
    # A follower forwarded its writes to the leader; every answer names a revision.
    assert {a["revision"] for a in answers} == set(range(2, 14))
    head = cluster.wait_converged()
    assert head == answers[-1]["revision_kid"]
    for r in followers(cluster, leader):  # a local read says which revision it is at
        status, headers, body = cluster.call(r, "GET", "/v1/keg/d/k11")
        assert status == 200 and body == b"value 11" and headers["keg-revision"] == "13"
    cluster.close()
    assert [r.proc.returncode for r in cluster.replicas] == [0, 0, 0], [r.log()[-2000:] for r in cluster.replicas]
    kegs = [r.keg_path for r in cluster.replicas]
    assert len(set(git_heads(kegs))) == 1
    histories = [revision_kids(k) for k in kegs]
    assert histories[0] == histories[1] == histories[2] and len(histories[0]) == 13
    for k in kegs:
        assert subprocess.run(["git", "--git-dir", k, "fsck", "--strict"], capture_output=True).returncode == 0
    # Byte for byte: the commit objects themselves (time and author from the log entry, not the replica).
    raw = {subprocess.run(["git", "--git-dir", k, "cat-file", "commit", "main~3"], capture_output=True).stdout
           for k in kegs}
    assert len(raw) == 1 and b"Keg-Raft-Index: " in raw.pop()


def test_linearizable_read_on_a_follower_sees_the_newest_write(cluster):
    leader = cluster.wait_leader()
    follower = followers(cluster, leader)[0]
    for i in range(20):
        assert cluster.write(leader, "/lin", str(i))[0] == 200
        status, headers, body = cluster.call(follower, "GET", "/v1/keg/lin?linearizable=1")
        assert status == 200 and body == str(i).encode(), (i, body)
    status, _, body = cluster.call(follower, "GET", "/v1/head", headers={"Keg-Consistency": "linearizable"})
    assert status == 200 and json.loads(body)["revision"] == 21


def test_a_retried_transaction_id_is_applied_once_with_the_original_answer(cluster):
    leader = cluster.wait_leader()
    follower = followers(cluster, leader)[0]
    tx = json.dumps({"id": "client-7-op-1", "ops": [{"op": "put", "path": "/once", "value": "1"}],
                     "compare": [{"path": "/once", "kid": None}]}).encode()
    first = cluster.call(follower, "POST", "/v1/tx", tx)
    assert first[0] == 200
    # The retry goes to another replica, after the path changed: still the original answer, nothing applied.
    assert cluster.write(leader, "/other", "x")[0] == 200
    second = cluster.call(leader, "POST", "/v1/tx", tx)
    assert second[0] == 200 and json.loads(second[2]) == json.loads(first[2])
    status, headers, _ = cluster.call(leader, "GET", "/v1/head")
    assert json.loads(cluster.call(leader, "GET", "/v1/head")[2])["revision"] == 3
    # The same through a PUT with Idempotency-Key.
    one = cluster.write(follower, "/idem", "a", tx_id="put-1")
    two = cluster.write(leader, "/idem", "a", tx_id="put-1")
    assert one == two and one[0] == 200
    assert cluster.call(leader, "GET", "/v1/log?path=/idem")[2].count(b'"revision"') == 1
    status, answer = cluster.call(leader, "POST", "/v1/tx", json.dumps(
        {"id": "bad\nid", "ops": [{"op": "put", "path": "/x", "value": "1"}]}).encode())[::2]
    assert status == 400 and b"printable" in answer


def test_a_chunk_put_on_a_follower_is_on_a_majority_before_the_answer(cluster):
    leader = cluster.wait_leader()
    follower = followers(cluster, leader)[0]
    data = os.urandom(100_000)
    name = blake3.blake3(data).hexdigest()
    status, _, _ = cluster.call(follower, "PUT", f"/v1/chunks/{name}", data)
    assert status == 201
    holders = [r for r in cluster.replicas
               if os.path.exists(os.path.join(r.keg_path, "keg", "chunks", name[:2], name))]
    assert len(holders) >= 2, holders
    group = [(blake3.blake3(d).hexdigest(), d) for d in (os.urandom(70_000), os.urandom(30_000))]
    status, _, answer = cluster.call(follower, "POST", "/v1/chunks", encode_group(group))
    assert status == 200 and json.loads(answer)["created"] == 2, answer
    for n, _ in group:
        assert sum(os.path.exists(os.path.join(r.keg_path, "keg", "chunks", n[:2], n)) for r in cluster.replicas) >= 2
    # A large value written through a follower: every replica ends up able to read it.
    big = os.urandom(3 << 20)
    status, answer = cluster.call(follower, "PUT", "/v1/keg/big.bin", big)[::2]
    assert status == 200, answer
    cluster.wait_converged()
    for r in cluster.replicas:
        wait_until(lambda: cluster.reads(r, "/big.bin", big), f"big.bin on r{r.index}", timeout=20)


def test_a_stopped_follower_stalls_no_event_loop_while_chunks_travel(cluster):
    """A replica sends chunks to the others, and fetches those it missed, from a child process: with the
    follower the leader asks first stopped (SIGSTOP: its kernel accepts the connection, nobody answers), a
    large value written to the leader waits out that follower (2 s) and goes to the other one, while the
    leader keeps its term and answers every other write at once. Resumed, the stopped follower fetches the
    chunks it missed."""
    leader = cluster.wait_leader()
    stuck, other = sorted(followers(cluster, leader), key=lambda r: r.raft)   # the leader asks in this order
    term = cluster.status(leader)["term"]
    big = os.urandom(3 << 20)
    upload = http.client.HTTPConnection("127.0.0.1", urllib.parse.urlsplit(leader.url).port, timeout=30)
    os.kill(stuck.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        upload.request("PUT", "/v1/keg/big.bin", body=big, headers={"Authorization": f"Bearer {cluster.token}"})
        n = 0
        while time.monotonic() - started < 2.5:   # more than twice the longest election timeout (1 s)
            n += 1
            t = time.monotonic()
            status, answer = cluster.write(leader, f"/notes/during-upload-{n}", "still serving\n")
            assert status == 200 and time.monotonic() - t < 1.0, (status, answer, time.monotonic() - t)
            time.sleep(0.1)
        response = upload.getresponse()
        answer = response.read()
        assert response.status == 200, answer
        assert time.monotonic() - started >= 1.9   # it did wait for the stopped follower, then asked the other
        now = cluster.status(other)
        assert (now["leader"], now["term"]) == (leader.raft, term), now
        # The other follower holds the chunks (it made the majority); a linearizable read waits until it
        # applied the commit too, which it may learn of a little after the leader answered.
        assert cluster.call(other, "GET", "/v1/keg/big.bin?linearizable=1")[2] == big
    finally:
        upload.close()
        os.kill(stuck.proc.pid, signal.SIGCONT)

    def has_big() -> bool:
        try:   # cut after the headers until the chunks are there (see the test above)
            return cluster.call(stuck, "GET", "/v1/keg/big.bin")[2] == big
        except (OSError, http.client.HTTPException):
            return False

    # (Resumed, it may start one election: pysyncobj has no pre-vote, docs/operations-raft.md, Limits.)
    wait_until(has_big, "the resumed follower's fetch of the chunks", timeout=20)


def _frame(payload: bytes) -> bytes:
    return struct.pack("i", len(payload)) + payload


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_an_unauthenticated_peer_gets_nothing_executed_and_changes_nothing(cluster, tmp_path):
    leader = cluster.wait_leader()
    before = json.loads(cluster.call(leader, "GET", "/v1/head")[2])
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Evil(str(marker)), protocol=2)
    fake_entries = pickle.dumps({"type": "append_entries", "term": 10 ** 6, "commit_index": 10 ** 6,
                                 "entries": [], "prevLogIdx": 1, "prevLogTerm": 0}, protocol=2)
    for r in cluster.replicas:
        host, port = r.raft.rsplit(":", 1)
        for payload in (zlib.compress(evil), evil, zlib.compress(fake_entries), b"\x00" * 64):
            with socket.create_connection((host, int(port)), timeout=2) as s:
                s.sendall(_frame(payload) * 3)
                s.settimeout(2)
                try:
                    while s.recv(4096):
                        pass  # the replica closes the connection
                except (ConnectionError, socket.timeout):
                    pass
    time.sleep(0.5)
    assert not marker.exists()
    leader_now = cluster.wait_leader()
    status = cluster.status(leader_now)
    assert status["term"] < 10 ** 6 and status["commit_index"] < 10 ** 6
    after = json.loads(cluster.call(leader_now, "GET", "/v1/head")[2])
    assert after["kid"] == before["kid"]
    assert cluster.write(leader_now, "/still", "works")[0] == 200


def test_keg_master_status_shows_every_replica(cluster):
    cluster.wait_leader()
    assert cluster.write(cluster.replicas[0], "/s", "1")[0] == 200
    cluster.wait_converged()
    done = subprocess.run([*keg_command(), "master", "status", "--url", cluster.replicas[1].url],
                          capture_output=True, text=True, env={**os.environ, "KEG_TOKEN": cluster.token}, timeout=30)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split("\t") == ["URL", "RAFT", "ROLE", "TERM", "COMMIT", "APPLIED", "REVISION", "LAG"]
    rows = [line.split("\t") for line in lines[1:]]
    assert sorted(r[0] for r in rows) == sorted(r.url for r in cluster.replicas)
    assert sorted(r[2] for r in rows) == ["follower", "follower", "leader"]
    assert {r[6] for r in rows} == {"2"} and {r[7] for r in rows} == {"0"}
    cluster.replicas[2].kill()
    done = subprocess.run([*keg_command(), "master", "status", "--url", cluster.replicas[0].url, "--json"],
                          capture_output=True, text=True, env={**os.environ, "KEG_TOKEN": cluster.token}, timeout=30)
    assert done.returncode == 4
    assert any(json.loads(line)["role"] == "unreachable" for line in done.stdout.splitlines())


def test_a_restarted_follower_catches_up_from_the_log(cluster):
    leader = cluster.wait_leader()
    follower = followers(cluster, leader)[0]
    follower.stop()
    for i in range(30):
        assert cluster.write(leader, f"/while-down/{i}", str(i))[0] == 200
    follower.start()
    cluster.wait_converged()
    assert cluster.call(follower, "GET", "/v1/keg/while-down/29")[2] == b"29"


def test_bad_replica_options_say_what_is_wrong(tmp_path):
    keg_dir = str(tmp_path / "k")
    subprocess.run([*keg_command(), "init", "--keg", keg_dir], capture_output=True, check=True)
    base = [*keg_command(), "master", "serve", "--keg", keg_dir, "--listen", "127.0.0.1:17999"]
    cases = [
        (["--raft-self", "127.0.0.1:18000"], "--raft-peers"),
        (["--raft-self", "127.0.0.1:18000", "--raft-peers", "127.0.0.1:18000"], "--raft-password-file"),
        (["--raft-self", "127.0.0.1:18000", "--raft-peers", "127.0.0.1:18001", "--raft-password-file", "/dev/null"],
         "at least 16"),
    ]
    password = tmp_path / "pw"
    password.write_text("x" * 32)
    cases.append((["--raft-self", "127.0.0.1:18000", "--raft-peers", "127.0.0.1:18001",
                   "--raft-password-file", str(password)], "this one (127.0.0.1:18000)"))
    cases.append((["--raft-self", "127.0.0.1:18000", "--raft-peers", "127.0.0.1:18000,banana",
                   "--raft-password-file", str(password)], "is not HOST:PORT"))
    for extra, message in cases:
        done = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=30)
        assert done.returncode != 0 and message in done.stderr, (extra, done.stderr)


def test_pipelined_writes_leave_every_log_whole_and_the_replicas_identical(cluster):
    # Many writers keep several log entries on the way to each follower at once. A follower's answer
    # to an older entry must not send the leader back to repeat newer ones: the follower would cut its
    # log after the repeated entry's predecessor and write it again, applied entries included.
    import threading
    leader = cluster.wait_leader()
    statuses: list = []

    def writer(n):
        for i in range(40):
            statuses.append(cluster.write(leader, f"/pipe/w{n}/k{i}", str(i), timeout=30)[0])
    threads = [threading.Thread(target=writer, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 640
    head = cluster.wait_converged()
    assert all("truncating already-applied" not in r.log() for r in cluster.replicas), \
        [r.log()[-1500:] for r in cluster.replicas]
    cluster.close()
    assert set(git_heads([r.keg_path for r in cluster.replicas])) == {head[2:]}


def test_writes_through_every_replica_at_once_share_log_entries(cluster):
    # A follower forwards its clients' transactions to the leader, which puts them into its own next
    # group: one log entry (one commit) carries writes that came in through different replicas, and
    # each replica answers its own clients from its own apply of that entry.
    import threading
    leader = cluster.wait_leader()
    answers: dict = {}

    def writer(r, n):
        for i in range(25):
            answers[r.index, n, i] = cluster.write(r, f"/mix/r{r.index}w{n}/k{i}", f"{r.index}.{n}.{i}",
                                                   timeout=30, tx_id=f"mix-{r.index}-{n}-{i}")
    threads = [threading.Thread(target=writer, args=(r, n)) for r in cluster.replicas for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [status for status, _ in answers.values()] == [200] * 300, answers
    through = {}
    for (index, _, _), (_, answer) in answers.items():
        through.setdefault(answer["revision"], set()).add(index)
    shared = [rev for rev, replicas in through.items() if len(replicas) > 1]
    assert shared, "no log entry carried writes that came through different replicas"
    assert len(through) < 300  # fewer commits than writes
    # A follower answered only once it had applied the write itself: it reads it back at once.
    follower = followers(cluster, leader)[0]
    status, answer = cluster.write(follower, "/mix/last", "read me", tx_id="mix-last")
    got, headers, body = cluster.call(follower, "GET", "/v1/keg/mix/last")
    assert (status, got, body) == (200, 200, b"read me") and int(headers["keg-revision"]) >= answer["revision"]
    # Retried through the other follower, the same id gets the original answer, applied once.
    again = cluster.write(followers(cluster, leader)[1], "/mix/last", "read me", tx_id="mix-last")
    assert again == (200, answer)
    statuses = [cluster.status(r) for r in cluster.replicas]
    sent = sum(s["forwarded_sent"] for s in statuses)  # a write finding no connection to the leader yet
    assert 0 < sent <= 202 and cluster.status(leader)["forwarded_received"] == sent  # goes via pysyncobj
    head = cluster.wait_converged()
    cluster.close()
    assert set(git_heads([r.keg_path for r in cluster.replicas])) == {head[2:]}
