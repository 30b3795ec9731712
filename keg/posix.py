"""The POSIX view: a subtree of a keg as ordinary files, kept in two-way sync (DESIGN §3).

:func:`checkout` writes the subtree ``prefix`` of a keg (a local ``Store`` or
a ``RemoteKeg``) as plain files under a directory, each one written to a
temporary file and renamed into place.  A :class:`Sync` then keeps the two
in step: local edits become one transaction per quiet period, guarded by
compares on the KIDs the files were checked out at; changes in the keg are
written to the files.  Programs use ``open``/``read``/``write`` only.

Kinds of entries:

* ``file``: a regular file; mode 100755 sets the exec bit.  Large values are
  streamed chunk by chunk both ways, never held whole in memory.
* ``link``: a symlink when its target stays inside the directory, otherwise a
  plain file holding the target text (with a warning).  Links are written
  from the keg but local changes to them are not pushed (a master's
  transaction form has no link mode); deleting one is.
* ``pointer`` (a gitlink to another keg): skipped, with a note.

State lives in ``DIR/.keg/sync.json`` (never a token)::

    {"format": 1, "source": {"url": "http://127.0.0.1:7480"} | {"keg": "/abs/keg"},
     "prefix": "/apps/web", "revision": 42,
     "checkout": {"revision": 40, "kid": "K-…"},
     "files": {"conf/app.json": {"kid": "K-…", "mode": "100644", "size": 120,
                                 "mtime_ns": …, "hash": "<blake3 hex of the bytes>", "seen_ns": …},
               "current": {"kid": "K-…", "kind": "link", "target": "releases/7"},
               "vendor/lib": {"kid": "K-…", "kind": "pointer"}}}

``revision`` is the keg revision the files reflect (apart from local edits);
``files`` holds, per relative path, the KID it was last synced at and what the
local file looked like then.  A file whose size, mtime and mode are unchanged
is taken as unchanged unless its mtime is within two seconds of when it was
recorded (a "racy" file, as git calls it), in which case it is hashed.

Conflicts: when a path changed both here and in the keg since the last sync,
the keg's version is put at the path and the local one is kept beside it as
``NAME.conflict-<first 8 hex of its blake3>``; a line on stderr names both.
The conflict copy is then pushed like any new file, so neither version is
lost.  A local delete against a remote change restores the keg's version.

Ignored: ``DIR/.keg/``, editor temporary files (``*.swp``, ``*.swx``, ``*~``,
``.#*``, vim's ``4913`` probe) and the sync's own temporary files, which are
written under ``DIR/.keg/tmp/``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import fnmatch
import io
import json
import os
import stat as statmod
import sys
import threading
import time
import uuid
from dataclasses import dataclass

import blake3
import pygit2

from keg import paths
from keg.errors import BadRequest, CompareFailed, KegError, NotFound
from keg.fsio import write_file_atomic
from keg.store import Event
from keg.transaction import Author, Transaction, TxResult, compare, delete

FORMAT = 1
STATE_DIR = ".keg"
STATE_FILE = "sync.json"
TMP_DIR = "tmp"
QUIET_PERIOD = 0.3
RACY_NS = 2_000_000_000
BLOCK = 1 << 20
IGNORED = ("*.swp", "*.swx", "*~", ".#*", "4913")
PUSH_ATTEMPTS = 3
WATCH_IDLE = 2.0
MODE_FILE, MODE_EXEC, MODE_LINK = 0o100644, 0o100755, 0o120000
SYNC_AUTHOR = Author("keg sync", "keg@localhost")
FS_EVENTS = ("created", "modified", "deleted", "moved", "closed", "attrib")


# ----------------------------------------------------------------- errors

class NotACheckout(BadRequest):
    """A directory without ``.keg/sync.json``."""


class DirectoryNotEmpty(BadRequest):
    """``checkout`` into a directory that already holds files."""


class WrongKeg(BadRequest):
    """The keg given to ``sync`` is not the one the directory was checked out from."""


class SyncRunning(KegError):
    """Another sync holds the checkout."""

    exit_code = 5


# ---------------------------------------------------------------- helpers

def is_ignored(rel: str) -> bool:
    """True for paths the sync never pushes: ``.keg/`` and editor temporary files.

    Args:
        rel: a path relative to the checkout, ``/``-separated.
    """
    parts = rel.split("/")
    if parts[0] == STATE_DIR or ".git" in parts:
        return True
    return any(fnmatch.fnmatchcase(parts[-1], pattern) for pattern in IGNORED)


def source_of(store) -> dict:
    """Where a keg handle reads from, as recorded in ``sync.json``: a URL or a keg directory, never a token."""
    urls = getattr(store, "urls", None)
    if urls:
        return {"url": ",".join(urls)}
    return {"keg": store.path}


def _reopen(store):
    """A second handle on the same keg, for another thread (a handle is not shared between threads)."""
    urls = getattr(store, "urls", None)
    if urls:
        return type(store)(",".join(urls), store.token)
    return type(store)(store.path)


def _head(store) -> int:
    """The newest revision, seeing other processes' checkpointed writes on a local keg."""
    refresh = getattr(store, "refresh", None)
    return refresh() if refresh is not None else store.revision().number


