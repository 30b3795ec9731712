"""Who is asking, and what they may do: tokens, users, machines and the ACL (DESIGN §4).

Users live at ``/users/<name>/user.json``::

    {"name": "ada", "email": "ada@example.org", "kid": "K-…", "kind": "user",
     "groups": ["admin"], "tokens": [{"id": "3f9c…", "hash": "blake3:…", "created": 1700000000}]}

A token is ``kt_<id>_<secret>``; only the blake3 hash of the secret is stored,
so reading ``/users`` reveals no usable token.  A *machine* principal has
``"kind": "machine"`` and may write only ``/machines/<its name>/status/`` and
its registration ``/machines/<its name>/machine.json``,
whatever the ACL says.

``/policy/acl.tsv`` grants rights on path prefixes::

    who             prefix  rights
    group:admin     /       rw
    group:machines  /       r

``who`` is ``user:NAME``, ``group:NAME``, ``machine:NAME``, ``*`` (anyone with
a valid token) or ``anonymous`` (requests without a token: off unless a line
grants it).  Rights add up; there are no deny lines.
"""

from __future__ import annotations

import base64
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass, field

import blake3

import kid as kidlib
from keg import paths
from keg.errors import BadRequest, KegError, NotFound
from keg.transaction import Author, Transaction, compare, put

ACL_PATH = "/policy/acl.tsv"
ACL_DIR = "/policy"
USERS = "/users"
TOKEN_RE = re.compile(r"^kt_([0-9a-f]{16})_([A-Za-z0-9_-]{32,})$")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
DEFAULT_ACL = "who\tprefix\trights\ngroup:admin\t/\trw\ngroup:machines\t/\tr\n"
RIGHTS = {"r": {"r"}, "w": {"w"}, "rw": {"r", "w"}}


class AuthError(KegError):
    """A request is not allowed; nothing was read or written."""

    exit_code = 6


class Unauthenticated(AuthError):
    """No token, or a token that is not valid (HTTP 401)."""


class Forbidden(AuthError):
    """A valid token without the right asked for (HTTP 403)."""


def _machine_may_write(name: str, path: str) -> bool:
    """A machine writes its own registration and status, nothing else (its procs are written by people or policy)."""
    return path == f"/machines/{name}/machine.json" or paths.is_under(path, f"/machines/{name}/status")


@dataclass(frozen=True)
class Principal:
    """An authenticated user or machine, or ``anonymous``."""

    name: str
    kind: str = "user"           # user | machine | anonymous
    email: str = ""
    groups: frozenset = field(default_factory=frozenset)

    @property
    def labels(self) -> set:
        """The ``who`` values of the ACL that match this principal."""
        if self.kind == "anonymous":
            return {"anonymous"}
        out = {"*", f"user:{self.name}"} | {f"group:{g}" for g in self.groups}
        if self.kind == "machine":
            out |= {f"machine:{self.name}", "group:machines"}
        return out

    @property
    def author(self) -> Author:
        """How this principal's writes are recorded in commits."""
        return Author(self.name, self.email or f"{self.name}@keg")


ANONYMOUS = Principal("anonymous", "anonymous")


def check_name(name: str) -> str:
    """Validate a user or machine name (lowercase letters, digits, '.', '_', '-')."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise BadRequest(f"{name!r} is not a valid name: use 1-63 lowercase letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return name


def hash_secret(secret: str) -> str:
    """The stored form of a token's secret."""
    return "blake3:" + blake3.blake3(secret.encode()).hexdigest()


def make_token() -> tuple:
    """A new token: ``(id, token string, stored record)``."""
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    record = {"id": token_id, "hash": hash_secret(secret), "created": int(time.time())}
    return token_id, f"kt_{token_id}_{secret}", record


