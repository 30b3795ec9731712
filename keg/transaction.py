"""Transactions: puts and deletes guarded by compares, and their JSON form (DESIGN §3).

The JSON form is the same for ``keg tx`` on stdin and ``POST /v1/tx``::

    {"compare": [{"path": "/a/b.txt", "kid": "K-…"}, {"path": "/new.json", "kid": null}],
     "ops": [{"op": "put", "path": "/a/b.txt", "value": "text"},
             {"op": "put", "path": "/bin.dat", "base64": "…"},
             {"op": "put", "path": "/big.img", "large": {"size": …, "blake3": "…", "chunks": [["…", n], …]}},
             {"op": "link", "path": "/src/app", "kid": "K-<commit>"},
             {"op": "delete", "path": "/old.json"}]}

A ``large`` put names chunks already stored (``PUT /v1/chunks/<blake3>``);
see :mod:`keg.large`.

Parsing validates everything (paths, KIDs, encodings) so a bad transaction is
refused before the store is touched.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

import kid as kidlib
from keg import paths
from keg.errors import BadRequest
from keg.large import Pointer

MODES = {"file": 0o100644, "exec": 0o100755}
MODE_GITLINK = 0o160000


@dataclass(frozen=True)
class Compare:
    """The path's KID must equal ``kid``; ``kid=None`` means the path must be absent."""

    path: str
    kid: str | None


@dataclass(frozen=True)
class Put:
    """Write ``data`` at ``path``, creating directories on the way.

    With ``large``, ``data`` is a pointer blob (:mod:`keg.large`) whose chunks
    are already in the chunk store; the store checks that they are.
    """

    path: str
    data: bytes
    mode: int = 0o100644
    large: bool = False


@dataclass(frozen=True)
class Delete:
    """Remove ``path``; a directory only with ``recursive``."""

    path: str
    recursive: bool = False


@dataclass(frozen=True)
class Author:
    """Who a transaction is recorded as coming from."""

    name: str = "keg"
    email: str = "keg@localhost"


@dataclass(frozen=True)
class Transaction:
    """A list of ops applied atomically when every compare holds."""

    ops: tuple
    compares: tuple = ()
    author: Author = field(default_factory=Author)
    id: str | None = None

    def __post_init__(self):
        if not self.ops:
            raise BadRequest("a transaction needs at least one op")


@dataclass(frozen=True)
class TxResult:
    """What happened to one transaction of a group.

    ``ok`` with ``revision`` and the KID of every written path (``None`` for a
    deleted one), or not ``ok`` with ``error`` (a ``KegError``; for a failed
    compare a ``CompareFailed`` naming the path).
    """

    ok: bool
    revision: int | None = None
    revision_kid: str | None = None
    kids: dict = field(default_factory=dict)
    error: Exception | None = None

    def to_json(self) -> dict:
        """The JSON answer of ``keg tx --json`` and ``POST /v1/tx``."""
        if self.ok:
            return {"ok": True, "revision": self.revision, "revision_kid": self.revision_kid, "kids": self.kids}
        out = {"ok": False, "error": str(self.error), "error_type": type(self.error).__name__}
        failed = getattr(self.error, "path", None)
        if failed is not None:
            out["failed_compare"] = {"path": failed, "expected": self.error.expected, "actual": self.error.actual}
        return out


