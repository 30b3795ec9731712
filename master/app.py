"""The master's WSGI application: the namespace over HTTP (DESIGN §4).

One application for every server: the standalone event-loop server
(``master/server.py``) and flup's FastCGI server behind nginx.  Routes:

``GET|HEAD /v1/keg/<path>``   a file's bytes, or a directory as JSON; ETag is the KID
``PUT|DELETE /v1/keg/<path>`` write; ``If-Match``/``If-None-Match: *`` compare first
``POST /v1/tx``               a transaction (the JSON form of ``keg tx``)
``GET /v1/head``              the newest revision
``GET /v1/status``            this master: role, revision, housekeeping (and Raft state on a replica)
``GET /v1/log``, ``/v1/diff``, ``/v1/kid/<KID>``, ``/v1/watch``
``GET|HEAD|PUT /v1/chunks/<blake3>``, ``POST /v1/chunks`` (a group of chunks, one sync),
``POST /v1/chunks/read`` (the chunks named, in one answer)
``POST /v1/compact``          drop old volatile history (needs write on /)
``GET /v1/whoami``            the principal a token names
``GET /v1/openapi.json``      this table, as OpenAPI 3.1 (no token needed)
``/git/keg.git/…``            git smart HTTP, fetch only
``/``, ``/ui/<path>``, ``/-/…`` the web UI (``master/ui``, docs/ui.md)

Errors are JSON: ``{"error": "what was wrong", "error_type": …, "status": …}``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import struct
import sys
import time
import urllib.parse

from keg import paths
from keg.chunks import check_hash
from keg.chunkworker import encode_group, read_group
from keg.errors import BadRequest, CompareFailed, KegBusy, KegError, NotFound, PathConflict
from keg.large import Pointer
from keg.store import LIST_VALUE_MAX
from keg.transaction import Transaction, compare, delete, link, parse_transaction, put  # noqa: F401
from master import git_http
from master.auth import ANONYMOUS, Authority, AuthError, Forbidden, Unauthenticated
from master.bodies import AfterPending, DeferredResponse, ValueStream
from master.openapi import spec
from master.ui import WebUi
from master.watch import FORMATS, WatchStream

MAX_BODY = 64 << 20
CHUNKS_PER_READ = 1024  # names one POST /v1/chunks/read may ask for
DEFAULT_HEARTBEAT = 15.0
MAX_PUSH = 32 << 20           # largest pack a git push may send to an app
PUSH_GRANT_SECONDS = 3600.0   # how long the pre-receive hook of one push may act for the pusher
PUSH_GRANT_PREFIX = "kp_"
CONTENT_TYPES = {".json": "application/json", ".tsv": "text/tab-separated-values; charset=utf-8",
                 ".md": "text/markdown; charset=utf-8", ".txt": "text/plain; charset=utf-8",
                 ".html": "text/plain; charset=utf-8", ".sh": "text/plain; charset=utf-8"}
REASONS = {200: "OK", 201: "Created", 204: "No Content", 304: "Not Modified", 400: "Bad Request",
           401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
           411: "Length Required", 412: "Precondition Failed", 413: "Content Too Large", 422: "Unprocessable Content",
           500: "Internal Server Error", 503: "Service Unavailable"}


class HttpError(KegError):
    """An error that is about HTTP itself (a method, a length), with its status."""

    def __init__(self, status: int, message: str, headers=()):
        super().__init__(message)
        self.status = status
        self.headers = list(headers)


def status_of(err: Exception) -> int:
    """The HTTP status for one of Keg's errors."""
    if isinstance(err, HttpError):
        return err.status
    if isinstance(err, Unauthenticated):
        return 401
    if isinstance(err, Forbidden):
        return 403
    if isinstance(err, CompareFailed):
        return 412
    if isinstance(err, NotFound):
        return 404
    if isinstance(err, PathConflict):
        return 409
    if isinstance(err, BadRequest):
        return 400
    if isinstance(err, KegBusy):
        return 503
    return 500


def error_body(err: Exception) -> dict:
    """The JSON body of an error answer."""
    out = {"error": str(err), "error_type": type(err).__name__, "status": status_of(err)}
    if isinstance(err, CompareFailed):
        out["failed_compare"] = {"path": err.path, "expected": err.expected, "actual": err.actual}
    return out


