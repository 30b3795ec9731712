"""The master interface: what every front end (HTTP, FastCGI, the CLI in process) uses.

Two implementations sit behind it, chosen at start-up: ``SingleMaster`` (one
process owns the keg, ``master/single.py``) and the Raft-replicated master.
Callers never branch on which one they have.

Writes go through ``submit``: it queues a transaction and returns a
``Pending`` at once, so that a server can read every request that is waiting
and then commit them together (group commit) with one ``flush``.  A caller
with nothing better to do calls ``Pending.wait``, which flushes if nobody else
is doing it.
"""

from __future__ import annotations

import abc

from keg.chunks import check_hash, chunk_hash
from keg.errors import BadRequest, KegError
from keg.transaction import TxResult


class Pending:
    """A submitted transaction whose result is not known yet."""

    __slots__ = ("tx", "result", "_callbacks", "_master")

    def __init__(self, tx, master: "Master"):
        self.tx = tx
        self.result: TxResult | None = None
        self._callbacks: list = []
        self._master = master

    @property
    def done(self) -> bool:
        """True once the transaction committed or failed."""
        return self.result is not None

    def resolve(self, result: TxResult) -> None:
        """Record the result and run the callbacks (called by the master only)."""
        self.result = result
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def add_callback(self, callback) -> None:
        """Call ``callback()`` once the result is known (at once if it already is)."""
        if self.done:
            callback()
        else:
            self._callbacks.append(callback)

    def wait(self) -> TxResult:
        """Block until the result is known, committing the queue if nobody else is.

        ``flush`` returns only after the group holding this transaction was
        committed, by this thread or by the one that held the commit lock.
        """
        while not self.done:
            self._master.flush()
        return self.result


