"""A small HTTP client for tests: raw paths (nothing normalised), keep-alive, token header."""

from __future__ import annotations

import http.client
import json
import urllib.parse


class Client:
    """One keep-alive connection to a master."""

    def __init__(self, url: str, token: str | None, timeout: float = 30.0):
        parsed = urllib.parse.urlsplit(url)
        self.host, self.port, self.token, self.timeout = parsed.hostname, parsed.port, token, timeout
        self.conn = None

    def call(self, method: str, target: str, body: bytes | str | None = None, headers=None, token="default"):
        """``(status, headers, body)``; ``token=None`` sends no Authorization."""
        token = self.token if token == "default" else token
        sent = dict(headers or {})
        if token:
            sent["Authorization"] = f"Bearer {token}"
        if isinstance(body, str):
            body = body.encode()
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request(method, target, body=body, headers=sent)
                response = self.conn.getresponse()
                data = response.read()
                if response.getheader("Connection", "").lower() == "close":
                    self.close()
                return response.status, {k.lower(): v for k, v in response.getheaders()}, data
            except (ConnectionError, http.client.RemoteDisconnected, http.client.CannotSendRequest):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def json(self, method: str, target: str, body=None, headers=None, token="default"):
        """``(status, parsed JSON body)``."""
        status, _, data = self.call(method, target, body, headers, token)
        return status, json.loads(data) if data else None

    def head_revision(self) -> int:
        """The master's newest revision number."""
        return self.json("GET", "/v1/head")[1]["revision"]

    def close(self):
        """Drop the connection."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
