"""Volatile subtrees: heartbeats and status whose history is compacted (DESIGN §2).

A volatile directory (matched by a pattern such as ``/machines/*/status`` in
``keg/config.json``) is stored in its parent as a *gitlink* entry (mode 160000)
that names the directory's tree, instead of as a tree entry.  Keg reads it as
an ordinary directory.  git does not follow gitlinks when it decides what is
reachable, so the history of a volatile directory is kept only while a
retention commit (``refs/keg/volatile``) lists its trees: ``Store.compact``
rewrites that commit to hold the trees of the newest revisions and lets
``git repack`` drop the rest.  Revision KIDs never change, and the history of
everything that is not volatile is kept whole.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from keg import paths
from keg.errors import BadRequest

DEFAULT_PATTERNS = ("/machines/*/status",)
RETENTION_REF = "refs/keg/volatile"


class VolatileRules:
    """Which directories are volatile: patterns of path segments, ``*`` matching one segment."""

    def __init__(self, patterns=DEFAULT_PATTERNS):
        self.patterns = []
        for pattern in patterns:
            paths.normalize(pattern.replace("*", "x"))  # the rules of any path, "*" standing for a name
            norm = pattern.rstrip("/")
            if not norm:
                raise BadRequest("the root cannot be volatile")
            self.patterns.append(tuple(paths.split(norm)))

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def matches(self, path: str) -> bool:
        """True when the directory at ``path`` is volatile."""
        if not self.patterns or path == paths.ROOT:
            return False
        names = paths.split(path)
        for pattern in self.patterns:
            if len(pattern) == len(names) and all(fnmatchcase(n, p) for n, p in zip(names, pattern)):
                return True
        return False
