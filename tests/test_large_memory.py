"""A large value goes in and out through the keg command in bounded memory; a damaged chunk stops ``keg cat``.

The peak RSS is measured the way the benchmark does it (``bench/large.py``): a
small Python wrapper runs the command and reports its own
``RUSAGE_CHILDREN.ru_maxrss``.  Started straight from pytest, the child would
report at least pytest's own peak, since Linux carries the peak RSS across
``fork`` and ``exec``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import blake3
import pytest

import keg
from conftest import keg_command
from keg.transaction import Transaction, put

MiB = 1 << 20
SIZE = 256 * MiB
BLOCK = 4 * MiB
RSS_LIMIT = 100 * MiB

MEASURE = """\
import resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    f.write(f"{rc} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}")
sys.exit(rc)
"""


def blocks(size: int, seed: bytes = b"keg large memory test"):
    """``size`` reproducible bytes in ``BLOCK`` pieces, never whole: pseudo-random blocks
    (stored raw) alternating with text blocks (stored compressed)."""
    xof = blake3.blake3(seed)
    pos = 0
    while pos < size:
        n = min(BLOCK, size - pos)
        if (pos // BLOCK) % 2:
            line = b"block %08d: a line of text that zstd will squeeze well enough\n" % (pos // BLOCK)
            yield (line * (n // len(line) + 1))[:n]
        else:
            yield xof.digest(length=n, seek=pos)
        pos += n


def measured(tmp_path, name: str, args: list, **popen) -> subprocess.Popen:
    """Start ``keg ARGS`` under the wrapper that reports its peak RSS to ``tmp_path/name``."""
    return subprocess.Popen([sys.executable, "-c", MEASURE, str(tmp_path / name), *keg_command(), *args], **popen)


def peak_rss(tmp_path, name: str) -> int:
    rc, kib = (tmp_path / name).read_text().split()
    assert rc == "0"
    return int(kib) * 1024


def test_put_and_cat_of_256_mib_stay_under_100_mib_of_memory(tmp_path, keg_dir):
    subprocess.run([*keg_command(), "init", "--keg", keg_dir], check=True, capture_output=True)

    sent = hashlib.sha256()
    proc = measured(tmp_path, "put", ["put", "--keg", keg_dir, "/images/big.img"], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for block in blocks(SIZE):
        sent.update(block)
        proc.stdin.write(block)
    out, err = proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert out.startswith(b"/images/big.img\tK-")
    put_rss = peak_rss(tmp_path, "put")

    got, n = hashlib.sha256(), 0
    proc = measured(tmp_path, "cat", ["cat", "--keg", keg_dir, "/images/big.img"], stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE)
    while piece := proc.stdout.read(MiB):
        got.update(piece)
        n += len(piece)
    err = proc.stderr.read()
    assert proc.wait() == 0, err.decode()
    cat_rss = peak_rss(tmp_path, "cat")

    assert n == SIZE and got.hexdigest() == sent.hexdigest()
    assert put_rss < RSS_LIMIT, f"keg put peaked at {put_rss / MiB:.1f} MiB"
    assert cat_rss < RSS_LIMIT, f"keg cat peaked at {cat_rss / MiB:.1f} MiB"
    with keg.Store(keg_dir) as store:  # it really is chunks, not one blob
        assert store.stat("/images/big.img").large
        assert len(store.pointer("/images/big.img").chunks) > 64


@pytest.mark.parametrize("kind", ["compressed", "raw"])
def test_a_damaged_chunk_stops_keg_cat_before_any_wrong_byte(keg_dir, kind):
    text = b"".join(b"line %07d of a value that compresses\n" % i for i in range(4 * MiB // 38))
    data = text + b"".join(blocks(4 * MiB)) + text[::-1] + b"".join(blocks(4 * MiB, b"second"))
    with keg.init(keg_dir) as store:
        assert store.apply(Transaction((put("/v/image.bin", data),))).ok
        store.checkpoint()
        pointer = store.pointer("/v/image.bin")
        root = store.chunks.root
    offsets, at = [], 0
    for _, length in pointer.chunks:
        offsets.append(at)
        at += length
    victim = None
    for i, (name, _) in enumerate(pointer.chunks[1:-1], start=1):
        zst = os.path.join(root, name[:2], name + ".zst")
        if os.path.exists(zst) == (kind == "compressed") and [n for n, _ in pointer.chunks].index(name) == i:
            victim, offset = name, offsets[i]
            path = zst if kind == "compressed" else os.path.join(root, name[:2], name)
            break
    assert victim is not None, f"no {kind} chunk past the first in {len(pointer.chunks)} chunks"

    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))

    done = subprocess.run([*keg_command(), "cat", "--keg", keg_dir, "/v/image.bin"], capture_output=True, check=False)
    stderr = done.stderr.decode()
    assert done.returncode == 4, stderr
    assert "/v/image.bin" in stderr and victim in stderr
    assert len(done.stdout) <= offset, "bytes of (or past) the damaged chunk were printed"
    assert done.stdout == data[:len(done.stdout)], "printed bytes differ from what was written"
