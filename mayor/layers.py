"""Safe unpacking of OCI image layers into directories that overlayfs can stack (DESIGN §5.4).

A layer tarball comes from an image anyone may have pushed, so every entry is
resolved beneath the layer root by this module, one path component at a time,
with ``O_NOFOLLOW`` directory descriptors: an entry may never climb out with
``..``, never write through a symlink (not even one the same layer just
created), and a hard link may only point at a file this layer already
extracted. Absolute entry names are taken relative to the layer root, as tar
does. Symlinks are stored verbatim and never followed: they mean something only
inside the container.

OCI whiteouts become their overlayfs form, because layers are stacked with
overlayfs: ``.wh.<name>`` becomes a character device 0/0 named ``<name>`` and
``.wh..wh..opq`` sets ``trusted.overlay.opaque=y`` on its directory. Extended
attributes carried in the tarball are not applied, so a layer cannot forge
overlayfs metadata (nor file capabilities).

User namespaces: containers run with container uid 0..65535 mapped to host uid
``uid_shift``..``uid_shift+65535`` (one range per machine, see
``mayor.runtime_spec``). runc 1.1 cannot idmap the root filesystem, so the
ownership is shifted once, when the layer is unpacked: a file owned by uid
``u`` in the tarball is owned by ``u + uid_shift`` on disk. Ids outside the
mapped range are refused, since they would land in nobody's range.

A layer directory exists only when complete: entries go into a temporary
sibling directory that is renamed into place at the end, and removed on any
error. ``LayerCache`` keys directories by blob digest, verifies the sha256 of
the blob while it streams through the extractor, and unpacks each digest once.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import tarfile
import tempfile

import zstandard

from keg.errors import KegError

TAR = "application/vnd.oci.image.layer.v1.tar"
TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
TAR_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_TAR_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

# Media type -> compression; non-distributable variants unpack the same way.
COMPRESSION = {
    TAR: None,
    TAR_GZIP: "gz",
    TAR_ZSTD: "zstd",
    DOCKER_TAR_GZIP: "gz",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": None,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gz",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
}

ID_RANGE = 65536  # container ids 0..65535, as mapped by runtime_spec
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
COPY_CHUNK = 1 << 20

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class LayerError(KegError):
    """A layer that cannot be unpacked safely or does not match its digest; nothing was kept."""


# ---------------------------------------------------------------------------
# helpers


def _entry_parts(name: str, entry: str, what: str) -> list:
    """The components of ``name`` (of tar member ``entry``) beneath the layer root; refuses ``..`` and NUL."""
    if "\0" in name:
        raise LayerError(f"layer entry {entry!r}: {what} contains a NUL byte")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise LayerError(
            f"layer entry {entry!r}: {what} {name!r} contains a '..' component; refusing to leave the layer"
        )
    return parts


class _HashingReader:
    """A read-only stream that hashes every byte read through it."""

    def __init__(self, raw):
        self._raw = raw
        self.sha256 = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.sha256.update(data)
        return data

    def drain(self) -> None:
        while self.read(COPY_CHUNK):
            pass


def _open_tar(stream, media_type: str) -> tuple:
    """A streaming tarfile over ``stream`` and the decompressor to close after it."""
    if media_type not in COMPRESSION:
        known = ", ".join(sorted(COMPRESSION))
        raise LayerError(f"unknown layer media type {media_type!r}; expected one of {known}")
    compression = COMPRESSION[media_type]
    try:
        if compression == "zstd":
            reader = zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True, closefd=False)
            return tarfile.open(fileobj=reader, mode="r|"), reader
        return tarfile.open(fileobj=stream, mode="r|gz" if compression == "gz" else "r|"), None
    except (tarfile.TarError, OSError, zstandard.ZstdError) as e:
        raise LayerError(f"layer is not a readable {media_type}: {e}") from e


class _Extractor:
    """Writes tar members beneath one root directory, never following a symlink."""

    def __init__(self, root: str, allow_devices: bool, uid_shift: int):
        self.root_fd = os.open(root, _DIR_FLAGS)
        self.allow_devices = allow_devices
        self.uid_shift = uid_shift
        self.extracted = set()  # non-directory paths this layer wrote, for hard links
        self.dir_times = {}  # path tuple -> mtime, applied last (children change it)
        self.root_seen = False

    def close(self) -> None:
        os.close(self.root_fd)

    # --- walking

    def _open_parent(self, parts: list, entry: str, create: bool) -> int:
        """A descriptor of the directory holding ``parts[-1]``, created if missing when ``create``."""
        fd = os.dup(self.root_fd)
        try:
            for i, comp in enumerate(parts[:-1]):
                try:
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise LayerError(f"layer entry {entry!r}: {'/'.join(parts[: i + 1])} does not exist") from None
                    os.mkdir(comp, 0o755, dir_fd=fd)
                    os.chown(comp, self.uid_shift, self.uid_shift, dir_fd=fd, follow_symlinks=False)
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise LayerError(
                            f"layer entry {entry!r}: {'/'.join(parts[: i + 1])} is a symlink or not a directory; "
                            "refusing to write through it"
                        ) from e
                    raise
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _clear(self, parent_fd: int, name: str, keep_dir: bool) -> bool:
        """Remove what is at ``name`` so a new entry can take its place; True if a directory was kept."""
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            shutil.rmtree(name, dir_fd=parent_fd)
        else:
            os.unlink(name, dir_fd=parent_fd)
        return False

    def _open_dir(self, parts: list, entry: str) -> int:
        """A descriptor of the directory ``parts`` (the root if empty), made if missing or not a directory."""
        if not parts:
            return os.dup(self.root_fd)
        parent = self._open_parent(parts, entry, create=True)
        try:
            if not self._clear(parent, parts[-1], keep_dir=True):
                os.mkdir(parts[-1], 0o755, dir_fd=parent)
                os.chown(parts[-1], self.uid_shift, self.uid_shift, dir_fd=parent, follow_symlinks=False)
            return os.open(parts[-1], _DIR_FLAGS, dir_fd=parent)
        finally:
            os.close(parent)

    # --- ownership

    def _ids(self, member: tarfile.TarInfo) -> tuple:
        for value, kind in ((member.uid, "uid"), (member.gid, "gid")):
            if self.uid_shift and not 0 <= value < ID_RANGE:
                raise LayerError(
                    f"layer entry {member.name!r}: {kind} {value} is outside the container's id range 0..{ID_RANGE - 1}"
                )
        return member.uid + self.uid_shift, member.gid + self.uid_shift

    # --- entry kinds

    def add(self, tf: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        parts = _entry_parts(member.name, member.name, "its name")
        if parts and parts[-1].startswith(WHITEOUT_PREFIX):
            self._whiteout(member, parts)
        elif member.isdir():
            self._directory(member, parts)
        elif not parts:
            raise LayerError(f"layer entry {member.name!r}: only a directory may name the layer root")
        elif member.isreg():
            self._file(tf, member, parts)
        elif member.issym():
            self._symlink(member, parts)
        elif member.islnk():
            self._hardlink(member, parts)
        elif member.ischr() or member.isblk() or member.isfifo():
            self._device(member, parts)
        else:
            raise LayerError(f"layer entry {member.name!r}: unsupported tar entry type {member.type!r}")

    def _directory(self, member, parts) -> None:
        uid, gid = self._ids(member)
        fd = self._open_dir(parts, member.name)
        self.root_seen = self.root_seen or not parts
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, stat.S_IMODE(member.mode))  # after chown, which may clear setgid
        finally:
            os.close(fd)
        self.dir_times[tuple(parts)] = member.mtime

    def _file(self, tf, member, parts) -> None:
        uid, gid = self._ids(member)
        parent = self._open_parent(parts, member.name, create=True)
        try:
            self._clear(parent, parts[-1], keep_dir=False)
            fd = os.open(
                parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent
            )
        finally:
            os.close(parent)
        try:
            src = tf.extractfile(member)
            while True:
                chunk = src.read(COPY_CHUNK)
                if not chunk:
                    break
                _write_all(fd, chunk)
            os.fchown(fd, uid, gid)
            os.fchmod(fd, stat.S_IMODE(member.mode))  # after chown, which clears setuid/setgid
            os.utime(fd, (member.mtime, member.mtime))
        finally:
            os.close(fd)
        self.extracted.add(tuple(parts))

    def _symlink(self, member, parts) -> None:
        if "\0" in member.linkname:
            raise LayerError(f"layer entry {member.name!r}: symlink target contains a NUL byte")
        uid, gid = self._ids(member)
        parent = self._open_parent(parts, member.name, create=True)
        try:
            self._clear(parent, parts[-1], keep_dir=False)
            os.symlink(member.linkname, parts[-1], dir_fd=parent)
            os.chown(parts[-1], uid, gid, dir_fd=parent, follow_symlinks=False)
            os.utime(parts[-1], (member.mtime, member.mtime), dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(parent)
        self.extracted.add(tuple(parts))

    def _hardlink(self, member, parts) -> None:
        target = _entry_parts(member.linkname, member.name, "its hard link target")
        if tuple(target) not in self.extracted:
            raise LayerError(
                f"layer entry {member.name!r}: hard link target {member.linkname!r} is not a file this layer "
                "extracted before it; refusing to link outside the layer"
            )
        src_parent = self._open_parent(target, member.name, create=False)
        try:
            parent = self._open_parent(parts, member.name, create=True)
            try:
                if tuple(target) != tuple(parts):
                    self._clear(parent, parts[-1], keep_dir=False)
                    os.link(target[-1], parts[-1], src_dir_fd=src_parent, dst_dir_fd=parent, follow_symlinks=False)
            finally:
                os.close(parent)
        finally:
            os.close(src_parent)
        self.extracted.add(tuple(parts))

    def _device(self, member, parts) -> None:
        if not self.allow_devices:
            kind = "fifo" if member.isfifo() else "device node"
            raise LayerError(f"layer entry {member.name!r}: {kind} refused (devices are not allowed in this layer)")
        uid, gid = self._ids(member)
        kind = stat.S_IFIFO if member.isfifo() else stat.S_IFCHR if member.ischr() else stat.S_IFBLK
        parent = self._open_parent(parts, member.name, create=True)
        try:
            self._clear(parent, parts[-1], keep_dir=False)
            os.mknod(parts[-1], kind | 0o600, os.makedev(member.devmajor, member.devminor), dir_fd=parent)
            os.chown(parts[-1], uid, gid, dir_fd=parent, follow_symlinks=False)
            os.chmod(parts[-1], stat.S_IMODE(member.mode), dir_fd=parent)  # not a symlink: we just made it
            os.utime(parts[-1], (member.mtime, member.mtime), dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(parent)
        self.extracted.add(tuple(parts))

    def _whiteout(self, member, parts) -> None:
        name = parts[-1]
        if name == OPAQUE_MARKER:
            fd = self._open_parent(parts, member.name, create=True)  # the directory the marker is in
            try:
                os.setxattr(fd, OPAQUE_XATTR, b"y")
            finally:
                os.close(fd)
            return
        if name.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            return  # other aufs metadata (.wh..wh.plnk, …): meaningless to overlayfs
        hidden = name[len(WHITEOUT_PREFIX) :]
        if hidden in ("", ".", ".."):
            raise LayerError(f"layer entry {member.name!r}: malformed whiteout")
        parent = self._open_parent(parts, member.name, create=True)
        try:
            try:
                os.stat(hidden, dir_fd=parent, follow_symlinks=False)
                return  # a whiteout only hides lower layers; this layer's own entry already does
            except FileNotFoundError:
                pass
            os.mknod(hidden, stat.S_IFCHR | 0o600, os.makedev(0, 0), dir_fd=parent)
            os.chown(hidden, self.uid_shift, self.uid_shift, dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(parent)

    # --- finishing

    def finish(self) -> None:
        """Give the root sensible metadata if the tar had none, then set directory mtimes, deepest first."""
        if not self.root_seen:
            os.fchown(self.root_fd, self.uid_shift, self.uid_shift)
            os.fchmod(self.root_fd, 0o755)
        for parts in sorted(self.dir_times, key=len, reverse=True):
            mtime = self.dir_times[parts]
            if not parts:
                os.utime(self.root_fd, (mtime, mtime))
                continue
            try:
                parent = self._open_parent(list(parts), "/".join(parts), create=False)
            except (LayerError, FileNotFoundError):
                continue  # a later entry of the layer replaced this directory or one above it
            try:
                if stat.S_ISDIR(os.stat(parts[-1], dir_fd=parent, follow_symlinks=False).st_mode):
                    os.utime(parts[-1], (mtime, mtime), dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                pass
            finally:
                os.close(parent)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _extract(stream, tmp: str, media_type: str, allow_devices: bool, uid_shift: int) -> None:
    """Unpack every member of the layer in ``stream`` into the existing directory ``tmp``."""
    tf, decompressor = _open_tar(stream, media_type)
    extractor = _Extractor(tmp, allow_devices, uid_shift)
    member = None
    try:
        for member in tf:
            extractor.add(tf, member)
        extractor.finish()
    except LayerError:
        raise
    except (tarfile.TarError, EOFError, zstandard.ZstdError) as e:
        where = f" after entry {member.name!r}" if member is not None else ""
        raise LayerError(f"layer tarball is corrupt{where}: {e}") from e
    except (OSError, OverflowError, ValueError) as e:
        where = f"layer entry {member.name!r}" if member is not None else "layer"
        raise LayerError(f"{where}: cannot unpack: {e}") from e
    finally:
        extractor.close()
        tf.close()
        if decompressor is not None:
            decompressor.close()


def _temp_dir(dest: str) -> str:
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=".unpack-", dir=parent)


def _remove(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------
# entry points


def unpack_layer(stream, dest: str, media_type: str, allow_devices: bool = False, uid_shift: int = 0) -> None:
    """Unpack one OCI layer tarball into a new directory ``dest``, safely.

    Args:
        stream: a readable binary file object positioned at the start of the
            blob (compressed as ``media_type`` says); read once, front to back.
        dest: the directory to create; it must not exist. Created only when the
            whole layer unpacked.
        media_type: one of the OCI (or Docker) layer media types in ``COMPRESSION``.
        allow_devices: create device nodes and fifos instead of refusing them.
        uid_shift: added to every uid and gid (the machine's user-namespace base).

    Raises:
        LayerError: an entry escapes the layer, writes through a symlink, links
            outside the layer, is a refused device, or the tarball is corrupt.
            The message names the entry; nothing is left behind.
    """
    if os.path.lexists(dest):
        raise LayerError(f"cannot unpack a layer into {dest}: it already exists")
    tmp = _temp_dir(dest)
    try:
        _extract(stream, tmp, media_type, allow_devices, uid_shift)
        os.rename(tmp, dest)
    except OSError as e:
        _remove(tmp)
        raise LayerError(f"cannot move the unpacked layer into {dest}: {e}") from e
    except BaseException:
        _remove(tmp)
        raise


class LayerCache:
    """Unpacked layers under ``root/sha256/<hex>``, each unpacked once per blob digest.

    Args:
        root: the cache directory (created if missing).
        uid_shift: the machine's user-namespace base; see the module docstring.
        allow_devices: passed to ``unpack_layer``.
    """

    def __init__(self, root: str, uid_shift: int = 0, allow_devices: bool = False):
        self.root = os.path.abspath(root)
        self.uid_shift = uid_shift
        self.allow_devices = allow_devices

    def path(self, digest: str) -> str:
        """The directory a layer with ``digest`` (``sha256:<64 hex>``) unpacks to."""
        algorithm, _, hexdigest = digest.partition(":")
        if algorithm != "sha256" or len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest):
            raise LayerError(f"unsupported layer digest {digest!r}; expected sha256:<64 lowercase hex digits>")
        return os.path.join(self.root, "sha256", hexdigest)

    def has(self, digest: str) -> bool:
        """Whether the layer with ``digest`` is already unpacked."""
        return os.path.isdir(self.path(digest))

    def ensure(self, digest: str, open_blob, media_type: str) -> str:
        """The unpacked directory of a layer, unpacking it first if needed.

        Args:
            digest: the blob digest from the image manifest, ``sha256:<hex>``.
            open_blob: called with no arguments only if the layer is missing;
                returns a readable binary file object of the blob (closed here).
            media_type: the layer's media type from the manifest.

        Returns:
            The absolute path of the layer directory.

        Raises:
            LayerError: the blob's sha256 differs from ``digest``, or
                ``unpack_layer`` refused it. Nothing is kept.
        """
        dest = self.path(digest)
        if os.path.isdir(dest):
            return dest
        tmp = _temp_dir(dest)
        try:
            with open_blob() as raw:
                reader = _HashingReader(raw)
                _extract(reader, tmp, media_type, self.allow_devices, self.uid_shift)
                reader.drain()  # the tar end marker may precede padding or compressed trailer bytes
            actual = "sha256:" + reader.sha256.hexdigest()
            if actual != digest:
                raise LayerError(f"layer blob does not match its digest: expected {digest}, got {actual}; refused")
            try:
                os.rename(tmp, dest)
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY) and os.path.isdir(dest):
                    _remove(tmp)  # another unpacker of the same digest won the race
                    return dest
                raise LayerError(f"cannot move the unpacked layer into {dest}: {e}") from e
        except BaseException:
            _remove(tmp)
            raise
        return dest

    def remove(self, digest: str) -> None:
        """Delete an unpacked layer (for garbage collection); absent layers are ignored."""
        dest = self.path(digest)
        if os.path.isdir(dest):
            trash = tempfile.mkdtemp(prefix=".remove-", dir=os.path.dirname(dest))
            os.rename(dest, os.path.join(trash, "layer"))  # vanish atomically, then delete at leisure
            _remove(trash)
