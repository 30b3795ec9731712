"""How the replicas' Raft messages look on the wire: one AEAD per message, nothing compressed (DESIGN §4).

pysyncobj frames a message as ``length | Fernet(zlib(pickle(message), 3))``
and unpickles only what the Fernet token authenticates; each connection
starts with an exchange of random keys that every later message carries,
and a token older than the last one on its connection is refused (its
defence against replay).  Keg keeps that framing, the pickling behind
authentication and the key exchange, and changes the two costs that
dominate a replica's per-message work (measured here: zlib level 3 20–60 µs
a message, Fernet 12–56 µs to seal and 11–112 µs to open, for 0.3–20 KB):

``StoredZlib``
    The "compressor" pysyncobj calls (``use_stored_zlib``): a zlib stream of
    stored (uncompressed) blocks, built without running deflate, which
    pysyncobj's ``zlib.decompress`` reads unchanged.  Raft entries are small
    transaction groups on a cluster network; compressing them bought nothing.

``WireCipher``
    The "encryptor" pysyncobj calls: AES-256-GCM.  A frame is
    ``MAGIC | salt (16) | counter (8) | timestamp (8) | ciphertext | tag``.
    Each process draws a random salt when it starts and seals with the key
    ``HKDF(master, salt)``, the nonce being its message counter, so no nonce
    repeats under a key; the header is the associated data (the timestamp
    pysyncobj checks is authenticated).  The master key is PBKDF2 of the
    cluster password.  A forked child draws a salt of its own before it
    seals anything, so parent and child never share a nonce under one key.

A replica of this format and one of pysyncobj's Fernet format cannot
connect: each side of a connection must read the other's first frame (the
random key exchange).  docs/operations-raft.md, "Upgrades", says how to
upgrade a cluster.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import struct
import zlib

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pysyncobj import tcp_connection as _tcp_connection

MAGIC = b"KW1"
HEADER = struct.Struct(">3s16sQQ")      # magic, sender salt, message counter, timestamp
PBKDF2_SALT = b"keg raft wire v1"
PBKDF2_ROUNDS = 100_000                 # as pysyncobj's own key derivation: once per process start
MAX_KEYS = 64                           # senders' keys a replica keeps (one per peer process start)
STORED_BLOCK = 65535                    # the most a stored deflate block holds


class StoredZlib:
    """Stands in for the ``zlib`` module in pysyncobj's connection code: stored blocks out, any stream in."""

    @staticmethod
    def compress(data: bytes, level: int = -1) -> bytes:
        """A zlib stream of ``data`` in stored blocks (``level`` is ignored)."""
        parts = [b"\x78\x01"]
        if not data:
            parts.append(b"\x01\x00\x00\xff\xff")
        for start in range(0, len(data), STORED_BLOCK):
            block = data[start:start + STORED_BLOCK]
            final = 1 if start + STORED_BLOCK >= len(data) else 0
            parts.append(struct.pack("<BHH", final, len(block), len(block) ^ 0xFFFF))
            parts.append(block)
        parts.append(struct.pack(">I", zlib.adler32(data)))
        return b"".join(parts)

    decompress = staticmethod(zlib.decompress)


def use_stored_zlib() -> None:
    """Make pysyncobj's connections send stored zlib streams (for the process: its module reads ``zlib``)."""
    _tcp_connection.zlib = StoredZlib


class WireCipher:
    """AES-256-GCM frames keyed by the cluster password, with pysyncobj's encryptor methods."""

    def __init__(self, password: str):
        self._master = hashlib.pbkdf2_hmac("sha256", password.encode(), PBKDF2_SALT, PBKDF2_ROUNDS)
        self._keys: dict = {}          # salt -> AESGCM, of senders whose frames opened
        self._new_key()

    def _new_key(self) -> None:
        self._pid = os.getpid()
        self._salt = os.urandom(16)
        self._seal = AESGCM(self._derive(self._salt))
        self._counter = itertools.count(1)  # the nonce: never repeats under this process's key

    def _derive(self, salt: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=b"keg raft frame").derive(self._master)

    def encrypt_at_time(self, data: bytes, timestamp: int) -> bytes:
        """Seal ``data`` with ``timestamp`` (authenticated, readable by ``extract_timestamp``)."""
        if os.getpid() != self._pid:
            self._new_key()  # a forked child: the parent's counter goes on under the parent's key
        counter = next(self._counter)
        header = HEADER.pack(MAGIC, self._salt, counter, timestamp)
        return header + self._seal.encrypt(_nonce(counter), data, header)

    def extract_timestamp(self, token: bytes) -> int:
        """The frame's timestamp, unauthenticated until ``decrypt`` succeeds (as Fernet's)."""
        if not token.startswith(MAGIC) or len(token) < HEADER.size:
            raise ValueError("not a Keg Raft frame")
        return HEADER.unpack_from(token)[3]

    def decrypt(self, token: bytes) -> bytes:
        """The data a frame sealed; raises if it was not sealed with this cluster's password, or altered."""
        if not token.startswith(MAGIC) or len(token) < HEADER.size:
            raise ValueError("not a Keg Raft frame")
        _, salt, counter, _ = HEADER.unpack_from(token)
        key = self._keys.get(salt)
        fresh = key is None
        if fresh:
            key = AESGCM(self._derive(salt))
        data = key.decrypt(_nonce(counter), token[HEADER.size:], token[:HEADER.size])
        if fresh:  # kept only once a frame under it opened: forged salts cost a derivation, not memory
            if len(self._keys) >= MAX_KEYS:
                self._keys.pop(next(iter(self._keys)))
            self._keys[salt] = key
        return data


def _nonce(counter: int) -> bytes:
    return b"\0\0\0\0" + struct.pack(">Q", counter)
