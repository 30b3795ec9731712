"""Every path is a page: a directory as a paginated table, a value by its format, a pointer, a large value.

Some paths get a panel above their value, because people act on them:
a process status (``/machines/<m>/status/<p>.json``) its state and the
restart and stop buttons, a process spec the same buttons, an app
(``/apps/<app>/app.json``) its releases with roll-back buttons, a job
(``/jobs/<job>.json``) its replica count with a scale form, a process
log (``/machines/<m>/status/logs/<p>.log``) a follow switch, and a build's
directory and files (``/builds/<app>/<source KID>/``) the build's state
(``master/ui/builds.py``), its ``log.txt`` a follow switch too.
"""

from __future__ import annotations

import calendar
import json
import re
import time

from keg import mounts
from keg.errors import KegError, NotFound
from master.ui import builds, values
from master.ui.html import (Page, api_url, breadcrumbs, esc, hidden, human_size, kid_link, link, notice,
                            path_url, query_url, table, timestamp)

PER_PAGE = 100
PER_PAGE_CHOICES = (50, 100, 500, 1000)
PROC_STATUS = re.compile(r"^/machines/([^/]+)/status/([^/]+)\.json$")
PROC_SPEC = re.compile(r"^/machines/([^/]+)/procs/([^/]+)\.json$")
PROC_LOG = re.compile(r"^/machines/([^/]+)/status/logs/([^/]+)\.log$")
APP_OBJECT = re.compile(r"^/apps/([^/]+)/app\.json$")
JOB_OBJECT = re.compile(r"^/jobs/([^/]+)\.json$")
DASHBOARDS = {"/machines": "/-/machines", "/apps": "/-/apps", "/jobs": "/-/jobs", "/services": "/-/services",
              "/builds": "/-/builds"}
DONE = {"restart": "Restart requested: the spec has a new restart_nonce, so the Mayor replaces the process.",
        "stop": "Stopped: the process spec was deleted; the Mayor stops the process.",
        "rollback": "Rolled back: the app's current release was changed.",
        "scale": "Scaled: the job's replica count was changed.",
        "edit": "Saved."}
KIND_WORDS = {"tree": "directory", "file": "file", "link": "symlink", "pointer": "pointer"}
STATE_CLASSES = {"running": "ok", "pending": "info", "pulling": "info", "exited": "muted", "failed": "bad",
                 "backoff": "warn"}


def entries_text(count: int) -> str:
    """``1 entry``, ``2,000 entries``."""
    return f"{count:,} entr{'y' if count == 1 else 'ies'}"


def state_badge(state) -> str:
    """A process state as a coloured label (the word is always there, colour is extra)."""
    text = str(state) if state is not None else "unknown"
    return f'<span class="badge {STATE_CLASSES.get(text, "info")}">{esc(text)}</span>'


def done_notice(view) -> str:
    """The notice after an action's redirect (``?done=<action>&r=<revision>``); fixed sentences only."""
    done = view.req.query.get("done")
    if done not in DONE:
        return ""
    number = view.req.query.get("r", "")
    where = f" (revision {esc(number)})" if number.isdigit() else ""
    return notice(esc(DONE[done]) + where, "ok")


def revision_line(view, rev, pinned: bool, path: str) -> str:
    """Which revision the page shows, its permalink, and the way back to the newest."""
    parts = [f'revision <a href="{esc(path_url("/", view="diff", **{"from": max(rev.number - 1, 0), "to": rev.number}))}">'
             f"{rev.number}</a>", timestamp(rev.time, view.now),
             link(path_url(path, rev=rev.kid), "permalink", title=f"this page at revision {rev.kid}")]
    if pinned:
        parts.append(link(path_url(path), "view the newest"))
    return '<p class="meta">' + " · ".join(parts) + "</p>"


