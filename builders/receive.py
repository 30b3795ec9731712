"""The pre-receive hook of every app push: source into the keg, then the build shown live, as on Heroku.

git runs it (``python -m builders.receive``) inside ``git receive-pack`` after the
pushed objects arrived and before any ref moves; what it prints reaches the
pushing terminal as ``remote:`` lines, and a non-zero exit makes the push fail
(``! [remote rejected] main -> main (pre-receive hook declined)``) with the
app's release unchanged.

1. Only ``main`` or ``master`` is deployed; deleting it is refused.
2. The objects the keg lacks are packed (``git pack-objects``) and sent to the
   master (``POST /v1/src/<app>``), which checks them, stores them and commits the
   pointer ``/src/<app>`` — compared with the pointer this push started from.
3. The builder notices the new source; this hook follows ``/builds/<app>/<KID>/``:
   it prints the build log as it grows and, at the end, the release number and
   where the app answers, or the failure and the log's tail.

The master gives the hook, through its environment, a grant that lets it act
for the pusher for this push only: send this app's source, and read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from builders.releases import wait_serving
from keg.errors import KegError, NotFound

ZERO = "0" * 40
DEPLOYED_BRANCHES = ("refs/heads/main", "refs/heads/master")
BUILD_WAIT = float(os.environ.get("KEG_BUILD_WAIT", 30 * 60.0))       # the longest a push waits for its build
START_WAIT = float(os.environ.get("KEG_BUILD_START_WAIT", 60.0))     # … for a builder to pick the source up
POLL = 0.25
LAUNCH_WAIT = float(os.environ.get("KEG_LAUNCH_WAIT", 120.0))      # … for the release to serve


def say(text: str = "") -> None:
    """One line to the pushing terminal (git prefixes it with ``remote:``)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def fail(text: str) -> int:
    say(f" !     {text}")
    return 1