def _status_line(code: int) -> str:
    return f"{code} {REASONS.get(code, 'Unknown')}"


def _etag(kid: str) -> str:
    return f'"{kid}"'


def _unquote_etag(value: str) -> str:
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"')


class Request:
    """The parts of a WSGI environ the routes use."""

    def __init__(self, environ: dict, max_body: int):
        self.environ = environ
        self.method = environ.get("REQUEST_METHOD", "GET").upper()
        raw = environ.get("PATH_INFO", "") or "/"
        try:
            self.path = raw.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError) as err:
            raise BadRequest("the request path is not valid UTF-8") from err
        self.query = {k: v[-1] for k, v in urllib.parse.parse_qs(environ.get("QUERY_STRING", ""),
                                                                keep_blank_values=True).items()}
        self.max_body = max_body
        self._body = None

    def header(self, name: str, default=None):
        """A request header by its HTTP name."""
        return self.environ.get("HTTP_" + name.upper().replace("-", "_"), default)

    def body(self) -> bytes:
        """The request body, refused with 413 when larger than the limit."""
        if self._body is None:
            length_text = self.environ.get("CONTENT_LENGTH") or ""
            try:
                length = int(length_text) if length_text else 0
            except ValueError as err:
                raise HttpError(400, f"Content-Length {length_text!r} is not a number") from err
            if length > self.max_body:
                raise HttpError(413, f"the body has {length} bytes; at most {self.max_body} are accepted "
                                     "(store large values as chunks)")
            data = self.environ["wsgi.input"].read(length) if length else b""
            if len(data) != length:
                raise HttpError(400, f"the body ended after {len(data)} of {length} bytes")
            self._body = data
        return self._body

    def json_body(self):
        """The body parsed as JSON."""
        try:
            return json.loads(self.body())
        except ValueError as err:
            raise BadRequest(f"the body is not valid JSON: {err}") from err

    def int_arg(self, name: str, default=None, low=None, high=None):
        """A whole-number query argument."""
        text = self.query.get(name)
        if text is None or text == "":
            return default
        try:
            value = int(text)
        except ValueError as err:
            raise BadRequest(f"?{name}={text!r} is not a whole number") from err
        if (low is not None and value < low) or (high is not None and value > high):
            raise BadRequest(f"?{name}={value} is outside {low}..{high}")
        return value

    def float_arg(self, name: str, default: float, low: float, high: float) -> float:
        """A number query argument."""
        text = self.query.get(name)
        if not text:
            return default
        try:
            value = float(text)
        except ValueError as err:
            raise BadRequest(f"?{name}={text!r} is not a number") from err
        if not low <= value <= high:
            raise BadRequest(f"?{name}={value:g} is outside {low:g}..{high:g}")
        return value


