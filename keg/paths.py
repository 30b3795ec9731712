"""Namespace paths: one canonical form, checked before anything is written.

A path is absolute (``/a/b.txt``); ``/`` is the root.  Keg refuses what git
cannot store or what would be unsafe once checked out as files: empty
segments, ``.`` and ``..``, NUL and other control characters, any ``.git``
component, and names longer than a file system allows.
"""

from __future__ import annotations

import re

from keg.errors import BadPath, BadRequest

MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
ROOT = "/"
_CONTROL = re.compile("[\x00-\x1f\x7f]")


def _check_name(name: str, path: str) -> None:
    if name in (".", ".."):
        raise BadPath(f"path {path!r} has a {name!r} segment; give the path without it")
    if name.lower() == ".git":
        raise BadPath(f"path {path!r} has a '.git' segment, which Keg never stores")
    control = _CONTROL.search(name)
    if control:
        raise BadPath(f"path {path!r} has a control character (code {ord(control.group())}) in a name")
    size = len(name.encode("utf-8"))  # normalize() has checked the whole path is UTF-8
    if size > MAX_NAME_BYTES:
        raise BadPath(f"path {path!r} has a name of {size} bytes; at most {MAX_NAME_BYTES}")


def normalize(path: str) -> str:
    """Check a path and return its canonical form.

    A single trailing ``/`` is dropped (``/a/`` is ``/a``).

    Raises:
        BadPath: with a message saying which rule the path breaks.
    """
    if not isinstance(path, str):
        raise BadPath(f"a path must be a string, not {type(path).__name__}")
    if not path.startswith("/"):
        raise BadPath(f"path {path!r} must be absolute, starting with '/'")
    if "\x00" in path:
        raise BadPath(f"path {path!r} contains a NUL byte")
    try:
        size = len(path.encode("utf-8"))
    except UnicodeEncodeError as err:
        raise BadPath(f"path {path!r} is not valid UTF-8") from err
    if size > MAX_PATH_BYTES:
        raise BadPath(f"path of {size} bytes is too long; at most {MAX_PATH_BYTES}")
    if path == ROOT:
        return ROOT
    body = path[1:-1] if path.endswith("/") else path[1:]
    names = body.split("/")
    for name in names:
        if name == "":
            raise BadPath(f"path {path!r} has an empty segment ('//')")
        _check_name(name, path)
    return "/" + "/".join(names)


def split(path: str) -> list[str]:
    """The names along a canonical path (``[]`` for the root)."""
    return [] if path == ROOT else path[1:].split("/")


def join(parent: str, name: str) -> str:
    """A child path of a canonical parent."""
    return "/" + name if parent == ROOT else f"{parent}/{name}"


def parent_of(path: str) -> str:
    """The directory holding a canonical path."""
    head = path.rsplit("/", 1)[0]
    return head or ROOT


def is_under(path: str, prefix: str) -> bool:
    """True when ``path`` is ``prefix`` or lies below it."""
    return prefix == ROOT or path == prefix or path.startswith(prefix + "/")


APP_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")


def check_app(name: str) -> str:
    """An app name: a DNS label, so that ``<app>.<domain>`` is a host name."""
    if not isinstance(name, str) or not APP_RE.match(name) or name.endswith("-"):
        raise BadRequest(f"{name!r} is not an app name: use 1-63 lowercase letters, digits and '-', "
                         "starting with a letter (it becomes a host name)")
    return name