def hash_file(path: str) -> str:
    """The blake3 hex digest of a file's bytes, read a block at a time."""
    digest = blake3.blake3()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _mode_of(st: os.stat_result) -> int:
    return MODE_EXEC if st.st_mode & 0o100 else MODE_FILE


class _HashingReader(io.RawIOBase):
    """Reads a file for ``put_stream`` and hashes what passes through."""

    def __init__(self, f):
        super().__init__()
        self.f = f
        self.digest = blake3.blake3()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.f.readinto(b) or 0
        if n:
            self.digest.update(memoryview(b)[:n])
            self.size += n
        return n


@dataclass(frozen=True)
class LocalChange:
    """A local difference from the recorded state: ``put`` the file at ``path`` or ``delete`` it.

    ``path`` is relative to the checkout; ``base_kid`` is the KID it was
    synced at (``None`` for a new file), which the push compares against.
    """

    path: str
    action: str
    base_kid: str | None
    mode: int = MODE_FILE


@dataclass(frozen=True)
class Local:
    """What is at a relative path on disk, against the record.

    ``status`` is ``same``, ``changed`` (a regular file whose bytes or mode
    differ), ``new`` (a regular file with no record), ``deleted`` (recorded,
    no longer a regular file), ``absent`` (neither), or ``other`` (an
    unrecorded symlink or a changed link: not pushed).
    """

    status: str
    hash: str | None = None
    mode: int = MODE_FILE


@dataclass
class CheckoutSummary:
    """What :func:`checkout` wrote."""

    revision: int
    files: int = 0
    bytes: int = 0
    links: int = 0
    notes: list = dataclasses.field(default_factory=list)


@dataclass
class StepReport:
    """What one :meth:`Sync.step` did."""

    pulled: int = 0
    pushed: int = 0
    revision: int | None = None
    conflicts: list = dataclasses.field(default_factory=list)
    error: KegError | None = None


# ------------------------------------------------------------------ state

