"""A FUSE file system that forgets what was not synced when its power is cut (for crash tests).

Like LazyFS (the C++ one Jepsen uses), but smaller and stricter: it also loses
directory changes (create, mkdir, rename, unlink, link, symlink, rmdir) that
no fsync of their directory made durable.  Run as a process of its own::

    python tests/lazyfs.py BACKING MOUNTPOINT

It loads the tree of ``BACKING`` (a plain directory), serves it at
``MOUNTPOINT``, and keeps everything that changes in its memory, which plays
the page cache and the disk's volatile write cache: ``BACKING`` is not
touched while mounted (files are read from it until first changed; a
changed file is held twice, as processes see it and as last synced).  It reads commands on its standard input, one a line,
and answers on its standard output with one line of JSON:

``cut [SEED]``
    Power loss: ``BACKING`` becomes exactly the *durable* state (below), the
    process exits at once, without answering another request, and the mount
    is dead (``Transport endpoint is not connected``) until unmounted.
    The answer says what was dropped.  End of input does the same.  With a
    ``SEED`` the cut is *torn*: of every file's unsynced change, a random
    prefix (from its lowest changed offset on) reached the disk before the
    power went, as when the kernel had written back some dirty pages in
    file order, and the old bytes after it remain or (half of the time) are
    cut off; directory changes are still all or nothing per fsync.
``shutdown``
    A clean shutdown: everything is synced first (as the kernel's page-cache
    flush does at unmount), then as ``cut``.
``stats``
    Counters so far.

``ready`` is printed once the mount serves.  ``Disk`` (below) runs it for
tests: ``mount()``, ``power_cut()``, ``shutdown()``.

What "durable" means here (the conservative reading of POSIX, fsync(2) and
Linux's man pages; ext4 and XFS keep more, never less):

* **File data and size** (write, truncate) are durable up to the last
  ``fsync``/``fdatasync`` of the file (through any descriptor); everything
  written after it is lost, all of it (but see torn cuts above).  A file
  whose data was never synced is empty after a cut, if its name survives.
* **A directory's entries** (a name pointing at a file, directory or symlink)
  are durable as of the last ``fsync`` of *that directory*.  ``fsync`` of a
  new file does not make its name durable, nor does ``fsync`` of a parent
  make a child directory's entries durable.  A name is there after a cut only
  if every directory on its path has it durably, so a directory made but never
  synced in its parent loses its whole subtree.
* So a **rename** is durable once its directory was fsynced (a replacing
  rename keeps the old target until then).  Across directories, the new name
  is durable with an fsync of the destination and the old name's removal
  with one of the source: after only the first, the file has both names;
  after only the second, neither.  Applications must fsync both anyway.
  (A directory left durable under two names that way is kept under the
  first one found.)
* ``sync()``/``syncfs()`` reach no FUSE file system: they sync nothing here.
* Not modelled (kept at once, never lost): mode, owner, times.  Extended
  attributes, special files and locks beyond the kernel's own local ``flock``
  and POSIX locks are not offered.

The process serves requests one at a time (one lock), and a cut takes that
lock, so a cut never lands in the middle of a request.
"""

from __future__ import annotations

import errno
import json
import os
import random
import select
import shutil
import stat
import subprocess
import sys
import threading
import time

DEFAULT_OPTIONS = {"hard_remove": True, "big_writes": True, "fsname": "lazyfs"}
READY_TIMEOUT = 20.0


class FsError(OSError):
    """An errno answer for a FUSE request."""

    def __init__(self, code: int):
        super().__init__(code, os.strerror(code))


def _now() -> int:
    return time.time_ns()


