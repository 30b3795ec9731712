"""The chunk store: byte strings kept once under their blake3 hash (DESIGN §3).

Chunks live beside the git objects, in ``keg/chunks/<first two hex>/<hash>``,
one file each, written atomically and fsynced before a put returns.  A chunk is
checked against its name when it is stored and again when it is read, so a
damaged file is reported, never served.
"""

from __future__ import annotations

import os
import re

import blake3

from keg.errors import BadRequest, CorruptKeg, NotFound
from keg.fsio import write_file_atomic

HASH_RE = re.compile(r"^[0-9a-f]{64}$")


def chunk_hash(data: bytes) -> str:
    """The name of a chunk: its blake3 hash, 64 lowercase hex digits."""
    return blake3.blake3(data).hexdigest()


def check_hash(text: str) -> str:
    """Validate a chunk name.

    Raises:
        BadRequest: ``text`` is not 64 lowercase hex digits.
    """
    if not isinstance(text, str) or not HASH_RE.match(text):
        raise BadRequest(f"{text!r} is not a chunk name: a chunk is named by its blake3 hash, 64 lowercase hex digits")
    return text


class ChunkStore:
    """Chunks of one keg.

    Args:
        keg_path: the keg directory.
        durable: fsync each chunk before ``put`` returns.
    """

    def __init__(self, keg_path: str, durable: bool = True):
        self.root = os.path.join(keg_path, "keg", "chunks")
        self.durable = durable

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name[:2], name)

    def has(self, name: str) -> bool:
        """True when the chunk is stored."""
        return os.path.exists(self._path(check_hash(name)))

    def put(self, name: str, data: bytes) -> bool:
        """Store ``data`` under ``name`` once; returns False when it was already there.

        Raises:
            BadRequest: ``data`` does not hash to ``name``; nothing is stored.
        """
        check_hash(name)
        actual = chunk_hash(data)
        if actual != name:
            raise BadRequest(f"chunk body hashes to {actual}, not to {name}; nothing was stored")
        path = self._path(name)
        if os.path.exists(path):
            return False
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_file_atomic(path, data, durable=self.durable, tmp=f"{path}.tmp{os.getpid()}")
        return True

    def get(self, name: str) -> bytes:
        """The bytes of a chunk, checked against its hash.

        Raises:
            NotFound: no such chunk.
            CorruptKeg: the stored bytes do not match the name.
        """
        check_hash(name)
        try:
            with open(self._path(name), "rb") as f:
                data = f.read()
        except FileNotFoundError as err:
            raise NotFound(f"no chunk {name} in this keg") from err
        if chunk_hash(data) != name:
            raise CorruptKeg(f"chunk {name} is damaged on disk (its bytes hash to {chunk_hash(data)})")
        return data
