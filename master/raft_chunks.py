"""A Raft replica's chunk traffic with the other replicas, in a child process (DESIGN §1.5, §4).

Chunks of a large value are stored on a majority of replicas before the
write that needs them is answered, and a replica that applied a value whose
chunks it missed fetches them from the others.  Both are HTTP calls to other
replicas, each allowed ``PEER_TIMEOUT`` (2 s) to connect and as long to
answer.  Made on the event loop, a replica that is stopped, swapping or cut
off by a firewall that drops packets would hold the loop for those seconds:
the leader's heartbeats stop, a follower starts an election, and every client
of the replica waits.  So the replica runs them in one long-lived child,
``python -m master.raft_chunks`` (one process start for all of them, not one
per upload batch), and the event loop only reads its answers.

The protocol is one JSON object per line, each way.  On the child's
standard input (the peer token is in its environment)::

    {"id": 7, "kind": "push", "names": [...], "peers": [[ADDRESS, URL, DOWN], ...], "majority": 2, "replicas": 3}
    {"id": 8, "kind": "fetch", "names": [...], "peers": [[ADDRESS, URL, DOWN], ...]}

and on its standard output, in the same order::

    {"id": 7, "down": [ADDRESS, ...]}                           on a majority
    {"id": 7, "down": [...], "error": MESSAGE}                   not on a majority (KegBusy)
    {"id": 8, "down": [...], "fetched": [NAME, ...]}

``peers`` are the other replicas in the order to ask them (the leader first),
``DOWN`` true for one that did not answer a moment ago (it is not asked, and
counts as not holding the chunks).  ``down`` lists those that could not be
reached now, for the replica to leave alone for a moment.  The child reads
the chunks it sends from the keg's chunk store, and stores those it fetches
there (verified against their names, durably).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import logging
import os
import subprocess
import sys
import time

from keg.errors import BadRequest, KegBusy, KegError
from keg.fsio import read_ready
from keg.transaction import TxResult
from master.interface import Pending
from master.peers import peer_request, send_until_majority

TOKEN_ENV = "KEG_PEER_TOKEN"
MAX_WAITING = 256      # requests the child has not answered; one more write of chunks is refused (503)
DEADLINE = 120.0       # seconds a request may wait for its answer; then the child is stopped (``check``)
PEER_BACKOFF = 2.0     # a replica that did not answer is not asked again for this long, by any request

log = logging.getLogger("keg.raft")


class ChunkWorker:
    """The replica's side of the child: sends it requests, and calls each one's callback with its answer.

    Runs on the event loop that ``attach`` gives it; the child is started by the first request and again by the
    first one after it died.  The replica runs two: one for pushes, one for fetches, so that catching up never
    queues a client's write behind it.  The child's warnings go to the replica's standard error (its log).

    Args:
        keg_path: the keg (its chunk store is the child's).
        token: the peer token.
        on_down: called with the Raft address of each replica the child could not reach.
    """

    def __init__(self, keg_path: str, token: str, on_down):
        self.keg_path, self.token, self.on_down = keg_path, token, on_down
        self.proc = None
        self.closed = False
        self._loop = None
        self._callbacks: dict = {}   # request id -> callback(answer dict), in the order sent
        self._sent_at: dict = {}     # request id -> monotonic time it was sent
        self._next_id = 0
        self._out = b""              # requests not yet written to the child
        self._in = b""               # the child's output not yet a whole line

    def attach(self, loop) -> None:
        """Run on ``loop`` from now on."""
        self._loop = loop

    @property
    def busy(self) -> int:
        """How many requests wait for the child's answer."""
        return len(self._callbacks)

    def push(self, names: list, peers: list, majority: int, replicas: int, master) -> Pending:
        """Store the chunks ``names`` (held here) on the ``peers`` until ``majority`` replicas hold them.

        Args:
            names: blake3 names of chunks in this keg.
            peers: ``[(Raft address, URL, down), …]`` in the order to ask them.
            majority: how many replicas, this one included, must hold them.
            replicas: how many replicas the cluster has (for the message).
            master: the master the ``Pending`` belongs to.

        Returns:
            A ``Pending`` resolved with an ok ``TxResult``, or one whose error is ``KegBusy`` saying which
            replicas did not take the chunks and why.
        """
        pending = _LoopPending(None, master)

        def answered(answer: dict) -> None:
            error = answer.get("error")
            pending.resolve(TxResult(True) if error is None else TxResult(False, error=KegBusy(error)))

        self._request({"kind": "push", "names": names, "peers": [list(p) for p in peers],
                       "majority": majority, "replicas": replicas}, answered)
        return pending

    def fetch(self, names: list, peers: list, done) -> None:
        """Fetch the chunks ``names`` from the ``peers`` (asked in order for each) into this keg; then
        ``done(fetched names)``."""
        self._request({"kind": "fetch", "names": names, "peers": [list(p) for p in peers]},
                      lambda answer: done(answer.get("fetched", [])))

    def check(self, now: float) -> None:
        """Stop a child that has not answered a request within ``DEADLINE`` seconds (a peer trickling its
        answer, say): what it held fails, and the next request starts another."""
        if self.proc is not None and self._sent_at and now - min(self._sent_at.values()) > DEADLINE:
            log.warning("raft: the chunk worker has not answered for %.0f s; stopping it", DEADLINE)
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    def _request(self, message: dict, callback) -> None:
        if self.closed:
            raise KegBusy("this replica is shutting down; send again to another")
        if len(self._callbacks) >= MAX_WAITING:
            raise KegBusy(f"{len(self._callbacks)} chunk transfers to the other replicas are waiting; "
                          "send again in a moment")
        if self.proc is None:
            self._start()
        self._next_id += 1
        message["id"] = self._next_id
        self._callbacks[self._next_id] = callback
        self._sent_at[self._next_id] = time.monotonic()
        self._out += json.dumps(message).encode() + b"\n"
        self._write()

    def _start(self) -> None:
        # -P: the master's working directory (a keg's, with its keg/ directory) must not shadow the packages.
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "master.raft_chunks", "--keg", self.keg_path],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                env=dict(os.environ, **{TOKEN_ENV: self.token}), start_new_session=True)
        except OSError as err:
            raise KegBusy(f"cannot start the chunk transfers to the other replicas: {err}; "
                          "send again in a moment") from err
        for pipe in (self.proc.stdin, self.proc.stdout):
            os.set_blocking(pipe.fileno(), False)
        self._in = self._out = b""
        self._loop.add_reader(self.proc.stdout.fileno(), self._readable)

    def _write(self) -> None:
        if self.proc is None:
            return
        try:
            written = os.write(self.proc.stdin.fileno(), self._out) if self._out else 0
        except BlockingIOError:
            written = 0
        except BrokenPipeError:
            self._loop.remove_writer(self.proc.stdin.fileno())
            return   # the child died; _readable sees its end and fails what waits
        self._out = self._out[written:]
        fd = self.proc.stdin.fileno()
        if self._out:
            self._loop.add_writer(fd, self._write)
        else:
            self._loop.remove_writer(fd)

    def _readable(self) -> None:
        data, ended = read_ready(self.proc.stdout.fileno())
        *lines, self._in = (self._in + data).split(b"\n")
        for line in lines:
            try:
                self._answer(json.loads(line))
            except Exception:  # noqa: BLE001 - logged; the other answers must still reach their requests
                log.exception("raft: cannot take the chunk worker's answer %r", line[:200])
        if ended:
            self._died()

    def _answer(self, answer: dict) -> None:
        for address in answer.get("down", ()):
            self.on_down(address)
        self._sent_at.pop(answer["id"], None)
        callback = self._callbacks.pop(answer["id"], None)
        if callback is not None:
            callback(answer)

    def _died(self) -> None:
        """The child stopped: fail every request it had not answered, and start a new one on the next."""
        proc, self.proc = self.proc, None
        with contextlib.suppress(RuntimeError):   # the loop may be closed already (at shutdown)
            self._loop.remove_reader(proc.stdout.fileno())
            self._loop.remove_writer(proc.stdin.fileno())
        code = proc.wait()
        with contextlib.suppress(OSError):
            proc.stdin.close()
        proc.stdout.close()
        if self._callbacks:
            log.warning("raft: the chunk worker stopped (exit status %s) with %d requests unanswered",
                        code, len(self._callbacks))
        callbacks, self._callbacks, self._sent_at = self._callbacks, {}, {}
        for request, callback in callbacks.items():
            try:
                callback({"id": request, "error": f"the chunk transfer stopped (exit status {code}); the "
                                                  "master's log says why; send again", "fetched": []})
            except Exception:  # noqa: BLE001 - logged; every other request must still be failed
                log.exception("raft: failing a chunk request")

    def close(self) -> None:
        """Stop the child (what it was sending is sent again by the writes' clients) and reap it; no request is
        taken after this."""
        self.closed = True
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self._callbacks.clear()
        self._died()


