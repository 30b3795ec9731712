"""The builder: a policy process that turns new sources into images and releases (DESIGN §6).

``keg builder run`` watches ``/src/``. For each app whose pointer names a
source without a result in ``/builds/<app>/<source KID>/``, it:

1. fetches the source commit with git from the master (``refs/keg/src/<app>``
   of ``/git/keg.git``) and checks its tree out into a scratch directory;
2. works out the build's inputs — kind, base image KID, the KID of
   ``/pkgs/pypi`` — and their key: blake3 of the source *tree* and those. When
   ``/builds/_cache/<key>.json`` names an image that is still there, the build
   is a cache hit: the same image is released again, nothing is built;
3. otherwise runs the build (``builders.build``) in a container with no
   network, the source and packages read-only, publishing its output to
   ``/builds/<app>/<source KID>/log.txt`` about twice a second (the push hook
   prints it to the pushing terminal);
4. in one transaction writes ``result.json``, the cache entry, and the new
   release with its jobs (``builders.releases``). A failed build writes
   ``result.json`` with the error and leaves the app's release alone.

Builds run one at a time, in the builder's own single-threaded loop; to
build more at once, run more builders (each takes a source only after
writing ``/builds/<app>/<source KID>/builder.json`` with a compare that
no one else did).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
import time

import blake3

from keg import paths
from keg.errors import CompareFailed, KegError, NotFound
from keg.gitenv import git_http_env
from keg.transaction import Author, Transaction, compare, put
from builders import releases

LOG_PUBLISH_SECONDS = 0.5
WATCH_SECONDS = 2.0   # the longest the loop waits for a change under /src before looking anyway
FETCH_DELAYS = (0.5, 1.0, 2.0, 4.0)   # a source not on the master asked yet is fetched again after these
CACHE_DIR = "/builds/_cache"
CACHE_VERSION = "keg-build-1"


@dataclasses.dataclass
class Job:
    """One source to build."""

    app: str
    source_kid: str     # the pointer's KID: "K-" + the commit id

    @property
    def base(self) -> str:
        return f"/builds/{self.app}/{self.source_kid}"

    @property
    def commit(self) -> str:
        return self.source_kid[2:]


class LogSink:
    """The build's output, published to ``log.txt`` at most every ``LOG_PUBLISH_SECONDS``."""

    def __init__(self, keg, path: str, echo=None):
        self.keg, self.path, self.echo = keg, path, echo
        self.data = bytearray()
        self.published = 0
        self.last = 0.0

    def __call__(self, data: bytes) -> None:
        if not data:
            return
        self.data += data
        if self.echo is not None:
            self.echo(data)
        if time.monotonic() - self.last >= LOG_PUBLISH_SECONDS:
            self.flush()

    def line(self, text: str) -> None:
        self((text + "\n").encode())

    def flush(self) -> None:
        if len(self.data) == self.published:
            return
        self.last = time.monotonic()
        result = self.keg.apply(Transaction((put(self.path, bytes(self.data)),)))
        if result.ok:
            self.published = len(self.data)

    def ops(self) -> list:
        return [put(self.path, bytes(self.data))]


def _author_name(text: str) -> str:
    return (text or "keg").split(" <", 1)[0].strip() or "keg"


