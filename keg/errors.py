"""The exceptions the Keg store raises; front ends map them to exit codes and HTTP statuses."""

from __future__ import annotations


class KegError(Exception):
    """Base of every error the store raises on purpose."""

    exit_code = 4


class NotFound(KegError):
    """A path, revision or KID does not exist."""

    exit_code = 1


class BadRequest(KegError, ValueError):
    """Input that can never succeed: a malformed path, transaction or revision."""

    exit_code = 2


class BadPath(BadRequest):
    """A path Keg refuses to store or look up."""


class PathConflict(BadRequest):
    """An operation that does not fit the namespace: a file where a directory is, or the reverse."""


class AmbiguousKid(BadRequest):
    """A short KID matches more than one object."""

    def __init__(self, kid: str, candidates: list[str]):
        shown = ", ".join(candidates[:10]) + (" …" if len(candidates) > 10 else "")
        super().__init__(f"{kid} is ambiguous: it matches {len(candidates)} KIDs ({shown}); give more hex digits")
        self.kid = kid
        self.candidates = candidates


class CompareFailed(KegError):
    """A transaction's compare did not hold; the transaction changed nothing."""

    exit_code = 3

    def __init__(self, path: str, expected, actual):
        want = "absent" if expected is None else expected
        have = "absent" if actual is None else actual
        super().__init__(f"compare failed on {path}: expected {want}, found {have}; nothing was changed")
        self.path = path
        self.expected = expected
        self.actual = actual


class CorruptKeg(KegError):
    """The keg on disk is damaged in a way Keg will not guess around."""

    exit_code = 4


class MissingObject(CorruptKeg):
    """A git object the keg needs is not in its object database."""


class KegBusy(KegError):
    """Another process holds the keg's write lock for longer than we may wait."""

    exit_code = 5
