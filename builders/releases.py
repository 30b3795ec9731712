"""Releases: ``/apps/<app>/app.json`` and the jobs that deploy the current one (docs/namespace.md).

A release is an image plus config, numbered from 1 and never changed once
written. Every change that should run something new makes a new release: a
successful build, ``keg config set``, ``keg rollback`` (a new release with an
old one's image and config, as on Heroku). Deploying release N is one
transaction: ``app.json`` (compared with what was read) and one job per
process type, ``/jobs/<app>-<type>.json``; jobs of types the release no longer
has are removed. Fields of a job that releases do not own (replicas,
resources, constraints, health, update…) are kept.
"""

from __future__ import annotations

import datetime
import json
import re

import kid as kidlib
from keg.errors import BadRequest, CompareFailed, KegError, NotFound
from keg.paths import check_app
from keg.transaction import Author, Transaction, compare, delete, put

TYPE_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
CONFIG_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RESERVED_CONFIG = ("PORT",)
RELEASE_FIELDS = ("app", "type", "release", "image", "args", "env", "cwd", "port", "service", "network")


class NoSuchApp(NotFound):
    """The app has never been pushed."""


def app_path(app: str) -> str:
    return f"/apps/{check_app(app)}/app.json"


def job_name(app: str, kind: str) -> str:
    return f"{app}-{kind}"


def _kid_of(data: bytes) -> str:
    import pygit2  # here: the push hook imports this module and should start fast
    return str(kidlib.from_oid(pygit2.hash(data)))


def now_text() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_app(keg, app: str, must_exist: bool = True):
    """``(app object, its KID)``; ``({...new...}, None)`` for an app never released when not ``must_exist``."""
    path = app_path(app)
    try:
        data = keg.read(path)
    except NotFound:
        if must_exist:
            raise NoSuchApp(f"no app {app}: push it first (git push keg main)") from None
        return {"name": app, "current": None, "config": {}, "releases": []}, None
    try:
        obj = json.loads(data)
    except ValueError as err:
        raise KegError(f"{path} is not JSON ({err}); fix it with keg put") from err
    if not isinstance(obj, dict):
        raise KegError(f"{path} is not a JSON object")
    obj.setdefault("releases", [])
    obj.setdefault("config", {})
    return obj, _kid_of(data)


def release(obj: dict, number) -> dict:
    """Release ``number`` of an app object (``None``: the current one)."""
    number = obj.get("current") if number is None else number
    for r in obj.get("releases") or ():
        if r.get("number") == number:
            return r
    raise NotFound(f"app {obj.get('name')} has no release {number}"
                   + (f"; releases are 1..{len(obj['releases'])}" if obj.get("releases") else ""))


def check_processes(processes) -> dict:
    if not isinstance(processes, dict) or not processes:
        raise BadRequest("a release needs at least one process type (a Procfile line such as 'web: python3 app.py')")
    for name, command in processes.items():
        if not isinstance(name, str) or not TYPE_RE.match(name):
            raise BadRequest(f"process type {name!r}: use lowercase letters, digits and '-'")
        if not isinstance(command, str) or not command.strip():
            raise BadRequest(f"process type {name}: the command is empty")
    return processes


def check_config(config) -> dict:
    if not isinstance(config, dict):
        raise BadRequest("config must be an object of NAME: value")
    for key, value in config.items():
        if not isinstance(key, str) or not CONFIG_KEY_RE.match(key):
            raise BadRequest(f"config key {key!r} is not an environment variable name")
        if key in RESERVED_CONFIG:
            raise BadRequest(f"config key {key} is set by Keg for each process")
        if not isinstance(value, str) or "\0" in value:
            raise BadRequest(f"config {key}: the value must be text")
    return config


def job_for(app: str, kind: str, command: str, rel: dict, old_job: dict | None) -> dict:
    """The job of process type ``kind`` in release ``rel``, keeping what people set on ``old_job``."""
    job = dict(old_job or {})
    for field in RELEASE_FIELDS:
        job.pop(field, None)
    job.setdefault("replicas", 1)
    job.update({"app": app, "type": kind, "release": rel["number"], "image": rel["image"],
                # exec: the command replaces the shell, so it gets SIGTERM (a shell as PID 1 ignores it and
                # every stop would wait for the SIGKILL after the grace period)
                "args": ["/bin/sh", "-c", "exec " + command], "env": dict(rel.get("config") or {}), "cwd": "/app",
                "network": "host"})
    if kind == "web":
        job.update({"port": True, "service": app})
    return job


