"""What the store answers with: a revision, what is at a path, a change (kept free of pygit2, so that
clients of a master import them cheaply)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Revision:
    """One version of the namespace."""

    number: int
    kid: str
    time: int
    author: str
    message: str

    def to_json(self) -> dict:
        """The JSON form used by ``--json`` output and the HTTP API."""
        return {"revision": self.number, "kid": self.kid, "time": self.time,
                "author": self.author, "message": self.message}


@dataclass(frozen=True)
class Entry:
    """What is at a path: ``kind`` is ``file``, ``tree``, ``link`` or ``pointer``.

    ``size`` is the byte size of a file (for a large value, of the value, not
    of its pointer blob), or the number of entries of a tree.  ``large`` is
    True for a value stored as chunks.
    """

    path: str
    kind: str
    kid: str
    size: int
    mode: int
    large: bool = False

    @property
    def name(self) -> str:
        """The last segment of the path."""
        return self.path.rsplit("/", 1)[1] or "/"

    def to_json(self) -> dict:
        """The JSON form used by ``--json`` output and the HTTP API."""
        out = {"path": self.path, "name": self.name, "kind": self.kind, "kid": self.kid,
               "size": self.size, "mode": f"{self.mode:06o}"}
        if self.large:
            out["large"] = True
        return out


@dataclass(frozen=True)
class Event:
    """A change to one file between revision ``revision - 1`` and ``revision``.

    ``old_kid`` is ``None`` for a created path, ``new_kid`` for a deleted one.
    """

    revision: int
    path: str
    old_kid: str | None
    new_kid: str | None

    @property
    def action(self) -> str:
        """``create``, ``update`` or ``delete``."""
        if self.old_kid is None:
            return "create"
        return "delete" if self.new_kid is None else "update"

    def to_json(self) -> dict:
        """The JSON form used by ``keg watch --json`` and watch streams."""
        return {"revision": self.revision, "path": self.path, "action": self.action,
                "old_kid": self.old_kid, "new_kid": self.new_kid}
