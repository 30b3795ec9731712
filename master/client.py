"""A client of the master's HTTP interface that looks like a local ``Store``.

``RemoteKeg`` has the read and write methods of ``keg.Store`` and returns the
same objects (``Entry``, ``Revision``, ``Event``, ``TxResult``) and raises the
same errors, so every ``keg`` command works against a master (``--url`` or
``KEG_URL``, with ``--token`` or ``KEG_TOKEN``) with the same output and exit
codes as on a local keg.  Several URLs, comma-separated, are tried in turn.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import time
import urllib.parse

from keg import paths
from keg.errors import BadRequest, CompareFailed, CorruptKeg, KegBusy, KegError, NotFound, PathConflict
from keg.chunks import chunk_hash
from keg.chunkworker import encode_group, read_group
from keg.large import DEFAULT_THRESHOLD, Chain, LargeReader, Pointer, ingest, is_pointer, read_full
from keg.records import Entry, Event, Revision
from keg.transaction import Transaction, TxResult, put, put_large, transaction_to_json
from master import tls, wire
from master.auth import Forbidden, Unauthenticated

TIMEOUT = 60.0
ERRORS = {400: BadRequest, 401: Unauthenticated, 403: Forbidden, 404: NotFound, 409: PathConflict,
          413: BadRequest, 503: KegBusy}


class Unreachable(KegError):
    """No master answered at any of the URLs."""

    exit_code = 4


def _error_from(status: int, body: bytes) -> KegError:
    try:
        obj = json.loads(body)
        message = obj["error"]
    except (ValueError, KeyError, TypeError):
        obj, message = {}, body.decode("utf-8", "replace").strip() or f"HTTP {status}"
    if status == 412 and isinstance(obj.get("failed_compare"), dict):
        failed = obj["failed_compare"]
        return CompareFailed(failed.get("path"), failed.get("expected"), failed.get("actual"))
    return ERRORS.get(status, CorruptKeg if status == 500 else KegError)(message)


def _revision(obj: dict) -> Revision:
    return Revision(obj["revision"], obj["kid"], obj["time"], obj["author"], obj["message"])


def _entry(obj: dict) -> Entry:
    return Entry(obj["path"], obj["kind"], obj["kid"], obj["size"], int(obj["mode"], 8), bool(obj.get("large")))


READ_AHEAD = 4 << 20  # bytes of a large value's chunks asked for in one request
READ_NAMES = 1024     # at most this many chunks per request


class _ChunkUploader:
    """Where ``keg.large.ingest`` puts chunks when the keg is remote: only the missing ones are sent.

    One question per group of chunks (``POST /v1/chunks/missing``), then one
    request with the missing ones (``POST /v1/chunks``; one per chunk to a
    master without that route), on the caller's connection.
    """

    def __init__(self, remote: "RemoteKeg"):
        self.remote = remote
        self.sent = 0
        self._grouped = True

    def put(self, name: str, data, verified: bool = False) -> bool:
        return self.put_many([(name, data)], verified)[0]

    def put_many(self, items: list, verified: bool = False) -> list:
        missing = set(self.remote.chunk_missing([name for name, _ in items]))
        stored, send = [], []
        for name, data in items:
            stored.append(name in missing)
            if name in missing:
                send.append((name, data))
                missing.discard(name)  # a chunk twice in one group is sent once
        if send and self._grouped:
            try:
                self.remote.chunk_put_many(send)
                send, self.sent = [], self.sent + len(send)
            except NotFound:
                self._grouped = False  # an older master: one request per chunk
        for name, data in send:
            self.remote.chunk_put(name, data)
            self.sent += 1
        return stored


class _ChunkReader:
    """A large value's chunks fetched from a master ``READ_AHEAD`` bytes per request, in the pointer's order.

    ``LargeReader`` asks for each chunk once, in order; a request
    (``POST /v1/chunks/read``) brings the next few MiB of them, and only that
    group is held.
    """

    def __init__(self, remote: "RemoteKeg", pointer: Pointer):
        self.remote, self.chunks = remote, pointer.chunks
        self.pos = 0
        self.ready: dict = {}

    def __call__(self, name: str, where: str = "") -> bytes:
        start, self.pos = self.pos, self.pos + 1
        if name not in self.ready:
            names, size = [], 0
            for n, length in self.chunks[start:]:
                if n not in names:
                    names.append(n)
                size += length
                if size >= READ_AHEAD or len(names) >= READ_NAMES:
                    break
            if name not in names:  # asked out of order: just this one
                names = [name]
            self.ready = dict(zip(names, self.remote.chunk_get_many(names, where)))
        return self.ready[name]


class RemoteKeg:
    """A master reached over HTTP.

    Args:
        url: ``http://host:port`` or ``https://host:port`` (or several, comma-separated, tried in turn); an
            ``https://`` master's certificate is verified (``master/tls.py``).
        token: the token sent as ``Authorization: Bearer``.
    """

    def __init__(self, url: str, token: str | None = None, timeout: float = TIMEOUT):
        self.urls = [u.strip().rstrip("/") for u in url.split(",") if u.strip()]
        if not self.urls:
            raise BadRequest("no master URL given")
        for u in self.urls:
            parsed = urllib.parse.urlsplit(u)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise BadRequest(f"{u!r} is not a master URL: give http://HOST:PORT or https://HOST:PORT")
        self.token = token
        self.timeout = timeout
        self.path = self.urls[0]
        self._conn = None
        self._current = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Close the connection."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # ------------------------------------------------------------ transport

    def _connect(self, index: int, timeout: float):
        parsed = urllib.parse.urlsplit(self.urls[index])
        tls = parsed.scheme == "https"
        return wire.Connection(parsed.hostname, parsed.port or (443 if tls else 80), timeout, tls=tls)

    def _headers(self, extra=None) -> dict:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        headers.update(extra or {})
        return headers

    def request(self, method: str, target: str, body: bytes | None = None, headers=None, ok=(200, 201)):
        """One request with retries over the URLs; returns ``(status, headers, body)``.

        Raises:
            the ``KegError`` the server's answer names, or ``Unreachable``.
        """
        last = last_url = None
        for attempt in range(len(self.urls) * 2):
            index = (self._current + attempt // 2) % len(self.urls)
            try:
                if self._conn is None or index != self._current:
                    self.close()
                    self._conn = self._connect(index, self.timeout)
                    self._current = index
                response = self._conn.request(method, target, body, self._headers(headers))
                data = response.body
            except (OSError, http.client.HTTPException) as err:
                last, last_url = err, self.urls[index]
                self.close()
                continue
            if response.status in ok or response.status == 304:
                return response.status, response, data
            if method == "HEAD":  # an error's explanation is in a body, which HEAD does not carry
                return self.request("GET", target, headers=headers, ok=ok)
            raise _error_from(response.status, data)
        advice = tls.advice(last, last_url)
        raise Unreachable(f"cannot reach the master at {', '.join(self.urls)}: {last}{advice}")

    @staticmethod
    def _target(base: str, **query) -> str:
        query = {k: v for k, v in query.items() if v is not None}
        return base + ("?" + urllib.parse.urlencode(query) if query else "")

    @staticmethod
    def _keg_target(path: str, **query) -> str:
        path = paths.normalize(path)
        return RemoteKeg._target("/v1/keg" + urllib.parse.quote(path, safe="/"), **query)

    def _get_json(self, target: str):
        return json.loads(self.request("GET", target)[2])

    # ---------------------------------------------------------------- reads

    def stat(self, path: str, rev=None) -> Entry:
        """As ``Store.stat``."""
        path = paths.normalize(path)
        _, response, _ = self.request("HEAD", self._keg_target(path, rev=rev))
        return Entry(path, response.getheader("Keg-Kind"), response.getheader("ETag").strip('"'),
                     int(response.getheader("Keg-Size")), int(response.getheader("Keg-Mode"), 8),
                     response.getheader("Keg-Large") == "1")

    def kid(self, path: str, rev=None) -> str:
        """As ``Store.kid``."""
        return self.stat(path, rev).kid

    def exists(self, path: str, rev=None) -> bool:
        """As ``Store.exists``."""
        try:
            self.stat(path, rev)
            return True
        except NotFound:
            return False

    def read(self, path: str, rev=None) -> bytes:
        """As ``Store.read``."""
        path = paths.normalize(path)
        _, response, data = self.request("GET", self._keg_target(path, rev=rev))
        kind = response.getheader("Keg-Kind")
        if kind == "tree":
            raise BadRequest(f"{path} is a directory; list it instead")
        if kind == "pointer":
            raise BadRequest(f"{path} is a pointer to another keg ({response.getheader('ETag').strip(chr(34))})")
        return data

    def open(self, path: str, rev=None):
        """As ``Store.open``: a large value is fetched a chunk at a time and each chunk verified here."""
        path = paths.normalize(path)
        _, response, data = self.request("GET", self._keg_target(path, rev=rev, pointer=1))
        kind = response.getheader("Keg-Kind")
        if kind == "tree":
            raise BadRequest(f"{path} is a directory; list it instead")
        if kind == "pointer":
            raise BadRequest(f"{path} is a pointer to another keg ({response.getheader('ETag').strip(chr(34))})")
        if response.getheader("Keg-Large") == "1":
            pointer = Pointer.from_json(json.loads(data)["large"])
            return LargeReader(pointer, _ChunkReader(self, pointer), path)
        return io.BytesIO(data)

    def pointer(self, path: str, rev=None):
        """As ``Store.pointer``."""
        reader = self.open(path, rev)
        return reader.pointer if isinstance(reader, LargeReader) else None

    def list(self, path: str = "/", rev=None) -> list:
        """As ``Store.list``."""
        path = paths.normalize(path)
        _, response, data = self.request("GET", self._keg_target(path, rev=rev))
        if response.getheader("Keg-Kind") not in ("tree", "pointer"):
            raise BadRequest(f"{path} is a file, not a directory")
        return [_entry(e) for e in json.loads(data)["entries"]]

    def list_values(self, path: str = "/", rev=None) -> list:
        """As ``Store.list_values``, in one request (``?values=1``)."""
        path = paths.normalize(path)
        _, response, data = self.request("GET", self._keg_target(path, rev=rev, values=1))
        if response.getheader("Keg-Kind") not in ("tree", "pointer"):
            raise BadRequest(f"{path} is a file, not a directory")
        out = []
        for obj in json.loads(data)["entries"]:
            value = obj.get("value")
            if value is not None:
                value = value.encode("utf-8")
            elif obj.get("value_base64") is not None:
                value = base64.b64decode(obj["value_base64"])
            out.append((_entry(obj), value))
        return out

    def revision(self, spec=None) -> Revision:
        """As ``Store.revision`` (the head, or the revision of a log entry)."""
        if spec is None:
            return _revision(self._get_json("/v1/head"))
        entries = self._get_json(self._target("/v1/log", rev=spec, limit=1))
        if not entries:
            raise NotFound(f"revision {spec} does not exist")
        return _revision(entries[0])

    def log(self, path: str = "/", rev=None, limit=None) -> list:
        """As ``Store.log``."""
        entries = self._get_json(self._target("/v1/log", path=paths.normalize(path), rev=rev, limit=limit))
        return [(_revision(e), e.get("path_kid")) for e in entries]

    def diff(self, rev_a, rev_b=None, prefix: str = "/") -> list:
        """As ``Store.diff``."""
        changes = self._get_json(self._target("/v1/diff", **{"from": rev_a, "to": rev_b,
                                                             "prefix": paths.normalize(prefix)}))
        return [(c["path"], c["old_kid"], c["new_kid"]) for c in changes]

    def resolve_kid(self, text: str) -> dict:
        """As ``Store.resolve_kid``."""
        return self._get_json("/v1/kid/" + urllib.parse.quote(text))

    # --------------------------------------------------------------- chunks

    def chunk_get(self, name: str, where: str = "") -> bytes:
        """A chunk's bytes, checked here against its name.

        Raises:
            CorruptKeg: the bytes received do not hash to the name.
        """
        data = self.request("GET", "/v1/chunks/" + name, headers={"Accept": "application/octet-stream"})[2]
        if chunk_hash(data) != name:
            raise CorruptKeg(f"chunk {name}{' of ' + where if where else ''} arrived damaged "
                             f"(its bytes hash to {chunk_hash(data)})")
        return data

    def chunk_get_many(self, names: list, where: str = "") -> list:
        """The bytes of ``names`` in one request (``POST /v1/chunks/read``), each checked here against its name.

        Against a master without that route, one request per chunk.
        """
        body = json.dumps({"chunks": list(names)}).encode()
        try:
            data = self.request("POST", "/v1/chunks/read", body, {"Content-Type": "application/json"})[2]
        except BadRequest as err:
            if "not a chunk name" not in str(err):
                raise
            return [self.chunk_get(n, where) for n in names]  # an older master: one request per chunk
        try:
            items = read_group(io.BytesIO(data))
        except (EOFError, ValueError) as err:
            raise CorruptKeg(f"chunks{' of ' + where if where else ''} arrived cut short ({err})") from err
        if [n for n, _ in items] != list(names):
            raise CorruptKeg(f"the master sent other chunks than the {len(names)} asked for")
        for n, d in items:
            if chunk_hash(d) != n:
                raise CorruptKeg(f"chunk {n}{' of ' + where if where else ''} arrived damaged "
                                 f"(its bytes hash to {chunk_hash(d)})")
        return [d for _, d in items]

    def chunk_put(self, name: str, data) -> bool:
        """Store a chunk; False when the master had it already."""
        status = self.request("PUT", "/v1/chunks/" + name, bytes(data),
                              {"Content-Type": "application/octet-stream"})[0]
        return status == 201

    def chunk_put_many(self, items: list) -> int:
        """Store ``(name, data)`` chunks in one request (``POST /v1/chunks``); returns how many were new."""
        body = encode_group(items)
        return json.loads(self.request("POST", "/v1/chunks", body,
                                       {"Content-Type": "application/x-keg-chunks"})[2])["created"]

    def chunk_missing(self, names: list) -> list:
        """Which of ``names`` the master lacks."""
        body = json.dumps({"chunks": list(names)}).encode()
        return json.loads(self.request("POST", "/v1/chunks/missing", body,
                                       {"Content-Type": "application/json"})[2])["missing"]

    def put_stream(self, path: str, stream, mode: int = 0o100644, progress=None):
        """As ``Store.put_stream``: a large value is cut here and only chunks the master lacks are sent."""
        head = read_full(stream, DEFAULT_THRESHOLD + 1)
        if len(head) <= DEFAULT_THRESHOLD and not is_pointer(head):
            if progress is not None:
                progress(len(head))
            return put(path, head, mode)
        return put_large(path, ingest(_ChunkUploader(self), Chain(head, stream), progress=progress), mode)

    # --------------------------------------------------------------- writes

    def apply(self, tx: Transaction) -> TxResult:
        """As ``Store.apply``: the result, with ``ok`` False on a failed compare."""
        body = json.dumps(transaction_to_json(tx)).encode()
        try:
            _, _, data = self.request("POST", "/v1/tx", body, {"Content-Type": "application/json"})
        except CompareFailed as err:
            return TxResult(False, error=err)
        obj = json.loads(data)
        return TxResult(True, obj["revision"], obj["revision_kid"], obj["kids"])

    def whoami(self) -> dict:
        """Who the token is: ``{"name", "kind", …}`` (``GET /v1/whoami``)."""
        return self._get_json("/v1/whoami")

    def send_source(self, app: str, commit: str, pack: bytes, old: str | None) -> TxResult:
        """``POST /v1/src/<app>``: the objects of a pushed commit, then the pointer ``/src/<app>``.

        ``old`` is the pointer's KID the push started from (None: no source yet); a
        push that raced another one fails its compare instead of overwriting it.
        """
        target = self._target(f"/v1/src/{urllib.parse.quote(app)}", commit=commit, old=old or "none")
        try:
            _, _, data = self.request("POST", target, pack, {"Content-Type": "application/x-git-packed-objects"})
        except CompareFailed as err:
            return TxResult(False, error=err)
        obj = json.loads(data)
        return TxResult(True, obj["revision"], obj["revision_kid"], obj["kids"])

    def commit(self, transactions) -> list:
        """As ``Store.commit`` (one request per transaction; the master groups them)."""
        return [self.apply(tx) for tx in transactions]

    def compact(self, window: int = 1000) -> dict:
        """As ``Store.compact``."""
        return json.loads(self.request("POST", self._target("/v1/compact", window=window))[2])

    def gc_chunks(self, grace: float = 3600.0) -> dict:
        """As ``Store.gc_chunks``."""
        return json.loads(self.request("POST", self._target("/v1/gc", grace=grace))[2])

    # ---------------------------------------------------------------- watch

    def watch(self, prefix: str = "/", since: int | None = None, timeout: float | None = None):
        """As ``Store.watch``: events under ``prefix``; reconnects by itself and resumes without gaps."""
        prefix = paths.normalize(prefix)
        heartbeat = min(15.0, timeout / 2) if timeout else 15.0
        idle_since = time.monotonic()
        failures = refused = 0
        while True:
            try:
                for event in self._stream(prefix, since, heartbeat):
                    if event is None:   # a heartbeat
                        if timeout is not None and time.monotonic() - idle_since >= timeout:
                            return
                        continue
                    if isinstance(event, int):  # the revision the stream started after, or an end marker
                        since = event
                        continue
                    idle_since = time.monotonic()
                    failures = refused = 0
                    yield event
            except (OSError, http.client.HTTPException, Unreachable) as err:
                failures += 1
                refused = refused + 1 if tls.is_verify_error(err) else 0
                url = self.urls[self._current]
                if refused >= len(self.urls):  # every master's certificate was refused: retrying will not help
                    raise Unreachable(f"cannot reach the master at {url}: {err}{tls.advice(err, url)}") from err
                if failures > 1:
                    time.sleep(min(5.0, 0.1 * 2 ** failures))
                if failures > 20:
                    raise Unreachable(f"lost the watch stream from {url} and cannot reconnect: {err}"
                                      f"{tls.advice(err, url)}") from err
                self._current = (self._current + 1) % len(self.urls)
                continue
            if timeout is not None and time.monotonic() - idle_since >= timeout:
                return

    def _stream(self, prefix: str, since, heartbeat: float):
        """Yield the start revision, then events, ``None`` for heartbeats, and ints for revision ends.

        A heartbeat's revision (NDJSON carries one) comes as an int before its ``None``.
        """
        conn = http_connection(self.urls[self._current], heartbeat * 3 + 5)
        try:
            conn.request("GET", self._target("/v1/watch", prefix=prefix, since=since, format="ndjson",
                                             heartbeat=heartbeat), headers=self._headers())
            response = conn.getresponse()
            if response.status != 200:
                raise _error_from(response.status, response.read())
            yield int(response.getheader("Keg-Revision"))
            while True:
                line = response.readline()
                if not line:
                    raise http.client.IncompleteRead(b"")
                obj = json.loads(line)
                if obj.get("heartbeat"):
                    # Nothing under the prefix changed up to its revision: resume from there, not from
                    # the last event, which may be far back for a quiet prefix.
                    if isinstance(obj.get("revision"), int):
                        yield obj["revision"]
                    yield None
                    continue
                yield Event(obj["revision"], obj["path"], obj["old_kid"], obj["new_kid"])
                if obj.get("end"):
                    yield obj["revision"]
        except socket.timeout as err:
            raise OSError("the watch stream went silent") from err
        finally:
            conn.close()


def http_connection(url: str, timeout: float) -> http.client.HTTPConnection:
    """An ``http.client`` connection to the master at ``url`` (``https://``: verified as ``master/tls.py`` says)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "https":
        return http.client.HTTPSConnection(parsed.hostname, parsed.port or 443, timeout=timeout,
                                           context=tls.client_context())
    return http.client.HTTPConnection(parsed.hostname, parsed.port or 80, timeout=timeout)


def fetch_status(url: str, token: str | None, timeout: float = 3.0) -> dict:
    """One master's ``/v1/status`` as a dict, with its ``url``.

    A master older than ``/v1/status`` (met during a rolling upgrade) is asked
    for ``/v1/raft/status``, or for a single-node master its head.

    Raises:
        OSError: the master did not answer, or answered with an error.
        ValueError: its answer is not a JSON object.
    """
    conn = http_connection(url, timeout)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        for path in ("/v1/status", "/v1/raft/status", "/v1/head"):
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            body = response.read()
            if response.status != 404:
                break
        if response.status != 200:
            raise OSError(f"HTTP {response.status}: {body[:200].decode(errors='replace')}")
        found = json.loads(body)
        if not isinstance(found, dict):
            raise ValueError(f"{url}{path} answered {type(found).__name__} JSON, not a status object")
        if path == "/v1/head":
            found = {"mode": "single", "role": "single", "revision": found.get("revision"),
                     "revision_kid": found.get("kid"), "term": None, "commit_index": None}
        return {**found, "url": found.get("url") or url}
    finally:
        conn.close()
