"""Writes through a follower: its transactions join the leader's next group (DESIGN §4).

A follower does not propose a group of its own.  It sends the transactions
it was given (each encoded as it would be in a log entry) to the leader in
one message over the Raft connection, and the leader puts them into its next
group together with its own clients' and the other followers'.  The log
entry names where each forwarded transaction came from (``"from"``: its
position in the group, the follower's *origin* and a sequence number), so
the follower that sent it answers its client from its own apply of that
entry, with the same result every replica computed.

Forwarding does not change what is committed: the commit is made from the
transactions alone, and the origin is only who answers.  What it changes is
the number of log entries: with clients on every replica, one entry (one
commit, one round of messages and fsyncs, one wide-directory rewrite on
every replica) carries all their writes instead of one entry per replica.

Every outcome reaches the follower's client exactly once:

- applied: the follower resolves it from its apply of the entry;
- the receiver is not the leader (any more) and proposed nothing:
  ``REFUSED``, and the follower proposes the transactions through pysyncobj,
  which waits for a leader;
- the leader proposed it but the proposal failed (``FAILED``), the leader
  changed before the follower saw the entry applied, or nothing came back in
  time: "outcome unknown" (retry with the same transaction id).

An origin is the follower's Raft address and a random part drawn at start,
so a transaction forwarded before a restart never answers one sent after it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

FORWARD = "keg_forward"            # follower -> leader: {"origin", "txs": [[seq, encoded], ...]}
REFUSED = "keg_forward_refused"    # not the leader -> follower: {"origin", "seqs"}: nothing was proposed
FAILED = "keg_forward_failed"      # leader -> follower: {"origin", "seqs", "reason"}: the proposal failed
MESSAGES = (FORWARD, REFUSED, FAILED)


@dataclass(slots=True)
class Incoming:
    """One transaction a follower forwarded, waiting at the leader for its next group."""

    node: object        # pysyncobj node it came from (for REFUSED / FAILED)
    origin: str
    seq: int
    encoded: bytes      # exactly as it goes into the log entry
    tx: object          # the Transaction those bytes decode to


class Forwarder:
    """Both sides of forwarding for one replica: its own transactions sent away, and those received.

    Args:
        self_raft: this replica's Raft address (the first part of its origin).
        decode_tx: bytes of one encoded transaction -> ``Transaction``, raising
            ``ValueError`` on malformed bytes.
    """

    def __init__(self, self_raft: str, decode_tx):
        self.origin = f"{self_raft}/{os.urandom(6).hex()}"
        self.decode_tx = decode_tx
        self.waiting: dict = {}      # seq -> Pending of this replica's transactions at the leader
        self.leader = None           # Raft address of the leader they went to
        self.incoming: list = []     # Incoming, as leader
        self.sent = 0                # transactions forwarded (status and tests)
        self.received = 0            # transactions received from followers
        self._seq = 0

    # ------------------------------------------------------------ follower side

    def send(self, transport, leader, items: list) -> bool:
        """Send ``items`` (``[(pending, encoded)]``) to ``leader`` (a pysyncobj node) in one message.

        Returns:
            False if the connection to the leader is down (nothing is waiting then).
        """
        txs = []
        for pending, encoded in items:
            self._seq += 1
            self.waiting[self._seq] = pending
            txs.append([self._seq, encoded])
        if not transport.send(leader, {"type": FORWARD, "origin": self.origin, "txs": txs}):
            for seq, _ in txs:
                del self.waiting[seq]
            return False
        self.leader = leader.address
        self.sent += len(txs)
        return True

    def answered(self, origins: list, results: list) -> None:
        """Resolve this replica's transactions in an applied entry (``origins`` from its ``"from"``)."""
        for position, origin, seq in origins:
            if origin == self.origin:
                pending = self.waiting.pop(seq, None)
                if pending is not None:
                    pending.resolve(results[position])

    def take(self, message: dict) -> list:
        """The pendings a ``REFUSED`` or ``FAILED`` message names (no longer waiting)."""
        if message.get("origin") != self.origin:
            return []  # meant for this replica before a restart
        taken = [self.waiting.pop(seq, None) for seq in message.get("seqs", ())]
        return [p for p in taken if p is not None]

    def abandon(self, leader) -> list:
        """The pendings sent to a leader other than ``leader`` (an address or None), and those already done."""
        if not self.waiting:
            return []
        if leader != self.leader:
            gone, self.waiting = list(self.waiting.values()), {}
            return gone
        for seq in [s for s, p in self.waiting.items() if p.done]:
            del self.waiting[seq]  # answered by a timeout
        return []

    # ------------------------------------------------------------ leader side

    def receive(self, node, message: dict) -> list:
        """Queue a ``FORWARD`` message's transactions; returns the sequence numbers that were malformed."""
        origin, bad = message.get("origin"), []
        if not isinstance(origin, str):
            return []
        for item in message.get("txs", ()):
            try:
                seq, encoded = item
                tx = self.decode_tx(encoded)
            except (ValueError, TypeError) as err:  # TypeError: not a [seq, bytes] pair
                bad.append((item[0] if isinstance(item, (list, tuple)) and item else None, str(err)))
                continue
            self.incoming.append(Incoming(node, origin, seq, encoded, tx))
            self.received += 1
        return bad

    def take_incoming(self) -> list:
        incoming, self.incoming = self.incoming, []
        return incoming

    @staticmethod
    def tell(transport, kind: str, incoming: list, reason: str = "") -> None:
        """Send ``REFUSED`` or ``FAILED`` for ``incoming`` to the followers they came from (best effort)."""
        by_sender: dict = {}
        for item in incoming:
            by_sender.setdefault((item.node, item.origin), []).append(item.seq)
        for (node, origin), seqs in by_sender.items():
            transport.send(node, {"type": kind, "origin": origin, "seqs": seqs, "reason": reason})


def origins_json(origins: list) -> bytes:
    """The ``"from"`` list of a group: ``[[position, origin, seq], ...]``, compact JSON."""
    return json.dumps(origins, separators=(",", ":")).encode()
