"""Dashboards: machines, processes cluster-wide, apps, jobs and services, read from their paths.

(The builds dashboard is ``master/ui/builds.py``'s.)

Each dashboard is a view over ordinary namespace paths (DESIGN §2) and
links to them; it stays live by watching the prefix it reads.  Fields it
does not know are ignored, missing ones shown as a dash.
"""

from __future__ import annotations

from keg.errors import KegError
from master.ui import builds, values
from master.ui.html import (Page, age, esc, filter_select, human_size, kid_link, link, notice, path_url, query_url,
                            table, timestamp)
from master.ui.pages import done_notice, release_by, release_time, state_badge

STALE_SECONDS = 30.0     # three missed Mayor heartbeats (one every 10 s)
MAX_ROWS = 2_000
STATES = ("pending", "pulling", "running", "exited", "failed", "backoff")


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _use(used, capacity, memory: bool = False) -> str:
    def show(v):
        if v is None:
            return "—"
        return human_size(int(v)) if memory and isinstance(v, (int, float)) else esc(f"{v:g}" if isinstance(v, float)
                                                                                   else v)
    text = f"{show(used)} / {show(capacity)}"
    u, c = _number(used), _number(capacity)
    if u is None or c is None or c <= 0:
        return text
    return f'<meter min="0" max="{c}" value="{min(u, c)}" title="{esc(text)}">{esc(text)}</meter> {text}'


def _machines(view) -> list:
    return [e for e in view.entries("/machines") if e.kind == "tree"]