class Node:
    """One inode: its live state (what processes see) and its durable state (what survives a cut).

    A file's live content is ``data``, or, until first changed, the file it was
    loaded from (``origin``); its durable content is ``durable`` (None: the
    origin's, unchanged) and everything from ``dirty_from`` on differs.  A
    directory has live ``entries`` and ``durable_entries`` (name -> Node).
    """

    __slots__ = ("kind", "mode", "uid", "gid", "atime", "mtime", "ctime", "links", "entries", "durable_entries",
                 "data", "size", "durable", "dirty_from", "origin", "target", "_fd")

    def __init__(self, kind: int, mode: int, uid: int = 0, gid: int = 0):
        self.kind = kind                  # stat.S_IFREG, S_IFDIR or S_IFLNK
        self.mode = mode & 0o7777
        self.uid, self.gid = uid, gid
        self.atime = self.mtime = self.ctime = _now()
        self.links = 0                    # live names
        self.entries: dict | None = {} if kind == stat.S_IFDIR else None
        self.durable_entries: dict | None = {} if kind == stat.S_IFDIR else None
        self.data: bytearray | None = bytearray() if kind == stat.S_IFREG else None
        self.size = 0
        self.durable: bytearray | None = bytearray() if kind == stat.S_IFREG else None
        self.dirty_from: int | None = None
        self.origin: str | None = None
        self.target = ""
        self._fd = None

    # ---------------------------------------------------------------- files

    def read_origin(self, size: int, offset: int) -> bytes:
        if self._fd is None:
            self._fd = os.open(self.origin, os.O_RDONLY)
        return os.pread(self._fd, size, offset)

    def live(self) -> bytearray:
        """The live content, loaded from the origin on first change."""
        if self.data is None:
            self.data = bytearray(self.read_origin(self.size, 0))
        return self.data

    def touched(self, offset: int) -> None:
        """Record that the content changed from ``offset`` on (before the change)."""
        low = min(offset, self.size)
        self.dirty_from = low if self.dirty_from is None else min(self.dirty_from, low)
        self.mtime = self.ctime = _now()

    def sync(self) -> int:
        """Make the content durable; returns how many bytes that changed."""
        if self.dirty_from is None:
            return 0
        if self.durable is None:
            with open(self.origin, "rb") as f:
                self.durable = bytearray(f.read())
        start = self.dirty_from
        self.durable[start:] = self.data[start:]
        self.dirty_from = None
        return len(self.data) - start

    def unsynced(self) -> int:
        """Bytes of live content a cut would lose (from the lowest changed offset to the end)."""
        return 0 if self.dirty_from is None else len(self.data) - self.dirty_from


def load(path: str, seen: dict | None = None) -> Node:
    """The tree at ``path`` as nodes, all of it durable (hard links share a node)."""
    seen = {} if seen is None else seen
    st = os.lstat(path)
    node = Node(stat.S_IFDIR, st.st_mode, st.st_uid, st.st_gid)
    node.atime, node.mtime, node.ctime = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
    for entry in os.scandir(path):
        est = entry.stat(follow_symlinks=False)
        if stat.S_ISDIR(est.st_mode):
            child = load(entry.path, seen)
        elif (est.st_dev, est.st_ino) in seen:
            child = seen[est.st_dev, est.st_ino]
        else:
            kind = stat.S_IFLNK if stat.S_ISLNK(est.st_mode) else stat.S_IFREG
            if not (stat.S_ISLNK(est.st_mode) or stat.S_ISREG(est.st_mode)):
                raise ValueError(f"{entry.path}: lazyfs holds only files, directories and symlinks")
            child = Node(kind, est.st_mode, est.st_uid, est.st_gid)
            child.atime, child.mtime, child.ctime = est.st_atime_ns, est.st_mtime_ns, est.st_ctime_ns
            if kind == stat.S_IFLNK:
                child.target = os.readlink(entry.path)
            else:
                child.origin, child.size, child.data, child.durable = entry.path, est.st_size, None, None
            seen[est.st_dev, est.st_ino] = child
        child.links += 1
        node.entries[entry.name] = child
    node.durable_entries = dict(node.entries)
    return node


