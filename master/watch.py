"""Watch streams over HTTP: server-sent events, NDJSON, and long-poll (DESIGN §4).

Every stream starts after revision ``since`` (default: the head when it
connects) and delivers each matching event once, in revision order.  All the
events of one revision are written together; the last of them is marked (an
SSE ``id:`` line, ``"end": true`` in NDJSON), so a client resumes with
``since`` set to the last revision it saw marked and misses nothing.
Heartbeats (an SSE comment, an NDJSON ``{"heartbeat": …}`` line) go out when
nothing else has for ``heartbeat`` seconds, so a dead client is noticed by the
failed write and a live one knows the server is there.
"""

from __future__ import annotations

import json
import time

from master.bodies import AsyncBody

BATCH_EVENTS = 2000  # events per poll: one busy watcher cannot hold the loop for long
FORMATS = {"ndjson": "application/x-ndjson", "sse": "text/event-stream", "poll": "application/json"}


def _ndjson(events: list) -> bytes:
    lines = []
    for i, event in enumerate(events):
        obj = event.to_json()
        if i + 1 == len(events) or events[i + 1].revision != event.revision:
            obj["end"] = True
        lines.append(json.dumps(obj, separators=(",", ":")))
    return ("\n".join(lines) + "\n").encode() if lines else b""


def _sse(events: list) -> bytes:
    parts = []
    for i, event in enumerate(events):
        parts.append("event: change\n")
        if i + 1 == len(events) or events[i + 1].revision != event.revision:
            parts.append(f"id: {event.revision}\n")
        parts.append(f"data: {json.dumps(event.to_json(), separators=(',', ':'))}\n\n")
    return "".join(parts).encode()


class WatchStream(AsyncBody):
    """One watcher's stream.

    Args:
        master: the ``Master``.
        prefix: normalised path prefix.
        since: deliver events after this revision.
        fmt: ``ndjson``, ``sse`` or ``poll``.
        heartbeat: seconds of silence before a heartbeat (streams), or the
            longest wait (``poll``).
    """

    def __init__(self, start_response, master, prefix: str, since: int, fmt: str, heartbeat: float):
        super().__init__(start_response)
        self.master = master
        self.prefix = prefix
        self.seen = since
        self.fmt = fmt
        self.heartbeat = heartbeat
        self.started = False
        self.finished = False
        self.last_write = time.monotonic()
        self.deadline = self.last_write + heartbeat
        self._loop = None
        self._wake = None
        self._timer = None
        self._timer_due = None
        self._write = None

    # ------------------------------------------------------------ shared

    def _start(self) -> bytes:
        self.started = True
        headers = [("Content-Type", FORMATS[self.fmt]), ("Cache-Control", "no-store"),
                   ("X-Accel-Buffering", "no"), ("Keg-Revision", str(self.seen))]
        self._write = self.start_response("200 OK", headers)
        return b"retry: 1000\n\n" if self.fmt == "sse" else b""

    def _step(self) -> bytes:
        """Everything new since the last step, formatted; advances ``seen``."""
        head = self.master.head_number()
        if head <= self.seen:
            return b""
        events, examined = self.master.events(self.prefix, self.seen, head, BATCH_EVENTS)
        self.seen = examined
        if self.fmt == "poll":
            if events:
                self.finished = True
                return self._poll_answer(events)
            return b""
        return _sse(events) if self.fmt == "sse" else _ndjson(events)

    def _poll_answer(self, events: list) -> bytes:
        return json.dumps({"revision": self.seen, "events": [e.to_json() for e in events]}).encode()

    def _heartbeat(self) -> bytes:
        if self.fmt == "sse":
            return b": heartbeat\n\n"
        return json.dumps({"heartbeat": True, "revision": self.seen}).encode() + b"\n"

    # ------------------------------------------------------------ event loop

    def arm(self, loop, wake) -> None:
        self._loop, self._wake = loop, wake
        self.master.subscribe(self._on_revision, self.prefix)
        self._schedule_timer()

    def _on_revision(self, head: int) -> None:
        if self._wake is not None:
            self._wake()

    def _schedule_timer(self) -> None:
        due = self.deadline if self.fmt == "poll" else self.last_write + self.heartbeat
        if self._timer is not None:
            if self._timer_due == due:
                return   # still armed for the same moment: nothing was written since
            self._timer.cancel()
        self._timer_due = due
        self._timer = self._loop.call_later(max(0.0, due - time.monotonic()) + 0.001, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._wake is not None:
            self._wake()

    def poll(self) -> tuple:
        out = []
        if not self.started:
            out.append(self._start())
        data = self._step()
        now = time.monotonic()
        if data:
            out.append(data)
            self.last_write = now
        elif self.fmt == "poll" and now >= self.deadline:
            out.append(self._poll_answer([]))
            self.finished = True
        elif self.fmt != "poll" and now - self.last_write >= self.heartbeat:
            out.append(self._heartbeat())
            self.last_write = now
        if self.finished:
            return out, True
        if self.master.head_number() > self.seen and self._wake is not None:
            self._loop.call_soon(self._wake)  # a large backlog: go on after others had a turn
        else:
            self._schedule_timer()
        return out, False

    def close(self) -> None:
        if self._wake is not None:
            self.master.unsubscribe(self._on_revision)
            self._wake = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ------------------------------------------------------------ threads

    def __iter__(self):
        preamble = self._start()
        if preamble:
            yield preamble
        else:
            # A threaded server (flup) sends the headers with the first
            # non-empty chunk, and NDJSON or a long poll has none until
            # something changes: send them now, as the event loop does, so
            # the client knows at once that it watches, and from which revision.
            self._write(b"")
        while not self.finished:
            data = self._step()
            now = time.monotonic()
            if data:
                self.last_write = now
                yield data
                continue
            if self.fmt == "poll":
                if now >= self.deadline:
                    yield self._poll_answer([])
                    return
                self.master.wait_for_revision(self.seen, self.deadline - now)
            elif now - self.last_write >= self.heartbeat:
                self.last_write = now
                yield self._heartbeat()
            else:
                self.master.wait_for_revision(self.seen, self.last_write + self.heartbeat - now)
