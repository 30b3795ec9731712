"""Git object encoding: blob, tree and commit bytes and their ids, computed in process.

Keg computes object ids itself (SHA-1 over git's canonical encoding) so that a
transaction costs hashing, not a file per object; the objects reach disk in a
pack at the next checkpoint (see ``keg.pack``).  The encodings are git's own,
so stock git reads everything Keg writes.
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass
from itertools import accumulate

from keg.delta import splice_delta

OBJ_COMMIT = 1
OBJ_TREE = 2
OBJ_BLOB = 3

TYPE_NAMES = {OBJ_COMMIT: b"commit", OBJ_TREE: b"tree", OBJ_BLOB: b"blob"}
TYPE_BY_NAME = {v.decode(): k for k, v in TYPE_NAMES.items()}

MODE_BLOB = 0o100644
MODE_EXEC = 0o100755
MODE_LINK = 0o120000
MODE_TREE = 0o040000
MODE_GITLINK = 0o160000
LEAF_MODES = (MODE_BLOB, MODE_EXEC, MODE_LINK, MODE_GITLINK)

EMPTY_TREE_OID = bytes.fromhex("4b825dc642cb6eb9a060e54bf8d69288fbee4904")


def object_id(obj_type: int, data: bytes) -> bytes:
    """The 20-byte git object id of ``data`` stored as ``obj_type``."""
    h = hashlib.sha1(b"%s %d\x00" % (TYPE_NAMES[obj_type], len(data)))
    h.update(data)
    return h.digest()


def kind_of_mode(mode: int) -> str:
    """The Keg kind of a tree entry: ``file``, ``tree``, ``link`` or ``pointer``."""
    if mode == MODE_TREE:
        return "tree"
    if mode == MODE_GITLINK:
        return "pointer"
    if mode == MODE_LINK:
        return "link"
    return "file"


def _sort_key(name: bytes, mode: int) -> bytes:
    # git orders a tree's entries as if every subtree's name ended in "/".
    return name + b"/" if mode == MODE_TREE else name


def _encode_entry(name: bytes, mode: int, oid: bytes) -> bytes:
    return b"%o %s\x00%s" % (mode, name, oid)


class Tree:
    """An immutable git tree: entries kept sorted as git sorts them.

    Two parallel sorted lists (sort keys and encoded entries) and no dict: an
    insert or removal copies two lists of pointers, which is what keeps a
    commit into a 5,000-entry directory cheap.  Updates return a new ``Tree``
    (copy-on-write), so a transaction that fails midway is simply dropped.

    The common update replaces an entry by one of the same name, kind and
    encoded length (a new object id): the entries keep their byte offsets, so
    the new tree shares the sort keys and the offsets with the old one and its
    encoding is the old encoding with the new entry copied over, a memcpy
    rather than a join of every entry.  Such a tree also remembers the tree
    it was first derived from and the bytes it overwrote (``delta_against``),
    so that storing it as a change to that version costs what changed.
    """

    __slots__ = ("_keys", "_encoded", "_raw", "_offsets", "_edits")

    def __init__(self, keys=None, encoded=None, raw=None, offsets=None, edits=None):
        self._keys: list[bytes] = keys if keys is not None else []
        self._encoded: list[bytes] = encoded if encoded is not None else []
        self._raw: bytes | None = raw
        # Byte offset of each entry in the encoding, then the total length; computed
        # when first needed and shared by every version with the same entry lengths.
        self._offsets: list[int] | None = offsets
        # (origin, {offset: entry}): the bytes written over ``origin``'s encoding, same lengths.  An
        # origin never has edits of its own, so a tree keeps at most one older tree alive.
        self._edits: tuple | None = edits

    @classmethod
    def parse(cls, data: bytes) -> "Tree":
        """Decode git tree bytes."""
        keys, encoded = [], []
        pos, end = 0, len(data)
        while pos < end:
            space = data.index(b" ", pos)
            nul = data.index(b"\x00", space)
            name = data[space + 1:nul]
            keys.append(name + b"/" if data[pos:space] == b"40000" else name)
            encoded.append(data[pos:nul + 21])
            pos = nul + 21
        if keys != sorted(keys):
            # Trees written by other tools are sorted too; re-sort rather than trust.
            order = sorted(range(len(keys)), key=keys.__getitem__)
            return cls([keys[i] for i in order], [encoded[i] for i in order])
        return cls(keys, encoded, bytes(data))

    def __len__(self) -> int:
        return len(self._keys)

    def _find(self, name: bytes) -> int:
        """The index of ``name``'s entry, or -1."""
        keys = self._keys
        for key in (name, name + b"/"):
            i = bisect.bisect_left(keys, key)
            if i < len(keys) and keys[i] == key:
                return i
        return -1

    def __contains__(self, name: bytes) -> bool:
        return self._find(name) >= 0

    @staticmethod
    def _decode(entry: bytes):
        space = entry.index(b" ")
        return int(entry[:space], 8), entry[-20:]

    def get(self, name: bytes):
        """``(mode, oid)`` of an entry, or ``None``."""
        i = self._find(name)
        return None if i < 0 else self._decode(self._encoded[i])

    def items(self):
        """``(name, mode, oid)`` in git order."""
        for key, entry in zip(self._keys, self._encoded):
            mode, oid = self._decode(entry)
            yield (key[:-1] if mode == MODE_TREE else key), mode, oid

    def with_changes(self, changes: dict) -> "Tree":
        """A new tree with ``changes`` applied: name -> ``(mode, oid)``, or ``None`` to remove."""
        replaced = self._with_replacements(changes)
        if replaced is not None:
            return replaced
        keys = list(self._keys)
        encoded = list(self._encoded)
        for name, new in changes.items():
            for key in (name, name + b"/"):
                i = bisect.bisect_left(keys, key)
                if i < len(keys) and keys[i] == key:
                    del keys[i]
                    del encoded[i]
                    break
            if new is not None:
                mode, oid = new
                key = _sort_key(name, mode)
                i = bisect.bisect_left(keys, key)
                keys.insert(i, key)
                encoded.insert(i, _encode_entry(name, mode, oid))
        return Tree(keys, encoded)

    def _with_replacements(self, changes: dict):
        """``with_changes`` when every change keeps its entry's place and length, else ``None``.

        Such a change leaves the sort keys and the byte offsets as they are, so
        the new tree shares them with this one; only the list of encoded
        entries is copied, and the encoding is this one's with the new entries
        copied over their old bytes.
        """
        encoded, spliced = self._encoded, set()
        for name, new in changes.items():
            if new is None:
                return None
            i = self._find(name)
            if i < 0:
                return None
            mode, oid = new
            entry = _encode_entry(name, mode, oid)
            # The first match is the one the general path would replace (a file
            # before a same-named directory), and it must keep its sort key.
            if self._keys[i] != _sort_key(name, mode) or len(entry) != len(encoded[i]):
                return None
            if encoded is self._encoded:
                encoded = list(encoded)  # the new tree's own; this tree's list is never touched
            encoded[i] = entry
            spliced.add(i)
        if not spliced:  # no changes at all
            return Tree(self._keys, encoded, self._raw, self._offsets, self._edits)
        if self._raw is None:
            return Tree(self._keys, encoded, None, self._offsets)
        offsets = self._entry_offsets()
        origin, edits = self._edits if self._edits is not None else (self, {})
        edits = dict(edits)
        # One copy of the old bytes: memoryview slices are views, and the join copies each piece once.
        old, pieces, pos = memoryview(self._raw), [], 0
        for i in sorted(spliced):
            pieces += (old[pos:offsets[i]], encoded[i])
            pos = offsets[i + 1]
            edits[offsets[i]] = encoded[i]
        pieces.append(old[pos:])
        return Tree(self._keys, encoded, b"".join(pieces), offsets, (origin, edits))

    def delta_against(self, base: "Tree") -> bytes | None:
        """A git delta from ``base``'s encoding to this one, if this tree was made from ``base``
        by same-length replacements (else None: ``keg.delta.make_delta`` compares the bytes).

        Either way the tree forgets ``base``, which it no longer needs to keep alive.
        """
        edits, self._edits = self._edits, None
        if edits is None or edits[0] is not base:
            return None
        return splice_delta(len(base.encode()), sorted(edits[1].items()))

    def _entry_offsets(self) -> list[int]:
        if self._offsets is None:
            self._offsets = list(accumulate(map(len, self._encoded), initial=0))
        return self._offsets

    def encode(self) -> bytes:
        """The git tree bytes (computed once)."""
        if self._raw is None:
            self._raw = b"".join(self._encoded)
        return self._raw


