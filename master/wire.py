"""A lean HTTP/1.1 client connection: what ``RemoteKeg`` needs of HTTP and no more.

``http.client`` parses every answer's headers with the ``email`` package and
checks each request header it writes; a Mayor makes a few requests per step,
and on a machine running many Mayors (or one Mayor among many programs) that
was about a quarter of its CPU.  This connection writes a request in one
``sendall`` and reads the answer with a handful of ``readline`` calls:
status line, headers into a dict, then the body by ``Content-Length``,
chunked transfer coding, or up to the end of the connection.  It keeps the
connection open between requests unless the server says otherwise.  With
``tls`` it speaks HTTPS, verifying the master's certificate
(``master/tls.py``).

Errors are those of ``http.client`` (``RemoteDisconnected``,
``BadStatusLine``, ``IncompleteRead`` are ``HTTPException``s) or ``OSError``,
so a caller's retry logic is the same for both.
"""

from __future__ import annotations

import http.client
import socket

from master.tls import client_context

MAX_LINE = 65536          # longest status or header line accepted
MAX_HEADERS = 100
NO_BODY = frozenset((204, 304))


class Response:
    """An answer read in full: ``status``, ``reason``, headers by lowercase name, ``body``."""

    __slots__ = ("status", "reason", "headers", "body")

    def __init__(self, status: int, reason: str, headers: dict, body: bytes):
        self.status, self.reason, self.headers, self.body = status, reason, headers, body

    def getheader(self, name: str, default=None):
        """The header's value (repeated headers joined by ``, ``), or ``default``."""
        return self.headers.get(name.lower(), default)

    def read(self) -> bytes:
        return self.body


class Connection:
    """One keep-alive connection to ``host:port`` (over TLS with ``tls``); ``request`` sends and reads a whole
    answer."""

    def __init__(self, host: str, port: int, timeout: float, tls: bool = False):
        self.host, self.port, self.timeout, self.tls = host, port, timeout, tls
        self._host_header = f"{host}:{port}".encode("ascii")
        self._sock = None
        self._file = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls:
            try:
                sock = client_context().wrap_socket(sock, server_hostname=self.host)
            except BaseException:
                sock.close()
                raise
        self._sock = sock
        self._file = self._sock.makefile("rb")

    def request(self, method: str, target: str, body: bytes | None = None, headers: dict | None = None) -> Response:
        """Send one request and read its answer.

        Raises:
            OSError: the connection failed or timed out.
            http.client.HTTPException: the server closed the connection or answered something that is not HTTP.
        """
        if self._sock is None:
            self._connect()
        head = [f"{method} {target} HTTP/1.1".encode("ascii"), b"Host: " + self._host_header]
        for name, value in (headers or {}).items():
            line = f"{name}: {value}".encode("latin-1")
            if b"\r" in line or b"\n" in line:
                raise ValueError(f"header {name!r} has a line break in its value")
            head.append(line)
        if body is not None or method in ("POST", "PUT"):
            head.append(b"Content-Length: %d" % len(body or b""))
        data = b"\r\n".join(head) + b"\r\n\r\n"
        if body and len(body) <= 65536:
            data, body = data + body, None  # one segment for a small request
        try:
            self._sock.sendall(data)
            if body:
                self._sock.sendall(body)
            response, keep = self._read_response(method)
        except BaseException:
            self.close()
            raise
        if not keep:
            self.close()
        return response

    def _line(self) -> bytes:
        line = self._file.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise http.client.LineTooLong("header line")
        return line

    def _read_response(self, method: str) -> tuple:
        while True:
            line = self._line()
            if not line:
                raise http.client.RemoteDisconnected("the master closed the connection without an answer")
            parts = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                raise http.client.BadStatusLine(line.decode("latin-1", "replace"))
            status = int(parts[1])
            headers = self._read_headers()
            if status != 100:
                break
        keep = parts[0] == "HTTP/1.1"
        connection = headers.get("connection", "").lower()
        if "close" in connection:
            keep = False
        elif "keep-alive" in connection:
            keep = True
        if method == "HEAD" or status in NO_BODY or 100 <= status < 200:
            body = b""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = self._read_chunked()
        elif "content-length" in headers:
            body = self._read_exactly(_content_length(headers["content-length"]))
        else:
            body, keep = self._file.read(), False
        return Response(status, parts[2] if len(parts) > 2 else "", headers, body), keep

    def _read_headers(self) -> dict:
        headers = {}
        for _ in range(MAX_HEADERS + 1):
            line = self._line()
            if line in (b"\r\n", b"\n", b""):
                return headers
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep:
                raise http.client.HTTPException(f"malformed header line {line!r}")
            name, value = name.strip().lower(), value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        raise http.client.HTTPException(f"more than {MAX_HEADERS} headers")

    def _read_exactly(self, size: int) -> bytes:
        data = self._file.read(size)
        if len(data) < size:
            raise http.client.IncompleteRead(data, size - len(data))
        return data

    def _read_chunked(self) -> bytes:
        parts = []
        while True:
            line = self._line()
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise http.client.HTTPException(f"malformed chunk size {line!r}") from None
            if size == 0:
                while self._line() not in (b"\r\n", b"\n", b""):
                    pass  # trailers: none used here
                return b"".join(parts)
            parts.append(self._read_exactly(size))
            self._read_exactly(2)  # the CRLF after the chunk


def _content_length(value: str) -> int:
    try:
        length = int(value.split(",")[0])
    except ValueError:
        raise http.client.HTTPException(f"malformed Content-Length {value!r}") from None
    if length < 0:
        raise http.client.HTTPException(f"negative Content-Length {value!r}")
    return length
