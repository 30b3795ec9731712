"""The write-ahead journal: what makes a transaction durable before git has it.

Each committed group is one record, appended and fdatasync'ed before the
transactions are acknowledged.  A record holds the group's effective ops with
their bytes, the parent and resulting commit ids, time and author: replaying it
on the parent revision rebuilds the same git objects and the same commit id,
which the replay checks.  A checkpoint writes the objects into a git pack,
moves the ref, and empties the journal.

A checkpoint made in the background first *seals* the journal: the file is
renamed ``sealed-<revision>.log`` (after an fdatasync, so a sealed segment is
always whole) and new records go to a fresh ``current.log``.  The sealed
segment is removed once the checkpoint holding its revisions is installed;
until then a replay reads the sealed segments in order, then the current one.

Record layout (little-endian)::

    b"KJ" version(1 byte) reserved(1 byte) payload_len(u32) crc32(u32)
    payload = meta JSON (UTF-8) b"\\n" value bytes...

A record that is cut short or fails its CRC ends the journal: it was never
acknowledged, because acknowledgement waits for the fdatasync of the whole
record.

The file is allocated ahead of the records (``PREALLOCATE`` bytes at a time,
zeros that end the journal as a torn record would): a record written into
space the file already has does not change the file's size, so its
fdatasync need not write the inode as well (a third less time per commit
on ext4).  Closing the journal cuts the unused space off again.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass

from keg.errors import CorruptKeg
from keg.fsio import PREALLOCATE, fsync_dir, preallocate

HEADER = struct.Struct("<2sBBII")
MAGIC = b"KJ"
VERSION = 1
SEGMENT = "current.log"
SEALED_PREFIX = "sealed-"


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
        self._unsynced = False
        self._allocated = 0     # the file's size: ``size`` plus zeros allocated ahead
        self._end = None        # where this object's records end, once it has closed the file
        self._preallocate = True

    def _open(self):
        if self._fd is None:
            os.makedirs(self.directory, exist_ok=True)
            existed = os.path.exists(self.path)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
            self.size = self._allocated = os.fstat(self._fd).st_size
            if self._end is not None and self._end < self.size:
                # The zeros allocated ahead are still there (closing could not cut them): the next
                # record goes where the records end, or replay would stop at the zeros before it.
                self.size = self._end
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
            if start + len(data) > self._allocated and self._preallocate:
                self._allocate(fd, start + len(data) + PREALLOCATE)
            view, pos = memoryview(data), start
            while view:
                written = os.pwrite(fd, view, pos)
                view, pos = view[written:], pos + written
            self._allocated = max(self._allocated, pos)
            if self.durable and sync:
                os.fdatasync(fd)
        except OSError as err:
            # The record was never acknowledged and must not come back at replay, where it
            # would shadow the next record of the same revision: cut it off, or stop writing.
            try:
                os.ftruncate(fd, start)
                self._allocated = start
                if self.durable:
                    os.fsync(fd)
            except OSError as undo:
                self._broken = f"{err}; then {undo}"
            else:
                # After a failed fsync the kernel may have dropped dirty pages: trust nothing more.
                self._broken = str(err) if self.durable else None
            raise
        self.size += len(data)
        self._unsynced = self.durable and not sync

    def _allocate(self, fd: int, size: int) -> None:
        if preallocate(fd, self._allocated, size - self._allocated):
            self._allocated = size
        else:
            self._preallocate = False  # a file system without it: records extend the file

    def sealed(self) -> list:
        """Paths of the sealed segments, oldest first."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return [os.path.join(self.directory, n) for n in sorted(names)
                if n.startswith(SEALED_PREFIX) and n.endswith(".log")]

    def read(self):
        """All intact records, sealed segments first, and the byte offset where intact data ends.

        The offset is in the current segment: a torn tail can only be there.

        Raises:
            CorruptKeg: a sealed segment is damaged (it was synced whole before it was sealed).
        """
        self._end = None  # read after taking the write lock: another writer may have appended since
        records = []
        for path in self.sealed():
            with open(path, "rb") as f:
                data = f.read()
            found, pos = self._parse(data, path)
            if data[pos:].strip(b"\0"):  # zeros are space allocated ahead, if the cut was lost
                raise CorruptKeg(f"sealed journal segment {path} is damaged at byte {pos}; it was "
                                 "synced whole before it was sealed, so the disk lost data")
            records += found
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return records, 0
        found, pos = self._parse(data, self.path)
        return records + found, pos

    @staticmethod
    def _parse(data: bytes, path: str):
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
                raise CorruptKeg(f"journal {path} has a record at byte {pos} that passes its "
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
        self._end = None  # the file's size is the end again

    def seal(self, revision: int) -> str:
        """Close the current segment as ``sealed-<revision>.log`` and start a new one; returns its path.

        ``revision`` is the newest revision in the segment.  Records appended
        without sync are synced first, so a sealed segment is whole on disk.
        """
        self.close()
        if self._unsynced and os.path.exists(self.path):
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
            except OSError as err:
                # The kernel may have dropped the pages it failed to write, and a second fdatasync
                # would then succeed over the hole: no more writes until the keg is reopened.
                self._broken = f"syncing it to seal it failed: {err}"
                raise
            finally:
                os.close(fd)
        self._unsynced = False
        sealed = os.path.join(self.directory, f"{SEALED_PREFIX}{revision:012d}.log")
        os.makedirs(self.directory, exist_ok=True)
        if os.path.exists(self.path):
            os.rename(self.path, sealed)
        else:  # nothing was appended since the last seal: an empty segment keeps the bookkeeping simple
            open(sealed, "wb").close()
        if self.durable:
            fsync_dir(self.directory)
        self.size, self._end = 0, None
        return sealed

    def drop_sealed(self, path: str) -> None:
        """Remove a sealed segment whose revisions a checkpoint installed."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        if self.durable:
            fsync_dir(self.directory)

    def reset(self) -> None:
        """Empty the journal, sealed segments too, after a checkpoint made its records redundant."""
        self.close()
        removed = False
        for path in self.sealed() + [self.path]:
            try:
                os.unlink(path)
                removed = True
            except FileNotFoundError:
                pass
        if removed and self.durable:
            fsync_dir(self.directory)
        self.size, self._end = 0, None

    def close(self) -> None:
        """Close the file, without the space allocated ahead; the journal reopens on the next append."""
        if self._fd is not None:
            try:
                if self._allocated > self.size:
                    os.ftruncate(self._fd, self.size)
            finally:
                os.close(self._fd)
                self._fd = None
                self._allocated = self._end = self.size
