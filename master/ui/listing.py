"""Directory listings for the UI that cost the page shown and what changed, not what is there.

A page shows 100 entries of a directory that may hold 10,000.  Looking at
every child (its kind and size) costs about 5 µs an entry, so the index
keeps only the *names* of a directory (``Master.names``: the tree, none of
its children read) and reads the entries of the pages people look at
(``Master.list`` with ``offset`` and ``limit``).  It brings a listing up to
date from the revisions since, one ``Master.diff`` per revision pruned to
the directory: after a write only the children that changed are looked at
again (a listing far behind, or one whose catching up would cost more than
listing it again, is listed again).  The listing of a directory at a past
revision never changes, so it is kept as it is.

The "last change" of an entry is the newest revision that changed it.  The
diffs after the listing was made give it exactly; for older changes the
index reads revisions backwards, newest first, until it has the entries of
the page being shown or its budget for this request (50 ms) is spent (then
the page says "rN or earlier", and a later view goes on from there).  How
it reads them depends on the directory's size:

- a small directory (up to 1,000 entries) is diffed as a whole, one
  revision at a time: what one look back finds serves every page;
- in a big one, a revision that created or rewrote the whole directory
  would cost a diff of every entry (0.1 s for 10,000), so only the entries
  asked for are compared with their value in the revision before: the cost
  of a revision is the page, whatever the revision did.

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

MAX_CACHED_ENTRIES = 400_000   # names kept over all cached listings
MAX_CATCH_UP = 4_096           # revisions a listing is brought forward by; further behind, it is listed again
CATCH_UP_SECONDS = 0.1         # about what listing 10,000 entries again costs: past it, list again
REBUILD_FRACTION = 4           # more than 1/4 of the entries touched: list the directory again
SCAN_BUDGET_SECONDS = 0.05     # time one request may spend looking back for last changes
DIFF_SCAN_MAX = 1_000          # directories up to this size are diffed whole when looking back


def _child_name(directory: str, path: str) -> str | None:
    """The name of the child of ``directory`` that ``path`` lies in (None for the directory itself)."""
    if path == directory:
        return None
    rest = path[1:] if directory == paths.ROOT else path[len(directory) + 1:]
    return rest.split("/", 1)[0]


class Listing:
    """One directory at one revision: its names, sorted, the entries read so far, and what is known of changes.

    What is known of the last changes: ``changed`` holds exact ones; every
    change in ``(scanned_to, revision]`` is in it; and a name in ``bounds``
    did not change in ``(bounds[name], revision]`` either.
    """

    def __init__(self, path: str, revision: int, kid: str, names: list):
        self.path = path
        self.revision = revision
        self.kid = kid
        self.names = names
        self.entries: dict = {}        # name -> Entry at `revision`, for the names whose page was shown
        self.changed: dict = {}        # name -> newest revision that changed it
        self.scanned_to = revision     # every change in (scanned_to, revision] is in `changed`
        self.bounds: dict = {}         # name -> b: no change in (b, revision] (looked back for that name alone)
        self.floor = None              # history below this could not be read (compacted)

    def __len__(self) -> int:
        return len(self.names)

    def position(self, name: str) -> int:
        """Where ``name`` is, or would be, in the sorted names."""
        return bisect.bisect_left(self.names, name)

    def bound(self, name: str) -> int:
        """Revisions after this one are known not to have changed ``name`` (unless ``changed`` says so)."""
        return min(self.bounds.get(name, self.scanned_to), self.scanned_to)

    def replace(self, names: list) -> None:
        """New names (after listing the directory again); what is known of changes stays."""
        self.names = names
        self.entries = {}

    def update(self, name: str, entry) -> None:
        """Set one child (``entry`` None: it is gone)."""
        i = bisect.bisect_left(self.names, name)
        known = i < len(self.names) and self.names[i] == name
        if entry is None:
            if known:
                del self.names[i]
            self.entries.pop(name, None)
            return
        self.entries[name] = entry
        if not known:
            self.names.insert(i, name)


class DirectoryIndex:
    """The listings the UI shows, kept current revision by revision.

    Args:
        master: the ``Master`` (``stat``, ``names``, ``list``, ``diff``).
        diff_scan_max: directories up to this many entries are diffed whole when looking back.
    """

    def __init__(self, master, diff_scan_max: int = DIFF_SCAN_MAX):
        self.master = master
        self.diff_scan_max = diff_scan_max
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

    def entries(self, listing: Listing, start: int, count: int) -> list:
        """The entries at positions ``start`` to ``start + count``; only those not read yet are read."""
        with self._lock:
            names = listing.names[start:start + count]
            if any(n not in listing.entries for n in names):
                for entry in self.master.list(listing.path, listing.revision, start, len(names)):
                    listing.entries[entry.name] = entry
            return [listing.entries.get(n) or self.master.stat(paths.join(listing.path, n), listing.revision)
                    for n in names]

    def last_changes(self, listing: Listing, names: list) -> dict:
        """``{name: revision}`` for the given entries; a name left out changed at ``listing.bound(name)`` or before."""
        with self._lock:
            missing = [n for n in names if n not in listing.changed]
            if missing:
                deadline = time.monotonic() + SCAN_BUDGET_SECONDS
                if len(listing) <= self.diff_scan_max:
                    self._look_back(listing, set(missing), deadline)
                else:
                    self._look_back_names(listing, missing, deadline)
            return {n: listing.changed[n] for n in names if n in listing.changed}

    # ------------------------------------------------------------ internals

    def _build(self, path: str, revision: int) -> Listing:
        entry = self.master.stat(path, revision)
        if entry.kind not in ("tree", "pointer"):
            raise BadRequest(f"{path} is a {entry.kind}, not a directory")
        self.stats["built"] += 1
        return Listing(path, revision, entry.kid, self.master.names(path, revision))

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
            listing.replace(self.master.names(listing.path, revision))
        else:
            for name in touched:
                try:
                    child = self.master.stat(paths.join(listing.path, name), revision)
                except NotFound:
                    child = None
                listing.update(name, child)
        listing.revision, listing.kid = revision, entry.kid
        return True

    def _look_back(self, listing: Listing, missing: set, deadline: float) -> None:
        """Diff revisions backwards from ``scanned_to``, newest first, until ``missing`` is found or time is up."""
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

    def _look_back_names(self, listing: Listing, missing: list, deadline: float) -> None:
        """Look back for ``missing`` alone: a revision that changed the directory costs those names only.

        A name unchanged after its bound holds there what it holds now; its
        last change is the first revision, going back, whose predecessor
        holds something else (or nothing).
        """
        path = listing.path
        now = {}
        for name in missing:
            entry = listing.entries.get(name)
            if entry is None:
                entry = self.master.stat(paths.join(path, name), listing.revision)
            now[name] = (entry.kid, entry.mode)
        number, directory = None, None
        slowest = 0.0   # the longest one revision took: one that changed a big directory reads a big tree
        try:
            while listing.floor is None:
                open_names = [n for n in missing if n not in listing.changed and listing.bound(n) > 0]
                began = time.monotonic()
                if not open_names or began + slowest > deadline:
                    return
                top = max(listing.bound(n) for n in open_names)
                if top != number:
                    number = top
                    directory = self._state(path, top)
                before = self._state(path, number - 1)
                due = [n for n in open_names if listing.bound(n) >= number]
                for name in due:
                    if before == directory:
                        old = now[name]   # the directory is the same, so is everything in it
                    elif before is None:
                        old = None        # the directory was created in `number`
                    else:
                        old = self._state(paths.join(path, name), number - 1, parent_readable=True)
                    if old != now[name]:
                        listing.changed[name] = number
                    else:
                        listing.bounds[name] = number - 1
                number, directory = number - 1, before
                slowest = max(slowest, time.monotonic() - began)
        except KegError:
            listing.floor = number   # e.g. volatile history that was compacted

    def _state(self, path: str, number: int, parent_readable: bool = False):
        """``(kid, mode)`` of ``path`` at revision ``number``, None where it does not exist.

        Raises:
            NotFound: it exists but cannot be read (a volatile directory's compacted history).
        """
        try:
            entry = self.master.stat(path, number)
        except NotFound:
            if not parent_readable and self._exists(path, number):
                raise
            return None
        return entry.kid, entry.mode

    def _exists(self, path: str, number: int) -> bool:
        """True when ``path`` is named by its parent at revision ``number`` (it exists, readable or not)."""
        if path == paths.ROOT or number == 0:
            return path == paths.ROOT
        parent = paths.parent_of(path)
        try:
            return path.rsplit("/", 1)[1] in self.master.names(parent, number)
        except BadRequest:
            return False                          # the parent is a file
        except NotFound:
            return self._exists(parent, number)   # an unreadable parent that exists: assume the path does too

    def _evict(self) -> None:
        total = sum(len(x) for x in self._listings.values())
        while total > MAX_CACHED_ENTRIES and len(self._listings) > 1:
            _, dropped = self._listings.popitem(last=False)
            total -= len(dropped)
