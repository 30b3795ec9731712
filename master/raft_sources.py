"""Pushed sources on a Raft master: on a majority of replicas before ``/src/<app>`` names them (DESIGN §4).

A ``git push`` of an app reaches one replica, whose hook sends the objects
that replica's keg lacks (``POST /v1/src/<app>``, keg/sources.py). The
pointer ``/src/<app>`` is a transaction like any other, applied on every
replica, but the commit it names must not exist on one disk only: a builder
or a ``git fetch`` may ask any replica for it, and the replica that received
the push may be lost. So, before the transaction is proposed:

1. the receiving replica checks and stores the objects itself
   (``keg.sources.receive``: quarantine, ``index-pack --strict``, the tree
   checks, an incoming ref that keeps the objects);
2. it sends the same pack to the other replicas, the leader first
   (``POST /v1/raft/sources/<app>?commit=SHA``), each of which checks and
   stores it the same way; a replica that lacks objects the pack leans on
   (it missed an earlier push) is sent a whole pack of the commit and its
   history instead;
3. once a majority holds it the write is proposed; otherwise the push is
   refused with 503 and nothing is committed.

Steps 1 and 2, and a replica's storing of a pack sent to it, run in a child
process (master/source_job.py), so the event loop that drives Raft goes on
while packs are indexed and sent.

Each replica that applies the pointer and holds the commit moves
``refs/keg/src/<app>`` to it (``keg.sources.committed``); a refused push
leaves the ref where the committed pointer is. A replica that applies a
pointer to a commit it lacks (it was down, or not among the majority) notes
it and fetches a whole pack from another replica in the background (``GET
/v1/raft/sources/<app>?commit=SHA``); so does one that caught up from a
snapshot, for every pointer under ``/src``. The fetch and the storing run in
a child process as well, and the replica asked streams its answer from
``git pack-objects``: neither event loop waits for git.
"""

from __future__ import annotations

import json
import logging
import time

from keg import sources
from keg.errors import KegError, NotFound
from keg.objects import MODE_GITLINK
from master.app import REASONS, error_body, status_of
from master.bodies import CommandBody
from master.source_job import JobResponse, SourceJob

FETCH_RETRY = 2.0       # a missed source no replica gave is asked for again this long after
MAX_FETCHES = 1         # missed sources fetched at once: the other children's places are for pushes

log = logging.getLogger("keg.raft")


