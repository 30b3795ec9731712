"""HTML building blocks of the web UI: escaping, links to namespace paths, the page layout.

Every page is built from plain Python strings.  The rule that keeps them
safe: a value that comes from the keg, a request or an error message is
passed through :func:`esc` (text and attribute values alike, quotes
included) before it is put into markup, and a URL is built by
:func:`path_url` or :func:`query_url`, which percent-encode it first.
Functions here return markup (already safe); their arguments are text.
"""

from __future__ import annotations

import html
import time
import urllib.parse
from dataclasses import dataclass, field

KID_SHORT = 12          # hex digits of a KID shown in tables (the full KID is in the title and the link)
SECURITY_HEADERS = [
    ("Content-Security-Policy", "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "same-origin"),
    ("Cache-Control", "no-store"),
]
NAV = (("/ui/", "Namespace"), ("/-/machines", "Machines"), ("/-/processes", "Processes"), ("/-/apps", "Apps"),
       ("/-/builds", "Builds"), ("/-/jobs", "Jobs"), ("/-/services", "Services"), ("/ui/docs", "Help"))


def esc(value) -> str:
    """Text made safe for HTML content and for quoted attribute values."""
    return html.escape(str(value), quote=True)


def path_url(path: str, **query) -> str:
    """The UI's URL of a namespace path (``/ui/<path>``), with query arguments (None ones left out)."""
    quoted = urllib.parse.quote(path, safe="/")
    return query_url("/ui" + quoted if path != "/" else "/ui/", **query)


def query_url(base: str, **query) -> str:
    """``base`` with the query arguments whose value is not None."""
    pairs = [(k, str(v)) for k, v in query.items() if v is not None and v != ""]
    return base + ("?" + urllib.parse.urlencode(pairs) if pairs else "")


def api_url(path: str, rev=None) -> str:
    """The API's URL of a namespace path's value (``/v1/keg/<path>``)."""
    return query_url("/v1/keg" + urllib.parse.quote(path, safe="/"), rev=rev)


def kid_url(kid: str) -> str:
    """The page that says what a KID names."""
    return "/-/kid/" + urllib.parse.quote(kid, safe="")


def link(href: str, text: str, cls: str = "", title: str = "") -> str:
    """An ``<a>`` element; ``text`` is escaped here."""
    extra = (f' class="{esc(cls)}"' if cls else "") + (f' title="{esc(title)}"' if title else "")
    return f'<a href="{esc(href)}"{extra}>{esc(text)}</a>'


def kid_link(kid: str | None) -> str:
    """A KID shortened in the text, whole in the title and the link; a dash for None."""
    if not kid:
        return '<span class="muted">—</span>'
    return f'<a class="kid" href="{esc(kid_url(kid))}" title="{esc(kid)}"><code>{esc(kid[:2 + KID_SHORT])}</code></a>'


def human_size(size: int) -> str:
    """Bytes in the largest unit that keeps the number at least 1."""
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{size} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} bytes"


