"""Pushed source: the objects of an app's commit brought into the keg, and its pointer ``/src/<app>``.

``git push keg main`` lands in the app's receiving repository (``master.git_http``);
its pre-receive hook (``builders.receive``) sends the objects the keg lacks as a
pack, and the master calls :func:`receive`:

1. the pack is indexed with ``git index-pack --strict`` (every object checked
   as ``fsck`` would) in a quarantine repository that borrows the keg's objects,
   the source's tree is checked (:func:`check_tree`), and only then is the pack
   moved into the keg's object store (fsynced);
2. ``refs/keg/incoming/<app>/<commit>-<unix time>`` is set to the commit, so
   its objects stay reachable (kept by repacks) until the pointer commits;
3. the caller commits the pointer ``/src/<app>`` (a gitlink whose KID is the
   commit id) in a transaction compared against the pointer the push started from;
4. once that transaction is committed the master calls :func:`committed`:
   ``refs/keg/src/<app>`` (served by ``git fetch``, what builders fetch) moves
   to the commit and the incoming ref goes, in one ref transaction.

So the source ref follows the committed pointer: a push refused at step 3 (a
lost race, no Raft majority) leaves ``refs/keg/src/<app>`` on the committed
source, whose objects a repack must keep even when the refused commit does not
descend from it. A refused push's incoming ref is dropped by the next
``keg compact`` once it is :data:`INCOMING_TTL` old (:func:`prune_incoming`),
and its objects with it.

A source is checked before anything else sees it (:func:`check_tree`): no
submodules (``.gitmodules``, gitlinks), no symbolic link that is absolute, leaves
the tree or points into ``.git`` (the CVE-2024-32002 kind of payload), no path
component ``.git`` in any case.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import tempfile
import time

import pygit2

from keg.errors import BadRequest, KegError
from keg.fsio import fsync_dir
from keg.objects import MODE_GITLINK
from keg.paths import check_app
from keg.transaction import Put

SRC_REFS = "refs/keg/src/"
INCOMING_REFS = "refs/keg/incoming/"
INCOMING_TTL = 3600.0   # seconds a received source whose pointer never committed is kept
SHA_RE = re.compile(r"^[0-9a-f]{40}$")
MAX_SYMLINK_TARGET = 4096


class BadSource(BadRequest):
    """A pushed source the keg refuses: nothing of it was kept."""


class IncompleteSource(BadSource):
    """Pushed objects that lean on objects this keg lacks (sent for a keg that had them): nothing was kept."""


def _git_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}


class Incoming:
    """A quarantine for pushed objects: a repository that borrows the keg's objects (alternates).

    The pack is indexed here and checked; only :meth:`accept` moves it into the
    keg, so a refused push leaves no object of its own behind.
    """

    def __init__(self, keg_path: str):
        self.keg_path = os.path.abspath(keg_path)
        base = os.path.join(self.keg_path, "keg", "incoming")
        os.makedirs(base, exist_ok=True)
        self.path = tempfile.mkdtemp(prefix="push-", dir=base)
        os.makedirs(os.path.join(self.path, "objects", "info"))
        os.makedirs(os.path.join(self.path, "objects", "pack"))
        os.makedirs(os.path.join(self.path, "refs"))
        with open(os.path.join(self.path, "HEAD"), "w") as f:
            f.write("ref: refs/heads/main\n")
        with open(os.path.join(self.path, "objects", "info", "alternates"), "w") as f:
            f.write(os.path.join(self.keg_path, "objects") + "\n")

    def index(self, pack: bytes) -> None:
        """Index ``pack`` here, each object checked as ``fsck`` would (``--strict``).

        Raises:
            BadSource: git refused the pack (malformed, or failing the checks).
        """
        if not pack:
            return
        done = subprocess.run(
            ["git", "-c", "core.fsync=objects,derived-metadata", "-c", "core.fsyncMethod=fsync",
             "--git-dir", self.path, "index-pack", "--stdin", "--strict"],
            input=pack, capture_output=True, env=_git_env(), check=False)
        if done.returncode != 0:
            message = done.stderr.decode(errors="replace").strip().splitlines()
            text = "; ".join(message[-3:]) or "git index-pack failed"
            if "did not receive expected object" in text:   # a base, or a referenced object, is not here
                raise IncompleteSource(f"the pushed objects lean on objects this keg lacks: {text}")
            raise BadSource(f"the pushed objects are malformed: {text}")

    def accept(self) -> None:
        """Move the checked pack into the keg (index last, so no reader sees a pack without one)."""
        src = os.path.join(self.path, "objects", "pack")
        dst = os.path.join(self.keg_path, "objects", "pack")
        os.makedirs(dst, exist_ok=True)
        names = sorted(os.listdir(src), key=lambda n: (n.endswith(".idx"), n))
        for name in names:
            os.replace(os.path.join(src, name), os.path.join(dst, name))
        if names:
            fsync_dir(dst)

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _entries(repo: pygit2.Repository, tree: pygit2.Tree, prefix: str = ""):
    for entry in tree:
        path = prefix + entry.name
        yield path, entry
        if entry.filemode == pygit2.enums.FileMode.TREE:
            yield from _entries(repo, repo[entry.id], path + "/")


def _check_symlink(path: str, target: bytes) -> None:
    if len(target) > MAX_SYMLINK_TARGET or b"\0" in target:
        raise BadSource(f"{path}: a symbolic link with an impossible target")
    text = target.decode("utf-8", "replace")
    if text.startswith("/"):
        raise BadSource(f"{path}: a symbolic link to an absolute path ({text}); links must stay in the source")
    stack = path.split("/")[:-1]       # the link's directory
    for part in text.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not stack:
                raise BadSource(f"{path}: a symbolic link that leaves the source ({text})")
            stack.pop()
            continue
        if part.lower().rstrip(". ") == ".git":
            raise BadSource(f"{path}: a symbolic link into .git ({text})")
        stack.append(part)


def check_tree(keg_path: str, commit: str, most_files: int = 100_000) -> str:
    """Check the tree of ``commit`` (see the module text); returns its tree id.

    Raises:
        BadSource: what is wrong, naming the path.
    """
    repo = pygit2.Repository(keg_path)
    try:
        obj = repo[commit]
    except (KeyError, ValueError) as err:
        raise BadSource(f"commit {commit} is not among the pushed objects") from err
    if obj.type != pygit2.enums.ObjectType.COMMIT:
        raise BadSource(f"{commit} is not a commit")
    count = 0
    for path, entry in _entries(repo, obj.tree):
        count += 1
        if count > most_files:
            raise BadSource(f"the source has more than {most_files} files")
        name = path.rsplit("/", 1)[-1]
        folded = name.lower().rstrip(". ")
        if folded == ".git" or folded.startswith("git~"):
            raise BadSource(f"{path}: a path named like .git is not allowed")
        if folded == ".gitmodules" or entry.filemode == pygit2.enums.FileMode.COMMIT:
            raise BadSource(f"{path}: submodules are not supported in pushed sources "
                            "(vendor the code, or import packages with `keg pkg import`)")
        if entry.filemode == pygit2.enums.FileMode.LINK:
            _check_symlink(path, repo[entry.id].data)
    return str(obj.tree_id)


def _update_refs(keg_path: str, commands: list, what: str) -> None:
    """Run ``git update-ref --stdin`` with ``commands`` (one ref transaction: all or none), fsynced."""
    done = subprocess.run(
        ["git", "-c", "core.fsync=reference", "-c", "core.fsyncMethod=fsync", "--git-dir", keg_path,
         "update-ref", "--stdin", "-m", what],
        input="".join(line + "\n" for line in commands).encode(), capture_output=True, env=_git_env(), check=False)
    if done.returncode != 0:
        raise KegError(f"cannot record {what}: {done.stderr.decode(errors='replace').strip()}")


def _refs(keg_path: str, prefix: str) -> list:
    """The names of the refs under ``prefix``."""
    done = subprocess.run(["git", "--git-dir", keg_path, "for-each-ref", "--format=%(refname)", prefix],
                          capture_output=True, env=_git_env(), check=False)
    if done.returncode != 0:
        raise KegError(f"cannot list {prefix}: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout.decode().split()


def source_pointer(op) -> tuple | None:
    """``(app, commit hex)`` when ``op`` points ``/src/<app>`` at a pushed commit, else None."""
    if not isinstance(op, Put) or op.mode != MODE_GITLINK or not op.path.startswith("/src/"):
        return None
    app = op.path[len("/src/"):]
    if "/" in app or len(op.data) != 20:
        return None
    return app, op.data.hex()


def committed(keg_path: str, app: str, commit: str) -> None:
    """Step 4 of the module text: ``/src/<app>`` now names ``commit``; point ``refs/keg/src/<app>`` at it and
    drop its incoming refs, in one ref transaction. The caller makes sure no newer pointer was committed.

    Raises:
        KegError: git could not update the refs (the source stays reachable by its incoming ref).
    """
    incoming = [ref for ref in _refs(keg_path, f"{INCOMING_REFS}{app}/")
                if ref.rpartition("/")[2].startswith(commit + "-")]
    _update_refs(keg_path, [f"update {SRC_REFS}{app} {commit}", *(f"delete {ref}" for ref in incoming)],
                 f"the source of {app}")


@contextlib.contextmanager
def repack_lock(keg_path: str, exclusive: bool):
    """Hold ``keg/repack.lock``: shared while a received pack is moved in and given its ref, exclusive while
    ``Store.compact`` drops refs and runs ``git repack -a -d`` (which deletes the packs it listed at its start,
    keeping only what some ref reaches)."""
    os.makedirs(os.path.join(keg_path, "keg"), exist_ok=True)
    fd = os.open(os.path.join(keg_path, "keg", "repack.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def reconcile(keg_path: str, named: dict) -> int:
    """Point each ``refs/keg/src/<app>`` at the commit ``/src/<app>`` names (``named``: app -> commit hex), where
    the keg holds it and the ref differs: a master that stopped between a pointer's commit and
    :func:`committed`, or whose git failed there, catches up.

    Returns:
        How many refs moved.

    Raises:
        KegError: git could not list or update the refs.
    """
    done = subprocess.run(["git", "--git-dir", keg_path, "for-each-ref", "--format=%(refname) %(objectname)",
                           SRC_REFS], capture_output=True, env=_git_env(), check=False)
    if done.returncode != 0:
        raise KegError(f"cannot list {SRC_REFS}: {done.stderr.decode(errors='replace').strip()}")
    current = dict(line.split(" ", 1) for line in done.stdout.decode().splitlines() if " " in line)
    moved = 0
    for app, commit in sorted(named.items()):
        if current.get(SRC_REFS + app) != commit and has_commit(keg_path, commit):
            committed(keg_path, app, commit)
            moved += 1
    return moved


def prune_incoming(keg_path: str, named=(), ttl: float = INCOMING_TTL) -> int:
    """Drop the incoming refs of received sources at least ``ttl`` seconds old whose pointers never committed
    (a committed one's went at :func:`committed`; one whose commit is in ``named`` is kept all the same), and
    quarantines that old (a receiving process killed mid-way); a repack then drops their objects.

    Returns:
        How many refs were dropped.

    Raises:
        KegError: git could not list or delete the refs.
    """
    cutoff = time.time() - ttl
    keep = set(named)
    old = []
    for ref in _refs(keg_path, INCOMING_REFS):
        commit, _, stamp = ref.rpartition("/")[2].partition("-")
        if stamp.isdigit() and int(stamp) <= cutoff and commit not in keep:
            old.append(ref)
    if old:
        _update_refs(keg_path, [f"delete {ref}" for ref in old], "dropping sources never committed")
    base = os.path.join(keg_path, "keg", "incoming")
    for name in os.listdir(base) if os.path.isdir(base) else ():
        path = os.path.join(base, name)
        with contextlib.suppress(OSError):
            if name.startswith("push-") and os.stat(path).st_mtime <= cutoff:
                shutil.rmtree(path, ignore_errors=True)
    return len(old)


def check_commit(app: str, commit: str) -> None:
    """Raise BadRequest unless ``app`` is an app's name and ``commit`` a commit id (40 lowercase hex digits)."""
    check_app(app)
    if not isinstance(commit, str) or not SHA_RE.match(commit):
        raise BadRequest(f"{commit!r} is not a commit id (40 hex digits)")


def receive(keg_path: str, app: str, commit: str, pack: bytes) -> str:
    """Steps 1 and 2 of the module text; returns the source's tree id. The caller commits the pointer, then
    calls :func:`committed`.

    Raises:
        BadRequest: a bad app name or commit id.
        BadSource: malformed objects, a missing commit, or a source :func:`check_tree` refuses.
    """
    check_commit(app, commit)
    incoming = Incoming(keg_path)
    try:
        incoming.index(pack)
        tree = check_tree(incoming.path, commit)
        missing = subprocess.run(["git", "--git-dir", incoming.path, "rev-list", "--objects", "--quiet", commit],
                                 capture_output=True, env=_git_env(), check=False)
        if missing.returncode != 0:
            raise IncompleteSource(f"the objects of commit {commit} are incomplete: send everything the keg lacks")
        with repack_lock(keg_path, exclusive=False):   # a repack -a -d must not see the pack without its ref
            incoming.accept()
            _update_refs(keg_path, [f"update {INCOMING_REFS}{app}/{commit}-{int(time.time())} {commit}"],
                         f"a push of {app}")
    finally:
        incoming.close()
    return tree


def has_commit(keg_path: str, commit: str) -> bool:
    """Whether the keg holds commit ``commit`` (40 hex digits) itself; its history is not checked."""
    if not SHA_RE.match(commit):
        return False
    done = subprocess.run(["git", "--git-dir", keg_path, "cat-file", "-e", f"{commit}^{{commit}}"],
                          capture_output=True, env=_git_env(), check=False)
    return done.returncode == 0


def pack_of(keg_path: str, commit: str) -> bytes:
    """A pack of ``commit`` and everything it reaches: all a keg lacking the whole source needs.

    Raises:
        BadRequest: ``commit`` is not 40 hex digits.
        BadSource: the keg does not hold the commit and its history.
    """
    if not SHA_RE.match(commit):
        raise BadRequest(f"{commit!r} is not a commit id (40 hex digits)")
    argv, env = pack_command(keg_path)
    done = subprocess.run(argv, input=f"{commit}\n".encode(), capture_output=True, env=env, check=False)
    if done.returncode != 0:
        raise BadSource(f"this keg cannot pack commit {commit}: "
                        f"{done.stderr.decode(errors='replace').strip()[-300:]}")
    return done.stdout


def pack_command(keg_path: str) -> tuple:
    """``(argv, env)`` of the git command that writes to its output a pack of the commits named on its input,
    one per line, and everything they reach (``pack_of`` runs it; a server may stream it instead)."""
    return ["git", "--git-dir", keg_path, "pack-objects", "--stdout", "--revs", "--quiet"], _git_env()
