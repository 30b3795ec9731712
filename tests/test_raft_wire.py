"""The replicas' Raft frames (master/raft_wire.py): what a peer can read, and what it cannot forge."""

from __future__ import annotations

import os
import pickle
import zlib

import pytest
from pysyncobj.encryptor import getEncryptor

from master.raft_wire import HEADER, StoredZlib, WireCipher

PASSWORD = "a cluster password of some length"


@pytest.mark.parametrize("size", [0, 1, 300, 65534, 65535, 65536, 131070, 200_001])
def test_stored_streams_are_read_by_any_zlib(size):
    data = (os.urandom(97) * (size // 97 + 1))[:size]  # compressible: stored blocks leave it as it is
    stream = StoredZlib.compress(data, 3)
    assert zlib.decompress(stream) == data
    assert len(stream) >= len(data)
    assert StoredZlib.decompress(zlib.compress(data, 3)) == data  # a stock replica's messages still read


def test_a_frame_opens_on_another_replica_with_its_timestamp():
    sender, receiver = WireCipher(PASSWORD), WireCipher(PASSWORD)
    message = pickle.dumps({"type": "append_entries", "entries": [b"x" * 100]})
    frames = [sender.encrypt_at_time(message, 1000 + i) for i in range(3)]
    assert [receiver.extract_timestamp(f) for f in frames] == [1000, 1001, 1002]
    assert all(receiver.decrypt(f) == message for f in frames)
    assert len({HEADER.unpack_from(f)[2] for f in frames}) == 3  # a new nonce for every frame
    assert message not in frames[0]


def test_altered_or_foreign_frames_do_not_open():
    sender, receiver = WireCipher(PASSWORD), WireCipher(PASSWORD)
    frame = sender.encrypt_at_time(b"vote for me", 7)
    for at in (5, HEADER.size - 1, HEADER.size + 2, len(frame) - 1):  # salt, timestamp, body, tag
        altered = bytearray(frame)
        altered[at] ^= 1
        with pytest.raises(Exception):
            receiver.decrypt(bytes(altered))
    with pytest.raises(Exception):
        WireCipher("another cluster's password").decrypt(frame)
    with pytest.raises(Exception):
        receiver.decrypt(frame[:HEADER.size - 4])
    assert receiver.decrypt(frame) == b"vote for me"  # the forgeries left the receiver able to read


def test_frames_of_another_format_are_refused():
    old = getEncryptor(PASSWORD)  # what stock pysyncobj seals with: a replica of it cannot connect
    token = old.encrypt_at_time(zlib.compress(b"from an older replica", 3), 42)
    receiver = WireCipher(PASSWORD)
    for frame in (token, b"KW1" + token[:10], b""):
        with pytest.raises(ValueError):
            receiver.extract_timestamp(frame)
        with pytest.raises(ValueError):
            receiver.decrypt(frame)


def test_a_forked_child_seals_under_a_key_of_its_own():
    cipher, receiver = WireCipher(PASSWORD), WireCipher(PASSWORD)
    parent_frame = cipher.encrypt_at_time(b"parent", 1)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one frame through the pipe, then out without running pytest's teardown
        try:
            os.write(write, cipher.encrypt_at_time(b"child", 1))
        finally:
            os._exit(0)
    os.close(write)
    child_frame = os.read(read, 4096)
    os.close(read)
    os.waitpid(pid, 0)
    parent_next = cipher.encrypt_at_time(b"parent again", 2)
    salt, counter = HEADER.unpack_from(child_frame)[1:3]
    assert salt != HEADER.unpack_from(parent_frame)[1] and counter == 1
    assert HEADER.unpack_from(parent_next)[1:3] == (HEADER.unpack_from(parent_frame)[1], 2)
    assert receiver.decrypt(child_frame) == b"child" and receiver.decrypt(parent_next) == b"parent again"