def put(path: str, data: bytes | str, mode: int = 0o100644) -> Put:
    """A validated put op; text is stored as UTF-8."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if not isinstance(data, (bytes, bytearray)):
        raise BadRequest(f"put {path}: the value must be bytes or text")
    norm = paths.normalize(path)
    if norm == paths.ROOT:
        raise BadRequest("cannot put a value at '/', the root is a directory")
    return Put(norm, bytes(data), mode)


def put_large(path: str, pointer, mode: int = 0o100644) -> Put:
    """A put of a large value whose chunks are stored already (``pointer`` is a :class:`keg.large.Pointer`)."""
    norm = paths.normalize(path)
    if norm == paths.ROOT:
        raise BadRequest("cannot put a value at '/', the root is a directory")
    return Put(norm, pointer.encode(), mode, True)


def link(path: str, commit_kid: str) -> Put:
    """A put of a pointer to a commit of another keg or git repository (a gitlink, mode 160000).

    The commit's objects are read through the pointer once they are in this
    keg (``Store.mount`` fetches them); the KID is the commit's.
    """
    norm = paths.normalize(path)
    if norm == paths.ROOT:
        raise BadRequest("cannot link '/', the root is a directory")
    try:
        parsed = kidlib.parse(commit_kid, allow_short=False)
    except kidlib.KidError as err:
        raise BadRequest(f"link {norm}: {err}") from err
    return Put(norm, bytes.fromhex(str(parsed)[2:]), MODE_GITLINK)


def delete(path: str, recursive: bool = False) -> Delete:
    """A validated delete op."""
    norm = paths.normalize(path)
    if norm == paths.ROOT:
        raise BadRequest("cannot delete '/', the root of the namespace")
    return Delete(norm, bool(recursive))


def compare(path: str, expected: str | None) -> Compare:
    """A validated compare; ``expected`` is a full KID or ``None`` for absent."""
    norm = paths.normalize(path)
    if expected is not None:
        try:
            expected = str(kidlib.parse(expected, allow_short=False))
        except kidlib.KidError as err:
            raise BadRequest(f"compare on {norm}: {err}") from err
    return Compare(norm, expected)


def _field(obj: dict, name: str, where: str, kinds, required: bool = True):
    if name not in obj:
        if required:
            raise BadRequest(f"{where}: missing field {name!r}")
        return None
    value = obj[name]
    if not isinstance(value, kinds):
        raise BadRequest(f"{where}: field {name!r} has the wrong type ({type(value).__name__})")
    return value


def _parse_op(obj, where: str):
    if not isinstance(obj, dict):
        raise BadRequest(f"{where}: an op must be a JSON object")
    kind = _field(obj, "op", where, str)
    path = _field(obj, "path", where, str)
    if kind == "delete":
        return delete(path, bool(obj.get("recursive", False)))
    if kind == "link":
        return link(path, _field(obj, "kid", where, str))
    if kind != "put":
        raise BadRequest(f"{where}: unknown op {kind!r}; ops are 'put', 'delete' and 'link'")
    has_text, has_b64, has_large = "value" in obj, "base64" in obj, "large" in obj
    if has_text + has_b64 + has_large != 1:
        raise BadRequest(f"{where}: a put needs exactly one of 'value' (text), 'base64' or 'large' "
                         "(a pointer to stored chunks)")
    mode_name = obj.get("mode", "file")
    if mode_name not in MODES:
        raise BadRequest(f"{where}: mode must be one of {sorted(MODES)}")
    if has_large:
        return put_large(path, Pointer.from_json(obj["large"], f"{where}: large"), MODES[mode_name])
    if has_text:
        data = _field(obj, "value", where, str).encode("utf-8")
    else:
        try:
            data = base64.b64decode(_field(obj, "base64", where, str), validate=True)
        except (binascii.Error, ValueError) as err:
            raise BadRequest(f"{where}: 'base64' is not valid base64") from err
    return put(path, data, MODES[mode_name])


def parse_transaction(obj, author: Author | None = None) -> Transaction:
    """Build a :class:`Transaction` from its JSON form, validating every part.

    Raises:
        BadRequest: naming the first thing that is wrong.
    """
    if not isinstance(obj, dict):
        raise BadRequest("a transaction must be a JSON object with 'ops' (and optionally 'compare')")
    unknown = set(obj) - {"compare", "ops", "id"}
    if unknown:
        raise BadRequest(f"transaction has unknown fields: {', '.join(sorted(unknown))}")
    raw_ops = _field(obj, "ops", "transaction", list)
    raw_cmp = _field(obj, "compare", "transaction", list, required=False) or []
    ops = tuple(_parse_op(op, f"ops[{i}]") for i, op in enumerate(raw_ops))
    compares = []
    for i, c in enumerate(raw_cmp):
        where = f"compare[{i}]"
        if not isinstance(c, dict):
            raise BadRequest(f"{where}: a compare must be a JSON object")
        path = _field(c, "path", where, str)
        if "kid" not in c:
            raise BadRequest(f"{where}: missing field 'kid' (a KID, or null for 'absent')")
        expected = _field(c, "kid", where, (str, type(None)))
        compares.append(compare(path, expected))
    tx_id = _field(obj, "id", "transaction", str, required=False)
    if tx_id is not None and (not tx_id or len(tx_id) > 200 or not tx_id.isprintable()):
        raise BadRequest("transaction: 'id' must be 1 to 200 printable characters on one line")
    return Transaction(ops, tuple(compares), author or Author(), tx_id)


def transaction_to_json(tx: Transaction) -> dict:
    """The JSON form of a transaction (what ``parse_transaction`` reads back)."""
    ops = []
    for op in tx.ops:
        if isinstance(op, Delete):
            ops.append({"op": "delete", "path": op.path, **({"recursive": True} if op.recursive else {})})
            continue
        if op.mode == MODE_GITLINK:
            ops.append({"op": "link", "path": op.path, "kid": kidlib.PREFIX + op.data.hex()})
            continue
        out = {"op": "put", "path": op.path}
        if op.large:
            out["large"] = Pointer.parse(op.data).to_json()
        else:
            try:
                out["value"] = op.data.decode("utf-8")
            except UnicodeDecodeError:
                out["base64"] = base64.b64encode(op.data).decode("ascii")
        if op.mode == MODES["exec"]:
            out["mode"] = "exec"
        ops.append(out)
    obj = {"ops": ops}
    if tx.compares:
        obj["compare"] = [{"path": c.path, "kid": c.kid} for c in tx.compares]
    if tx.id is not None:
        obj["id"] = tx.id
    return obj
