"""Builds: what builders write under ``/builds/<app>/<source KID>/``, as a dashboard, an app's list and a panel.

A builder (``builders/builder.py``, docs/builds.md) claims a pushed source
by writing ``builder.json`` (``builder``, ``started``), publishes the
build's output to ``log.txt`` about twice a second while it runs, and ends
with ``result.json`` (``ok``, ``error``, ``seconds``, ``image``,
``release``, ``cached``…).  So a build is *running* from its claim until
its result, then *ok* or *failed*; a source pushed to ``/src/<app>`` that
no builder has claimed yet is *queued*.  Fields the page does not know are
ignored and missing ones shown as a dash, so older builders' output shows
too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from keg import paths
from keg.errors import KegError
from master.ui.html import Page, age, esc, filter_select, kid_link, link, notice, path_url, query_url, table, timestamp

BUILDS = "/builds"
SOURCES = "/src"
BUILD_DIR = re.compile(r"^/builds/([^/_][^/]*)/(K-[0-9a-f]{8,64})$")
BUILD_FILE = re.compile(r"^/builds/([^/_][^/]*)/(K-[0-9a-f]{8,64})/(log\.txt|result\.json|builder\.json)$")
STATES = ("queued", "running", "ok", "failed")
STATE_CLASSES = {"queued": "muted", "running": "info", "ok": "ok", "failed": "bad"}
RECENT = 200            # builds shown on the dashboard, newest first
MAX_LAST_LINE = 200     # characters of a running build's last log line shown


@dataclass
class Build:
    """One build as its files describe it."""

    app: str
    source: str
    state: str
    builder: str | None = None
    started: float | None = None
    seconds: float | None = None   # how long it took, or has been running
    result: dict = field(default_factory=dict)
    has_log: bool = False

    @property
    def base(self) -> str:
        """The build's directory."""
        return f"{BUILDS}/{self.app}/{self.source}"

    @property
    def log_path(self) -> str:
        """Where its output is."""
        return self.base + "/log.txt"


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def read_build(view, app: str, source: str, rev=None, now: float | None = None) -> Build:
    """The build of ``source`` for ``app``, from the files in its directory (queued when there is none).

    Args:
        now: the time a running build's duration runs to (default: the request's; a past revision's own time).
    """
    base = f"{BUILDS}/{app}/{source}"
    names = {e.name for e in view.entries(base, rev)}
    claim = view.read_json(base + "/builder.json", rev) if "builder.json" in names else None
    result = view.read_json(base + "/result.json", rev) if "result.json" in names else None
    claim = claim if isinstance(claim, dict) else {}
    started = _number(claim.get("started"))
    if isinstance(result, dict):
        state = "ok" if result.get("ok") is True else "failed"
        seconds = _number(result.get("seconds"))
    else:
        result = {}
        state = "running" if names else "queued"
        seconds = (view.now if now is None else now) - started if started is not None else None
    builder = claim.get("builder") if isinstance(claim.get("builder"), str) else result.get("builder")
    return Build(app, source, state, builder if isinstance(builder, str) else None, started, seconds, result,
                 "log.txt" in names)


def _newest_first(builds: list) -> list:
    # Queued builds have not started: they are the newest.  Others by their start, unknown ones last.
    return sorted(builds, key=lambda b: (b.state == "queued", b.started if b.started is not None else float("-inf")),
                  reverse=True)


def builds_of(view, app: str, rev=None) -> list:
    """Every build of ``app``, newest first, with its source in ``/src/<app>`` queued if no builder took it yet."""
    found = [read_build(view, app, e.name, rev) for e in view.entries(f"{BUILDS}/{app}", rev)
             if e.kind == "tree" and e.name.startswith("K-")]
    if view.can_read(f"{SOURCES}/{app}"):
        try:
            pushed = view.master.stat(f"{SOURCES}/{app}", rev)
        except KegError:
            pushed = None
        if pushed is not None and pushed.kind == "pointer" and pushed.kid not in {b.source for b in found}:
            found.append(Build(app, pushed.kid, "queued"))
    return _newest_first(found)


