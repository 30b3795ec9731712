"""The Mayor's local state file: each save appends the whole state as one JSON line.

Loading takes the last line that is a whole JSON object, so a save cut
short by a crash leaves the one before it in force.  Appending is one
``write`` to a file that exists; replacing the file (a temporary file and a
rename) cost a third of a step's CPU with many Mayors on one machine.  The
file is rewritten, atomically, to its newest line when it grows past
``MAX_BYTES`` and when it does not end in a newline (a torn last line, or
the one-object file of earlier versions), so an append never lands on a
line that is not whole.

Like the rename it replaces, an append is not fsynced: what a Mayor keeps
here (its table, counters) is worth keeping across a restart of the Mayor,
and after a power loss it is read again from the master or rebuilt.
"""

from __future__ import annotations

import json
import os

from keg.fsio import write_file_atomic

MAX_BYTES = 1 << 20


class StateFile:
    """The state at ``path``: ``load()`` once, then ``save(obj)`` on each change."""

    def __init__(self, path: str):
        self.path = path
        self._size = None  # bytes in the file when it ends with a whole line; None: rewrite on the next save

    def load(self) -> dict:
        """The newest whole state saved, or ``{}``."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            self._size = None
            return {}
        state = {}
        for line in reversed(data.split(b"\n")):
            try:
                obj = json.loads(line)
            except ValueError:
                continue  # empty, or torn by a crash
            if isinstance(obj, dict):
                state = obj
                break
        self._size = len(data) if data.endswith(b"\n") and len(data) <= MAX_BYTES else None
        return state

    def save(self, data: bytes) -> None:
        """Keep ``data`` (one JSON object, no newline in it) as the newest state."""
        line = data + b"\n"
        if self._size is None or self._size + len(line) > MAX_BYTES:
            write_file_atomic(self.path, line, durable=False)
            self._size = len(line)
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            written = os.write(fd, line)
        finally:
            os.close(fd)
        if written != len(line):
            self._size = None  # a short write (a full disk): the next save rewrites the file whole
            raise OSError(f"{self.path}: wrote {written} of {len(line)} bytes")
        self._size += written