class LazyFS:
    """The FUSE operations (fusepy's interface) over an in-memory tree; see the module's docstring."""

    use_ns = True
    flag_nullpath_ok = 1   # requests on an open, unlinked file come with no path (hard_remove)

    def __init__(self, backing: str):
        self.backing = os.path.abspath(backing)
        self.root = load(self.backing)
        self.handles: dict = {}
        self.next_handle = 1
        self.mutex = threading.Lock()  # not "lock": fusepy would take it for the POSIX-lock operation
        self.stats = {"fsync": 0, "fsyncdir": 0, "synced_bytes": 0, "writes": 0, "written_bytes": 0,
                      "cross_dir_renames": 0}

    def __call__(self, op, *args):
        with self.mutex:
            return getattr(self, op)(*args)

    # ------------------------------------------------------------ namespace

    def _lookup(self, path: str) -> Node:
        node = self.root
        for part in path.split("/"):
            if not part:
                continue
            if node.kind != stat.S_IFDIR:
                raise FsError(errno.ENOTDIR)
            node = node.entries.get(part)
            if node is None:
                raise FsError(errno.ENOENT)
        return node

    def _parent(self, path: str) -> tuple:
        head, _, name = path.rstrip("/").rpartition("/")
        parent = self._lookup(head or "/")
        if parent.kind != stat.S_IFDIR:
            raise FsError(errno.ENOTDIR)
        return parent, name

    def _node(self, path, fh) -> Node:
        if fh:
            node = self.handles.get(fh)
            if node is not None:
                return node
        if path is None:
            raise FsError(errno.EBADF)
        return self._lookup(path)

    def _handle(self, node: Node) -> int:
        fh = self.next_handle
        self.next_handle += 1
        self.handles[fh] = node
        return fh

    def _add(self, path: str, node: Node) -> Node:
        parent, name = self._parent(path)
        if name in parent.entries:
            raise FsError(errno.EEXIST)
        parent.entries[name] = node
        node.links += 1
        parent.mtime = parent.ctime = _now()
        return node

    def _new(self, kind: int, mode: int) -> Node:
        from fuse import fuse_get_context
        uid, gid, _ = fuse_get_context()
        return Node(kind, mode, uid, gid)

    # ------------------------------------------------------------ FUSE: metadata

    def init(self, path):
        sys.stdout.write("ready\n")
        sys.stdout.flush()

    def getattr(self, path, fh=None):
        node = self._node(path, fh)
        if node.kind == stat.S_IFDIR:
            nlink = 2 + sum(1 for c in node.entries.values() if c.kind == stat.S_IFDIR)
            size = 4096
        else:
            nlink = node.links
            size = len(node.data) if node.data is not None else node.size
            if node.kind == stat.S_IFLNK:
                size = len(node.target.encode())
        return {"st_mode": node.kind | node.mode, "st_nlink": nlink, "st_size": size, "st_uid": node.uid,
                "st_gid": node.gid, "st_atime": node.atime, "st_mtime": node.mtime, "st_ctime": node.ctime,
                "st_blocks": (size + 511) // 512, "st_blksize": 4096}

    def access(self, path, amode):
        self._lookup(path)
        return 0

    def statfs(self, path):
        st = os.statvfs(self.backing)
        return {key: getattr(st, key) for key in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                                                  "f_files", "f_ffree", "f_favail", "f_namemax")}

    def chmod(self, path, mode):
        node = self._lookup(path)
        node.mode = mode & 0o7777
        node.ctime = _now()

    def chown(self, path, uid, gid):
        node = self._lookup(path)
        node.uid = node.uid if uid == -1 else uid
        node.gid = node.gid if gid == -1 else gid
        node.ctime = _now()

    def utimens(self, path, times=None):
        node = self._lookup(path)
        node.atime, node.mtime = times if times else (_now(), _now())

    def readlink(self, path):
        node = self._lookup(path)
        if node.kind != stat.S_IFLNK:
            raise FsError(errno.EINVAL)
        return node.target

    def opendir(self, path):
        node = self._lookup(path)
        if node.kind != stat.S_IFDIR:
            raise FsError(errno.ENOTDIR)
        return self._handle(node)

    def readdir(self, path, fh):
        node = self._node(path, fh)
        return [".", ".."] + list(node.entries)

    def releasedir(self, path, fh):
        self.handles.pop(fh, None)

    def fsyncdir(self, path, datasync, fh):
        node = self._node(path, fh)
        node.durable_entries = dict(node.entries)
        self.stats["fsyncdir"] += 1

    # ------------------------------------------------------------ FUSE: names

    def mkdir(self, path, mode):
        self._add(path, self._new(stat.S_IFDIR, mode))

    def symlink(self, target, source):
        node = self._new(stat.S_IFLNK, 0o777)
        node.target = source
        self._add(target, node)

    def link(self, target, source):
        node = self._lookup(source)
        if node.kind == stat.S_IFDIR:
            raise FsError(errno.EPERM)
        self._add(target, node)
        node.ctime = _now()

    def unlink(self, path):
        parent, name = self._parent(path)
        node = parent.entries.get(name)
        if node is None:
            raise FsError(errno.ENOENT)
        if node.kind == stat.S_IFDIR:
            raise FsError(errno.EISDIR)
        del parent.entries[name]
        node.links -= 1
        parent.mtime = parent.ctime = node.ctime = _now()

    def rmdir(self, path):
        parent, name = self._parent(path)
        node = parent.entries.get(name)
        if node is None:
            raise FsError(errno.ENOENT)
        if node.kind != stat.S_IFDIR:
            raise FsError(errno.ENOTDIR)
        if node.entries:
            raise FsError(errno.ENOTEMPTY)
        del parent.entries[name]
        node.links -= 1
        parent.mtime = parent.ctime = _now()

    def rename(self, old, new):
        src, src_name = self._parent(old)
        dst, dst_name = self._parent(new)
        node = src.entries.get(src_name)
        if node is None:
            raise FsError(errno.ENOENT)
        replaced = dst.entries.get(dst_name)
        if replaced is node:
            return
        if replaced is not None:
            if replaced.kind == stat.S_IFDIR and node.kind != stat.S_IFDIR:
                raise FsError(errno.EISDIR)
            if node.kind == stat.S_IFDIR and replaced.kind != stat.S_IFDIR:
                raise FsError(errno.ENOTDIR)
            if replaced.kind == stat.S_IFDIR and replaced.entries:
                raise FsError(errno.ENOTEMPTY)
            replaced.links -= 1
        del src.entries[src_name]
        dst.entries[dst_name] = node
        if src is not dst:
            self.stats["cross_dir_renames"] += 1
        src.mtime = src.ctime = dst.mtime = dst.ctime = node.ctime = _now()

    # ------------------------------------------------------------ FUSE: files

    def create(self, path, mode, fi=None):
        node = self._add(path, self._new(stat.S_IFREG, mode))
        return self._handle(node)

    def open(self, path, flags):
        node = self._lookup(path)
        if node.kind != stat.S_IFREG:
            raise FsError(errno.EISDIR if node.kind == stat.S_IFDIR else errno.ELOOP)
        return self._handle(node)

    def read(self, path, size, offset, fh):
        node = self._node(path, fh)
        if node.data is None:
            return node.read_origin(min(size, max(0, node.size - offset)), offset) if offset < node.size else b""
        return bytes(node.data[offset:offset + size])

    def write(self, path, data, offset, fh):
        node = self._node(path, fh)
        content = node.live()
        node.touched(offset)
        if offset > len(content):
            content.extend(bytes(offset - len(content)))
        content[offset:offset + len(data)] = data
        node.size = len(content)
        self.stats["writes"] += 1
        self.stats["written_bytes"] += len(data)
        return len(data)

    def truncate(self, path, length, fh=None):
        node = self._node(path, fh)
        if node.kind != stat.S_IFREG:
            raise FsError(errno.EISDIR)
        content = node.live()
        node.touched(length)
        if length < len(content):
            del content[length:]
        else:
            content.extend(bytes(length - len(content)))
        node.size = len(content)

    def flush(self, path, fh):
        return 0

    def release(self, path, fh):
        self.handles.pop(fh, None)

    def fsync(self, path, datasync, fh):
        node = self._node(path, fh)
        if node.kind == stat.S_IFREG:
            self.stats["synced_bytes"] += node.sync()
        self.stats["fsync"] += 1

    # ------------------------------------------------------------ power

    def _live_nodes(self):
        """Every node reachable from the root as processes see the tree, once each (hard links too)."""
        stack, done = [self.root], set()
        while stack:
            node = stack.pop()
            if id(node) in done:
                continue
            done.add(id(node))
            yield node
            if node.kind == stat.S_IFDIR:
                stack.extend(node.entries.values())

    def sync_all(self) -> None:
        """Make the whole live tree durable (a clean shutdown's flush)."""
        for node in self._live_nodes():
            if node.kind == stat.S_IFDIR:
                node.durable_entries = dict(node.entries)
            elif node.kind == stat.S_IFREG:
                node.sync()
        for node in self.handles.values():
            if node.kind == stat.S_IFREG:
                node.sync()

    def lost(self) -> dict:
        """What a cut now would drop: unsynced bytes of reachable files, unsynced directory entries."""
        unsynced_bytes, entries, files = 0, 0, set()
        for node in self._live_nodes():
            if node.kind == stat.S_IFDIR:
                for name in set(node.entries) | set(node.durable_entries):
                    if node.entries.get(name) is not node.durable_entries.get(name):
                        entries += 1
            elif node.kind == stat.S_IFREG and node.dirty_from is not None:
                unsynced_bytes += node.unsynced()
                files.add(id(node))
        return {"unsynced_bytes": unsynced_bytes, "unsynced_files": len(files), "unsynced_entries": entries}

    @staticmethod
    def _torn(node: Node, rng) -> bytes:
        """The durable content with a random part of the unsynced change written back, in file order.

        The new bytes from the lowest changed offset up to a random point
        reached the disk; beyond it the old bytes remain, or, half of the
        time, none (the new size reached the disk first, as after a truncate).
        """
        if node.durable is None:
            with open(node.origin, "rb") as f:
                old = f.read()
        else:
            old = bytes(node.durable)
        start = node.dirty_from
        end = rng.randint(start, len(node.data))
        return old[:start] + bytes(node.data[start:end]) + (old[end:] if rng.random() < 0.5 else b"")

    def materialize(self, rng=None) -> dict:
        """Replace the backing directory by the durable tree; returns what was written.

        Args:
            rng: a ``random.Random`` for a *torn* cut: of each file's unsynced
                change, a random prefix (from the lowest changed offset) was
                written back before the power went; None keeps none of it.
        """
        target = self.backing + ".next"
        if os.path.lexists(target):
            shutil.rmtree(target)
        placed: dict = {}
        counts = {"files": 0, "dirs": 0, "materialized_bytes": 0, "unreachable_twice": 0}

        def place(node: Node, path: str) -> None:
            if node.kind == stat.S_IFDIR:
                if id(node) in placed:
                    counts["unreachable_twice"] += 1  # a directory durable under two names: keep the first
                    return
                placed[id(node)] = path
                os.mkdir(path, 0o700)
                counts["dirs"] += 1
                for name, child in node.durable_entries.items():
                    place(child, os.path.join(path, name))
                os.chmod(path, node.mode)
            elif node.kind == stat.S_IFLNK:
                os.symlink(node.target, path)
            elif id(node) in placed:
                os.link(placed[id(node)], path)
            else:
                placed[id(node)] = path
                counts["files"] += 1
                content = self._torn(node, rng) if rng is not None and node.dirty_from is not None else None
                if content is None and node.durable is None:
                    os.link(node.origin, path)  # unchanged since the mount: the same bytes
                else:
                    content = node.durable if content is None else content
                    with open(path, "wb") as f:
                        f.write(content)
                    counts["materialized_bytes"] += len(content)
                    os.chmod(path, node.mode)

        place(self.root, target)
        previous = self.backing + ".prev"
        os.rename(self.backing, previous)
        os.rename(target, self.backing)
        shutil.rmtree(previous)
        return counts

    def command(self, line: str) -> dict:
        """One control command (see the module's docstring); ``cut`` and ``shutdown`` end the process."""
        word, *args = line.split()
        if word == "stats":
            with self.mutex:
                return {**self.stats, **self.lost()}
        if word not in ("cut", "shutdown"):
            return {"error": f"unknown command {word!r}"}
        self.mutex.acquire()  # never released: no request is served after this
        if word == "shutdown":
            self.sync_all()
        answer = {"command": word, **self.stats, **self.lost()}
        answer.update(self.materialize(random.Random(int(args[0])) if args else None))
        return answer


