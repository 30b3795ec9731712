"""Response bodies that an event loop can drive without blocking, and threads can simply iterate.

A WSGI application returns an iterable; a threaded server (flup) iterates it
and may block.  The event-loop server (``master/server.py``) instead looks for
``AsyncBody``: it calls ``arm`` once, then ``poll`` whenever the body said it
may have more, and never blocks.  The same object therefore serves both, and
the application does not know which server runs it.

``start_response`` may be called late, from the first ``poll`` or the first
step of iteration, which WSGI allows (PEP 3333, "the start_response callable").
"""

from __future__ import annotations


class AsyncBody:
    """Base of bodies that produce data over time."""

    def __init__(self, start_response):
        self.start_response = start_response

    def arm(self, loop, wake) -> None:
        """Event-loop servers only: call ``wake()`` whenever ``poll`` may return more."""
        raise NotImplementedError

    def poll(self) -> tuple:
        """``(chunks ready now, finished)``; never blocks."""
        raise NotImplementedError

    def __iter__(self):
        raise NotImplementedError

    def close(self) -> None:
        """The client went away or the response is complete."""


class DeferredResponse(AsyncBody):
    """The answer to a write: known once the group commit holding it is durable.

    Args:
        pending: the ``Pending`` transaction.
        render: ``render(TxResult) -> (status, headers, body bytes)``.
    """

    def __init__(self, start_response, pending, render):
        super().__init__(start_response)
        self.pending = pending
        self.render = render

    def arm(self, loop, wake) -> None:
        self.pending.add_callback(wake)

    def _answer(self) -> bytes:
        status, headers, body = self.render(self.pending.result)
        self.start_response(status, headers)
        return body

    def poll(self) -> tuple:
        if not self.pending.done:
            return [], False
        return [self._answer()], True

    def __iter__(self):
        self.pending.wait()
        yield self._answer()


class ValueStream(AsyncBody):
    """A large value sent a chunk per turn of the loop, each chunk verified as it is read.

    The event-loop server polls it again only while the client keeps up (it
    stops polling a paused transport), so a slow reader costs one chunk of
    memory, not the whole value.  A damaged chunk ends the response early;
    with ``Content-Length`` set, the client sees a short body, never wrong
    bytes.

    Args:
        status, headers: the answer's status line and headers (with Content-Length).
        reader: a ``keg.large.LargeReader``.
    """

    def __init__(self, start_response, status, headers, reader):
        super().__init__(start_response)
        self.status, self.headers = status, headers
        self.pieces = reader.iter_chunks()
        self.reader = reader
        self.wake = None
        self.loop = None
        self.started = False

    def _start(self):
        if not self.started:
            self.started = True
            self.start_response(self.status, self.headers)

    def arm(self, loop, wake) -> None:
        self.loop, self.wake = loop, wake

    def poll(self) -> tuple:
        self._start()
        piece = next(self.pieces, None)
        if piece is None:
            return [], True
        self.loop.call_soon(self.wake)
        return [piece], False

    def __iter__(self):
        self._start()
        yield from self.pieces

    def close(self) -> None:
        self.reader.close()