@dataclass
class CheckoutState:
    """The content of ``DIR/.keg/sync.json`` (see the module docstring)."""

    directory: str
    source: dict
    prefix: str
    revision: int
    checkout: dict
    files: dict

    @classmethod
    def load(cls, directory: str) -> "CheckoutState":
        """Read the state of a checkout.

        Raises:
            NotACheckout: ``directory`` has no (readable) ``.keg/sync.json``.
        """
        directory = os.path.abspath(directory)
        path = os.path.join(directory, STATE_DIR, STATE_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                obj = json.load(f)
            if obj.get("format") != FORMAT:
                raise NotACheckout(f"{path} has format {obj.get('format')}; this Keg reads format {FORMAT}")
            return cls(directory, obj["source"], obj["prefix"], int(obj["revision"]), obj["checkout"], obj["files"])
        except FileNotFoundError as err:
            raise NotACheckout(f"{directory} is not a checkout (no {STATE_DIR}/{STATE_FILE}); "
                               f"make one with 'keg checkout PREFIX {directory}'") from err
        except (ValueError, KeyError, TypeError) as err:
            raise NotACheckout(f"{path} is damaged ({err}); check out again into a new directory") from err

    def save(self) -> None:
        """Write the state atomically (temporary file and rename)."""
        obj = {"format": FORMAT, "source": self.source, "prefix": self.prefix, "revision": self.revision,
               "checkout": self.checkout, "files": self.files}
        data = json.dumps(obj, indent=1, sort_keys=True).encode() + b"\n"
        write_file_atomic(os.path.join(self.directory, STATE_DIR, STATE_FILE), data, durable=False)

    def keg_path(self, rel: str) -> str:
        """The keg path of a relative path."""
        return self.prefix.rstrip("/") + "/" + rel

    def rel_path(self, keg_path: str) -> str | None:
        """The relative path of a keg path under the prefix, ``None`` for the prefix itself or outside it."""
        if keg_path == self.prefix or not paths.is_under(keg_path, self.prefix):
            return None
        return keg_path[1:] if self.prefix == paths.ROOT else keg_path[len(self.prefix) + 1:]


# --------------------------------------------------------------- work tree

class WorkTree:
    """The files of a checkout and their records: examine, write and remove them.

    Args:
        state: the checkout's state (its ``files`` are updated in place).
        say: called with one line for the user (stderr by default).
    """

    def __init__(self, state: CheckoutState, say=None):
        self.state = state
        self.root = state.directory
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.tmp = os.path.join(self.root, STATE_DIR, TMP_DIR)
        self.refreshed = False  # a record's stat fields were updated after hashing: worth saving
        os.makedirs(self.tmp, exist_ok=True)

    def abs(self, rel: str) -> str:
        """The file system path of a relative path."""
        return os.path.join(self.root, *rel.split("/"))

    # .................................................................. reading

    def walk(self, rel: str = ""):
        """Relative paths of the regular files and symlinks at or under ``rel`` (not following links)."""
        top = self.abs(rel) if rel else self.root
        try:
            st = os.lstat(top)
        except FileNotFoundError:
            return
        if not statmod.S_ISDIR(st.st_mode):
            if rel and not is_ignored(rel):
                yield rel
            return
        for dirpath, dirnames, filenames in os.walk(top):
            base = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            base = "" if base == "." else base + "/"
            links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
            dirnames[:] = [d for d in dirnames if d not in links and not is_ignored(base + d)]
            for name in sorted(filenames + links):
                if not is_ignored(base + name):
                    yield base + name

    def examine(self, rel: str) -> Local:
        """Compare the file at ``rel`` with its record (hashing only when size, mtime or mode cannot tell)."""
        record = self.state.files.get(rel)
        try:
            st = os.lstat(self.abs(rel))
        except (FileNotFoundError, NotADirectoryError):
            return Local("absent" if record is None else "deleted")
        kind = (record or {}).get("kind", "file")
        if kind == "pointer":
            return Local("same")
        if kind == "link":
            return self._examine_link(rel, record, st)
        if statmod.S_ISLNK(st.st_mode):
            return Local("other" if record is None else "deleted")
        if not statmod.S_ISREG(st.st_mode):
            return Local("absent" if record is None else "deleted")
        mode = _mode_of(st)
        if record is None:
            return Local("new", hash_file(self.abs(rel)), mode)
        if self._unchanged(record, st):
            return Local("same", record["hash"], mode)
        digest = hash_file(self.abs(rel))
        if digest == record["hash"] and mode == int(record["mode"], 8):
            record.update(size=st.st_size, mtime_ns=st.st_mtime_ns, seen_ns=time.time_ns())
            self.refreshed = True
            return Local("same", digest, mode)
        return Local("changed", digest, mode)

    @staticmethod
    def _unchanged(record: dict, st: os.stat_result) -> bool:
        return (st.st_size == record["size"] and st.st_mtime_ns == record["mtime_ns"]
                and _mode_of(st) == int(record["mode"], 8) and st.st_mtime_ns + RACY_NS < record["seen_ns"])

    def _examine_link(self, rel: str, record: dict, st: os.stat_result) -> Local:
        if record.get("as_file"):
            if statmod.S_ISREG(st.st_mode) and self._unchanged(record, st):
                return Local("same")
            if statmod.S_ISREG(st.st_mode) and hash_file(self.abs(rel)) == record["hash"]:
                return Local("same")
        elif statmod.S_ISLNK(st.st_mode) and os.readlink(self.abs(rel)) == record["target"]:
            return Local("same")
        return Local("other")

    # .................................................................. writing

    def _make_room(self, rel: str) -> None:
        """Clear the way for a file at ``rel``: parent directories exist, no directory at ``rel``."""
        parts = rel.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            where = self.abs(parent)
            if os.path.islink(where) or (os.path.exists(where) and not os.path.isdir(where)):
                moved = self.set_aside(parent)
                self.say(f"keg sync: conflict: {parent} is a directory in the keg; yours is now {moved}")
        os.makedirs(os.path.dirname(self.abs(rel)), exist_ok=True)
        target = self.abs(rel)
        if os.path.isdir(target) and not os.path.islink(target):
            moved = self.set_aside(rel)
            self.say(f"keg sync: conflict: {rel} is a file in the keg; your directory is now {moved}")

    def set_aside(self, rel: str, digest: str | None = None) -> str:
        """Rename what is at ``rel`` to ``rel.conflict-<hash>`` and return the new relative path.

        The copy has no record, so the next scan finds it new and pushes it.
        """
        where = self.abs(rel)
        if digest is None:
            digest = hash_file(where) if os.path.isfile(where) and not os.path.islink(where) else uuid.uuid4().hex
        name, n = f"{rel}.conflict-{digest[:8]}", 1
        while os.path.lexists(self.abs(name)):
            n += 1
            name = f"{rel}.conflict-{digest[:8]}-{n}"
        os.replace(where, self.abs(name))
        self.state.files.pop(rel, None)
        return name

    def write(self, store, entry, rev) -> str:
        """Write the value ``entry`` (from ``store`` at ``rev``) at its path, through a temporary file.

        Returns:
            A note for the user (a skipped pointer, a link written as a file), or "".
        """
        rel = self.state.rel_path(entry.path)
        if entry.kind == "pointer":
            self.state.files[rel] = {"kid": entry.kid, "kind": "pointer"}
            return f"skipped {entry.path}: a pointer to another keg ({entry.kid}), not checked out"
        self._make_room(rel)
        tmp = os.path.join(self.tmp, uuid.uuid4().hex)
        try:
            if entry.kind == "link":
                return self._write_link(store, entry, rev, rel, tmp)
            self._write_file(store, entry, rev, rel, tmp)
            return ""
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)  # the write failed half-way: the old file is still in place

    def _write_file(self, store, entry, rev, rel: str, tmp: str) -> None:
        with store.open(entry.path, rev) as src, open(tmp, "wb") as dst:
            digest = blake3.blake3()
            for block in iter(lambda: src.read(BLOCK), b""):
                digest.update(block)
                dst.write(block)
            if entry.mode == MODE_EXEC:
                mode = os.fstat(dst.fileno()).st_mode
                os.fchmod(dst.fileno(), mode | (mode & 0o444) >> 2)
        self._install(tmp, rel, {"kid": entry.kid, "mode": f"{entry.mode:06o}", "hash": digest.hexdigest()})

    def _install(self, tmp: str, rel: str, record: dict) -> None:
        os.replace(tmp, self.abs(rel))
        st = os.lstat(self.abs(rel))
        record.update(size=st.st_size, mtime_ns=st.st_mtime_ns, seen_ns=time.time_ns())
        self.state.files[rel] = record

    def _write_link(self, store, entry, rev, rel: str, tmp: str) -> str:
        target = store.read(entry.path, rev).decode("utf-8", "surrogateescape")
        landing = os.path.normpath(os.path.join(os.path.dirname(self.abs(rel)), target))
        inside = not os.path.isabs(target) and landing.startswith(self.root + os.sep) \
            and not paths.is_under(os.path.relpath(landing, self.root).replace(os.sep, "/"), STATE_DIR)
        if inside:
            os.symlink(target, tmp)
            os.replace(tmp, self.abs(rel))
            self.state.files[rel] = {"kid": entry.kid, "kind": "link", "target": target}
            return ""
        with open(tmp, "wb") as f:
            f.write(target.encode("utf-8", "surrogateescape"))
        self._install(tmp, rel, {"kid": entry.kid, "kind": "link", "as_file": True, "target": target,
                                 "mode": f"{MODE_FILE:06o}", "hash": blake3.blake3(target.encode(
                                     "utf-8", "surrogateescape")).hexdigest()})
        return (f"warning: {entry.path} is a symlink to {target!r}, outside the checkout; "
                f"written as a plain file holding the target")

    def remove(self, rel: str) -> None:
        """Delete the file at ``rel`` and its record, then the directories it leaves empty."""
        self.state.files.pop(rel, None)
        try:
            os.unlink(self.abs(rel))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            pass
        parent = os.path.dirname(self.abs(rel))
        while parent != self.root:
            try:
                os.rmdir(parent)
            except OSError:
                break
            parent = os.path.dirname(parent)

    def same_content(self, store, entry, rev, digest: str) -> bool:
        """True when the local file at ``entry``'s path has exactly the bytes of ``entry``."""
        if entry.kind != "file":
            return False
        local = self.abs(self.state.rel_path(entry.path))
        if os.path.getsize(local) != entry.size:
            return False
        if entry.large:
            pointer = store.pointer(entry.path, rev)
            return pointer is not None and pointer.blake3 == digest
        with open(local, "rb") as f:
            return "K-" + str(pygit2.hash(f.read())) == entry.kid


