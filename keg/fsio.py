"""Durable file operations: every acknowledged write reaches the disk in a known order."""

from __future__ import annotations

import errno
import os

PREALLOCATE = 1 << 20   # bytes a log file is allocated ahead of its records


def preallocate(fd: int, offset: int, length: int) -> bool:
    """Allocate ``length`` bytes of zeros at ``offset``; False where the file system cannot.

    A log written into space its file already has does not change the file's
    size, so its fdatasync need not write the inode too.

    Raises:
        OSError: the disk is full (or another real error).
    """
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as err:
        if err.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return False
        raise
    return True


def read_ready(fd: int) -> tuple:
    """What a non-blocking pipe or socket holds now, without waiting.

    Returns:
        ``(bytes read, True once the other end closed and everything was read)``.
    """
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return b"".join(chunks), False
        if not data:
            return b"".join(chunks), True
        chunks.append(data)


def fsync_dir(path: str) -> None:
    """fsync a directory so that a rename or create inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: str, data: bytes, durable: bool = True, sync_dir: bool = True,
                      tmp: str | None = None) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file, never a mix.

    Args:
        path: the file to write.
        data: its new content.
        durable: fsync the file (and the directory when ``sync_dir``) before returning.
        sync_dir: also fsync the containing directory, making the rename itself durable.
        tmp: where to write before the rename; inside a git repository it must be a
            name git ignores if a crash leaves it behind (``<ref>.lock``, ``tmp_pack_…``).
    """
    tmp = tmp or f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if durable and sync_dir:
        fsync_dir(os.path.dirname(path) or ".")


def make_dirs(directory: str, durable: bool = True) -> None:
    """Make ``directory`` and its missing parents; with ``durable``, fsync the parent of each one made.

    Without that, a power cut may take a new directory, with everything fsynced
    inside it, out of its parent: fsyncing a file does not make its name, or
    its directory's, durable.
    """
    missing, path = [], os.path.abspath(directory)
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    if durable:
        for made in reversed(missing):
            fsync_dir(os.path.dirname(made))


def sync_tree(root: str) -> None:
    """fsync every file and directory beneath ``root`` (for a tree just made, such as a new keg)."""
    for base, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(base, name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(base)


# File systems whose syncfs(2) writes back every dirty file and directory of
# the file system and flushes the disk's cache before it returns.  A FUSE file
# system is not among them: the kernel does not pass syncfs on to its daemon.
SYNCFS_TYPES = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "tmpfs"})
_fs_types: dict = {}
_ctypes_libc = None  # (ctypes, libc), loaded on first use: importing ctypes would slow every keg command's start


def filesystem_type(path: str) -> str | None:
    """The type of the file system holding ``path`` (``ext4``, ``fuse.lazyfs``…), from /proc/self/mountinfo.

    None when no mount of that device is listed (a btrfs subvolume, say).
    """
    dev = os.stat(path).st_dev
    if dev not in _fs_types:
        want, found = f"{os.major(dev)}:{os.minor(dev)}", None
        try:
            with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
                for line in f:
                    fields = line.split()
                    if len(fields) > 2 and fields[2] == want and "-" in fields:
                        found = fields[fields.index("-") + 1]
                        break
        except OSError:
            pass
        _fs_types[dev] = found
    return _fs_types[dev]


def _kernel_reports_syncfs_errors() -> bool:
    """syncfs(2) returns writeback errors since Linux 5.8; before, it could say 0 after a failed write."""
    try:
        major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (5, 8)


def syncfs(path: str) -> bool:
    """Make everything written to the file system holding ``path`` durable with one syncfs(2).

    What ostree does at the end of a commit: one call instead of an fsync per
    file, so the kernel writes thousands of small files in one pass.  It also
    writes back other programs' dirty data on that file system, so it is for
    batches of many files.  Returns False, having done nothing, where syncfs
    cannot be trusted (a FUSE file system, an old kernel): the caller then
    fsyncs each file.

    Raises:
        OSError: the file system reported a failed write.
    """
    global _ctypes_libc
    if filesystem_type(path) not in SYNCFS_TYPES or not _kernel_reports_syncfs_errors():
        return False
    if _ctypes_libc is None:
        import ctypes
        _ctypes_libc = ctypes, ctypes.CDLL(None, use_errno=True)
    ctypes, libc = _ctypes_libc
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs of the file system holding {path}: {os.strerror(err)}")
    finally:
        os.close(fd)
    return True
