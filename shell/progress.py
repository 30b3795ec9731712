"""Progress display for long work: a bar on a terminal, nothing when output is a pipe or a file."""

from __future__ import annotations

import contextlib
import os
import sys

import click


@contextlib.contextmanager
def progress(label: str, total: int | None = None, unit_bytes: bool = True):
    """A context giving ``update(n)``: draws a bar on stderr when stderr is a terminal.

    Args:
        label: what is being done ("importing debian.tar").
        total: the amount expected, when known (bytes by default).
    """
    if not sys.stderr.isatty() or os.environ.get("KEG_NO_PROGRESS"):
        yield lambda n: None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr, show_eta=True, show_percent=total is not None,
                           item_show_func=None,
                           info_sep="  ") as bar:
        yield bar.update


def size_of(stream) -> int | None:
    """The byte size of a regular file behind ``stream``, else None."""
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return None
    import stat
    return st.st_size if stat.S_ISREG(st.st_mode) else None