class _LoopPending(Pending):
    """A ``Pending`` only the event loop resolves (the worker's answer): nothing to flush while waiting."""

    __slots__ = ()

    def wait(self):
        raise RuntimeError("chunk transfers are answered on the replica's event loop; wait there (AfterPending)")


# ------------------------------------------------------------ the work (in the child, or inline without a loop)


def store_on_majority(read, names: list, peers: list, majority: int, replicas: int, token: str,
                      down: list) -> None:
    """Send the chunks ``names`` to the ``peers`` in order until ``majority`` replicas (this one included)
    hold them; the Raft addresses of those that could not be reached are added to ``down``.

    Args:
        read: ``read(name) -> bytes`` of a chunk held here.
        names: the chunks' names.
        peers: ``[(Raft address, URL, down), …]``.
        majority, replicas: as for ``ChunkWorker.push``.
        token: the peer token.
        down: a list to add unreachable replicas to.

    Raises:
        KegBusy: fewer than a majority hold them, with each replica's reason.
    """
    stored, errors = send_until_majority(peers, majority, lambda url: _push(read, url, token, names), down)
    if stored < majority:
        raise KegBusy(f"the chunks are stored on {stored} of {replicas} replicas and a majority ({majority}) "
                      f"is needed before the write is answered: {'; '.join(errors) or 'no replica answered'}")