def age(seconds: float) -> str:
    """A duration as people say it: ``42 s``, ``5 min``, ``3 h``, ``2 d``."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"


def timestamp(epoch, now: float | None = None) -> str:
    """A ``<time>`` element for a Unix time, with its age when ``now`` is given."""
    if not isinstance(epoch, (int, float)) or isinstance(epoch, bool):
        return '<span class="muted">—</span>'
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
    text = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))
    if now is not None:
        return f'<time datetime="{iso}" title="{text}">{esc(age(now - epoch))} ago</time>'
    return f'<time datetime="{iso}">{text}</time>'


def table(headers, rows, cls: str = "", caption: str = "", sortable: bool = False) -> str:
    """A table in a horizontally scrollable wrapper; ``rows`` are lists of cell markup."""
    if sortable:
        head = "".join(f'<th scope="col"><button type="button" class="sort">{esc(h)}</button></th>' if h else
                       '<th scope="col"></th>' for h in headers)
        cls = (cls + " sortable").strip()
    else:
        head = "".join(f'<th scope="col">{esc(h)}</th>' for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return (f'<div class="table-wrap"><table class="{esc(cls)}">{cap}<thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def filter_select(label: str, name: str, values, selected: str) -> str:
    """A labelled ``<select>`` of a filter form: "all" (empty) first, then ``values``."""
    options = "".join(f'<option value="{esc(v)}"{" selected" if v == selected else ""}>{esc(v)}</option>'
                      for v in values)
    return f'<label>{esc(label)} <select name="{esc(name)}"><option value="">all</option>{options}</select></label> '


def hidden(name: str, value) -> str:
    """A hidden form field."""
    return f'<input type="hidden" name="{esc(name)}" value="{esc(value)}">'


def notice(text_markup: str, kind: str = "info") -> str:
    """A message box; ``kind`` is info, ok, warn or error (errors are announced to screen readers)."""
    role = ' role="alert"' if kind == "error" else ' role="status"'
    return f'<div class="notice {esc(kind)}"{role}>{text_markup}</div>'


def breadcrumbs(path: str, rev=None) -> str:
    """The path as links, one per ancestor."""
    items = [f'<li>{link(path_url("/", rev=rev), "/")}</li>']
    current = ""
    for name in [n for n in path.split("/") if n]:
        current += "/" + name
        if current == path:
            items.append(f'<li><span aria-current="page">{esc(name)}</span></li>')
        else:
            items.append(f"<li>{link(path_url(current, rev=rev), name)}</li>")
    return f'<nav class="crumbs" aria-label="Path"><ol>{"".join(items)}</ol></nav>'


@dataclass
class Page:
    """What a handler returns: a title, the markup of ``<main>``, and how the page stays live.

    ``watch`` is the prefix whose changes refresh the page (None: not live,
    as for a past revision), ``since`` the revision the page shows.
    """

    title: str
    body: str
    status: int = 200
    watch: str | None = None
    since: int | None = None
    crumbs: str = ""
    headers: list = field(default_factory=list)
    pinned: str = ""   # why the page is not live, shown in place of the live indicator


def _user_bar(who, csrf: str | None) -> str:
    if who is None or who.kind == "anonymous":
        return f'<div class="who">{link("/-/login", "Log in")}</div>'
    logout = ""
    if csrf:
        logout = (f'<form method="post" action="/-/logout" class="inline">{hidden("csrf", csrf)}'
                  f'<button type="submit" class="link">Log out</button></form>')
    return f'<div class="who"><span>Signed in as <strong>{esc(who.name)}</strong></span> {logout}</div>'


def layout(page: Page, who, csrf: str | None, assets: dict) -> bytes:
    """The whole document around a page.

    Args:
        who: the ``Principal`` (or None before login).
        csrf: the session's CSRF token, for the log-out form.
        assets: static file name -> versioned URL.
    """
    nav = "".join(f"<li>{link(href, text)}</li>" for href, text in NAV)
    live_attrs = ""
    if page.watch is not None and page.since is not None:
        live_attrs = f' data-watch="{esc(page.watch)}" data-since="{esc(page.since)}"'
    indicator = ""
    if page.watch is not None or page.pinned:
        indicator = (f'<p id="live" class="live" role="status" aria-live="polite" data-state="'
                     f'{"off" if page.watch is None else "connecting"}">'
                     f'{esc(page.pinned if page.watch is None else "Connecting…")}</p>')
    doc = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(page.title)} · Keg</title>"
        '<link rel="icon" href="data:,">'
        f'<link rel="stylesheet" href="{esc(assets["ui.css"])}">'
        f'<script src="{esc(assets["ui.js"])}" defer></script></head>'
        f"<body{live_attrs}>"
        '<a class="skip" href="#main">Skip to content</a>'
        '<header class="top"><a class="brand" href="/ui/">Keg</a>'
        f'<nav class="dash" aria-label="Sections"><ul>{nav}</ul></nav>{_user_bar(who, csrf)}</header>'
        f'<div class="bar">{page.crumbs}{indicator}</div>'
        f'<main id="main" tabindex="-1">{page.body}</main>'
        "</body></html>\n")
    return doc.encode("utf-8")