EMPTY_TREE = Tree()


@dataclass(frozen=True)
class Person:
    """An author or committer as git records it."""

    name: str
    email: str

    def encode(self, when: int) -> bytes:
        """git's ``Name <email> seconds +0000`` form."""
        name = self.name.replace("<", "").replace(">", "").replace("\n", " ").strip() or "keg"
        email = self.email.replace("<", "").replace(">", "").replace("\n", "").strip()
        return f"{name} <{email}> {int(when)} +0000".encode("utf-8")


@dataclass(frozen=True)
class Commit:
    """The parts of a commit that Keg writes and reads."""

    tree: bytes
    parents: tuple
    author: Person
    committer: Person
    time: int
    message: str

    def encode(self) -> bytes:
        """The git commit bytes."""
        lines = [b"tree " + self.tree.hex().encode()]
        lines += [b"parent " + p.hex().encode() for p in self.parents]
        lines.append(b"author " + self.author.encode(self.time))
        lines.append(b"committer " + self.committer.encode(self.time))
        return b"\n".join(lines) + b"\n\n" + self.message.encode("utf-8")

    @classmethod
    def parse(cls, data: bytes) -> "Commit":
        """Decode git commit bytes (extra headers such as signatures are ignored)."""
        head, _, message = data.partition(b"\n\n")
        tree, parents, author, committer, when = None, [], None, None, 0
        for line in head.split(b"\n"):
            key, _, value = line.partition(b" ")
            if key == b"tree":
                tree = bytes.fromhex(value.decode())
            elif key == b"parent":
                parents.append(bytes.fromhex(value.decode()))
            elif key in (b"author", b"committer"):
                person, when_s = _parse_person(value)
                if key == b"author":
                    author, when = person, when_s
                else:
                    committer = person
        return cls(tree, tuple(parents), author, committer, when, message.decode("utf-8", "replace"))


def _parse_person(value: bytes):
    text = value.decode("utf-8", "replace")
    lt, gt = text.find("<"), text.rfind(">")
    name, email = text[:lt].strip(), text[lt + 1:gt]
    rest = text[gt + 1:].split()
    return Person(name, email), int(rest[0]) if rest else 0
