"""Keg: a versioned, transactional, content-addressed namespace kept in git."""

from keg.errors import (AmbiguousKid, BadPath, BadRequest, CompareFailed, CorruptKeg, KegBusy, KegError,
                        NotFound, PathConflict)
from keg.store import Entry, Event, Revision, Store, init
from keg.transaction import Author, Transaction, TxResult, compare, delete, parse_transaction, put

__all__ = ["AmbiguousKid", "Author", "BadPath", "BadRequest", "CompareFailed", "CorruptKeg", "Entry", "Event",
           "KegBusy", "KegError", "NotFound", "PathConflict", "Revision", "Store", "Transaction", "TxResult",
           "compare", "delete", "init", "parse_transaction", "put"]