# ---------------------------------------------------------------- checkout

def checkout(store, prefix: str, directory: str, rev=None, say=None) -> CheckoutSummary:
    """Write the subtree ``prefix`` of ``store`` as ordinary files under ``directory``.

    Args:
        store: a ``keg.Store`` or ``master.client.RemoteKeg``.
        prefix: the keg directory to check out (it may not exist yet: the
            checkout is then empty, and files added to it create it).
        directory: where to write; created if missing, refused if it holds anything.
        rev: the revision to check out (default: the newest).
        say: called with a line for each note (stderr by default).

    Returns:
        A :class:`CheckoutSummary`.

    Raises:
        DirectoryNotEmpty: ``directory`` already holds files.
        BadRequest: ``prefix`` is a file, not a directory.
    """
    prefix = paths.normalize(prefix)
    directory = os.path.abspath(directory)
    _check_empty(directory)
    revision = store.revision(rev)
    try:
        top = store.stat(prefix, revision.number)
    except NotFound:
        top = None
    if top is not None and top.kind != "tree":
        raise BadRequest(f"{prefix} is a {top.kind}, not a directory; check out the directory holding it")
    os.makedirs(os.path.join(directory, STATE_DIR), exist_ok=True)
    state = CheckoutState(directory, source_of(store), prefix, revision.number,
                          {"revision": revision.number, "kid": revision.kid}, {})
    tree = WorkTree(state, say)
    summary = CheckoutSummary(revision.number)
    if top is None:
        summary.notes.append(f"{prefix} does not exist at revision {revision.number}; "
                             "files you add here create it when synced")
    else:
        _write_tree(store, tree, prefix, revision.number, summary)
    state.save()
    for note in summary.notes:
        tree.say(f"keg checkout: {note}")
    return summary


