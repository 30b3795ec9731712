"""The replicated master: several replicas of one keg kept identical with Raft (pysyncobj), DESIGN §4.

Each replica is a ``SingleMaster`` over its own keg (reads, watch, git fetch
and chunks are served locally) whose writes do not go to the store directly:

1. ``submit`` queues a transaction; once per turn of the event loop ``flush``
   encodes the queue as one *group* (``encode_group``: the transactions with
   their author and id, and the time of the group) and proposes it to the
   Raft log.  A follower sends its transactions to the leader instead, which
   puts them into its own next group (master/raft_forward.py).  While an
   entry of the leader's awaits a majority, the leader keeps what arrives for
   the next group (``MAX_IN_FLIGHT``, at most ``MAX_HOLD``): with many
   clients, fewer and larger entries.
2. When the group is committed (on a majority of disks, see
   ``master/raft_journal.py``) every replica applies it with
   ``Store.commit(txs, when=group time, trailers=("Keg-Raft-Index: i",))``:
   same parent, same transactions, same author, same time, so every replica
   makes the same commit, byte for byte, and the same KIDs.  Nothing in the
   apply reads a clock, the network or this replica's chunk store.
3. The replica each transaction came through answers its client with the
   result it computed when it applied the entry; the answer says the revision.

Idempotent retries: a transaction may carry an id (``"id"`` in ``POST
/v1/tx``, or an ``Idempotency-Key`` header on ``PUT``/``DELETE``).  The
commit of a successful transaction records ``Keg-Transaction: <id>``; a later
transaction with the same id, within the newest ``IDEMPOTENCY_WINDOW``
revisions, is not applied again and gets the original result.  The decision
depends only on the keg's history, so every replica takes the same one.

Restart: the Raft log is the write-ahead log.  Applying a group writes the
keg's journal record without an fsync of its own (the entry is already on a
majority of disks); checkpoints and snapshots are fsynced.  After a crash the
keg holds some prefix of what was applied, and the head commit's
``Keg-Raft-Index`` says which log entry it reflects; entries up to that index
are skipped when pysyncobj replays its log, and the later ones are applied
again, making the same commits.  An entry that changed nothing
(every compare failed) is harmlessly applied again: it fails again.

Snapshots: when pysyncobj compacts its log, the snapshot file says which
revision and commit the keg holds at that log index (the keg is checkpointed
first, so its refs are durable).  A follower that needs entries the leader no
longer has receives the snapshot, fetches the commit from a peer by git
(``/v1/raft/git/keg.git``) and moves its head there.

Large values: chunks are stored on a majority of replicas before the
``PUT`` that wrote them is answered (``replicate_chunks``: a child process,
master/raft_chunks.py, sends them; another fetches those a replica missed); a
proposal whose large puts name chunks this replica lacks is refused before
it is proposed.  Applying never checks chunks, so it cannot fail on one
replica and succeed on another.  Pushed sources (``git push`` of an app) go
the same way: on a majority before the ``/src/<app>`` pointer is proposed
(master/raft_sources.py).

The replicas talk Raft over pysyncobj's TCP transport, encrypted and
authenticated with the cluster password (AES-GCM frames,
``master/raft_wire.py``: nothing is unpickled before the frame's tag is
verified), and HTTP among themselves for chunks, snapshots and status,
authenticated by a token derived from the same password.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _json_str

from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj.config import FAIL_REASON
from pysyncobj.node import TCPNode

from keg import sources
from keg.errors import BadRequest, CorruptKeg, KegBusy, KegError, NotFound
from keg.fsio import fsync_dir, write_file_atomic
from keg.gitenv import git_http_env
from keg.large import Pointer
from keg.objects import MODE_GITLINK
from keg.transaction import Author, Compare, Delete, Put, Transaction, TxResult
from master.app import HttpError
from master.interface import Pending
from master.peers import PEER_TIMEOUT, peer_request
from master.raft_chunks import ChunkWorker, store_on_majority
from master.raft_forward import FAILED, FORWARD, MESSAGES, REFUSED, Forwarder, origins_json
from master.raft_journal import EpollPoller, RaftJournal, SyncingTransport, seams
from master.raft_sources import SourceReplicas
from master.raft_wire import WireCipher, use_stored_zlib
from master.single import SingleMaster

GROUP_FORMAT = 1
GROUP_OVERHEAD = 40              # bytes of a group entry around its transactions (time, format), at most
MAX_IN_FLIGHT = 1                # the leader proposes while fewer of its entries than this await a majority,
MAX_HOLD = 0.05                  # and otherwise keeps new writes for the next group, for at most this long
FROM_OVERHEAD = 120              # bytes a forwarded transaction adds to its group's "from" list, at most
MAX_ENTRY = 4 << 20              # bytes of one log entry; a bigger transaction is refused (413)
PROPOSE_TIMEOUT = 10.0           # a proposal not applied by then is answered "outcome unknown"
IDEMPOTENCY_WINDOW = 100_000     # revisions within which a repeated transaction id is recognised
TICK = 0.02                      # timer tick for Raft's timeouts and heartbeats
COMMIT_NOTICE = 0.005            # a commit index no entry carries is sent on its own after this long
MAX_TICKS = 8                    # pysyncobj ticks in a row while each one's poll reads messages
CHUNKS_PER_FETCH = 64           # missed chunks the chunk worker is asked for at a time
PEER_BACKOFF = 2.0               # a replica that did not answer is not asked again for this long
RAFT_INDEX_TRAILER = "Keg-Raft-Index: "
TX_TRAILER = "Keg-Transaction: "
ROLES = {0: "follower", 1: "candidate", 2: "leader"}
PEER_TOKEN_PREFIX = "raftpeer_"

log = logging.getLogger("keg.raft")


class RaftConfigError(KegError):
    """The replica's Raft options are wrong (a bad address, self not among the peers, no password)."""


class OutcomeUnknown(KegBusy):
    """The proposal may or may not have been committed; the client should retry with the same id."""


class EntryTooLarge(HttpError):
    """A transaction too large for one log entry (HTTP 413)."""

    def __init__(self, message: str):
        super().__init__(413, message)


# ------------------------------------------------------------------ config

@dataclass(frozen=True)
class Peer:
    """One replica: its Raft address (``HOST:PORT``) and the URL of its HTTP interface."""

    raft: str
    url: str


