"""The write-ahead journal: what makes a transaction durable before git has it.

Each committed group is one record, appended and fdatasync'ed before the
transactions are acknowledged.  A record holds the group's effective ops with
their bytes, the parent and resulting commit ids, time and author: replaying it
on the parent revision rebuilds the same git objects and the same commit id,
which the replay checks.  A checkpoint writes the objects into a git pack,
moves the ref, and empties the journal.

Record layout (little-endian)::

    b"KJ" version(1 byte) reserved(1 byte) payload_len(u32) crc32(u32)
    payload = meta JSON (UTF-8) b"\\n" value bytes...

A record that is cut short or fails its CRC ends the journal: it was never
acknowledged, because acknowledgement waits for the fdatasync of the whole
record.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass

from keg.errors import CorruptKeg
from keg.fsio import fsync_dir

HEADER = struct.Struct("<2sBBII")
MAGIC = b"KJ"
VERSION = 1
SEGMENT = "current.log"


@dataclass(frozen=True)
class Record:
    """One committed group as the journal keeps it."""

    revision: int
    parent: bytes | None
    commit: bytes
    time: int
    author: tuple
    message: str
    ops: tuple  # ("put", path, mode, data) | ("delete", path, recursive)

    def encode(self) -> bytes:
        """The record's bytes, header included."""
        meta_ops, blobs = [], []
        for op in self.ops:
            if op[0] == "put":
                meta_ops.append(["put", op[1], op[2], len(op[3])])
                blobs.append(op[3])
            else:
                meta_ops.append(["delete", op[1], bool(op[2])])
        meta = {
            "rev": self.revision,
            "parent": self.parent.hex() if self.parent else None,
            "commit": self.commit.hex(),
            "time": self.time,
            "author": list(self.author),
            "message": self.message,
            "ops": meta_ops,
        }
        payload = json.dumps(meta, separators=(",", ":")).encode("utf-8") + b"\n" + b"".join(blobs)
        return HEADER.pack(MAGIC, VERSION, 0, len(payload), zlib.crc32(payload)) + payload

    @classmethod
    def decode(cls, payload: bytes) -> "Record":
        """Rebuild a record from its payload (header already checked)."""
        nl = payload.index(b"\n")
        meta = json.loads(payload[:nl])
        pos, ops = nl + 1, []
        for op in meta["ops"]:
            if op[0] == "put":
                size = op[3]
                ops.append(("put", op[1], op[2], payload[pos:pos + size]))
                pos += size
            else:
                ops.append(("delete", op[1], op[2]))
        parent = bytes.fromhex(meta["parent"]) if meta["parent"] else None
        return cls(meta["rev"], parent, bytes.fromhex(meta["commit"]), meta["time"],
                   tuple(meta["author"]), meta["message"], tuple(ops))


class Journal:
    """An append-only journal file in ``directory``, owned by the writer process."""

    def __init__(self, directory: str, durable: bool = True):
        self.directory = directory
        self.durable = durable
        self.path = os.path.join(directory, SEGMENT)
        self._fd = None
        self.size = 0
        self._broken = None

    def _open(self):
        if self._fd is None:
            os.makedirs(self.directory, exist_ok=True)
            existed = os.path.exists(self.path)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self.size = os.fstat(self._fd).st_size
            if not existed and self.durable:
                fsync_dir(self.directory)
        return self._fd

    def append(self, record: Record, sync: bool = True) -> None:
        """Append one record and make it durable; only then may it be acknowledged.

        ``sync`` False leaves it to the kernel: for a caller whose own log (a
        replicated master's Raft log) already holds the change durably and
        replays what a crash takes from here.

        Raises:
            OSError: the record could not be written or synced; it was cut off again.
            CorruptKeg: an earlier failure could not be undone; reopen the keg.
        """
        if self._broken:
            raise CorruptKeg(f"the journal {self.path} failed earlier ({self._broken}); "
                             "no write is accepted until the keg is reopened")
        data = record.encode()
        fd = self._open()
        start = self.size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if self.durable and sync:
                os.fdatasync(fd)
        except OSError as err:
            # The record was never acknowledged and must not come back at replay, where it
            # would shadow the next record of the same revision: cut it off, or stop writing.
            try:
                os.ftruncate(fd, start)
                if self.durable:
                    os.fsync(fd)
            except OSError as undo:
                self._broken = f"{err}; then {undo}"
            else:
                # After a failed fsync the kernel may have dropped dirty pages: trust nothing more.
                self._broken = str(err) if self.durable else None
            raise
        self.size += len(data)

    def read(self):
        """All intact records, in order, and the byte offset where intact data ends."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return [], 0
        records, pos = [], 0
        while pos + HEADER.size <= len(data):
            magic, version, _, length, crc = HEADER.unpack_from(data, pos)
            if magic != MAGIC or version != VERSION:
                break
            payload = data[pos + HEADER.size:pos + HEADER.size + length]
            if len(payload) != length or zlib.crc32(payload) != crc:
                break
            try:
                records.append(Record.decode(payload))
            except (ValueError, KeyError, IndexError) as err:
                raise CorruptKeg(f"journal {self.path} has a record at byte {pos} that passes its "
                                 f"checksum but cannot be read: {err}") from err
            pos += HEADER.size + length
        return records, pos

    def truncate(self, size: int) -> None:
        """Cut a torn tail (never acknowledged) off the journal."""
        self.close()
        with open(self.path, "r+b") as f:
            f.truncate(size)
            if self.durable:
                os.fsync(f.fileno())

    def reset(self) -> None:
        """Empty the journal after a checkpoint made its records redundant."""
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return
        if self.durable:
            fsync_dir(self.directory)
        self.size = 0

    def close(self) -> None:
        """Close the file; the journal reopens on the next append."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