def _check_empty(directory: str) -> None:
    if os.path.exists(os.path.join(directory, STATE_DIR, STATE_FILE)):
        raise DirectoryNotEmpty(f"{directory} is already a checkout; keep it up to date with "
                                f"'keg sync {directory}', or check out into a new directory")
    if os.path.isdir(directory) and os.listdir(directory):
        raise DirectoryNotEmpty(f"{directory} is not empty and not a checkout; give a new or empty directory")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise DirectoryNotEmpty(f"{directory} is a file; give a new or empty directory")


def _write_tree(store, tree: WorkTree, path: str, rev: int, summary: CheckoutSummary) -> None:
    for entry in store.list(path, rev):
        rel = tree.state.rel_path(entry.path)
        if rel.split("/")[0] == STATE_DIR:
            summary.notes.append(f"skipped {entry.path}: the name {STATE_DIR} is the checkout's own state")
            continue
        if entry.kind == "tree":
            os.makedirs(tree.abs(rel), exist_ok=True)
            _write_tree(store, tree, entry.path, rev, summary)
            continue
        note = tree.write(store, entry, rev)
        if note:
            summary.notes.append(note)
        if entry.kind == "file":
            summary.files += 1
            summary.bytes += entry.size
        elif entry.kind == "link":
            summary.links += 1


# -------------------------------------------------------------------- sync