class Master(abc.ABC):
    """The authoritative keg, as every front end sees it."""

    # ------------------------------------------------------------- reads
    @abc.abstractmethod
    def head(self):
        """The newest ``Revision``."""

    @abc.abstractmethod
    def revision(self, spec=None):
        """A ``Revision`` by number, KID or ``None`` for the head."""

    @abc.abstractmethod
    def stat(self, path: str, rev=None):
        """The ``Entry`` at ``path``."""

    @abc.abstractmethod
    def read(self, path: str, rev=None) -> bytes:
        """The bytes of the file at ``path``."""

    @abc.abstractmethod
    def open(self, path: str, rev=None):
        """A binary file object reading the value at ``path`` (large values streamed, verified)."""

    @abc.abstractmethod
    def pointer(self, path: str, rev=None):
        """The ``keg.large.Pointer`` of a large value, or None for a plain one."""

    @abc.abstractmethod
    def list(self, path: str = "/", rev=None, offset: int = 0, limit=None) -> list:
        """The ``Entry`` list of the directory at ``path``, in name order; ``offset``/``limit`` pick a page of it."""

    @abc.abstractmethod
    def names(self, path: str = "/", rev=None) -> list:
        """The names of the directory's entries, in name order, without reading them (what ``list`` pages over)."""

    @abc.abstractmethod
    def log(self, path: str = "/", rev=None, limit=None) -> list:
        """``(Revision, path KID)`` pairs, newest first."""

    @abc.abstractmethod
    def diff(self, rev_a, rev_b, prefix: str = "/") -> list:
        """``(path, old KID, new KID)`` triples."""

    @abc.abstractmethod
    def resolve_kid(self, text: str) -> dict:
        """What a KID names."""

    # ------------------------------------------------------------ writes
    @abc.abstractmethod
    def submit(self, tx) -> Pending:
        """Queue a transaction for the next group commit."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Commit everything queued, as one group; resolve each ``Pending``."""

    def changed_since(self, top: str, revision: int) -> bool | None:
        """Whether a revision after ``revision`` changed anything under ``/<top>``; ``None`` if unknown."""
        return None

    def housekeeping(self) -> float | None:
        """Finish background work that is done (a checkpoint written by a child).

        Returns:
            Seconds after which to call again, or ``None`` when nothing is under way.
        """
        return None

    def commit(self, transactions) -> list:
        """Apply transactions and wait for their results (one group when possible)."""
        pending = [self.submit(tx) for tx in transactions]
        return [p.wait() for p in pending]

    def read_barrier(self) -> Pending:
        """A ``Pending`` resolved once a read here sees every write acknowledged before the call.

        For a linearizable read (``?linearizable=1``).  A single master's reads
        always do, so it resolves at once; a Raft replica first passes a point
        in the replicated log.
        """
        pending = Pending(None, self)
        head = self.head()
        pending.resolve(TxResult(True, head.number, head.kid, {}))
        return pending

    @abc.abstractmethod
    def compact(self, window: int) -> dict:
        """Drop old history of volatile directories."""

    @abc.abstractmethod
    def gc_chunks(self, grace: float) -> dict:
        """Delete chunks no retained revision points at (see ``Store.gc_chunks``)."""

    # ------------------------------------------------------------- watch
    @abc.abstractmethod
    def events(self, prefix: str, since: int, until: int, limit: int = 10_000) -> tuple:
        """Events under ``prefix`` in revisions ``since+1 .. until``: ``(events, last revision examined)``.

        Whole revisions only: once about ``limit`` events are found the list
        stops at a revision boundary, and the caller goes on from the
        revision returned.
        """

    @abc.abstractmethod
    def subscribe(self, callback, prefix: str = "/") -> None:
        """Call ``callback(head_number)`` after new revisions that change something under ``prefix``.

        Only a wake-up: the subscriber reads the events with ``events``, which
        stays the one source of what changed.  The call may come on a later
        turn of the event loop than the commit, and once for several
        revisions.  Subscribing a callback again moves it to the new prefix.
        """

    @abc.abstractmethod
    def unsubscribe(self, callback) -> None:
        """Stop calling ``callback``."""

    @abc.abstractmethod
    def wait_for_revision(self, after: int, timeout: float) -> int:
        """Block until the head is past ``after`` or ``timeout`` passes; returns the head number."""

    # ------------------------------------------------------ chunks, git
    @abc.abstractmethod
    def chunk_get(self, name: str) -> bytes:
        """A chunk's bytes, verified."""

    @abc.abstractmethod
    def chunk_put(self, name: str, data: bytes) -> bool:
        """Store a chunk durably; False when it was already there."""

    def chunk_put_many(self, items: list) -> list:
        """Store ``(name, data)`` chunks durably; for each, False when it was there already.

        Raises:
            BadRequest: a chunk's bytes do not hash to its name (nothing of the group is stored).
        """
        for name, data in items:
            check_hash(name)
            if chunk_hash(data) != name:
                raise BadRequest(f"chunk body hashes to {chunk_hash(data)}, not to {name}; nothing was stored")
        return [self.chunk_put(name, data) for name, data in items]

    @abc.abstractmethod
    def chunk_missing(self, names: list) -> list:
        """Which of ``names`` are not stored (the stored ones are kept from collection a while longer)."""

    @abc.abstractmethod
    def put_stream(self, path: str, stream, mode: int = 0o100644):
        """A put op for a stream's bytes, its chunks stored here first when it is large (see ``Store.put_stream``)."""

    def replicate_chunks(self, names: list):
        """Store the chunks ``names``, held here, wherever else they must be before a write that stored them
        is answered (``chunk_put``, ``chunk_put_many`` and ``put_stream`` store them here only).

        Returns:
            None when nothing more is needed (a single node); else a ``Pending`` resolved with an ok
            ``TxResult``, or one whose error (``KegBusy``) says why they are not where they must be.
        """
        return None

    def start_source(self, app: str, commit: str, pack: bytes):
        """Start storing a pushed source's objects (``keg.sources.receive``) in a child process.

        Returns:
            The running ``master.source_job.SourceJob``; once it has finished, ``source_stored`` says how it
            went. The caller then commits the pointer ``/src/<app>``: the objects are durable (and,
            replicated, on a majority) by then.
        """
        raise KegError(f"{type(self).__name__} does not receive pushes yet")

    def source_stored(self, job) -> str:
        """The tree id of the source a finished ``start_source`` job stored.

        Raises:
            BadRequest, BadSource, KegBusy or KegError: why it was not stored.
        """
        return job.tree()

    @abc.abstractmethod
    def status(self) -> dict:
        """What ``keg master status`` shows for this master: ``mode`` (``single`` or ``raft``), ``role``,
        ``revision``, ``revision_kid`` and ``housekeeping`` (``Store.housekeeping_status``); a Raft
        replica adds its term, indexes and peers."""

    @abc.abstractmethod
    def publish(self) -> str:
        """Make the git repository on disk show the head (for git fetch); returns its path."""

    @abc.abstractmethod
    def close(self) -> None:
        """Finish queued work and release the keg."""
