"""The master's WSGI application: the namespace over HTTP (DESIGN §4).

One application for every server: the standalone event-loop server
(``master/server.py``) and flup's FastCGI server behind nginx.  Routes:

``GET|HEAD /v1/keg/<path>``   a file's bytes, or a directory as JSON; ETag is the KID
``PUT|DELETE /v1/keg/<path>`` write; ``If-Match``/``If-None-Match: *`` compare first
``POST /v1/tx``               a transaction (the JSON form of ``keg tx``)
``GET /v1/head``              the newest revision
``GET /v1/log``, ``/v1/diff``, ``/v1/kid/<KID>``, ``/v1/watch``
``GET|HEAD|PUT /v1/chunks/<blake3>``
``POST /v1/compact``          drop old volatile history (needs write on /)
``GET /v1/whoami``            the principal a token names
``GET /v1/openapi.json``      this table, as OpenAPI 3.1 (no token needed)
``/git/keg.git/…``            git smart HTTP, fetch only
``/``, ``/ui/<path>``, ``/-/…`` the web UI (``master/ui``, docs/ui.md)

Errors are JSON: ``{"error": "what was wrong", "error_type": …, "status": …}``.
"""

from __future__ import annotations

import io
import json
import urllib.parse

from keg import paths
from keg.chunks import check_hash
from keg.errors import BadRequest, CompareFailed, KegBusy, KegError, NotFound, PathConflict
from keg.transaction import Transaction, compare, delete, parse_transaction, put
from master import git_http
from master.auth import ANONYMOUS, Authority, AuthError, Forbidden, Unauthenticated
from master.bodies import DeferredResponse, ValueStream
from master.openapi import spec
from master.ui import WebUi
from master.watch import FORMATS, WatchStream

MAX_BODY = 64 << 20
DEFAULT_HEARTBEAT = 15.0
CONTENT_TYPES = {".json": "application/json", ".tsv": "text/tab-separated-values; charset=utf-8",
                 ".md": "text/markdown; charset=utf-8", ".txt": "text/plain; charset=utf-8",
                 ".html": "text/plain; charset=utf-8", ".sh": "text/plain; charset=utf-8"}
REASONS = {200: "OK", 201: "Created", 204: "No Content", 304: "Not Modified", 400: "Bad Request",
           401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
           411: "Length Required", 412: "Precondition Failed", 413: "Content Too Large",
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

    def __init__(self, master, max_body: int = MAX_BODY, heartbeat: float = DEFAULT_HEARTBEAT):
        self.master = master
        self.authority = Authority(master)
        self.max_body = max_body
        self.heartbeat = heartbeat
        self.git_root = git_http.project_root(master.store.path) if hasattr(master, "store") else None
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
        principal = self.authority.authenticate(req.header("Authorization") or self.ui.cookie_authorization(req))
        if path.startswith("/v1/keg/") or path == "/v1/keg":
            return self._keg(req, start_response, principal, path[len("/v1/keg"):] or "/")
        if path.startswith("/git/"):
            return self._git(req, start_response, principal)
        if path.startswith("/v1/chunks/"):
            return self._chunk(req, start_response, principal, path[len("/v1/chunks/"):])
        if path.startswith("/v1/kid/"):
            self._allow(req, "GET")
            self.authority.check(principal, "/", "r")
            return self._json(start_response, self.master.resolve_kid(path[len("/v1/kid/"):]))
        handler = {"/v1/tx": self._tx, "/v1/head": self._head, "/v1/log": self._log, "/v1/diff": self._diff,
                   "/v1/watch": self._watch, "/v1/compact": self._compact, "/v1/gc": self._gc,
                   "/v1/whoami": self._whoami}.get(path)
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
            return self._read(req, start_response, path)
        if req.method in ("PUT", "DELETE"):
            self.authority.check(principal, path, "w")
            return self._write(req, start_response, principal, path)
        raise HttpError(405, f"{req.method} is not allowed on /v1/keg; use GET, HEAD, PUT or DELETE",
                        [("Allow", "GET, HEAD, PUT, DELETE")])

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
        if req.method == "PUT":
            mode = req.query.get("mode", "file")
            if mode not in ("file", "exec"):
                raise BadRequest("?mode= must be 'file' or 'exec'")
            op = self.master.put_stream(path, io.BytesIO(req.body()), 0o100755 if mode == "exec" else 0o100644)
        else:
            op = delete(path, req.query.get("recursive") in ("1", "true", "yes"))
        tx = Transaction((op,), tuple(compares), principal.author)
        return self._submit(start_response, tx, single_path=path, created=not compares and req.method == "PUT")

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
        return self._json(start_response, self.master.head().to_json())

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

    def _chunk(self, req, start_response, principal, name):
        if name == "missing":
            self._allow(req, "POST")
            if principal.kind == "anonymous":
                raise Unauthenticated("asking for missing chunks needs a token")
            names = req.json_body().get("chunks") if isinstance(req.json_body(), dict) else None
            if not isinstance(names, list) or len(names) > 100_000:
                raise BadRequest("the body must be {\"chunks\": [blake3, …]} with at most 100000 names")
            return self._json(start_response, {"missing": self.master.chunk_missing([check_hash(n) for n in names])})
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
            return self._json(start_response, {"chunk": name, "created": created}, 201 if created else 200)
        raise HttpError(405, f"{req.method} is not allowed on a chunk; use GET, HEAD or PUT",
                        [("Allow", "GET, HEAD, PUT")])

    # ----------------------------------------------------------------- git

    def _git(self, req, start_response, principal):
        rest = req.path[len("/git"):]
        if not (rest == "/keg.git" or rest.startswith("/keg.git/")):
            raise NotFound(f"no git repository at {req.path}; the namespace is /git/keg.git")
        if principal.kind == "anonymous" and not self.authority.allowed(principal, "/", "r"):
            raise Unauthenticated("git needs a token: use http://USER:TOKEN@host/git/keg.git "
                                  "or a credential helper")
        self.authority.check(principal, "/", "r")
        service = req.query.get("service", "")
        if rest.endswith("/git-receive-pack") or service == "git-receive-pack":
            message = ("keg.git is read-only: write with transactions "
                       "(keg put, keg tx, PUT /v1/keg/<path> or POST /v1/tx)")
            if rest.endswith("/info/refs"):
                body = git_http.refusal(message)
                start_response(_status_line(200), [("Content-Type", "application/x-git-receive-pack-advertisement"),
                                                   ("Content-Length", str(len(body))), ("Cache-Control", "no-cache")])
                return [body]
            raise Forbidden(message)
        self.master.publish()
        env = git_http.cgi_environ(req.environ, self.git_root, rest, principal.name)
        return git_http.CgiBody(start_response, env, req.body())


def make_app(master, **options) -> KegApp:
    """The WSGI application for ``master`` (``options`` as for ``KegApp``)."""
    return KegApp(master, **options)


__all__ = ["ANONYMOUS", "AuthError", "HttpError", "KegApp", "make_app", "status_of"]