class Sync:
    """Keeps a checkout and its keg in two-way sync.

    A loop you can step: :meth:`scan_local` finds local changes,
    :meth:`push` sends them as one transaction, :meth:`pull` and
    :meth:`apply_remote` bring in the keg's changes, :meth:`step` does one
    round of all that, and :meth:`run` does it continuously with a watchdog
    observer (local edits, after ``quiet_period`` seconds without one) and a
    thread following ``store.watch`` (remote changes, at once).

    Args:
        store: the keg the directory was checked out from (``keg.Store`` or
            ``RemoteKeg``); a local keg's write lock is given up after each
            push, so that other processes can write between them.
        directory: the checkout.
        quiet_period: seconds without a local file event before pushing.
        say: called with one line per thing done or noticed (stderr by default).

    Raises:
        NotACheckout: ``directory`` is not a checkout.
        WrongKeg: ``store`` is not the keg the checkout came from.
    """

    def __init__(self, store, directory: str, quiet_period: float = QUIET_PERIOD, say=None):
        self.store = store
        self.state = CheckoutState.load(directory)
        self._lock_fd = _lock_checkout(self.state.directory)
        self.tree = WorkTree(self.state, say)
        self.say = self.tree.say
        self.quiet_period = quiet_period
        try:
            self._check_keg()
        except BaseException:
            self.close()
            raise
        self._dirty: set = set()
        self._dirty_lock = threading.Lock()
        self._last_fs_event = 0.0
        self._remote_ready = False
        self._wake = threading.Event()
        self._warned: set = set()
        self.conflicts: list = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Let another sync use the checkout."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _check_keg(self) -> None:
        base = self.state.checkout
        try:
            kid = self.store.revision(base["revision"]).kid
        except NotFound:
            kid = None
        if kid != base["kid"]:
            raise WrongKeg(f"{self.state.directory} was checked out from {describe_source(self.state.source)} "
                           f"(revision {base['revision']} is {base['kid']}), and this keg differs; "
                           "sync with the keg it came from")

    # .................................................................. local

    def scan_local(self, only=None) -> list:
        """The local changes since the last sync, in path order.

        Args:
            only: relative paths to look at (a directory means everything
                under it); ``None`` looks at the whole checkout.

        Returns:
            :class:`LocalChange` records.
        """
        candidates: set = set()
        for rel in ([""] if only is None else only):
            candidates.update(self.tree.walk(rel))
            candidates.update(r for r in self.state.files if not rel or r == rel or r.startswith(rel + "/"))
        changes = []
        for rel in sorted(candidates):
            change = self._change_at(rel)
            if change is not None:
                changes.append(change)
        if self.tree.refreshed:
            self.tree.refreshed = False
            self.state.save()  # so the next scan need not hash the same files again
        return changes

    def _change_at(self, rel: str) -> LocalChange | None:
        if is_ignored(rel) or not self._valid(rel):
            return None
        local = self.tree.examine(rel)
        base = (self.state.files.get(rel) or {}).get("kid")
        if local.status in ("new", "changed"):
            return LocalChange(rel, "put", base, local.mode)
        if local.status == "deleted":
            return LocalChange(rel, "delete", base)
        if local.status == "other" and rel not in self._warned:
            self._warned.add(rel)
            self.say(f"keg sync: not pushing {rel}: symlinks are synced from the keg only")
        return None

    def _valid(self, rel: str) -> bool:
        try:
            paths.normalize(self.state.keg_path(rel))
            return True
        except BadRequest as err:
            if rel not in self._warned:
                self._warned.add(rel)
                self.say(f"keg sync: not pushing {rel}: {err}")
            return False

    def push(self, changes) -> TxResult | None:
        """Send local changes as one transaction, each guarded by a compare on its base KID.

        A file is streamed (large ones as chunks), never read whole.  On
        success the records are updated; on a failed compare nothing changes
        here and the caller pulls (which resolves conflicts) and pushes again.

        Returns:
            The transaction's result, or ``None`` when there was nothing to send.
        """
        ops, compares, records = [], [], {}
        for change in changes:
            path = self.state.keg_path(change.path)
            if change.action == "put":
                try:
                    op, records[change.path] = self._stream(change)
                except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                    if change.base_kid is None:
                        continue  # created and gone again before we read it
                    op = delete(path)
            else:
                op = delete(path)
            ops.append(op)
            compares.append(compare(path, change.base_kid))
        if not ops:
            return None
        try:
            result = self.store.apply(Transaction(tuple(ops), tuple(compares), SYNC_AUTHOR))
        finally:
            if getattr(self.store, "is_writer", False):
                self.store.close()  # checkpoint, and let other processes write
        if result.ok:
            self._record_push(result, records)
        return result

    def _stream(self, change: LocalChange):
        with open(self.tree.abs(change.path), "rb") as f:
            st = os.fstat(f.fileno())
            if not statmod.S_ISREG(st.st_mode):
                raise IsADirectoryError(change.path)
            reader = _HashingReader(f)
            op = self.store.put_stream(self.state.keg_path(change.path), reader, change.mode)
        record = {"mode": f"{change.mode:06o}", "hash": reader.digest.hexdigest(), "size": reader.size,
                  "mtime_ns": st.st_mtime_ns, "seen_ns": time.time_ns()}
        if reader.size != st.st_size:
            record["size"] = st.st_size  # it changed as we read it: the next scan hashes it again
        return op, record

    def _record_push(self, result, records: dict) -> None:
        for path, kid in result.kids.items():
            rel = self.state.rel_path(path)
            if kid is None:
                self.state.files.pop(rel, None)
            else:
                self.state.files[rel] = {"kid": kid, **records[rel]}
        self.state.save()
        self.say(f"keg sync: pushed {len(result.kids)} change(s) as revision {result.revision}")
        # Move the base past our revision, applying what others changed up to it (the same group
        # commit may hold their transactions too); our own paths already carry their new KIDs.
        self.pull(result.revision)

    # ................................................................. remote

    def pull(self, upto: int | None = None) -> int:
        """Bring the files up to revision ``upto`` (default: the keg's newest).

        Returns:
            The number of paths written or removed.
        """
        head = _head(self.store) if upto is None else upto
        if head <= self.state.revision:
            return 0
        changes = self.store.diff(self.state.revision, head, self.state.prefix)
        return self.apply_remote([Event(head, path, old, new) for path, old, new in changes])

    def apply_remote(self, events) -> int:
        """Apply the keg's changes to the files, keeping both versions on a conflict.

        Args:
            events: ``Event`` records in revision order, covering whole
                revisions; those at or before the state's revision are skipped.

        Returns:
            The number of paths written or removed.
        """
        final: dict = {}
        top = self.state.revision
        for event in events:
            rel = self.state.rel_path(event.path)
            if event.revision <= self.state.revision or rel is None or rel.split("/")[0] == STATE_DIR:
                continue
            final[rel] = event.new_kid
            top = max(top, event.revision)
        done = 0
        for rel in sorted((r for r, k in final.items() if k is None), reverse=True):
            done += self._remote_delete(rel)
        for rel in sorted(r for r, k in final.items() if k is not None):
            done += self._remote_put(rel, final[rel], top)
        self.state.revision = top
        self.state.save()
        if done:
            self.say(f"keg sync: pulled revision {top}: {done} path(s) updated")
        return done

    def _remote_delete(self, rel: str) -> int:
        if rel not in self.state.files and not os.path.lexists(self.tree.abs(rel)):
            return 0
        local = self.tree.examine(rel)
        if local.status in ("new", "changed"):
            copy = self.tree.set_aside(rel, local.hash)
            self._conflict(rel, copy, "deleted in the keg, changed here")
            return 1
        self.tree.remove(rel)
        return 1

    def _remote_put(self, rel: str, kid: str, rev: int) -> int:
        record = self.state.files.get(rel)
        if record is not None and record["kid"] == kid:
            return 0  # already here: most often our own push coming back
        entry = self.store.stat(self.state.keg_path(rel), rev)
        if entry.kind == "tree":
            return 0  # events name files; a directory's files have events of their own
        local = self.tree.examine(rel)
        if local.status == "other" and record is None:
            moved = self.tree.set_aside(rel)
            self.say(f"keg sync: {rel} is now a value in the keg; your symlink is now {moved}")
        elif local.status in ("new", "changed"):
            if self.tree.same_content(self.store, entry, rev, local.hash):
                self.state.files[rel] = self._adopted(rel, entry, local)
                return 0
            copy = self.tree.set_aside(rel, local.hash)
            self._conflict(rel, copy, "changed here and in the keg")
        elif local.status == "deleted":
            self.say(f"keg sync: {rel} was deleted here but changed in the keg; restored the keg's version")
        note = self.tree.write(self.store, entry, rev)
        if note:
            self.say(f"keg sync: {note}")
        return 1

    def _adopted(self, rel: str, entry, local: Local) -> dict:
        st = os.lstat(self.tree.abs(rel))
        return {"kid": entry.kid, "mode": f"{local.mode:06o}", "hash": local.hash, "size": st.st_size,
                "mtime_ns": st.st_mtime_ns, "seen_ns": time.time_ns()}

    def _conflict(self, rel: str, copy: str, what: str) -> None:
        self.conflicts.append((rel, copy))
        self._mark_dirty(copy)
        self.say(f"keg sync: conflict on {self.state.keg_path(rel)}: {what} since revision "
                 f"{self.state.revision}; kept the keg's version at {rel} and yours at {copy}")

    # ................................................................... step

    def step(self, full: bool = True) -> StepReport:
        """One round: pull, push local changes (pulling again on a concurrent change), pull.

        Args:
            full: scan the whole checkout; otherwise only paths marked dirty by file events.
        """
        report = StepReport()
        report.pulled += self.pull()
        only = None if full else self._take_dirty()
        for _ in range(PUSH_ATTEMPTS):
            changes = self.scan_local(only)
            try:
                result = self.push(changes)
            except KegError as err:
                if not _worth_retrying(err):
                    report.error = err
                    self.say(f"keg sync: could not push: {err}; fix the files and save them again")
                    break
                for change in changes:  # an unreachable or busy keg: try these again later
                    self.on_file_event(self.tree.abs(change.path))
                raise
            if result is None or result.ok:
                if result is not None:
                    report.pushed += len(result.kids)
                    report.revision = result.revision
                break
            if not isinstance(result.error, CompareFailed):
                report.error = result.error
                self.say(f"keg sync: could not push: {result.error}; fix the files and save them again")
                break
            report.pulled += self.pull()  # sets conflicting local versions aside
            if only is not None:
                only = {c.path for c in changes} | self._take_dirty()
        else:
            report.error = KegError("the keg kept changing under the push; local changes are kept for the next try")
        report.pulled += self.pull()
        report.conflicts = list(self.conflicts)
        return report

    def _mark_dirty(self, rel: str) -> None:
        with self._dirty_lock:
            self._dirty.add(rel)

    def _take_dirty(self) -> set:
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, set()
        return dirty

    # .................................................................... run

    def run(self, stop: threading.Event, ready=None) -> None:
        """Sync until ``stop`` is set: file events after a quiet period, keg changes at once.

        Args:
            stop: set it (from a signal handler or another thread) to end.
            ready: called once the first full round is done and watching has begun.
        """
        from watchdog.observers import Observer

        observer = Observer()
        observer.schedule(_FileEvents(self), self.state.directory, recursive=True)
        observer.start()
        follower = threading.Thread(target=self._follow, args=(stop,), name="keg-sync-watch", daemon=True)
        try:
            self.step(full=True)
            follower.start()
            if ready is not None:
                ready()
            while not stop.is_set():
                self._tick()
        finally:
            stop.set()
            self._wake.set()
            observer.stop()
            observer.join()
            if follower.is_alive():
                follower.join(timeout=0.2)  # a daemon thread: it ends with its watch timeout

    def _tick(self) -> None:
        with self._dirty_lock:
            quiet_left = self._last_fs_event + self.quiet_period - time.monotonic() if self._dirty else None
        if quiet_left is None or quiet_left > 0:
            self._wake.wait(0.5 if quiet_left is None else min(quiet_left, 0.5))
            self._wake.clear()
        try:
            if self._remote_ready:
                self._remote_ready = False
                self.pull()
            with self._dirty_lock:
                due = self._dirty and time.monotonic() - self._last_fs_event >= self.quiet_period
            if due:
                self.step(full=False)
        except KegError as err:
            self.say(f"keg sync: {err}; will try again")
            self._remote_ready = True
            time.sleep(0.5)  # back off before retrying an unreachable or busy keg

    def _follow(self, stop: threading.Event) -> None:
        """Follow the keg's watch stream; each event wakes the main loop, which pulls."""
        since = self.state.revision
        watcher = _reopen(self.store)
        try:
            while not stop.is_set():
                try:
                    for event in watcher.watch(self.state.prefix, since=since, timeout=WATCH_IDLE):
                        since = max(since, event.revision)  # the pull diffs whole revisions
                        self._remote_ready = True
                        self._wake.set()
                        if stop.is_set():
                            return
                except KegError as err:
                    self.say(f"keg sync: watching the keg failed ({err}); retrying")
                    stop.wait(1.0)
        finally:
            watcher.close()

    def on_file_event(self, path: str) -> None:
        """Note a file system event at an absolute ``path`` (called from watchdog's thread)."""
        rel = os.path.relpath(path, self.state.directory).replace(os.sep, "/")
        if rel == "." or rel.startswith("../") or is_ignored(rel):
            return
        with self._dirty_lock:
            self._dirty.add(rel)
            self._last_fs_event = time.monotonic()
        self._wake.set()


