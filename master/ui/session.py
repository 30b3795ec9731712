"""Browser sessions: a token given once at login, kept in an HttpOnly cookie, and CSRF tokens.

The session cookie ``keg_session`` holds ``<token>.<nonce>``: the user's
own token (so every request is authenticated by the same ``Authority`` as
the API, and a revoked token ends its sessions at once) and a random nonce
chosen at login.  The cookie is ``HttpOnly`` (scripts cannot read it) and
``SameSite=Strict`` (other sites' pages cannot make the browser send it),
and ``Secure`` when the request came over HTTPS.

The CSRF token of a session is ``blake3(nonce)`` keyed by a key derived
from the token: it changes with every login, only the holder of the cookie
can know it, and the master keeps no state for it (replicas and restarts
need nothing shared).  Every form carries it; every POST is refused (403)
without it.  The login form, which comes before any session, uses a
double-submit cookie ``keg_login`` instead.
"""

from __future__ import annotations

import hmac
import re
import secrets
from dataclasses import dataclass

import blake3

SESSION_COOKIE = "keg_session"
LOGIN_COOKIE = "keg_login"
_VALUE_RE = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class Session:
    """A logged-in browser: the token it authenticates with and its login nonce."""

    token: str
    nonce: str

    @property
    def csrf(self) -> str:
        """The value every form of this session carries."""
        key = blake3.blake3(b"keg-ui-csrf\x00" + self.token.encode()).digest()
        return blake3.blake3(self.nonce.encode(), key=key).hexdigest()[:40]

    def cookie_value(self) -> str:
        """What the session cookie holds."""
        return f"{self.token}.{self.nonce}"

    def check(self, submitted: str | None) -> bool:
        """True when a form's CSRF field is this session's."""
        return bool(submitted) and hmac.compare_digest(submitted.encode(), self.csrf.encode())


def new_session(token: str) -> Session:
    """A session for a token that was just checked."""
    return Session(token, secrets.token_urlsafe(18))


def cookies(environ: dict) -> dict:
    """The request's cookies by name (the first of each name wins, as browsers send the most specific first)."""
    out: dict = {}
    for part in environ.get("HTTP_COOKIE", "").split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name and name not in out:
            out[name] = value.strip().strip('"')
    return out


def session_from(environ: dict) -> Session | None:
    """The session a request's cookie names, if the cookie is well formed (the token is checked later)."""
    value = cookies(environ).get(SESSION_COOKIE, "")
    token, sep, nonce = value.rpartition(".")
    if not sep or not _VALUE_RE.match(nonce) or not _VALUE_RE.match(token or "-"):
        return None
    return Session(token, nonce) if token else None


def is_https(environ: dict) -> bool:
    """True when the browser talks HTTPS to us (directly, or to nginx in front)."""
    return environ.get("wsgi.url_scheme") == "https" or environ.get("HTTP_X_FORWARDED_PROTO", "") == "https"


def set_cookie(name: str, value: str, environ: dict, max_age: int | None = None) -> tuple:
    """A ``Set-Cookie`` header: HttpOnly, SameSite=Strict, Path=/, Secure over HTTPS."""
    parts = [f"{name}={value}", "Path=/", "HttpOnly", "SameSite=Strict"]
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    if is_https(environ):
        parts.append("Secure")
    return ("Set-Cookie", "; ".join(parts))


def clear_cookie(name: str, environ: dict) -> tuple:
    """A ``Set-Cookie`` header that removes a cookie."""
    return set_cookie(name, "", environ, max_age=0)


def login_nonce(environ: dict) -> tuple:
    """``(value, Set-Cookie header or None)``: the double-submit value for the login form."""
    value = cookies(environ).get(LOGIN_COOKIE, "")
    if _VALUE_RE.match(value or "-") and len(value) >= 16:
        return value, None
    value = secrets.token_urlsafe(18)
    return value, set_cookie(LOGIN_COOKIE, value, environ)


def check_login_nonce(environ: dict, submitted: str | None) -> bool:
    """True when the login form's field equals the login cookie."""
    value = cookies(environ).get(LOGIN_COOKIE, "")
    return bool(value) and bool(submitted) and hmac.compare_digest(value.encode(), submitted.encode())