def latest_build(view, app: str):
    """The build of the source last pushed to ``/src/<app>`` (queued when no builder took it yet), or None."""
    if not view.can_read(f"{SOURCES}/{app}"):
        return None
    try:
        pushed = view.master.stat(f"{SOURCES}/{app}")
    except KegError:
        return None
    return read_build(view, app, pushed.kid) if pushed.kind == "pointer" else None


def build_count(view, app: str) -> int:
    """How many builds ``app`` has (directories under ``/builds/<app>/``)."""
    return sum(1 for e in view.entries(f"{BUILDS}/{app}") if e.kind == "tree" and e.name.startswith("K-"))


def app_names(view) -> list:
    """The apps that have builds, or a source pushed, sorted (``/builds/_cache`` is the builders' own)."""
    apps = {e.name for e in view.entries(BUILDS) if e.kind == "tree" and not e.name.startswith("_")}
    if view.can_read(SOURCES):
        apps |= {e.name for e in view.entries(SOURCES) if e.kind == "pointer"}
    return sorted(apps)


def all_builds(view) -> list:
    """The builds of every app, newest first."""
    return _newest_first([b for app in app_names(view) for b in builds_of(view, app)])


def state_badge(state: str) -> str:
    """A build's state as a word in a coloured label."""
    return f'<span class="badge {STATE_CLASSES.get(state, "info")}">{esc(state)}</span>'


def duration(seconds) -> str:
    """``12.3 s`` under a minute and a half, then as ``age`` says it."""
    if seconds is None:
        return "—"
    return f"{seconds:.1f} s" if seconds < 90 else age(seconds)


def last_line(view, build: Build, rev=None) -> str:
    """The last line the build wrote (empty when there is none)."""
    try:
        data = view.master.read(build.log_path, rev)
    except KegError:
        return ""
    lines = data[-4096:].decode("utf-8", "replace").rstrip().splitlines()
    return lines[-1][:MAX_LAST_LINE] if lines else ""


def outcome(view, build: Build) -> str:
    """What a build came to, in a few words: its release, its error, or its latest output."""
    r = build.result
    if build.state == "ok":
        parts = []
        if _number(r.get("release")) is not None:
            parts.append(link(path_url(f"/apps/{build.app}/app.json"), f"release {r['release']}"))
        if isinstance(r.get("image"), str):
            parts.append("image " + kid_link(r["image"]))
        if r.get("cached"):
            parts.append("cache hit")
        return ", ".join(parts) or "—"
    if build.state == "failed":
        return f'<span class="error-text">{esc(str(r.get("error") or "failed"))}</span>'
    if build.state == "running" and build.has_log:
        return f'<code class="last-line">{esc(last_line(view, build))}</code>'
    return '<span class="muted">waiting for a builder</span>' if build.state == "queued" else "—"


def builds_table(view, builds: list, with_app: bool = True, caption: str = "Builds") -> str:
    """Builds as a table: app, source, state, builder, started, duration, outcome and the log."""
    rows = []
    for b in builds:
        log = link(path_url(b.log_path), "log") if b.has_log else '<span class="muted">—</span>'
        row = [kid_link(b.source), state_badge(b.state), esc(b.builder or "—"), timestamp(b.started, view.now),
               esc(duration(b.seconds)), outcome(view, b), log]
        if with_app:
            row.insert(0, link(query_url("/-/builds", app=b.app), b.app, "name"))
        rows.append(row)
    headers = (["App"] if with_app else []) + ["Source", "State", "Builder", "Started", "Duration", "Outcome", "Log"]
    return table(headers, rows, cls="builds", caption=caption, sortable=True)