def _lock_checkout(directory: str) -> int:
    """Hold ``DIR/.keg/lock`` so that one sync at a time writes the checkout; clears crash leftovers."""
    fd = os.open(os.path.join(directory, STATE_DIR, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise SyncRunning(f"another keg sync (pid {holder}) is using {directory}; stop it first") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    tmp = os.path.join(directory, STATE_DIR, TMP_DIR)
    for name in os.listdir(tmp) if os.path.isdir(tmp) else ():
        os.unlink(os.path.join(tmp, name))
    return fd


def _worth_retrying(err: KegError) -> bool:
    """True for errors that may pass by themselves: an unreachable master (exit 4) or a busy keg (exit 5)."""
    return err.exit_code in (4, 5)


def describe_source(source: dict) -> str:
    """A checkout's source for messages: its URL or keg directory."""
    return source.get("url") or source.get("keg") or "an unknown keg"


class _FileEvents:
    """A watchdog handler that passes the paths of changes to a :class:`Sync`."""

    def __init__(self, sync: Sync):
        self.sync = sync

    def dispatch(self, event) -> None:
        """Called by the observer for every event."""
        if event.event_type not in FS_EVENTS:
            return
        for path in (event.src_path, getattr(event, "dest_path", "")):
            if path:
                self.sync.on_file_event(os.fsdecode(path))