def _git(*args: str, data: bytes | None = None) -> bytes:
    done = subprocess.run(["git", *args], input=data, capture_output=True, check=False)
    if done.returncode != 0:
        raise KegError(f"git {args[0]} failed: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


def pack_of(commit: str) -> bytes:
    """A pack of everything ``commit`` reaches that this receiving repository's refs do not.

    Every ref here moved only after the keg had the objects it names, so the
    keg has what they reach.
    """
    have = _git("for-each-ref", "--format=%(objectname)").split()
    revs = commit.encode() + b"\n" + b"".join(b"^" + h + b"\n" for h in have)
    return _git("pack-objects", "--revs", "--stdout", "--quiet", data=revs)


def read_updates(text: str) -> list:
    """``[(old, new, ref)]`` from the hook's standard input."""
    updates = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 3:
            updates.append(tuple(fields))
    return updates


class Follower:
    """Prints ``/builds/<app>/<KID>/log.txt`` as it grows; knows when ``result.json`` is there."""

    def __init__(self, keg, app: str, source_kid: str):
        self.keg, self.base = keg, f"/builds/{app}/{source_kid}"
        self.printed = 0
        self.partial = b""

    def _print_new(self) -> bool:
        try:
            log = self.keg.read(self.base + "/log.txt")
        except NotFound:
            return False
        new = log[self.printed:]
        self.printed = len(log)
        data = self.partial + new
        lines = data.split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            say(line.decode("utf-8", "replace").rstrip("\r"))
        return True

    def result(self):
        try:
            return json.loads(self.keg.read(self.base + "/result.json"))
        except NotFound:
            return None

    def follow(self, started_wait: float = START_WAIT, build_wait: float = BUILD_WAIT):
        """The build's result object, printing the log meanwhile; None when no builder took it up in time."""
        begun = time.monotonic()
        seen_log = False
        while True:
            seen_log = self._print_new() or seen_log
            result = self.result()
            if result is not None:
                self._print_new()
                if self.partial:
                    say(self.partial.decode("utf-8", "replace"))
                    self.partial = b""
                return result
            waited = time.monotonic() - begun
            if not seen_log and waited > started_wait:
                return None
            if waited > build_wait:
                return {"ok": False, "error": f"the build did not finish within {build_wait / 60:.0f} minutes"}
            time.sleep(POLL)


def _where(keg, app: str) -> str | None:
    """Where the app answers, from ``/policy/router.json`` ({"url", "domain"}) if the cluster has a router."""
    try:
        router = json.loads(keg.read("/policy/router.json"))
    except (NotFound, ValueError):
        return None
    if not isinstance(router, dict):
        return None
    url, domain = router.get("url"), router.get("domain")
    if domain and url:
        scheme, _, rest = str(url).partition("://")
        port = rest.rsplit(":", 1)[1].strip("/") if ":" in rest else ""
        return f"{scheme}://{app}.{domain}{':' + port if port else ''}/  (or {str(url).rstrip('/')}/{app}/)"
    return f"{str(url).rstrip('/')}/{app}/" if url else None


def main() -> int:
    from master.client import RemoteKeg

    app = os.environ.get("KEG_APP", "")
    url, token = os.environ.get("KEG_PUSH_URL"), os.environ.get("KEG_PUSH_TOKEN")
    if not (app and url and token):
        return fail("this hook runs only inside a push to a Keg master")
    updates = read_updates(sys.stdin.read())
    deployed = [u for u in updates if u[2] in DEPLOYED_BRANCHES]
    for old, new, ref in updates:
        if ref not in DEPLOYED_BRANCHES:
            return fail(f"Keg deploys the branch main (or master); you pushed {ref}. "
                        f"Push with: git push keg {ref.rsplit('/', 1)[-1]}:main")
        if new == ZERO:
            return fail(f"deleting {ref} is not allowed: an app's source stays (use `keg apps destroy`)")
    if len(deployed) != 1:
        return fail("push one branch: main (or master)")
    _old, commit, ref = deployed[0]
    keg = RemoteKeg(url, token, timeout=60.0)
    say(f"-----> Receiving {app} ({ref.rsplit('/', 1)[-1]} {commit[:12]})")
    try:
        try:
            entry = keg.stat(f"/src/{app}")
            previous = entry.kid if entry.kind == "pointer" else None
        except NotFound:
            previous = None
        source_kid = "K-" + commit
        if previous == source_kid:
            say("       this commit is the app's source already")
        else:
            result = keg.send_source(app, commit, pack_of(commit), previous)
            if not result.ok:
                return fail(f"another push of {app} landed meanwhile ({result.error}); fetch and push again")
        say(f"       source {source_kid}")
        follower = Follower(keg, app, source_kid)
        outcome = follower.follow()
        if outcome is None:
            return fail(f"no builder took the build up within {START_WAIT:g} s: is `keg builder run` running "
                        "(`keg up` starts one)?")
        if not outcome.get("ok"):
            say()
            return fail(f"build failed: {outcome.get('error') or 'see the log above'}; "
                        f"{app} keeps its current release")
        if outcome.get("cached"):
            say(f"-----> Cache hit: the same inputs were built before ({outcome.get('cached_from', 'an earlier build')})")
        release = outcome.get("release")
        say(f"-----> Released v{release}" if release else "-----> Built")
        if release and outcome.get("processes", {}).get("web"):
            say("-----> Launching…")
            if wait_serving(keg, app, {"number": release, "processes": outcome["processes"]}, LAUNCH_WAIT):
                say(f"       v{release} is serving")
            else:
                say(f"       v{release} is not serving after {LAUNCH_WAIT:g} s: see `keg ps` and `keg job ls`")
        where = _where(keg, app) if outcome.get("processes", {}).get("web") else None  # only web answers HTTP
        if where:
            say(f"       {where}")
        return 0
    except KegError as err:
        return fail(str(err))
    finally:
        keg.close()


if __name__ == "__main__":
    sys.exit(main())