def summary(view, entry, rev, pinned: bool) -> str:
    """The heading of a path's page: name, kind, size, KID, revision, and its links."""
    path = entry.path
    name = entry.name if path != "/" else "/"
    size = entries_text(entry.size) if entry.kind == "tree" else human_size(entry.size)
    kind = KIND_WORDS.get(entry.kind, entry.kind) + (" (large)" if entry.large else "")
    links = [link(path_url(path, view="history", rev=rev.number if pinned else None), "History")]
    if entry.kind in ("file", "link"):
        links.append(link(api_url(path, rev=rev.number if pinned else None), "Download" if entry.large else "Raw"))
    if (entry.kind == "file" and path.endswith(".json") and not entry.large and not pinned
            and view.can_write(path)):
        links.append(link(path_url(path, view="edit"), "Edit"))
    if path in DASHBOARDS:
        links.append(link(DASHBOARDS[path], "Dashboard"))
    return (f'<h1>{esc(name)}</h1><p class="meta"><span class="kind">{esc(kind)}</span> · {esc(size)} · '
            f'KID {kid_link(entry.kid)}</p>{revision_line(view, rev, pinned, path)}'
            f'<nav class="actions" aria-label="Views of this path">{" ".join(links)}</nav>')


def path_page(view, path: str) -> Page:
    """The page of one namespace path (``GET /ui/<path>``)."""
    view.check_read(path)
    which = view.req.query.get("view", "")
    if which == "history":
        from master.ui.history import log_page
        return log_page(view, path)
    if which == "diff":
        from master.ui.history import diff_page
        return diff_page(view, path)
    if which == "edit":
        return edit_page(view, path)
    rev, pinned = view.revision()
    crumbs = breadcrumbs(path, rev.number if pinned else None)
    try:
        entry = view.master.stat(path, rev.number)
    except NotFound as err:
        body = (f"<h1>{esc(path)}</h1>" + notice(esc(str(err)), "warn")
                + f'<p>{link(path_url(path, view="history"), "History of this path")}</p>')
        return Page(path, body, 404, watch=None if pinned else path, since=rev.number, crumbs=crumbs)
    body = done_notice(view) + summary(view, entry, rev, pinned)
    build = builds.build_of_path(path)
    if build is not None and entry.kind == "tree":
        body += builds.build_panel(view, *build, rev, pinned)
    if entry.kind == "tree":
        body += directory(view, path, rev, pinned)
    elif entry.kind == "pointer":
        body += pointer(view, entry, rev, pinned)
    else:
        body += value(view, entry, rev, pinned)
    return Page(path, body, watch=None if pinned else builds.watch_prefix(path), since=rev.number, crumbs=crumbs,
                pinned=f"Revision {rev.number}: not live" if pinned else "")


# ------------------------------------------------------------ directories

