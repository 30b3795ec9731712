"""KIDs: the immutable names of every value, revision and identity in Keg.

A KID is ``K-`` followed by lowercase hex (DESIGN §1.2).

* A *value KID* is the git object id of a blob or tree.
* A *revision KID* is the commit id of a namespace version.
* An *identity KID* names an entity whose value changes (a user, a machine, a
  process): blake3 of a fixed string, cut to 40 hex digits.

Short forms of at least ``K-`` + 8 hex digits are accepted wherever a KID is
expected and are resolved against a store like git short hashes; resolving is
the store's job (``keg.store.Store.resolve_kid``), parsing is this module's.
"""

from __future__ import annotations

import re

import blake3

PREFIX = "K-"
FULL_HEX = 40
MIN_SHORT_HEX = 8

_HEX_RE = re.compile(r"[0-9a-f]+")


class KidError(ValueError):
    """A string is not a well-formed KID."""


class Kid(str):
    """A well-formed KID, full or short; behaves as its ``K-…`` string.

    Construct with :func:`parse`; ``Kid`` values compare and hash as strings
    so they serve directly as ETags and dictionary keys.
    """

    __slots__ = ()

    @property
    def hex(self) -> str:
        """The hex digits after ``K-``."""
        return self[len(PREFIX):]

    @property
    def is_full(self) -> bool:
        """True when the KID has all 40 hex digits (not a short form)."""
        return len(self.hex) == FULL_HEX


def parse(text: str, allow_short: bool = True) -> Kid:
    """Parse and validate a KID.

    Args:
        text: ``K-`` followed by 8 to 40 lowercase hex digits.
        allow_short: accept fewer than 40 digits (a short form to be resolved).

    Returns:
        The validated :class:`Kid`.

    Raises:
        KidError: the text is not a KID; the message says what is wrong.
    """
    if not isinstance(text, str):
        raise KidError(f"a KID must be a string, not {type(text).__name__}")
    if not text.startswith(PREFIX):
        raise KidError(f"{text!r} is not a KID: a KID starts with 'K-' (for example K-1a2b3c4d)")
    digits = text[len(PREFIX):]
    if not _HEX_RE.fullmatch(digits):
        raise KidError(f"{text!r} is not a KID: after 'K-' only lowercase hex digits 0-9a-f may follow")
    if len(digits) > FULL_HEX:
        raise KidError(f"{text!r} is not a KID: at most {FULL_HEX} hex digits, got {len(digits)}")
    if len(digits) < FULL_HEX and not allow_short:
        raise KidError(f"{text!r} is a short KID; a full KID ({FULL_HEX} hex digits) is needed here")
    if len(digits) < MIN_SHORT_HEX:
        raise KidError(f"{text!r} is too short: a KID needs at least {MIN_SHORT_HEX} hex digits")
    return Kid(text)


def from_hex(hex_digits: str) -> Kid:
    """The KID of a git object id given as 40 hex digits."""
    return parse(PREFIX + hex_digits.lower(), allow_short=False)


def from_oid(oid) -> Kid:
    """The KID of a pygit2 ``Oid`` or 20 raw bytes."""
    if isinstance(oid, (bytes, bytearray)):
        return from_hex(bytes(oid).hex())
    return from_hex(str(oid))


def _identity(text: str) -> Kid:
    return from_hex(blake3.blake3(text.encode("utf-8")).hexdigest()[:FULL_HEX])


def user_kid(email: str) -> Kid:
    """The identity KID of a user: blake3 of ``user:<lower-cased e-mail>``."""
    if not email or "@" not in email:
        raise KidError(f"{email!r} is not an e-mail address")
    return _identity("user:" + email.strip().lower())


def machine_kid(name: str) -> Kid:
    """The identity KID of a machine: blake3 of ``machine:<name>``."""
    if not name:
        raise KidError("a machine needs a name")
    return _identity("machine:" + name)


def process_kid(machine: str | Kid, name: str, spec: str | Kid, incarnation: int) -> Kid:
    """The identity KID of one incarnation of a process.

    Args:
        machine: the machine's identity KID.
        name: the process name in the machine's table.
        spec: the KID of the process spec it runs.
        incarnation: how many times this spec has been started before (0 first).
    """
    machine_id = parse(machine, allow_short=False)
    spec_id = parse(spec, allow_short=False)
    if incarnation < 0:
        raise KidError("an incarnation is a count, never negative")
    return _identity(f"proc:{machine_id}:{name}:{spec_id}:{incarnation}")
