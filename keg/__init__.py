"""Keg: a versioned, transactional, content-addressed namespace kept in git.

The names below are loaded on first use (PEP 562), so that importing a light
module such as ``keg.errors`` does not load the store and pygit2: a git hook
or a client of a master starts in a fraction of the time.
"""

import importlib

_HOMES = {
    "keg.errors": ("AmbiguousKid", "BadPath", "BadRequest", "CompareFailed", "CorruptKeg", "KegBusy", "KegError",
                   "NotFound", "PathConflict"),
    "keg.records": ("Entry", "Event", "Revision"),
    "keg.store": ("Store", "init"),
    "keg.transaction": ("Author", "Transaction", "TxResult", "compare", "delete", "parse_transaction", "put"),
}
_WHERE = {name: module for module, names in _HOMES.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'keg' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
