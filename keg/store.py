"""The Keg store: a versioned, transactional namespace in a bare git repository.

On disk a keg is a bare git repository (stock ``git log``, ``git show`` and
``git fsck`` work on it) plus Keg's own files under ``keg/``:

``keg/config.json``   format version and settings
``keg/chunks/``       chunks of large values, by blake3 (``keg.chunks``)
``keg/journal/``      the write-ahead journal (``keg.journal``)
``keg/revs``          revision number -> commit id, 20 bytes per revision
``keg/write.lock``    held (flock) by the one process that writes

The namespace is the tree of ``refs/heads/main``.  Revision *n* is the *n*-th
commit on its first-parent chain, recorded in the commit as ``Keg-Revision: n``.

Writes: a group of transactions is applied to a ``Staging`` of the newest
tree, objects are hashed in memory, and one journal record is fsynced; then the
group is acknowledged.  A checkpoint (every ``checkpoint_revisions`` revisions,
``checkpoint_bytes`` of new objects, or on ``close``) writes the objects as a
pack, moves the ref, and empties the journal.  After a crash the next writer
replays the journal, so an acknowledged transaction is never lost.

A server that commits for many clients (the master) opens the store with
``background_checkpoints``: a scheduled checkpoint then seals the journal and
forks a child that compresses and writes the pack on another core while
commits go on; the writer installs it (revision index, ref, sealed journal
segment dropped) at a later commit or ``poll_checkpoint``.  Without it, or
while the process runs threads (forking one is unsafe), the checkpoint runs
inside the commit that reaches it.  Past ``PACKS_BEFORE_REPACK`` packs a
checkpoint starts ``git repack --geometric=2``; with background checkpoints
it runs beside the commits, and ``poll_checkpoint`` or ``close`` ends it.

Other processes may read at any time; they see the newest checkpoint.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import io
import fcntl
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections import OrderedDict
from fnmatch import fnmatchcase

import pygit2

import kid as kidlib
from keg import paths, sources
from keg.chunks import ChunkStore
from keg.delta import apply_delta, make_delta
from keg.errors import (AmbiguousKid, BadRequest, CompareFailed, CorruptKeg, KegBusy, KegError, MissingObject,
                        NotFound)
from keg.fsio import make_dirs, sync_tree, write_file_atomic
from keg.journal import Journal, Record
from keg.large import DEFAULT_THRESHOLD, MARKER, Chain, LargeReader, Pointer, ingest, is_pointer, read_full
from keg.records import Entry, Event, Revision  # noqa: F401 - part of keg.store's interface
from keg.objects import (EMPTY_TREE, EMPTY_TREE_OID, MODE_BLOB, MODE_EXEC, MODE_GITLINK, MODE_TREE, OBJ_BLOB,
                         OBJ_COMMIT, OBJ_TREE, Commit, Person, Tree, kind_of_mode, object_id)
from keg.pack import write_pack
from keg.staging import Staging
from keg.transaction import Author, Delete, Put, Transaction, TxResult, put, put_large
from keg.volatile import DEFAULT_PATTERNS, RETENTION_REF, VolatileRules

FORMAT = 1
BRANCH = "refs/heads/main"
REVISION_TRAILER = "Keg-Revision: "
COMMITTER = Person("keg", "keg@localhost")
TREE_CACHE_ENTRIES = 1_000_000  # total entries of cached trees, whatever their widths
MAX_DELTA_DEPTH = 50
LIST_VALUE_MAX = 64 << 10  # list_values (and ?values=1 over HTTP) carries the bytes of files up to this size
PACKS_BEFORE_REPACK = 24
REPACK_RETRY = 60.0        # seconds before a failed repack is tried again
ROOT_CACHE_ENTRIES = 65536
POINTER_CACHE_ENTRIES = 65536
MIN_POINTER = len(MARKER) + 80  # no pointer blob is shorter than its header


def _kid(oid: bytes | None) -> str | None:
    return None if oid is None else kidlib.PREFIX + oid.hex()


def _revision_of_message(message: str) -> int | None:
    for line in reversed(message.splitlines()):
        if line.startswith(REVISION_TRAILER):
            try:
                return int(line[len(REVISION_TRAILER):])
            except ValueError:
                return None
    return None


def _summary(ops) -> str:
    if len(ops) == 1:
        op = ops[0]
        return f"{'put' if isinstance(op, Put) else 'delete'} {op.path}"
    common = os.path.commonpath([op.path for op in ops])
    return f"{len(ops)} changes under {common}"


def init(path: str, durable: bool = True, exist_ok: bool = False, initial: tuple = ()) -> "Store":
    """Create a keg at ``path`` (a new bare git repository with revision 1) and open it.

    Args:
        initial: ``Put`` ops that revision 1 holds (the first user and the ACL,
            for ``keg init``); by default revision 1 is an empty namespace.

    Raises:
        KegError: ``path`` already holds a keg (unless ``exist_ok``) or another
            non-empty directory.
    """
    path = os.path.abspath(path)
    config = os.path.join(path, "keg", "config.json")
    if os.path.exists(config):
        if exist_ok:
            return Store(path, durable=durable)
        raise BadRequest(f"{path} is already a keg; use it with --keg {path}")
    if os.path.isdir(path) and os.listdir(path):
        raise BadRequest(f"{path} exists and is not empty; give a new or empty directory")
    make_dirs(path, durable)
    repo = pygit2.init_repository(path, bare=True, initial_head="main")
    repo.config["gc.auto"] = "0"  # Keg packs on its own schedule, under its write lock.
    repo.config["core.logAllRefUpdates"] = "false"
    os.makedirs(os.path.join(path, "keg", "journal"), exist_ok=True)
    write_file_atomic(config, json.dumps({"format": FORMAT, "volatile": list(DEFAULT_PATTERNS)}, indent=2).encode()
                      + b"\n",
                      durable=durable)
    store = Store(path, durable=durable)
    store._commit_ops_initial(initial)
    if durable:
        sync_tree(path)  # git's skeleton (HEAD, config, objects/, refs/) and keg/: none of it was fsynced
    return store


class Store:
    """A keg opened for reading, and for writing once a write is asked for.

    Args:
        path: the keg directory (a bare git repository with ``keg/config.json``).
        durable: fsync before acknowledging; turn off only for tests.
        checkpoint_revisions: checkpoint after this many revisions in the journal.
        checkpoint_bytes: checkpoint after this many bytes of new objects.
        lock_timeout: seconds to wait for another writer to finish.
        background_checkpoints: write scheduled checkpoints' packs in a child
            process (see the module's docstring); for long-running writers.
    """

    def __init__(self, path: str, durable: bool = True, checkpoint_revisions: int = 1000,
                 checkpoint_bytes: int = 64 << 20, lock_timeout: float = 30.0,
                 background_checkpoints: bool = False):
        self.path = os.path.abspath(path)
        if not os.path.exists(os.path.join(self.path, "keg", "config.json")):
            raise NotFound(f"no keg at {self.path}; create one with 'keg init --keg {self.path}'")
        with open(os.path.join(self.path, "keg", "config.json"), encoding="utf-8") as f:
            self.config = json.load(f)
        if self.config.get("format") != FORMAT:
            raise CorruptKeg(f"{self.path} has keg format {self.config.get('format')}, this Keg reads {FORMAT}")
        self.volatile = VolatileRules(self.config.get("volatile", []))
        self.durable = durable
        self.chunks = ChunkStore(self.path, durable)
        self.large_threshold = int(self.config.get("large_threshold", DEFAULT_THRESHOLD))
        self._pointers: dict = {}          # blob oid -> Pointer, or None for a plain blob
        self._sizes: dict = {}             # packed blob oid -> its size
        self._changed_tops: dict = {}      # top-level name -> newest revision this process changed under it
        self._tops_from = 0                # ... complete for revisions after this one
        self._tops_upto = -1               # ... and up to this one
        self.checkpoint_revisions = checkpoint_revisions
        self.checkpoint_bytes = checkpoint_bytes
        self.lock_timeout = lock_timeout
        self._repo = pygit2.Repository(self.path)
        self._journal = Journal(os.path.join(self.path, "keg", "journal"), durable)
        self._lock_fd = None
        self._pending: dict = {}          # oid -> (type, data) not yet in a pack
        self._pending_bytes = 0
        self.background_checkpoints = background_checkpoints
        self._packing: dict = {}          # like _pending: what a background checkpoint is writing
        self._background: _Background | None = None
        self._repacking: _Repack | None = None   # a ``git repack`` running in a child process
        self._repack_not_before = 0.0            # after a failed repack: when to try again
        self.last_repack_error: Exception | None = None  # the newest repack's failure, until one succeeds
        self._revs: list = [None]          # revision number -> commit oid
        self._checkpoint_rev = 0
        self._trees: OrderedDict = OrderedDict()
        self._roots: dict = {}             # commit oid -> root tree oid (commits never change)
        self._tree_cache_entries = 0
        self._listeners: list = []
        self.stats = {"tree_reads": 0, "tree_parses": 0, "checkpoints": 0, "repacks": 0}
        self.last_checkpoint_error: OSError | None = None
        self._load_head()

    # ----------------------------------------------------------------- context

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Checkpoint what is in the journal and give up the write lock."""
        if self._lock_fd is not None:
            try:
                self.checkpoint()
            finally:
                self._poll_repack(wait=True)  # a repack must not outlive the lock
                self._journal.close()
                os.close(self._lock_fd)
                self._lock_fd = None

    @property
    def is_writer(self) -> bool:
        """True while this process holds the keg's write lock."""
        return self._lock_fd is not None

    # ------------------------------------------------------------ head, revs

    def _read_ref(self):
        ref = self._repo.references.get(BRANCH)
        return None if ref is None else bytes.fromhex(str(ref.target))

    def _load_head(self) -> None:
        head = self._read_ref()
        if head is None:
            self._revs = [None]
            self._checkpoint_rev = 0
            return
        number = _revision_of_message(self._commit(head).message)
        if number is None:
            raise CorruptKeg(f"{BRANCH} points at {head.hex()}, which has no {REVISION_TRAILER.strip()} "
                             "trailer; was the keg changed with stock git?")
        self._revs = self._read_revs_index(head, number)
        self._checkpoint_rev = number

    def _read_revs_index(self, head: bytes, number: int) -> list:
        try:
            with open(os.path.join(self.path, "keg", "revs"), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raw = b""
        revs = [None] + [raw[i:i + 20] for i in range(20, min(len(raw), 20 * (number + 1)), 20)]
        if len(revs) == number + 1 and revs[number] == head:
            return revs
        # The index is behind (or was lost): walk first parents back to where it agrees.
        missing, oid = [], head
        for n in range(number, 0, -1):
            if n < len(revs) and revs[n] == oid:
                break
            missing.append(oid)
            parents = self._commit(oid).parents
            oid = parents[0] if parents else None
        keep = number + 1 - len(missing)
        revs = revs[:keep] + list(reversed(missing))
        self._write_revs_index(revs, 1)
        return revs

    def _write_revs_index(self, revs: list, start: int, end: int | None = None) -> None:
        """Write ``revs[start:end]`` into the revision index, which then ends at ``end``."""
        end = len(revs) if end is None else end
        with open(os.path.join(self.path, "keg", "revs"), "r+b" if os.path.exists(
                os.path.join(self.path, "keg", "revs")) else "wb") as f:
            f.seek(20 * start)
            f.write(b"".join(revs[start:end]))
            f.truncate(20 * end)
            if start == 1:
                f.seek(0)
                f.write(b"\x00" * 20)
            if self.durable:
                os.fdatasync(f.fileno())

    @property
    def head_revision(self) -> int:
        """The newest revision number this process knows (0 for an empty keg)."""
        return len(self._revs) - 1

    def refresh(self) -> int:
        """Pick up revisions checkpointed by another process; returns the head revision.

        The writer process owns the head, so for it this only returns it.
        """
        if self._lock_fd is None:
            head = self._read_ref()
            known = self._revs[-1] if len(self._revs) > 1 else None
            if head != known and not self._extend_revs(head):
                self._load_head()
        return self.head_revision

    def _extend_revs(self, head: bytes) -> bool:
        """Append the revisions a writer added after ours, reading only the new tail of the index."""
        number = _revision_of_message(self._commit(head).message)
        start = len(self._revs)
        if number is None or number < start:
            return False
        with open(os.path.join(self.path, "keg", "revs"), "rb") as f:
            f.seek(20 * start)
            raw = f.read(20 * (number + 1 - start))
        tail = [raw[i:i + 20] for i in range(0, len(raw), 20)]
        if len(tail) != number + 1 - start or tail[-1] != head:
            return False
        if self._commit(tail[0]).parents[:1] != (self._revs[-1],):
            return False  # history does not continue ours: reload from scratch
        self._revs.extend(tail)
        self._checkpoint_rev = number
        return True

    def revision(self, spec=None) -> Revision:
        """Look up a revision by number, revision KID (short forms too), or ``None`` for the head.

        Raises:
            NotFound: no such revision.
            BadRequest: ``spec`` is neither a number nor a KID.
        """
        number = self._revision_number(spec)
        commit = self._commit(self._revs[number])
        return Revision(number, _kid(self._revs[number]), commit.time,
                        f"{commit.author.name} <{commit.author.email}>", commit.message)

    def _revision_number(self, spec) -> int:
        head = self.head_revision
        if spec is None:
            if head == 0:
                raise NotFound("the keg has no revisions yet")
            return head
        if isinstance(spec, int) or (isinstance(spec, str) and spec.lstrip("-").isdigit()):
            number = int(spec)
            if number < 0:
                number = head + 1 + number  # -1 is the head, as in Python
            if not 1 <= number <= head:
                raise NotFound(f"revision {spec} does not exist; revisions run from 1 to {head}")
            return number
        if isinstance(spec, str) and spec.startswith(kidlib.PREFIX):
            oid = self._resolve_object(spec)
            obj_type, data = self._object(oid)
            if obj_type != OBJ_COMMIT:
                raise NotFound(f"{spec} names a {obj_type_name(obj_type)}, not a revision")
            number = _revision_of_message(Commit.parse(data).message)
            if number is None or number >= len(self._revs) or self._revs[number] != oid:
                raise NotFound(f"{spec} is a commit, but not a revision of this keg's namespace")
            return number
        raise BadRequest(f"{spec!r} is not a revision: give a number or a revision KID (K-…)")

    # ----------------------------------------------------------------- objects

    def _unpacked(self, oid: bytes):
        """An object not in a pack yet, or ``None``."""
        hit = self._pending.get(oid)
        return hit if hit is not None or not self._packing else self._packing.get(oid)

    def _object(self, oid: bytes):
        hit = self._unpacked(oid)
        if hit is not None:
            if hit[1] is None:  # stored as a delta against an earlier pending object
                return hit[0], apply_delta(self._object(hit[2])[1], hit[3])
            return hit
        try:
            obj_type, data = self._repo.odb.read(oid.hex())
        except KeyError as err:
            raise MissingObject(f"object {oid.hex()} is missing from {self.path}") from err
        return int(obj_type), data

    def _commit(self, oid: bytes) -> Commit:
        obj_type, data = self._object(oid)
        if obj_type != OBJ_COMMIT:
            raise CorruptKeg(f"{oid.hex()} should be a commit")
        return Commit.parse(data)

    def _tree(self, oid: bytes) -> Tree:
        self.stats["tree_reads"] += 1
        tree = self._trees.get(oid)
        if tree is not None:
            self._trees.move_to_end(oid)
            return tree
        if oid == EMPTY_TREE_OID:
            return EMPTY_TREE
        obj_type, data = self._object(oid)
        if obj_type != OBJ_TREE:
            raise CorruptKeg(f"{oid.hex()} should be a tree")
        self.stats["tree_parses"] += 1
        tree = Tree.parse(data)
        self._cache_tree(oid, tree)
        return tree

    def drop_caches(self) -> None:
        """Forget every parsed tree (for measuring cold reads, and after a repack drops objects)."""
        self._trees.clear()
        self._tree_cache_entries = 0

    def _cache_tree(self, oid: bytes, tree: Tree) -> None:
        if oid in self._trees:
            return
        self._trees[oid] = tree
        self._tree_cache_entries += len(tree) + 1
        while self._tree_cache_entries > TREE_CACHE_ENTRIES and len(self._trees) > 1:
            _, evicted = self._trees.popitem(last=False)
            self._tree_cache_entries -= len(evicted) + 1

    def _root(self, number: int) -> bytes:
        if number == 0:
            return EMPTY_TREE_OID
        oid = self._revs[number]
        root = self._roots.get(oid)
        if root is None:
            if len(self._roots) >= ROOT_CACHE_ENTRIES:
                self._roots.clear()
            root = self._roots[oid] = self._commit(oid).tree
        return root

    def _view(self, path: str, entry):
        """An entry as readers see it: a volatile directory's gitlink reads as its tree."""
        if entry is not None and entry[0] == MODE_GITLINK and self.volatile.matches(path):
            return (MODE_TREE, entry[1])
        return entry

    def _dir_tree(self, path: str, oid: bytes) -> Tree:
        """The tree of the directory at ``path``; a compacted volatile one is a clear NotFound."""
        try:
            return self._tree(oid)
        except MissingObject as err:
            if self.volatile.matches(path) or any(self.volatile.matches(p) for p in _ancestors(path)):
                raise NotFound(f"the history of volatile {path} was compacted; this revision is older "
                               f"than the window kept (see 'keg compact')") from err
            raise

    def _through(self, path: str, commit: bytes) -> tuple:
        """The root tree of the commit a pointer at ``path`` names, as an entry to descend into."""
        try:
            return (MODE_TREE, self._commit(commit).tree)
        except MissingObject as err:
            raise NotFound(f"{path} points at commit {commit.hex()}, which is not in this keg; "
                           f"fetch it with 'keg mount {path} LOCATION'") from err

    def _lookup(self, root: bytes, path: str):
        """``(mode, oid)`` of ``path`` under the root tree, or ``None``.

        A pointer to another keg (a gitlink) on the way is followed into the
        tree of the commit it names, so paths beneath a mount read like any other.
        """
        entry, current = (MODE_TREE, root), paths.ROOT
        for name in paths.split(path):
            if entry[0] == MODE_GITLINK:
                entry = self._through(current, entry[1])
            if entry[0] != MODE_TREE:
                return None
            entry = self._dir_tree(current, entry[1]).get(name.encode("utf-8"))
            current = paths.join(current, name)
            if entry is None:
                return None
            entry = self._view(current, entry)
        return entry

    def _blob_size(self, oid: bytes) -> int:
        hit = self._unpacked(oid)
        if hit is not None:
            return len(self._object(oid)[1])
        size = self._sizes.get(oid)
        if size is None:
            try:
                size = self._repo.odb.read_header(oid.hex())[1]  # libgit2 asks pack after pack
            except KeyError:
                return 0
            if len(self._sizes) >= POINTER_CACHE_ENTRIES:
                self._sizes.clear()
            self._sizes[oid] = size  # blobs never change
        return size

    def _pointer(self, mode: int, oid: bytes, path: str = "") -> Pointer | None:
        """The pointer a blob holds, or None when it is a plain value (cached: blobs never change)."""
        if mode not in (MODE_BLOB, MODE_EXEC):
            return None
        if oid in self._pointers:
            return self._pointers[oid]
        pointer = None
        if self._blob_size(oid) >= MIN_POINTER:
            data = self._object(oid)[1]
            if is_pointer(data):
                pointer = Pointer.parse(data, path)
        if len(self._pointers) >= POINTER_CACHE_ENTRIES:
            self._pointers.clear()
        self._pointers[oid] = pointer
        return pointer

    def _entry(self, path: str, mode: int, oid: bytes) -> Entry:
        if mode == MODE_TREE:
            return Entry(path, "tree", _kid(oid), len(self._tree(oid)), mode)
        if mode == MODE_GITLINK:
            return Entry(path, "pointer", _kid(oid), 0, mode)
        pointer = self._pointer(mode, oid, path)
        if pointer is not None:
            return Entry(path, kind_of_mode(mode), _kid(oid), pointer.size, mode, True)
        return Entry(path, kind_of_mode(mode), _kid(oid), self._blob_size(oid), mode)

    # ------------------------------------------------------------------- reads

    def stat(self, path: str, rev=None) -> Entry:
        """Kind, KID and size of ``path`` at revision ``rev`` (default: head).

        Raises:
            NotFound: nothing is at ``path`` in that revision.
        """
        path = paths.normalize(path)
        number = self._revision_number(rev)
        entry = self._lookup(self._root(number), path)
        if entry is None:
            raise NotFound(f"{path} does not exist at revision {number}")
        return self._entry(path, *entry)

    def kid(self, path: str, rev=None) -> str:
        """The KID of the value at ``path``."""
        return self.stat(path, rev).kid

    def read(self, path: str, rev=None) -> bytes:
        """The bytes of the file at ``path`` (a large value whole: see :meth:`open` to stream it).

        Raises:
            NotFound: nothing is at ``path``, or a chunk of it is missing.
            BadRequest: ``path`` is a directory.
            CorruptKeg: a chunk is damaged (the message names the path and chunk).
        """
        with self.open(path, rev) as f:
            return f.read()

    def open(self, path: str, rev=None):
        """A binary file object reading the value at ``path``.

        A large value is streamed a chunk at a time, each chunk verified as it
        is read, so memory stays bounded whatever the size of the value.

        Raises:
            NotFound, BadRequest: as :meth:`read`.
        """
        entry = self.stat(path, rev)
        if entry.kind == "tree":
            raise BadRequest(f"{entry.path} is a directory; list it instead")
        if entry.kind == "pointer":
            raise BadRequest(f"{entry.path} is a pointer to another keg ({entry.kid})")
        oid = bytes.fromhex(entry.kid[2:])
        pointer = self._pointer(entry.mode, oid, entry.path)
        if pointer is not None:
            return LargeReader(pointer, self.chunks.get, entry.path)
        return io.BytesIO(self._object(oid)[1])

    def pointer(self, path: str, rev=None) -> Pointer | None:
        """The chunk list of the large value at ``path``, or None for a plain value."""
        entry = self.stat(path, rev)
        if entry.kind in ("tree", "pointer"):
            return None
        return self._pointer(entry.mode, bytes.fromhex(entry.kid[2:]), entry.path)

    def put_stream(self, path: str, stream, mode: int = 0o100644, progress=None) -> Put:
        """A put op for the bytes of ``stream``, stored as chunks when large.

        The stream is read once; up to the threshold it is kept in memory, past
        it the rest is cut into chunks as it is read (never held whole).  The
        chunks are durable when this returns; commit the op with
        :meth:`commit`.
        """
        head = read_full(stream, self.large_threshold + 1)
        if len(head) <= self.large_threshold and not is_pointer(head):
            if progress is not None:
                progress(len(head))
            return put(path, head, mode)
        return put_large(path, ingest(self.chunks, Chain(head, stream), progress=progress), mode)

    def _externalize(self, op):
        """``op`` with a value above the threshold (or looking like a pointer) stored as chunks."""
        if not isinstance(op, Put) or op.large:
            return op
        if len(op.data) <= self.large_threshold and not is_pointer(op.data):
            return op
        return put_large(op.path, ingest(self.chunks, io.BytesIO(op.data)), op.mode)

    def _check_large(self, op: Put, check_chunks: bool = True) -> None:
        """A large put may only name chunks the keg holds (they are touched: see :meth:`gc_chunks`)."""
        try:
            pointer = Pointer.parse(op.data, op.path)
        except CorruptKeg as err:
            raise BadRequest(str(err).replace("is damaged", "is malformed")) from err
        if not check_chunks:
            return
        missing = self.chunks.missing(sorted({name for name, _ in pointer.chunks}))
        if missing:
            raise BadRequest(f"put {op.path}: {len(missing)} chunk(s) of the value are not stored "
                             f"(first: {missing[0]}); upload them first")

    def _directory(self, path: str, rev) -> Tree:
        """The tree of the directory at ``path`` (through a pointer); NotFound, or BadRequest for a file."""
        number = self._revision_number(rev)
        entry = self._lookup(self._root(number), path)
        if entry is None:
            raise NotFound(f"{path} does not exist at revision {number}")
        if entry[0] == MODE_GITLINK:
            entry = self._through(path, entry[1])
        if entry[0] != MODE_TREE:
            raise BadRequest(f"{path} is a file, not a directory")
        return self._dir_tree(path, entry[1])

    def names(self, path: str = "/", rev=None) -> list:
        """The names of the entries of the directory at ``path``, in name order, none of them read.

        What a paged ``list`` pages over: it costs the directory's tree, not
        a look at each child (kind, size), so a caller can show one page of a
        directory of 10,000 entries for the price of the page.

        Raises:
            NotFound: nothing is at ``path``.
            BadRequest: ``path`` is a file.
        """
        return _names_of(self._directory(paths.normalize(path), rev))

    def list_values(self, path: str = "/", rev=None) -> list:
        """``(Entry, bytes or None)`` for each entry of the directory at ``path``: the bytes of every file
        of at most ``LIST_VALUE_MAX`` (64 KiB) that is not a large value, None for the rest.

        What a program that reads a whole small directory (a Mayor its process table) asks a master in
        one request instead of a listing and a read per file.

        Raises:
            NotFound: nothing is at ``path``.
            BadRequest: ``path`` is a file.
        """
        number = self._revision_number(rev)
        return [(e, self.read(e.path, number) if e.kind == "file" and not e.large and e.size <= LIST_VALUE_MAX
                 else None) for e in self.list(path, number)]

    def list(self, path: str = "/", rev=None, offset: int = 0, limit: int | None = None) -> list:
        """The entries of the directory at ``path``, in name order.

        Args:
            offset: the position (in name order) of the first entry returned.
            limit: at most this many entries (None: all from ``offset``); only
                the entries returned are read, so a page costs the page, not
                the directory (see ``names``).

        Raises:
            NotFound: nothing is at ``path``.
            BadRequest: ``path`` is a file, or ``offset``/``limit`` is negative.
        """
        if offset < 0 or (limit is not None and limit < 0):
            raise BadRequest(f"offset {offset} and limit {limit} must not be negative")
        path = paths.normalize(path)
        tree = self._directory(path, rev)
        if offset or limit is not None:
            out = []
            for name in _names_of(tree)[offset:None if limit is None else offset + limit]:
                child = paths.join(path, name)
                out.append(self._entry(child, *self._view(child, tree.get(name.encode("utf-8", "surrogateescape")))))
            return out
        out = []
        for name, mode, oid in tree.items():
            child = paths.join(path, name.decode("utf-8", "surrogateescape"))
            out.append(self._entry(child, *self._view(child, (mode, oid))))
        out.sort(key=lambda e: e.path)
        return out

    def exists(self, path: str, rev=None) -> bool:
        """True when something is at ``path``."""
        try:
            self.stat(path, rev)
        except NotFound:
            return False
        return True

    # ------------------------------------------------------------------ writes

    def lock(self) -> None:
        """Become the keg's writer now: take the write lock and replay what a crash left in the journal.

        Writes take the lock by themselves; call this to recover a keg (or to
        hold it, as a master does) before the first write.

        Raises:
            KegBusy: another process kept the lock for longer than ``lock_timeout``.
            CorruptKeg: the journal cannot be replayed onto the head.
        """
        self._acquire_write_lock()

    def _acquire_write_lock(self) -> None:
        if self._lock_fd is not None:
            return
        lock_path = os.path.join(self.path, "keg", "write.lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                    os.close(fd)
                    raise KegBusy(f"{self.path} is being written by another process (pid {holder}) for more "
                                  f"than {self.lock_timeout:g}s; if a master serves it, write through the master")
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd
        try:
            self._recover()
        except BaseException:
            os.close(fd)
            self._lock_fd = None
            raise

    def _recover(self) -> None:
        """Load the head from disk and replay journal records a crash left behind."""
        self._pending.clear()
        self._pending_bytes = 0
        self._remove_crash_leftovers()
        self._load_head()
        records, intact = self._journal.read()
        if os.path.exists(self._journal.path) and intact < os.path.getsize(self._journal.path):
            self._journal.truncate(intact)
        replayed = 0
        for record in records:
            if record.revision <= self.head_revision:
                continue
            if record.revision != self.head_revision + 1 or record.parent != self._revs[-1]:
                raise CorruptKeg(f"journal record for revision {record.revision} does not follow revision "
                                 f"{self.head_revision}; the keg's ref was moved outside Keg")
            self._replay(record)
            replayed += 1
        if replayed:
            self.checkpoint()
        elif records:
            self._journal.reset()

    def _replay(self, record: Record) -> None:
        ops = []
        for op in record.ops:
            ops.append(Put(op[1], op[3], op[2]) if op[0] == "put" else Delete(op[1], op[2]))
        new_objects: dict = {}
        root = self._root(self.head_revision)
        staging = Staging(self._tree, self._tree(root), self.volatile.matches, root)
        for op in ops:
            self._stage(staging, op, new_objects)
        root = staging.build(self._collector(new_objects))
        commit = Commit(root, (record.parent,) if record.parent else (), Person(*record.author),
                        COMMITTER, record.time, record.message)
        data = commit.encode()
        oid = object_id(OBJ_COMMIT, data)
        if oid != record.commit:
            raise CorruptKeg(f"replaying journal revision {record.revision} gave commit {oid.hex()}, "
                             f"not {record.commit.hex()}; refusing to guess")
        new_objects[oid] = (OBJ_COMMIT, data)
        self._install(new_objects, oid)

    def _collector(self, new_objects: dict):
        """A ``store_object`` callback for ``Staging.build`` that also caches the parsed trees."""
        def collect(oid, obj_type, data, tree, base=None):
            self._cache_tree(oid, tree)
            known = tree.delta_against(base[1] if base is not None else None)  # and the tree forgets the base
            if base is not None and base[0] in self._trees:
                # The version this tree replaces is wanted only for history now: first to go. Otherwise
                # each commit's new copy of a wide directory (5,000 entries of /machines) pushes a
                # 30-entry directory out of the cache, to be read and parsed again on its next change.
                self._trees.move_to_end(base[0], last=False)
            base_entry = self._pending.get(base[0]) if base is not None else None
            if base_entry is not None:  # the base goes into the same pack: store the change only
                depth = base_entry[4] + 1 if base_entry[1] is None else 1
                if depth <= MAX_DELTA_DEPTH:
                    delta = known if known is not None else make_delta(base[1].encode(), data)
                    if len(delta) < len(data) // 2:
                        new_objects[oid] = (obj_type, None, base[0], delta, depth)
                        return
            new_objects[oid] = (obj_type, data)
        return collect

    def _stage(self, staging: Staging, op, new_objects: dict) -> bytes | None:
        if isinstance(op, Put) and op.mode == MODE_GITLINK:
            staging.put(op.path, op.mode, op.data)  # names a commit; no object of ours
            return op.data
        if isinstance(op, Put):
            oid = object_id(OBJ_BLOB, op.data)
            # A blob already packed may be packed again (harmless; repacking drops the copy):
            # asking every pack for it on each put costs more than the copy.
            if oid not in self._pending and oid not in new_objects:
                new_objects[oid] = (OBJ_BLOB, op.data)
            staging.put(op.path, op.mode, oid)
            return oid
        staging.delete(op.path, op.recursive)
        return None

    def _install(self, new_objects: dict, commit_oid: bytes) -> None:
        for oid, value in new_objects.items():
            if oid not in self._pending and oid not in self._packing:  # a background child may be packing it
                self._pending[oid] = value
                self._pending_bytes += len(value[1] if value[1] is not None else value[3])
        self._revs.append(commit_oid)

    def commit(self, transactions, when: int | None = None, trailers: tuple = (),
               check_chunks: bool = True, sync: bool = True) -> list:
        """Apply a group of transactions in one revision (group commit).

        Each transaction succeeds or fails on its own: a failed compare or an
        op that does not fit the namespace fails that transaction only, and it
        changes nothing.  The group is durable before this returns, unless
        ``sync`` is False.

        Args:
            transactions: ``Transaction`` objects, applied in order.
            when: the commit time (seconds since the epoch); the clock's now by
                default.  A replicated master passes the time carried in its
                log entry, so that every replica makes the same commit.
            trailers: extra ``Name: value`` lines for the commit message.
            check_chunks: refuse a large put whose chunks are not stored here.
                A replicated master checks that before it proposes the group
                and passes False, so that applying the group never depends on
                one replica's chunk store.
            sync: fsync the journal record. A replicated master passes False:
                its Raft log, fsynced on a majority before the group is
                applied, is the write-ahead log, and a crash that takes the
                newest revisions from this keg's journal makes it apply those
                log entries again (the head's ``Keg-Raft-Index`` says where to
                resume); checkpoints stay fsynced.

        Returns:
            One ``TxResult`` per transaction, in order.
        """
        transactions = [self._prepare(tx) for tx in transactions]
        self._acquire_write_lock()
        head = self.head_revision
        root = self._root(head)
        staging = Staging(self._tree, self._tree(root), self.volatile.matches, root)
        new_objects: dict = {}
        results, applied, authors = [], [], []
        checked: set = set()  # pointer blobs whose chunks this commit has checked
        for tx in transactions:
            snap, objects_before = staging.snapshot(), len(new_objects)
            try:
                if isinstance(tx, KegError):
                    raise tx
                for op in tx.ops:
                    if isinstance(op, Put) and op.large and op.data not in checked:
                        self._check_large(op, check_chunks)  # chunks there (and touched), once per pointer
                        checked.add(op.data)
                for cmp in tx.compares:
                    entry = staging.entry(cmp.path)
                    actual = _kid(entry[1]) if entry else None
                    if actual != cmp.kid:
                        raise CompareFailed(cmp.path, cmp.kid, actual)
                kids = {op.path: _kid(self._stage(staging, op, new_objects)) for op in tx.ops}
            except KegError as err:
                staging.restore(snap)
                for oid in list(new_objects)[objects_before:]:  # staging only adds: the newest go
                    del new_objects[oid]
                results.append(TxResult(False, error=err))
                continue
            results.append(kids)
            applied.extend(tx.ops)
            authors.append(tx.author)
        if not applied:
            return results
        succeeded = [tx for tx, r in zip(transactions, results) if not isinstance(r, TxResult)]
        commit_oid = self._write_group(staging, new_objects, applied, authors, succeeded, when, trailers, sync)
        number, kid = self.head_revision, _kid(commit_oid)
        return [r if isinstance(r, TxResult) else TxResult(True, number, kid, r) for r in results]

    def _prepare(self, tx: Transaction):
        """The transaction with large values stored as chunks, or the error that fails it."""
        if not any(isinstance(op, Put) and not op.large and (len(op.data) > self.large_threshold
                                                              or is_pointer(op.data)) for op in tx.ops):
            return tx
        try:
            return dataclasses.replace(tx, ops=tuple(self._externalize(op) for op in tx.ops))
        except (KegError, OSError) as err:
            return err if isinstance(err, KegError) else KegError(f"storing the chunks failed: {err}")

    def apply(self, tx: Transaction) -> TxResult:
        """Apply one transaction; returns its result (``ok`` False on a failed compare)."""
        return self.commit([tx])[0]

    def _write_group(self, staging, new_objects, ops, authors, transactions, when=None, extra=(),
                     sync: bool = True) -> bytes:
        root = staging.build(self._collector(new_objects))
        number = self.head_revision + 1
        parent = self._revs[-1]
        author = authors[0] if len({(a.name, a.email) for a in authors}) == 1 else Author()
        trailers = [f"{REVISION_TRAILER}{number}"]
        trailers += [f"Keg-Transaction: {tx.id}" for tx in transactions if getattr(tx, "id", None)]
        trailers += list(extra)
        message = f"{_summary(ops)}\n\n" + "\n".join(trailers) + "\n"
        when = int(time.time()) if when is None else int(when)
        commit = Commit(root, (parent,) if parent else (), Person(author.name, author.email),
                        COMMITTER, when, message)
        data = commit.encode()
        commit_oid = object_id(OBJ_COMMIT, data)
        new_objects[commit_oid] = (OBJ_COMMIT, data)
        self._roots[commit_oid] = root  # the next commit starts from it: no need to parse it back
        record_ops = tuple(("put", op.path, op.mode, op.data) if isinstance(op, Put)
                           else ("delete", op.path, op.recursive) for op in ops)
        self._journal.append(Record(number, parent, commit_oid, when, (author.name, author.email),
                                    message, record_ops), sync)
        self._install(new_objects, commit_oid)
        self._note_tops(number, ops)
        try:
            if self._background is not None:
                self._finish_background(wait=False)
            if self._checkpoint_due():
                self._scheduled_checkpoint()
        except (OSError, KegError) as err:
            # The group is journaled and acknowledged; the checkpoint is retried by the next one.
            self.last_checkpoint_error = err
        for listener in list(self._listeners):
            listener(number)
        return commit_oid

    def _note_tops(self, number: int, ops) -> None:
        """Record which top-level directories revision ``number`` changed (see :meth:`changed_since`)."""
        if self._tops_upto != number - 1:  # the head moved without a commit of ours: start again here
            self._changed_tops.clear()
            self._tops_from = number - 1
        for op in ops:
            top = op.path[1:].partition("/")[0]
            if not top:  # the root itself: everything changed
                self._changed_tops.clear()
                self._tops_from = number
            else:
                self._changed_tops[top] = number
        self._tops_upto = number

    def changed_since(self, top: str, revision: int) -> bool | None:
        """Whether a revision after ``revision`` changed anything under ``/<top>``; ``None`` if unknown.

        Known for revisions this process committed one after another: a
        cheap test for a cache of a few paths (the master's users and ACL).
        """
        if self._tops_upto != self.head_revision or revision < self._tops_from:
            return None
        return self._changed_tops.get(top, 0) > revision

    def _commit_ops_initial(self, initial: tuple = ()) -> None:
        """Revision 1 of a new keg: an empty namespace, or the ``initial`` puts."""
        self._acquire_write_lock()
        message = f"init\n\n{REVISION_TRAILER}1\n"
        when = int(time.time())
        new_objects: dict = {EMPTY_TREE_OID: (OBJ_TREE, b"")}
        staging = Staging(self._tree, EMPTY_TREE, self.volatile.matches, EMPTY_TREE_OID)
        for op in initial:
            self._stage(staging, op, new_objects)
        root = staging.build(self._collector(new_objects)) if initial else EMPTY_TREE_OID
        commit = Commit(root, (), COMMITTER, COMMITTER, when, message)
        data = commit.encode()
        oid = object_id(OBJ_COMMIT, data)
        ops = tuple(("put", op.path, op.mode, op.data) for op in initial)
        self._journal.append(Record(1, None, oid, when, (COMMITTER.name, COMMITTER.email), message, ops))
        new_objects[oid] = (OBJ_COMMIT, data)
        self._install(new_objects, oid)
        self.checkpoint()

    def fast_forward(self, commit: bytes) -> None:
        """Make ``commit``, whose objects are in the repository already (a git fetch), the head.

        For a replica catching up from a snapshot: ``commit`` must continue
        this keg's history along first parents.

        Raises:
            CorruptKeg: ``commit`` is not a revision that continues the head.
        """
        self._acquire_write_lock()
        self.checkpoint()
        number = _revision_of_message(self._commit(commit).message)
        if number is None or number < self.head_revision:
            raise CorruptKeg(f"{commit.hex()} is not a revision after {self.head_revision}")
        oid = commit
        for _ in range(number - self.head_revision):
            oid = self._commit(oid).parents[0]
        if oid != self._revs[-1]:
            raise CorruptKeg(f"{commit.hex()} does not continue this keg's history")
        self._write_ref(BRANCH, commit)
        self._load_head()

    def add_listener(self, callback) -> None:
        """Call ``callback(revision)`` after each revision this process commits."""
        self._listeners.append(callback)

    def remove_listener(self, callback) -> None:
        """Stop calling a listener added with :meth:`add_listener`."""
        self._listeners.remove(callback)

    # -------------------------------------------------------------- checkpoint

    def checkpoint(self) -> None:
        """Make journaled revisions part of the git repository and empty the journal.

        Waits for a background checkpoint first.  Order matters for crash
        safety: pack (fsynced), revision index, ref (fsynced), then the journal
        is dropped.  A crash between any two steps leaves either the old ref
        with the journal, or the new ref.
        """
        if self._background is not None:
            self._finish_background(wait=True)
        if self._lock_fd is None or self.head_revision == self._checkpoint_rev:
            return
        pack_dir = os.path.join(self.path, "objects", "pack")
        write_pack(pack_dir, ((oid, *value[:4]) for oid, value in self._pending.items()), durable=self.durable)
        self._write_revs_index(self._revs, self._checkpoint_rev + 1)
        self._write_ref(BRANCH, self._revs[-1])
        self._journal.reset()
        self._pending.clear()
        self._pending_bytes = 0
        self._checkpoint_rev = self.head_revision
        self.last_checkpoint_error = None
        self.stats["checkpoints"] += 1
        self._maybe_repack(pack_dir)

    def _checkpoint_due(self) -> bool:
        """True when the revisions or bytes not yet in a pack (or being packed) call for a checkpoint."""
        background = self._background
        done = background.revision if background else self._checkpoint_rev
        unpacked = self._pending_bytes - (background.size if background else 0)
        return self.head_revision - done >= self.checkpoint_revisions or unpacked >= self.checkpoint_bytes

    def _scheduled_checkpoint(self) -> None:
        """The checkpoint a commit calls for: in a child process when allowed, else here and now."""
        if not self.background_checkpoints or threading.active_count() > 1:
            self.checkpoint()
            return
        if self._background is not None:
            self._finish_background(wait=True)  # a second one is due already: the disk sets the pace
        if self.head_revision == self._checkpoint_rev:
            return
        revision = self.head_revision
        sealed = self._journal.seal(revision)
        self._packing, self._pending = self._pending, {}
        size = self._pending_bytes
        objects = [(oid, *value[:4]) for oid, value in self._packing.items()]
        try:
            pid = os.fork()
        except OSError:  # no memory for a child: write it here, as without background checkpoints
            self._pending, self._packing = self._packing, {}
            self.checkpoint()
            return
        if pid == 0:
            _write_pack_and_exit(os.path.join(self.path, "objects", "pack"), objects, self.durable)
        self._background = _Background(pid, revision, size, sealed)

    def poll_checkpoint(self) -> bool:
        """Install a background checkpoint that has finished, and end a finished repack.

        Returns:
            True while either is still running (call again later).
        """
        running = False
        if self._background is not None:
            try:
                running = not self._finish_background(wait=False)
            except (OSError, KegError) as err:  # installing (or the repack after it) failed; retried later
                self.last_checkpoint_error = err
        return self._poll_repack(wait=False) or running

    def _finish_background(self, wait: bool) -> bool:
        """Install the background checkpoint's pack if its child is done (or ``wait``); True when it was.

        A child that failed gives its objects back to the pending ones: the
        next checkpoint writes them, and its journal segment stays until then.
        """
        background = self._background
        try:
            pid, status = os.waitpid(background.pid, 0 if wait else os.WNOHANG)
        except ChildProcessError:
            pid, status = background.pid, -1   # reaped by someone else: its outcome is unknown
        if pid == 0:
            return False
        self._background = None
        if status != 0:
            merged = self._packing  # first: a delta's base must come before it in the next pack
            for oid, value in self._pending.items():
                merged.setdefault(oid, value)
            self._pending, self._packing = merged, {}
            self.last_checkpoint_error = OSError(f"the background checkpoint of revisions up to "
                                                 f"{background.revision} failed (wait status {status}); "
                                                 "the next checkpoint writes them")
            return True
        self._write_revs_index(self._revs, self._checkpoint_rev + 1, background.revision + 1)
        self._write_ref(BRANCH, self._revs[background.revision])
        self._packing = {}
        self._pending_bytes -= background.size
        self._checkpoint_rev = background.revision
        self._journal.drop_sealed(background.sealed)
        self.last_checkpoint_error = None
        self.stats["checkpoints"] += 1
        self._maybe_repack(os.path.join(self.path, "objects", "pack"))
        return True

    def _write_ref(self, name: str, oid: bytes) -> None:
        """Point a loose ref at ``oid`` atomically; the temporary file is git's own ``<ref>.lock``."""
        ref_path = os.path.join(self.path, *name.split("/"))
        os.makedirs(os.path.dirname(ref_path), exist_ok=True)
        write_file_atomic(ref_path, oid.hex().encode() + b"\n", durable=self.durable, tmp=ref_path + ".lock")

    def _remove_crash_leftovers(self) -> None:
        """Temporary files a crashed writer left; only the lock holder may call this."""
        for name in (BRANCH, RETENTION_REF):
            try:
                os.unlink(os.path.join(self.path, *name.split("/")) + ".lock")
            except FileNotFoundError:
                pass
        pack_dir = os.path.join(self.path, "objects", "pack")
        for name in os.listdir(pack_dir):
            if name.startswith(("tmp_pack_", "tmp_idx_")):
                os.unlink(os.path.join(pack_dir, name))

    def _maybe_repack(self, pack_dir: str) -> None:
        """Roll small packs into larger ones (geometric) when they pile up, so their count stays bounded.

        With ``background_checkpoints`` in a process without threads, the
        repack runs in a child beside the commits (one at a time): git packs
        the packs it listed when it started and deletes only those, so a pack
        a checkpoint writes meanwhile stays as it is; ``poll_checkpoint`` and
        ``close`` end it.  Otherwise it runs here, as a forked child must not
        belong to a thread that may end (``PR_SET_PDEATHSIG``).  A failure is
        kept in ``last_repack_error`` (the old packs stay) and the next try
        waits ``REPACK_RETRY`` seconds; it never fails the checkpoint.
        """
        if self._poll_repack(wait=False) or time.monotonic() < self._repack_not_before:
            return
        packs = [n for n in os.listdir(pack_dir) if n.endswith(".pack")]
        if len(packs) <= PACKS_BEFORE_REPACK:
            return
        self.stats["repacks"] += 1
        self._repacking = _Repack.start(self.path, "repack", "-d", "-q", "--geometric=2")
        if not self.background_checkpoints or threading.active_count() > 1:
            self._poll_repack(wait=True)

    def _poll_repack(self, wait: bool) -> bool:
        """End the running repack if it is done (or ``wait`` for it); True while it still runs."""
        if self._repacking is None:
            return False
        if not self._repacking.done(wait):
            return True
        repack, self._repacking = self._repacking, None
        try:
            repack.check()
        except CorruptKeg as err:
            self.last_repack_error = err
            self._repack_not_before = time.monotonic() + REPACK_RETRY
            return False
        self.last_repack_error = None
        # libgit2 keeps the packs it opened, also those the repack deleted (their disk space with them).
        self._repo = pygit2.Repository(self.path)
        return False

    def housekeeping_status(self) -> dict:
        """What the keg's background work has done, and its last failure while that failure stands.

        Returns:
            ``{"checkpoints": n, "repacks": n, "repacking": bool, "checkpoint_error": text or None,
            "repack_error": text or None}``: checkpoints written and repacks started since the keg was
            opened; an error is cleared by the next checkpoint (or repack) that succeeds.
        """
        def text(err):
            return None if err is None else str(err)

        return {"checkpoints": self.stats["checkpoints"], "repacks": self.stats["repacks"],
                "repacking": self._repacking is not None,
                "checkpoint_error": text(self.last_checkpoint_error), "repack_error": text(self.last_repack_error)}

    # -------------------------------------------------------------- volatile

    def _volatile_dirs(self, root: bytes):
        """``(path, tree oid)`` of every volatile directory stored as a gitlink under ``root``."""
        for pattern in self.volatile.patterns:
            level = [(paths.ROOT, root)]
            for depth, segment in enumerate(pattern):
                last = depth == len(pattern) - 1
                following = []
                for path, oid in level:
                    for name, mode, child in self._tree(oid).items():
                        child_path = paths.join(path, name.decode("utf-8", "surrogateescape"))
                        if not fnmatchcase(child_path.rsplit("/", 1)[1], segment):
                            continue
                        if last and mode == MODE_GITLINK:
                            yield child_path, child
                        elif not last and mode == MODE_TREE:
                            following.append((child_path, child))
                level = following

    def compact(self, window: int = 1000) -> dict:
        """Drop the history of volatile directories older than the newest ``window`` revisions.

        The trees of volatile directories in the kept revisions are listed by
        one retention commit at ``refs/keg/volatile``; ``git repack -a -d``
        then drops every object nothing reaches any more.  History of
        everything that is not volatile is untouched, and no revision KID
        changes.  Pushed sources whose pointers never committed go too, once
        ``keg.sources.INCOMING_TTL`` old (``keg.sources.prune_incoming``);
        every ``refs/keg/src/<app>`` is first pointed at the commit
        ``/src/<app>`` names (``keg.sources.reconcile``), so none is dropped.

        Returns:
            ``{"from_revision": first kept revision, "kept_trees": count,
            "dropped_sources": incoming refs dropped}``.
        """
        if window < 1:
            raise BadRequest("the window must keep at least the newest revision")
        self._acquire_write_lock()
        self.checkpoint()
        head = self.head_revision
        first = max(1, head - window + 1)
        kept = set()
        for number in range(first, head + 1):
            kept.update(oid for _, oid in self._volatile_dirs(self._root(number)))
        retention = Tree().with_changes({f"{i:08d}".encode(): (MODE_TREE, oid) for i, oid in enumerate(sorted(kept))})
        tree_data = retention.encode()
        tree_oid = object_id(OBJ_TREE, tree_data)
        commit = Commit(tree_oid, (), COMMITTER, COMMITTER, int(time.time()),
                        f"volatile history kept from revision {first}\n\nKeg-Volatile-From: {first}\n")
        commit_data = commit.encode()
        commit_oid = object_id(OBJ_COMMIT, commit_data)
        pack_dir = os.path.join(self.path, "objects", "pack")
        write_pack(pack_dir, [(tree_oid, OBJ_TREE, tree_data), (commit_oid, OBJ_COMMIT, commit_data)],
                   durable=self.durable)
        self._write_ref(RETENTION_REF, commit_oid)
        named = self.source_pointers()
        with sources.repack_lock(self.path, exclusive=True):   # no pushed pack lands between listing and refs
            sources.reconcile(self.path, named)
            dropped = sources.prune_incoming(self.path, named.values())
            self._poll_repack(wait=True)
            _run_git_under_lock(self.path, "repack", "-a", "-d", "-q")
        # libgit2 keeps the old packs open; reopen so this process sees what the repack dropped.
        self._repo = pygit2.Repository(self.path)
        self.drop_caches()
        return {"from_revision": first, "kept_trees": len(kept), "dropped_sources": dropped}

    def source_pointers(self) -> dict:
        """``{app: commit hex}`` of the pushed sources ``/src/<app>`` names at the head."""
        try:
            entries = self.list("/src")
        except NotFound:
            return {}
        return {e.name: e.kid[2:] for e in entries if e.mode == MODE_GITLINK}

    # -------------------------------------------------------------- chunks

    def _reachable_chunks(self, first: int, last: int, keep: set, seen: set) -> None:
        """Add to ``keep`` every chunk named by a pointer blob in revisions ``first..last``.

        ``seen`` holds the tree and blob ids already examined, so the shared
        parts of the revisions are walked once.
        """
        for number in range(first, last + 1):
            stack = [self._root(number)]
            while stack:
                oid = stack.pop()
                try:
                    tree = self._tree(oid)
                except MissingObject:
                    continue  # compacted volatile history: nothing there is retained
                for _, mode, child in tree.items():
                    if child in seen or mode == MODE_GITLINK:
                        continue
                    seen.add(child)
                    if mode == MODE_TREE:
                        stack.append(child)
                        continue
                    try:
                        pointer = self._pointer(mode, child)
                    except (MissingObject, CorruptKeg):
                        continue
                    if pointer is not None:
                        keep.update(name for name, _ in pointer.chunks)

    def gc_chunks(self, grace: float = 3600.0) -> dict:
        """Delete the chunks no retained revision points at.

        A chunk is kept when any retained revision's pointer names it, or when
        its file was written or touched less than ``grace`` seconds before the
        collection began.  Writing a chunk, finding it already stored, and
        asking which chunks are missing all touch it, so a chunk uploaded for
        a transaction that commits later survives; and the commit itself
        checks, under the write lock, that every chunk it names is stored, so
        a pointer is never committed to a chunk that was collected.

        Returns:
            ``{"revisions": examined, "kept": chunks kept, "chunks": removed, "bytes": freed}``.
        """
        if grace < 0:
            raise BadRequest("the grace period cannot be negative")
        self._acquire_write_lock()
        started = time.time()
        keep: set = set()
        head = self.head_revision
        self._reachable_chunks(1, head, keep, set())
        removed = self.chunks.sweep(keep, started - grace)
        return {"revisions": head, "kept": len(keep), **removed}

    # ----------------------------------------------------------- diff and log

    def diff(self, rev_a, rev_b, prefix: str = "/") -> list:
        """The files that differ under ``prefix`` between two revisions.

        Subtrees whose ids are equal are skipped without being read, so the
        cost follows what changed, not the size of the namespace.

        Returns:
            ``(path, old_kid, new_kid)`` tuples in path order.
        """
        prefix = paths.normalize(prefix)
        a = 0 if rev_a in (0, "0") else self._revision_number(rev_a)
        b = self._revision_number(rev_b)
        out: list = []
        self._diff_entries(prefix, self._lookup(self._root(a), prefix), self._lookup(self._root(b), prefix), out)
        return out

    def _diff_entries(self, path: str, ea, eb, out: list) -> None:
        if ea == eb:
            return
        a_tree = ea is not None and ea[0] == MODE_TREE
        b_tree = eb is not None and eb[0] == MODE_TREE
        if not a_tree and not b_tree:
            out.append((path, _kid(ea[1]) if ea else None, _kid(eb[1]) if eb else None))
            return
        if ea is not None and not a_tree:
            out.append((path, _kid(ea[1]), None))
        ta = self._dir_tree(path, ea[1]) if a_tree else EMPTY_TREE
        tb = self._dir_tree(path, eb[1]) if b_tree else EMPTY_TREE
        changed = {e[e.index(b" ") + 1:e.index(b"\x00")] for e in set(ta._encoded) ^ set(tb._encoded)}
        for name in sorted(changed):
            child = paths.join(path, name.decode("utf-8", "surrogateescape"))
            self._diff_entries(child, self._view(child, ta.get(name)), self._view(child, tb.get(name)), out)
        if eb is not None and not b_tree:
            out.append((path, None, _kid(eb[1])))

    def log(self, path: str = "/", rev=None, limit: int | None = None) -> list:
        """Revisions that changed ``path`` (or anything under it), newest first.

        Returns:
            ``(Revision, kid)`` pairs: the path's KID after that revision, ``None`` when deleted.
        """
        path = paths.normalize(path)
        number = self._revision_number(rev)
        out = []
        after = self._lookup(self._root(number), path)
        while number >= 1 and (limit is None or len(out) < limit):
            try:
                before = self._lookup(self._root(number - 1), path)
            except NotFound:
                break  # volatile history older than this was compacted
            if before != after or path == paths.ROOT:  # every revision is a change of the namespace
                out.append((self.revision(number), _kid(after[1]) if after else None))
            number, after = number - 1, before
        return out

    # ------------------------------------------------------------------ watch

    def events(self, prefix: str = "/", since: int = 0, until: int | None = None):
        """Events under ``prefix`` for revisions ``since+1`` to ``until`` (default head), in order."""
        prefix = paths.normalize(prefix)
        head = self.head_revision
        until = head if until is None else until
        if since < 0 or since > head:
            raise BadRequest(f"--since {since} is outside the keg's revisions 0..{head}")
        if until < since or until > head:
            raise BadRequest(f"until={until} is outside revisions {since}..{head}")
        for number in range(since + 1, until + 1):
            for path, old, new in self.diff(number - 1, number, prefix):
                yield Event(number, path, old, new)

    def watch(self, prefix: str = "/", since: int | None = None, timeout: float | None = None,
              poll_interval: float = 0.05):
        """Follow events under ``prefix``: ordered, with no gaps, resumable from any revision.

        Yields every event after revision ``since`` (default: the head when
        called), then waits for new revisions, polling the ref every
        ``poll_interval`` seconds (another process writes them).  Stops when
        ``timeout`` seconds pass with nothing new.
        """
        prefix = paths.normalize(prefix)
        self.refresh()
        seen = self.head_revision if since is None else since
        if seen < 0 or seen > self.head_revision:
            raise BadRequest(f"since={seen} is outside the keg's revisions 0..{self.head_revision}")
        idle_since = time.monotonic()
        while True:
            head = self.refresh()
            if head > seen:
                yield from self.events(prefix, seen, head)
                seen = head
                idle_since = time.monotonic()
            elif timeout is not None and time.monotonic() - idle_since >= timeout:
                return
            else:
                time.sleep(poll_interval)

    # --------------------------------------------------------------- KIDs

    def _resolve_object(self, text: str) -> bytes:
        """The object id a full or short KID names (pending objects included)."""
        try:
            k = kidlib.parse(text)
        except kidlib.KidError as err:
            raise BadRequest(str(err)) from err
        hex_prefix = k.hex
        if k.is_full:
            oid = bytes.fromhex(hex_prefix)
            if self._unpacked(oid) is not None or self._repo.odb.exists(hex_prefix):
                return oid
            raise NotFound(f"{text} names no object in this keg")
        found = {oid for oid in (*self._pending, *self._packing) if oid.hex().startswith(hex_prefix)}
        try:
            obj = self._repo.get(hex_prefix)
            if obj is not None:
                found.add(bytes.fromhex(str(obj.id)))
        except ValueError:  # libgit2 reports an ambiguous prefix this way
            found |= {bytes.fromhex(str(o)) for o in self._repo.odb if str(o).startswith(hex_prefix)}
        if not found:
            raise NotFound(f"{text} names no object in this keg")
        if len(found) > 1:
            raise AmbiguousKid(text, sorted(_kid(o) for o in found))
        return found.pop()

    def resolve_kid(self, text: str) -> dict:
        """Say what a KID names: a file or tree value, a revision, or an identity.

        Returns:
            A dict with ``kid`` (full), ``kind`` and details: for a revision its
            number, for a value the head paths that hold it (up to 20), for an
            identity the path of the object that declares it.

        Raises:
            NotFound: nothing in this keg has that KID.
            AmbiguousKid: a short KID matches several.
        """
        try:
            oid = self._resolve_object(text)
        except NotFound:
            identity = self._find_identity(text)
            if identity is None:
                raise
            return identity
        obj_type, data = self._object(oid)
        kid = _kid(oid)
        if obj_type == OBJ_COMMIT:
            number = _revision_of_message(Commit.parse(data).message)
            return {"kid": kid, "kind": "revision", "revision": number,
                    "summary": Commit.parse(data).message.splitlines()[0]}
        kind = "tree" if obj_type == OBJ_TREE else "file"
        return {"kid": kid, "kind": kind, "size": len(data), "paths": self._paths_holding(oid, 20)}

    def _paths_holding(self, oid: bytes, most: int) -> list:
        if self.head_revision == 0:
            return []
        found, stack = [], [("/", self._root(self.head_revision))]
        if stack[0][1] == oid:
            return ["/"]
        while stack and len(found) < most:
            path, tree_oid = stack.pop()
            for name, mode, child in self._tree(tree_oid).items():
                child_path = paths.join(path, name.decode("utf-8", "surrogateescape"))
                mode, child = self._view(child_path, (mode, child))
                if child == oid:
                    found.append(child_path)
                if mode == MODE_TREE and child != oid:
                    stack.append((child_path, child))
        return sorted(found)

    def _find_identity(self, text: str) -> dict | None:
        """Find an identity KID declared in ``/users/*/user.json`` or ``/machines/…``."""
        if self.head_revision == 0:
            return None
        candidates = []
        for kind, where in (("user", "/users"), ("machine", "/machines")):
            if not self.exists(where):
                continue
            for entry in self.list(where):
                for obj_path in (f"{entry.path}/{kind}.json",):
                    value = self._json_at(obj_path)
                    ident = value.get("kid") if isinstance(value, dict) else None
                    if isinstance(ident, str) and ident.startswith(text):
                        candidates.append({"kid": ident, "kind": kind, "name": entry.name, "path": obj_path})
                if kind == "machine" and self.exists(entry.path + "/status"):
                    for status in self.list(entry.path + "/status"):
                        value = self._json_at(status.path)
                        ident = value.get("kid") if isinstance(value, dict) else None
                        if isinstance(ident, str) and ident.startswith(text):
                            candidates.append({"kid": ident, "kind": "process", "machine": entry.name,
                                               "path": status.path})
        if len(candidates) > 1 and len({c["kid"] for c in candidates}) > 1:
            raise AmbiguousKid(text, sorted({c["kid"] for c in candidates}))
        return candidates[0] if candidates else None

    def _json_at(self, path: str):
        try:
            return json.loads(self.read(path))
        except (KegError, ValueError):
            return None


def _names_of(tree: Tree) -> list:
    """A tree's names in name order (its keys are in git's order: a subdirectory's with "/" appended)."""
    if not len(tree):
        return []
    # One decode of all the keys, NUL-separated (no name holds a NUL or a "/"): 10,000 names in well under 1 ms.
    text = b"\x00".join(tree._keys).decode("utf-8", "surrogateescape") + "\x00"
    return sorted(text.replace("/\x00", "\x00")[:-1].split("\x00"))


def _ancestors(path: str):
    while path != paths.ROOT:
        path = paths.parent_of(path)
        yield path


def obj_type_name(obj_type: int) -> str:
    """``commit``, ``tree`` or ``blob`` for a git object type number."""
    return {OBJ_COMMIT: "commit", OBJ_TREE: "tree", OBJ_BLOB: "blob"}.get(obj_type, str(obj_type))


@dataclasses.dataclass(frozen=True)
class _Background:
    """A checkpoint whose pack a child process is writing."""

    pid: int
    revision: int   # the newest revision it makes part of the repository
    size: int       # bytes of the objects it writes
    sealed: str     # the journal segment it makes redundant


def _max_fd() -> int:
    try:
        return max(int(name) for name in os.listdir("/proc/self/fd")) + 1
    except (OSError, ValueError):
        return os.sysconf("SC_OPEN_MAX")


def _write_pack_and_exit(pack_dir: str, objects: list, durable: bool):
    """The child of a background checkpoint: write the pack, exit 0 (or 1 with a message); never returns."""
    status = 1
    try:
        gc.disable()  # a collection would touch, and so copy, every page of the parent's heap
        signal.set_wakeup_fd(-1)  # the parent's event loop owns it
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        _die_with_parent()
        os.closerange(3, _max_fd())  # the parent's sockets and lock close when the parent closes them
        write_pack(pack_dir, objects, durable=durable)
        status = 0
    except BaseException as err:  # noqa: BLE001 - report anything; the parent retries in the foreground
        try:
            os.write(2, f"keg: background checkpoint failed: {err}\n".encode())
        except OSError:
            pass
    finally:
        os._exit(status)


def _git_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env["GIT_CONFIG_NOSYSTEM"] = "1"
    return env


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # A git child must not outlive the writer that holds the lock: if the writer
    # is killed, an unfinished repack is killed too (git leaves the old packs in place).
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class _Repack:
    """A git maintenance command running in a child, tied to this (lock-holding) process's life."""

    def __init__(self, proc: subprocess.Popen, args: tuple, errors):
        self.proc, self.args, self.errors = proc, args, errors

    @classmethod
    def start(cls, keg_path: str, *args: str) -> "_Repack":
        errors = tempfile.TemporaryFile()   # git's messages, read if it fails; never a pipe left full
        proc = subprocess.Popen(["git", "-C", keg_path, *args], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=errors, env=_git_env(),
                                preexec_fn=_die_with_parent)
        return cls(proc, args, errors)

    def done(self, wait: bool) -> bool:
        """True once the command has ended (``wait``: block until it has)."""
        return (self.proc.wait() if wait else self.proc.poll()) is not None

    def check(self) -> None:
        """Raise ``CorruptKeg`` with git's message if the ended command failed."""
        self.errors.seek(0)
        message = self.errors.read().decode(errors="replace").strip()
        self.errors.close()
        if self.proc.returncode != 0:
            raise CorruptKeg(f"git {' '.join(self.args)} failed (exit status {self.proc.returncode}): {message}")


def _run_git_under_lock(keg_path: str, *args: str) -> None:
    """Run a git maintenance command on the keg, tied to this (lock-holding) process's life."""
    done = subprocess.run(["git", "-C", keg_path, *args], capture_output=True, env=_git_env(),
                          preexec_fn=_die_with_parent, check=False)
    if done.returncode != 0:
        raise CorruptKeg(f"git {' '.join(args)} failed in {keg_path}: {done.stderr.decode(errors='replace').strip()}")
