"""Durable file operations: every acknowledged write reaches the disk in a known order."""

from __future__ import annotations

import os


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
