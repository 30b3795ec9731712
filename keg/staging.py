"""Staging: the working tree of one commit group, rebuilt only along changed paths.

Transactions of a group apply to a ``Staging`` one after another.  Only the
directories on changed paths are loaded and rewritten; everything else keeps
its tree id, which is what makes a commit cost the depth of the change rather
than the size of the namespace.  ``snapshot``/``restore`` let a failed
transaction vanish without disturbing the ones before it.
"""

from __future__ import annotations

from keg import paths
from keg.errors import NotFound, PathConflict
from keg.objects import EMPTY_TREE, MODE_GITLINK, MODE_TREE, OBJ_TREE, object_id

_UNBUILT = b"\x00" * 20  # a new directory's id, filled in by build()


def _depth(path: str) -> int:
    return 0 if path == paths.ROOT else path.count("/")


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
        self.dirs = {paths.ROOT: root_tree}
        self.base = {paths.ROOT: (root_oid, root_tree)} if root_oid is not None else {}
        self.dirty: set = set()

    def _is_dir(self, path: str, entry) -> bool:
        return entry[0] == MODE_TREE or (entry[0] == MODE_GITLINK and self._is_volatile(path))

    def snapshot(self):
        """A cheap copy to restore if a transaction fails (trees are immutable)."""
        return dict(self.dirs), set(self.dirty)

    def restore(self, snap) -> None:
        """Return to a snapshot."""
        self.dirs, self.dirty = dict(snap[0]), set(snap[1])

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

    def _set(self, dir_path: str, name: bytes, value) -> None:
        self.dirs[dir_path] = self.dirs[dir_path].with_changes({name: value})
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
            return (MODE_TREE, self._peek(path) if path in self.dirty else entry[1])
        return entry

    def put(self, path: str, mode: int, oid: bytes) -> None:
        """Stage a file at ``path``, creating directories on the way."""
        parent_path = paths.parent_of(path)
        parent = self._dir(parent_path, create=True)
        name = path.rsplit("/", 1)[1].encode("utf-8")
        old = parent.get(name)
        if old is not None and self._is_dir(path, old):
            raise PathConflict(f"{path} is a directory; delete it first to put a file there")
        self._set(parent_path, name, (mode, oid))

    def delete(self, path: str, recursive: bool) -> None:
        """Stage the removal of ``path``."""
        parent_path = paths.parent_of(path)
        parent = self._dir(parent_path, create=False)
        name = path.rsplit("/", 1)[1].encode("utf-8")
        old = parent.get(name) if parent is not None else None
        if old is None:
            raise NotFound(f"{path} does not exist")
        if self._is_dir(path, old):
            if not recursive:
                raise PathConflict(f"{path} is a directory; delete it recursively (keg rm -r)")
            for d in [d for d in self.dirs if paths.is_under(d, path)]:
                del self.dirs[d]
            self.dirty = {d for d in self.dirty if not paths.is_under(d, path)}
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
                changes[name] = None if len(self.dirs[sub]) == 0 else (MODE_TREE, self._peek(sub))
        return object_id(OBJ_TREE, self.dirs[path].with_changes(changes).encode())

    def build(self, store_object):
        """Write every changed directory bottom-up; returns the new root tree id.

        Empty directories disappear, as git has no empty directories.

        Args:
            store_object: called with ``(oid, OBJ_TREE, data, tree, base)`` for each
                new tree; ``base`` is ``(oid, Tree)`` of the directory's previous
                version, or ``None`` for a new directory.
        """
        for path in sorted(self.dirty, key=_depth, reverse=True):
            tree = self.dirs[path]
            if path != paths.ROOT:
                parent_path = paths.parent_of(path)
                name = path.rsplit("/", 1)[1].encode("utf-8")
                if len(tree) == 0:
                    self.dirs[parent_path] = self.dirs[parent_path].with_changes({name: None})
                    continue
            data = tree.encode()
            oid = object_id(OBJ_TREE, data)
            store_object(oid, OBJ_TREE, data, tree, self.base.get(path))
            if path == paths.ROOT:
                self.dirty.clear()
                return oid
            mode = MODE_GITLINK if self._is_volatile(path) else MODE_TREE
            self.dirs[parent_path] = self.dirs[parent_path].with_changes({name: (mode, oid)})
        raise AssertionError("the root is always dirty when anything changed")
