"""Staging: the working tree of one commit group, rebuilt only along changed paths.

Transactions of a group apply to a ``Staging`` one after another.  Only the
directories on changed paths are loaded and rewritten; everything else keeps
its tree id, which is what makes a commit cost the depth of the change rather
than the size of the namespace.  A changed directory is its tree as loaded
plus the entries set since (an ``_Edited``): a put into a directory of 8,000
entries costs a dictionary entry, and the new tree is made once, by ``build``.
``snapshot``/``restore`` let a failed transaction vanish without disturbing
the ones before it (an undo log of the entries set).
"""

from __future__ import annotations

from keg import paths
from keg.errors import NotFound, PathConflict
from keg.objects import EMPTY_TREE, MODE_GITLINK, MODE_TREE, OBJ_TREE, object_id

_UNBUILT = b"\x00" * 20  # a new directory's id, filled in by build()
_ABSENT = object()       # in the undo log: the name had no staged entry


def _depth(path: str) -> int:
    return 0 if path == paths.ROOT else path.count("/")


class _Edited:
    """A directory being changed: the ``Tree`` it started as and the entries set since.

    ``changes`` maps a name to ``(mode, oid)``, or ``None`` for a removed entry,
    as ``Tree.with_changes`` takes them; ``tree()`` applies them all at once.
    """

    __slots__ = ("origin", "changes", "size")

    def __init__(self, origin):
        self.origin = origin
        self.changes: dict = {}
        self.size = len(origin)

    def get(self, name: bytes):
        """``(mode, oid)`` of an entry as staged, or ``None``."""
        if name in self.changes:
            return self.changes[name]
        return self.origin.get(name)

    def __len__(self) -> int:
        return self.size

    def set(self, name: bytes, value) -> tuple:
        """Stage ``value`` for ``name``; returns what ``unset`` needs to take it back."""
        before = self.get(name)
        undo = (self, name, self.changes.get(name, _ABSENT), self.size)
        self.changes[name] = value
        self.size += (value is not None) - (before is not None)
        return undo

    @staticmethod
    def unset(undo: tuple) -> None:
        """Take back one ``set`` (newest first)."""
        edited, name, previous, size = undo
        if previous is _ABSENT:
            del edited.changes[name]
        else:
            edited.changes[name] = previous
        edited.size = size

    def tree(self, more: dict | None = None):
        """The ``Tree`` with every staged change (and ``more``) applied."""
        changes = self.changes if not more else {**self.changes, **more}
        return self.origin.with_changes(changes) if changes else self.origin


