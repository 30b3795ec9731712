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

import fcntl
import logging
import os
import subprocess
import tempfile

READ_SIZE = 256 << 10

log = logging.getLogger("keg.master")


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


class Then(AsyncBody):
    """An answer made by ``then()`` once something has finished: ``then`` calls ``start_response`` and returns
    the body, or returns another ``AsyncBody`` to wait for in turn.

    Subclasses say what is waited for: ``_arm_first``, ``_first_done`` (never blocks), ``_wait_first`` (blocks:
    threaded servers) and ``_abandon_first`` (the client went away before it finished).
    """

    def __init__(self, start_response, then):
        super().__init__(start_response)
        self.then = then
        self.next = None
        self._loop = None
        self._wake = None

    def arm(self, loop, wake) -> None:
        self._loop, self._wake = loop, wake
        self._arm_first(loop, wake)

    def poll(self) -> tuple:
        if self.next is None:
            if not self._first_done():
                return [], False
            self.next = self.then()
            if isinstance(self.next, AsyncBody):
                self.next.arm(self._loop, self._wake)
        if isinstance(self.next, AsyncBody):
            return self.next.poll()
        return list(self.next), True

    def __iter__(self):
        self._wait_first()
        self.next = self.then()
        yield from self.next

    def close(self) -> None:
        if self.next is None:
            self._abandon_first()
        elif hasattr(self.next, "close"):
            self.next.close()

    def _arm_first(self, loop, wake) -> None:
        raise NotImplementedError

    def _first_done(self) -> bool:
        raise NotImplementedError

    def _wait_first(self) -> None:
        raise NotImplementedError

    def _abandon_first(self) -> None:
        """Nothing to let go of, unless a subclass holds something."""


class AfterPending(Then):
    """``then()`` once a ``Pending`` is resolved (chunks sent to the other replicas, for instance)."""

    def __init__(self, start_response, pending, then):
        super().__init__(start_response, then)
        self.pending = pending

    def _arm_first(self, loop, wake) -> None:
        self.pending.add_callback(wake)

    def _first_done(self) -> bool:
        return self.pending.done

    def _wait_first(self) -> None:
        self.pending.wait()


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


class CommandBody(AsyncBody):
    """The streamed standard output of a command (git's, as a rule), read as it becomes readable.

    The response starts with the command's first bytes (``_head``), so a
    command that fails before it writes anything is answered 500 with its
    standard error (also logged).  One that fails later is logged, and the
    answer is cut off without its end (``cut_on_failure``; a chunked answer
    without its last chunk, which no client takes for a whole one).

    Args:
        argv: the command.
        env: its environment.
        stdin: what it reads (through a temporary file, so that a large input
            cannot deadlock against a large output).
        status, headers: the answer's status line and headers.
        what: names the command in the 500 answer and the log.
    """

    cut_on_failure = True   # a subclass whose command reports its own failures in its output sets False

    def __init__(self, start_response, argv: list, env: dict, stdin: bytes = b"", status: str = "200 OK",
                 headers=(), what: str = "the command"):
        super().__init__(start_response)
        self.status, self.headers, self.what = status, list(headers), what
        self.err = tempfile.TemporaryFile()
        try:
            with tempfile.TemporaryFile() as source:
                source.write(stdin)
                source.seek(0)
                self.proc = subprocess.Popen(argv, env=env, stdin=source, stdout=subprocess.PIPE, stderr=self.err)
        except BaseException:
            self.err.close()
            raise
        self.out = self.proc.stdout
        self.headers_done = False
        self._loop = None

    def _head(self, data: bytes) -> bytes:
        """Start the response on the command's first output; returns the body bytes among ``data``."""
        self.start_response(self.status, self.headers)
        self.headers_done = True
        return data

    def _why(self) -> str:
        """The command's standard error (the end of it), logged with its exit status."""
        self.err.seek(0, os.SEEK_END)
        self.err.seek(max(0, self.err.tell() - 4096))
        why = self.err.read().decode(errors="replace").strip() or "no output"
        log.warning("master: %s failed (exit status %s): %s", self.what, self.proc.returncode, why)
        return why

    def _finish_error(self) -> bytes:
        why = self._why()
        self.start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
        self.headers_done = True
        return f"{self.what} failed: {why}\n".encode()

    def _check_end(self) -> None:
        """At the end of a started answer: raise if the command failed (the server then cuts the answer off)."""
        if self.cut_on_failure and self.proc.wait() != 0:
            why = self._why()
            self.close()
            raise OSError(f"{self.what} failed after its answer began: {why}")

    # ------------------------------------------------------------ event loop

    def arm(self, loop, wake) -> None:
        self._loop = loop
        fd = self.out.fileno()
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        loop.add_reader(fd, wake)

    def poll(self) -> tuple:
        if self.out.closed:
            return [], True
        try:
            data = os.read(self.out.fileno(), READ_SIZE)
        except BlockingIOError:
            return [], False
        if not data:
            if self.headers_done:
                self._check_end()
                answer = []
            else:
                self.proc.wait()
                answer = [self._finish_error()]
            self.close()
            return answer, True
        if not self.headers_done:
            data = self._head(data)
        return ([data] if data else []), False

    def close(self) -> None:
        if self._loop is not None and self.out is not None and not self.out.closed:
            self._loop.remove_reader(self.out.fileno())
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if not self.out.closed:
            self.out.close()
        self.err.close()

    # ------------------------------------------------------------ threads

    def __iter__(self):
        try:
            while True:
                data = self.out.read1(READ_SIZE) if hasattr(self.out, "read1") else self.out.read(READ_SIZE)
                if not data:
                    if self.headers_done:
                        self._check_end()
                    else:
                        self.proc.wait()
                        yield self._finish_error()
                    return
                if not self.headers_done:
                    data = self._head(data)
                if data:
                    yield data
        finally:
            self.close()
