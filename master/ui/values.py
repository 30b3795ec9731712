"""How one value is shown: JSON readably with links, TSV as a sortable table, Markdown, text, bytes.

The format comes from the name (DESIGN §1.4: ``*.json`` objects, ``*.tsv``
tables, ``*.md`` documents; anything else is bytes, shown as text when it
is UTF-8).  Each renderer returns markup; every piece of the value is
escaped on its way in.
"""

from __future__ import annotations

import json
import re

from keg import paths
from keg.errors import BadPath
from master.ui import markdown
from master.ui.html import esc, kid_url, path_url, table

KID_RE = re.compile(r"^K-[0-9a-f]{8,64}$")
MAX_JSON_NODES = 20_000    # beyond this a JSON value is shown as indented text, without links
MAX_TSV_ROWS = 5_000       # rows of a table shown; the rest is in the download
MAX_TEXT = 1 << 20         # bytes of a value shown inline


def format_of(path: str) -> str:
    """``json``, ``tsv``, ``md``, ``log`` or ``text`` from the name."""
    name = path.rsplit("/", 1)[-1].lower()
    for ext in ("json", "tsv", "md", "log"):
        if name.endswith("." + ext):
            return ext
    return "text"


def decode_text(data: bytes) -> str | None:
    """The value as text, or None when it is not UTF-8 or holds NUL bytes (binary)."""
    if b"\x00" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


class Linker:
    """Decides which strings in a JSON value become links: KIDs, and paths that exist.

    Args:
        exists: ``exists(path) -> bool`` at the revision shown.
        rev: the revision shown, kept in links to paths (None for the newest).
    """

    def __init__(self, exists, rev=None):
        self.exists = exists
        self.rev = rev
        self.checked = 0

    def href(self, text: str) -> str | None:
        """The link for a string value, or None."""
        if KID_RE.match(text):
            return kid_url(text)
        if text.startswith("/") and len(text) < 1024 and " " not in text and self.checked < 2000:
            try:
                path = paths.normalize(text)
            except BadPath:
                return None
            self.checked += 1
            if self.exists(path):
                return path_url(path, rev=self.rev)
        return None


def _count_nodes(value, limit: int) -> int:
    count, stack = 0, [value]
    while stack and count <= limit:
        v = stack.pop()
        count += 1
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return count


def render_json(value, linker: Linker) -> str:
    """A parsed JSON value, indented like ``json.dumps(indent=2)``, KIDs and paths as links."""
    if _count_nodes(value, MAX_JSON_NODES) > MAX_JSON_NODES:
        return f'<pre class="json">{esc(json.dumps(value, indent=2, ensure_ascii=False))}</pre>'
    out: list = []

    def scalar(v):
        if isinstance(v, str):
            text = esc(json.dumps(v, ensure_ascii=False))
            href = linker.href(v)
            out.append(f'<a class="js" href="{esc(href)}">{text}</a>' if href else f'<span class="js">{text}</span>')
        elif v is None or isinstance(v, bool):
            out.append(f'<span class="jb">{json.dumps(v)}</span>')
        else:
            out.append(f'<span class="jn">{esc(json.dumps(v))}</span>')

    def walk(v, depth: int):
        pad = "  " * (depth + 1)
        if isinstance(v, dict) and v:
            out.append("{\n")
            for i, (k, x) in enumerate(v.items()):
                out.append(f'{pad}<span class="jk">{esc(json.dumps(k, ensure_ascii=False))}</span>: ')
                walk(x, depth + 1)
                out.append(",\n" if i + 1 < len(v) else "\n")
            out.append("  " * depth + "}")
        elif isinstance(v, list) and v:
            out.append("[\n")
            for i, x in enumerate(v):
                out.append(pad)
                walk(x, depth + 1)
                out.append(",\n" if i + 1 < len(v) else "\n")
            out.append("  " * depth + "]")
        elif isinstance(v, (dict, list)):
            out.append("{}" if isinstance(v, dict) else "[]")
        else:
            scalar(v)

    walk(value, 0)
    return f'<pre class="json">{"".join(out)}</pre>'


def parse_tsv(text: str) -> tuple:
    """``(header, rows)`` of a TSV table; a leading ``# `` on the header line is dropped."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return [], []
    header = lines[0].split("\t")
    if header and header[0].startswith("#"):
        header[0] = header[0].lstrip("#").strip()
    rows = [line.split("\t") for line in lines[1:] if not line.startswith("#")]
    return header, rows


def render_tsv(text: str) -> str:
    """A TSV table as a table people can sort by any column (with JavaScript)."""
    header, rows = parse_tsv(text)
    if not header:
        return '<p class="muted">An empty table.</p>'
    width = max([len(header)] + [len(r) for r in rows[:MAX_TSV_ROWS]])
    header = header + [""] * (width - len(header))
    cells = [[esc(c) for c in (r + [""] * (width - len(r)))] for r in rows[:MAX_TSV_ROWS]]
    more = ""
    if len(rows) > MAX_TSV_ROWS:
        more = f'<p class="muted">Showing the first {MAX_TSV_ROWS:,} of {len(rows):,} rows; download the table for all.</p>'
    return (f'<p class="muted">{len(rows):,} row{"s" if len(rows) != 1 else ""}. '
            f"Select a column heading to sort by it.</p>" + table(header, cells, cls="tsv", sortable=True) + more)


def render_text(text: str, cls: str = "text") -> str:
    """Plain text, preformatted."""
    return f'<pre class="{esc(cls)}">{esc(text)}</pre>'


def render_value(path: str, data: bytes, linker: Linker) -> tuple:
    """``(markup, note)`` for a value by its format; ``note`` says why it fell back to text, if it did."""
    text = decode_text(data[:MAX_TEXT])
    if text is None:
        return '<p class="muted">Binary value: download it to look inside.</p>', ""
    clipped = len(data) > MAX_TEXT
    note = f"Showing the first {MAX_TEXT:,} bytes." if clipped else ""
    fmt = format_of(path)
    if fmt == "json" and not clipped:
        try:
            return render_json(json.loads(text), linker), note
        except (ValueError, RecursionError) as err:
            return render_text(text), f"This is not valid JSON ({err}); shown as text."
    if fmt == "tsv":
        return render_tsv(text), note
    if fmt == "md":
        return f'<article class="markdown">{markdown.render(text)}</article>', note
    return render_text(text, "log" if fmt == "log" else "text"), note
