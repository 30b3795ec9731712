"""The Raft master's parts without a network: journal durability, log entries, deterministic apply."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import shutil

import pytest

import keg
from keg.transaction import Author, Compare, Delete, Put, Transaction, compare, delete, put
from master.interface import Pending
from master.raft import (RaftConfigError, decode_entry, decode_group, decode_tx, encode_group, encode_tx,
                         join_group, parse_peers, peer_token)
from master.raft_forward import FAILED, FORWARD, REFUSED, Forwarder
from master.raft_journal import RaftJournal


def test_journal_keeps_synced_entries_and_drops_a_torn_tail(tmp_path):
    j = RaftJournal(str(tmp_path / "raft"))
    j.add(b"\x01", 1, 0)
    j.add(b"\x00first", 2, 1)
    j.sync()
    synced = j.synced_size
    j.add(b"\x00second, never synced", 3, 1)
    j._destroy()  # leaves the file at its records' end (without the space allocated ahead)
    size = os.path.getsize(j.path)
    # Power loss: what was not synced may be lost, here cut in the middle of the record.
    with open(j.path, "r+b") as f:
        f.truncate(synced + (size - synced) // 2)
    again = RaftJournal(str(tmp_path / "raft"))
    assert [(e[1], e[2]) for e in again] == [(1, 0), (2, 1)]
    assert again[1][0] == b"\x00first" and os.path.getsize(again.path) == synced
    again.add(b"\x00third", 3, 2)
    again.sync()
    assert [e[1] for e in RaftJournal(str(tmp_path / "raft"))] == [1, 2, 3]


def test_journal_term_and_vote_are_durable_and_commit_index_is_clamped(tmp_path):
    j = RaftJournal(str(tmp_path / "raft"))
    j.add(b"\x01", 1, 0)
    j.setCurrentTerm(7, "10.0.0.2:4001")
    j.setRaftCommitIndex(50)       # a hint past the end of the log
    j.setCurrentTerm(7, "10.0.0.2:4001")
    j.sync()
    again = RaftJournal(str(tmp_path / "raft"))
    assert again.getCurrentTerm() == 7 and again.getVotedForNodeId() == "10.0.0.2:4001"
    assert again.getRaftCommitIndex() == 1


def test_journal_truncation_and_compaction(tmp_path):
    j = RaftJournal(str(tmp_path / "raft"))
    for i in range(1, 11):
        j.add(b"\x00%d" % i, i, 1)
    j.deleteEntriesFrom(7)         # a conflicting suffix from index 8 on
    j.sync()
    j.deleteEntriesTo(3)           # a snapshot covers 1..3
    assert [e[1] for e in j] == [4, 5, 6, 7]
    assert [e[1] for e in RaftJournal(str(tmp_path / "raft"))] == [4, 5, 6, 7]


def test_group_encoding_round_trips_exactly():
    txs = [Transaction((put("/a", b"\x00\xffbinary"), delete("/b", True)), (compare("/a", None),),
                       Author("ann", "ann@x"), "id-1"),
           Transaction((put("/c", "text"),), (), Author(), None)]
    when, back = decode_group(encode_group(txs, 1700000000))
    assert when == 1700000000 and back == txs
    assert b"pickle" not in encode_group(txs, 1) and encode_group(txs, 1) == encode_group(back, 1)


def test_group_encoding_is_sorted_compact_json_and_keeps_every_field():
    # A leader applies the transactions it proposed without decoding them (RaftMaster.apply_entry), so
    # decode(encode(tx)) must give back every field, with its type, or replicas would differ.
    txs = [Transaction((Put('/dir/"quoted"\\é\n', bytes(range(256)), 0o100755, False),
                        Put("/big", b"pointer-bytes", 0o100644, True), Delete("/gone", False),
                        Delete("/tree", True)),
                       (Compare("/dir", "K-" + "ab" * 20), Compare("/absent", None)),
                       Author("Zoë \"z\" O'Neil", "z@example.org"), "retry-ünïcode-1"),
           Transaction((put("/plain", "text"),), (), Author(), None)]
    for tx in txs:
        reference = {"ops": [["delete", o.path, o.recursive] if isinstance(o, Delete)
                             else ["put", o.path, o.mode, base64.b64encode(o.data).decode(), o.large] for o in tx.ops],
                     "compare": [[c.path, c.kid] for c in tx.compares],
                     "author": [tx.author.name, tx.author.email], "id": tx.id}
        assert encode_tx(tx) == json.dumps(reference, separators=(",", ":"), sort_keys=True).encode()
    _, back = decode_group(encode_group(txs, 5))
    assert back == txs
    for tx, again in zip(txs, back):
        for op, op_again in zip(tx.ops, again.ops):
            assert [type(v) for v in dataclasses.astuple(op)] == [type(v) for v in dataclasses.astuple(op_again)]
        assert [type(c.kid) for c in tx.compares] == [type(c.kid) for c in again.compares]


def test_a_group_names_its_forwarded_transactions_and_decodes_them_like_its_own():
    own = Transaction((put("/own", "1"),), (), Author("ann", "ann@x"), None)
    sent = Transaction((put("/sent", "2"), delete("/old", False)), (compare("/sent", None),), Author("bob", "b@x"), "t-9")
    origins = [[1, "10.0.0.2:4001/0a1b2c3d4e5f", 7]]
    payload = join_group([encode_tx(own), encode_tx(sent)], 1700000000, origins)
    assert json.loads(payload) == {"from": origins, "time": 1700000000, "v": 1,
                                   "txs": [json.loads(encode_tx(own)), json.loads(encode_tx(sent))]}
    assert list(json.loads(payload)) == sorted(json.loads(payload))  # the key order json.dumps sorts to
    assert decode_entry(payload) == (1700000000, [own, sent], origins)
    assert decode_group(payload) == (1700000000, [own, sent])
    # The commit is made from the transactions only: without forwarding the entry is the old format.
    assert join_group([encode_tx(own)], 5, []) == encode_group([own], 5) and b"from" not in encode_group([own], 5)
    assert decode_tx(encode_tx(sent)) == sent
    for bad in (b"[1]", b"{}", b'{"ops":[],"compare":[],"author":["a","b"],"id":null}', b"not json", 3):
        with pytest.raises(ValueError):
            decode_tx(bad)


class _Transport:
    def __init__(self, up=True):
        self.up, self.sent = up, []

    def send(self, node, message):
        self.sent.append((node, message))
        return self.up


@dataclasses.dataclass(frozen=True)
class _Node:
    address: str


def _pending(text):
    return Pending(Transaction((put("/" + text, text),)), None)


def test_a_forwarded_transaction_is_answered_once_and_only_by_the_replica_that_sent_it():
    follower, other = Forwarder("f:1", decode_tx), Forwarder("f:1", decode_tx)  # the same replica after a restart
    assert follower.origin != other.origin and follower.origin.startswith("f:1/")
    leader, transport = _Node("l:1"), _Transport()
    a, b = _pending("a"), _pending("b")
    assert follower.send(transport, leader, [(a, encode_tx(a.tx)), (b, encode_tx(b.tx))])
    (_, message), = transport.sent
    assert message["type"] == FORWARD and [seq for seq, _ in message["txs"]] == [1, 2]

    receiver = Forwarder("l:1", decode_tx)
    assert receiver.receive(_Node("f:1"), message) == []
    incoming = receiver.take_incoming()
    assert [i.tx for i in incoming] == [a.tx, b.tx] and receiver.incoming == [] and receiver.received == 2

    results = [object(), object(), object()]
    other.answered([[1, follower.origin, 1]], results)       # not its own: nothing happens
    follower.answered([[0, "l:1/xyz", 1], [2, follower.origin, 2]], results)
    assert not a.done and b.result is results[2] and list(follower.waiting) == [1]
    follower.answered([[1, follower.origin, 1], [2, follower.origin, 2]], results)
    assert a.result is results[1] and b.result is results[2] and follower.waiting == {}


def test_refusals_failures_and_a_new_leader_each_end_a_forwarded_transaction():
    follower, transport = Forwarder("f:1", decode_tx), _Transport()
    pendings = [_pending(t) for t in "abcd"]
    follower.send(transport, _Node("l:1"), [(p, encode_tx(p.tx)) for p in pendings])
    assert follower.take({"type": REFUSED, "origin": "f:1/old", "seqs": [1]}) == []   # for an earlier start
    assert follower.take({"type": REFUSED, "origin": follower.origin, "seqs": [1]}) == pendings[:1]
    assert follower.take({"type": FAILED, "origin": follower.origin, "seqs": [2, 2, 99]}) == pendings[1:2]
    assert follower.abandon("l:1") == []                      # the same leader: they still wait
    assert follower.abandon("l:2") == pendings[2:] and follower.waiting == {}
    # A connection that is down sends nothing and leaves nothing waiting.
    assert not follower.send(_Transport(up=False), _Node("l:2"), [(pendings[0], b"{}")]) and follower.waiting == {}
    # The leader answers malformed transactions by their sequence number, and queues the rest.
    receiver = Forwarder("l:1", decode_tx)
    bad = receiver.receive(_Node("f:1"), {"type": FORWARD, "origin": follower.origin,
                                          "txs": [[5, b"garbage"], [6, encode_tx(pendings[0].tx)], "x"]})
    assert [seq for seq, _ in bad] == [5, None] and [i.seq for i in receiver.incoming] == [6]
    told = _Transport()
    Forwarder.tell(told, FAILED, receiver.take_incoming(), "the leader changed")
    assert told.sent == [(_Node("f:1"), {"type": FAILED, "origin": follower.origin, "seqs": [6],
                                        "reason": "the leader changed"})]


def test_same_groups_make_byte_identical_commits_on_two_replicas(tmp_path):
    first = str(tmp_path / "r1")
    keg.init(first, durable=False).close()
    shutil.copytree(first, str(tmp_path / "r2"))
    groups = [([Transaction((put(f"/g{g}/k{i}", f"{g}.{i}"),), (), Author(f"u{i}", f"u{i}@x")) for i in range(3)],
               1700000000 + g) for g in range(5)]
    heads = []
    for name in ("r1", "r2"):
        store = keg.Store(str(tmp_path / name), durable=False)
        for txs, when in groups:
            _, decoded = decode_group(encode_group(txs, when))
            store.commit(decoded, when=when, trailers=(f"Keg-Raft-Index: {when}",), check_chunks=False)
        heads.append([store.revision(n).kid for n in range(1, store.head_revision + 1)])
        store.close()
    assert heads[0] == heads[1] and len(heads[0]) == 6


def test_failed_transactions_leave_no_id_in_the_commit(tmp_path):
    store = keg.init(str(tmp_path / "k"), durable=False)
    results = store.commit([Transaction((put("/x", "1"),), (), Author(), "ok-1"),
                            Transaction((put("/y", "1"),), (compare("/x", None),), Author(), "failed-1")])
    assert results[0].ok and not results[1].ok
    message = store.revision().message
    assert "Keg-Transaction: ok-1" in message and "failed-1" not in message
    store.close()


def test_peers_are_parsed_with_clear_errors():
    peers = parse_peers("10.0.0.1:4001,10.0.0.2:4001=http://10.0.0.2:9000,10.0.0.3:4001",
                        "10.0.0.1:4001", "http://10.0.0.1:7480")
    assert [p.url for p in peers] == ["http://10.0.0.1:7480", "http://10.0.0.2:9000", "http://10.0.0.3:7480"]
    with pytest.raises(RaftConfigError, match="this one"):
        parse_peers("10.0.0.2:4001", "10.0.0.1:4001", "http://10.0.0.1:7480")
    with pytest.raises(RaftConfigError, match="HOST:PORT"):
        parse_peers("10.0.0.1:4001,nonsense", "10.0.0.1:4001", "http://10.0.0.1:7480")
    with pytest.raises(RaftConfigError, match="twice"):
        parse_peers("10.0.0.1:4001,10.0.0.1:4001", "10.0.0.1:4001", "http://10.0.0.1:7480")
    assert peer_token("a" * 20) != peer_token("b" * 20)


def test_journal_space_allocated_ahead_reads_as_the_end_of_the_log(tmp_path):
    j = RaftJournal(str(tmp_path / "raft"))
    for i in range(1, 4):
        j.add(b"\x00entry %d" % i, i, 1)
    j.sync()
    written = j.synced_size
    assert os.path.getsize(j.path) > written  # zeros allocated ahead: a sync does not change the size
    os.close(j._fd)  # a crash: nothing cuts the zeros off
    again = RaftJournal(str(tmp_path / "raft"))
    assert [e[1] for e in again] == [1, 2, 3] and os.path.getsize(again.path) == written
    again.add(b"\x00entry 4", 4, 2)
    again.sync()
    assert [e[1] for e in RaftJournal(str(tmp_path / "raft"))] == [1, 2, 3, 4]