def _push(read, url: str, token: str, names: list) -> None:
    """Store on the replica at ``url`` those of ``names`` it lacks."""
    status, body = peer_request(url, token, "POST", "/v1/raft/chunks/missing", json.dumps({"chunks": names}).encode())
    if status != 200:
        raise KegBusy(f"asking for missing chunks gave HTTP {status}")
    try:
        missing = json.loads(body)["missing"]
        if not isinstance(missing, list) or not set(missing) <= set(names):
            raise ValueError("not a list of the chunks asked about")
    except (ValueError, KeyError, TypeError) as err:
        raise KegBusy(f"its answer to which chunks it lacks makes no sense ({err}): {body[:200]!r}") from err
    for name in missing:
        status, body = peer_request(url, token, "PUT", f"/v1/raft/chunks/{name}", read(name))
        if status not in (200, 201):
            raise KegBusy(f"storing chunk {name} gave HTTP {status}: {body[:200]!r}")


def fetch_missing(chunks, names: list, peers: list, token: str, down: list) -> list:
    """Fetch each of ``names`` from the first of ``peers`` that has it, into ``chunks`` (a ``ChunkStore``).

    Returns:
        The names fetched; replicas that could not be reached are added to ``down`` and not asked again.
    """
    fetched = []
    for name in names:
        for address, url, was_down in peers:
            if was_down or address in down:
                continue
            try:
                status, data = peer_request(url, token, "GET", f"/v1/raft/chunks/{name}")
            except (OSError, http.client.HTTPException):
                down.append(address)
                continue
            if status != 200:
                continue
            try:
                chunks.put(name, data)   # verified against its name, durably
            except BadRequest as err:
                log.warning("raft: %s sent a chunk that is not %s: %s", address, name, err)
                continue
            fetched.append(name)
            break
    return fetched


def serve(keg_path: str, token: str, requests, answers) -> None:
    """The child's loop: answer each request line of ``requests`` with a line on ``answers``, until its end.

    A replica that could not be reached is skipped by the requests that follow for ``PEER_BACKOFF`` seconds,
    so writes queued behind a request that waited for it do not each wait again.
    """
    from keg.chunks import ChunkStore

    chunks = ChunkStore(keg_path, durable=True)
    down_until: dict = {}   # Raft address -> monotonic time it may be asked again
    for line in requests:
        request = json.loads(line)
        down: list = []
        answer = {"id": request["id"], "down": down}
        now = time.monotonic()
        peers = [(address, url, was_down or down_until.get(address, 0) > now)
                 for address, url, was_down in request["peers"]]
        try:
            if request["kind"] == "push":
                store_on_majority(chunks.get, request["names"], peers, request["majority"], request["replicas"],
                                  token, down)
            else:
                answer["fetched"] = fetch_missing(chunks, request["names"], peers, token, down)
        except KegError as err:
            answer["error"] = str(err)
        except (OSError, ValueError, KeyError) as err:   # a full disk, say: this request fails, not the child
            log.warning("raft: chunk %s failed: %s", request["kind"], err)
            answer["error"] = f"the chunk {request['kind']} failed here: {err}"
        for address in down:
            down_until[address] = time.monotonic() + PEER_BACKOFF
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


def main(argv=None) -> int:
    """The child: serve requests from standard input until it ends."""
    parser = argparse.ArgumentParser(prog="python -m master.raft_chunks", description=__doc__.split("\n")[0])
    parser.add_argument("--keg", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    serve(args.keg, os.environ.pop(TOKEN_ENV, ""), sys.stdin, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
