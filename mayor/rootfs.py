"""A container's root filesystem: the image's unpacked layers stacked read-only with overlayfs,
under a writable upper directory of its own (DESIGN §5.4).

Layers are always mounted through overlayfs, even a single one, so the cached
layer directories stay pristine and can be shared by every container of the
machine. The upper and work directories belong to one container and are
deleted with it by the caller.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re

from keg.errors import KegError

MNT_DETACH = 2
MAX_MOUNT_DATA = 4095  # the kernel copies at most one page of mount options
_FORBIDDEN_IN_PATHS = (",", ":", "\\", "\n")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)


class RootfsError(KegError):
    """The container root filesystem could not be mounted or unmounted."""


def _check_path(path: str, what: str) -> str:
    path = os.path.abspath(path)
    if any(c in path for c in _FORBIDDEN_IN_PATHS):
        raise RootfsError(f"{what} {path!r} contains a character overlayfs options cannot carry (, : \\ or newline)")
    return path


def _mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def _unescape(field: str) -> str:
    """A mountinfo path with its octal escapes (``\\040`` for a space, …) decoded."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def is_mounted(target: str) -> bool:
    """Whether something is mounted exactly at ``target`` in this mount namespace."""
    target = os.path.realpath(target)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split(" ")
            if _unescape(fields[4]) == target:
                return True
    return False


def _prepare_upper(top_layer: str, upper: str, work: str) -> None:
    """Create upper and work directories; a new upper's root takes the top layer root's owner and mode,
    because the merged root directory is the upper's."""
    if not os.path.isdir(upper):
        st = os.stat(top_layer)
        os.makedirs(os.path.dirname(upper) or ".", exist_ok=True)
        os.mkdir(upper, 0o700)
        os.chown(upper, st.st_uid, st.st_gid)
        os.chmod(upper, st.st_mode & 0o7777)
    os.makedirs(work, mode=0o700, exist_ok=True)


def mount_rootfs(layer_dirs, upper: str, work: str, target: str, readonly: bool = False) -> None:
    """Mount an overlayfs of ``layer_dirs`` under a writable ``upper`` at ``target``.

    Args:
        layer_dirs: unpacked layer directories in image-manifest order, base
            layer first and topmost last (the order of ``manifest.layers``);
            they become overlayfs ``lowerdir`` topmost first.
        upper: the container's own writable directory (created if missing,
            owned like the top layer's root); kept across remounts.
        work: overlayfs work directory on the same filesystem as ``upper``.
        target: the mount point (created if missing), later the bundle's rootfs.
        readonly: mount the merged view read-only (the upper still must exist).

    Raises:
        RootfsError: bad paths, no layers, or the mount failed (errno in the message).
    """
    layers = [_check_path(d, "layer directory") for d in layer_dirs]
    if not layers:
        raise RootfsError("an image needs at least one layer to mount a root filesystem")
    for d in layers:
        if not os.path.isdir(d):
            raise RootfsError(f"layer directory {d} does not exist; unpack the layer first")
    upper, work, target = (_check_path(p, what) for p, what in ((upper, "upper"), (work, "work"), (target, "target")))
    if is_mounted(target):
        raise RootfsError(f"{target} is already a mount point; unmount it first")
    _prepare_upper(layers[-1], upper, work)
    os.makedirs(target, mode=0o755, exist_ok=True)
    lower = ":".join(reversed(layers))
    flags = 1 if readonly else 0  # MS_RDONLY
    opened = []
    try:
        data = f"lowerdir={lower},upperdir={upper},workdir={work}"
        if len(data) > MAX_MOUNT_DATA:
            # Long layer paths: name each layer by a short descriptor path the kernel resolves at mount time.
            opened = [os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) for d in reversed(layers)]
            lower = ":".join(f"/proc/self/fd/{fd}" for fd in opened)
            data = f"lowerdir={lower},upperdir={upper},workdir={work}"
            if len(data) > MAX_MOUNT_DATA:
                raise RootfsError(f"too many layers ({len(layers)}) for one overlayfs mount")
        _mount("overlay", target, "overlay", flags, data)
    except OSError as e:
        raise RootfsError(f"cannot mount overlayfs at {target}: {e.strerror} (options: {data})") from e
    finally:
        for fd in opened:
            os.close(fd)


def unmount_rootfs(target: str) -> None:
    """Unmount a container root filesystem; nothing to do if it is not mounted.

    A mount still busy (a process of a dying container) is detached lazily, so
    the caller can always go on to delete the upper directory's container.

    Raises:
        RootfsError: the unmount failed for another reason.
    """
    target = os.path.abspath(target)
    if not is_mounted(target):
        return
    path = target.encode()
    if _libc.umount2(path, 0) == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EBUSY and _libc.umount2(path, MNT_DETACH) == 0:
        return
    if err == errno.EBUSY:
        err = ctypes.get_errno()
    raise RootfsError(f"cannot unmount {target}: {os.strerror(err)}")