class SourceReplicas:
    """Pushed sources of one replica: sent to a majority before their pointer, fetched when missed.

    Args:
        master: the ``RaftMaster`` (its peers, peer calls and keg).
    """

    def __init__(self, master):
        self.master = master
        self.wanted: dict = {}   # app -> commit hex this replica's pointer names and its keg lacks
        self.retry_at: dict = {}  # app -> monotonic time its missed source may be asked for again
        self.fetching: dict = {}  # app -> (commit, SourceJob) fetching its missed source

    # ------------------------------------------------------------ a peer's side

    def serve(self, req, app: str, start_response):
        """``GET /v1/raft/sources/<app>?commit=SHA`` from another replica: a pack of the commit and its history,
        streamed from ``git pack-objects`` as it writes it (the event loop goes on meanwhile).

        Args:
            req: the request (``master.app.Request``), from a replica (the peer token was checked).
            app: the app's name, from the path.

        Raises:
            BadRequest: a bad app name or commit id.
            NotFound: a commit this replica does not hold.
        """
        commit = req.query.get("commit", "")
        sources.check_commit(app, commit)
        if not sources.has_commit(self.master.store.path, commit):
            raise NotFound(f"this replica does not hold commit {commit}")
        argv, env = sources.pack_command(self.master.store.path)
        return CommandBody(start_response, argv, env, f"{commit}\n".encode(),
                           headers=[("Content-Type", "application/x-git-packed-objects")],
                           what=f"packing the source of {app} ({commit})")

    def store_sent(self, req, app: str, start_response):
        """``POST /v1/raft/sources/<app>?commit=SHA`` from the replica a push reached: store the pack in the
        body here only, as a push would, in a child process (master/source_job.py). The answer is 200 with
        the tree, 422 when this keg lacks objects the pack leans on, else the error's status.

        Raises:
            BadRequest: a bad app name or commit id.
        """
        commit = req.query.get("commit", "")
        sources.check_commit(app, commit)
        job = SourceJob(self.master.store.path, app, commit, req.body())

        def then():
            try:
                status, body = 200, {"tree": job.tree()}
            except sources.IncompleteSource as err:
                status, body = 422, {"error": str(err), "status": 422}
            except KegError as err:
                status, body = status_of(err), error_body(err)
            data = (json.dumps(body) + "\n").encode()
            start_response(f"{status} {REASONS.get(status, 'Error')}", [("Content-Type", "application/json"),
                                                                         ("Content-Length", str(len(data)))])
            return [data]

        return JobResponse(start_response, job, then)

    # ------------------------------------------------------------ catching up

    def want(self, ops) -> None:
        """For each ``/src/<app>`` pointer among ``ops`` (applied here): point ``refs/keg/src/<app>`` at its
        commit when this keg holds it (the ref follows what is committed, not the newest push received),
        else note the commit as missing."""
        self._note(p for p in map(sources.source_pointer, ops) if p is not None)

    def want_all(self) -> None:
        """After the keg moved to a snapshot's commit: the same for every pointer under ``/src``."""
        with self.master._lock:
            try:
                entries = self.master.store.list("/src")
            except NotFound:
                return
        self._note((e.name, e.kid[2:]) for e in entries if e.mode == MODE_GITLINK)

    def _note(self, pointers) -> None:
        path = self.master.store.path
        for app, commit in pointers:
            self.retry_at.pop(app, None)
            try:
                if not sources.has_commit(path, commit):
                    self.wanted[app] = commit
                    continue
                self.wanted.pop(app, None)
                self._record(app, commit)
            except (OSError, KegError) as err:  # git could not run: the next pointer, or a restart, tries again
                log.warning("raft: recording the source of %s (%s) failed: %s", app, commit, err)

    def _record(self, app: str, commit: str) -> None:
        """Point ``refs/keg/src/<app>`` at ``commit`` if ``/src/<app>`` still names it; under the replica's lock,
        so a newer pointer applied meanwhile is never undone."""
        with self.master._lock:
            if self._still_named(app, commit):
                sources.committed(self.master.store.path, app, commit)

    def fetch_wanted(self) -> None:
        """Take in the missed sources fetched so far; start fetching those not being fetched, each in a child
        process (master/source_job.py) that asks the other replicas in turn, the leader first."""
        master = self.master
        for app, (commit, job) in list(self.fetching.items()):
            if job.read_some():
                job.finish()
                del self.fetching[app]
                self._fetched(app, commit, job)
        now = time.monotonic()
        for app, commit in sorted(self.wanted.items()):
            if len(self.fetching) >= MAX_FETCHES:
                return
            if app in self.fetching or self.retry_at.get(app, 0) > now:
                continue
            if not self._still_named(app, commit):
                del self.wanted[app]  # pushed again since: the newer pointer was noted when it was applied
                continue
            peers = [(a, master.peer_url(a)) for a in master.others_leader_first() if not master.peer_down(a)]
            if not peers:
                continue
            try:
                job = SourceJob(master.store.path, app, commit, b"", token=master.peer_token, fetch_from=peers)
            except KegError:  # as many children as allowed are storing sources: a later turn
                return
            self.fetching[app] = (commit, job)

    def _fetched(self, app: str, commit: str, job) -> None:
        """The fetch of ``app``'s missed source ``commit`` ended: record it, or ask again later."""
        for address in job.result.get("down", ()):
            self.master.mark_down(address)
        try:
            job.tree()
        except KegError as err:
            log.warning("raft: fetching the source of %s (%s) failed: %s", app, commit, err)
            if self.wanted.get(app) == commit:   # not a newer pointer's commit, which is fetched at once
                self.retry_at[app] = time.monotonic() + FETCH_RETRY
            return
        try:
            self._record(app, commit)
        except (OSError, KegError) as err:  # stored; the ref is set by the next pointer, or a restart
            log.warning("raft: recording the source of %s (%s) failed: %s", app, commit, err)
        if self.wanted.get(app) == commit:
            del self.wanted[app]
            self.retry_at.pop(app, None)

    def close(self) -> None:
        """Stop the fetches still running (what they stored is kept by incoming refs, pruned later)."""
        for _, job in self.fetching.values():
            job.kill()
        self.fetching.clear()

    def _still_named(self, app: str, commit: str) -> bool:
        with self.master._lock:
            try:
                return self.master.store.kid(f"/src/{app}") == "K-" + commit
            except NotFound:
                return False