class Builder:
    """Builds sources as they are pushed.

    Args:
        keg: a ``RemoteKeg`` (or a local ``Store``).
        name: this builder's name (containers are ``build-<name>.…``).
        data_dir: its own state: the source cache repository, scratch space, the runtime's files.
        runtime: a ``mayor.runc_runtime.RuncRuntime`` (or anything with its interface) for the build containers.
        git_url: ``http://host:port`` (or ``https://``) of the master to fetch sources from (None: ``keg.path`` is a local keg).
        token: the token for git fetch.
        say: where progress lines go (the builder's own log).
    """

    def __init__(self, keg, name: str, data_dir: str, runtime, git_url: str | None = None, token: str | None = None,
                 say=None):
        self.keg, self.name, self.runtime = keg, name, runtime
        self.data_dir = os.path.abspath(data_dir)
        self.git_url, self.token = git_url, token
        self.say = say or (lambda text: None)
        self.cache_repo = os.path.join(self.data_dir, "sources.git")
        self.scratch = os.path.join(self.data_dir, "work")
        os.makedirs(self.scratch, mode=0o711, exist_ok=True)
        if not os.path.isdir(self.cache_repo):
            subprocess.run(["git", "init", "--quiet", "--bare", self.cache_repo], check=True, env=self._env())

    # ------------------------------------------------------------------ what to do

    def pending(self) -> list:
        """Sources under ``/src`` without a result yet, oldest app name first."""
        try:
            entries = self.keg.list("/src")
        except NotFound:
            return []
        jobs = []
        for entry in entries:
            if entry.kind != "pointer":
                continue
            job = Job(entry.name, entry.kid)
            if not self.keg.exists(job.base + "/result.json"):
                jobs.append(job)
        return jobs

    def claim(self, job: Job) -> bool:
        """Write ``builder.json`` for ``job`` unless another builder has; True when this one builds it."""
        body = json.dumps({"builder": self.name, "started": time.time()}) + "\n"
        result = self.keg.apply(Transaction((put(job.base + "/builder.json", body),),
                                            (compare(job.base + "/builder.json", None),)))
        if result.ok:
            return True
        if isinstance(result.error, CompareFailed):
            try:
                owner = json.loads(self.keg.read(job.base + "/builder.json")).get("builder")
            except (NotFound, ValueError, AttributeError):
                owner = None
            return owner == self.name     # this builder's own claim, from before a restart
        raise result.error

    # ------------------------------------------------------------------ source

    def _env(self) -> dict:
        return git_http_env(self.token)

    def checkout(self, job: Job, directory: str) -> str:
        """Fetch the source commit and write its tree to ``directory``; returns the tree id.

        Raises:
            KegError: the source could not be fetched (after ``FETCH_DELAYS``) or checked out.
        """
        tree = self._fetch_source(job)
        os.makedirs(directory, exist_ok=True)
        env = dict(self._env(), GIT_INDEX_FILE=os.path.join(os.path.dirname(directory), "index"))
        for args in (["read-tree", job.commit], ["checkout-index", "--all", "--force"]):
            done = subprocess.run(["git", "--git-dir", self.cache_repo, "--work-tree", directory, *args],
                                  capture_output=True, env=env, check=False)
            if done.returncode != 0:
                raise KegError(f"cannot check out {job.source_kid}: {done.stderr.decode(errors='replace').strip()}")
        return tree

    def _fetch_source(self, job: Job) -> str:
        """Fetch ``refs/keg/src/<app>`` until it holds the job's commit; returns the commit's tree id.

        On a Raft master the replica asked may not hold a source the others
        committed yet (it fetches it in the background): a fetch that fails,
        or brings an older commit, is tried again after each of ``FETCH_DELAYS``.
        """
        remote = f"{self.git_url.rstrip('/')}/git/keg.git" if self.git_url else self.keg.path
        ref = f"refs/keg/src/{job.app}"
        tree = self._tree_of(job.commit)
        for delay in (*FETCH_DELAYS, None):
            if tree is not None:
                return tree
            done = subprocess.run(["git", "--git-dir", self.cache_repo, "fetch", "--quiet", "--no-tags",
                                   "--no-write-fetch-head", remote, f"+{ref}:{ref}"],
                                  capture_output=True, env=self._env(), check=False)
            tree = self._tree_of(job.commit) if done.returncode == 0 else None
            if tree is not None:
                return tree
            why = (f"cannot fetch the source of {job.app}: {done.stderr.decode(errors='replace').strip()}"
                   if done.returncode != 0 else
                   f"the source {job.source_kid} of {job.app} is not in {ref} (pushed again meanwhile?)")
            if delay is None:
                raise KegError(why)
            self.say(f"{why}; trying again in {delay:g} s")
            time.sleep(delay)
        raise KegError(f"no fetch of the source of {job.app} was tried")

    def _tree_of(self, commit: str) -> str | None:
        """The tree id of ``commit`` if the source cache holds it."""
        done = subprocess.run(["git", "--git-dir", self.cache_repo, "rev-parse", "--verify", "--quiet",
                               commit + "^{tree}"], capture_output=True, env=self._env(), check=False)
        return done.stdout.decode().strip() if done.returncode == 0 else None

    def pusher(self, job: Job) -> Author:
        """Who pushed the source: the author of the revision that set ``/src/<app>``."""
        try:
            entries = self.keg.log(f"/src/{job.app}", limit=1)
        except KegError:
            entries = []
        if not entries:
            return Author()
        first = entries[0]
        revision = first[0] if isinstance(first, tuple) else first
        name = _author_name(getattr(revision, "author", ""))
        return Author(name, f"{name}@keg")

    # ------------------------------------------------------------------ building

    @staticmethod
    def cache_key(tree: str, inputs: dict) -> str:
        text = json.dumps({"v": CACHE_VERSION, "tree": tree, **inputs}, sort_keys=True)
        return blake3.blake3(text.encode()).hexdigest()[:40]

    def _cached(self, key: str):
        try:
            entry = json.loads(self.keg.read(f"{CACHE_DIR}/{key}.json"))
            if self.keg.stat(paths.normalize(entry["image_path"])).kid != entry["image"]:
                return None      # the image was replaced or removed since
            return entry
        except (NotFound, ValueError, KeyError, TypeError):
            return None

    def build(self, job: Job) -> dict:
        """Build ``job`` and release it; returns what ``result.json`` says."""
        from builders import build as buildlib

        began = time.monotonic()
        sink = LogSink(self.keg, job.base + "/log.txt")
        author = self.pusher(job)
        work = tempfile.mkdtemp(prefix=f"{job.app}.", dir=self.scratch)
        os.chmod(work, 0o711)
        result = {"ok": False, "app": job.app, "source": job.source_kid, "builder": self.name}
        try:
            sink.line(f"-----> Building {job.app} {job.source_kid[:14]} on builder {self.name}")
            sink.flush()
            source_dir = os.path.join(work, "src")
            checkout_began = time.monotonic()
            tree = self.checkout(job, source_dir)
            result["checkout_seconds"] = round(time.monotonic() - checkout_began, 3)
            inputs = buildlib.inputs(self.keg, source_dir)
            key = self.cache_key(tree, inputs)
            result.update({"tree": "K-" + tree, "inputs": inputs, "key": key})
            cached = self._cached(key)
            if cached is not None:
                sink.line(f"-----> Cache hit: {cached.get('kind', 'the')} build of tree K-{tree[:12]} "
                          f"with the same base and packages made image {cached['image'][:14]}")
                result.update({"cached": True, "cached_from": cached.get("source"), "image": cached["image"],
                               "image_path": cached["image_path"], "processes": cached["processes"],
                               "kind": cached.get("kind")})
            else:
                build_began = time.monotonic()
                output = buildlib.build(self.keg, self.runtime, job.app, source_dir, job.source_kid,
                                        os.path.join(work, "build"), sink)
                result["build_seconds"] = round(time.monotonic() - build_began, 3)  # bench/deploy.py reads it
                result.update({"cached": False, "image": output.image_kid, "image_path": output.image_path,
                               "processes": output.processes, "kind": output.kind, "base": output.base_kid})
            result["ok"] = True
        except KegError as err:
            result["error"] = str(err)
            sink.line(f" !     {err}")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        result["seconds"] = round(time.monotonic() - began, 3)
        return self._finish(job, result, sink, author)

    def _finish(self, job: Job, result: dict, sink: LogSink, author: Author) -> dict:
        if result["ok"]:
            sink.line(f"-----> Image {result['image'][:14]}; processes: {', '.join(sorted(result['processes']))}")
            cache_entry = {k: result.get(k) for k in ("image", "image_path", "processes", "kind")}
            cache_entry["source"] = job.source_kid
            result_ops = [put(f"{CACHE_DIR}/{result['key']}.json", json.dumps(cache_entry, indent=2) + "\n")]

            def ops_with(number: int) -> list:
                body = dict(result, release=number)
                return [*result_ops, *sink.ops(), put(job.base + "/result.json", json.dumps(body, indent=2) + "\n")]
            try:
                rel = releases.new_release(
                    self.keg, job.app, image=result["image"], image_path=result["image_path"],
                    source=job.source_kid, processes=result["processes"], author=author,
                    description=f"Build of {job.source_kid[:14]}" + (" (cache hit)" if result.get("cached") else ""),
                    extra_ops=ops_with)
                result["release"] = rel["number"]
                self.say(f"keg builder: {job.app} {job.source_kid[:14]} released as v{rel['number']}")
                return result
            except KegError as err:
                result.update({"ok": False, "error": f"the build succeeded but the release failed: {err}"})
                sink.line(f" !     {result['error']}")
        self.say(f"keg builder: {job.app} {job.source_kid[:14]} failed: {result.get('error')}")
        ops = [*sink.ops(), put(job.base + "/result.json", json.dumps(result, indent=2) + "\n")]
        done = self.keg.apply(Transaction(tuple(ops), (), author))
        if not done.ok:
            raise done.error
        return result

    # ------------------------------------------------------------------ loop

    def step(self) -> list:
        """Build every pending source once; returns their results."""
        results = []
        for job in self.pending():
            if self.claim(job):
                results.append(self.build(job))
        return results

    def run(self, stop) -> None:
        """Build until ``stop`` (a ``threading.Event``) is set: on every change under ``/src``, and every few seconds."""
        while not stop.is_set():
            try:
                head = self.keg.revision().number
                self.step()
                for _event in self.keg.watch("/src", since=head, timeout=WATCH_SECONDS):
                    break
            except KegError as err:
                self.say(f"keg builder: {err}; trying again")
                stop.wait(2.0)
