"""HTTP calls from one Raft replica to another, with the peer token (DESIGN §4).

The replicas' own endpoints (``/v1/raft/chunks``, ``/v1/raft/sources``,
``/v1/raft/git``) take the peer token derived from the cluster password.
A call connects within ``PEER_TIMEOUT`` seconds, so a replica that is down
is found fast, and then allows the answer as long as the caller says (a
replica indexing a pushed source answers in seconds, not milliseconds).
"""

from __future__ import annotations

import http.client
import urllib.parse

from keg.errors import KegError
from master.tls import client_context

PEER_TIMEOUT = 2.0     # seconds to connect to another replica, and for an answer unless the caller allows more
SOURCE_TIMEOUT = 30.0  # seconds for one replica's answer to a source pack (it indexes and checks it first)


def peer_request(url: str, token: str, method: str, target: str, body: bytes | None = None,
                 timeout: float = PEER_TIMEOUT) -> tuple:
    """One HTTP request to the replica serving at ``url``.

    Args:
        url: the replica's HTTP URL (``http://HOST:PORT`` or ``https://…``).
        token: the peer token.
        method: the HTTP method.
        target: the path and query.
        body: the request body, if any.
        timeout: seconds allowed for the answer once connected.

    Returns:
        ``(status, body bytes)``.

    Raises:
        OSError: the replica could not be reached or stopped answering.
        http.client.HTTPException: it answered something that is not HTTP.
    """
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "https":  # the replicas serve TLS (--tls-cert): their certificates are verified
        conn = http.client.HTTPSConnection(parsed.hostname, parsed.port, timeout=min(timeout, PEER_TIMEOUT),
                                           context=client_context())
    else:
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=min(timeout, PEER_TIMEOUT))
    try:
        conn.connect()
        conn.sock.settimeout(timeout)
        conn.request(method, target, body=body, headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def send_until_majority(peers, majority: int, send, down: list) -> tuple:
    """Call ``send(url)`` for the ``peers`` in order until ``majority`` replicas, this one included, hold what it
    sends (chunks, a source's pack).

    Args:
        peers: ``[(Raft address, URL, down), …]``; one marked down did not answer a moment ago and is not asked.
        majority: how many replicas must hold it.
        send: stores it on the replica at the URL it is given. Raises ``OSError`` or
            ``http.client.HTTPException`` when that replica cannot be reached, ``KegError`` when it refused.
        down: the Raft addresses of the replicas that could not be reached are added to it.

    Returns:
        ``(how many replicas hold it, this one included; "ADDRESS: reason" of each one asked that does not)``.
    """
    stored, errors = 1, []
    for address, url, was_down in peers:
        if stored >= majority:
            break
        if was_down or address in down:
            errors.append(f"{address}: it did not answer a moment ago")
            continue
        try:
            send(url)
            stored += 1
        except (OSError, http.client.HTTPException) as err:
            down.append(address)
            errors.append(f"{address}: {err}")
        except KegError as err:
            errors.append(f"{address}: {err}")
    return stored, errors
