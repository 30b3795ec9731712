"""Directory listings for the UI that cost what changed, not what is there.

A page shows 100 entries of a directory that may hold 10,000.  Listing the
whole directory for every view costs about 5 µs an entry (each child is
stat'ed for its kind and size), so the UI keeps the listing of the
directories it shows and brings it up to date from the revisions since,
one ``Master.diff`` per revision pruned to the directory: after a write,
only the children that changed are looked at again (a listing far behind,
or one whose catching up would cost more than listing it again, is listed
again).  The listing of a directory at a past revision never changes, so it
is kept as it is.

The "last change" of an entry is the newest revision that changed it.
The diffs after the listing was made give it exactly; for older changes
the index reads revisions backwards from the listing's revision, one at a
time, until it has the entries of the page being shown or its budget for
this request (50 ms) is spent (then the page says "rN or earlier", and a later
view goes on from there).

One lock guards the index, for the threaded FastCGI server; the event-loop
server never contends for it.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import OrderedDict

from keg import paths
from keg.errors import BadRequest, KegError, NotFound

MAX_CACHED_ENTRIES = 400_000   # entries kept over all cached listings
MAX_CATCH_UP = 4_096           # revisions a listing is brought forward by; further behind, it is listed again
CATCH_UP_SECONDS = 0.1         # about what listing 10,000 entries again costs: past it, list again
REBUILD_FRACTION = 4           # more than 1/4 of the entries touched: list the directory again
SCAN_BUDGET_SECONDS = 0.05     # time one request may spend looking back for last changes


def _child_name(directory: str, path: str) -> str | None:
    """The name of the child of ``directory`` that ``path`` lies in (None for the directory itself)."""
    if path == directory:
        return None
    rest = path[1:] if directory == paths.ROOT else path[len(directory) + 1:]
    return rest.split("/", 1)[0]


class Listing:
    """One directory's entries at one revision, sorted by name, with what is known of their last changes."""

    def __init__(self, path: str, revision: int, kid: str, entries: list):
        self.path = path
        self.revision = revision
        self.kid = kid
        self.names = [e.name for e in entries]
        self.entries = {e.name: e for e in entries}
        self.changed: dict = {}        # name -> newest revision that changed it
        self.scanned_to = revision     # every change in (scanned_to, revision] is in `changed`
        self.floor = None              # history below this could not be read (compacted)

    def __len__(self) -> int:
        return len(self.names)

    def page(self, start: int, count: int) -> list:
        """``count`` entries from position ``start``."""
        return [self.entries[n] for n in self.names[start:start + count]]

    def position(self, name: str) -> int:
        """Where ``name`` is, or would be, in the sorted names."""
        return bisect.bisect_left(self.names, name)

    def replace(self, entries: list) -> None:
        """New entries (after listing the directory again); what is known of changes stays."""
        self.names = [e.name for e in entries]
        self.entries = {e.name: e for e in entries}

    def update(self, name: str, entry) -> None:
        """Set one child (``entry`` None: it is gone)."""
        known = name in self.entries
        if entry is None:
            if known:
                del self.entries[name]
                del self.names[bisect.bisect_left(self.names, name)]
            return
        self.entries[name] = entry
        if not known:
            bisect.insort(self.names, name)


