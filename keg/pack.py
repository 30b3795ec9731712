"""Writing git pack files (version 2) and their indexes, durably.

A checkpoint turns the objects that transactions made in memory into one pack
plus its ``.idx`` in ``objects/pack/``, exactly as ``git index-pack`` would
name them, so libgit2 and stock git read them without further steps.  Blobs
and commits are stored whole, a tree as a delta (``OFS_DELTA``) against its
previous version when that is earlier in the same pack, all with fast zlib
compression; ``git repack`` in housekeeping later recompresses with its own
delta search.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib

from keg.fsio import fsync_dir, write_file_atomic

IDX_MAGIC = b"\xfftOc"
OBJ_OFS_DELTA = 6
COMPRESSION_LEVEL = 1


def _object_header(obj_type: int, size: int) -> bytes:
    byte = (obj_type << 4) | (size & 0x0F)
    size >>= 4
    out = bytearray()
    while size:
        out.append(byte | 0x80)
        byte = size & 0x7F
        size >>= 7
    out.append(byte)
    return bytes(out)


def write_pack(pack_dir: str, objects, durable: bool = True):
    """Write ``objects`` as one pack with its index in ``pack_dir``.

    Args:
        pack_dir: the repository's ``objects/pack`` directory.
        objects: iterable of ``(oid, obj_type, data)``, or of
            ``(oid, obj_type, None, base_oid, delta)`` for an object stored as a
            delta (``keg.delta``) against an object earlier in the same iterable.
        durable: fsync the pack, the index and the directory before returning.

    Returns:
        The pack's base name (``pack-<sha>``), or ``None`` when there was
        nothing to write.
    """
    objects = list(objects)
    if not objects:
        return None
    body = bytearray(b"PACK" + struct.pack(">II", 2, len(objects)))
    index = []  # (oid, crc32, offset)
    offsets = {}
    for obj in objects:
        oid, obj_type, data = obj[0], obj[1], obj[2]
        offset = len(body)
        if data is None:  # a delta against an object earlier in this pack
            base, delta = obj[3], obj[4]
            if base not in offsets:
                raise ValueError(f"delta base {base.hex()} of {oid.hex()} is not earlier in the pack")
            record = (_object_header(OBJ_OFS_DELTA, len(delta)) + _negative_offset(offset - offsets[base])
                      + zlib.compress(delta, COMPRESSION_LEVEL))
        else:
            record = _object_header(obj_type, len(data)) + zlib.compress(data, COMPRESSION_LEVEL)
        body += record
        offsets[oid] = offset
        index.append((oid, zlib.crc32(record) & 0xFFFFFFFF, offset))
    pack_sha = hashlib.sha1(body).digest()
    body += pack_sha
    name = "pack-" + pack_sha.hex()
    # The pack goes first: git and libgit2 only use a pack once its .idx exists.
    # Temporary names are git's own (tmp_pack_*, tmp_idx_*): git ignores them and gc removes strays.
    write_file_atomic(os.path.join(pack_dir, name + ".pack"), bytes(body), durable=durable, sync_dir=False,
                      tmp=os.path.join(pack_dir, "tmp_pack_" + pack_sha.hex()))
    write_file_atomic(os.path.join(pack_dir, name + ".idx"), _encode_index(index, pack_sha),
                      durable=durable, sync_dir=False, tmp=os.path.join(pack_dir, "tmp_idx_" + pack_sha.hex()))
    if durable:
        fsync_dir(pack_dir)
    return name


def _negative_offset(distance: int) -> bytes:
    # git's offset encoding for OFS_DELTA: big-endian base-128, each continuation minus one.
    out = [distance & 0x7F]
    distance >>= 7
    while distance:
        distance -= 1
        out.append(0x80 | (distance & 0x7F))
        distance >>= 7
    return bytes(reversed(out))


def _encode_index(index, pack_sha: bytes) -> bytes:
    index.sort(key=lambda item: item[0])
    fanout = [0] * 256
    for oid, _, _ in index:
        fanout[oid[0]] += 1
    total, cumulative = 0, []
    for count in fanout:
        total += count
        cumulative.append(total)
    small, large = [], []
    for _, _, offset in index:
        if offset < 0x80000000:
            small.append(offset)
        else:
            small.append(0x80000000 | len(large))
            large.append(offset)
    parts = [IDX_MAGIC, struct.pack(">I", 2), struct.pack(">256I", *cumulative)]
    parts += [oid for oid, _, _ in index]
    parts.append(struct.pack(">%dI" % len(index), *[crc for _, crc, _ in index]))
    parts.append(struct.pack(">%dI" % len(small), *small))
    if large:
        parts.append(struct.pack(">%dQ" % len(large), *large))
    parts.append(pack_sha)
    data = b"".join(parts)
    return data + hashlib.sha1(data).digest()