def machines_page(view) -> Page:
    """Every machine: heartbeat age, capacity and use, processes."""
    view.check_read("/machines")
    head = view.head()
    rows = []
    for m in _machines(view)[:MAX_ROWS]:
        info = view.read_json(m.path + "/machine.json") or {}
        mayor = view.read_json(m.path + "/status/mayor.json") or {}
        capacity = info.get("capacity") if isinstance(info.get("capacity"), dict) else {}
        in_use = mayor.get("in_use") if isinstance(mayor.get("in_use"), dict) else {}
        beat = _number(mayor.get("heartbeat"))
        if beat is None:
            heartbeat = '<span class="badge bad">no heartbeat</span>'
        else:
            stale = view.now - beat > STALE_SECONDS
            heartbeat = (f'<span class="badge {"bad" if stale else "ok"}">{"stale" if stale else "ok"}</span> '
                         f"{esc(age(view.now - beat))} ago")
        desired = len([e for e in view.entries(m.path + "/procs") if e.name.endswith(".json")])
        labels = info.get("labels") if isinstance(info.get("labels"), dict) else {}
        rows.append([link(path_url(m.path), m.name, "name"), heartbeat,
                     _use(in_use.get("cpu"), capacity.get("cpus")),
                     _use(in_use.get("memory"), capacity.get("memory"), memory=True),
                     link(query_url("/-/processes", machine=m.name),
                          f"{in_use.get('processes', '—')} running / {desired} in the table"),
                     esc(", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "—"),
                     esc(mayor.get("version", "—"))])
    body = ("<h1>Machines</h1><p class=\"meta\">From <code>/machines/*/machine.json</code> and "
            "<code>status/mayor.json</code>; a heartbeat older than "
            f"{STALE_SECONDS:.0f} s is stale. {link(path_url('/machines'), 'Browse /machines')}</p>"
            + (table(["Machine", "Heartbeat", "CPU in use", "Memory in use", "Processes", "Labels", "Mayor"],
                     rows, cls="machines", caption="Machines", sortable=True) if rows else
               '<p class="muted">No machines have registered yet.</p>'))
    return Page("Machines", body, watch="/machines", since=head.number)


def _process_rows(view, machine_filter: str, state_filter: str, text: str) -> tuple:
    rows, total = [], 0
    for m in _machines(view):
        if machine_filter and m.name != machine_filter:
            continue
        status_dir, procs_dir = m.path + "/status", m.path + "/procs"
        names = {e.name[:-5] for e in view.entries(status_dir) if e.kind == "file" and e.name.endswith(".json")
                 and e.name != "mayor.json"}
        names |= {e.name[:-5] for e in view.entries(procs_dir) if e.name.endswith(".json")}
        for name in sorted(names):
            status = view.read_json(f"{status_dir}/{name}.json")
            status = status if isinstance(status, dict) else {}
            state = status.get("state") or "no status"
            image = status.get("image") if isinstance(status.get("image"), str) else ""
            if state_filter and state != state_filter:
                continue
            if text and text.lower() not in name.lower() and text.lower() not in image.lower():
                continue
            total += 1
            if len(rows) >= MAX_ROWS:
                continue
            started = _number(status.get("started"))
            running_for = esc(age(view.now - started)) if started is not None and state == "running" else "—"
            rows.append([link(path_url(f"{status_dir}/{name}.json"), name, "name"), link(path_url(m.path), m.name),
                         state_badge(state), esc(status.get("restarts", "—")),
                         esc(status.get("health") if status.get("health") is not None else "—"),
                         kid_link(image) if image.startswith("K-") else esc(image or "—"), running_for,
                         esc(status.get("pid") if status.get("pid") is not None else "—"),
                         link(path_url(f"{status_dir}/logs/{name}.log"), "log")])
    return rows, total


def processes_page(view) -> Page:
    """Every process of every machine, with filters by machine, state and text."""
    view.check_read("/machines")
    head = view.head()
    q = view.req.query
    machine_filter, state_filter, text = q.get("machine", ""), q.get("state", ""), q.get("q", "")
    rows, total = _process_rows(view, machine_filter, state_filter, text)
    machines = [m.name for m in _machines(view)]
    filters = ('<form method="get" class="filters" action="/-/processes" role="search">'
               + filter_select("Machine", "machine", machines, machine_filter)
               + filter_select("State", "state", STATES, state_filter) +
               f'<label>Name or image <input type="search" name="q" value="{esc(text)}"></label> '
               f'<button type="submit">Filter</button> {link("/-/processes", "Clear")}</form>')
    more = notice(f"Showing {MAX_ROWS:,} of {total:,}.", "warn") if total > len(rows) else ""
    body = (done_notice(view) + f"<h1>Processes</h1><p class=\"meta\">{total:,} process{'es' if total != 1 else ''} "
            "from <code>/machines/*/status/&lt;p&gt;.json</code> and the process tables.</p>" + filters + more
            + (table(["Process", "Machine", "State", "Restarts", "Health", "Image", "Running for", "PID", ""],
                     rows, cls="processes", caption="Processes", sortable=True) if rows else
               '<p class="muted">No process matches.</p>'))
    return Page("Processes", body, watch="/machines", since=head.number)


def apps_page(view) -> Page:
    """Every app: its current release and image, its releases and builds."""
    view.check_read("/apps")
    head = view.head()
    rows = []
    for app in [e for e in view.entries("/apps") if e.kind == "tree"][:MAX_ROWS]:
        obj = view.read_json(app.path + "/app.json")
        obj = obj if isinstance(obj, dict) else {}
        releases = [r for r in obj.get("releases") or [] if isinstance(r, dict)]
        current = obj.get("current")
        release = next((r for r in releases if r.get("number") == current), {})
        count, latest = builds.build_count(view, app.name), builds.latest_build(view, app.name)
        image = release.get("image")
        last = "—"
        if latest is not None:
            last = builds.state_badge(latest.state) + (" " + link(path_url(latest.log_path), "log")
                                                       if latest.has_log else "")
        rows.append([link(path_url(app.path + "/app.json"), app.name, "name"), esc(current if current is not None
                                                                                 else "—"),
                     kid_link(image) if isinstance(image, str) else "—", timestamp(release_time(release), view.now),
                     esc(release_by(release)), esc(len(releases)),
                     link(query_url("/-/builds", app=app.name), f"{count}") if count else "0", last])
    body = ("<h1>Apps</h1><p class=\"meta\">From <code>/apps/*/app.json</code> and <code>/builds/&lt;app&gt;/</code>; "
            f"open an app to roll back. {link('/-/builds', 'All builds')}</p>"
            + (table(["App", "Current release", "Image", "Released", "By", "Releases", "Builds", "Last build"], rows,
                     cls="apps",
                     caption="Apps", sortable=True) if rows else '<p class="muted">No apps yet.</p>'))
    return Page("Apps", body, watch="/apps", since=head.number)


def jobs_page(view) -> Page:
    """Every job with its replica count, and a scale form where the user may write."""
    view.check_read("/jobs")
    head = view.head()
    rows, writable = [], False
    for job in [e for e in view.entries("/jobs") if e.kind == "file" and e.name.endswith(".json")][:MAX_ROWS]:
        obj = view.read_json(job.path)
        obj = obj if isinstance(obj, dict) else {}
        resources = obj.get("resources") if isinstance(obj.get("resources"), dict) else {}
        scale = ""
        if view.can_write(job.path):
            writable = True
            scale = (f'<form method="post" action="{esc(path_url(job.path))}" class="inline action">'
                     f'{view.form_fields("scale", {"kid": job.kid})}'
                     f'<label class="visually-hidden" for="r-{esc(job.name)}">Replicas of {esc(job.name[:-5])}</label>'
                     f'<input id="r-{esc(job.name)}" type="number" name="replicas" min="0" max="100000" required '
                     f'class="narrow" value="{esc(obj.get("replicas") if isinstance(obj.get("replicas"), int) else 1)}">'
                     f' <button type="submit" class="button">Scale</button></form>')
        image = obj.get("image")
        rows.append([link(path_url(job.path), job.name[:-5], "name"), kid_link(image) if isinstance(image, str) else "—",
                     esc(obj.get("replicas", "—")),
                     esc(", ".join(f"{k}={v}" for k, v in sorted(resources.items())) or "—"), scale])
    headers = ["Job", "Image", "Replicas", "Resources"] + (["Scale"] if writable else [])
    rows = [row if writable else row[:-1] for row in rows]
    body = (done_notice(view) + "<h1>Jobs</h1><p class=\"meta\">From <code>/jobs/*.json</code>; the scheduler places their replicas.</p>"
            + (table(headers, rows, cls="jobs", caption="Jobs")
               if rows else '<p class="muted">No jobs yet.</p>'))
    return Page("Jobs", body, watch="/jobs", since=head.number)


def services_page(view) -> Page:
    """Every service table, each shown as a sortable table."""
    view.check_read("/services")
    head = view.head()
    parts = []
    for svc in [e for e in view.entries("/services") if e.kind == "file" and e.name.endswith(".tsv")][:200]:
        try:
            text = view.master.read(svc.path).decode("utf-8", "replace")
        except KegError as err:  # one unreadable table must not hide the others
            parts.append(f"<h2>{esc(svc.name)}</h2>" + notice(esc(err), "warn"))
            continue
        parts.append(f'<section><h2>{link(path_url(svc.path), svc.name[:-4])}</h2>{values.render_tsv(text)}</section>')
    body = ("<h1>Services</h1><p class=\"meta\">From <code>/services/*.tsv</code>.</p>"
            + ("".join(parts) if parts else '<p class="muted">No services yet.</p>'))
    return Page("Services", body, watch="/services", since=head.number)