def check_address(text: str, what: str) -> str:
    """``HOST:PORT`` with a numeric port, or RaftConfigError saying what is wrong."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RaftConfigError(f"{what} {text!r} is not HOST:PORT (for example 10.0.0.1:4001)")
    return f"{host}:{int(port)}"


def parse_peers(text: str, self_raft: str, self_url: str) -> list:
    """The ``--raft-peers`` list: ``HOST:PORT`` or ``HOST:PORT=http://HOST:HTTPPORT``, comma-separated.

    A peer without a URL is assumed to serve as this replica does (HTTP, or
    HTTPS with ``--tls-cert``) on the same port, at its Raft host.  This
    replica must be in the list.

    Raises:
        RaftConfigError: naming the entry that is wrong.
    """
    self_raft = check_address(self_raft, "--raft-self")
    own = urllib.parse.urlsplit(self_url)
    peers, seen = [], set()
    for item in [p for p in (text or "").split(",") if p.strip()]:
        raft, _, url = item.strip().partition("=")
        raft = check_address(raft, "--raft-peers entry")
        if raft in seen:
            raise RaftConfigError(f"--raft-peers names {raft} twice")
        seen.add(raft)
        if raft == self_raft:
            url = self_url
        elif not url:
            url = f"{own.scheme}://{raft.rpartition(':')[0]}:{own.port}"
        elif not url.startswith(("http://", "https://")):
            raise RaftConfigError(f"--raft-peers entry {item!r}: the URL must start with http:// or https://")
        peers.append(Peer(raft, url.rstrip("/")))
    if self_raft not in seen:
        raise RaftConfigError(f"--raft-peers must list every replica, this one ({self_raft}) included")
    return peers


def peer_token(password: str) -> str:
    """The bearer token replicas use with each other's HTTP interface, derived from the cluster password."""
    return PEER_TOKEN_PREFIX + hmac.new(password.encode(), b"keg raft peer v1", hashlib.sha256).hexdigest()


# ------------------------------------------------------------------ groups

def encode_group(transactions, when: int) -> bytes:
    """A group of transactions as one log entry: exact bytes, no pickle, no loss (large puts keep their pointer)."""
    return join_group([encode_tx(tx) for tx in transactions], when)


def encode_tx(tx) -> bytes:
    """One transaction as it appears inside a group (``join_group`` puts groups together from these).

    The bytes of ``json.dumps({"author", "compare", "id", "ops"}, sort_keys=True,
    separators=(",", ":"))``, written out directly (twice as fast; the leader
    encodes every transaction it proposes).
    """
    ops = []
    for op in tx.ops:
        if isinstance(op, Delete):
            ops.append('["delete",%s,%s]' % (_json_str(op.path), _JSON_BOOL[bool(op.recursive)]))
        else:
            ops.append('["put",%s,%d,"%s",%s]' % (_json_str(op.path), op.mode,
                                                  base64.b64encode(op.data).decode("ascii"),
                                                  _JSON_BOOL[bool(op.large)]))
    compares = ",".join("[%s,%s]" % (_json_str(c.path), _json_opt(c.kid)) for c in tx.compares)
    return ('{"author":[%s,%s],"compare":[%s],"id":%s,"ops":[%s]}' % (
        _json_str(tx.author.name), _json_str(tx.author.email), compares, _json_opt(tx.id), ",".join(ops))).encode()


_JSON_BOOL = {False: "false", True: "true"}


def _json_opt(text: str | None) -> str:
    return "null" if text is None else _json_str(text)


def join_group(encoded: list, when: int, origins: list | None = None) -> bytes:
    """The group of ``encode_tx`` results: the bytes ``json.dumps`` with sorted keys would make of it.

    ``origins`` lists the forwarded transactions (``[position, origin, seq]``,
    master/raft_forward.py); a group without any has no ``"from"`` key.
    """
    head = b'{"from":%b,' % origins_json(origins) if origins else b"{"
    return b'%b"time":%d,"txs":[%b],"v":%d}' % (head, int(when), b",".join(encoded), GROUP_FORMAT)


def decode_group(payload: bytes) -> tuple:
    """``(time, [Transaction])`` from ``encode_group``'s bytes."""
    when, txs, _ = decode_entry(payload)
    return when, txs


def decode_entry(payload: bytes) -> tuple:
    """``(time, [Transaction], origins)`` of a log entry (``origins``: its ``"from"`` list, or [])."""
    obj = json.loads(payload)
    if obj.get("v") != GROUP_FORMAT:
        raise CorruptKeg(f"log entry has group format {obj.get('v')!r}; this Keg reads {GROUP_FORMAT}: "
                         "upgrade every replica to the same version")
    authors: dict = {}   # a group's transactions mostly share their author: one object for them
    return obj["time"], [_decode_tx(t, authors) for t in obj["txs"]], obj.get("from", [])


def decode_tx(encoded: bytes):
    """One ``encode_tx`` result back as a ``Transaction`` (a transaction a follower forwarded).

    Raises:
        ValueError: the bytes are not one encoded transaction.
    """
    try:
        return _decode_tx(json.loads(encoded), {})
    except (KegError, KeyError, TypeError, IndexError, ValueError) as err:
        raise ValueError(f"not an encoded transaction: {err}") from err


def _decode_tx(t: dict, authors: dict):
    ops = tuple([Delete(o[1], o[2]) if o[0] == "delete" else Put(o[1], base64.b64decode(o[3]), o[2], o[4])
                 for o in t["ops"]])
    name, email = t["author"]
    author = authors.get((name, email))
    if author is None:
        author = authors[(name, email)] = Author(name, email)
    return Transaction(ops, tuple([Compare(p, k) for p, k in t["compare"]]), author, t["id"])


def _trailer_values(message: str, trailer: str) -> list:
    return [line[len(trailer):] for line in message.splitlines() if line.startswith(trailer)]


# ------------------------------------------------------------------ pysyncobj

