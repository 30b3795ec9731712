"""What Raft needs on disk, fsynced, and the seams by which pysyncobj uses it (DESIGN §4, §1.7).

pysyncobj's own ``FileJournal`` writes its log through mmap and never
fsyncs it, and stores the term and vote without fsync (its issues #84, #201;
PR #202); a crash can then leave the commit index past the journal (PR #197).
This module replaces it:

``RaftJournal``
    The log as an append-only file of records, each ``len idx term crc32``
    then the command bytes, allocated ahead (zeros, which read as the end:
    no entry has index 0) so that a sync does not write the file's size.
    ``add`` only writes; ``sync`` fdatasyncs.  The
    rule that makes it safe is kept by the master, not by callers being
    careful: **no acknowledgement or vote leaves the replica, no commit index
    is computed and nothing is applied while a log write is unsynced**
    (``SyncingTransport.send``, ``RaftMaster._tick`` and the apply path call
    ``sync`` first).  So a follower never acknowledges an entry, and a leader
    never counts itself towards a majority, before the entry is on disk; a
    leader's entries alone may leave before its own sync.  A
    record cut short by a crash ends the log; it was never acknowledged.
    The term and vote (``raft.meta``) are written atomically and fsynced
    before ``setCurrentTerm`` returns, i.e. before the vote is sent.  The
    commit index is only a hint: it is stored with the term, and clamped to
    the end of the log when read back.

``EpollPoller``
    pysyncobj's socket poller over one epoll object, whose descriptor the
    master's asyncio loop watches: the library runs on the server's one
    thread, ticked by the loop (``autoTick`` off), starting no thread.

``SyncingTransport``
    pysyncobj's TCP transport with the sync-before-send rule.

pysyncobj builds its journal, poller and encryptor inside
``SyncObj.__init__`` with module-level factories and offers no parameter for
any; ``seams`` swaps those factories for the duration of one constructor
call.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import struct
import zlib

from pysyncobj import syncobj as _syncobj
from pysyncobj.journal import Journal
from pysyncobj.poller import POLL_EVENT_TYPE, Poller
from pysyncobj.transport import TCPTransport

from keg.errors import CorruptKeg
from keg.fsio import PREALLOCATE, fsync_dir, make_dirs, preallocate, write_file_atomic

RECORD = struct.Struct("<IQQI")     # command length, index, term, crc32 of the command
LOG_NAME = "raft.log"
META_NAME = "raft.meta"


class RaftJournal(Journal):
    """The Raft log and the term/vote, durable (see the module's docstring).

    Args:
        directory: where ``raft.log`` and ``raft.meta`` live (created).
        durable: fsync; off only in tests that measure nothing about crashes.
    """

    def __init__(self, directory: str, durable: bool = True):
        make_dirs(directory, durable)  # keg/raft is made on a first start, inside a keg/ nothing else fsyncs
        self.directory = directory
        self.durable = durable
        self.path = os.path.join(directory, LOG_NAME)
        self.meta_path = os.path.join(directory, META_NAME)
        self._entries: list = []       # (command, index, term)
        self._offsets: list = []       # file offset of each entry's record
        self._dirty = False
        self.synced_size = 0           # bytes of the log known to be on disk (tests use it)
        self.syncs = 0
        self._meta = self._read_meta()
        existed = os.path.exists(self.path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        if not existed and durable:
            fsync_dir(directory)  # the name too: fdatasync of the file would not keep it after a power cut
        self._allocated = 0            # the file's size: the records, then zeros allocated ahead
        self._preallocate = True
        self._load()

    # ---------------------------------------------------------------- files

    def _read_meta(self) -> dict:
        try:
            with open(self.meta_path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return {}
        except ValueError as err:
            raise CorruptKeg(f"{self.meta_path} is damaged ({err}); it was written atomically, "
                             "so the disk lost it: restore the replica from another one") from err

    def _write_meta(self) -> None:
        write_file_atomic(self.meta_path, json.dumps(self._meta, sort_keys=True).encode(), durable=self.durable)

    def _load(self) -> None:
        size = os.fstat(self._fd).st_size
        data = os.pread(self._fd, size, 0) if size else b""
        pos = 0
        while pos + RECORD.size <= len(data):
            length, index, term, crc = RECORD.unpack_from(data, pos)
            if index == 0:
                break  # space allocated ahead: the end of the log
            end = pos + RECORD.size + length
            if end > len(data):
                break
            command = data[pos + RECORD.size:end]
            if zlib.crc32(command) != crc:
                break
            if self._entries and index != self._entries[-1][1] + 1:
                raise CorruptKeg(f"{self.path}: entry {index} follows entry {self._entries[-1][1]}")
            self._entries.append((command, index, term))
            self._offsets.append(pos)
            pos = end
        if data[pos:].strip(b"\0"):
            # A record the crash cut short: never synced, so never acknowledged.
            os.ftruncate(self._fd, pos)
            self._fsync()
        elif pos != len(data):
            os.ftruncate(self._fd, pos)  # only zeros allocated ahead: nothing to make durable
        self.synced_size = self._allocated = pos

    def _fsync(self) -> None:
        if self.durable:
            os.fdatasync(self._fd)
            self.syncs += 1

    def _end(self) -> int:
        if not self._entries:
            return 0
        return self._offsets[-1] + RECORD.size + len(self._entries[-1][0])

    def sync(self) -> None:
        """Make every ``add`` and truncation so far durable (cheap when there is none)."""
        if self._dirty:
            self._fsync()
            self._dirty = False
            self.synced_size = self._end()

    # ------------------------------------------------------ Journal interface

    def add(self, command, idx, term):
        command = command if isinstance(command, bytes) else bytes(command, "utf-8")
        offset = self._end()
        record = RECORD.pack(len(command), idx, term, zlib.crc32(command)) + command
        if offset + len(record) > self._allocated:
            self._allocate(offset + len(record))
        os.pwrite(self._fd, record, offset)
        self._entries.append((command, idx, term))
        self._offsets.append(offset)
        self._dirty = True

    def _allocate(self, needed: int) -> None:
        if self._preallocate and preallocate(self._fd, self._allocated, needed + PREALLOCATE - self._allocated):
            self._allocated = needed + PREALLOCATE
        else:
            self._preallocate = False   # a file system without it: records extend the file
            self._allocated = needed

    def clear(self):
        self._entries, self._offsets = [], []
        os.ftruncate(self._fd, 0)
        self._allocated = 0
        self._dirty = True

    def deleteEntriesFrom(self, entryFrom):
        if entryFrom >= len(self._entries):
            return
        cut = self._offsets[entryFrom]
        del self._entries[entryFrom:]
        del self._offsets[entryFrom:]
        os.ftruncate(self._fd, cut)
        self._allocated = cut
        self._dirty = True

    def deleteEntriesTo(self, entryTo):
        """Drop the entries before ``entryTo`` (after a snapshot): the log is rewritten beside and renamed."""
        keep = self._entries[entryTo:]
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        offsets, pos = [], 0
        chunks = []
        for command, index, term in keep:
            offsets.append(pos)
            record = RECORD.pack(len(command), index, term, zlib.crc32(command)) + command
            chunks.append(record)
            pos += len(record)
        os.pwrite(fd, b"".join(chunks), 0)
        if self.durable:
            os.fsync(fd)
        os.replace(tmp, self.path)
        if self.durable:
            fsync_dir(self.directory)
        os.close(self._fd)
        self._fd = fd
        self._entries, self._offsets = list(keep), offsets
        self._dirty = False
        self.synced_size = self._allocated = pos

    def __getitem__(self, item):
        return self._entries[item]

    def __len__(self):
        return len(self._entries)

    def _destroy(self):
        self.sync()
        self._meta["commit_index"] = self._meta_commit_index()
        if self._fd is not None:
            if self._allocated > self._end():
                os.ftruncate(self._fd, self._end())   # the space allocated ahead
            os.close(self._fd)
            self._fd = None

    def _meta_commit_index(self) -> int:
        return self._meta.get("commit_index", 1)

    def setRaftCommitIndex(self, raftCommitIndex):
        # A hint only: it is written with the next term change, never fsynced on its own.
        self._meta["commit_index"] = raftCommitIndex

    def getRaftCommitIndex(self):
        last = self._entries[-1][1] if self._entries else 1
        return max(1, min(self._meta_commit_index(), last))

    def setCurrentTerm(self, term, votedForNodeId):
        self._meta["term"] = term
        self._meta["voted_for"] = votedForNodeId
        self._write_meta()  # fsynced before pysyncobj sends the vote or the vote request

    def getCurrentTerm(self):
        return self._meta.get("term", 0)

    def getVotedForNodeId(self):
        return self._meta.get("voted_for")

    def onOneSecondTimer(self):
        pass


class EpollPoller(Poller):
    """pysyncobj's poller interface over one epoll object, whose ``fileno`` an asyncio loop can watch."""

    def __init__(self):
        self._epoll = select.epoll()
        self._callbacks: dict = {}
        self.handled = 0               # socket events the last poll handled (the master ticks again if any)

    def fileno(self) -> int:
        """The epoll descriptor: readable whenever a socket pysyncobj watches has an event."""
        return self._epoll.fileno()

    @staticmethod
    def _mask(event_mask: int) -> int:
        mask = 0
        if event_mask & POLL_EVENT_TYPE.READ:
            mask |= select.EPOLLIN
        if event_mask & POLL_EVENT_TYPE.WRITE:
            mask |= select.EPOLLOUT
        if event_mask & POLL_EVENT_TYPE.ERROR:
            mask |= select.EPOLLERR | select.EPOLLHUP
        return mask

    def subscribe(self, descr, callback, eventMask):
        fd = descr if isinstance(descr, int) else descr.fileno()
        if fd in self._callbacks:
            self._epoll.modify(fd, self._mask(eventMask))
        else:
            self._epoll.register(fd, self._mask(eventMask))
        self._callbacks[fd] = callback

    def unsubscribe(self, descr):
        fd = descr if isinstance(descr, int) else descr.fileno()
        if self._callbacks.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass  # already closed: the kernel dropped it from the set

    def poll(self, timeout):
        self.handled = 0
        try:
            events = self._epoll.poll(max(0.0, timeout))
        except InterruptedError:
            return
        self.handled = len(events)
        for fd, mask in events:
            callback = self._callbacks.get(fd)
            if callback is None:
                continue
            kind = 0
            if mask & select.EPOLLIN:
                kind |= POLL_EVENT_TYPE.READ
            if mask & select.EPOLLOUT:
                kind |= POLL_EVENT_TYPE.WRITE
            if mask & (select.EPOLLERR | select.EPOLLHUP):
                kind |= POLL_EVENT_TYPE.ERROR
            callback(fd, kind)

    def close(self) -> None:
        """Release the epoll descriptor."""
        self._epoll.close()


class SyncingTransport(TCPTransport):
    """pysyncobj's TCP transport that syncs the journal before a message leaves, but a leader's own.

    A leader's ``append_entries`` may leave before its own log is synced
    (Raft allows it, thesis §10.2.1): the leader does not count itself
    towards a majority until it is (``RaftMaster._tick`` syncs before every
    tick, where pysyncobj computes the commit index); so may its answer
    saying where it put a follower's forwarded command, and the messages
    that forward transactions (master/raft_forward.py), which say nothing
    about the log.  Every other message, a follower's acknowledgement and a
    vote above all, waits for the sync.
    """

    def send(self, node, message):
        journal = getattr(self._syncObj, "keg_journal", None)
        kind = message.get("type")
        # Neither a leader's entries nor its "your command is at index i, term t" need its own log on
        # disk first: a follower acts on neither as on an acknowledgement (an entry lost in a leader's
        # crash is replaced in a higher term, and the follower's command is then reported discarded).
        if journal is not None and kind not in ("append_entries", "apply_command_response") \
                and not (kind or "").startswith("keg_forward"):  # writes a follower forwards, and answers
            journal.sync()
        if kind == "apply_command_response" and "log_idx" in message:
            # The leader placed a follower's forwarded command at log_idx: the follower answers its
            # client once it hears that index is committed, so the master says so without delay.
            self._syncObj.forwarded_upto = max(getattr(self._syncObj, "forwarded_upto", 0), message["log_idx"])
        return super().send(node, message)


@contextlib.contextmanager
def seams(journal: RaftJournal, poller: EpollPoller, cipher=None):
    """Make the next ``SyncObj(...)`` use ``journal``, ``poller`` and ``cipher`` (see the module's docstring).

    ``cipher`` stands in for the Fernet encryptor pysyncobj would derive from
    the password (``master/raft_wire.py``); None keeps pysyncobj's.
    """
    saved = _syncobj.createJournal, _syncobj.createPoller, _syncobj.getEncryptor
    _syncobj.createJournal = lambda _file=None: journal
    _syncobj.createPoller = lambda _kind="auto": poller
    if cipher is not None:
        _syncobj.getEncryptor = lambda _password: cipher
    try:
        yield
    finally:
        _syncobj.createJournal, _syncobj.createPoller, _syncobj.getEncryptor = saved
