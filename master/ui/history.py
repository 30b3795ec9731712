"""History pages: the log of a path, and the difference between two revisions.

``/ui/<path>?view=history[&rev=R]`` lists the revisions that changed the
path, newest first, 50 at a time; each links to the path as it was then
(time travel) and to what that revision changed.
``/ui/<path>?view=diff&from=R1&to=R2`` lists the paths under ``<path>``
that differ between the two revisions, and shows a line diff (``difflib``)
of each text value among them.
"""

from __future__ import annotations

import difflib

from keg.errors import BadRequest, KegError
from master.ui.html import Page, breadcrumbs, esc, kid_link, link, notice, path_url, table, timestamp
from master.ui.values import decode_text

LOG_PAGE = 50
MAX_TEXT_DIFFS = 20          # text diffs shown on one page
MAX_DIFF_INPUT = 512 << 10   # bytes of each side of a text diff
MAX_DIFF_LINES = 3_000       # lines of one diff shown
MAX_CHANGED_ROWS = 2_000


def log_page(view, path: str) -> Page:
    """The revisions that changed ``path``, newest first."""
    rev, pinned = view.revision()
    entries = view.master.log(path, rev.number, LOG_PAGE + 1)
    more = len(entries) > LOG_PAGE
    rows = []
    for revision, kid in entries[:LOG_PAGE]:
        view_link = (link(path_url(path, rev=revision.number), "view") if kid else
                     '<span class="muted">deleted</span>')
        rows.append([link(path_url(path, rev=revision.kid), str(revision.number), title=revision.kid),
                     timestamp(revision.time, view.now), esc(revision.author), esc(revision.message.splitlines()[0]
                                                                                    if revision.message else ""),
                     kid_link(kid), view_link,
                     link(path_url(path, view="diff", **{"from": revision.number - 1, "to": revision.number}),
                          "changes")])
    older = ""
    if more:
        older = link(path_url(path, view="history", rev=entries[LOG_PAGE - 1][0].number - 1), "Older →", "button")
    compare = (f'<form method="get" class="inline" action="{esc(path_url(path))}">'
               '<input type="hidden" name="view" value="diff">'
               '<label>Compare revision <input type="number" name="from" min="0" class="narrow" required></label> '
               f'<label>with <input type="number" name="to" min="1" value="{rev.number}" class="narrow"></label> '
               '<button type="submit">Show changes</button></form>')
    body = (f"<h1>History of {esc(path)}</h1>"
            f'<p class="meta">Revisions up to {rev.number} that changed this path, newest first. '
            f'{link(path_url(path), "Back to the path")}</p>' + compare
            + (table(["Revision", "When", "Author", "Message", "KID after", "", ""], rows, cls="log",
                     caption=f"Revisions that changed {path}") if rows else
               '<p class="muted">No revision changed this path.</p>') + older)
    return Page(f"History of {path}", body, watch=None if pinned else path, since=rev.number,
                crumbs=breadcrumbs(path), pinned="History up to a past revision: not live" if pinned else "")


def _text_of(view, path: str, rev: int, kid) -> str | None:
    if kid is None:
        return ""
    try:
        entry = view.master.stat(path, rev)
        if entry.large or entry.kind != "file" or entry.size > MAX_DIFF_INPUT:
            return None
        return decode_text(view.master.read(path, rev))
    except KegError:
        return None


def text_diff(old: str, new: str, old_name: str, new_name: str) -> str:
    """A unified diff as markup, each line marked as added, removed or context."""
    lines = list(difflib.unified_diff(old.splitlines(), new.splitlines(), old_name, new_name, lineterm=""))
    out = []
    for line in lines[:MAX_DIFF_LINES]:
        cls = ("hunk" if line.startswith("@@") else "add" if line.startswith("+") and not line.startswith("+++")
               else "del" if line.startswith("-") and not line.startswith("---") else "ctx")
        out.append(f'<span class="{cls}">{esc(line)}</span>')
    if len(lines) > MAX_DIFF_LINES:
        out.append(f'<span class="muted">… {len(lines) - MAX_DIFF_LINES:,} more lines</span>')
    return '<pre class="diff">' + "\n".join(out) + "</pre>" if out else '<p class="muted">Same text.</p>'


def diff_page(view, path: str) -> Page:
    """What changed under ``path`` between ``?from=`` and ``?to=`` (default: the newest revision)."""
    to_rev = view.master.revision(view.req.query.get("to") or None)
    from_text = view.req.query.get("from")
    if from_text in (None, ""):
        from_number = max(to_rev.number - 1, 0)
    else:
        from_number = 0 if from_text == "0" else view.master.revision(from_text).number
    if from_number > to_rev.number:
        raise BadRequest(f"from={from_number} is after to={to_rev.number}; give the older revision first")
    changes = view.master.diff(from_number, to_rev.number, path)
    rows, diffs = [], []
    for changed, old, new in changes[:MAX_CHANGED_ROWS]:
        action = "created" if old is None else "deleted" if new is None else "changed"
        target = path_url(changed, rev=to_rev.number) if new else path_url(changed, rev=from_number)
        rows.append([esc(action), link(target, changed), kid_link(old), kid_link(new)])
        if len(diffs) < MAX_TEXT_DIFFS:
            old_text = _text_of(view, changed, from_number, old)
            new_text = _text_of(view, changed, to_rev.number, new)
            if old_text is not None and new_text is not None:
                diffs.append(f"<h3>{esc(changed)}</h3>"
                             + text_diff(old_text, new_text, f"{changed} @ r{from_number}", f"{changed} @ r{to_rev.number}"))
    more = ""
    if len(changes) > MAX_CHANGED_ROWS:
        more = notice(f"Showing {MAX_CHANGED_ROWS:,} of {len(changes):,} changed paths.", "warn")
    summary_line = (f"{len(changes):,} path{'s' if len(changes) != 1 else ''} under {esc(path)} differ between "
                    f"revision {from_number} and revision {to_rev.number} ({timestamp(to_rev.time)}, "
                    f"{esc(to_rev.author)}: {esc(to_rev.message.splitlines()[0] if to_rev.message else '')}).")
    body = (f"<h1>Changes under {esc(path)}</h1><p>{summary_line}</p>"
            f'<p class="meta">{link(path_url(path, view="history"), "History")} · '
            f'{link(path_url(path, rev=to_rev.kid), f"{path} at revision {to_rev.number}")} · '
            f'permalink {link(path_url(path, view="diff", **{"from": from_number, "to": to_rev.kid}), to_rev.kid[:14])}'
            f"</p>" + more
            + (table(["Change", "Path", "Old KID", "New KID"], rows, cls="changes",
                     caption="Changed paths") if rows else '<p class="muted">Nothing changed.</p>')
            + ("<h2>Text differences</h2>" + "".join(diffs) if diffs else ""))
    return Page(f"Changes under {path}", body, crumbs=breadcrumbs(path), pinned="Comparing two revisions: not live")
