"""The web UI (DESIGN §8): every namespace path is a page, served by the master's WSGI application.

URL space, beside the API's (docs/ui.md):

``/``                          redirects to ``/ui/``
``/ui/<path>``                 the page of namespace path ``<path>`` (as ``/v1/keg/<path>`` is its value);
                               ``?rev=R`` at a past revision, ``?view=history``, ``?view=diff&from=&to=``,
                               ``?view=edit``; ``POST`` runs an action on the path (restart, stop,
                               rollback, scale, edit; see ``master/ui/actions.py``)
``/-/machines`` ``/-/processes`` ``/-/apps`` ``/-/builds`` ``/-/jobs`` ``/-/services``   dashboards
``/-/kid/<KID>``               what a KID names
``/-/login``, ``/-/logout``    a session from a token (``master/ui/session.py``)
``/-/static/<file>``           the UI's own CSS and JavaScript, shipped in this package

``/-/`` can never be a namespace path's page (those are all under ``/ui/``),
so the UI's own pages cannot collide with a path.

Requests are authenticated as the API's are (a token in the session
cookie, or in an ``Authorization`` header) and every read and write is
checked against the same ACL; a write is a transaction submitted to the
master like ``POST /v1/tx``, answered once it is durable.
"""

from __future__ import annotations

import os
import urllib.parse

import blake3

from keg import paths
from keg.errors import BadRequest, CompareFailed, KegError, NotFound
from keg.transaction import Transaction
from master.auth import ANONYMOUS, Forbidden, Unauthenticated
from master.bodies import DeferredResponse
from master.ui import actions, builds, dashboards, session as sessions
from master.ui.html import SECURITY_HEADERS, Page, esc, hidden, kid_link, layout, link, notice, path_url, query_url
from master.ui.listing import DirectoryIndex
from master.ui.pages import conflict_page, path_page
from master.ui.view import View

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
REASONS = {200: "OK", 302: "Found", 303: "See Other", 304: "Not Modified", 400: "Bad Request",
           401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
           412: "Precondition Failed", 413: "Content Too Large", 500: "Internal Server Error",
           503: "Service Unavailable"}
DASHBOARD_PAGES = {"/-/machines": dashboards.machines_page, "/-/processes": dashboards.processes_page,
                   "/-/apps": dashboards.apps_page, "/-/jobs": dashboards.jobs_page,
                   "/-/services": dashboards.services_page, "/-/builds": builds.builds_page}


def _status(code: int) -> str:
    return f"{code} {REASONS.get(code, 'Unknown')}"


def _load_static() -> dict:
    """name -> (bytes, content type, version); the files are read once, at start-up."""
    out = {}
    for name in sorted(os.listdir(STATIC_DIR)):
        ext = os.path.splitext(name)[1]
        if ext in STATIC_TYPES:
            with open(os.path.join(STATIC_DIR, name), "rb") as f:
                data = f.read()
            out[name] = (data, STATIC_TYPES[ext], blake3.blake3(data).hexdigest()[:16])
    return out


def safe_next(target: str | None) -> str:
    """Where to go after logging in: a page of this UI, never another site."""
    if target and target.startswith(("/ui/", "/-/")) and not target.startswith("/-/log") \
            and "\\" not in target and not any(ord(c) < 32 for c in target):
        return target
    return "/ui/"