def _page_args(view, total: int) -> tuple:
    per = view.req.int_arg("per", PER_PAGE, 1, max(PER_PAGE_CHOICES))
    pages = max(1, -(-total // per))
    page = min(view.req.int_arg("page", 1, 1), pages)
    return per, page, pages


def _pager(path: str, page: int, pages: int, per: int, first: int, last: int, total: int, extra: dict) -> str:
    def to(n):
        return path_url(path, page=n, per=per if per != PER_PAGE else None, **extra)
    prev = link(to(page - 1), "← Previous", "button") if page > 1 else ""
    nxt = link(to(page + 1), "Next →", "button") if page < pages else ""
    jump = ""
    if pages > 1:
        keep = "".join(hidden(k, v) for k, v in extra.items() if v is not None) + (
            hidden("per", per) if per != PER_PAGE else "")
        jump = (f'<form method="get" class="inline" action="{esc(path_url(path))}">{keep}'
                f'<label>Page <input type="number" name="page" min="1" max="{pages}" value="{page}" '
                f'class="narrow"></label> of {pages:,} <button type="submit">Go</button></form>')
    shown = f"Entries {first:,}–{last:,} of {total:,}" if total else "No entries"
    return f'<nav class="pager" aria-label="Pages">{prev}<span>{shown}</span>{jump}{nxt}</nav>'


def directory(view, path: str, rev, pinned: bool) -> str:
    """A directory as a table of one page of its entries."""
    listing = view.ui.index.listing(path, rev.number, newest=not pinned)
    prefix = view.req.query.get("q", "")
    start, end = 0, len(listing)
    if prefix:
        start, end = listing.position(prefix), listing.position(prefix + "\U0010ffff")
    total = end - start
    per, page, pages = _page_args(view, total)
    first = start + (page - 1) * per
    entries = view.ui.index.entries(listing, first, min(per, end - first))
    changed = view.ui.index.last_changes(listing, [e.name for e in entries])
    keep_rev = rev.number if pinned else None
    rows = []
    revisions: dict = {}
    for e in entries:
        shown_name = e.name + ("/" if e.kind in ("tree", "pointer") else "")
        size = entries_text(e.size) if e.kind == "tree" else ("—" if e.kind == "pointer" else human_size(e.size))
        number = changed.get(e.name)
        if number is not None:
            if number not in revisions:
                revisions[number] = view.master.revision(number)
            when = (f'<a href="{esc(path_url(e.path, rev=number))}">r{number}</a> '
                    f"{timestamp(revisions[number].time, view.now)}")
        else:
            when = f'<span class="muted">r{listing.bound(e.name)} or earlier</span>'
        rows.append([link(path_url(e.path, rev=keep_rev), shown_name, "name"),
                     esc(KIND_WORDS.get(e.kind, e.kind) + (" (large)" if e.large else "")), esc(size),
                     kid_link(e.kid), when, link(path_url(e.path, view="history"), "history")])
    search = (f'<form method="get" role="search" class="inline filter" action="{esc(path_url(path))}">'
              f'{hidden("rev", keep_rev) if keep_rev else ""}'
              f'<label>Names starting with <input type="search" name="q" value="{esc(prefix)}"></label> '
              f'<button type="submit">Filter</button></form>')
    pager = _pager(path, page, pages, per, first - start + 1 if total else 0, first - start + len(entries), total,
                   {"q": prefix or None, "rev": keep_rev})
    return (search + pager + table(["Name", "Kind", "Size", "KID", "Last change", ""], rows, cls="listing",
                                   caption=f"Entries of {path}") + (pager if len(entries) > 20 else ""))


# ---------------------------------------------------------------- values

def value(view, entry, rev, pinned: bool) -> str:
    """A file's value by its format, with the panel its path calls for."""
    path = entry.path
    if entry.large:
        return large(view, entry, rev, pinned)
    data = view.master.read(path, rev.number)
    linker = values.Linker(lambda p: view.exists(p, rev.number), rev.number if pinned else None)
    parsed = None
    if path.endswith(".json"):
        try:
            parsed = json.loads(data)
        except ValueError:
            parsed = None
    build = builds.build_of_path(path)
    panel = builds.build_panel(view, *build, rev, pinned) if build else special_panel(view, path, parsed, rev, pinned)
    markup, note = values.render_value(path, data, linker)
    follow = ""
    if PROC_LOG.match(path) or (build and path.endswith("/log.txt")):
        follow = ('<p><label class="switch"><input type="checkbox" id="follow" data-keep checked> '
                  "Follow: keep the newest lines in view</label></p>")
        markup = re.sub(r'^<pre class="(log|text)">', '<pre class="log" data-follow tabindex="0">', markup, count=1)
    return panel + (notice(esc(note), "warn") if note else "") + follow + markup


def large(view, entry, rev, pinned: bool) -> str:
    """A large value: what its pointer says, and a download link (the bytes are streamed, verified)."""
    pointer = view.master.pointer(entry.path, rev.number)
    facts = [("Size", f"{human_size(entry.size)} ({entry.size:,} bytes)"),
             ("blake3 of the whole", f"<code>{esc(pointer.blake3)}</code>" if pointer else "—"),
             ("Chunks", f"{len(pointer.chunks):,}" if pointer else "—"),
             ("Pointer blob KID", kid_link(entry.kid))]
    dl = "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in facts)
    href = api_url(entry.path, rev=rev.number if pinned else None)
    return (f'<p>This value is stored as chunks; git holds a small pointer to them.</p><dl class="facts">{dl}</dl>'
            f'<p><a class="button" href="{esc(href)}" download>Download ({esc(human_size(entry.size))})</a></p>')


def pointer(view, entry, rev, pinned: bool) -> str:
    """A pointer to another keg: the commit it names, its mount table line, and the tree beneath."""
    table_lines = mounts.read_table(view.master, rev.number)
    location, ref = table_lines.get(entry.path, (None, None))
    where = (f"<dt>Location</dt><dd><code>{esc(location)}</code></dd><dt>Ref</dt><dd><code>{esc(ref)}</code></dd>"
             if location else f'<dt>Location</dt><dd class="muted">not in {link(path_url(mounts.TABLE), mounts.TABLE)}</dd>')
    head = (f'<p>A pointer to commit {kid_link(entry.kid)} of another keg or git repository.</p>'
            f'<dl class="facts"><dt>Commit</dt><dd><code>{esc(entry.kid)}</code></dd>{where}</dl>')
    try:
        return head + "<h2>What it points at</h2>" + directory(view, entry.path, rev, pinned)
    except KegError as err:
        return head + notice(esc(str(err)), "warn")


# ---------------------------------------------------------------- panels

def special_panel(view, path: str, parsed, rev, pinned: bool) -> str:
    """The panel above a value whose path people act on (empty for other paths)."""
    if not isinstance(parsed, dict):
        return ""
    m = PROC_STATUS.match(path)
    if m and m.group(2) != "mayor":
        return process_panel(view, m.group(1), m.group(2), parsed, pinned)
    m = PROC_SPEC.match(path)
    if m:
        return spec_panel(view, m.group(1), m.group(2), pinned)
    m = APP_OBJECT.match(path)
    if m:
        return releases_panel(view, m.group(1), path, parsed, pinned)
    m = JOB_OBJECT.match(path)
    if m:
        return job_panel(view, path, parsed, pinned)
    return ""


def process_actions(view, machine: str, name: str) -> str:
    """Restart and stop buttons for a process, when its spec exists and the user may write it."""
    spec_path = f"/machines/{machine}/procs/{name}.json"
    if not view.can_write(spec_path):
        return ""
    try:
        spec_kid = view.master.stat(spec_path).kid
    except NotFound:
        return '<p class="muted">No spec in the process table: nothing to restart or stop.</p>'
    return ('<div class="buttons">'
            + view.action_form(spec_path, "restart", "Restart", {"kid": spec_kid})
            + view.action_form(spec_path, "stop", "Stop", {"kid": spec_kid},
                               confirm=f"Stop {name} on {machine}? Its spec is deleted.", cls="button danger")
            + "</div>")


def process_panel(view, machine: str, name: str, status: dict, pinned: bool) -> str:
    """A process's state at a glance, with its spec, log and actions."""
    started = status.get("started")
    facts = [("State", state_badge(status.get("state"))),
             ("Health", esc(status.get("health") if status.get("health") is not None else "—")),
             ("Restarts", esc(status.get("restarts", 0))),
             ("Image", kid_link(status.get("image")) if isinstance(status.get("image"), str) else "—"),
             ("Started", timestamp(started, view.now) if isinstance(started, (int, float)) else "—"),
             ("PID", esc(status.get("pid") if status.get("pid") is not None else "—")),
             ("Exit code", esc(status.get("exit_code") if status.get("exit_code") is not None else "—")),
             ("Process KID", kid_link(status.get("kid")) if isinstance(status.get("kid"), str) else "—")]
    if status.get("last_error"):
        facts.append(("Last error", f'<span class="error-text">{esc(status["last_error"])}</span>'))
    dl = "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in facts)
    spec_path = f"/machines/{machine}/procs/{name}.json"
    log_path = f"/machines/{machine}/status/logs/{name}.log"
    links = [link(path_url(spec_path), "Spec"), link(path_url(log_path), "Log"),
             link(path_url(f"/machines/{machine}"), f"Machine {machine}")]
    actions = "" if pinned else process_actions(view, machine, name)
    return (f'<section class="panel" aria-labelledby="proc-h"><h2 id="proc-h">Process {esc(name)} on '
            f'{esc(machine)}</h2><dl class="facts">{dl}</dl><p class="links">{" · ".join(links)}</p>'
            f"{actions}</section>")


def spec_panel(view, machine: str, name: str, pinned: bool) -> str:
    """A process spec's panel: where its status is, and the restart and stop buttons."""
    status_path = f"/machines/{machine}/status/{name}.json"
    status = view.read_json(status_path)
    state = state_badge(status.get("state")) if isinstance(status, dict) else '<span class="muted">no status yet</span>'
    actions = "" if pinned else process_actions(view, machine, name)
    return (f'<section class="panel" aria-labelledby="spec-h"><h2 id="spec-h">Process {esc(name)} on '
            f'{esc(machine)}</h2><p>State: {state} · {link(path_url(status_path), "Status")} · '
            f'{link(path_url(f"/machines/{machine}/status/logs/{name}.log"), "Log")}</p>{actions}</section>')


def release_time(r: dict):
    """When a release was made: ``created`` (a Unix time) or ``time`` (ISO 8601 UTC: ``builders.releases``)."""
    created = r.get("created")
    if isinstance(created, (int, float)) and not isinstance(created, bool):
        return created
    if isinstance(r.get("time"), str):
        try:
            return calendar.timegm(time.strptime(r["time"], "%Y-%m-%dT%H:%M:%SZ"))
        except ValueError:
            return None
    return None


def release_by(r: dict) -> str:
    """Who made a release: ``by`` or ``author``."""
    who = r.get("by", r.get("author"))
    return str(who) if who not in (None, "") else "—"


def releases_panel(view, app: str, path: str, obj: dict, pinned: bool) -> str:
    """An app's releases, newest first, with a roll-back button on each earlier one."""
    releases = [r for r in obj.get("releases") or [] if isinstance(r, dict)]
    current = obj.get("current")
    writable = not pinned and view.can_write(path)
    kid = view.master.stat(path).kid if writable else None
    rows = []
    for r in sorted(releases, key=lambda r: r.get("number") if isinstance(r.get("number"), int) else -1,
                    reverse=True):
        number = r.get("number")
        is_current = number == current
        mark = '<span class="badge ok">current</span>' if is_current else ""
        act = ""
        if writable and not is_current and isinstance(number, int):
            act = view.action_form(path, "rollback", f"Roll back to {number}", {"kid": kid, "release": number})
        image = r.get("image")
        rows.append([f"{esc(number)} {mark}", kid_link(image) if isinstance(image, str) else "—",
                     kid_link(r.get("source")) if isinstance(r.get("source"), str) and r["source"].startswith("K-")
                     else esc(r.get("source", "—")),
                     timestamp(release_time(r), view.now), esc(release_by(r)), act])
    made = builds.builds_of(view, app)
    shown = ""
    if made:
        shown = (f'<h3>Builds</h3><p class="meta">{len(made):,} build{"s" if len(made) != 1 else ""}, newest first · '
                 f'{link(query_url("/-/builds", app=app), f"all builds of {app}")}</p>'
                 + builds.builds_table(view, made[:20], with_app=False, caption=f"Builds of {app}"))
    body = table(["Release", "Image", "Source", "Created", "By", ""], rows, cls="releases") if rows else \
        '<p class="muted">No releases yet.</p>'
    return (f'<section class="panel" aria-labelledby="rel-h"><h2 id="rel-h">Releases of {esc(app)}</h2>'
            f"<p>Current release: <strong>{esc(current if current is not None else '—')}</strong></p>"
            f"{body}{shown}</section>")


def job_panel(view, path: str, obj: dict, pinned: bool) -> str:
    """A job's replica count, with a form to change it."""
    replicas = obj.get("replicas")
    form = ""
    if not pinned and view.can_write(path):
        kid = view.master.stat(path).kid
        form = (f'<form method="post" action="{esc(path_url(path))}" class="inline action">'
                f'{view.form_fields("scale", {"kid": kid})}'
                f'<label>Replicas <input type="number" name="replicas" min="0" max="100000" required '
                f'value="{esc(replicas if isinstance(replicas, int) else 1)}" class="narrow"></label> '
                f'<button type="submit" class="button">Scale</button></form>')
    return (f'<section class="panel" aria-labelledby="job-h"><h2 id="job-h">Job</h2>'
            f"<p>Replicas: <strong>{esc(replicas if replicas is not None else '—')}</strong> · "
            f"image {kid_link(obj.get('image')) if isinstance(obj.get('image'), str) else '—'}</p>{form}</section>")


# ------------------------------------------------------------------ edit

def edit_form(view, path: str, text: str, kid: str, base: int, label: str = "Save") -> str:
    """The JSON editor form: the text, the KID it replaces (compare-and-swap) and the revision it came from."""
    return (f'<form method="post" action="{esc(path_url(path))}" class="editor" data-editing>'
            f'{hidden("csrf", view.csrf)}{hidden("action", "edit")}{hidden("kid", kid)}{hidden("base", base)}'
            f'<label for="value">JSON value of {esc(path)}</label>'
            f'<textarea id="value" name="value" rows="20" spellcheck="false">{esc(text)}</textarea>'
            f'<div class="buttons"><button type="submit" class="button">{esc(label)}</button> '
            f'{link(path_url(path), "Cancel")}</div></form>')


def edit_page(view, path: str) -> Page:
    """``?view=edit``: edit a JSON value; the save is refused if it changed meanwhile."""
    head = view.head()
    crumbs = breadcrumbs(path)
    if not path.endswith(".json"):
        return Page("Not editable", notice(f"Only JSON values are edited here; {esc(path)} is not one.", "warn"),
                    400, crumbs=crumbs)
    if not view.can_write(path):
        what = "Log in to edit." if view.session is None else f"{esc(view.principal.name)} may not write {esc(path)}."
        return Page("Not allowed", notice(what, "error"), 403, crumbs=crumbs)
    entry = view.master.stat(path, head.number)
    text = view.master.read(path, head.number).decode("utf-8", "replace")
    body = (f"<h1>Edit {esc(entry.name)}</h1><p class=\"meta\">Editing KID {kid_link(entry.kid)} from revision "
            f"{head.number}. If someone changes it before you save, your save is refused and both versions "
            f"are shown.</p>" + edit_form(view, path, text, entry.kid, head.number))
    return Page(f"Edit {path}", body, watch=path, since=head.number, crumbs=crumbs)


def conflict_page(view, path: str, yours: str, base: int | None, actual: str | None) -> Page:
    """A refused edit: the user's version beside the one now stored, and what changed meanwhile."""
    import difflib
    head = view.head()
    theirs, who = "", ""
    if actual is not None:
        try:
            theirs = view.master.read(path, head.number).decode("utf-8", "replace")
            last = view.master.log(path, head.number, 1)
            if last:
                who = f" (revision {last[0][0].number}, by {esc(last[0][0].author)})"
        except KegError:
            theirs = ""
    base_text = ""
    if base is not None:
        try:
            base_text = view.master.read(path, base).decode("utf-8", "replace")
        except KegError:
            base_text = ""
    changes = "".join(difflib.unified_diff(base_text.splitlines(True), theirs.splitlines(True),
                                           "what you started from", "what is there now"))
    side = (f'<div class="sides"><section aria-labelledby="yours-h"><h2 id="yours-h">Your version (not saved)</h2>'
            f'<pre class="json">{esc(yours)}</pre></section><section aria-labelledby="theirs-h">'
            f'<h2 id="theirs-h">Now stored{who}</h2>'
            + (f'<p>KID {kid_link(actual)}</p><pre class="json">{esc(theirs)}</pre>' if actual else
               '<p class="muted">The value was deleted.</p>') + "</section></div>")
    diff = f'<h2>Their change</h2><pre class="diff">{esc(changes) or "(no difference in text)"}</pre>'
    again = ""
    if actual is not None:
        again = ("<h2>Save anyway</h2><p>Merge by hand below, then save over the version now stored.</p>"
                 + edit_form(view, path, yours, actual, head.number, "Save over the stored version"))
    body = (f"<h1>Conflict: {esc(path)} changed</h1>"
            + notice("Your save was refused: someone changed this value after you started editing. "
                     "Nothing was written.", "error") + side + diff + again)
    return Page(f"Conflict on {path}", body, 412, crumbs=breadcrumbs(path))

