"""A second process that compresses and writes chunks while the caller cuts and hashes the next ones.

DESIGN §1.5: concurrency comes from processes.  Importing a large value is
two kinds of work of about the same size: cutting it and hashing the chunks
(the caller, :func:`keg.large.ingest`) and compressing and writing the new
chunks (zstd on its own threads, then a file each).  Done one after the other
they keep one of two CPUs idle for most of an import; a :class:`WorkerBatch`
hands each group of chunks to a child process running this module, so the
two overlap.  ``keg.large`` starts two of them and gives them groups in
turn: with one, the child did the larger half alone and the import was no
faster.

The protocol, over the child's stdin: a group is ``GROUP`` (4 bytes: the
number of chunks, big-endian), then per chunk its 32-byte blake3 digest, its
length (4 bytes) and its bytes; a group of zero chunks ends the stream.  The
child stores each group like :meth:`keg.chunks.Batch.put_many` (the existence
test touches a chunk already stored; new ones are compressed and written
under a temporary name, then renamed), without syncing, and at the end writes
one JSON line to stdout: the files it wrote and their bytes.  The caller makes
them durable (:meth:`keg.chunks.Batch.sync`) before a pointer to them is
committed, as with a batch of its own.

The caller computed every hash from the bytes it sends, so the child does not
hash them again.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

from keg.chunks import ChunkStore
from keg.errors import KegError

COUNT = struct.Struct(">I")
ENTRY = struct.Struct(">32sI")
PIPE_BYTES = 1 << 20  # the pipe's buffer (Linux's default 64 KiB would make the caller wait in small steps)


class WorkerFailed(KegError):
    """The chunk worker stopped before storing every chunk it was given; nothing was committed."""


class WorkerBatch:
    """A batch whose chunks a child process compresses and writes (the interface of :class:`keg.chunks.Batch`).

    ``put_many`` returns as soon as the child has the group in its pipe;
    ``sync`` waits for the child to finish and makes its files durable.
    """

    def __init__(self, store: ChunkStore):
        self.store = store
        self.written = 0
        self.stored_bytes = 0
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (package_parent, os.environ.get("PYTHONPATH", "")) if p))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "keg.chunkworker", os.path.dirname(os.path.dirname(store.root))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, close_fds=True)
        try:
            import fcntl
            fcntl.fcntl(self._proc.stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:
            pass  # a smaller pipe only means more, shorter waits

    def put(self, name: str, data, verified: bool = False) -> bool:
        """Send one chunk (``put_many`` of one)."""
        return self.put_many([(name, data)], verified)[0]

    def put_many(self, items: list, verified: bool = False) -> list:
        """Send a group of ``(name, data)``; the child's answer about each is not waited for.

        Returns a list of None (whether a chunk was new is known only to the child).

        Raises:
            ValueError: ``verified`` is False (the child does not hash: the caller must have).
            WorkerFailed: the child stopped.
        """
        if not verified:
            raise ValueError("a WorkerBatch takes only chunks whose hashes the caller computed from their bytes")
        if items:  # an empty group is the end mark
            self._send(encode_group(items))
        return [None] * len(items)

    def _send(self, data: bytes) -> None:
        try:
            self._proc.stdin.write(data)
            self._proc.stdin.flush()
        except (BrokenPipeError, ValueError) as err:
            raise self._failure() from err

    def _failure(self) -> WorkerFailed:
        self._proc.kill()
        err = self._proc.stderr.read().decode(errors="replace").strip().splitlines()
        self._proc.wait()
        why = err[-1] if err else f"exit status {self._proc.returncode}"
        return WorkerFailed(f"the chunk worker stopped: {why}")

    def sync(self) -> None:
        """Wait for the child to store everything sent, then make its files durable.

        Raises:
            WorkerFailed: the child did not store every chunk.
        """
        if self._proc.returncode is not None:
            return
        self._send(COUNT.pack(0))
        self._proc.stdin.close()
        out = self._proc.stdout.read()
        err = self._proc.stderr.read()
        if self._proc.wait() != 0:
            lines = err.decode(errors="replace").strip().splitlines()
            raise WorkerFailed(f"the chunk worker failed: {lines[-1] if lines else self._proc.returncode}")
        report = json.loads(out)
        self.written, self.stored_bytes = report["written"], report["stored_bytes"]
        batch = self.store.batch()
        batch.adopt(report["files"])
        batch.sync()

    def abort(self) -> None:
        """Stop the child without waiting for its work (the import failed)."""
        if self._proc.returncode is None:
            self._proc.kill()
            self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
            try:
                stream.close()
            except OSError:
                pass


def encode_group(items: list) -> bytes:
    """The bytes of a group of ``(name, data)`` chunks (also the body of ``POST /v1/chunks``)."""
    parts = [COUNT.pack(len(items))]
    for name, data in items:
        parts.append(ENTRY.pack(bytes.fromhex(name), len(data)))
        parts.append(data)
    return b"".join(parts)


def _read_exactly(stream, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise EOFError(f"the chunk group ends {n - len(data)} bytes early")
    return data


def read_group(stream) -> list:
    """The ``(name, data)`` chunks of the next group in ``stream``; empty at the end mark.

    Raises:
        EOFError: the stream ends inside a group.
    """
    (count,) = COUNT.unpack(_read_exactly(stream, COUNT.size))
    items = []
    for _ in range(count):
        digest, length = ENTRY.unpack(_read_exactly(stream, ENTRY.size))
        items.append((digest.hex(), _read_exactly(stream, length)))
    return items


def serve(keg_path: str, stdin, stdout) -> None:
    """The child's loop: store the groups read from ``stdin``, then report on ``stdout``."""
    batch = ChunkStore(keg_path, durable=True).batch()
    while True:
        items = read_group(stdin)
        if not items:
            break
        batch.put_many(items, verified=True)
    files = batch.take_files()
    stdout.write(json.dumps({"written": batch.written, "stored_bytes": batch.stored_bytes,
                             "files": files}).encode() + b"\n")
    stdout.flush()


if __name__ == "__main__":
    serve(sys.argv[1], sys.stdin.buffer, sys.stdout.buffer)
