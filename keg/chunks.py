"""The chunk store: byte strings kept once under their blake3 hash (DESIGN §3).

Chunks live beside the git objects, one file each:

``keg/chunks/<first two hex>/<hash>``       the chunk's bytes as they are
``keg/chunks/<first two hex>/<hash>.zst``   the chunk compressed with zstd

A chunk is compressed only where that pays (the frame is at most 7/8 of the
raw size); the name is always the blake3 hash of the *uncompressed* bytes.  A
chunk is checked against its name when it is stored and again when it is
read, so a damaged file is reported, never served.

Files are written under a temporary name and renamed, so a crash leaves a
chunk whole or absent.  ``put`` fsyncs before it returns; a :class:`Batch`
writes many chunks and fsyncs them together at the end, which is how large
values are imported (the transaction that points at them is committed only
after the batch is durable).
"""

from __future__ import annotations

import os
import re
import threading

import blake3
import zstandard

from keg.errors import BadRequest, CorruptKeg, NotFound
from keg.fsio import fsync_dir, make_dirs, syncfs

HASH_RE = re.compile(r"^[0-9a-f]{64}$")
# zstd level 1: against level 3, a 1 GiB image imports about 16% faster (199-201 vs 170-177 MiB/s,
# interleaved, with the chunk workers) for about 4% more disk (452 vs 435 MiB).
ZSTD_LEVEL = 1
COMPRESSED = ".zst"
PAYS = 7 / 8  # keep the compressed form when it is at most this share of the raw size
# zstd compresses a group of chunks on threads of its own (multi_compress_to_buffer): the library's way of
# using several CPUs, so Keg's code starts no threads for it (DESIGN §1.5).
COMPRESS_THREADS = max(1, min(4, os.cpu_count() or 1))
# A batch of at least this many chunk files is made durable by one syncfs of the file system
# (as ostree commits) rather than an fsync per file: 16,000 fsyncs of a 1 GiB import at 64 KiB
# chunks took 2.2-2.8 s, the one syncfs about 0.4 s (docs/benchmarks.md, "Large values").
SYNCFS_FILES = 64

_local = threading.local()


def chunk_hash(data) -> str:
    """The name of a chunk: its blake3 hash, 64 lowercase hex digits (blake3 spreads a large one over CPUs)."""
    if len(data) >= 1 << 17:
        return blake3.blake3(data, max_threads=blake3.blake3.AUTO).hexdigest()
    return blake3.blake3(data).hexdigest()


def check_hash(text: str) -> str:
    """Validate a chunk name.

    Raises:
        BadRequest: ``text`` is not 64 lowercase hex digits.
    """
    if not isinstance(text, str) or not HASH_RE.match(text):
        raise BadRequest(f"{text!r} is not a chunk name: a chunk is named by its blake3 hash, 64 lowercase hex digits")
    return text


def _compressor():
    c = getattr(_local, "cctx", None)
    if c is None:
        c = _local.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return c


def _decompressor():
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


def _choose(data, frame) -> tuple:
    if len(frame) <= len(data) * PAYS:
        return COMPRESSED, frame
    return "", data


def encode_chunk(data) -> tuple:
    """``(suffix, bytes to write)``: the zstd frame where it pays, else the raw bytes."""
    return _choose(data, _compressor().compress(data))


def encode_chunks(datas: list) -> list:
    """:func:`encode_chunk` of each of ``datas``, compressed together on zstd's own threads."""
    if len(datas) < 2 or COMPRESS_THREADS < 2:
        return [encode_chunk(d) for d in datas]
    frames = _compressor().multi_compress_to_buffer([bytes(d) for d in datas], threads=COMPRESS_THREADS)
    return [_choose(d, frames[i].tobytes()) for i, d in enumerate(datas)]


class Batch:
    """Chunks written together and made durable together by :meth:`sync`.

    Used as a context manager, the batch is synced on a clean exit.  A chunk
    in a batch is visible to readers as soon as it is written (others may
    point at it only after the batch is synced).
    """

    def __init__(self, store: "ChunkStore"):
        self.store = store
        self._lock = threading.Lock()
        self._files: list = []
        self._dirs: set = set()
        self.written = 0        # chunks written by this batch
        self.stored_bytes = 0   # their bytes on disk (after compression)

    def put(self, name: str, data, verified: bool = False) -> bool:
        """Store one chunk without waiting for the disk; False when it was already there."""
        return self.put_many([(name, data)], verified)[0]

    def put_many(self, items: list, verified: bool = False) -> list:
        """Store ``(name, data)`` pairs without waiting for the disk; for each, False when it was there already.

        The new ones are compressed together (:func:`encode_chunks`).
        """
        for name, data in items:
            check_hash(name)
            if not verified and chunk_hash(data) != name:
                raise BadRequest(f"chunk body hashes to {chunk_hash(data)}, not to {name}; nothing was stored")
        new = [i for i, (name, _) in enumerate(items) if not self.store._touch(name)]
        stored = [False] * len(items)
        encoded = encode_chunks([items[i][1] for i in new])
        for i, (suffix, body) in zip(new, encoded):
            path = self.store._write_file(items[i][0], suffix, body, durable=False)
            stored[i] = True
            with self._lock:
                self._files.append(path)
                self._dirs.add(os.path.dirname(path))
                self.written += 1
                self.stored_bytes += len(body)
        return stored

    def take_files(self) -> list:
        """The paths of the chunk files written and not yet synced, which the batch forgets (another will sync them)."""
        with self._lock:
            files, self._files, self._dirs = self._files, [], set()
        return files

    def adopt(self, files: list) -> None:
        """Make ``files``, chunk files of this store written by another process, part of this batch's sync."""
        with self._lock:
            self._files.extend(files)
            self._dirs.update(os.path.dirname(f) for f in files)

    def sync(self) -> None:
        """Make every chunk written by the batch durable, with the directories holding them.

        Many files: one syncfs of the file system (:func:`keg.fsio.syncfs`)
        where it can be trusted; otherwise an fsync of each file and directory.
        """
        if not self.store.durable:
            return
        with self._lock:
            files, dirs = self._files, self._dirs
            self._files, self._dirs = [], set()
        if len(files) >= SYNCFS_FILES and syncfs(self.store.root):
            return
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for d in sorted(dirs):
            fsync_dir(d)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *rest):
        if exc_type is None:
            self.sync()


