"""The standalone server: HTTP/1.1 on one single-threaded asyncio event loop (DESIGN §1.5).

One process, one thread.  Each connection reads requests as they arrive and
runs the WSGI application for them in the loop; the application answers reads
at once and returns an ``AsyncBody`` for anything that waits (a write waiting
for its group commit, a watch stream, git's CGI output), which the loop drives
without blocking.  Writes submitted during one turn of the loop are committed
together at the start of the next (``Master.flush``), which is where group
commit comes from.  A slow client only fills its own socket buffer: its body is
not polled while the transport is paused, so it costs memory bounded by the
buffer limits, not a thread, and never blocks anyone else.

Also here: ``serve_fastcgi``, the same application under flup's FastCGI
server for nginx.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import sys
import threading
import time

from master.bodies import AsyncBody

MAX_HEADER = 64 << 10
HEADER_TIMEOUT = 30.0       # a request's headers must arrive within this
IDLE_TIMEOUT = 120.0        # an idle keep-alive connection is closed after this
WRITE_HIGH = 1 << 20        # pause polling a body when this much is buffered for the client
FASTCGI_STOP_GRACE = 5.0    # on SIGTERM, how long flup's requests in flight may take to finish


class Connection(asyncio.Protocol):
    """One client connection; requests on it are answered in order."""

    def __init__(self, server: "HttpServer"):
        self.server = server
        self.transport = None
        self.buf = bytearray()
        self.body: AsyncBody | None = None
        self.busy = False
        self.paused = False
        self.pump_scheduled = False
        self.closed = False
        self.keep_alive = True
        self.chunked = False
        self.head_only = False
        self.status = None
        self.headers = None
        self.headers_sent = False
        self.last_activity = time.monotonic()
        self.request_started = None

    # ------------------------------------------------------------ asyncio

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connections.add(self)

    def connection_lost(self, exc):
        self.closed = True
        self.server.connections.discard(self)
        self._close_body()

    def data_received(self, data):
        self.last_activity = time.monotonic()
        self.buf += data
        if not self.busy:
            self._next_request()

    def eof_received(self):
        if not self.busy:
            return False  # close
        # Keep the socket half open: a streaming answer notices on its next write.  TLS cannot (asyncio
        # closes the transport whatever this says, and warns when told otherwise): the answer ends then.
        return self.server.tls is None

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        self.wake()

    # ------------------------------------------------------------ requests

    def _next_request(self):
        while not self.busy and not self.closed:
            if self.request_started is None and self.buf:
                self.request_started = time.monotonic()
            parsed = self._parse()
            if parsed is None:
                return
            self.request_started = None
            self._dispatch(*parsed)

    def _parse(self):
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEADER:
                self._fail(431, "request headers too large")
            return None
        head = bytes(self.buf[:end]).decode("latin-1")
        lines = head.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._fail(400, "malformed request line")
            return None
        method, target, version = parts
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                self._fail(400, "malformed header line")
                return None
            key = name.strip().lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        body_start = end + 4
        if "chunked" in headers.get("transfer-encoding", "").lower():
            decoded = self._dechunk(body_start)
            if decoded is None:
                return None
            body, consumed = decoded
        else:
            try:
                length = int(headers.get("content-length", "0") or "0")
            except ValueError:
                self._fail(400, "Content-Length is not a number")
                return None
            if length > self.server.max_body:
                self._fail(413, f"body of {length} bytes is larger than the {self.server.max_body} accepted")
                return None
            if headers.get("expect", "").lower() == "100-continue" and len(self.buf) == body_start:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                headers.pop("expect")
            if len(self.buf) < body_start + length:
                return None
            body, consumed = bytes(self.buf[body_start:body_start + length]), body_start + length
        del self.buf[:consumed]
        return method, target, version, headers, body

    def _dechunk(self, pos: int):
        out = bytearray()
        while True:
            line_end = self.buf.find(b"\r\n", pos)
            if line_end < 0:
                return None
            try:
                size = int(bytes(self.buf[pos:line_end]).split(b";")[0], 16)
            except ValueError:
                self._fail(400, "malformed chunked body")
                return None
            if len(out) + size > self.server.max_body:
                self._fail(413, f"body larger than the {self.server.max_body} bytes accepted")
                return None
            start = line_end + 2
            if size == 0:
                trailer_end = self.buf.find(b"\r\n", start)
                while trailer_end >= 0 and trailer_end != start:  # skip trailers
                    start = trailer_end + 2
                    trailer_end = self.buf.find(b"\r\n", start)
                if trailer_end < 0:
                    return None
                return bytes(out), trailer_end + 2
            if len(self.buf) < start + size + 2:
                return None
            out += self.buf[start:start + size]
            pos = start + size + 2

    def _fail(self, code: int, message: str):
        body = ('{"error": "%s", "error_type": "HttpError", "status": %d}\n' % (message, code)).encode()
        reason = {400: "Bad Request", 413: "Content Too Large", 431: "Request Header Fields Too Large"}[code]
        self.transport.write(f"HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        self.transport.close()
        self.closed = True

    def _environ(self, method, target, version, headers, body) -> dict:
        path, _, query = target.partition("?")
        if path.startswith(("http://", "https://")):
            path = "/" + path.split("/", 3)[-1] if path.count("/") >= 3 else "/"
        from urllib.parse import unquote_to_bytes
        environ = {
            "REQUEST_METHOD": method, "SCRIPT_NAME": "",
            "PATH_INFO": unquote_to_bytes(path).decode("latin-1"),
            "QUERY_STRING": query, "SERVER_PROTOCOL": version,
            "SERVER_NAME": self.server.host, "SERVER_PORT": str(self.server.port),
            "CONTENT_TYPE": headers.get("content-type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": (self.transport.get_extra_info("peername") or ("",))[0] or "",
            "wsgi.version": (1, 0), "wsgi.url_scheme": self.server.scheme, "wsgi.input": io.BytesIO(body),
            "wsgi.errors": sys.stderr, "wsgi.multithread": False, "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        for name, value in headers.items():
            if name in ("content-type", "content-length"):
                continue
            environ["HTTP_" + name.upper().replace("-", "_")] = value
        return environ

    def _dispatch(self, method, target, version, headers, body):
        self.busy = True
        conn = headers.get("connection", "").lower()
        self.keep_alive = (version == "HTTP/1.1" and "close" not in conn) or "keep-alive" in conn
        self.head_only = method == "HEAD"
        self.status, self.headers, self.headers_sent = None, None, False
        environ = self._environ(method, target, version, headers, body)
        try:
            result = self.server.app(environ, self._start_response)
        except Exception as err:  # the application's own handler turns Keg's errors into answers
            self.server.log(f"error in {method} {target}: {err!r}")
            self._start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
            result = [b"internal error\n"]
        if isinstance(result, AsyncBody):
            self.body = result
            result.arm(self.server.loop, self.wake)
            self._pump()
            return
        try:
            self._send(b"".join(result), finished=True)
        finally:
            if hasattr(result, "close"):
                result.close()

    def _start_response(self, status, headers, exc_info=None):
        if exc_info and self.headers_sent:
            raise exc_info[1].with_traceback(exc_info[2])
        self.status, self.headers = status, list(headers)
        return self._legacy_write

    def _legacy_write(self, data: bytes):
        self._send(data, finished=False)

    # ------------------------------------------------------------ responses

    def _headers_bytes(self, finished: bool, size: int) -> bytes:
        names = {name.lower() for name, _ in self.headers}
        lines = [f"HTTP/1.1 {self.status}"]
        lines += [f"{name}: {value}" for name, value in self.headers]
        self.chunked = False
        if "content-length" not in names:
            if finished:
                lines.append(f"Content-Length: {size}")
            else:
                self.chunked = True
                lines.append("Transfer-Encoding: chunked")
        if not self.keep_alive:
            lines.append("Connection: close")
        self.headers_sent = True
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _send(self, data: bytes, finished: bool):
        if self.closed:
            return
        out = b""
        if not self.headers_sent:
            if self.status is None:
                if not data and not finished:
                    return
                raise RuntimeError("the application sent a body before start_response")
            out = self._headers_bytes(finished, len(data))
        if data and not self.head_only:
            out += b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data
        if finished and self.chunked and not self.head_only:
            out += b"0\r\n\r\n"
        if out:
            self.transport.write(out)  # one write per answer where possible: one send, one packet
        if finished:
            self._finish()

    def _finish(self):
        self.busy = False
        self.last_activity = time.monotonic()
        if not self.keep_alive:
            self.transport.close()
            self.closed = True
            return
        if self.buf:
            self.server.loop.call_soon(self._next_request)

    def wake(self):
        """Called when the current body may have more; pumps it on the next turn."""
        if not self.pump_scheduled and self.body is not None:
            self.pump_scheduled = True
            self.server.loop.call_soon(self._pump)

    def _pump(self):
        self.pump_scheduled = False
        body = self.body
        if body is None or self.closed or self.paused:
            return
        try:
            chunks, done = body.poll()
        except Exception as err:
            self.server.log(f"error in a streamed answer: {err!r}")
            self._close_body()
            self.transport.close()
            return
        data = b"".join(chunks)
        if done:
            self._close_body()
            self._send(data, finished=True)
        elif data or (not self.headers_sent and self.status is not None):
            self._send(data, finished=False)  # a stream's headers go out at once, before any event

    def _close_body(self):
        body, self.body = self.body, None
        if body is not None:
            body.close()

    def sweep(self, now: float):
        """Close a connection whose client stalled mid-request or idled too long."""
        if self.busy or self.closed:
            return
        if self.request_started is not None and now - self.request_started > HEADER_TIMEOUT:
            self.transport.close()
        elif not self.buf and now - self.last_activity > IDLE_TIMEOUT:
            self.transport.close()


class HttpServer:
    """The WSGI application on an asyncio loop, on TCP or a Unix socket.

    Args:
        app: the WSGI application.
        master: the master, whose queued writes the server flushes once per loop turn.
        max_body: largest request body accepted (413 beyond).
        tls: a server ``ssl.SSLContext`` to serve HTTPS with (``master/tls.py``); None serves plain HTTP.
    """

    def __init__(self, app, master, max_body: int, host: str = "127.0.0.1", port: int = 0, log=None, tls=None):
        self.app = app
        self.master = master
        self.max_body = max_body
        self.host = host
        self.port = port
        self.tls = tls
        self.scheme = "https" if tls is not None else "http"
        self.connections: set = set()
        self.loop = None
        self._server = None
        self._flush_scheduled = False
        self._housekeeping_scheduled = False
        self._stopping = None
        self.log = log or (lambda message: print(f"keg master: {message}", file=sys.stderr, flush=True))

    def _schedule_flush(self):
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self):
        self._flush_scheduled = False
        self.master.flush()
        if not self._housekeeping_scheduled:
            self._housekeeping()

    def _housekeeping(self):
        # A commit may have started a checkpoint in a child process: install it once it is done,
        # also when no further write comes.
        self._housekeeping_scheduled = False
        delay = self.master.housekeeping()
        if delay is not None:
            self._housekeeping_scheduled = True
            self.loop.call_later(delay, self._housekeeping)

    async def start(self, sock: socket.socket | None = None):
        """Start listening (on ``sock`` if given); returns the bound ``(host, port)``."""
        self.loop = asyncio.get_running_loop()
        self.master.on_submit = self._schedule_flush
        tls = {} if self.tls is None else {"ssl": self.tls, "ssl_handshake_timeout": HEADER_TIMEOUT}
        if sock is not None:
            self._server = await self.loop.create_server(lambda: Connection(self), sock=sock, backlog=1024, **tls)
        else:
            self._server = await self.loop.create_server(lambda: Connection(self), self.host, self.port,
                                                         reuse_address=True, backlog=1024, **tls)
        self.host, self.port = self._server.sockets[0].getsockname()[:2]
        self.loop.call_later(5.0, self._sweep)
        return self.host, self.port

    def _sweep(self):
        now = time.monotonic()
        for conn in list(self.connections):
            conn.sweep(now)
        self.loop.call_later(5.0, self._sweep)

    async def serve_until_stopped(self):
        """Serve until SIGINT or SIGTERM, then close every connection and the master."""
        self._stopping = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.loop.add_signal_handler(sig, self._stopping.set)
        await self._stopping.wait()
        self._server.close()
        for conn in list(self.connections):
            conn.transport.close()
        self.master.flush()

    def stop(self):
        """Ask ``serve_until_stopped`` to return."""
        if self._stopping is not None:
            self._stopping.set()


def serve_http(app, master, host: str, port: int, max_body: int, ready=None, tls=None) -> None:
    """Run the standalone server in this process until SIGINT/SIGTERM.

    Args:
        ready: called with ``(host, port)`` once listening.
        tls: a server ``ssl.SSLContext`` to serve HTTPS with; None for HTTP.
    """
    async def main():
        server = HttpServer(app, master, max_body, host, port, tls=tls)
        bound = await server.start()
        if ready is not None:
            ready(*bound)
        await server.serve_until_stopped()

    asyncio.run(main())


def serve_fastcgi(app, socket_path: str, ready=None) -> None:
    """Serve the same application over FastCGI with flup, for nginx (``fastcgi_pass unix:SOCKET``).

    flup runs each request on a thread of its own pool (the library's way);
    writes still go through the master's group commit, and watch streams wait
    on the master's condition variable.
    """
    from flup.server.fcgi import WSGIServer

    class FastCgiServer(WSGIServer):
        def shutdown(self):
            # flup joins every worker, and a watch stream's worker runs as long
            # as its client stays: a stop would wait forever.  Give requests in
            # flight a grace period, then leave the rest (flup's workers are
            # daemon threads) to end with the process, as the standalone
            # server closes its connections.
            waiter = threading.Thread(target=super().shutdown, daemon=True)
            waiter.start()
            waiter.join(FASTCGI_STOP_GRACE)

    if os.path.exists(socket_path):
        os.unlink(socket_path)
    server = FastCgiServer(app, bindAddress=socket_path, umask=0o007, multiplexed=False)
    if ready is not None:
        ready(socket_path)
    server.run()
