"""A small, safe Markdown renderer for ``*.md`` values (``/docs/`` is the online help).

It knows headings (``#``), paragraphs, block quotes (``>``), lists (``-``,
``*``, ``+``, ``1.``; nested by indentation), fenced code blocks, pipe
tables, horizontal rules, and inline code, links, ``**strong**`` and
``*emphasis*``.  Everything else is text: every character of the input
reaches the output escaped, raw HTML included, and a link is kept only when
its target is relative or ``http``/``https``/``mailto`` (``javascript:``
and ``data:`` links become plain text).  Images are shown as links, so a
page never loads anything from elsewhere.

A link to an absolute path (``/apps/web``) is a link to that namespace
path's page; relative links resolve against the page, as they do on disk.
"""

from __future__ import annotations

import re

from master.ui.html import esc

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+.-]*)\s*$")
_RULE = re.compile(r"^\s{0,3}([-*_])(\s*\1){2,}\s*$")
_ITEM = re.compile(r"^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$")
_TABLE_SEP = re.compile(r"^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$")
_LINK = re.compile(r"(!?)\[([^\]\n]*)\]\(\s*<?([^()\s<>]*)>?(?:\s+\"([^\"\n]*)\")?\s*\)")
_AUTOLINK = re.compile(r"<((?:https?|mailto):[^\s<>]+)>")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_SAFE_SCHEMES = {"http", "https", "mailto"}


def safe_href(target: str) -> str | None:
    """The href for a link target, or None when it must not become a link."""
    target = target.strip()
    if not target or any(ord(c) < 32 for c in target):
        return None
    scheme = _SCHEME.match(target)
    if scheme:
        return target if scheme.group(1).lower() in _SAFE_SCHEMES else None
    if target.startswith("//"):
        return None  # another host without a scheme: not a link into the keg
    if target.startswith("/") and not target.startswith(("/ui/", "/v1/", "/-/")):
        return "/ui" + target
    return target


def _emphasis(escaped: str) -> str:
    escaped = re.sub(r"\*\*(?=\S)(.+?)(?<=\S)\*\*", r"<strong>\1</strong>", escaped)
    escaped = re.sub(r"(?<![\w*])\*(?=\S)(.+?)(?<=\S)\*(?![\w*])", r"<em>\1</em>", escaped)
    return re.sub(r"(?<![\w_])_(?=\S)(.+?)(?<=\S)_(?![\w_])", r"<em>\1</em>", escaped)


def _text(raw: str) -> str:
    """Escaped text with emphasis and autolinks."""
    out, pos = [], 0
    for m in _AUTOLINK.finditer(raw):
        out.append(_emphasis(esc(raw[pos:m.start()])))
        out.append(f'<a href="{esc(m.group(1))}">{esc(m.group(1))}</a>')
        pos = m.end()
    out.append(_emphasis(esc(raw[pos:])))
    return "".join(out)


def _links(raw: str) -> str:
    out, pos = [], 0
    for m in _LINK.finditer(raw):
        out.append(_text(raw[pos:m.start()]))
        image, label, target, title = m.groups()
        href = safe_href(target)
        label_html = _text(label) or esc(target)
        if href is None:
            out.append(label_html)
        else:
            title_attr = f' title="{esc(title)}"' if title else ""
            cls = ' class="image-link"' if image else ""
            out.append(f'<a href="{esc(href)}"{title_attr}{cls}>{label_html}</a>')
        pos = m.end()
    out.append(_text(raw[pos:]))
    return "".join(out)


def inline(raw: str) -> str:
    """One line or paragraph of inline Markdown, as safe HTML."""
    out = []
    parts = re.split(r"(`+)", raw)
    i = 0
    while i < len(parts):
        part = parts[i]
        if part.startswith("`") and part:
            # find the closing run of the same length
            for j in range(i + 2, len(parts), 2):
                if parts[j] == part:
                    code = "".join(parts[i + 1:j]).strip()
                    out.append(f"<code>{esc(code)}</code>")
                    i = j + 1
                    break
            else:
                out.append(esc(part))
                i += 1
            continue
        out.append(_links(part))
        i += 1
    return "".join(out)


