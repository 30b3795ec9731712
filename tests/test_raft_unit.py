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
from master.raft import (RaftConfigError, decode_group, encode_group, encode_tx, parse_peers, peer_token)
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