class KegApp:
    """The WSGI application.

    Args:
        master: the ``Master`` to serve.
        max_body: largest request body accepted, in bytes (413 beyond).
        heartbeat: default seconds between watch heartbeats.
    """

    def __init__(self, master, max_body: int = MAX_BODY, heartbeat: float = DEFAULT_HEARTBEAT,
                 max_push: int = MAX_PUSH, self_url: str | None = None):
        self.master = master
        self.authority = Authority(master)
        self.max_body = max_body
        self.heartbeat = heartbeat
        self.max_push = max_push
        self.self_url = self_url
        self.git_root = git_http.project_root(master.store.path) if hasattr(master, "store") else None
        self.hooks = git_http.hooks_dir(master.store.path, sys.executable) if hasattr(master, "store") else None
        self.push_grants: dict = {}   # secret -> (principal, app, expiry): what a push's hook may do
        self.ui = WebUi(self)

    # ---------------------------------------------------------------- entry

    def __call__(self, environ, start_response):
        try:
            req = Request(environ, self.max_body)
            return self._route(req, start_response)
        except (KegError, ValueError) as err:
            if not isinstance(err, KegError):
                err = BadRequest(str(err))
            return self._error(start_response, err, environ)

    def _error(self, start_response, err: Exception, environ: dict):
        status = status_of(err)
        headers = [("Content-Type", "application/json")]
        if status == 401:
            headers.append(("WWW-Authenticate", 'Basic realm="keg", charset="UTF-8"'))
        headers.extend(getattr(err, "headers", []))
        body = (json.dumps(error_body(err)) + "\n").encode()
        headers.append(("Content-Length", str(len(body))))
        start_response(_status_line(status), headers)
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]

    def _json(self, start_response, obj, status: int = 200, headers=()):
        body = (json.dumps(obj) + "\n").encode()
        start_response(_status_line(status), [("Content-Type", "application/json"),
                                              ("Content-Length", str(len(body))), *headers])
        return [body]

    def _route(self, req: Request, start_response):
        path = req.path
        if path == "/v1/openapi.json":
            return self._json(start_response, spec())
        if self.ui.owns(path):
            return self.ui(req, start_response)
        grant = self._push_grant(req)
        if grant is not None:
            return self._as_push_hook(req, start_response, *grant)
        if path.startswith("/v1/raft/"):  # replicas' status, membership and peer traffic (master/raft.py)
            from master.raft import route
            return route(self, req, start_response)
        principal = self.authority.authenticate(req.header("Authorization") or self.ui.cookie_authorization(req))
        if path.startswith("/v1/src/"):
            return self._source(req, start_response, principal, path[len("/v1/src/"):])
        if path.startswith("/v1/keg/") or path == "/v1/keg":
            return self._keg(req, start_response, principal, path[len("/v1/keg"):] or "/")
        if path.startswith("/git/"):
            return self._git(req, start_response, principal)
        if path == "/v1/chunks":
            return self._chunk_group(req, start_response, principal)
        if path.startswith("/v1/chunks/"):
            return self._chunk(req, start_response, principal, path[len("/v1/chunks/"):])
        if path.startswith("/v1/kid/"):
            self._allow(req, "GET")
            self.authority.check(principal, "/", "r")
            return self._json(start_response, self.master.resolve_kid(path[len("/v1/kid/"):]))
        handler = {"/v1/tx": self._tx, "/v1/head": self._head, "/v1/log": self._log, "/v1/diff": self._diff,
                   "/v1/watch": self._watch, "/v1/compact": self._compact, "/v1/gc": self._gc,
                   "/v1/whoami": self._whoami, "/v1/status": self._status}.get(path)
        if handler is None:
            raise NotFound(f"no such endpoint {path}; see /v1/openapi.json")
        return handler(req, start_response, principal)

    @staticmethod
    def _allow(req: Request, *methods: str) -> None:
        if req.method not in methods:
            raise HttpError(405, f"{req.method} is not allowed here; use {', '.join(methods)}",
                            [("Allow", ", ".join(methods))])

    # ------------------------------------------------------------ namespace

    def _keg(self, req, start_response, principal, raw_path):
        path = paths.normalize(raw_path)  # PATH_INFO is decoded once by the server; never decode twice
        if req.method in ("GET", "HEAD"):
            self.authority.check(principal, path, "r")
            if _linearizable(req):
                return self._after_barrier(start_response, lambda sr: self._read(req, sr, path))
            return self._read(req, start_response, path)
        if req.method in ("PUT", "DELETE"):
            self.authority.check(principal, path, "w")
            return self._write(req, start_response, principal, path)
        raise HttpError(405, f"{req.method} is not allowed on /v1/keg; use GET, HEAD, PUT or DELETE",
                        [("Allow", "GET, HEAD, PUT, DELETE")])

    def _after_barrier(self, start_response, answer):
        """Answer with ``answer(start_response)`` once the master passed a read barrier (linearizable reads)."""
        pending = self.master.read_barrier()

        def failure(err):
            return (_status_line(status_of(err)), [("Content-Type", "application/json")],
                    (json.dumps(error_body(err)) + "\n").encode())

        def render(result):
            if not result.ok:
                return failure(result.error)
            captured = []
            try:
                out = answer(lambda status, headers, exc_info=None: captured.append((status, headers)))
            except KegError as err:
                return failure(err)
            try:
                body = b"".join(out)
            finally:
                if hasattr(out, "close"):
                    out.close()
            return captured[-1][0], captured[-1][1], body

        return DeferredResponse(start_response, pending, render)

    def _read(self, req, start_response, path):
        rev = req.query.get("rev") or None
        revision = self.master.revision(rev)
        entry = self.master.stat(path, revision.number)
        headers = [("ETag", _etag(entry.kid)), ("Keg-Kind", entry.kind), ("Keg-Size", str(entry.size)),
                   ("Keg-Mode", f"{entry.mode:06o}"), ("Keg-Revision", str(revision.number)),
                   ("Keg-Revision-Kid", revision.kid)]
        if entry.large:
            headers.append(("Keg-Large", "1"))
        inm = req.header("If-None-Match")
        if inm and inm.strip() != "*" and any(_unquote_etag(t) == entry.kid for t in inm.split(",")):
            start_response(_status_line(304), headers)
            return []
        if entry.kind in ("tree", "pointer"):  # a pointer lists the tree of the commit it names
            listing = {"path": path, "kind": entry.kind, "kid": entry.kid, "revision": revision.number,
                       "entries": [e.to_json() for e in self.master.list(path, revision.number)]}
            if req.query.get("values") in ("1", "true", "yes"):
                self._add_values(listing["entries"], revision.number)
            body = (json.dumps(listing) + "\n").encode()
            content_type = "application/json"
        elif entry.large and req.query.get("pointer") in ("1", "true", "yes"):
            pointer = self.master.pointer(path, revision.number)
            body = (json.dumps({"path": path, "kid": entry.kid, "large": pointer.to_json()}) + "\n").encode()
            content_type = "application/json"
        elif entry.kind in ("file", "link"):
            dot = path.rfind(".")
            content_type = CONTENT_TYPES.get(path[dot:] if dot > path.rfind("/") else "", "application/octet-stream")
            if entry.large:
                headers += [("Content-Type", content_type), ("Content-Length", str(entry.size))]
                if req.method == "HEAD":
                    start_response(_status_line(200), headers)
                    return []
                return ValueStream(start_response, _status_line(200), headers,
                                   self.master.open(path, revision.number))
            body = self.master.read(path, revision.number)
        else:
            body = (json.dumps(entry.to_json()) + "\n").encode()
            content_type = "application/json"
        headers += [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        start_response(_status_line(200), headers)
        return [] if req.method == "HEAD" else [body]

    def _add_values(self, entries: list, rev: int) -> None:
        """Put each small file's bytes in its listing entry: ``value`` (UTF-8 text) or ``value_base64``.

        A reader of a directory may read everything in it (read rights are by prefix), so a listing with
        values answers in one request what a listing and a read per file would.
        """
        for entry in entries:
            if entry["kind"] != "file" or entry.get("large") or entry["size"] > LIST_VALUE_MAX:
                continue
            data = self.master.read(entry["path"], rev)
            try:
                entry["value"] = data.decode("utf-8")
            except UnicodeDecodeError:
                entry["value_base64"] = base64.b64encode(data).decode("ascii")

    def _write(self, req, start_response, principal, path):
        compares = []
        if_match, if_none = req.header("If-Match"), req.header("If-None-Match")
        if if_match and if_none:
            raise BadRequest("give If-Match or If-None-Match, not both")
        if if_none is not None:
            if if_none.strip() != "*":
                raise BadRequest("If-None-Match on a write must be '*' (the path must be absent)")
            compares.append(compare(path, None))
        if if_match is not None:
            tags = [_unquote_etag(t) for t in if_match.split(",")]
            if len(tags) != 1 or tags[0] == "*":
                raise BadRequest("If-Match on a write must name exactly one KID, as \"K-…\"")
            compares.append(compare(path, tags[0]))
        chunks = []   # of a large value: stored here, and where else they must be before the answer
        if req.method == "PUT":
            mode = req.query.get("mode", "file")
            if mode not in ("file", "exec"):
                raise BadRequest("?mode= must be 'file' or 'exec'")
            op = self.master.put_stream(path, io.BytesIO(req.body()), 0o100755 if mode == "exec" else 0o100644)
            if op.large:
                chunks = sorted({name for name, _ in Pointer.parse(op.data, op.path).chunks})
        else:
            op = delete(path, req.query.get("recursive") in ("1", "true", "yes"))
        tx = Transaction((op,), tuple(compares), principal.author, req.header("Idempotency-Key") or None)
        return self._after_chunks(req, start_response, chunks, lambda: self._submit(
            start_response, tx, single_path=path, created=not compares and req.method == "PUT"))

    def _after_chunks(self, req, start_response, names: list, answer):
        """``answer()`` once the chunks ``names``, stored here, are wherever the master needs them (on a
        majority of Raft replicas: a child process sends them while the event loop goes on); an error if
        they cannot be."""
        pending = self.master.replicate_chunks(names) if names else None
        if pending is None:
            return answer()

        def then():
            if not pending.result.ok:
                return self._error(start_response, pending.result.error, req.environ)
            return answer()

        return AfterPending(start_response, pending, then)

    def _submit(self, start_response, tx, single_path=None, created=False):
        pending = self.master.submit(tx)

        def render(result):
            if not result.ok:
                err = result.error
                body = result.to_json()
                body["status"] = status_of(err)
                return _status_line(status_of(err)), [("Content-Type", "application/json")], \
                    (json.dumps(body) + "\n").encode()
            body = (json.dumps(result.to_json()) + "\n").encode()
            headers = [("Content-Type", "application/json"), ("Keg-Revision", str(result.revision)),
                       ("Keg-Revision-Kid", result.revision_kid), ("Content-Length", str(len(body)))]
            if single_path is not None and result.kids.get(single_path):
                headers.append(("ETag", _etag(result.kids[single_path])))
            return _status_line(200), headers, body

        return DeferredResponse(start_response, pending, render)

    def _tx(self, req, start_response, principal):
        self._allow(req, "POST")
        tx = parse_transaction(req.json_body(), principal.author)
        self.check_tx(principal, tx)
        return self._submit(start_response, tx)

    def check_tx(self, principal, tx) -> None:
        """Raise unless ``principal`` may read every compared path and write every written one.

        The one check for every transaction from outside: ``POST /v1/tx`` and the web UI's actions.
        """
        for cmp in tx.compares:
            self.authority.check(principal, cmp.path, "r")
        for op in tx.ops:
            self.authority.check(principal, op.path, "w")

    def _compact(self, req, start_response, principal):
        self._allow(req, "POST")
        self.authority.check(principal, "/", "w")
        window = req.int_arg("window", 1000, 1)
        return self._json(start_response, self.master.compact(window))

    def _gc(self, req, start_response, principal):
        self._allow(req, "POST")
        self.authority.check(principal, "/", "w")
        grace = req.float_arg("grace", 3600.0, 0.0, 365 * 86400.0)
        return self._json(start_response, self.master.gc_chunks(grace))

    # ------------------------------------------------------------- history

    def _head(self, req, start_response, principal):
        self._allow(req, "GET")
        self.authority.check(principal, "/", "r")
        if _linearizable(req):
            return self._after_barrier(start_response, lambda sr: self._json(sr, self.master.head().to_json()))
        return self._json(start_response, self.master.head().to_json())

    def _status(self, req, start_response, principal):
        self._allow(req, "GET")
        self.authority.check(principal, "/", "r")
        return self._json(start_response, self.master.status())

    def _log(self, req, start_response, principal):
        self._allow(req, "GET")
        path = paths.normalize(req.query.get("path") or "/")
        self.authority.check(principal, path, "r")
        limit = req.int_arg("limit", None, 1)
        entries = self.master.log(path, req.query.get("rev") or None, limit)
        return self._json(start_response, [{**r.to_json(), "path_kid": k} for r, k in entries])

    def _diff(self, req, start_response, principal):
        self._allow(req, "GET")
        prefix = paths.normalize(req.query.get("prefix") or "/")
        self.authority.check(principal, prefix, "r")
        if not req.query.get("from"):
            raise BadRequest("?from= is required: the revision to compare from")
        changes = self.master.diff(req.query["from"], req.query.get("to") or None, prefix)
        return self._json(start_response, [{"path": p, "old_kid": a, "new_kid": b} for p, a, b in changes])

    def _whoami(self, req, start_response, principal):
        return self._json(start_response, {"name": principal.name, "kind": principal.kind,
                                           "groups": sorted(principal.groups)})

    # --------------------------------------------------------------- watch

    def _watch(self, req, start_response, principal):
        self._allow(req, "GET")
        prefix = paths.normalize(req.query.get("prefix") or "/")
        self.authority.check(principal, prefix, "r")
        fmt = req.query.get("format")
        if fmt is None:
            fmt = "sse" if "text/event-stream" in (req.header("Accept") or "") else "ndjson"
        if fmt not in FORMATS:
            raise BadRequest(f"?format= must be one of {', '.join(FORMATS)}")
        head = self.master.head_number()
        since = req.int_arg("since", None, 0)
        last_id = req.header("Last-Event-ID")
        if since is None and last_id and last_id.isdigit():
            since = int(last_id)
        since = head if since is None else since
        if since > head:
            raise BadRequest(f"since={since} is after the newest revision {head}")
        if fmt == "poll":
            wait = req.float_arg("wait", 30.0, 0.0, 300.0)
            return WatchStream(start_response, self.master, prefix, since, fmt, wait)
        heartbeat = req.float_arg("heartbeat", self.heartbeat, 0.05, 300.0)
        return WatchStream(start_response, self.master, prefix, since, fmt, heartbeat)

    # -------------------------------------------------------------- chunks

    def _chunk_group(self, req, start_response, principal):
        """``POST /v1/chunks``: chunks framed as ``keg.chunkworker.encode_group`` makes them, stored with one sync."""
        self._allow(req, "POST")
        if principal.kind == "anonymous":
            raise Unauthenticated("storing chunks needs a token")
        body = io.BytesIO(req.body())
        try:
            items = read_group(body)
        except (EOFError, struct.error) as err:
            raise BadRequest(f"the body is not a group of chunks ({err}): a 4-byte big-endian count, then per "
                             "chunk its 32-byte blake3 digest, a 4-byte length and its bytes") from err
        if body.read(1):
            raise BadRequest("the body goes on past its group of chunks; send one group per request")
        created = self.master.chunk_put_many(items)
        return self._after_chunks(req, start_response, sorted({name for name, _ in items}), lambda: self._json(
            start_response, {"chunks": len(items), "created": sum(1 for c in created if c)}))

    def _chunk_read(self, req, start_response, principal):
        """``POST /v1/chunks/read``: the chunks named in ``{"chunks": [...]}``, framed as ``POST /v1/chunks`` takes them."""
        self._allow(req, "POST")
        self.authority.check(principal, "/", "r")
        names = req.json_body().get("chunks") if isinstance(req.json_body(), dict) else None
        if not isinstance(names, list) or not 0 < len(names) <= CHUNKS_PER_READ:
            raise BadRequest(f"the body must be {{\"chunks\": [blake3, …]}} with 1 to {CHUNKS_PER_READ} names")
        items, size = [], 0
        for name in names:
            data = self.master.chunk_get(check_hash(name))
            size += len(data)
            if size > self.max_body:
                raise HttpError(413, f"the chunks asked for pass {self.max_body} bytes; ask for fewer at a time")
            items.append((name, data))
        body = encode_group(items)
        start_response(_status_line(200), [("Content-Type", "application/x-keg-chunks"),
                                           ("Content-Length", str(len(body)))])
        return [body]

    def _chunk(self, req, start_response, principal, name):
        if name == "missing":
            self._allow(req, "POST")
            if principal.kind == "anonymous":
                raise Unauthenticated("asking for missing chunks needs a token")
            names = req.json_body().get("chunks") if isinstance(req.json_body(), dict) else None
            if not isinstance(names, list) or len(names) > 100_000:
                raise BadRequest("the body must be {\"chunks\": [blake3, …]} with at most 100000 names")
            return self._json(start_response, {"missing": self.master.chunk_missing([check_hash(n) for n in names])})
        if name == "read":
            return self._chunk_read(req, start_response, principal)
        check_hash(name)
        if req.method in ("GET", "HEAD"):
            self.authority.check(principal, "/", "r")
            data = self.master.chunk_get(name)
            start_response(_status_line(200), [("Content-Type", "application/octet-stream"),
                                               ("Content-Length", str(len(data))), ("ETag", f'"{name}"'),
                                               ("Cache-Control", "public, max-age=31536000, immutable")])
            return [] if req.method == "HEAD" else [data]
        if req.method == "PUT":
            if principal.kind == "anonymous":
                raise Unauthenticated("storing a chunk needs a token")
            created = self.master.chunk_put(name, req.body())
            return self._after_chunks(req, start_response, [name], lambda: self._json(
                start_response, {"chunk": name, "created": created}, 201 if created else 200))
        raise HttpError(405, f"{req.method} is not allowed on a chunk; use GET, HEAD or PUT",
                        [("Allow", "GET, HEAD, PUT")])

    # ----------------------------------------------------------------- git

    def _git(self, req, start_response, principal):
        rest = req.path[len("/git"):]
        if rest.startswith("/apps/"):
            return self._app_git(req, start_response, principal, rest)
        if not (rest == "/keg.git" or rest.startswith("/keg.git/")):
            raise NotFound(f"no git repository at {req.path}; the namespace is /git/keg.git, "
                           "apps are pushed to /git/apps/<app>.git")
        if principal.kind == "anonymous" and not self.authority.allowed(principal, "/", "r"):
            raise Unauthenticated("git needs a token: use http://USER:TOKEN@host/git/keg.git "
                                  "or a credential helper")
        self.authority.check(principal, "/", "r")
        service = req.query.get("service", "")
        if rest.endswith("/git-receive-pack") or service == "git-receive-pack":
            message = ("keg.git is read-only: write with transactions "
                       "(keg put, keg tx, PUT /v1/keg/<path> or POST /v1/tx); "
                       "deploy an app by pushing to /git/apps/<app>.git")
            if rest.endswith("/info/refs"):
                body = git_http.refusal(message)
                start_response(_status_line(200), [("Content-Type", "application/x-git-receive-pack-advertisement"),
                                                   ("Content-Length", str(len(body))), ("Cache-Control", "no-cache")])
                return [body]
            raise Forbidden(message)
        self.master.publish()
        env = git_http.cgi_environ(req.environ, self.git_root, rest, principal.name)
        return git_http.CgiBody(start_response, env, req.body())

    # ---------------------------------------------------------- app pushes

    def check_push(self, principal, app: str) -> None:
        """Raise unless ``principal`` may push ``app``: write rights on ``/src/<app>`` and ``/apps/<app>``,
        and the app is theirs (its ``owner`` or a ``collaborators`` entry) or they are an admin.
        """
        if principal.kind == "anonymous":
            raise Unauthenticated(f"pushing {app} needs a token: use http://USER:TOKEN@host/git/apps/{app}.git "
                                  "or a git credential helper")
        if principal.kind == "machine":
            raise Forbidden(f"machine {principal.name} may not push apps")
        self.authority.check(principal, f"/src/{app}", "w")
        self.authority.check(principal, f"/apps/{app}/app.json", "w")
        try:
            record = json.loads(self.master.read(f"/apps/{app}/app.json"))
        except NotFound:
            return
        except ValueError:
            record = {}
        owner = record.get("owner") if isinstance(record, dict) else None
        allowed = {owner, *(record.get("collaborators") or [])} if isinstance(record, dict) else {owner}
        if owner and principal.name not in allowed and "admin" not in principal.groups:
            raise Forbidden(f"app {app} belongs to {owner}; {principal.name} may not push it "
                            f"(its owner can add collaborators in /apps/{app}/app.json)")

    def _app_git(self, req, start_response, principal, rest):
        """A push to (or fetch from) ``/git/apps/<app>.git``; refusals reach git as ``remote error:`` lines."""
        try:
            return self._app_git_checked(req, start_response, principal, rest)
        except (Forbidden, BadRequest, NotFound) as err:
            if not rest.endswith("/info/refs"):
                raise
            body = git_http.refusal(str(err))
            start_response(_status_line(200), [("Content-Type", "application/x-git-receive-pack-advertisement"),
                                               ("Content-Length", str(len(body))), ("Cache-Control", "no-cache")])
            return [body]

    def _app_git_checked(self, req, start_response, principal, rest):
        from keg.sources import check_app

        name, sep, tail = rest[len("/apps/"):].partition("/")
        if not name.endswith(".git"):
            raise NotFound(f"no git repository at {req.path}; push apps to /git/apps/<app>.git")
        app = check_app(name[:-4])
        if self.hooks is None:
            raise HttpError(501, "this master does not receive pushes")
        service = req.query.get("service", "")
        receiving = tail == "git-receive-pack" or service == "git-receive-pack"
        if principal.kind == "anonymous":
            raise Unauthenticated(f"pushing {app} needs a token: use http://USER:TOKEN@host/git/apps/{app}.git "
                                  "or a git credential helper")
        if not receiving:
            self.authority.check(principal, f"/src/{app}", "r")
        else:
            self.check_push(principal, app)
        git_http.app_repository(self.git_root, app)
        hook_env = {}
        if receiving and tail == "git-receive-pack":
            secret = PUSH_GRANT_PREFIX + secrets.token_urlsafe(32)
            now = time.monotonic()
            self.push_grants = {k: v for k, v in self.push_grants.items() if v[2] > now}
            self.push_grants[secret] = (principal, app, now + PUSH_GRANT_SECONDS)
            hook_env = {"KEG_PUSH_URL": self._url_of(req), "KEG_PUSH_TOKEN": secret, "KEG_APP": app,
                        "KEG_PUSHER": principal.name}
            hook_env.update({k: v for k, v in os.environ.items() if k.startswith("KEG_BUILD_")})
        env = git_http.push_environ(req.environ, self.git_root, rest, principal.name, self.hooks, self.max_push,
                                    hook_env)
        if not receiving:
            env["GIT_CONFIG_VALUE_2"] = "false"
        body = req.body() if req.method == "POST" else b""
        return git_http.CgiBody(start_response, env, body)

    def _url_of(self, req) -> str:
        """How a program on this machine reaches this master (``self_url``, else the address the request came in on)."""
        if self.self_url:
            return self.self_url
        host = req.environ.get("SERVER_NAME") or "127.0.0.1"
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{req.environ.get('wsgi.url_scheme', 'http')}://{host}:{req.environ.get('SERVER_PORT', '80')}"

    def _push_grant(self, req):
        authorization = req.header("Authorization") or ""
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value.strip().startswith(PUSH_GRANT_PREFIX):
            return None
        grant = self.push_grants.get(value.strip())
        if grant is None or grant[2] < time.monotonic():
            raise Unauthenticated("this push's grant has expired or is unknown")
        return grant

    def _as_push_hook(self, req, start_response, principal, app, _expiry):
        """A push's hook acts for the pusher: it may send the app's source and read, nothing else."""
        path = req.path
        if path == f"/v1/src/{app}":
            return self._source(req, start_response, principal, app)
        if req.method in ("GET", "HEAD") and (path.startswith("/v1/keg") or path in ("/v1/watch", "/v1/head")):
            if path.startswith("/v1/keg"):
                return self._keg(req, start_response, principal, path[len("/v1/keg"):] or "/")
            return (self._watch if path == "/v1/watch" else self._head)(req, start_response, principal)
        raise Forbidden(f"a push's hook may only send the source of {app} and read")

    def _source(self, req, start_response, principal, app):
        """``POST /v1/src/<app>?commit=SHA&old=KID|none``: a pack of the source's objects; commits ``/src/<app>``.

        The objects are checked and stored by a child process (master/source_job.py) while the event loop
        goes on serving; then the pointer's transaction is submitted, and its result is the answer.
        """
        from keg.sources import check_app
        from master.source_job import JobResponse

        self._allow(req, "POST")
        app = check_app(app)
        self.check_push(principal, app)
        commit = req.query.get("commit", "")
        old = req.query.get("old", "none")
        if len(req.body()) > self.max_push:
            raise HttpError(413, f"the source pack has {len(req.body())} bytes; at most {self.max_push} are accepted")
        tx = Transaction((link(f"/src/{app}", "K-" + commit),),
                         (compare(f"/src/{app}", None if old in ("", "none") else old),), principal.author)
        job = self.master.start_source(app, commit, req.body())

        def then():
            try:
                self.master.source_stored(job)
            except KegError as err:
                return self._error(start_response, err, req.environ)
            return self._submit(start_response, tx)

        return JobResponse(start_response, job, then)


def _linearizable(req: Request) -> bool:
    """The client asked for a linearizable read (``?linearizable=1`` or ``Keg-Consistency: linearizable``)."""
    return (req.query.get("linearizable") in ("1", "true", "yes")
            or (req.header("Keg-Consistency") or "").lower() == "linearizable")


def make_app(master, **options) -> KegApp:
    """The WSGI application for ``master`` (``options`` as for ``KegApp``)."""
    return KegApp(master, **options)


__all__ = ["ANONYMOUS", "AuthError", "HttpError", "KegApp", "make_app", "status_of"]
