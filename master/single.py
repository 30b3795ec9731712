"""The single-node master: one process owns the keg and commits for every client.

Reads go straight to the store.  Writes are queued by ``submit`` and committed
in groups by ``flush``: a server flushes once per turn of its event loop, so
every write that arrived while the previous group was being fsynced goes into
the next one (group commit), and each request still gets its own result.

The store is not thread-safe; a lock serialises it so that threaded front ends
(flup's FastCGI server) can share one master.  In the event-loop server the
lock is never contended.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from keg import paths
from keg.errors import BadRequest, KegError
from keg.store import Store
from keg.transaction import TxResult
from master.interface import Master, Pending

MAX_GROUP = 512                # transactions per commit: bounds one fsync's latency
EVENT_CACHE_REVISIONS = 4096   # recent revisions whose events are kept, shared by all watchers


class SingleMaster(Master):
    """The master over one local keg.

    Args:
        store: an open ``Store``; the master takes its write lock at once.
    """

    def __init__(self, store: Store):
        self.store = store
        self.store.lock()
        self.chunks = store.chunks
        self._lock = threading.RLock()          # the store
        self._commit_lock = threading.Lock()    # one committer at a time
        self._queue_lock = threading.Lock()
        self._queue: list = []
        self._head_changed = threading.Condition()
        self._subscribers: list = []
        self._events: OrderedDict = OrderedDict()  # revision -> all its events
        self.on_submit = None   # set by an event-loop server: schedules a flush
        self.stats = {"commits": 0, "transactions": 0}

    # ------------------------------------------------------------------ reads

    def head(self):
        with self._lock:
            return self.store.revision()

    def head_number(self) -> int:
        """The newest revision number (0 for an empty keg)."""
        return self.store.head_revision

    def revision(self, spec=None):
        with self._lock:
            return self.store.revision(spec)

    def stat(self, path, rev=None):
        with self._lock:
            return self.store.stat(path, rev)

    def read(self, path, rev=None):
        with self._lock:
            return self.store.read(path, rev)

    def open(self, path, rev=None):
        with self._lock:
            return self.store.open(path, rev)

    def pointer(self, path, rev=None):
        with self._lock:
            return self.store.pointer(path, rev)

    def list(self, path="/", rev=None, offset=0, limit=None):
        with self._lock:
            return self.store.list(path, rev, offset, limit)

    def names(self, path="/", rev=None):
        with self._lock:
            return self.store.names(path, rev)

    def log(self, path="/", rev=None, limit=None):
        with self._lock:
            return self.store.log(path, rev, limit)

    def diff(self, rev_a, rev_b, prefix="/"):
        with self._lock:
            return self.store.diff(rev_a, rev_b, prefix)

    def resolve_kid(self, text):
        with self._lock:
            return self.store.resolve_kid(text)

    # ----------------------------------------------------------------- writes

    pending_class = Pending   # what ``submit`` hands back (a Raft replica's resolves when its entry applies)

    def submit(self, tx) -> Pending:
        pending = self.pending_class(tx, self)
        with self._queue_lock:
            self._queue.append(pending)
        if self.on_submit is not None:
            self.on_submit()
        return pending

    def flush(self) -> None:
        with self._commit_lock:
            while True:
                with self._queue_lock:
                    batch, self._queue = self._queue[:MAX_GROUP], self._queue[MAX_GROUP:]
                if not batch:
                    return
                self._commit_batch(batch)

    def _commit_batch(self, batch: list) -> None:
        try:
            with self._lock:
                before = self.store.head_revision
                results = self.store.commit([p.tx for p in batch])
                after = self.store.head_revision
        except KegError as err:
            # The whole group failed before it was acknowledged (a full disk, a
            # damaged journal): every transaction in it gets the error.
            results = [TxResult(False, error=err) for _ in batch]
            after = before
        self.stats["transactions"] += len(batch)
        for pending, result in zip(batch, results):
            pending.resolve(result)
        if after != before:
            self.stats["commits"] += 1
            self._announce(after)

    def _announce(self, head: int) -> None:
        with self._head_changed:
            self._head_changed.notify_all()
        for callback in list(self._subscribers):
            callback(head)

    def compact(self, window: int) -> dict:
        self.flush()
        with self._lock:
            return self.store.compact(window)

    def gc_chunks(self, grace: float) -> dict:
        self.flush()
        with self._lock:  # commits check their chunks under the same lock: none is collected mid-commit
            return self.store.gc_chunks(grace)

    # ------------------------------------------------------------------ watch

    def _revision_events(self, number: int) -> list:
        cached = self._events.get(number)
        if cached is None:
            cached = list(self.store.events("/", number - 1, number))
            self._events[number] = cached
            while len(self._events) > EVENT_CACHE_REVISIONS:
                self._events.popitem(last=False)
        return cached

    def events(self, prefix: str, since: int, until: int, limit: int = 10_000) -> tuple:
        prefix = paths.normalize(prefix)
        with self._lock:
            head = self.store.head_revision
            if since < 0 or since > head:
                raise BadRequest(f"since={since} is outside the keg's revisions 0..{head}")
            until = min(until, head)
            out: list = []
            recent = head - EVENT_CACHE_REVISIONS // 2
            number = since
            for number in range(since + 1, until + 1):
                if number > recent:
                    found = [e for e in self._revision_events(number) if paths.is_under(e.path, prefix)]
                else:
                    found = list(self.store.events(prefix, number - 1, number))
                out.extend(found)
                if len(out) >= limit:
                    break
            return out, max(number, since)

    def subscribe(self, callback) -> None:
        self._subscribers.append(callback)

    def unsubscribe(self, callback) -> None:
        try:
            self._subscribers.remove(callback)
        except ValueError:
            pass

    def wait_for_revision(self, after: int, timeout: float) -> int:
        with self._head_changed:
            self._head_changed.wait_for(lambda: self.store.head_revision > after, timeout)
        return self.store.head_revision

    # ------------------------------------------------------------ chunks, git

    def chunk_get(self, name):
        return self.chunks.get(name)

    def chunk_put(self, name, data):
        return self.chunks.put(name, data)

    def chunk_missing(self, names):
        return self.chunks.missing(names)

    def put_stream(self, path, stream, mode=0o100644):
        return self.store.put_stream(path, stream, mode)  # chunks need no lock; the commit checks them

    def receive_source(self, app, commit, pack):
        from keg import sources

        with self._lock:
            return sources.receive(self.store.path, app, commit, pack)

    def publish(self) -> str:
        self.flush()
        with self._lock:
            self.store.checkpoint()
        return self.store.path

    def close(self) -> None:
        self.flush()
        with self._lock:
            self.store.close()