def builds_page(view) -> Page:
    """``/-/builds``: recent builds of every app (``?app=`` one app's, ``?state=`` in one state)."""
    view.check_read(BUILDS)
    head = view.head()
    q = view.req.query
    app_filter, state_filter = q.get("app", ""), q.get("state", "")
    if app_filter:
        paths.check_app(app_filter)
    builds = builds_of(view, app_filter) if app_filter else all_builds(view)
    apps = sorted(set(app_names(view)) | ({app_filter} - {""}))
    if state_filter:
        builds = [b for b in builds if b.state == state_filter]
    filters = ('<form method="get" class="filters" action="/-/builds" role="search">'
               + filter_select("App", "app", apps, app_filter)
               + filter_select("State", "state", STATES, state_filter) +
               f'<button type="submit">Filter</button> {link("/-/builds", "Clear")}</form>')
    running = sum(1 for b in builds if b.state == "running")
    more = notice(f"Showing the newest {RECENT:,} of {len(builds):,}.", "warn") if len(builds) > RECENT else ""
    app_link = (f" · {link(path_url(f'/apps/{app_filter}/app.json'), f'releases of {app_filter}')}"
                if app_filter and view.exists(f"/apps/{app_filter}/app.json") else "")
    body = (f"<h1>Builds{' of ' + esc(app_filter) if app_filter else ''}</h1>"
            f"<p class=\"meta\">{len(builds):,} build{'s' if len(builds) != 1 else ''}, {running} running, from "
            f"<code>/builds/&lt;app&gt;/&lt;source KID&gt;/</code> and the sources pushed to <code>/src</code>; "
            f"a running build's log follows its output live.{app_link}</p>" + filters + more
            + (builds_table(view, builds[:RECENT]) if builds else '<p class="muted">No builds match.</p>'))
    return Page("Builds", body, watch=BUILDS + (f"/{app_filter}" if app_filter else ""), since=head.number)


def build_panel(view, app: str, source: str, rev, pinned: bool) -> str:
    """A build's state, timing and outcome, above its log, result or directory."""
    b = read_build(view, app, source, rev.number, now=rev.time if pinned else None)
    r = b.result
    facts = [("State", state_badge(b.state)), ("App", link(path_url(f"/apps/{app}/app.json"), app)),
             ("Source", kid_link(source)), ("Builder", esc(b.builder or "—")),
             ("Started", timestamp(b.started, view.now)),
             ("Duration" if b.state != "running" else "Running for", esc(duration(b.seconds)))]
    if b.state == "ok":
        facts.append(("Outcome", outcome(view, b)))
    if b.state == "failed":
        facts.append(("Error", outcome(view, b)))
    if isinstance(r.get("kind"), str):
        facts.append(("Kind", esc(r["kind"])))
    dl = "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in facts)
    keep = rev.number if pinned else None
    links = [link(path_url(b.log_path, rev=keep), "Log") if b.has_log else "",
             link(path_url(b.base + "/result.json", rev=keep), "Result") if r else "",
             link(path_url(b.base, rev=keep), "Files"), link(query_url("/-/builds", app=app), f"All builds of {app}")]
    return (f'<section class="panel" aria-labelledby="build-h"><h2 id="build-h">Build of {esc(app)} '
            f'{esc(source[:14])}</h2><dl class="facts">{dl}</dl>'
            f'<p class="links">{" · ".join(x for x in links if x)}</p></section>')


def build_of_path(path: str):
    """``(app, source KID)`` when ``path`` is a build's directory or one of its files, else None."""
    m = BUILD_DIR.match(path) or BUILD_FILE.match(path)
    return (m.group(1), m.group(2)) if m else None


def watch_prefix(path: str) -> str:
    """What a page of ``path`` watches: a build's files watch the whole build, so the result shows when it comes."""
    m = BUILD_FILE.match(path)
    return f"{BUILDS}/{m.group(1)}/{m.group(2)}" if m else path