def parse_acl(text: str) -> list:
    """``(who, prefix, rights set)`` triples from an ACL table.

    Raises:
        BadRequest: naming the line that is wrong.
    """
    rules = []
    lines = text.splitlines()
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip() or line.startswith("#"):
            continue
        cells = line.split("\t")
        if len(cells) != 3 or cells[2] not in RIGHTS:
            raise BadRequest(f"{ACL_PATH} line {number}: want 'who<TAB>prefix<TAB>r|w|rw', got {line!r}")
        rules.append((cells[0], paths.normalize(cells[1]), RIGHTS[cells[2]]))
    return rules


def user_object(name: str, email: str, groups=(), machine: bool = False) -> dict:
    """A new ``user.json`` value, without tokens."""
    check_name(name)
    email = email or f"{name}@keg"
    return {"name": name, "email": email, "kid": str(kidlib.user_kid(email)),
            "kind": "machine" if machine else "user", "groups": sorted(set(groups)), "tokens": []}


def initial_ops(admin: str = "admin", email: str = "") -> tuple:
    """The puts ``keg init`` puts in revision 1, and the admin's token: ``(ops, token)``."""
    user = user_object(admin, email, groups=("admin",))
    _, token, record = make_token()
    user["tokens"].append(record)
    ops = (put(f"{USERS}/{admin}/user.json", json.dumps(user, indent=2) + "\n"), put(ACL_PATH, DEFAULT_ACL))
    return ops, token