class WebUi:
    """The UI's part of the WSGI application.

    Args:
        app: the ``KegApp``; the UI uses its master, its authority and its
            transaction check, so that the UI can do nothing the API would refuse.
    """

    def __init__(self, app):
        self.app = app
        self.master = app.master
        self.authority = app.authority
        self.index = DirectoryIndex(app.master)
        self.static = _load_static()
        self.assets = {name: f"/-/static/{name}?v={version}" for name, (_, _, version) in self.static.items()}

    @staticmethod
    def owns(path: str) -> bool:
        """True for the URLs the UI answers (everything else is the API's)."""
        return path in ("/", "/ui") or path.startswith(("/ui/", "/-/"))

    @staticmethod
    def cookie_authorization(req) -> str | None:
        """An ``Authorization`` value from the session cookie, for the API's GET and HEAD only.

        A page's live updates (``/v1/watch``) and downloads (``/v1/keg/…``)
        are plain browser requests that cannot carry a header.  Writes to
        the API never take the cookie: only a header, so no other site can
        make a browser write.
        """
        if req.method not in ("GET", "HEAD"):
            return None
        found = sessions.session_from(req.environ)
        return f"Bearer {found.token}" if found is not None else None

    # ----------------------------------------------------------------- entry

    def __call__(self, req, start_response):
        view = None
        try:
            if req.path in ("/", "/ui"):
                return self._redirect(start_response, "/ui/", 302)
            if req.path.startswith("/-/static/"):
                return self._static(req, start_response)
            if req.path == "/-/login":
                return self._login(req, start_response)
            view, clear = self._view(req)
            if req.path == "/-/logout":
                return self._logout(view, start_response)
            return self._route(view, start_response, clear)
        except Unauthenticated as err:
            if req.method in ("GET", "HEAD") and (view is None or view.session is None):
                query = req.environ.get("QUERY_STRING", "")
                back = req.environ.get("PATH_INFO", "/ui/") + ("?" + query if query else "")
                return self._redirect(start_response, "/-/login?" + urllib.parse.urlencode({"next": back}))
            return self._error(start_response, err, view)
        except KegError as err:
            return self._error(start_response, err, view)

    def _view(self, req) -> tuple:
        """``(View, extra headers)``: who asks, from a header or the session cookie."""
        header = req.header("Authorization")
        if header:
            return View(self, req, self.authority.authenticate(header), None), []
        found = sessions.session_from(req.environ)
        if found is None:
            return View(self, req, ANONYMOUS, None), []
        try:
            principal = self.authority.authenticate(f"Bearer {found.token}")
        except Unauthenticated:
            # A revoked token, or a cookie of another keg on this host: the browser is logged out.
            return View(self, req, ANONYMOUS, None), [sessions.clear_cookie(sessions.SESSION_COOKIE, req.environ)]
        return View(self, req, principal, found), []

    def _route(self, view, start_response, extra_headers):
        req = view.req
        if req.path.startswith("/ui/"):
            path = paths.normalize(req.path[len("/ui"):])
            if req.method in ("GET", "HEAD"):
                return self._page(start_response, path_page(view, path), view, extra_headers)
            if req.method == "POST":
                return self._action(view, start_response, path)
            raise self._not_allowed(req, "GET, HEAD, POST")
        if req.path in DASHBOARD_PAGES:
            self._allow(req, "GET", "HEAD")
            return self._page(start_response, DASHBOARD_PAGES[req.path](view), view, extra_headers)
        if req.path.startswith("/-/kid/"):
            self._allow(req, "GET", "HEAD")
            return self._page(start_response, self._kid_page(view, req.path[len("/-/kid/"):]), view, extra_headers)
        raise NotFound(f"no page {req.path}; namespace paths are under /ui/")

    # --------------------------------------------------------------- answers

    @staticmethod
    def _not_allowed(req, allowed: str):
        from master.app import HttpError
        return HttpError(405, f"{req.method} is not allowed here; use {allowed}", [("Allow", allowed)])

    def _allow(self, req, *methods):
        if req.method not in methods:
            raise self._not_allowed(req, ", ".join(methods))

    def _page(self, start_response, page: Page, view, extra_headers=()):
        who = view.principal if view is not None else None
        csrf = view.csrf if view is not None else None
        body = layout(page, who, csrf, self.assets)
        headers = [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body))),
                   *SECURITY_HEADERS, *page.headers, *extra_headers]
        start_response(_status(page.status), headers)
        return [] if view is not None and view.req.method == "HEAD" else [body]

    def _redirect(self, start_response, location: str, code: int = 303, headers=()):
        body = f'<!doctype html><p>See <a href="{esc(location)}">{esc(location)}</a>.</p>\n'.encode()
        start_response(_status(code), [("Location", location), ("Content-Type", "text/html; charset=utf-8"),
                                       ("Content-Length", str(len(body))), *SECURITY_HEADERS, *headers])
        return [body]

    def _error(self, start_response, err: Exception, view):
        from master.app import status_of
        code = status_of(err)
        hint = ""
        if code == 401:
            hint = f'<p>{link("/-/login", "Log in")} with a token.</p>'
        elif code == 403:
            hint = "<p>Your token does not give you this right (see <code>/policy/acl.tsv</code>).</p>"
        body = f"<h1>{esc(REASONS.get(code, 'Error'))}</h1>" + notice(esc(str(err)), "error") + hint
        page = Page(REASONS.get(code, "Error"), body, code, headers=list(getattr(err, "headers", [])))
        return self._page(start_response, page, view)

    def _static(self, req, start_response):
        self._allow(req, "GET", "HEAD")
        name = req.path[len("/-/static/"):]
        if name not in self.static:
            raise NotFound(f"no static file {name}")
        data, content_type, version = self.static[name]
        cache = "public, max-age=31536000, immutable" if req.query.get("v") == version else "no-cache"
        start_response(_status(200), [("Content-Type", content_type), ("Content-Length", str(len(data))),
                                      ("Cache-Control", cache), ("ETag", f'"{version}"'),
                                      ("X-Content-Type-Options", "nosniff")])
        return [] if req.method == "HEAD" else [data]

    # ----------------------------------------------------------------- login

    @staticmethod
    def _form(req) -> dict:
        kind = req.environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
        if kind not in ("application/x-www-form-urlencoded", ""):
            raise BadRequest(f"a form must be sent as application/x-www-form-urlencoded, not {kind}")
        try:
            text = req.body().decode("utf-8")
        except UnicodeDecodeError as err:
            raise BadRequest("the form is not UTF-8") from err
        return {k: v[-1] for k, v in urllib.parse.parse_qs(text, keep_blank_values=True).items()}

    @staticmethod
    def _same_origin(req) -> bool:
        origin = req.header("Origin")
        if origin is None:
            return True   # older browsers and non-browser clients; the CSRF token still guards
        return urllib.parse.urlsplit(origin).netloc == (req.header("Host") or "")

    def _login_page(self, req, start_response, error: str = "", status: int = 200, principal=None):
        nonce, cookie = sessions.login_nonce(req.environ)
        following = safe_next(req.query.get("next") or (self._form(req).get("next") if req.method == "POST" else None))
        parts = ["<h1>Log in</h1>"]
        if req.query.get("out"):
            parts.append(notice("You are logged out.", "ok"))
        if error:
            parts.append(notice(esc(error), "error"))
        if principal is not None and principal.kind != "anonymous":
            parts.append(f"<p>You are signed in as <strong>{esc(principal.name)}</strong>. "
                         f"{link(following, 'Go on')}</p>")
        parts.append(
            '<form method="post" action="/-/login" class="login">'
            f'{hidden("csrf", nonce)}{hidden("next", following)}'
            '<label for="token">Token</label>'
            '<input id="token" name="token" type="password" autocomplete="current-password" required '
            'spellcheck="false" placeholder="kt_…">'
            '<p class="hint">The token <code>keg init</code> or <code>keg user add</code> printed. It is kept in an '
            'HttpOnly cookie of this browser until you log out.</p>'
            '<button type="submit" class="button">Log in</button></form>')
        page = Page("Log in", "".join(parts), status, headers=[cookie] if cookie else [])
        return self._page(start_response, page, None)

    def _login(self, req, start_response):
        if req.method in ("GET", "HEAD"):
            found = sessions.session_from(req.environ)
            principal = None
            if found is not None:
                try:
                    principal = self.authority.authenticate(f"Bearer {found.token}")
                except Unauthenticated:
                    principal = None
            return self._login_page(req, start_response, principal=principal)
        self._allow(req, "GET", "HEAD", "POST")
        form = self._form(req)
        if not self._same_origin(req) or not sessions.check_login_nonce(req.environ, form.get("csrf")):
            raise Forbidden("the login form's CSRF token is missing or wrong: reload the login page and try again")
        token = (form.get("token") or "").strip()
        try:
            principal = self.authority.authenticate(f"Bearer {token}") if token else ANONYMOUS
        except Unauthenticated:
            principal = ANONYMOUS
        if principal.kind == "anonymous":
            return self._login_page(req, start_response, "That token is not valid (unknown, revoked or mistyped).",
                                    401)
        made = sessions.new_session(token)
        headers = [sessions.set_cookie(sessions.SESSION_COOKIE, made.cookie_value(), req.environ),
                   sessions.clear_cookie(sessions.LOGIN_COOKIE, req.environ)]
        return self._redirect(start_response, safe_next(form.get("next")), 303, headers)

    def _logout(self, view, start_response):
        self._allow(view.req, "POST")
        form = self._form(view.req)
        if view.session is not None and not (self._same_origin(view.req) and view.session.check(form.get("csrf"))):
            raise Forbidden("the form's CSRF token is missing or wrong: reload the page and try again")
        return self._redirect(start_response, "/-/login?out=1", 303,
                              [sessions.clear_cookie(sessions.SESSION_COOKIE, view.req.environ)])

    # --------------------------------------------------------------- actions

    def _action(self, view, start_response, path: str):
        form = self._form(view.req)
        if view.session is None:
            raise Forbidden("the UI's forms work in a logged-in browser session; scripts use the API (/v1)")
        if not self._same_origin(view.req) or not view.session.check(form.get("csrf")):
            raise Forbidden("the form's CSRF token is missing or wrong: reload the page and try again")
        action = form.get("action", "")
        try:
            current = self.master.read(path)
        except NotFound:
            current = None
        except BadRequest as err:
            raise BadRequest(f"{path} is not a value the UI acts on: {err}") from err
        plan = actions.plan(action, path, form, current)
        tx = Transaction(plan.ops, plan.compares, view.principal.author)
        self.app.check_tx(view.principal, tx)
        pending = self.master.submit(tx)
        base = form.get("base", "")

        def render(result):
            collected = []

            def capture(status, headers, exc_info=None):
                collected.append((status, headers))
            if result.ok:
                back = urllib.parse.unquote(form.get("back") or "")
                target = back if back and safe_next(back) == back else None
                location = (query_url(urllib.parse.quote(target, safe="/"), done=plan.done, r=result.revision)
                            if target else path_url(plan.redirect, done=plan.done, r=result.revision))
                body = b"".join(self._redirect(capture, location))
            elif isinstance(result.error, CompareFailed) and action == "edit":
                page = conflict_page(view, path, form.get("value", "").replace("\r\n", "\n"),
                                     int(base) if base.isdigit() else None, result.error.actual)
                body = b"".join(self._page(capture, page, view))
            elif isinstance(result.error, CompareFailed):
                page = Page("Changed meanwhile", "<h1>Changed meanwhile</h1>" + notice(
                    f"{esc(path)} changed after this page was loaded (you saw {kid_link(result.error.expected)}, "
                    f"it is now {kid_link(result.error.actual)}). Nothing was written.", "error")
                    + f"<p>{link(path_url(plan.redirect), 'Look again')} before you act.</p>", 412)
                body = b"".join(self._page(capture, page, view))
            else:
                body = b"".join(self._error(capture, result.error, view))
            status, headers = collected[0]
            return status, headers, body

        return DeferredResponse(start_response, pending, render)

    # ------------------------------------------------------------------ KIDs

    def _kid_page(self, view, text: str) -> Page:
        view.check_read("/")
        found = self.master.resolve_kid(text)
        kind, kid = found.get("kind"), found.get("kid", text)
        rows = [("KID", f"<code>{esc(kid)}</code>"), ("Names", esc(kind))]
        if kind == "revision":
            number = found.get("revision")
            rows += [("Revision", esc(number)), ("Summary", esc(found.get("summary", "")))]
            more = (f'<p>{link(path_url("/", rev=kid), "Browse the namespace at this revision")} · '
                    f'{link(path_url("/", view="diff", **{"from": max((number or 1) - 1, 0), "to": kid}), "What it changed")}</p>')
        elif kind in ("file", "tree"):
            holders = found.get("paths") or []
            rows.append(("Size", esc(found.get("size"))))
            items = "".join(f"<li>{link(path_url(p), p)}</li>" for p in holders)
            more = (f"<h2>Paths holding it now</h2><ul>{items}</ul>" if items else
                    '<p class="muted">No path holds this value in the newest revision; it is in history only.</p>')
        else:
            where = found.get("path")
            more = f"<p>Declared in {link(path_url(where), where)}</p>" if isinstance(where, str) else ""
            rows += [(k.capitalize(), esc(v)) for k, v in found.items() if k not in ("kid", "kind", "path")]
        dl = "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in rows)
        return Page(f"KID {kid[:14]}", f'<h1>KID {esc(kid[:14])}…</h1><dl class="facts">{dl}</dl>{more}')


__all__ = ["WebUi", "safe_next"]
