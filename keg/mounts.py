"""Pointers to other kegs: gitlinks in the namespace and the mount table that says where they come from.

A *pointer* is a tree entry of mode 160000 (a gitlink) naming a commit of
another keg or any git repository; its KID is that commit's.  Reads beneath
a pointer (``/src/app/README.md`` under the pointer ``/src/app``) follow it
into the commit's tree, once the commit's objects are in this keg.

:func:`mount` brings them in: it fetches ``REF`` of ``LOCATION`` with stock
git into ``refs/keg/mounts/<id>`` (so the objects stay reachable, and are
kept by repacks and served by ``git fetch``), then commits in one transaction
the pointer and its line in the mount table ``/mounts.tsv``::

    # path<TAB>location<TAB>ref
    /src/app	/srv/git/app.git	main

The mount table is an ordinary value: it has history, and people and
programs read it like anything else.
"""

from __future__ import annotations

import os
import re
import subprocess

import blake3
import pygit2

import kid as kidlib
from keg import paths
from keg.errors import BadRequest, KegError, NotFound
from keg.transaction import Author, Transaction, compare, link, put

TABLE = "/mounts.tsv"
HEADER = "# path\tlocation\tref\n"
MOUNT_REFS = "refs/keg/mounts/"
_REF_RE = re.compile(r"^(HEAD|[A-Za-z0-9][A-Za-z0-9._/-]{0,200})$")
_URL_RE = re.compile(r"^(https?|git|ssh)://[^\s]+$")


class MountError(KegError):
    """A mount could not fetch what it points at."""

    exit_code = 4


def read_table(store, rev=None) -> dict:
    """The mount table: ``{path: (location, ref)}`` (empty when there is none)."""
    try:
        text = store.read(TABLE, rev).decode("utf-8", "replace")
    except NotFound:
        return {}
    table = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) == 3:
            table[fields[0]] = (fields[1], fields[2])
    return table


def _encode(table: dict) -> bytes:
    lines = [f"{p}\t{loc}\t{ref}\n" for p, (loc, ref) in sorted(table.items())]
    return (HEADER + "".join(lines)).encode("utf-8")


def check_location(location: str) -> str:
    """A location is an absolute path to a git repository on this machine, or an http(s)/git/ssh URL.

    Raises:
        BadRequest: anything else (a relative path, an option-looking string, git's ``ext::`` transports).
    """
    if _URL_RE.match(location):
        return location
    if not location.startswith("/") or "\t" in location or "\n" in location:
        raise BadRequest(f"{location!r} is not a location: give an absolute path to a git repository "
                         "or an http(s)://, git:// or ssh:// URL")
    if not os.path.isdir(location):
        raise NotFound(f"no git repository at {location}")
    return location


def mount(store, path: str, location: str, ref: str = "HEAD", author: Author | None = None):
    """Fetch ``ref`` of ``location`` into the keg and put a pointer to its commit at ``path``.

    Mounting again moves the pointer to the ref's newest commit.

    Returns:
        The ``TxResult`` of the transaction that wrote the pointer and the table.

    Raises:
        BadRequest: a bad path, location or ref.
        MountError: git could not fetch the ref.
    """
    path = paths.normalize(path)
    if path == paths.ROOT or path == TABLE:
        raise BadRequest(f"cannot mount at {path}")
    location = check_location(location)
    if not _REF_RE.match(ref) or ".." in ref:
        raise BadRequest(f"{ref!r} is not a ref name: give a branch, a tag or HEAD")
    store.lock()
    local_ref = MOUNT_REFS + blake3.blake3(path.encode()).hexdigest()[:40]
    done = subprocess.run(
        ["git", "-c", "protocol.allow=never", "-c", "protocol.file.allow=always",
         "-c", "protocol.http.allow=always", "-c", "protocol.https.allow=always",
         "-c", "protocol.git.allow=always", "-c", "protocol.ssh.allow=always",
         "--git-dir", store.path, "fetch", "--quiet", "--no-tags", "--no-write-fetch-head",
         "--", location, f"+{ref}:{local_ref}"],
        capture_output=True, env={k: v for k, v in os.environ.items() if not k.startswith("GIT_")},
        stdin=subprocess.DEVNULL, check=False)
    if done.returncode != 0:
        raise MountError(f"cannot fetch {ref} from {location}: {done.stderr.decode(errors='replace').strip()}")
    commit = str(pygit2.Repository(store.path).references[local_ref].target)
    table_kid = store.kid(TABLE) if store.exists(TABLE) else None
    table = read_table(store)
    table[path] = (location, ref)
    tx = Transaction((link(path, kidlib.PREFIX + commit), put(TABLE, _encode(table))),
                     (compare(TABLE, table_kid),), author or Author())
    return store.apply(tx)