class Authority:
    """Authenticates requests and checks rights against the newest users and ACL.

    Args:
        master: anything with ``stat`` and ``read`` (a ``Master`` or ``Store``).
    """

    def __init__(self, master):
        self.master = master
        self._users_kid = None
        self._tokens: dict = {}     # token id -> (hash, Principal)
        self._acl_kid = None
        self._policy_kid = None     # the /policy directory's: the ACL is looked at again only when it changes
        self._acl: list = []
        self._checked_at = None     # the head revision the caches were checked against

    def _kid_or_none(self, path: str):
        try:
            return self.master.stat(path).kid
        except NotFound:
            return None

    def _refresh(self) -> None:
        # Users and ACL can only change with a new revision: look again only then.
        head = self.master.head_number() if hasattr(self.master, "head_number") else None
        if head is not None and head == self._checked_at:
            return
        checked, self._checked_at = self._checked_at, head
        if checked is not None and not any(self.master.changed_since(top, checked) in (True, None)
                                           for top in (USERS[1:], ACL_DIR[1:])):
            return  # the master knows the revisions since touched neither /users nor /policy
        try:
            self._reload()
        except BaseException:
            self._checked_at = self._policy_kid = None  # look again in full next time, whatever changes
            raise

    def _reload(self) -> None:
        users_kid = self._kid_or_none(USERS)
        if users_kid != self._users_kid:
            tokens = {}
            if users_kid is not None:
                for entry in self.master.list(USERS):
                    try:
                        user = json.loads(self.master.read(entry.path + "/user.json"))
                    except (KegError, ValueError):
                        continue
                    if not isinstance(user, dict):
                        continue
                    principal = Principal(entry.name, "machine" if user.get("kind") == "machine" else "user",
                                          str(user.get("email", "")), frozenset(user.get("groups") or ()))
                    for record in user.get("tokens") or ():
                        if isinstance(record, dict) and "id" in record and "hash" in record:
                            tokens[record["id"]] = (record["hash"], principal)
            self._tokens, self._users_kid = tokens, users_kid
        policy_kid = self._kid_or_none(ACL_DIR)  # a directory's KID: no blob to look up in the packs
        if policy_kid == self._policy_kid:
            return
        self._policy_kid = policy_kid
        acl_kid = self._kid_or_none(ACL_PATH) if policy_kid is not None else None
        if acl_kid != self._acl_kid:
            try:
                self._acl = parse_acl(self.master.read(ACL_PATH).decode("utf-8")) if acl_kid else []
            except (BadRequest, UnicodeDecodeError):
                self._acl = []  # a broken ACL grants nothing; admins fix it with a local `keg put`
            self._acl_kid = acl_kid

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal an ``Authorization`` header names (Bearer token, or Basic with the token as password).

        Raises:
            Unauthenticated: a header that is malformed or whose token is unknown or revoked.
        """
        self._refresh()
        if not authorization:
            return ANONYMOUS
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer":
            token = value.strip()
        elif scheme.lower() == "basic":
            try:
                _, _, token = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError) as err:
                raise Unauthenticated("malformed Basic credentials") from err
        else:
            raise Unauthenticated(f"unsupported authorization scheme {scheme!r}; use Bearer or Basic")
        match = TOKEN_RE.match(token)
        known = self._tokens.get(match.group(1)) if match else None
        if known is None or not hmac.compare_digest(known[0], hash_secret(match.group(2))):
            raise Unauthenticated("the token is not valid (unknown, revoked or mistyped)")
        return known[1]

    def allowed(self, principal: Principal, path: str, right: str) -> bool:
        """True when ``principal`` has ``right`` (``r`` or ``w``) on ``path``."""
        self._refresh()
        if principal.kind == "machine" and right == "w":
            if not _machine_may_write(principal.name, path):
                return False
        labels = principal.labels
        for who, prefix, rights in self._acl:
            if right in rights and who in labels and paths.is_under(path, prefix):
                return True
        if principal.kind == "machine":
            return _machine_may_write(principal.name, path)
        return False

    def check(self, principal: Principal, path: str, right: str) -> None:
        """Raise unless ``principal`` has ``right`` on ``path``.

        Raises:
            Unauthenticated: an anonymous request was refused (log in first).
            Forbidden: an authenticated principal lacks the right.
        """
        if self.allowed(principal, path, right):
            return
        if principal.kind == "anonymous":
            raise Unauthenticated("this keg needs a token: pass --token or KEG_TOKEN (HTTP: Bearer or Basic)")
        verb = "read" if right == "r" else "write"
        raise Forbidden(f"{principal.kind} {principal.name} may not {verb} {path} (see {ACL_PATH})")


# ------------------------------------------------------- user administration

def _load_user(keg, name: str):
    path = f"{USERS}/{check_name(name)}/user.json"
    entry = keg.stat(path)
    return path, entry.kid, json.loads(keg.read(path))


def add_user(keg, name: str, email: str = "", groups=(), machine: bool = False, author: Author | None = None):
    """Create a user (or machine principal) with one token; returns the token, shown only now.

    Raises:
        CompareFailed: the user exists already.
    """
    user = user_object(name, email, groups, machine)
    _, token, record = make_token()
    user["tokens"].append(record)
    path = f"{USERS}/{name}/user.json"
    tx = Transaction((put(path, json.dumps(user, indent=2) + "\n"),), (compare(path, None),), author or Author())
    result = keg.apply(tx)
    if not result.ok:
        raise result.error
    return token


def new_token(keg, name: str, note: str = "", author: Author | None = None) -> tuple:
    """Add a token to a user; returns ``(token id, token)``."""
    path, user_kid, user = _load_user(keg, name)
    token_id, token, record = make_token()
    if note:
        record["note"] = note
    user.setdefault("tokens", []).append(record)
    tx = Transaction((put(path, json.dumps(user, indent=2) + "\n"),), (compare(path, user_kid),), author or Author())
    result = keg.apply(tx)
    if not result.ok:
        raise result.error
    return token_id, token


def revoke_token(keg, name: str, token_id: str, author: Author | None = None) -> None:
    """Remove a token (by its id, or the whole token string) from a user.

    Raises:
        NotFound: the user has no such token.
    """
    match = TOKEN_RE.match(token_id)
    token_id = match.group(1) if match else token_id
    path, user_kid, user = _load_user(keg, name)
    kept = [t for t in user.get("tokens", []) if not (isinstance(t, dict) and t.get("id") == token_id)]
    if len(kept) == len(user.get("tokens", [])):
        raise NotFound(f"user {name} has no token {token_id}")
    user["tokens"] = kept
    tx = Transaction((put(path, json.dumps(user, indent=2) + "\n"),), (compare(path, user_kid),), author or Author())
    result = keg.apply(tx)
    if not result.ok:
        raise result.error