class ReplicatedLog(SyncObj):
    """pysyncobj's Raft with the Keg journal, poller and transport; its two commands call the master."""

    def __init__(self, master: "RaftMaster", self_raft: str, others: list, conf: SyncObjConf,
                 journal: RaftJournal, poller: EpollPoller):
        self.keg_master = master
        self.keg_journal = journal
        self.forwarded_upto = 0        # the newest log index this leader gave a follower's forwarded command
        use_stored_zlib()
        with seams(journal, poller, WireCipher(conf.password)):
            super().__init__(self_raft, others, conf, transportClass=SyncingTransport)

    def send_entries(self) -> None:
        """As leader, send every follower what it lacks and the commit index, now (see ``RaftMaster._tick``)."""
        if self._isLeader():
            self._SyncObj__sendAppendEntries()

    def positions(self) -> tuple:
        """(last log index, commit index): what a send would carry, to compare with the last one sent."""
        return self._SyncObj__raftLog[-1][1], self.raftCommitIndex

    def _SyncObj__onMessageReceived(self, node, message):
        kind = message.get("type")
        if kind in MESSAGES:
            self.keg_master.forward_message(node, message)
            return
        # pysyncobj sets a follower's next index to what the follower's answer names, even when entries
        # sent after the one it answers are on the way: the next send repeats them and the follower,
        # which deletes everything after prevLogIdx before appending, truncates and rewrites its log
        # (and says "truncating already-applied log entries").  An answer that succeeded moves the next
        # index forward only; one that failed (reset) still moves it back.
        if kind == "next_node_idx" and message.get("success") and not message.get("reset"):
            ahead = self._SyncObj__raftNextIndex.get(node)
            super()._SyncObj__onMessageReceived(node, message)
            if ahead is not None and self._SyncObj__raftNextIndex.get(node, 0) < ahead:
                self._SyncObj__raftNextIndex[node] = ahead
            return
        super()._SyncObj__onMessageReceived(node, message)

    @replicated
    def apply_group(self, payload):
        """Apply one group of transactions (every replica, in log order)."""
        return self.keg_master.apply_entry(payload, self.raftLastApplied + 1)

    @replicated
    def barrier(self):
        """Nothing: a point in the log, for linearizable reads."""
        self.keg_journal.sync()
        return self.raftLastApplied + 1

    def role(self) -> str:
        """``leader``, ``follower`` or ``candidate``."""
        return ROLES.get(self.getStatus()["state"], "unknown")


class RaftPending(Pending):
    """A ``Pending`` whose ``wait`` drives the Raft loop itself (for callers outside the event loop)."""

    __slots__ = ("deadline",)

    def __init__(self, tx, master):
        super().__init__(tx, master)
        self.deadline = time.monotonic() + PROPOSE_TIMEOUT

    def resolve(self, result: TxResult) -> None:
        if self.result is None:  # a late answer after a timeout is dropped
            super().resolve(result)

    def wait(self) -> TxResult:
        self._master.run_until(lambda: self.done, PROPOSE_TIMEOUT + 1.0)
        if not self.done:
            self.resolve(TxResult(False, error=OutcomeUnknown("no answer from the Raft log in time")))
        return self.result


# ------------------------------------------------------------------ the master