def _cells(line: str) -> list:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|") and not line.endswith("\\|"):
        line = line[:-1]
    return [c.strip() for c in re.split(r"(?<!\\)\|", line)]


def _table(lines: list) -> str:
    head = _cells(lines[0])
    rows = [_cells(line) for line in lines[2:]]
    th = "".join(f'<th scope="col">{inline(c)}</th>' for c in head)
    body = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in (row + [""] * len(head))[:len(head)])
                   + "</tr>" for row in rows)
    return f'<div class="table-wrap"><table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table></div>'


def _list(lines: list, start: int) -> tuple:
    """A list starting at ``lines[start]``; returns ``(html, next line index)``."""
    first = _ITEM.match(lines[start])
    indent = len(first.group(1))
    ordered = first.group(2)[0].isdigit()
    items: list = []
    i = start
    while i < len(lines):
        line = lines[i]
        m = _ITEM.match(line)
        if m and len(m.group(1)) == indent and m.group(2)[0].isdigit() == ordered:
            items.append([m.group(3)])
            i += 1
            continue
        if not line.strip():
            if i + 1 < len(lines) and (lines[i + 1].startswith(" " * (indent + 2))
                                       or (_ITEM.match(lines[i + 1])
                                           and len(_ITEM.match(lines[i + 1]).group(1)) == indent)):
                items[-1].append("")
                i += 1
                continue
            break
        if len(line) - len(line.lstrip()) > indent:
            items[-1].append(line)
            i += 1
            continue
        break
    rendered = []
    for item in items:
        head, rest = item[0], item[1:]
        nested = [r for r in rest]
        inner = inline(head)
        if any(r.strip() for r in nested):
            strip = min(len(r) - len(r.lstrip()) for r in nested if r.strip())
            inner += render_blocks([r[strip:] for r in nested])
        rendered.append(f"<li>{inner}</li>")
    tag = "ol" if ordered else "ul"
    return f"<{tag}>{''.join(rendered)}</{tag}>", i


def render_blocks(lines: list) -> str:
    """Block-level Markdown lines as HTML."""
    out = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        fence = _FENCE.match(line)
        if fence:
            marker, lang = fence.group(2), fence.group(3)
            body = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(marker):
                body.append(lines[i])
                i += 1
            i += 1
            cls = f' class="language-{esc(lang)}"' if lang else ""
            out.append(f"<pre><code{cls}>{esc(chr(10).join(body))}</code></pre>")
            continue
        heading = _HEADING.match(line)
        if heading:
            level = len(heading.group(1))
            out.append(f"<h{level}>{inline(heading.group(2))}</h{level}>")
            i += 1
            continue
        if _RULE.match(line):
            out.append("<hr>")
            i += 1
            continue
        if line.lstrip().startswith(">"):
            quoted = []
            while i < len(lines) and lines[i].lstrip().startswith(">"):
                quoted.append(re.sub(r"^\s*>\s?", "", lines[i]))
                i += 1
            out.append(f"<blockquote>{render_blocks(quoted)}</blockquote>")
            continue
        if _ITEM.match(line):
            html_list, i = _list(lines, i)
            out.append(html_list)
            continue
        if "|" in line and i + 1 < len(lines) and _TABLE_SEP.match(lines[i + 1]) and "-" in lines[i + 1]:
            rows = [line, lines[i + 1]]
            i += 2
            while i < len(lines) and "|" in lines[i] and lines[i].strip():
                rows.append(lines[i])
                i += 1
            out.append(_table(rows))
            continue
        para = [line.strip()]
        i += 1
        while i < len(lines) and lines[i].strip() and not (
                _HEADING.match(lines[i]) or _FENCE.match(lines[i]) or _ITEM.match(lines[i])
                or lines[i].lstrip().startswith(">") or _RULE.match(lines[i])):
            para.append(lines[i].strip())
            i += 1
        out.append(f"<p>{inline(chr(10).join(para))}</p>")
    return "".join(out)


def render(text: str) -> str:
    """A Markdown document as HTML (safe to insert into a page)."""
    return render_blocks(text.replace("\r\n", "\n").replace("\r", "\n").expandtabs(4).split("\n"))
