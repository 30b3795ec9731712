"""A pushed source's slow work, in a child process, so the master's event loop keeps serving (DESIGN §1.5).

Checking and storing a pushed pack (``keg.sources.receive``: ``index-pack
--strict``, the tree checks) takes as long as the pack is big, and on a Raft
replica so does sending it to the other replicas (``master/raft_sources.py``,
each answer allowed 30 s), or fetching one this replica missed from them. The event loop that would wait for them also
serves every other request and, on a Raft replica, drives Raft itself: a
push held there would stall writes and heartbeats, and could start an
election. So the master runs that work as ``python -m master.source_job``:
the pack on its standard input, its orders on the command line (the peer
token in the environment), and one JSON object on its standard output::

    {"tree": TREE, "down": [...]}                       stored (on a majority)
    {"error": MESSAGE, "kind": "BadSource", "down": [...]}   refused, or no majority

With ``--fetch-from`` the child reads no pack: it asks those replicas in turn
for the commit's whole pack (``GET /v1/raft/sources/<app>?commit=SHA``) and
stores the first one that passes the checks (``"from"`` names its replica).

``down`` lists the replicas that could not be reached, for the master to
leave alone for a moment. The event loop watches the child's output
(``JobResponse``) and answers the request when it is done; a threaded
server (FastCGI) simply waits. A child whose client went away is left to
finish: what it stored is kept by an incoming ref, as for a refused push.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile

from keg import sources
from keg.errors import BadRequest, KegBusy, KegError
from keg.fsio import read_ready
from master.bodies import Then

TOKEN_ENV = "KEG_PEER_TOKEN"
MAX_JOBS = 4   # sources stored at once; one more push is refused with 503 ("push again")
ERRORS = {cls.__name__: cls for cls in (sources.IncompleteSource, sources.BadSource, BadRequest, KegBusy)}

log = logging.getLogger("keg.master")
_running: list = []   # the jobs whose children have not been reaped, abandoned ones included


class SourceJob:
    """One child process storing a pushed source; ``result`` (the child's JSON object) once it has exited.

    Args:
        keg_path: the keg.
        app: the app's name.
        commit: the pushed commit (40 hex digits).
        pack: the objects the push sent.
        peers: on a Raft replica, ``[(Raft address, HTTP URL), …]`` of the other replicas to send it to, in
            order (the leader first); empty to store it here only.
        majority: how many replicas, this one included, must hold it.
        replicas: how many replicas the cluster has (for the message when there is no majority).
        token: the peer token for ``peers`` and ``fetch_from``.
        fetch_from: ``[(Raft address, HTTP URL), …]`` to fetch the source from, in order, instead of storing
            ``pack`` (which is then empty): a replica that missed it.
    """

    def __init__(self, keg_path: str, app: str, commit: str, pack: bytes, peers=(), majority: int = 1,
                 replicas: int = 1, token: str = "", fetch_from=()):
        _running[:] = [job for job in _running if job.proc.poll() is None]   # reap the finished
        if len(_running) >= MAX_JOBS:
            raise KegBusy(f"{len(_running)} pushed sources are being stored; push again in a moment")
        # -P: the master's working directory (a keg's, with its keg/ directory) must not shadow the packages.
        argv = [sys.executable, "-P", "-m", "master.source_job", "--keg", keg_path, "--app", app,
                "--commit", commit, "--majority", str(majority), "--replicas", str(replicas)]
        for address, url in peers:
            argv += ["--peer", f"{address}={url}"]
        for address, url in fetch_from:
            argv += ["--fetch-from", f"{address}={url}"]
        env = dict(os.environ, **{TOKEN_ENV: token})
        try:
            self.errors = tempfile.TemporaryFile()
            with tempfile.TemporaryFile() as stdin:
                stdin.write(pack)
                stdin.seek(0)
                # A session of its own: kill() stops its git commands too.
                self.proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=self.errors,
                                             env=env, start_new_session=True)
        except OSError as err:
            raise KegBusy(f"cannot start storing the pushed source of {app}: {err}; push again") from err
        _running.append(self)
        self.app = app
        self.output = b""
        self.result: dict | None = None

    def fileno(self) -> int:
        """The child's standard output, to watch for readability."""
        return self.proc.stdout.fileno()

    def read_some(self) -> bool:
        """Read what the child wrote, without blocking; True once it closed its output (then ``finish``)."""
        os.set_blocking(self.fileno(), False)
        data, ended = read_ready(self.fileno())
        self.output += data
        return ended

    def wait(self) -> dict:
        """Block until the child has finished; its result."""
        self.output += self.proc.stdout.read()
        self.finish()
        return self.result

    def finish(self) -> None:
        """Reap the child that closed its output and set ``result`` (an error if it wrote none)."""
        self.proc.stdout.close()
        code = self.proc.wait()
        try:
            self.result = json.loads(self.output)
        except ValueError:
            self.errors.seek(0)
            why = self.errors.read()[-2000:].decode(errors="replace").strip()
            log.warning("master: the source job of %s failed (exit status %s): %s", self.app, code,
                        why or "no output")
            self.result = {"error": f"storing the source of {self.app} failed (exit status {code}); "
                                    "the master's log says why", "kind": "KegError", "down": []}
        self.errors.close()

    def tree(self) -> str:
        """The stored source's tree id.

        Raises:
            BadRequest, BadSource, IncompleteSource, KegBusy or KegError: why the source was not stored.
        """
        if "error" in self.result:
            raise ERRORS.get(self.result.get("kind"), KegError)(self.result["error"])
        return self.result["tree"]

    def abandon(self) -> None:
        """Stop listening to a child whose answer nobody wants; it finishes by itself (reaped by a later job)."""
        if self.result is None:
            self.proc.stdout.close()
            self.errors.close()


    def kill(self) -> None:
        """Stop the child and the git commands it runs now (the master is closing), and reap it."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc.stdout.close()
        self.errors.close()


class JobResponse(Then):
    """An answer that waits for a ``SourceJob`` without blocking the event loop, then for what follows.

    Args:
        start_response: the WSGI ``start_response`` (``then`` calls it).
        job: the running ``SourceJob``.
        then: called once the child has finished; calls ``start_response`` and returns the body, or returns
            another ``AsyncBody`` (a ``DeferredResponse`` waiting for the pointer's transaction).
    """

    def __init__(self, start_response, job: SourceJob, then):
        super().__init__(start_response, then)
        self.job = job

    def _arm_first(self, loop, wake) -> None:
        loop.add_reader(self.job.fileno(), wake)

    def _first_done(self) -> bool:
        if not self.job.read_some():
            return False
        self._loop.remove_reader(self.job.fileno())
        self.job.finish()
        return True

    def _wait_first(self) -> None:
        self.job.wait()

    def _abandon_first(self) -> None:
        if self._loop is not None and not self.job.proc.stdout.closed:
            self._loop.remove_reader(self.job.fileno())
        self.job.abandon()


# ------------------------------------------------------------ the child

def _send(peer_url: str, token: str, app: str, commit: str, pack: bytes, keg_path: str) -> None:
    """Store the pack on one other replica (a whole pack of the commit if it lacks what the pack leans on)."""
    from master.peers import SOURCE_TIMEOUT, peer_request

    target = f"/v1/raft/sources/{app}?commit={commit}"
    status, body = peer_request(peer_url, token, "POST", target, pack, timeout=SOURCE_TIMEOUT)
    if status == 422:   # it missed an earlier push: send the commit with all it reaches
        status, body = peer_request(peer_url, token, "POST", target, sources.pack_of(keg_path, commit),
                                    timeout=SOURCE_TIMEOUT)
    if status != 200:
        raise KegBusy(f"storing the source gave HTTP {status}: {body[:300].decode(errors='replace')}")


def replicate(args, pack: bytes, token: str, down: list) -> None:
    """Send the stored pack to the other replicas in order until a majority holds it; the Raft addresses of
    those that could not be reached are added to ``down``.

    Raises:
        KegBusy: fewer than a majority hold it, with each replica's reason.
    """
    from master.peers import send_until_majority

    peers = [(address, url, False) for address, _, url in (p.partition("=") for p in args.peer)]
    stored, errors = send_until_majority(
        peers, args.majority, lambda url: _send(url, token, args.app, args.commit, pack, args.keg), down)
    if stored < args.majority:
        raise KegBusy(f"the pushed source of {args.app} is stored on {stored} of {args.replicas} replicas and "
                      f"a majority ({args.majority}) is needed before /src/{args.app} may name it: "
                      f"{'; '.join(errors) or 'no replica answered'}; push again")


def fetch(args, token: str, result: dict) -> None:
    """Fetch the source from the replicas of ``--fetch-from`` in turn and store the first pack that passes the
    checks; sets ``result["tree"]`` and ``result["from"]``, and adds those that could not be reached to
    ``result["down"]``.

    Raises:
        KegBusy: no replica gave a pack that could be stored, with each one's reason.
    """
    import http.client

    from master.peers import SOURCE_TIMEOUT, peer_request

    errors = []
    for peer in args.fetch_from:
        address, _, url = peer.partition("=")
        try:
            status, pack = peer_request(url, token, "GET", f"/v1/raft/sources/{args.app}?commit={args.commit}",
                                        timeout=SOURCE_TIMEOUT)
        except (OSError, http.client.HTTPException) as err:
            result["down"].append(address)
            errors.append(f"{address}: {err}")
            continue
        if status != 200:
            errors.append(f"{address}: HTTP {status}: {pack[:200].decode(errors='replace').strip()}")
            continue
        try:
            result["tree"] = sources.receive(args.keg, args.app, args.commit, pack)
        except KegError as err:
            errors.append(f"{address}: {err}")
            continue
        result["from"] = address
        return
    raise KegBusy(f"no replica gave the source of {args.app} ({args.commit}): "
                  f"{'; '.join(errors) or 'none was asked'}")


def main(argv=None) -> int:
    """The child: store the pack from standard input here, then on a majority (or fetch it); print the result."""
    parser = argparse.ArgumentParser(prog="python -m master.source_job", description=__doc__.split("\n")[0])
    parser.add_argument("--keg", required=True)
    parser.add_argument("--app", required=True)
    parser.add_argument("--commit", required=True)
    parser.add_argument("--majority", type=int, default=1)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--peer", action="append", default=[], metavar="ADDRESS=URL")
    parser.add_argument("--fetch-from", action="append", default=[], metavar="ADDRESS=URL")
    args = parser.parse_args(argv)
    pack = b"" if args.fetch_from else sys.stdin.buffer.read()
    token = os.environ.pop(TOKEN_ENV, "")   # not for the git commands below
    result: dict = {"down": []}
    try:
        if args.fetch_from:
            fetch(args, token, result)
        else:
            result["tree"] = sources.receive(args.keg, args.app, args.commit, pack)
        if args.majority > 1:
            replicate(args, pack, token, result["down"])
    except KegError as err:
        result.pop("tree", None)
        result.update(error=str(err), kind=type(err).__name__)
    except OSError as err:
        result.pop("tree", None)
        result.update(error=f"storing the pushed source of {args.app} failed: {err}", kind="KegError")
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