class RaftMaster(SingleMaster):
    """One replica of a Raft-replicated keg.

    Args:
        store: this replica's open ``Store`` (every replica starts from a copy
            of the same ``keg init``).
        self_raft: this replica's Raft address, ``HOST:PORT`` (it binds there).
        peers: every replica as ``Peer`` (this one included).
        password: the cluster password (authenticates and encrypts Raft, derives the peer token).
        raft_dir: where the Raft journal lives (default ``<keg>/keg/raft``).
        compact_entries: compact the Raft log (snapshot) beyond this many entries.
        durable: fsync the Raft journal (off only in tests that measure nothing about crashes).
    """

    pending_class = RaftPending

    def __init__(self, store, self_raft: str, peers: list, password: str, raft_dir: str | None = None,
                 compact_entries: int = 5000, durable: bool = True):
        super().__init__(store)
        if not password:
            raise RaftConfigError("a cluster password is required (--raft-password-file): it authenticates "
                                  "the replicas to each other; without it any host could write the log")
        self.self_raft = check_address(self_raft, "--raft-self")
        self.peers = {p.raft: p for p in peers}
        if self.self_raft not in self.peers:
            raise RaftConfigError(f"the peers must include this replica ({self.self_raft})")
        self.self_url = self.peers[self.self_raft].url
        self.peer_token = peer_token(password)
        self.raft_dir = raft_dir or os.path.join(store.path, "keg", "raft")
        self.journal = RaftJournal(self.raft_dir, durable=durable)
        self.poller = EpollPoller()
        self._ids: dict = {}            # transaction id -> revision that applied it
        self.applied_index = 0          # the log index the keg's head reflects
        self._load_applied()
        self._proposals: list = []      # (deadline, [RaftPending], log entry)
        self._own: dict = {}            # log entry -> (time, transactions) of a group this replica proposed
        self._sent = (0, 0)             # (last log index, commit index) of the last send made by _send
        self._notice = None             # the scheduled send of a commit index (asyncio handle)
        self._notice_urgent = False     # that send is for a follower's forwarded write (call_soon)
        self._peer_down: dict = {}      # raft address -> monotonic time it may be asked again
        self._wanted: set = set()       # chunks of committed values this replica lacks
        self._fetching_chunks = False   # the fetch worker is fetching some of them
        self._chunk_retry: dict = {}    # wanted chunk -> monotonic time to ask for it again (none had it)
        self.chunk_pusher = ChunkWorker(store.path, self.peer_token, self.mark_down)   # master/raft_chunks.py
        self.chunk_fetcher = ChunkWorker(store.path, self.peer_token, self.mark_down)
        self.sources = SourceReplicas(self)  # pushed sources: on a majority first, missed ones fetched
        self.forwarder = Forwarder(self.self_raft, decode_tx)
        self._held_since = None         # monotonic time the leader began keeping writes for the next group
        self._loop = None
        self._closed = False
        self.stats.update({"groups": 0, "snapshots_sent": 0, "snapshots_loaded": 0, "replayed_ids": 0})
        conf = SyncObjConf(
            password=password, autoTick=False, useFork=False, appendEntriesUseBatch=True,
            dynamicMembershipChange=True, commandsWaitLeader=True,
            bindAddress=self.self_raft, maxBindRetries=3, bindRetryTime=0.2,
            raftMinTimeout=0.4, raftMaxTimeout=1.0, appendEntriesPeriod=0.1, connectionTimeout=3.5,
            connectionRetryTime=0.5, leaderFallbackTimeout=2.0,
            logCompactionMinEntries=max(2, compact_entries), logCompactionMinTime=10 ** 9,
            fullDumpFile=os.path.join(self.raft_dir, "snapshot.json"),
            serializer=self._write_snapshot, deserializer=self._read_snapshot,
            appendEntriesBatchSizeBytes=1 << 20, logCompactionBatchSize=1 << 20,
            onStateChanged=self._on_state_changed)
        others = [TCPNode(a) for a in self.peers if a != self.self_raft]
        try:
            self.raft = ReplicatedLog(self, self.self_raft, others, conf, self.journal, self.poller)
        except Exception as err:  # pysyncobj reports a port in use as SyncObjException('BindError')
            self.journal._destroy()
            raise RaftConfigError(f"cannot listen for Raft at {self.self_raft}: {err} "
                                  "(is the address this machine's, and the port free?)") from err

    # ------------------------------------------------------------ start-up

    def _load_applied(self) -> None:
        """The log index the keg reflects, and the transaction ids of the newest revisions."""
        self.applied_index = 0
        head = self.store.head_revision
        first = max(1, head - IDEMPOTENCY_WINDOW + 1)
        number = head
        for number in range(head, first - 1, -1):
            message = self.store.revision(number).message
            if not self.applied_index:
                found = _trailer_values(message, RAFT_INDEX_TRAILER)
                if found:
                    self.applied_index = int(found[-1])
            for tx_id in _trailer_values(message, TX_TRAILER):
                self._ids.setdefault(tx_id, number)
            if number < head - 2000 and self.applied_index:
                break  # ids older than this are looked up in the history when asked (see _committed_id)
        self._ids_scanned_from = max(1, number)

    def _committed_id(self, tx_id: str, head: int):
        """The revision that applied ``tx_id`` within the window, or None."""
        number = self._ids.get(tx_id)
        if number is None and self._ids_scanned_from > max(1, head - IDEMPOTENCY_WINDOW + 1):
            # Scan further back only when an id is asked for that the recent history does not hold.
            for n in range(self._ids_scanned_from - 1, max(1, head - IDEMPOTENCY_WINDOW + 1) - 1, -1):
                for found in _trailer_values(self.store.revision(n).message, TX_TRAILER):
                    self._ids.setdefault(found, n)
                self._ids_scanned_from = n
            number = self._ids.get(tx_id)
        if number is not None and number > head - IDEMPOTENCY_WINDOW:
            return number
        return None

    def attach(self, loop) -> None:
        """Run the Raft loop on ``loop`` (the server's asyncio loop): socket events and a timer."""
        self._loop = loop
        self.chunk_pusher.attach(loop)
        self.chunk_fetcher.attach(loop)
        self.sources.want_all()   # what was still missing before a restart is known again
        loop.add_reader(self.poller.fileno(), self._tick)
        loop.call_later(TICK, self._timer)

    def _timer(self) -> None:
        if self._closed:
            return
        self._tick()
        if self._held_since is not None:
            self.flush()
        self._expire()
        self.housekeeping()   # install a checkpoint a child has written
        now = time.monotonic()
        self.chunk_pusher.check(now)
        self.chunk_fetcher.check(now)
        if self._wanted or self.sources.wanted or self.sources.fetching:
            self._fetch_wanted()
        self._loop.call_later(TICK, self._timer)

    def _tick(self, wait: float = 0.0) -> None:
        # pysyncobj handles the messages a tick receives at the end of that tick (its poll), and acts on
        # them (commit index, apply, replies) at the start of the next: a second tick right away saves
        # a round of the timer on every message.
        #
        # The leader counts itself towards a majority at the start of a tick, so its log is synced
        # before every tick; the entries it appends are sent first and synced after (SyncingTransport
        # lets a leader's append_entries go unsynced), so its fdatasync runs while the followers
        # write theirs.  pysyncobj runs in batch mode (it sends on its heartbeat timer only); the
        # sends are made here (``_send``).
        # Messages that arrive during a tick (the followers' answers come in while the leader syncs)
        # are read by that tick's poll and acted on by the next: tick again while a poll read any.
        try:
            self.journal.sync()
            self.raft.doTick(wait)
            self._send()
            for _ in range(MAX_TICKS):
                self.journal.sync()
                self.raft.doTick(0.0)
                self._send()
                if not self.poller.handled:
                    break
            self.journal.sync()
        except Exception:  # logged; the loop goes on and the next tick retries, as pysyncobj's thread would
            log.exception("raft tick failed")

    def _send(self, now: bool = False) -> None:
        """Send new entries at once; a new commit index alone a little later, or after this turn's answers.

        A follower applies what the leader says is committed, so every
        commit needs telling, but not by a message of its own: the next
        entries carry it (with one client the next write is a few
        milliseconds away, with many a group is always on its way).  A
        commit index with nothing to carry it goes out after
        ``COMMIT_NOTICE`` seconds, or on this turn (after the answers it
        made) when a follower waits for a command it forwarded.
        """
        if not self.raft._isLeader():
            return
        last, commit = self.raft.positions()
        if last > self._sent[0] or (commit > self._sent[1] and (now or self._loop is None)):
            self._sent = (last, commit)
            self.raft.send_entries()
        elif commit > self._sent[1]:
            urgent = self._sent[1] < self.raft.forwarded_upto <= commit  # a follower waits for its write
            if self._notice is not None and urgent and not self._notice_urgent:
                self._notice.cancel()
                self._notice = None
            if self._notice is None:
                self._notice_urgent = urgent
                self._notice = (self._loop.call_soon(self._send_notice) if urgent
                                else self._loop.call_later(COMMIT_NOTICE, self._send_notice))

    def _send_notice(self) -> None:
        self._notice = None
        if not self._closed:
            self._send(now=True)

    def run_until(self, condition, timeout: float) -> None:
        """Drive Raft from this thread until ``condition()`` or ``timeout`` (outside an event loop)."""
        deadline = time.monotonic() + timeout
        while not condition() and time.monotonic() < deadline:
            self.flush()
            self._tick(0.01)
            self._expire()

    def _on_state_changed(self, old, new) -> None:
        self._sent = (0, 0)  # a new leader's log may end before what it sent as leader before
        self.raft.forwarded_upto = 0
        log.info("raft: %s -> %s", ROLES.get(old), ROLES.get(new))

    # ------------------------------------------------------------ writes

    def flush(self) -> None:
        """Propose what this turn's clients (and, as leader, the followers) sent; a follower forwards its own."""
        if self._hold():
            return
        self._held_since = None
        with self._queue_lock:
            batch, self._queue = self._queue, []
        incoming = self.forwarder.take_incoming()
        if not batch and not incoming:
            return
        leading = self.raft._isLeader()
        if incoming and not leading:
            Forwarder.tell(self._transport(), REFUSED, incoming)  # proposed nothing: the follower proposes again
            incoming = []
        items = []   # (own pending or None, encoded transaction, Incoming or None)
        for pending in batch:
            encoded = encode_tx(pending.tx)
            error = self._refuse(pending.tx, len(encoded) + GROUP_OVERHEAD + FROM_OVERHEAD)
            if error is not None:
                pending.resolve(TxResult(False, error=error))
            else:
                items.append((pending, encoded, None))
        if items and not leading and self._forward([(p, e) for p, e, _ in items]):
            items = []
        items += [(None, item.encoded, item) for item in incoming]
        group, size, when = [], GROUP_OVERHEAD, int(time.time())
        for item in items:
            cost = len(item[1]) + 1 + (FROM_OVERHEAD if item[2] is not None else 0)
            if group and size + cost > MAX_ENTRY:
                self._propose(group, when)
                group, size = [], GROUP_OVERHEAD
            group.append(item)
            size += cost
        if group:
            self._propose(group, when)
        self._tick()

    def _hold(self) -> bool:
        """As leader, keep this turn's writes for the next group while the previous one is replicated."""
        if not self.raft._isLeader() or not (self._queue or self.forwarder.incoming):
            return False
        last, commit = self.raft.positions()
        if last - commit < MAX_IN_FLIGHT:
            return False
        now = time.monotonic()
        if self._held_since is None:
            self._held_since = now
        return now - self._held_since < MAX_HOLD

    def _transport(self):
        return self.raft._SyncObj__transport

    def _forward(self, items: list) -> bool:
        """As follower, send ``items`` (``[(pending, encoded)]``) to the leader for its next group."""
        leader = self.raft._getLeader()
        if leader is None or not self.forwarder.send(self._transport(), leader, items):
            return False  # no leader known, or no connection to it: pysyncobj's proposal waits for one
        self._proposals.append((time.monotonic() + PROPOSE_TIMEOUT, [p for p, _ in items], None))
        return True

    def forward_message(self, node, message: dict) -> None:
        """A forwarding message from another replica (master/raft_forward.py)."""
        kind = message["type"]
        if kind == FORWARD:
            bad = self.forwarder.receive(node, message)
            if bad:
                log.warning("raft: %s forwarded %d malformed transaction(s): %s", node, len(bad), bad[0][1])
                self._transport().send(node, {"type": FAILED, "origin": message.get("origin"),
                                              "seqs": [seq for seq, _ in bad], "reason": "it was malformed"})
            if self.forwarder.incoming and self.on_submit is not None:
                self.on_submit()  # flush on this turn of the loop, with this replica's own clients' writes
        elif kind == REFUSED:
            refused = self.forwarder.take(message)
            if refused:
                self._propose([(p, encode_tx(p.tx), None) for p in refused], int(time.time()))
        elif kind == FAILED:
            failure = OutcomeUnknown(f"the write may or may not have been committed (the leader's proposal "
                                     f"failed: {message.get('reason') or 'no reason given'}); retry it with the "
                                     "same transaction id")
            for pending in self.forwarder.take(message):
                pending.resolve(TxResult(False, error=failure))

    def _refuse(self, tx, size: int):
        """Why ``tx`` (``size`` bytes as a log entry of its own) may not be proposed, or None."""
        if size > MAX_ENTRY:
            return EntryTooLarge(f"the transaction is {size} bytes as a log entry; at most {MAX_ENTRY} fit: "
                                 "store large values as chunks (PUT /v1/keg/<path> does that by itself)")
        if tx.id is not None and ("\n" in tx.id or len(tx.id) > 200):
            return BadRequest("a transaction id is one line of at most 200 characters")
        for op in tx.ops:
            if isinstance(op, Put) and op.large:
                try:
                    pointer = Pointer.parse(op.data, op.path)
                except CorruptKeg as err:
                    return BadRequest(str(err).replace("is damaged", "is malformed"))
                missing = self.chunks.missing(sorted({name for name, _ in pointer.chunks}))
                if missing:
                    return BadRequest(f"put {op.path}: {len(missing)} chunk(s) of the value are not stored on "
                                      f"this replica (first: {missing[0]}); upload them here first")
        return None

    def _propose(self, proposed: list, when: int) -> None:
        """Propose one group: ``[(own pending or None, encoded, Incoming or None)]`` in log order."""
        pendings = [(i, p) for i, (p, _, _) in enumerate(proposed) if p is not None]
        forwarded = [item for _, _, item in proposed if item is not None]
        origins = [[i, item.origin, item.seq] for i, (_, _, item) in enumerate(proposed) if item is not None]
        payload = join_group([encoded for _, encoded, _ in proposed], when, origins)
        self._proposals.append((time.monotonic() + PROPOSE_TIMEOUT, [p for _, p in pendings], payload))
        self._own[payload] = (when, [p.tx if p is not None else item.tx for p, _, item in proposed], origins)

        def done(results, err):
            if self._held_since is not None and self.on_submit is not None:
                self.on_submit()  # the group kept back goes now
            if err == FAIL_REASON.SUCCESS and results is not None:
                for i, pending in pendings:
                    pending.resolve(results[i])
                return
            reason = {FAIL_REASON.QUEUE_FULL: "the proposal queue is full",
                      FAIL_REASON.MISSING_LEADER: "there is no leader",
                      FAIL_REASON.DISCARDED: "a new leader discarded it",
                      FAIL_REASON.NOT_LEADER: "the leader changed",
                      FAIL_REASON.LEADER_CHANGED: "the leader changed",
                      FAIL_REASON.UNKNOWN_OUTCOME: "its outcome was lost"}.get(err, f"error {err}")
            failure = OutcomeUnknown(f"the write may or may not have been committed ({reason}); "
                                     "retry it with the same transaction id")
            for _, pending in pendings:
                pending.resolve(TxResult(False, error=failure))
            if forwarded:
                Forwarder.tell(self._transport(), FAILED, forwarded, reason)

        self.raft.apply_group(payload, callback=done)

    def _expire(self) -> None:
        now = time.monotonic()
        keep = []
        for deadline, group, payload in self._proposals:
            if all(p.done for p in group) if group else payload not in self._own:
                self._own.pop(payload, None)  # answered; or (only forwarded writes in it) applied
                continue
            if deadline > now:
                keep.append((deadline, group, payload))
                continue
            self._own.pop(payload, None)
            failure = OutcomeUnknown(f"no quorum answered within {PROPOSE_TIMEOUT:g} s; the write may or may "
                                     "not be committed: retry it with the same transaction id")
            for pending in group:
                pending.resolve(TxResult(False, error=failure))
        self._proposals = keep
        leader = self.raft._getLeader()
        gone = self.forwarder.abandon(leader.address if leader is not None else None)
        if gone:
            failure = OutcomeUnknown("the write may or may not have been committed (the leader it was forwarded "
                                     "to is no longer the leader); retry it with the same transaction id")
            for pending in gone:
                pending.resolve(TxResult(False, error=failure))

    def apply_entry(self, payload: bytes, index: int):
        """Apply log entry ``index`` (a group) to the keg: the same commit on every replica.

        Returns:
            One ``TxResult`` per transaction of the group (for the replica that proposed it).
        """
        self.journal.sync()
        if index <= self.applied_index:
            return None  # the keg has it already (a replay after a restart)
        # A group this replica proposed applies from the transactions it encoded, which decode_group
        # gives back equal (test_group_encoding_round_trips_exactly): the bytes are the same entry.
        own = self._own.pop(payload, None)
        when, transactions, origins = own if own is not None else decode_entry(payload)
        results: list = [None] * len(transactions)
        todo, first_of = [], {}
        with self._lock:
            head = self.store.head_revision
            for i, tx in enumerate(transactions):
                if tx.id is not None:
                    number = self._committed_id(tx.id, head)
                    if number is not None:
                        results[i] = self._replayed(tx, number)
                        self.stats["replayed_ids"] += 1
                        continue
                    if tx.id in first_of:
                        continue  # the same id twice in one group: it gets the first one's result
                    first_of[tx.id] = i
                todo.append(i)
            try:
                applied = self.store.commit([transactions[i] for i in todo], when=when,
                                            trailers=(f"{RAFT_INDEX_TRAILER}{index}",), check_chunks=False,
                                            sync=False)  # the Raft log is the write-ahead log
            except KegError:
                log.exception("raft: applying log entry %d failed; this replica stops applying until it can",
                              index)
                raise
            after = self.store.head_revision
        for i, result in zip(todo, applied):
            results[i] = result
            tx = transactions[i]
            if result.ok and tx.id is not None:
                self._ids[tx.id] = result.revision
            if result.ok:
                self._want_missing(tx)
        for i, tx in enumerate(transactions):
            if results[i] is None:
                results[i] = results[first_of[tx.id]]
        if origins:
            self.forwarder.answered(origins, results)
            if self.raft._isLeader():
                self.raft.forwarded_upto = max(self.raft.forwarded_upto, index)  # the followers wait: tell them
        self.stats["transactions"] += len(transactions)
        self.stats["groups"] += 1
        if after != head:
            self.applied_index = index
            self.stats["commits"] += 1
            self._announce(after)
        return results

    def _want_missing(self, tx) -> None:
        """Note what ``tx`` names that this replica lacks (a majority has it): chunks of its large puts, and
        the commit of a pushed source (``/src/<app>``). Both are fetched later."""
        for op in tx.ops:
            if not isinstance(op, Put):
                continue
            if op.large:
                names = sorted({n for n, _ in Pointer.parse(op.data, op.path).chunks})
                self._wanted.update(self.chunks.missing(names))
            elif op.mode == MODE_GITLINK:
                self.sources.want((op,))

    def _fetch_wanted(self) -> None:
        """Have the fetch worker fetch chunks this replica missed from the others, a batch at a time (a chunk
        no replica gave is asked for again after ``PEER_BACKOFF``); then missed sources."""
        now = time.monotonic()
        if self._wanted and not self._fetching_chunks:
            names = [n for n in sorted(self._wanted) if self._chunk_retry.get(n, 0) <= now][:CHUNKS_PER_FETCH]
            if names:
                self._fetching_chunks = True
                try:
                    self.chunk_fetcher.fetch(names, self._peer_list(), lambda _got: self._chunks_fetched(names))
                except KegBusy:   # no child could be started: ask again in a while
                    self._chunks_fetched(names)
        if self.sources.wanted or self.sources.fetching:
            self.sources.fetch_wanted()

    def _chunks_fetched(self, names: list) -> None:
        """The fetch worker has answered for ``names``: forget those now held, ask later for the others."""
        self._fetching_chunks = False
        retry_at = time.monotonic() + PEER_BACKOFF
        for name in names:
            if self.chunks.missing([name]):
                self._chunk_retry[name] = retry_at
            else:
                self._wanted.discard(name)
                self._chunk_retry.pop(name, None)

    def _replayed(self, tx, number: int) -> TxResult:
        """The result of a transaction applied before, at revision ``number`` (a retry of the same id)."""
        revision = self.store.revision(number)
        kids = {}
        for op in tx.ops:
            try:
                kids[op.path] = self.store.kid(op.path, number) if isinstance(op, Put) else None
            except NotFound:
                kids[op.path] = None
        return TxResult(True, number, revision.kid, kids)

    def read_barrier(self) -> Pending:
        """A ``Pending`` resolved once this replica has applied everything committed before the call."""
        pending = RaftPending(None, self)
        self._proposals.append((time.monotonic() + PROPOSE_TIMEOUT, [pending], None))

        def done(_index, err):
            if err == FAIL_REASON.SUCCESS:
                with self._lock:
                    revision = self.store.revision()
                pending.resolve(TxResult(True, revision.number, revision.kid, {}))
            else:
                pending.resolve(TxResult(False, error=OutcomeUnknown(
                    "no quorum confirmed the read (no leader?); retry, or read without ?linearizable")))

        self.raft.barrier(callback=done)
        if self._loop is None:
            self._tick()
        else:
            self._loop.call_soon(self._tick)  # batch mode: nothing else wakes the loop for a queued command
        return pending

    # ------------------------------------------------------------ chunks

    def replicate_chunks(self, names):
        """The chunks go to the other replicas from the chunk worker's child (master/raft_chunks.py), so the
        event loop never waits for one; without an event loop (``run_until``) they are sent here and now."""
        if self._loop is None:
            pending = RaftPending(None, self)
            try:
                self._replicate_chunks(names)
                pending.resolve(TxResult(True))
            except KegBusy as err:
                pending.resolve(TxResult(False, error=err))
            return pending
        return self.chunk_pusher.push(names, self._peer_list(), self.majority(), len(self.peers), self)

    def majority(self) -> int:
        """How many replicas are a majority of the cluster."""
        return len(self.peers) // 2 + 1

    def others_leader_first(self) -> list:
        """The other replicas' Raft addresses, the leader (if known and not this one) first."""
        leader = self.raft._getLeader()
        return sorted((a for a in self.peers if a != self.self_raft),
                      key=lambda a: (leader is None or a != leader.address, a))

    def peer_down(self, address: str) -> bool:
        """Whether the replica at ``address`` failed to answer less than ``PEER_BACKOFF`` seconds ago."""
        return self._peer_down.get(address, 0) > time.monotonic()

    def mark_down(self, address: str) -> None:
        """Ask the replica at ``address`` nothing more for ``PEER_BACKOFF`` seconds."""
        self._peer_down[address] = time.monotonic() + PEER_BACKOFF

    def _replicate_chunks(self, names: list) -> None:
        """Store ``names`` (held here) on a majority of replicas, or raise KegBusy."""
        down: list = []
        try:
            store_on_majority(self.chunks.get, names, self._peer_list(), self.majority(), len(self.peers),
                              self.peer_token, down)
        finally:
            for address in down:
                self.mark_down(address)

    def _peer_list(self) -> list:
        """``[(Raft address, URL, down), …]`` of the other replicas, the leader first."""
        return [(a, self.peer_url(a), self.peer_down(a)) for a in self.others_leader_first()]

    def start_source(self, app, commit, pack):
        """As ``SingleMaster.start_source``; the child also sends the source to the other replicas, the leader
        first, until a majority holds it (master/raft_sources.py), else the job fails with KegBusy."""
        from master.source_job import SourceJob

        sources.check_commit(app, commit)
        peers = [(a, self.peer_url(a)) for a in self.others_leader_first() if not self.peer_down(a)]
        return SourceJob(self.store.path, app, commit, pack, peers=peers, majority=self.majority(),
                         replicas=len(self.peers), token=self.peer_token)

    def source_stored(self, job) -> str:
        for address in job.result.get("down", ()):
            self.mark_down(address)
        return super().source_stored(job)

    def peer_call(self, address: str, method: str, target: str, body: bytes | None = None,
                  timeout: float = PEER_TIMEOUT) -> tuple:
        """One HTTP request to another replica with the peer token: ``(status, body)`` (``peers.peer_request``)."""
        return peer_request(self.peer_url(address), self.peer_token, method, target, body, timeout)

    def peer_url(self, address: str) -> str:
        """The HTTP URL of the replica at Raft ``address`` (also of one added after the start)."""
        peer = self.peers.get(address)
        if peer is not None:
            return peer.url
        own = urllib.parse.urlsplit(self.self_url)
        return f"{own.scheme}://{address.rpartition(':')[0]}:{own.port}"

    # ------------------------------------------------------------ snapshots

    def _write_snapshot(self, filename: str, data) -> None:
        """pysyncobj's serializer: the log position, the keg's head there, and the cluster; no pickle."""
        last, before, cluster = data
        with self._lock:
            self.store.checkpoint()   # the refs on disk now hold everything applied: durable
            revision = self.store.revision()
        snapshot = {
            "format": 1, "source": self.self_raft, "revision": revision.number, "commit": revision.kid,
            "entries": [[base64.b64encode(bytes(e[0])).decode("ascii"), e[1], e[2]] for e in (last, before)],
            "cluster": sorted(n.address if hasattr(n, "address") else str(n) for n in cluster),
        }
        write_file_atomic(filename, json.dumps(snapshot).encode(), durable=self.journal.durable)
        self.stats["snapshots_sent"] += 1

    def _read_snapshot(self, filename: str) -> tuple:
        """pysyncobj's deserializer: bring the keg to the snapshot's commit (git fetch when behind)."""
        with open(filename, "rb") as f:
            if self.journal.durable:
                # A snapshot received from the leader was written and renamed by pysyncobj without fsync;
                # it must be durable before pysyncobj replaces the log by the snapshot's two entries.
                os.fsync(f.fileno())
                fsync_dir(os.path.dirname(filename))
            snapshot = json.load(f)
        if snapshot.get("format") != 1:
            raise CorruptKeg(f"{filename}: unknown snapshot format {snapshot.get('format')!r}")
        number, commit = snapshot["revision"], snapshot["commit"]
        with self._lock:
            head = self.store.head_revision
            if head < number or self.store.revision(number).kid != commit:
                if head >= number:
                    raise CorruptKeg(f"this replica's revision {number} is {self.store.revision(number).kid}, "
                                     f"the cluster's is {commit}: the replica's keg has diverged; rebuild it "
                                     "from a copy of another replica")
                self._fetch_commit(snapshot["source"], commit)
                self.stats["snapshots_loaded"] += 1
                self.sources.want_all()  # git fetch brought the namespace, not the pushed sources it names
                after = self.store.head_revision
                self._load_applied()
                self._announce(after)
        # A fetch takes time; do not let it count as the leader's silence.
        self.raft._SyncObj__raftElectionDeadline = time.monotonic() + 1.0
        entries = [(base64.b64decode(c), i, t) for c, i, t in snapshot["entries"]]
        return entries[0], entries[1], [TCPNode(a) for a in snapshot["cluster"]]

    def _fetch_commit(self, source: str, commit: str) -> None:
        """git fetch ``commit`` from the replica at ``source`` and make it this keg's head."""
        url = self.peer_url(source) + "/v1/raft/git/keg.git"
        # The peer token goes in the environment, not on the command line (keg/gitenv.py).
        env = git_http_env(self.peer_token, {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.raft_dir})
        done = subprocess.run(
            ["git",
             # Always one pack (never loose objects), fsynced by git, whose name fsync_dir below makes durable.
             "-c", "fetch.unpackLimit=1", "-c", "core.fsync=pack,pack-metadata", "-c", "core.fsyncMethod=fsync",
             "--git-dir", self.store.path,
             "fetch", "--quiet", "--no-tags", url, "+refs/heads/main:refs/keg/raft-incoming"],
            capture_output=True, text=True, env=env, timeout=300, check=False)
        if done.returncode != 0:
            raise KegBusy(f"fetching the snapshot from {source} failed: {done.stderr.strip()[-500:]}")
        if self.journal.durable:
            fsync_dir(os.path.join(self.store.path, "objects", "pack"))  # before the ref names the commit
        self.store.fast_forward(bytes.fromhex(commit[2:]))

    # ------------------------------------------------------------ status, membership

    def status(self) -> dict:
        """What ``keg master status`` shows for this replica."""
        raw = self.raft.getStatus()
        leader = raw.get("leader")
        with self._lock:
            revision = self.store.revision()
            housekeeping = self.store.housekeeping_status()
        peers = []
        for address in sorted(self.peers):
            if address == self.self_raft:
                continue
            peers.append({"raft": address, "url": self.peer_url(address),
                          "connected": raw.get(f"partner_node_status_server_{address}") == 2,
                          "match_index": raw.get(f"match_idx_server_{address}")})
        for node in self.raft.otherNodes:
            if node.address not in self.peers:
                peers.append({"raft": node.address, "url": self.peer_url(node.address),
                              "connected": self.raft.isNodeConnected(node),
                              "match_index": raw.get(f"match_idx_server_{node.address}")})
        return {"mode": "raft", "raft": self.self_raft, "url": self.self_url, "role": ROLES.get(raw["state"]),
                "leader": leader.address if leader is not None else None, "term": raw["raft_term"],
                "commit_index": raw["commit_idx"], "last_applied": raw["last_applied"],
                "log_entries": raw["log_len"], "has_quorum": raw["has_quorum"],
                "revision": revision.number, "revision_kid": revision.kid, "applied_index": self.applied_index,
                "snapshots_loaded": self.stats["snapshots_loaded"], "snapshots_written": self.stats["snapshots_sent"],
                "forwarded_sent": self.forwarder.sent, "forwarded_received": self.forwarder.received,
                "peers": peers, "members": sorted([self.self_raft] + [n.address for n in self.raft.otherNodes]),
                "housekeeping": housekeeping}

    def change_membership(self, action: str, address: str) -> Pending:
        """Add or remove a replica (one at a time); the ``Pending`` resolves once the change is committed."""
        address = check_address(address, "the replica")
        if action not in ("add", "remove"):
            raise BadRequest("the membership action is 'add' or 'remove'")
        pending = RaftPending(None, self)
        self._proposals.append((time.monotonic() + PROPOSE_TIMEOUT, [pending], None))

        def done(_res, err):
            if err == FAIL_REASON.SUCCESS:
                pending.resolve(TxResult(True, self.store.head_revision, None, {}))
            else:
                pending.resolve(TxResult(False, error=KegBusy(
                    f"the cluster refused to {action} {address} (error {err}): another change may be in "
                    "progress, the replica may already be a member (or not one), or there is no leader")))

        if action == "add":
            self.raft.addNodeToCluster(address, callback=done)
        else:
            self.raft.removeNodeFromCluster(address, callback=done)
        if self._loop is None:
            self._tick()
        else:
            self._loop.call_soon(self._tick)  # batch mode: nothing else wakes the loop for a queued command
        return pending

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._loop is not None:
            try:
                self._loop.remove_reader(self.poller.fileno())
            except (ValueError, RuntimeError):
                pass
        self.flush()
        self.sources.close()
        self.chunk_pusher.close()
        self.chunk_fetcher.close()
        try:
            self.raft.destroy()
        finally:
            self.poller.close()
            super().close()