class DirectoryIndex:
    """The listings the UI shows, kept current revision by revision.

    Args:
        master: the ``Master`` (``stat``, ``list``, ``diff``).
    """

    def __init__(self, master):
        self.master = master
        self._listings: OrderedDict = OrderedDict()   # (path, pinned revision or None) -> Listing
        self._lock = threading.Lock()
        self.stats = {"built": 0, "caught_up": 0, "reused": 0}

    def listing(self, path: str, revision: int, newest: bool) -> Listing:
        """The listing of directory ``path`` at ``revision``.

        Args:
            newest: True when ``revision`` is the head the request saw; such
                listings are kept and brought forward, others are kept as they are.

        Raises:
            NotFound: no directory at ``path`` in that revision.
            BadRequest: ``path`` is a file.
        """
        with self._lock:
            key = (path, None if newest else revision)
            found = self._listings.get(key)
            if found is not None and found.revision == revision:
                self._listings.move_to_end(key)
                self.stats["reused"] += 1
                return found
            if found is not None and newest and found.revision < revision:
                if self._catch_up(found, revision):
                    self._listings.move_to_end(key)
                    self.stats["caught_up"] += 1
                    return found
            if found is not None and found.revision > revision:
                key = (path, revision)   # a request that saw an older head: answer it on its own
            made = self._build(path, revision)
            self._listings[key] = made
            self._listings.move_to_end(key)
            self._evict()
            return made

    def last_changes(self, listing: Listing, names: list) -> dict:
        """``{name: revision}`` for the given entries; a name left out changed before ``listing.scanned_to``."""
        with self._lock:
            missing = [n for n in names if n not in listing.changed]
            if missing:
                self._look_back(listing, set(missing))
            return {n: listing.changed[n] for n in names if n in listing.changed}

    # ------------------------------------------------------------ internals

    def _build(self, path: str, revision: int) -> Listing:
        entry = self.master.stat(path, revision)
        if entry.kind not in ("tree", "pointer"):
            raise BadRequest(f"{path} is a {entry.kind}, not a directory")
        self.stats["built"] += 1
        return Listing(path, revision, entry.kid, self.master.list(path, revision))

    def _changed_names(self, path: str, number: int) -> set:
        """The children of ``path`` that revision ``number`` changed (None for ``path`` itself).

        One diff pruned to ``path`` by comparing tree ids: it costs two
        lookups when nothing under ``path`` changed, whatever else the
        revision changed, and about the size of the directories that did
        change beneath ``path`` otherwise.
        """
        return {_child_name(path, changed) for changed, _, _ in self.master.diff(number - 1, number, path)}

    def _catch_up(self, listing: Listing, revision: int) -> bool:
        """Bring a listing forward to ``revision``; False when listing again is the better way."""
        if revision - listing.revision > MAX_CATCH_UP:
            return False
        deadline = time.monotonic() + CATCH_UP_SECONDS
        touched: dict = {}
        try:
            entry = self.master.stat(listing.path, revision)
            if entry.kind not in ("tree", "pointer"):
                return False
            for number in range(listing.revision + 1, revision + 1):
                names = self._changed_names(listing.path, number)
                if None in names:
                    return False   # the directory itself was replaced
                touched.update(dict.fromkeys(names, number))
                if time.monotonic() > deadline:
                    return False   # a busy big directory far behind: listing it again is cheaper
        except KegError:
            return False
        listing.changed.update(touched)
        if len(touched) > max(1000, len(listing) // REBUILD_FRACTION):
            listing.replace(self.master.list(listing.path, revision))
        else:
            for name in touched:
                try:
                    child = self.master.stat(paths.join(listing.path, name), revision)
                except NotFound:
                    child = None
                listing.update(name, child)
        listing.revision, listing.kid = revision, entry.kid
        return True

    def _look_back(self, listing: Listing, missing: set) -> None:
        """Read revisions backwards from ``scanned_to``, newest first, until ``missing`` is found or time is up."""
        deadline = time.monotonic() + SCAN_BUDGET_SECONDS
        while missing and listing.scanned_to > 0 and listing.floor is None:
            number = listing.scanned_to
            try:
                names = self._changed_names(listing.path, number)
            except KegError:
                listing.floor = number   # e.g. volatile history that was compacted
                break
            names.discard(None)
            for name in names:
                listing.changed.setdefault(name, number)   # newest first: a later change is already there
            missing.difference_update(names)
            listing.scanned_to = number - 1
            if time.monotonic() > deadline:
                break

    def _evict(self) -> None:
        total = sum(len(x) for x in self._listings.values())
        while total > MAX_CACHED_ENTRIES and len(self._listings) > 1:
            _, dropped = self._listings.popitem(last=False)
            total -= len(dropped)