class Staging:
    """A mutable view over an immutable root tree.

    Args:
        load_tree: returns the ``Tree`` for an object id.
        root_tree: the ``Tree`` the group starts from.
        is_volatile: tells whether a directory path is volatile (stored as a
            gitlink to its tree, see ``keg.volatile``).
        root_oid: the id of ``root_tree``, so the new root can be stored as a
            delta against it.
    """

    def __init__(self, load_tree, root_tree, is_volatile=lambda path: False, root_oid=None):
        self._load_tree = load_tree
        self._is_volatile = is_volatile
        self.dirs = {paths.ROOT: root_tree}   # path -> Tree as loaded, or _Edited once changed
        self.base = {paths.ROOT: (root_oid, root_tree)} if root_oid is not None else {}
        self.dirty: set = set()
        self._undo: list = []

    def _is_dir(self, path: str, entry) -> bool:
        return entry[0] == MODE_TREE or (entry[0] == MODE_GITLINK and self._is_volatile(path))

    def snapshot(self):
        """A mark to ``restore`` if a transaction fails: the directories, and how far the undo log goes."""
        return dict(self.dirs), set(self.dirty), len(self._undo)

    def restore(self, snap) -> None:
        """Return to a snapshot (taken since the last ``restore`` to an earlier one)."""
        dirs, dirty, mark = snap
        while len(self._undo) > mark:
            _Edited.unset(self._undo.pop())
        self.dirs, self.dirty = dict(dirs), set(dirty)

    def _dir(self, path: str, create: bool):
        tree = self.dirs.get(path)
        if tree is not None:
            return tree
        parent_path = paths.parent_of(path)
        parent = self._dir(parent_path, create)
        if parent is None:
            return None
        name = path.rsplit("/", 1)[1].encode("utf-8")
        entry = parent.get(name)
        if entry is None:
            if not create:
                return None
            self._set(parent_path, name, (MODE_TREE, _UNBUILT))
            self.dirs[path] = EMPTY_TREE
            return EMPTY_TREE
        if not self._is_dir(path, entry):
            if create:
                raise PathConflict(f"{path} is a file; it cannot hold other paths")
            return None
        tree = self._load_tree(entry[1])
        self.dirs[path] = tree
        self.base[path] = (entry[1], tree)
        return tree

    def _edited(self, dir_path: str) -> _Edited:
        tree = self.dirs[dir_path]
        if not isinstance(tree, _Edited):
            tree = self.dirs[dir_path] = _Edited(tree)
        return tree

    def _set(self, dir_path: str, name: bytes, value) -> None:
        self._undo.append(self._edited(dir_path).set(name, value))
        path = dir_path
        while path not in self.dirty:
            self.dirty.add(path)
            if path == paths.ROOT:
                break
            path = paths.parent_of(path)

    def entry(self, path: str):
        """``(mode, oid)`` at ``path`` as staged, ``None`` when absent.

        A staged directory's id is computed on demand (``build`` has not run).
        """
        if path == paths.ROOT:
            return (MODE_TREE, self._peek(paths.ROOT))
        parent = self._dir(paths.parent_of(path), create=False)
        if parent is None:
            return None
        entry = parent.get(path.rsplit("/", 1)[1].encode("utf-8"))
        if entry is not None and self._is_dir(path, entry):
            if path not in self.dirty:
                return entry
            return None if self._vanished(path) else (MODE_TREE, self._peek(path))
        return entry

    def _vanished(self, path: str) -> bool:
        """True for a directory the group emptied: like git, Keg has no empty directories.

        It is still staged (``build`` drops it), but to the transactions after
        the one that emptied it, it is absent, as it would be had that one been
        committed alone.  A directory whose only entries are such directories
        is one too.
        """
        tree = self.dirs.get(path)
        if tree is None or path not in self.dirty:
            return False  # not changed by this group: as stored, never empty
        if len(tree) == 0:
            return True
        subs = [d for d in self.dirty if d != path and paths.parent_of(d) == path]
        return len(subs) >= len(tree) and all(self._vanished(d) for d in subs)

    def _forget(self, path: str) -> None:
        """Drop the staged directories at and below ``path`` (deleted, or replaced by a file)."""
        for d in [d for d in self.dirs if paths.is_under(d, path)]:
            del self.dirs[d]
        self.dirty = {d for d in self.dirty if not paths.is_under(d, path)}

    def put(self, path: str, mode: int, oid: bytes) -> None:
        """Stage a file at ``path``, creating directories on the way."""
        parent_path = paths.parent_of(path)
        parent = self._dir(parent_path, create=True)
        name = path.rsplit("/", 1)[1].encode("utf-8")
        old = parent.get(name)
        if old is not None and self._is_dir(path, old):
            if not self._vanished(path):
                raise PathConflict(f"{path} is a directory; delete it first to put a file there")
            self._forget(path)
        self._set(parent_path, name, (mode, oid))

    def delete(self, path: str, recursive: bool) -> None:
        """Stage the removal of ``path``."""
        parent_path = paths.parent_of(path)
        parent = self._dir(parent_path, create=False)
        name = path.rsplit("/", 1)[1].encode("utf-8")
        old = parent.get(name) if parent is not None else None
        is_dir = old is not None and self._is_dir(path, old)
        if old is None or (is_dir and self._vanished(path)):
            raise NotFound(f"{path} does not exist")
        if is_dir:
            if not recursive:
                raise PathConflict(f"{path} is a directory; delete it recursively (keg rm -r)")
            self._forget(path)
        self._set(parent_path, name, None)

    def _peek(self, path: str) -> bytes:
        """The id the staged directory would have, without storing anything."""
        if path not in self.dirty:
            if path == paths.ROOT:
                return object_id(OBJ_TREE, self.dirs[path].encode())
            return self.entry(path)[1]
        changes = {}
        for sub in self.dirty:
            if sub != path and paths.parent_of(sub) == path:
                name = sub.rsplit("/", 1)[1].encode("utf-8")
                changes[name] = None if self._vanished(sub) else (MODE_TREE, self._peek(sub))
        return object_id(OBJ_TREE, self._edited(path).tree(changes).encode())

    def build(self, store_object):
        """Write every changed directory bottom-up; returns the new root tree id.

        Empty directories disappear, as git has no empty directories.

        Args:
            store_object: called with ``(oid, OBJ_TREE, data, tree, base)`` for each
                new tree; ``base`` is ``(oid, Tree)`` of the directory's previous
                version, or ``None`` for a new directory.
        """
        self._undo.clear()  # a built group is not taken back
        for path in sorted(self.dirty, key=_depth, reverse=True):
            edited = self._edited(path)
            if path != paths.ROOT:
                parent_path = paths.parent_of(path)
                name = path.rsplit("/", 1)[1].encode("utf-8")
                if len(edited) == 0:
                    self._edited(parent_path).set(name, None)
                    continue
            tree = self.dirs[path] = edited.tree()
            data = tree.encode()
            oid = object_id(OBJ_TREE, data)
            store_object(oid, OBJ_TREE, data, tree, self.base.get(path))
            if path == paths.ROOT:
                self.dirty.clear()
                return oid
            mode = MODE_GITLINK if self._is_volatile(path) else MODE_TREE
            self._edited(parent_path).set(name, (mode, oid))
        raise AssertionError("the root is always dirty when anything changed")
