"""The single-node master: one process owns the keg and commits for every client.

Reads go straight to the store.  Writes are queued by ``submit`` and committed
in groups by ``flush``: a server flushes once per turn of its event loop, so
every write that arrived while the previous group was being fsynced goes into
the next one (group commit), and each request still gets its own result.

The store is not thread-safe; a lock serialises it so that threaded front ends
(flup's FastCGI server) can share one master.  In the event-loop server the
lock is never contended.

Watchers subscribe with the prefix they watch.  After a commit the master
looks once at what the new revision changed and calls only the subscribers
of the prefixes it touched (a prefix covers a path when ``paths.is_under``
says so, and ``/`` covers everything), so a thousand watchers of a thousand
machines' directories cost a revision a few dictionary look-ups per changed
path, not a thousand wake-ups.  It also keeps, per watched prefix, the recent
revisions that touched it, so ``events`` hands a stream that slept through
many revisions only its own.  In an event loop this happens on the loop's
next turn, after the answers of the writes the commit acknowledged have gone
out: a commit of many paths is not answered later for being watched.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import threading
from collections import OrderedDict

from keg import paths, sources
from keg.errors import BadRequest, KegError
from keg.store import Store
from keg.transaction import TxResult
from master.interface import Master, Pending

MAX_GROUP = 512                # transactions per commit: bounds one fsync's latency
EVENT_CACHE_REVISIONS = 4096   # recent revisions whose events are kept, shared by all watchers
INDEX_REVISIONS = 4096         # revisions that touched a watched prefix kept in its index, at most
HOUSEKEEPING_POLL = 0.05      # seconds between looks at a checkpoint written in the background
INDEX_JUMP = EVENT_CACHE_REVISIONS // 2  # more new revisions at once (a snapshot loaded): wake everyone, index none

log = logging.getLogger("keg.master")


class _Watched:
    """The subscribers of one prefix, and the recent revisions that changed something under it.

    ``revisions`` (ascending) and ``events`` (each revision's events under the
    prefix) are complete for every revision after ``since`` up to the
    master's ``_indexed``: a revision in that range that is not listed
    changed nothing under the prefix.
    """

    __slots__ = ("callbacks", "since", "revisions", "events")

    def __init__(self, since: int):
        self.callbacks: dict = {}   # callback -> None, in subscription order
        self.since = since
        self.revisions: list = []
        self.events: list = []

    def record(self, number: int, events: list) -> None:
        self.revisions.append(number)
        self.events.append(events)
        if len(self.revisions) > INDEX_REVISIONS:
            drop = INDEX_REVISIONS // 2
            self.since = self.revisions[drop - 1]
            del self.revisions[:drop], self.events[:drop]


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
        self._watched: dict = {}        # prefix -> _Watched
        self._subscriptions: dict = {}  # callback -> its prefix
        self._indexed = store.head_revision  # revisions up to this one are in the watch index
        self._delivery_scheduled = False
        self._events: OrderedDict = OrderedDict()  # revision -> all its events
        self.on_submit = None   # set by an event-loop server: schedules a flush
        self.stats = {"commits": 0, "transactions": 0}
        try:   # a stop between a pointer's commit and its ref left the ref behind: catch up
            sources.reconcile(store.path, store.source_pointers())
        except (OSError, KegError) as err:
            log.warning("master: recording the pushed sources /src names failed: %s", err)

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
                self._record_sources(batch, results)
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

    def _record_sources(self, batch: list, results: list) -> None:
        """Point ``refs/keg/src/<app>`` at each pushed source whose ``/src/<app>`` pointer just committed
        (``keg.sources.committed``), before anyone hears of the revision; in commit order, under the lock."""
        for pending, result in zip(batch, results):
            if not result.ok:
                continue
            for app, commit in filter(None, map(sources.source_pointer, pending.tx.ops)):
                try:
                    sources.committed(self.store.path, app, commit)
                except (OSError, KegError) as err:  # committed already: the incoming ref keeps the objects
                    log.warning("master: recording the source of %s (%s) failed: %s", app, commit, err)

    def _announce(self, head: int) -> None:
        """Tell waiting threads at once, and the subscribers whose prefixes the new revisions touched.

        In an event loop the subscribers hear of it on the loop's next turn:
        the answers this commit resolved were scheduled first and go out
        before the new revisions are looked at.  Several commits before that
        turn make one delivery.
        """
        with self._head_changed:
            self._head_changed.notify_all()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None   # a thread of a threaded server, or a caller in process: deliver now
        if loop is None:
            self._deliver()
        elif not self._delivery_scheduled:
            self._delivery_scheduled = True
            loop.call_soon(self._deliver)

    def _deliver(self) -> None:
        self._delivery_scheduled = False
        with self._lock:
            head = self.store.head_revision
            callbacks = self._index(head)
        for callback in callbacks:
            callback(head)

    def _index(self, head: int) -> list:
        """Record revisions ``_indexed+1 .. head`` in the watch index; returns the callbacks to call."""
        start = self._indexed
        if head <= start:
            return []
        self._indexed = head
        if not self._watched:
            return []
        if head - start > INDEX_JUMP:
            return self._unindexed(head)   # too many to look at now (a replica loaded a snapshot)
        watched_prefixes = self._watched
        touched: dict = {}   # prefix -> _Watched, in the order first touched
        for number in range(start + 1, head + 1):
            found: dict = {}   # prefix -> this revision's events under it
            try:
                changed = self._revision_events(number)
            except KegError:
                return self._unindexed(head)
            for event in changed:
                path = event.path
                while True:   # the path and each directory above it, up to /
                    if path in watched_prefixes:
                        found.setdefault(path, []).append(event)
                    if path == paths.ROOT:
                        break
                    path = path[:path.rfind("/")] or paths.ROOT
            for prefix, events in found.items():
                watched = watched_prefixes[prefix]
                if number > watched.since:
                    watched.record(number, events)
                touched[prefix] = watched
        return [cb for watched in touched.values() for cb in watched.callbacks]

    def _unindexed(self, head: int) -> list:
        """Leave the revisions up to ``head`` out of the index: every stream is woken and scans them itself."""
        for watched in self._watched.values():
            watched.since = max(watched.since, head)
        return [cb for watched in self._watched.values() for cb in watched.callbacks]

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
        watched = self._watched.get(prefix)   # a watched prefix is normalised already
        if watched is None:
            prefix = paths.normalize(prefix)
        with self._lock:
            head = self.store.head_revision
            if since < 0 or since > head:
                raise BadRequest(f"since={since} is outside the keg's revisions 0..{head}")
            until = min(until, head)
            out: list = []
            watched = self._watched.get(prefix)
            if watched is not None and watched.since <= since < self._indexed:
                # The index knows which of these revisions touched the prefix: visit only those.
                indexed = min(until, self._indexed)
                revisions = watched.revisions
                for i in range(bisect.bisect_right(revisions, since), len(revisions)):
                    if revisions[i] > indexed:
                        break
                    out.extend(watched.events[i])
                    if len(out) >= limit:
                        return out, revisions[i]
                since = indexed
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

    def subscribe(self, callback, prefix: str = paths.ROOT) -> None:
        prefix = paths.normalize(prefix)
        with self._lock:
            self.unsubscribe(callback)
            watched = self._watched.get(prefix)
            if watched is None:
                watched = self._watched[prefix] = _Watched(self._indexed)
            watched.callbacks[callback] = None
            self._subscriptions[callback] = prefix

    def unsubscribe(self, callback) -> None:
        with self._lock:
            prefix = self._subscriptions.pop(callback, None)
            if prefix is None:
                return
            watched = self._watched[prefix]
            del watched.callbacks[callback]
            if not watched.callbacks:
                del self._watched[prefix]

    def wait_for_revision(self, after: int, timeout: float) -> int:
        with self._head_changed:
            self._head_changed.wait_for(lambda: self.store.head_revision > after, timeout)
        return self.store.head_revision

    # ------------------------------------------------------------ chunks, git

    def chunk_get(self, name):
        return self.chunks.get(name)

    def chunk_put(self, name, data):
        return self.chunks.put(name, data)

    def chunk_put_many(self, items):
        batch = self.chunks.batch()  # one sync for the group (keg.chunks.Batch)
        created = batch.put_many(items)
        batch.sync()
        return created

    def chunk_missing(self, names):
        return self.chunks.missing(names)

    def put_stream(self, path, stream, mode=0o100644):
        return self.store.put_stream(path, stream, mode)  # chunks need no lock; the commit checks them

    def start_source(self, app, commit, pack):
        from master.source_job import SourceJob

        sources.check_commit(app, commit)
        return SourceJob(self.store.path, app, commit, pack)

    def changed_since(self, top, revision):
        with self._lock:
            return self.store.changed_since(top, revision)

    def housekeeping(self):
        with self._lock:
            return HOUSEKEEPING_POLL if self.store.poll_checkpoint() else None

    def status(self) -> dict:
        with self._lock:
            revision = self.store.revision()
            housekeeping = self.store.housekeeping_status()
        return {"mode": "single", "role": "single", "revision": revision.number, "revision_kid": revision.kid,
                "term": None, "commit_index": None, "housekeeping": housekeeping}

    def publish(self) -> str:
        self.flush()
        with self._lock:
            self.store.checkpoint()
        return self.store.path

    def close(self) -> None:
        self.flush()
        with self._lock:
            self.store.close()
