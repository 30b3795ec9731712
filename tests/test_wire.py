"""master/wire.py: the lean HTTP client RemoteKeg uses, against answers written byte for byte.

The master's own answers are covered by every RemoteKeg test; these are the forms a proxy in front
of it (nginx with FastCGI, say) may give: chunked bodies, a body up to the connection's end, HTTP/1.0,
``100 Continue``, a connection closed between requests, and answers that are not HTTP.
"""

from __future__ import annotations

import http.client
import socket
import threading

import pytest

from master import wire


class Canned:
    """A loopback server that answers each request on a connection with the next canned bytes.

    ``script`` is a list of connections, each a list of raw answers; after the last answer of a connection
    the server closes it. The server handles only the connections scripted, then stops.
    """

    def __init__(self, script: list):
        self.script = script
        self.requests = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(10)
        for answers in self.script:
            conn, _ = self.sock.accept()
            with conn, conn.makefile("rb") as f:
                for answer in answers:
                    self.requests.append(_read_request(f))
                    conn.sendall(answer)
        self.sock.close()

    def connection(self) -> wire.Connection:
        return wire.Connection("127.0.0.1", self.port, 10)


def _read_request(f) -> bytes:
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        line = f.readline()
        assert line, "the client closed the connection mid-request"
        head += line
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
    return head + f.read(length)


def test_keep_alive_content_length_and_headers():
    server = Canned([[b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nETag: \"K-1\"\r\nX-A: 1\r\nX-A: 2\r\n\r\nhello",
                      b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"]])
    conn = server.connection()
    first = conn.request("GET", "/v1/keg/a", headers={"Authorization": "Bearer t"})
    assert (first.status, first.body, first.getheader("etag"), first.getheader("X-A")) == (200, b"hello", '"K-1"', "1, 2")
    second = conn.request("PUT", "/v1/keg/b", b"data")
    assert (second.status, second.reason, second.body) == (201, "Created", b"")
    assert server.requests[0].startswith(b"GET /v1/keg/a HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"\r\nAuthorization: Bearer t\r\n" in server.requests[0] and b"Content-Length" not in server.requests[0]
    assert server.requests[1].endswith(b"Content-Length: 4\r\n\r\ndata")  # one connection for both
    conn.close()


def test_chunked_body_and_a_head_without_one():
    server = Canned([[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"4;ext=1\r\nabcd\r\n3\r\nefg\r\n0\r\nTrailer: x\r\n\r\n",
                      b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nKeg-Kind: file\r\n\r\n",
                      b"HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n"]])
    conn = server.connection()
    assert conn.request("GET", "/x").body == b"abcdefg"
    head = conn.request("HEAD", "/x")
    assert (head.status, head.body, head.getheader("keg-kind")) == (200, b"", "file")
    assert conn.request("GET", "/x").status == 304  # no body, whatever its length says
    conn.close()


def test_a_body_to_the_end_of_the_connection_and_http_1_0():
    server = Canned([[b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\nall of it"],
                     [b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"],
                     [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"]])
    conn = server.connection()
    assert conn.request("POST", "/tx", b"{}").body == b"all of it"
    assert conn._sock is None  # the body ended with the connection: a new one for the next request
    assert conn.request("GET", "/a").body == b"ok" and conn._sock is None  # HTTP/1.0: no keep-alive
    assert conn.request("GET", "/b").body == b"ok" and conn._sock is None
    server.thread.join(10)
    assert len(server.requests) == 3


@pytest.mark.parametrize("answer, error", [
    (b"", http.client.RemoteDisconnected),
    (b"SSH-2.0-OpenSSH\r\n\r\n", http.client.BadStatusLine),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", http.client.IncompleteRead),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", http.client.HTTPException),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", http.client.HTTPException),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", http.client.HTTPException),
    (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n", http.client.LineTooLong),
])
def test_what_is_not_a_whole_http_answer_is_an_http_error_and_closes_the_connection(answer, error):
    server = Canned([[answer]])
    conn = server.connection()
    with pytest.raises(error):
        conn.request("GET", "/x")
    assert conn._sock is None


def test_a_header_value_with_a_line_break_is_refused_before_anything_is_sent():
    server = Canned([[b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"]])
    conn = server.connection()
    with pytest.raises(ValueError, match="line break"):
        conn.request("GET", "/x", headers={"Authorization": "Bearer t\r\nX-Evil: 1"})
    assert conn.request("GET", "/x").status == 200
    assert b"X-Evil" not in server.requests[0]
    conn.close()
