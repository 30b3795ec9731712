"""Large values: content-defined chunks in the chunk store, a small pointer blob in git (DESIGN §3).

A value above the keg's threshold (default 1 MiB) is cut by FastCDC
(``pyfastcdc``, a compiled FastCDC 2020), each chunk is stored once under its
blake3 hash (:mod:`keg.chunks`), and git holds a *pointer blob*:

.. code-block:: text

    keg-large-value v1
    size 1073741824
    blake3 <64 hex: the hash of the whole value>
    chunks 1012
    <64 hex> <length>
    …

The same bytes always give the same chunks and so the same pointer blob and
the same KID: a thousand copies of a value are a thousand tree entries naming
one blob.  A value whose bytes happen to begin with the marker line is stored
as chunks whatever its size, so every blob that begins with the marker is a
pointer and reading gives back exactly what was written.

Reading a pointer streams the original bytes a chunk at a time
(:class:`LargeReader`), checking each chunk against its hash and the whole
against the pointer's hash, so a damaged chunk is an error naming the path and
the chunk, never wrong bytes.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import blake3
from pyfastcdc.cy import FastCDC

from keg.chunks import HASH_RE, ChunkStore, chunk_hash
from keg.errors import BadRequest, CorruptKeg

MARKER = b"keg-large-value v1\n"
DEFAULT_THRESHOLD = 1 << 20
# Chunk sizes: FastCDC's average, chosen by measurement (docs/benchmarks.md, "Chunk size"): 64 KiB
# makes a small edit of a large value cost about one 64 KiB chunk (casync's default too), where
# 1 MiB rewrote about 0.75 MiB per edit; the per-chunk costs are paid for by one syncfs per batch.
AVG_CHUNK = 64 << 10
MIN_CHUNK = AVG_CHUNK // 4
MAX_CHUNK = AVG_CHUNK * 4
MAX_POINTER = 64 << 20  # a pointer blob larger than this is refused as damaged
GROUP_BYTES = 8 << 20  # chunks hashed, checked and compressed together (zstd spreads a group over CPUs)
WORKERS = 2  # chunk worker processes, given groups in turn
WORKER_AT = 16 << 20  # past this much of a value, worker processes compress and write (keg.chunkworker)
_workers_fail = False  # starting a worker failed once: not tried again
_LINE = re.compile(rb"^([0-9a-f]{64}) ([0-9]+)$")


@dataclass(frozen=True)
class Pointer:
    """What a pointer blob says: the value's size, its blake3 hash, and its chunks in order."""

    size: int
    blake3: str
    chunks: tuple  # ((hash, length), ...)

    def encode(self) -> bytes:
        """The pointer blob's bytes (canonical: one encoding per pointer)."""
        head = [MARKER, b"size %d\n" % self.size, b"blake3 %s\n" % self.blake3.encode(),
                b"chunks %d\n" % len(self.chunks)]
        return b"".join(head + [b"%s %d\n" % (h.encode(), n) for h, n in self.chunks])

    def to_json(self) -> dict:
        """The JSON form of a ``large`` put (``POST /v1/tx``)."""
        return {"size": self.size, "blake3": self.blake3, "chunks": [[h, n] for h, n in self.chunks]}

    @classmethod
    def from_json(cls, obj, where: str = "large") -> "Pointer":
        """Parse and check the JSON form.

        Raises:
            BadRequest: naming what is wrong.
        """
        if not isinstance(obj, dict) or set(obj) != {"size", "blake3", "chunks"}:
            raise BadRequest(f"{where}: a large value is an object with 'size', 'blake3' and 'chunks'")
        size, whole, chunks = obj["size"], obj["blake3"], obj["chunks"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadRequest(f"{where}: 'size' must be a non-negative integer")
        if not isinstance(whole, str) or not HASH_RE.match(whole):
            raise BadRequest(f"{where}: 'blake3' must be 64 lowercase hex digits")
        if not isinstance(chunks, list):
            raise BadRequest(f"{where}: 'chunks' must be a list of [blake3, length] pairs")
        out = []
        for i, c in enumerate(chunks):
            if (not isinstance(c, list) or len(c) != 2 or not isinstance(c[0], str) or not HASH_RE.match(c[0])
                    or not isinstance(c[1], int) or isinstance(c[1], bool) or c[1] <= 0):
                raise BadRequest(f"{where}: chunks[{i}] must be [64 hex digits, a positive length]")
            out.append((c[0], c[1]))
        if sum(n for _, n in out) != size:
            raise BadRequest(f"{where}: the chunk lengths add up to {sum(n for _, n in out)}, not to size {size}")
        return cls(size, whole, tuple(out))

    @classmethod
    def parse(cls, data: bytes, where: str = "") -> "Pointer":
        """Read a pointer blob.

        Raises:
            CorruptKeg: the blob begins with the marker but is not a well-formed pointer.
        """
        def bad(why):
            return CorruptKeg(f"pointer blob{' at ' + where if where else ''} is damaged: {why}")
        if not data.startswith(MARKER) or len(data) > MAX_POINTER:
            raise bad("no marker line, or too large")
        lines = data[len(MARKER):].split(b"\n")
        if len(lines) < 4 or lines[-1] != b"":
            raise bad("truncated")
        try:
            key_s, size = lines[0].split(b" ")
            key_b, whole = lines[1].split(b" ")
            key_c, count = lines[2].split(b" ")
            size, count, whole = int(size), int(count), whole.decode("ascii")
        except ValueError as err:
            raise bad("malformed header") from err
        if (key_s, key_b, key_c) != (b"size", b"blake3", b"chunks") or not HASH_RE.match(whole):
            raise bad("malformed header")
        body = lines[3:-1]
        if len(body) != count:
            raise bad(f"says {count} chunks, lists {len(body)}")
        chunks = []
        for line in body:
            m = _LINE.match(line)
            if m is None:
                raise bad(f"malformed chunk line {line[:80]!r}")
            chunks.append((m.group(1).decode("ascii"), int(m.group(2))))
        if sum(n for _, n in chunks) != size:
            raise bad("chunk lengths do not add up to the size")
        pointer = cls(size, whole, tuple(chunks))
        if pointer.encode() != data:
            raise bad("not in canonical form")
        return pointer


def is_pointer(data) -> bool:
    """True when a blob is a pointer blob (it begins with the marker line)."""
    return bytes(data[:len(MARKER)]) == MARKER


def chunker() -> FastCDC:
    """The content-defined chunker every keg uses (same parameters, same boundaries)."""
    return FastCDC(avg_size=AVG_CHUNK, min_size=MIN_CHUNK, max_size=MAX_CHUNK)


class _Readinto:
    """Adapts any binary stream with ``read`` (or ``readinto``) for the chunker."""

    def __init__(self, stream, progress):
        self.stream, self.progress = stream, progress

    def readinto(self, view) -> int:
        readinto = getattr(self.stream, "readinto", None)
        if readinto is not None:
            n = readinto(view) or 0
        else:
            data = self.stream.read(len(view))
            n = len(data)
            view[:n] = data
        if n and self.progress is not None:
            self.progress(n)
        return n


def cut(stream, progress=None):
    """Yield the bytes of each content-defined chunk of ``stream``, in order.

    ``progress(n)`` is called with the number of bytes read after each read.
    """
    for piece in chunker().cut_stream(_Readinto(stream, progress)):
        yield bytes(piece.data)  # the chunker reuses its buffer


def ingest(store_or_batch, stream, progress=None) -> Pointer:
    """Cut ``stream`` into chunks, store each once, and return the pointer.

    Chunks are handled in groups of about ``GROUP_BYTES``: hashed, checked
    against the store, and the new ones compressed together on zstd's own
    threads, so memory stays near two groups whatever the size of the stream.
    Given a store, past ``WORKER_AT`` bytes the groups go to a second process
    (:class:`keg.chunkworker.WorkerBatch`) that compresses and writes them
    while this one cuts and hashes the next.

    Args:
        store_or_batch: a :class:`ChunkStore` (the chunks are made durable
            before this returns) or a batch (anything with ``put(name, data,
            verified)``, and optionally ``put_many(items, verified)``; the
            caller syncs it).
        stream: a binary file object, read to its end.
        progress: called with the number of bytes read, as they are read.
    """
    own = isinstance(store_or_batch, ChunkStore)
    batches = [store_or_batch.batch() if own else store_or_batch]
    whole = blake3.blake3()  # one thread: spread over threads, 64 KiB updates ran 2.5x slower
    chunks, group = [], []
    try:
        group_bytes = seen = 0
        for data in cut(stream, progress):
            whole.update(data)
            group.append((chunk_hash(data), data))
            group_bytes += len(data)
            seen += len(data)
            if group_bytes >= GROUP_BYTES:
                _store_group(batches, group, own and seen >= WORKER_AT)
                chunks.extend((name, len(data)) for name, data in group)
                group, group_bytes = [], 0
        _store_group(batches, group, False)
        chunks.extend((name, len(data)) for name, data in group)
        if own:
            for batch in batches:
                batch.sync()
    except BaseException:
        for batch in batches[1:]:
            batch.abort()
        raise
    return Pointer(sum(n for _, n in chunks), whole.hexdigest(), tuple(chunks))


def _store_group(batches: list, group: list, to_worker: bool) -> None:
    """Hand ``group`` to a batch: the caller's own, or in turn each of ``WORKERS`` worker processes."""
    global _workers_fail
    if to_worker and len(batches) == 1 and not _workers_fail:
        from keg.chunkworker import WorkerBatch
        try:
            for _ in range(WORKERS):
                batches.append(WorkerBatch(batches[0].store))
        except OSError:  # no Python to start (an embedded interpreter): this process does it all
            for worker in batches[1:]:
                worker.abort()
            del batches[1:]
            _workers_fail = True
    if len(batches) > 1:
        batches.append(batches.pop(1))  # the next worker in turn
    batch = batches[-1]
    put_many = getattr(batch, "put_many", None)
    if put_many is not None:
        put_many(group, verified=True)
    else:
        for name, data in group:
            batch.put(name, data, verified=True)


def ingest_bytes(store_or_batch, data: bytes) -> Pointer:
    """:func:`ingest` of bytes already in memory."""
    return ingest(store_or_batch, io.BytesIO(data))


class LargeReader(io.RawIOBase):
    """The bytes of a large value, read a chunk at a time and verified.

    Each chunk is checked against its hash as it is fetched; at the end the
    whole is checked against the pointer's blake3.  ``fetch(name, where)``
    returns a chunk's verified bytes (a local :class:`ChunkStore`'s ``get``,
    or a remote one).

    Raises (from ``read``):
        CorruptKeg: a chunk or the whole does not match its hash; the message
            names ``path`` and the chunk.
        NotFound: a chunk is missing.
    """

    def __init__(self, pointer: Pointer, fetch, path: str = ""):
        super().__init__()
        self.pointer, self.fetch, self.path = pointer, fetch, path
        self._index = 0
        self._buf = memoryview(b"")
        self._whole = blake3.blake3()
        self._read = 0

    def readable(self) -> bool:
        return True

    def _next_chunk(self) -> bool:
        if self._index >= len(self.pointer.chunks):
            return False
        name, length = self.pointer.chunks[self._index]
        data = self.fetch(name, self.path)
        if len(data) != length:
            raise CorruptKeg(f"{self.path}: chunk {name} is {len(data)} bytes, the pointer says {length}")
        self._index += 1
        self._whole.update(data)
        if self._index == len(self.pointer.chunks) and self._whole.hexdigest() != self.pointer.blake3:
            raise CorruptKeg(f"{self.path}: the chunks do not hash to the value's blake3 {self.pointer.blake3}")
        self._buf = memoryview(data)
        return True

    def readinto(self, b) -> int:
        while not self._buf:
            if not self._next_chunk():
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        self._read += n
        return n

    def iter_chunks(self):
        """Yield the value as verified pieces (one per chunk), from the current position."""
        if self._buf:
            piece, self._buf = bytes(self._buf), memoryview(b"")
            yield piece
        while self._next_chunk():
            piece, self._buf = self._buf.tobytes(), memoryview(b"")
            yield piece

    def readall(self) -> bytes:
        return b"".join(self.iter_chunks())


def read_full(stream, n: int) -> bytes:
    """Up to ``n`` bytes of ``stream``, fewer only at its end (pipes return short reads)."""
    parts, got = [], 0
    while got < n:
        data = stream.read(n - got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


class Chain(io.RawIOBase):
    """Bytes already read, then the rest of the stream they came from."""

    def __init__(self, head: bytes, rest):
        super().__init__()
        self._head, self._rest = memoryview(head), rest

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._head:
            n = min(len(b), len(self._head))
            b[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._rest.read(len(b))
        b[:len(data)] = data
        return len(data)