class ChunkStore:
    """Chunks of one keg.

    Args:
        keg_path: the keg directory.
        durable: fsync each chunk before ``put`` returns.
    """

    def __init__(self, keg_path: str, durable: bool = True):
        self.root = os.path.join(keg_path, "keg", "chunks")
        self.durable = durable
        self._made: set = set()  # prefix directories known to exist

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name[:2], name)

    def _existing(self, name: str) -> str | None:
        base = self._path(name)
        for path in (base + COMPRESSED, base):
            if os.path.exists(path):
                return path
        return None

    def has(self, name: str) -> bool:
        """True when the chunk is stored."""
        return self._existing(check_hash(name)) is not None

    def touch(self, name: str) -> bool:
        """Mark a stored chunk as just used (see :meth:`Store.gc_chunks`); False when it is absent."""
        return self._touch(check_hash(name))

    def _touch(self, name: str) -> bool:
        base = self._path(name)
        for path in (base + COMPRESSED, base):  # utime is the existence test: one call for a stored chunk
            try:
                os.utime(path)
                return True
            except FileNotFoundError:
                continue
        return False

    def missing(self, names) -> list:
        """The names not stored, in the order given; the stored ones are touched.

        Touching keeps a chunk that a client is about to point at safe from a
        garbage collection running meanwhile.
        """
        return [n for n in names if not self.touch(n)]

    def _write(self, name: str, data, durable: bool, verified: bool = False) -> str | None:
        check_hash(name)
        if not verified:
            actual = chunk_hash(data)
            if actual != name:
                raise BadRequest(f"chunk body hashes to {actual}, not to {name}; nothing was stored")
        if self._touch(name):
            return None
        suffix, body = encode_chunk(data)
        return self._write_file(name, suffix, body, durable)

    def _write_file(self, name: str, suffix: str, body, durable: bool) -> str:
        """Write an encoded chunk under a temporary name and rename it into place; returns its path."""
        path = self._path(name) + suffix
        directory = os.path.dirname(path)
        if directory not in self._made:
            make_dirs(directory, self.durable)  # its name too, or a power cut can take chunks "stored"
            self._made.add(directory)
        tmp = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if durable:
            fsync_dir(directory)
        return path

    def put(self, name: str, data, verified: bool = False) -> bool:
        """Store ``data`` under ``name`` once, durably; returns False when it was already there.

        Raises:
            BadRequest: ``data`` does not hash to ``name``; nothing is stored.
        """
        return self._write(name, data, durable=self.durable, verified=verified) is not None

    def batch(self) -> Batch:
        """A :class:`Batch` of puts made durable together."""
        return Batch(self)

    def get(self, name: str, where: str = "") -> bytes:
        """The bytes of a chunk, checked against its hash.

        Args:
            where: what the chunk belongs to (a path), named in errors.

        Raises:
            NotFound: no such chunk.
            CorruptKeg: the stored bytes do not match the name.
        """
        check_hash(name)
        of = f" of {where}" if where else ""
        path = self._existing(name)
        if path is None:
            raise NotFound(f"chunk {name}{of} is missing from this keg")
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError as err:
            raise NotFound(f"chunk {name}{of} is missing from this keg") from err
        data = raw
        if path.endswith(COMPRESSED):
            try:
                data = _decompressor().decompress(raw)
            except zstandard.ZstdError as err:
                raise CorruptKeg(f"chunk {name}{of} is damaged on disk ({path}: {err})") from err
        actual = chunk_hash(data)
        if actual != name:
            raise CorruptKeg(f"chunk {name}{of} is damaged on disk ({path} holds bytes hashing to {actual})")
        return data

    def names(self):
        """Every stored chunk as ``(name, file path)``, in no particular order."""
        try:
            prefixes = os.listdir(self.root)
        except FileNotFoundError:
            return
        for prefix in prefixes:
            directory = os.path.join(self.root, prefix)
            try:
                files = os.listdir(directory)
            except (FileNotFoundError, NotADirectoryError):
                continue
            for fname in files:
                name = fname[:-len(COMPRESSED)] if fname.endswith(COMPRESSED) else fname
                if HASH_RE.match(name):
                    yield name, os.path.join(directory, fname)

    def sweep(self, keep, older_than: float) -> dict:
        """Delete the chunks not in ``keep`` whose files were last touched before ``older_than``.

        Also removes temporary files a crash left behind (older than ``older_than``).
        Returns ``{"chunks": n, "bytes": b}`` of what was removed.
        """
        removed = freed = 0
        for name, path in list(self.names()):
            if name in keep:
                continue
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            if st.st_mtime >= older_than:
                continue
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            removed += 1
            freed += st.st_blocks * 512
        for prefix in os.listdir(self.root) if os.path.isdir(self.root) else ():
            directory = os.path.join(self.root, prefix)
            for fname in os.listdir(directory) if os.path.isdir(directory) else ():
                if ".tmp" in fname:
                    path = os.path.join(directory, fname)
                    try:
                        if os.stat(path).st_mtime < older_than:
                            os.unlink(path)
                    except FileNotFoundError:
                        pass
        return {"chunks": removed, "bytes": freed}