def deploy_ops(keg, app: str, obj: dict, obj_kid: str | None, rel: dict) -> tuple:
    """``(ops, compares)`` writing ``obj`` (with ``rel`` current) and the jobs of ``rel``."""
    obj = dict(obj)
    obj["current"] = rel["number"]
    ops = [put(app_path(app), json.dumps(obj, indent=2) + "\n")]
    compares = [compare(app_path(app), obj_kid)]
    wanted = {job_name(app, kind): (kind, command) for kind, command in rel["processes"].items()}
    for name, (kind, command) in sorted(wanted.items()):
        path = f"/jobs/{name}.json"
        try:
            data = keg.read(path)
            old_job, old_kid = json.loads(data), _kid_of(data)
            if not isinstance(old_job, dict):
                old_job = None
        except NotFound:
            old_job, old_kid = None, None
        except ValueError:
            old_job, old_kid = None, _kid_of(data)
        ops.append(put(path, json.dumps(job_for(app, kind, command, rel, old_job), indent=2) + "\n"))
        compares.append(compare(path, old_kid))
    try:
        existing = keg.list("/jobs")
    except NotFound:
        existing = []
    for entry in existing:
        name = entry.name[:-5] if entry.name.endswith(".json") else None
        if name and name.startswith(app + "-") and name not in wanted:
            try:
                job = json.loads(keg.read(entry.path))
            except (NotFound, ValueError):
                continue
            if isinstance(job, dict) and job.get("app") == app:
                ops.append(delete(entry.path))
    return ops, compares


def _apply(keg, ops, compares, author) -> int:
    result = keg.apply(Transaction(tuple(ops), tuple(compares), author or Author()))
    if not result.ok:
        raise result.error
    return result.revision


def new_release(keg, app: str, *, image: str, image_path: str | None, source: str | None, processes: dict,
                description: str, author: Author | None = None, config=None, extra_ops=(), retries: int = 5) -> dict:
    """Write release N+1 of ``app`` and deploy it; returns the release.

    ``config`` None keeps the current config. ``extra_ops`` go into the same
    transaction (the builder's result and cache entry): a list, or a function
    of the release number returning one. A concurrent change
    of ``app.json`` or a job makes it read again and retry.
    """
    check_processes(processes)
    for _ in range(retries):
        obj, obj_kid = read_app(keg, app, must_exist=False)
        if obj_kid is None and author is not None:
            obj["owner"] = author.name
        number = max((r.get("number", 0) for r in obj["releases"]), default=0) + 1
        rel = {"number": number, "source": source, "image": image, "image_path": image_path,
               "config": check_config(dict(obj["config"] if config is None else config)),
               "processes": processes, "author": (author or Author()).name, "time": now_text(),
               "description": description}
        obj["releases"] = [*obj["releases"], rel]
        obj["config"] = rel["config"]
        ops, compares = deploy_ops(keg, app, obj, obj_kid, rel)
        try:
            extra = extra_ops(number) if callable(extra_ops) else extra_ops
            _apply(keg, [*ops, *extra], compares, author)
            return rel
        except CompareFailed:
            continue
    raise KegError(f"app {app} kept changing while a release was being written; try again")


def rollback(keg, app: str, to: int | None = None, author: Author | None = None) -> dict:
    """A new release with the image, processes and config of release ``to`` (default: the one before current)."""
    obj, _ = read_app(keg, app)
    current = obj.get("current")
    if to is None:
        earlier = [r["number"] for r in obj["releases"] if r.get("number", 0) < (current or 0)]
        if not earlier:
            raise BadRequest(f"app {app} has no release before v{current} to roll back to")
        to = max(earlier)
    old = release(obj, to)
    return new_release(keg, app, image=old["image"], image_path=old.get("image_path"), source=old.get("source"),
                       processes=old["processes"], config=old.get("config") or {},
                       description=f"Rollback to v{to}", author=author)


def set_config(keg, app: str, changes: dict, unset=(), author: Author | None = None) -> dict:
    """A new release of the current image with config changed (``changes`` set, ``unset`` removed)."""
    obj, _ = read_app(keg, app)
    if obj.get("current") is None:
        raise BadRequest(f"app {app} has no release yet: push it first")
    config = dict(obj.get("config") or {})
    config.update(check_config(dict(changes)))
    for key in unset:
        if key not in config:
            raise NotFound(f"{app} has no config {key}")
        config.pop(key)
    cur = release(obj, None)
    words = [f"set {', '.join(sorted(changes))}"] if changes else []
    words += [f"unset {', '.join(sorted(unset))}"] if unset else []
    return new_release(keg, app, image=cur["image"], image_path=cur.get("image_path"), source=cur.get("source"),
                       processes=cur["processes"], config=config, description="Config: " + "; ".join(words),
                       author=author)


def serving(keg, app: str, number: int) -> bool:
    """True when ``/services/<app>.tsv`` lists healthy replicas of release ``number`` and of no other release."""
    try:
        text = keg.read(f"/services/{app}.tsv").decode("utf-8", "replace")
    except NotFound:
        return False
    releases_seen = set()
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) >= 7 and fields[4] == "healthy":
            releases_seen.add(fields[6])
    return releases_seen == {str(number)}


def wait_serving(keg, app: str, rel: dict, timeout: float = 120.0, settle: float = 1.0) -> bool:
    """Wait until release ``rel`` alone serves ``app`` (when it has a web process); False on timeout.

    ``settle``: seconds more for routers to load the new endpoints (they follow ``/services`` by watch).
    """
    import time

    if "web" not in (rel.get("processes") or {}):
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if serving(keg, app, rel["number"]):
            time.sleep(settle)
            return True
        time.sleep(0.2)
    return False