# ------------------------------------------------------------------ HTTP

def route(app, req, start_response):
    """``/v1/raft/…``: status (users), membership (admins), chunks and git for the other replicas."""
    from master.bodies import DeferredResponse
    from master import git_http

    master = app.master
    if not isinstance(master, RaftMaster):
        raise NotFound("this master is not replicated; /v1/raft/ exists only on Raft replicas")
    authorization = req.header("Authorization") or ""
    is_peer = hmac.compare_digest(authorization.encode(), f"Bearer {master.peer_token}".encode())
    principal = None
    if not is_peer:
        principal = app.authority.authenticate(authorization or None)
    rest = req.path[len("/v1/raft/"):]
    if rest == "status":
        app._allow(req, "GET")
        if principal is not None:
            app.authority.check(principal, "/", "r")
        return app._json(start_response, master.status())
    if rest == "members":
        app._allow(req, "POST")
        if principal is None:
            raise HttpError(403, "membership changes need an administrator's token, not the peer token")
        app.authority.check(principal, "/", "w")
        body = req.json_body()
        if not isinstance(body, dict) or len(body) != 1 or next(iter(body)) not in ("add", "remove"):
            raise BadRequest('the body must be {"add": "HOST:PORT"} or {"remove": "HOST:PORT"}')
        action, address = next(iter(body.items()))
        pending = master.change_membership(action, str(address))

        def render(result):
            if result.ok:
                data = (json.dumps({"ok": True, action: address}) + "\n").encode()
                return "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))], data
            data = (json.dumps({"ok": False, "error": str(result.error), "status": 503}) + "\n").encode()
            return "503 Service Unavailable", [("Content-Type", "application/json")], data

        return DeferredResponse(start_response, pending, render)
    if not is_peer:
        raise HttpError(403, f"/v1/raft/{rest.split('/')[0]} is for the other replicas only")
    if rest == "chunks/missing":
        app._allow(req, "POST")
        names = req.json_body().get("chunks")
        if not isinstance(names, list):
            raise BadRequest('the body must be {"chunks": [blake3, …]}')
        return app._json(start_response, {"missing": master.chunk_missing(names)})
    if rest.startswith("chunks/"):
        app._allow(req, "GET", "PUT")
        from keg.chunks import check_hash
        name = check_hash(rest[len("chunks/"):])
        if req.method == "GET":
            data = master.chunks.get(name)
            start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                      ("Content-Length", str(len(data)))])
            return [data]
        created = master.chunks.put(name, req.body())  # verified against its name; stored here only
        return app._json(start_response, {"chunk": name, "created": created}, 201 if created else 200)
    if rest.startswith("sources/"):
        app._allow(req, "GET", "POST")
        if req.method == "POST":
            return master.sources.store_sent(req, rest[len("sources/"):], start_response)
        return master.sources.serve(req, rest[len("sources/"):], start_response)
    if rest == "git/keg.git" or rest.startswith("git/keg.git/"):
        service = req.query.get("service", "")
        if rest.endswith("/git-receive-pack") or service == "git-receive-pack":
            raise HttpError(403, "the replicas' git is fetch only")
        master.publish()
        root = git_http.project_root(master.store.path)
        env = git_http.cgi_environ(req.environ, root, "/" + rest[len("git/"):], "raft-peer")
        return git_http.CgiBody(start_response, env, req.body())
    raise NotFound(f"no such endpoint {req.path}")


def main_log_handler() -> None:
    """Send pysyncobj's and this module's warnings to stderr (the server's log)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("keg master: %(name)s: %(message)s"))
    for name in ("keg.raft", "pysyncobj"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
