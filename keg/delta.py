"""git's delta format, for storing a new version of a tree as a change to the previous one.

A commit that changes one entry of a 5,000-entry directory produces a new
300 KB tree that differs from the old one in a few dozen bytes.  Stored whole
(and zlib-compressed at every checkpoint) such trees dominate the cost of a
write; as a delta they cost about what changed.  The delta here is the simple
one that fits how trees change: copy the common prefix, insert the middle,
copy the common suffix; or, when the caller knows which bytes it wrote over
(``splice_delta``, for a tree whose entries kept their lengths), copy around
them without comparing anything.
"""

from __future__ import annotations

BLOCK = 4096
MAX_COPY = 0xFFFFFF
MAX_INSERT = 0x7F


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _common_prefix(a: bytes, b: bytes, limit: int) -> int:
    lo = 0
    while lo + BLOCK <= limit and a[lo:lo + BLOCK] == b[lo:lo + BLOCK]:
        lo += BLOCK
    hi = min(lo + BLOCK, limit)
    while lo < hi:  # the largest p in [lo, hi] with a[:p] == b[:p]
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _common_suffix(a: bytes, b: bytes, limit: int) -> int:
    la, lb, lo = len(a), len(b), 0
    while lo + BLOCK <= limit and a[la - lo - BLOCK:la - lo] == b[lb - lo - BLOCK:lb - lo]:
        lo += BLOCK
    hi = min(lo + BLOCK, limit)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[la - mid:la - lo] == b[lb - mid:lb - lo]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _copy(offset: int, size: int) -> bytes:
    out = bytearray()
    while size > 0:
        chunk = min(size, MAX_COPY)
        op, args = 0x80, bytearray()
        for i in range(4):
            byte = (offset >> (8 * i)) & 0xFF
            if byte:
                op |= 1 << i
                args.append(byte)
        for i in range(3):
            byte = (chunk >> (8 * i)) & 0xFF
            if byte:
                op |= 1 << (4 + i)
                args.append(byte)
        out.append(op)
        out += args
        offset += chunk
        size -= chunk
    return bytes(out)


def make_delta(base: bytes, target: bytes) -> bytes:
    """A git delta that turns ``base`` into ``target``."""
    limit = min(len(base), len(target))
    prefix = _common_prefix(base, target, limit)
    suffix = _common_suffix(base, target, limit - prefix)
    parts = [_varint(len(base)), _varint(len(target))]
    if prefix:
        parts.append(_copy(0, prefix))
    middle = target[prefix:len(target) - suffix]
    for i in range(0, len(middle), MAX_INSERT):
        piece = middle[i:i + MAX_INSERT]
        parts.append(bytes([len(piece)]) + piece)
    if suffix:
        parts.append(_copy(len(base) - suffix, suffix))
    return b"".join(parts)


def splice_delta(base_size: int, edits: list) -> bytes:
    """The git delta for ``base_size`` bytes with ``edits`` written over them.

    Args:
        base_size: the length of the base (and of the target: edits keep lengths).
        edits: ``(offset, new bytes)`` in increasing, non-overlapping order.
    """
    parts, pos = [_varint(base_size), _varint(base_size)], 0
    for offset, data in edits:
        if offset > pos:
            parts.append(_copy(pos, offset - pos))
        for i in range(0, len(data), MAX_INSERT):
            piece = data[i:i + MAX_INSERT]
            parts.append(bytes([len(piece)]) + piece)
        pos = offset + len(data)
    if base_size > pos:
        parts.append(_copy(pos, base_size - pos))
    return b"".join(parts)


def _read_varint(data: bytes, pos: int):
    value, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def apply_delta(base: bytes, delta: bytes) -> bytes:
    """Rebuild the target of a git delta from its base.

    Raises:
        ValueError: the delta does not fit the base.
    """
    base_size, pos = _read_varint(delta, 0)
    target_size, pos = _read_varint(delta, pos)
    if base_size != len(base):
        raise ValueError(f"delta expects a base of {base_size} bytes, got {len(base)}")
    out = bytearray()
    while pos < len(delta):
        op = delta[pos]
        pos += 1
        if op & 0x80:
            offset = size = 0
            for i in range(4):
                if op & (1 << i):
                    offset |= delta[pos] << (8 * i)
                    pos += 1
            for i in range(3):
                if op & (1 << (4 + i)):
                    size |= delta[pos] << (8 * i)
                    pos += 1
            size = size or 0x10000
            out += base[offset:offset + size]
        elif op:
            out += delta[pos:pos + op]
            pos += op
        else:
            raise ValueError("delta has a reserved instruction 0")
    if len(out) != target_size:
        raise ValueError(f"delta gave {len(out)} bytes, expected {target_size}")
    return bytes(out)