def control(fs: LazyFS) -> None:
    """Serve commands from standard input until a cut; end of input is a cut."""
    for line in sys.stdin:
        if not line.strip():
            continue
        answer = fs.command(line)
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
        if answer.get("command"):
            os._exit(0)
    fs.command("cut")
    os._exit(0)


def main(argv: list) -> int:
    from fuse import FUSE
    if len(argv) != 3:
        sys.stderr.write("usage: lazyfs.py BACKING MOUNTPOINT\n")
        return 2
    fs = LazyFS(argv[1])
    threading.Thread(target=control, args=(fs,), daemon=True).start()
    FUSE(fs, argv[2], foreground=True, **DEFAULT_OPTIONS)
    return 0


# ---------------------------------------------------------------- for tests

def mounted(path: str) -> bool:
    """True when something is mounted at ``path`` (in this mount namespace)."""
    path = os.path.abspath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def unmount(path: str) -> None:
    """Detach the mount at ``path`` (lazily: a dead lazyfs leaves one that nothing can use)."""
    if mounted(path):
        subprocess.run(["fusermount", "-u", "-z", path], capture_output=True, check=False)
    if mounted(path):
        subprocess.run(["umount", "-l", path], capture_output=True, check=True)


def unavailable() -> str | None:
    """Why lazyfs cannot mount here, or None when it can."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount") is None:
        return "fusermount is not installed (Debian package fuse)"
    try:
        import fuse  # noqa: F401 - loading it finds libfuse.so.2
    except (ImportError, OSError, EnvironmentError) as err:
        return f"fusepy or libfuse2 is missing: {err}"
    return None


class Disk:
    """A lazyfs mount at ``mountpoint`` over ``backing``, for tests: mount, power cut, remount.

    Args:
        backing: the directory holding the durable state (made empty if missing).
        mountpoint: where processes use it (made if missing).
        log_path: where lazyfs writes its errors (default ``<backing>.lazyfs.log``).
    """

    def __init__(self, backing: str, mountpoint: str, log_path: str | None = None):
        self.backing = os.path.abspath(backing)
        self.mountpoint = os.path.abspath(mountpoint)
        self.log_path = log_path or self.backing + ".lazyfs.log"
        self.proc = None
        self.cuts: list = []          # the answer of every cut

    def mount(self) -> "Disk":
        """Start lazyfs and return once the mount serves."""
        os.makedirs(self.backing, exist_ok=True)
        os.makedirs(self.mountpoint, exist_ok=True)
        unmount(self.mountpoint)
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), self.backing, self.mountpoint],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
        line = self._answer(READY_TIMEOUT)
        if line.strip() != "ready":
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"lazyfs did not mount {self.mountpoint}: {line!r}\n{self.log()[-2000:]}")
        return self

    def _answer(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"lazyfs at {self.mountpoint} did not answer within {timeout:g}s\n"
                                 f"{self.log()[-2000:]}")
        return self.proc.stdout.readline()

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _send(self, word: str, timeout: float = 120.0) -> dict:
        if not self.alive:
            raise AssertionError(f"lazyfs at {self.mountpoint} is not running\n{self.log()[-2000:]}")
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()
        line = self._answer(timeout)
        if not line:
            raise AssertionError(f"lazyfs at {self.mountpoint} ended without answering {word}\n{self.log()[-2000:]}")
        return json.loads(line)

    def stats(self) -> dict:
        """Counters, and what a cut now would lose."""
        return self._send("stats")

    def _end(self, word: str) -> dict:
        answer = self._send(word)
        self.proc.wait(30)
        self.proc.stdin.close()
        self.proc.stdout.close()
        self.proc = None
        unmount(self.mountpoint)
        return answer

    def power_cut(self, torn_seed: int | None = None) -> dict:
        """Lose everything not synced; the backing directory holds what survived.  Not mounted afterwards.

        Processes using the mount should be dead (SIGKILL them first): the
        mount answers nothing after this.

        Args:
            torn_seed: make the cut torn (see the module's docstring), with this random seed.
        """
        answer = self._end("cut" if torn_seed is None else f"cut {int(torn_seed)}")
        self.cuts.append(answer)
        return answer

    def shutdown(self) -> dict:
        """Sync everything, write it to the backing directory, unmount."""
        return self._end("shutdown")

    def close(self) -> None:
        """Unmount, keeping only what was synced (a cut), if still mounted."""
        if self.alive:
            self.power_cut()
        elif self.proc is not None:
            self.proc = None
        unmount(self.mountpoint)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
