"""One request as the pages see it: who asks, which revision, what they may do, forms they may post."""

from __future__ import annotations

import json
import time
import urllib.parse

from keg.errors import BadRequest, KegError, NotFound
from master.ui.html import esc, hidden, path_url


class View:
    """The request, the principal, the session and the master, with the checks pages need.

    Args:
        ui: the ``WebUi``.
        req: the ``master.app.Request``.
        principal: who asks (``ANONYMOUS`` without a token).
        session: the browser session, or None (a token in a header, or nobody).
    """

    def __init__(self, ui, req, principal, session):
        self.ui = ui
        self.master = ui.master
        self.req = req
        self.principal = principal
        self.session = session
        self.now = time.time()
        self._head = None

    @property
    def csrf(self) -> str | None:
        """The session's CSRF token (None without a session: no forms are offered then)."""
        return self.session.csrf if self.session is not None else None

    def head(self):
        """The newest revision, read once per request."""
        if self._head is None:
            self._head = self.master.head()
        return self._head

    def revision(self):
        """``(Revision, pinned)``: the ``?rev=`` asked for (pinned), or the newest."""
        spec = self.req.query.get("rev")
        if spec:
            return self.master.revision(spec), True
        return self.head(), False

    def check_read(self, path: str) -> None:
        """Raise ``Unauthenticated``/``Forbidden`` unless the principal may read ``path``."""
        self.ui.authority.check(self.principal, path, "r")

    def can_read(self, path: str) -> bool:
        """True when the principal may read ``path``."""
        return self.ui.authority.allowed(self.principal, path, "r")

    def can_write(self, path: str) -> bool:
        """True when a write button for ``path`` should be shown: a session, and the ACL's ``w``."""
        return self.session is not None and self.ui.authority.allowed(self.principal, path, "w")

    def exists(self, path: str, rev=None) -> bool:
        """True when something is at ``path``."""
        try:
            self.master.stat(path, rev)
            return True
        except (NotFound, BadRequest):
            return False

    def read_json(self, path: str, rev=None):
        """The parsed JSON value at ``path``, or None when absent, unreadable or not JSON."""
        try:
            return json.loads(self.master.read(path, rev))
        except (KegError, ValueError):
            return None

    def entries(self, path: str, rev=None) -> list:
        """The directory's entries, or ``[]`` when it is absent or not readable."""
        if not self.can_read(path):
            return []
        try:
            return self.master.list(path, rev)
        except (NotFound, BadRequest):
            return []

    def form_fields(self, action: str, fields=None) -> str:
        """The hidden fields of an action form: CSRF token, action, the page to come back to, and ``fields``."""
        back = urllib.parse.quote(self.req.path, safe="/")
        return (hidden("csrf", self.csrf or "") + hidden("action", action) + hidden("back", back)
                + "".join(hidden(k, v) for k, v in (fields or {}).items()))

    def action_form(self, path: str, action: str, label: str, fields=None, confirm: str = "",
                    cls: str = "") -> str:
        """A one-button form posting ``action`` for ``path``; the answer comes back to this page."""
        data = f' data-confirm="{esc(confirm)}"' if confirm else ""
        return (f'<form method="post" action="{esc(path_url(path))}" class="inline action"{data}>'
                f'{self.form_fields(action, fields)}'
                f'<button type="submit" class="{esc(cls or "button")}">{esc(label)}</button></form>')
