"""Large values: import throughput, dedup, copies, read memory and chunk size, against casync, restic and ostree.

Usage::

    .venv/bin/python bench/large.py [--size 1G] [--quick] [--mode all|import|copies|memory|chunk-size]
                                    [--rounds N] [--data image|random] [--keg-avg 256K,1M] [--no-remote]

Modes (figures and goals in docs/benchmarks.md, "Large values"):

``import``      the same image imported by Keg and by casync, restic and ostree in
                one run: throughput (durable: every tool's files are fsynced before
                the clock stops), disk use, and the bytes a second version with 20
                scattered 4 KiB edits and one 4 KiB insertion adds.  Keg in process
                (``Store.put_stream``; also with other FastCDC averages, ``--keg-avg``),
                and as side rows ``keg put`` to a local keg and ``keg put --url`` to a
                ``keg master serve``.  The throughput goal is the median over rounds of
                Keg / the fastest anchor of the same round.
``chunk-size``  FastCDC average chunk 64 KiB, 256 KiB, 1 MiB and 2 MiB (min avg/4, max
                avg*4): ingest throughput, chunk files, disk use, the bytes the second
                version adds, and read throughput.
``copies``      one import, 3 more imports of the same bytes through the chunker,
                then the pointer put under more paths until there are 1,000 copies
                (100 with ``--quick``): disk use of the whole keg after 1 and after all.
``memory``      peak RSS of a child ``keg put`` and ``keg cat PATH > /dev/null`` of the
                value, of a child Python reading it through ``Store.open``, and of
                ``keg put --url`` / ``keg cat --url`` through a master.

The image is a tar (``--sort=name``) of /usr/bin, /usr/share and /usr/lib, cut at
``--size``; it and its edited second version are cached in ``--data-dir``
(default /tmp/keg-large-bench) so reruns start at once.  ``--data random`` uses
seeded pseudo-random bytes instead (nothing compresses).  Results go to
``bench/out/large-<mode>.json``.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import blake3

import keg
import keg.large as large
from keg import Transaction
from keg.chunks import ChunkStore
from keg.transaction import put_large

from keg_master import KegMasterServer, cpu_seconds, keg_command
from measure import Report, environment, median

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 1 << 20
GiB = 1 << 30
SOURCES = ["/usr/bin", "/usr/share", "/usr/lib", "/usr/libexec", "/usr/sbin", "/usr/include"]
EDITS = 20           # scattered overwrites in the second version
EDIT_BYTES = 4096
INSERT_BYTES = 4096  # one insertion near the middle
SEED = 20261121
REIMPORTS = 3        # copies made through the chunker (the rest reuse the pointer)
COPY_BATCH = 100     # pointer puts per transaction
CHUNK_SIZES = [64 << 10, 256 << 10, 1 << 20, 2 << 20]
RSS_LIMIT = 100 * MiB
SETTLE_SECONDS = 0.3
RESTIC_PASSWORD = "keg-bench"


# ------------------------------------------------------------------ helpers

def parse_size(text: str) -> int:
    """``1G``, ``128M``, ``256MiB``, ``4096`` → bytes (powers of 1024)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    return int(float(t.rstrip("KMGT")) * mult)


def human(n: float) -> str:
    """Bytes as B, KiB, MiB or GiB."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


def disk_use(root: str) -> int:
    """Bytes the tree under ``root`` occupies, like ``du``: st_blocks × 512, a hard-linked file once."""
    seen, total = set(), 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    try:
        total += os.lstat(root).st_blocks * 512
    except FileNotFoundError:
        pass
    return total


def count_files(root: str) -> int:
    """Regular files under ``root``."""
    return sum(len(files) for _, _, files in os.walk(root))


def fsync_tree(root: str) -> None:
    """fsync every file and directory under ``root``: what is on disk when this returns stays there.

    Applied to every system after its import, inside the timed region, so a tool
    that does not fsync (casync) pays for durability like Keg does.
    """
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except (FileNotFoundError, PermissionError):
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def settle() -> None:
    """Let the previous phase's writeback finish so it does not land in the next timed region."""
    os.sync()
    time.sleep(SETTLE_SECONDS)
    os.sync()


def warm(path: str) -> None:
    """Read a file once so every system reads it from the page cache."""
    with open(path, "rb") as f:
        while f.read(8 * MiB):
            pass


def cpu_self() -> float:
    """User + system CPU seconds of this process (all threads) so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


_MEASURE = """\
import os, resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as f:
    f.write(f"{rc} {ru.ru_maxrss} {ru.ru_utime + ru.ru_stime}")
sys.exit(rc)
"""


class Child:
    """The outcome of one measured child process: exit code, wall time, CPU, peak RSS, stderr.

    The command runs under a small Python wrapper that reports its own
    ``RUSAGE_CHILDREN``: Linux carries a process's peak RSS across ``fork`` and
    ``exec``, so a command started straight from this (large) process would
    report at least this process's peak.  Through the wrapper the floor is the
    wrapper's own peak, about 11 MiB, an overestimate, never an underestimate.
    """

    def __init__(self, cmd, stdin=None, stdout=None, env=None, cwd=None, rss=True):
        self.cmd = cmd
        if not rss:
            self._direct(cmd, stdin, stdout, env, cwd)
            return
        with tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile("r") as report:
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", _MEASURE, report.name, *cmd],
                                  stdin=stdin or subprocess.DEVNULL, stdout=stdout or subprocess.DEVNULL,
                                  stderr=err, env=env, cwd=cwd, check=False)
            self.seconds = time.perf_counter() - start
            err.seek(0)
            self.stderr = err.read().decode("utf-8", "replace")
            fields = report.read().split()
        if len(fields) != 3:
            raise RuntimeError(f"measuring {' '.join(map(str, cmd))} failed ({done.returncode}): {self.stderr[-2000:]}")
        self.rc = int(fields[0])
        self.maxrss = int(fields[1]) * 1024  # Linux reports KiB
        self.cpu = float(fields[2])

    def _direct(self, cmd, stdin, stdout, env, cwd) -> None:
        """Run ``cmd`` as a child of this process: exact wall and CPU time, no peak RSS."""
        with tempfile.TemporaryFile() as err:
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, stdin=stdin or subprocess.DEVNULL, stdout=stdout or subprocess.DEVNULL,
                                    stderr=err, env=env, cwd=cwd)
            try:
                _, status, ru = os.wait4(proc.pid, 0)  # the rusage of this child alone
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            proc.returncode = self.rc = os.waitstatus_to_exitcode(status)
            self.seconds = time.perf_counter() - start
            err.seek(0)
            self.stderr = err.read().decode("utf-8", "replace")
        self.cpu = ru.ru_utime + ru.ru_stime
        self.maxrss = None

    def check(self) -> "Child":
        """Raise when the child failed."""
        if self.rc != 0:
            raise RuntimeError(f"{' '.join(map(str, self.cmd))} exited {self.rc}: {self.stderr[-2000:]}")
        return self


def tool_env(**extra) -> dict:
    """This environment, with Keg's progress bar off and ``extra`` set."""
    env = dict(os.environ)
    env["KEG_NO_PROGRESS"] = "1"
    env.update(extra)
    return env


# --------------------------------------------------------------------- data

def make_image(path: str, size: int) -> None:
    """A tar of real files (``--sort=name``) cut at ``size`` bytes, written under a temporary name and renamed."""
    sources = [s for s in SOURCES if os.path.isdir(s)]
    tmp = path + ".part"
    written = 0
    with open(tmp, "wb") as out:
        proc = subprocess.Popen(["tar", "-cf", "-", "--sort=name", *sources], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
        try:
            while written < size:
                buf = proc.stdout.read(min(8 * MiB, size - written))
                if not buf:
                    break
                out.write(buf)
                written += len(buf)
        finally:
            proc.stdout.close()
            proc.kill()
            proc.wait()
        os.fsync(out.fileno())
    if written < size:
        os.unlink(tmp)
        # Repeating the tar would make the image dedup against itself and flatter every tool.
        raise SystemExit(f"the files under {' '.join(sources)} give only {human(written)} of tar, "
                         f"less than --size {human(size)}")
    os.replace(tmp, path)


def random_stream(seed: bytes, size: int, block: int = 8 * MiB):
    """``size`` pseudo-random bytes from blake3's XOF keyed by ``seed``, in blocks (never whole)."""
    xof = blake3.blake3(seed)
    pos = 0
    while pos < size:
        n = min(block, size - pos)
        yield xof.digest(length=n, seek=pos)
        pos += n


def make_random(path: str, size: int) -> None:
    tmp = path + ".part"
    with open(tmp, "wb") as out:
        for block in random_stream(b"keg-large-bench", size):
            out.write(block)
        os.fsync(out.fileno())
    os.replace(tmp, path)


def make_edited(base: str, path: str) -> dict:
    """The second version: ``base`` with one insertion near the middle and ``EDITS`` scattered 4 KiB overwrites."""
    rng = random.Random(SEED)
    size = os.path.getsize(base)
    insert_at = size // 2 + rng.randrange(1 << 16)
    tmp = path + ".part"
    with open(base, "rb") as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(_Limited(src, insert_at), dst, 8 * MiB)
        dst.write(rng.randbytes(INSERT_BYTES))
        shutil.copyfileobj(src, dst, 8 * MiB)
    new_size = size + INSERT_BYTES
    offsets = sorted(rng.randrange(0, new_size - EDIT_BYTES) for _ in range(EDITS))
    fd = os.open(tmp, os.O_WRONLY)
    try:
        for off in offsets:
            os.pwrite(fd, rng.randbytes(EDIT_BYTES), off)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return {"insert_at": insert_at, "edits": offsets}


class _Limited:
    """The first ``n`` bytes of a file object."""

    def __init__(self, f, n):
        self.f, self.left = f, n

    def read(self, n=-1):
        n = self.left if n < 0 else min(n, self.left)
        data = self.f.read(n)
        self.left -= len(data)
        return data


def data_files(args) -> tuple:
    """``(v1, v2)``: the cached image (or random data) of ``args.size`` bytes and its edited version."""
    os.makedirs(args.data_dir, exist_ok=True)
    tag = f"{args.data}-{args.size}"
    v1 = os.path.join(args.data_dir, f"{tag}.{'tar' if args.data == 'image' else 'bin'}")
    v2 = os.path.join(args.data_dir, f"{tag}-v2.{'tar' if args.data == 'image' else 'bin'}")
    if not os.path.exists(v1):
        start = time.perf_counter()
        (make_image if args.data == "image" else make_random)(v1, args.size)
        print(f"  made {v1} ({human(args.size)}) in {time.perf_counter() - start:.1f} s", flush=True)
    if not os.path.exists(v2):
        make_edited(v1, v2)
        print(f"  made {v2}: {EDITS} scattered {EDIT_BYTES // 1024} KiB edits and a "
              f"{INSERT_BYTES // 1024} KiB insertion near the middle", flush=True)
    return v1, v2


# ------------------------------------------------------------------ systems
#
# Each system imports v1 then v2 into a repository of its own under ``work``;
# ``repo`` is the directory whose disk use is measured, ``pids`` the server
# processes whose CPU counts as the system's own.

class KegInProcess:
    """``Store.put_stream`` on a durable local keg, then ``apply`` and a checkpoint.

    ``avg`` other than the default runs the same code with FastCDC's average
    (min avg/4, max avg*4) changed for the import (a side row); ``worker``
    False keeps all the work in this process (no ``keg.chunkworker``, a side row).
    """

    pids = ()

    def __init__(self, work, avg=None, worker=True):
        self.avg, self.worker = avg, worker
        suffix = f", avg chunk {human(avg)} (not the default)" if avg and avg != large.AVG_CHUNK else ""
        suffix += "" if worker else ", no chunk worker process (not the default)"
        self.name = "Keg put_stream" + (f" avg {human(avg)}" if avg and avg != large.AVG_CHUNK else "") + \
            ("" if worker else " one process")
        self.form = "in process: Store.put_stream + apply + checkpoint, durable keg" + suffix
        self.repo = os.path.join(work, "keg")
        self.store = keg.init(self.repo)

    def put(self, data_path):
        saved = large.WORKER_AT
        large.WORKER_AT = saved if self.worker else 1 << 62
        try:
            with chunk_size(self.avg), open(data_path, "rb") as f:
                op = self.store.put_stream("/image", f)
        finally:
            large.WORKER_AT = saved
        result = self.store.apply(Transaction((op,)))
        assert result.ok, result.error
        self.store.checkpoint()

    def close(self):
        self.store.close()


class KegCli:
    name = "Keg `keg put`"
    form = "keg put --keg DIR /image FILE (a child process, Python start-up included)"
    pids = ()

    def __init__(self, work):
        self.repo = os.path.join(work, "keg")
        Child([*keg_command(), "init", "--keg", self.repo], env=tool_env(), rss=False).check()

    def put(self, data_path):
        return Child([*keg_command(), "put", "--keg", self.repo, "/image", data_path], env=tool_env(),
                     rss=False).check()

    def close(self):
        pass


class KegRemote:
    name = "Keg `keg put --url`"
    form = ("keg put --url to keg master serve on 127.0.0.1 (same 2 CPUs); the client cuts and hashes, "
            "sends only missing chunks; the master stores each chunk durably")

    def __init__(self, work):
        self.server = KegMasterServer(base_dir=work)
        self.server.__enter__()
        self.repo = self.server.keg_path
        self.pids = (self.server.proc.pid,)

    def put(self, data_path):
        url = f"http://127.0.0.1:{self.server.port}"
        return Child([*keg_command(), "put", "--url", url, "--token", self.server.token, "/image", data_path],
                     env=tool_env(), rss=False).check()

    def close(self):
        self.server._kill()  # stop the master; its keg stays in the workspace until the run ends


class Casync:
    name = "casync"
    form = ("casync make --compression=zstd --store=S vN.caibx FILE: a blob index of the file, "
            "default chunks (min 16, avg 64, max 256 KiB), SHA512-256; casync does not fsync; "
            "disk use counts the store and the .caibx index files")
    binary = "casync"
    pids = ()

    def __init__(self, work):
        self.repo = os.path.join(work, "casync")  # the chunk store and the index files (Keg's pointers)
        os.makedirs(self.repo)
        self.n = 0

    def put(self, data_path):
        self.n += 1
        return Child(["casync", "make", "--compression=zstd", f"--store={os.path.join(self.repo, 'store.castr')}",
                      os.path.join(self.repo, f"v{self.n}.caibx"), data_path], rss=False).check()

    def close(self):
        pass


class Restic:
    name = "restic"
    form = ("restic init --repository-version 2 (zstd, compression auto; chunks min 512 KiB, avg 1 MiB, "
            "max 8 MiB, SHA-256, AES); restic backup FILE to a local repository")
    binary = "restic"
    pids = ()

    def __init__(self, work):
        self.repo = os.path.join(work, "repo")
        self.env = tool_env(RESTIC_PASSWORD=RESTIC_PASSWORD, RESTIC_CACHE_DIR=os.path.join(work, "cache"))
        Child(["restic", "init", "-q", "--repository-version", "2", "-r", self.repo], env=self.env, rss=False).check()

    def put(self, data_path):
        return Child(["restic", "backup", "-q", "--host", "bench", "-r", self.repo, data_path], env=self.env,
                     rss=False).check()

    def close(self):
        pass


class Ostree:
    binary = "ostree"
    pids = ()

    def __init__(self, work, mode):
        self.name = f"ostree {mode}"
        self.form = (f"ostree init --mode={mode}; ostree commit --tree=dir=D, D holding the image as one file "
                     f"(whole-file objects, SHA-256{', zlib' if mode == 'archive' else ', uncompressed'}), "
                     "fsync on (the default)")
        self.work = work
        self.repo = os.path.join(work, "repo")
        self.n = 0
        Child(["ostree", "init", f"--mode={mode}", f"--repo={self.repo}"], rss=False).check()

    def put(self, data_path):
        self.n += 1
        tree = os.path.join(self.work, f"tree{self.n}")
        os.makedirs(tree)
        os.link(data_path, os.path.join(tree, "image"))  # the input, outside the measured repo
        return Child(["ostree", "commit", f"--repo={self.repo}", "--branch=image", f"--tree=dir={tree}",
                      "-s", f"v{self.n}"], rss=False).check()

    def close(self):
        pass


def anchors() -> tuple:
    """``([(name, factory)], [missing binaries])`` for the anchors installed here."""
    out, missing = [], []
    for label, cls, args_ in (("casync", Casync, ()), ("restic", Restic, ()),
                              ("ostree archive", Ostree, ("archive",)), ("ostree bare-user", Ostree, ("bare-user",))):
        if shutil.which(cls.binary):
            out.append((label, lambda work, cls=cls, a=args_: cls(work, *a)))
        elif cls.binary not in missing:
            missing.append(cls.binary)
    return out, missing


class chunk_size:
    """Within the block, keg.large cuts with FastCDC average ``avg`` (min avg/4, max avg*4); None: unchanged."""

    def __init__(self, avg):
        self.avg = avg

    def __enter__(self):
        self.saved = (large.AVG_CHUNK, large.MIN_CHUNK, large.MAX_CHUNK)
        if self.avg:
            large.AVG_CHUNK, large.MIN_CHUNK, large.MAX_CHUNK = self.avg, self.avg // 4, self.avg * 4

    def __exit__(self, *exc):
        large.AVG_CHUNK, large.MIN_CHUNK, large.MAX_CHUNK = self.saved


def busy_cpu() -> float:
    """CPU seconds the whole machine has been busy (all processes), from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu(pids=()) -> float:
    """CPU seconds of this process, its waited-for children and the server processes ``pids``."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        total += ru.ru_utime + ru.ru_stime
    return total + sum(cpu_seconds(pid) for pid in pids)


class Region:
    """A timed region: wall seconds, the CPU the measured system used, and what other processes used meanwhile.

    ``other`` is the machine's busy CPU minus ours: a run on a shared machine
    shows how much it was disturbed (the figures are not corrected for it).
    """

    def __init__(self, pids=()):
        self.pids = pids

    def __enter__(self):
        self.server0 = sum(cpu_seconds(pid) for pid in self.pids)
        self.busy0, self.own0, self.start = busy_cpu(), own_cpu(self.pids), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        self.cpu = own_cpu(self.pids) - self.own0
        self.other = max(0.0, busy_cpu() - self.busy0 - self.cpu)
        self.server = sum(cpu_seconds(pid) for pid in self.pids) - self.server0


class Workspace:
    """One directory under ``--tmp`` for every repository of the run, removed when the run ends.

    Nothing is deleted between timed regions.  On ext4 without a journal (as
    on the machine of docs/benchmarks.md) a new inode skips every free inode
    of its group deleted in the last 60 s, or 360 s while the inode table
    block is dirty, checking each one: after thousands of chunk files are
    deleted, creating files is slow for minutes, which would penalise the
    file-per-chunk stores (Keg, casync) that come next.  Start a run a few
    minutes after deleting many files, or use ``--keep``.
    """

    def __init__(self, tmp):
        os.makedirs(tmp, exist_ok=True)
        self.root = tempfile.mkdtemp(prefix="keg-large-bench-run-", dir=tmp)

    def new(self, name: str) -> str:
        return tempfile.mkdtemp(prefix=name.replace(" ", "-").replace("`", "") + "-", dir=self.root)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def measure_system(factory, v1, v2, size, space) -> dict:
    """Import v1 then v2 into a new repository; time (each ending with ``fsync_tree``), CPU, disk use."""
    work = space.new("import")
    system = factory(work)
    try:
        res = {"name": system.name, "form": system.form}
        base = disk_use(system.repo)
        for tag, path in (("v1", v1), ("v2", v2)):
            settle()
            with Region(system.pids) as region:
                system.put(path)
                fsync_tree(system.repo)
            res[tag] = {"seconds": region.seconds, "mib_s": os.path.getsize(path) / MiB / region.seconds,
                        "cpu": region.cpu, "other_cpu": region.other, "server_cpu": region.server,
                        "disk": disk_use(system.repo), "files": count_files(system.repo)}
        res["empty_disk"] = base
        res["v1_disk"] = res["v1"]["disk"] - base
        res["v2_added"] = res["v2"]["disk"] - res["v1"]["disk"]
        return res
    finally:
        system.close()


def system_has_server(res: dict) -> bool:
    return "--url" in res["name"]


def _median_result(rounds: list) -> dict:
    """One system's rounds folded: median throughput and CPU, and the median of the disk figures."""
    out = dict(rounds[len(rounds) // 2])
    for tag in ("v1", "v2"):
        out[tag] = dict(out[tag])
        for key in ("seconds", "mib_s", "cpu", "other_cpu", "server_cpu"):
            out[tag][key] = median([r[tag][key] for r in rounds])
        out[tag]["rounds_mib_s"] = [r[tag]["mib_s"] for r in rounds]
    for key in ("v1_disk", "v2_added"):
        out[key] = median([r[key] for r in rounds])
    return out


# -------------------------------------------------------------------- modes

def bench_import(args, space) -> Report:
    v1, v2 = data_files(args)
    report = Report("large-import", {"size": args.size, "data": args.data, "edits": EDITS, "rounds": args.rounds,
                                     "edit_bytes": EDIT_BYTES, "insert_bytes": INSERT_BYTES})
    warm(v1)
    warm(v2)
    systems, missing = anchors()
    if missing:
        print(f"  not installed, skipped: {', '.join(missing)}")
    keg_default = ("keg", lambda w: KegInProcess(w))
    systems = [keg_default] + systems
    systems += [(f"keg avg {human(a)}", lambda w, a=a: KegInProcess(w, a)) for a in args.keg_avg
                if a != large.AVG_CHUNK]
    systems.append(("keg one process", lambda w: KegInProcess(w, worker=False)))
    systems.append(("keg cli", lambda w: KegCli(w)))
    if not args.no_remote:
        systems.append(("keg remote", lambda w: KegRemote(w)))
    per_system = {label: [] for label, _ in systems}
    for r in range(args.rounds):
        order = systems if r % 2 == 0 else systems[::-1]  # alternate who goes first
        for label, factory in order:
            res = measure_system(factory, v1, v2, args.size, space)
            per_system[label].append(res)
            v1_, master = res["v1"], ""
            if system_has_server(res):
                master = f" ({v1_['server_cpu']:.2f} s of it the master's)"
            report.figure(f"{res['name']} v1 import" + (f" (round {r + 1})" if args.rounds > 1 else ""),
                          v1_["mib_s"], "MiB/s",
                          f"{v1_['seconds']:.2f} s, CPU {v1_['cpu']:.2f} s{master}, other processes "
                          f"{v1_['other_cpu']:.2f} s; disk {human(res['v1_disk'])}, {v1_['files']:,} files; "
                          f"v2 adds {human(res['v2_added'])} at {res['v2']['mib_s']:.0f} MiB/s",
                          system=res["name"], round=r, result=res)
    results = [_median_result(per_system[label]) for label, _ in systems]
    keg_row = results[0]
    anchor_rows = [r for r in results if not r["name"].startswith("Keg")]
    print(f"\n  medians of {args.rounds} round(s); {human(args.size)} of {args.data} data; v2 = {EDITS} scattered "
          f"{EDIT_BYTES // 1024} KiB edits + one {INSERT_BYTES // 1024} KiB insertion")
    print(f"  {'system':<26} {'v1 MiB/s':>9} {'v1 CPU s':>9} {'others':>7} {'v1 disk':>11} {'v2 MiB/s':>9} "
          f"{'v2 adds':>11} {'Keg/x MiB/s':>11} {'x/Keg adds':>10}")
    for r in results:
        thr = keg_row["v1"]["mib_s"] / r["v1"]["mib_s"]
        adds = r["v2_added"] / keg_row["v2_added"] if keg_row["v2_added"] else float("inf")
        print(f"  {r['name']:<26} {r['v1']['mib_s']:>9.1f} {r['v1']['cpu']:>9.2f} {r['v1']['other_cpu']:>7.2f} "
              f"{human(r['v1_disk']):>11} {r['v2']['mib_s']:>9.1f} {human(r['v2_added']):>11} {thr:>11.2f} "
              f"{adds:>10.2f}")
    for r in results:
        print(f"    {r['name']}: {r['form']}")
    report.params["results"] = results
    if anchor_rows:
        best_thr = max(anchor_rows, key=lambda r: r["v1"]["mib_s"])
        best_dedup = min(anchor_rows, key=lambda r: r["v2_added"])
        # Per round: Keg against the fastest anchor of that same round (the machine's speed drifts between
        # rounds; a ratio within a round does not), then the median of those ratios, as bench/run.py does.
        anchor_labels = [label for label, _ in systems if not per_system[label][0]["name"].startswith("Keg")]
        round_ratios = []
        for r in range(args.rounds):
            keg_r = per_system[systems[0][0]][r]["v1"]["mib_s"]
            fastest = max(per_system[label][r]["v1"]["mib_s"] for label in anchor_labels)
            round_ratios.append(keg_r / fastest)
        print(f"  Keg / fastest anchor of the same round, per round: "
              + ", ".join(f"{x:.2f}" for x in round_ratios))
        report.params["round_ratios"] = round_ratios
        for r in results[1:]:
            if r["name"].startswith("Keg put_stream avg"):
                print(f"  side: {r['name']}: {r['v1']['mib_s'] / best_thr['v1']['mib_s']:.2f}x {best_thr['name']} "
                      f"throughput, adds {best_dedup['v2_added'] / max(1, r['v2_added']):.2f}x less than "
                      f"{best_dedup['name']} (>= 1 is as good)")
        report.goal("Keg/fastest anchor import MiB/s, median of per-round ratios", median(round_ratios), ">=", 1.0)
        report.figure(f"side: Keg/{best_thr['name']} (fastest by median) import MiB/s",
                      keg_row["v1"]["mib_s"] / best_thr["v1"]["mib_s"], "x", "ratio of the medians")
        report.goal(f"{best_dedup['name']}/Keg bytes added by v2 (best-dedup anchor)",
                    best_dedup["v2_added"] / max(1, keg_row["v2_added"]), ">=", 1.0)
    return report


def bench_copies(args, space) -> Report:
    v1, _ = data_files(args)
    copies = args.copies
    report = Report("large-copies", {"size": args.size, "data": args.data, "copies": copies,
                                     "reimports": REIMPORTS, "batch": COPY_BATCH})
    warm(v1)
    root = os.path.join(space.new("copies"), "keg")
    with keg.init(root) as store:
        empty = disk_use(root)
        settle()
        start = time.perf_counter()
        with open(v1, "rb") as f:
            op = store.put_stream("/images/copy0000", f)
        store.apply(Transaction((op,)))
        store.checkpoint()
        first = time.perf_counter() - start
        one = disk_use(root)
        report.figure("first import", args.size / MiB / first, "MiB/s", f"{first:.2f} s")
        report.figure("disk use, 1 copy (whole keg dir)", one / MiB, "MiB",
                      f"{human(one)}; empty keg {human(empty)}; value {human(args.size)}", bytes=one)
        pointer = store.pointer("/images/copy0000")
        for i in range(1, REIMPORTS + 1):
            start = time.perf_counter()
            with open(v1, "rb") as f:
                op = store.put_stream(f"/images/copy{i:04d}", f)
            store.apply(Transaction((op,)))
            seconds = time.perf_counter() - start
            assert store.pointer(f"/images/copy{i:04d}") == pointer
            report.figure(f"re-import {i} through the chunker", args.size / MiB / seconds, "MiB/s",
                          f"{seconds:.2f} s, disk now {human(disk_use(root))}")
        start = time.perf_counter()
        n = REIMPORTS + 1
        while n < copies:
            ops = [put_large(f"/images/copy{i:04d}", pointer) for i in range(n, min(copies, n + COPY_BATCH))]
            assert store.apply(Transaction(tuple(ops))).ok
            n += len(ops)
        store.checkpoint()
        seconds = time.perf_counter() - start
        count = copies - REIMPORTS - 1
        report.figure(f"{count} pointer puts, tx of {COPY_BATCH}, + checkpoint", count / seconds, "puts/s",
                      f"{seconds:.2f} s")
        entries = store.list("/images")
        assert len(entries) == copies and all(e.size == args.size and e.large for e in entries)
        assert len({e.kid for e in entries}) == 1
        total = disk_use(root)
        chunks = count_files(store.chunks.root)
    report.figure(f"disk use, {copies} copies (whole keg dir)", total / MiB, "MiB",
                  f"{human(total)}; {chunks:,} chunk files; logical size {human(copies * args.size)}", bytes=total)
    report.figure("added by the other copies", (total - one) / MiB, "MiB", human(total - one))
    report.goal(f"disk use {copies} copies / 1 copy", total / one, "<=", 1.05)
    return report


def bench_memory(args, space) -> Report:
    v1, _ = data_files(args)
    report = Report("large-memory", {"size": args.size, "data": args.data, "limit_mib": RSS_LIMIT // MiB})
    warm(v1)
    root = os.path.join(space.new("memory"), "keg")
    kc = keg_command()
    Child([*kc, "init", "--keg", root], env=tool_env()).check()
    base = Child([*kc, "ls", "--keg", root, "/"], env=tool_env()).check()
    report.figure("baseline: `keg ls /` peak RSS", base.maxrss / MiB, "MiB", "Python with keg imported, no value")
    settle()
    put_ = Child([*kc, "put", "--keg", root, "/image", v1], env=tool_env()).check()
    report.figure("`keg put FILE` peak RSS", put_.maxrss / MiB, "MiB",
                  f"{args.size / MiB / put_.seconds:.0f} MiB/s, {put_.seconds:.2f} s, CPU {put_.cpu:.2f} s")
    with open(os.devnull, "wb") as null:
        cat = Child([*kc, "cat", "--keg", root, "/image"], stdout=null, env=tool_env()).check()
    report.figure("`keg cat > /dev/null` peak RSS", cat.maxrss / MiB, "MiB",
                  f"{args.size / MiB / cat.seconds:.0f} MiB/s, {cat.seconds:.2f} s, CPU {cat.cpu:.2f} s")
    script = ("import sys, keg\n"
              "s = keg.Store(sys.argv[1])\n"
              "n = 0\n"
              "with s.open('/image') as f:\n"
              "    while True:\n"
              "        b = f.read(1 << 20)\n"
              "        if not b: break\n"
              "        n += len(b)\n"
              f"assert n == {args.size}, n\n")
    opened = Child([sys.executable, "-c", script, root], env=tool_env()).check()
    report.figure("Python Store.open, read(1 MiB) loop, peak RSS", opened.maxrss / MiB, "MiB",
                  f"{args.size / MiB / opened.seconds:.0f} MiB/s, {opened.seconds:.2f} s")
    report.goal("`keg cat` peak RSS, MiB", cat.maxrss / MiB, "<=", RSS_LIMIT / MiB)
    report.goal("`keg put` peak RSS, MiB", put_.maxrss / MiB, "<=", RSS_LIMIT / MiB)
    report.goal("Store.open read peak RSS, MiB", opened.maxrss / MiB, "<=", RSS_LIMIT / MiB)
    if not args.no_remote:
        with KegMasterServer(base_dir=space.new("memory-master")) as server:
            url = f"http://127.0.0.1:{server.port}"
            rput = Child([*kc, "put", "--url", url, "--token", server.token, "/image", v1], env=tool_env()).check()
            report.figure("`keg put --url` (client) peak RSS", rput.maxrss / MiB, "MiB",
                          f"{args.size / MiB / rput.seconds:.0f} MiB/s, {rput.seconds:.2f} s")
            with open(os.devnull, "wb") as null:
                rcat = Child([*kc, "cat", "--url", url, "--token", server.token, "/image"], stdout=null,
                             env=tool_env()).check()
            report.figure("`keg cat --url > /dev/null` (client) peak RSS", rcat.maxrss / MiB, "MiB",
                          f"{args.size / MiB / rcat.seconds:.0f} MiB/s, {rcat.seconds:.2f} s")
            hwm = vm_hwm(server.proc.pid)
            report.figure("master peak RSS after serving both (VmHWM)", hwm / MiB, "MiB", "keg master serve")
            report.goal("`keg cat --url` client peak RSS, MiB", rcat.maxrss / MiB, "<=", RSS_LIMIT / MiB)
    return report


def vm_hwm(pid: int) -> int:
    """Peak RSS of a running process, bytes (``VmHWM`` in /proc/PID/status)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def bench_chunk_size(args, space) -> Report:
    v1, v2 = data_files(args)
    report = Report("large-chunk-size", {"size": args.size, "data": args.data, "avg_sizes": CHUNK_SIZES,
                                         "compress_threads": chunks.COMPRESS_THREADS, "rounds": args.rounds})
    warm(v1)
    warm(v2)
    per_avg = {avg: [] for avg in CHUNK_SIZES}
    for r in range(args.rounds):
        for avg in CHUNK_SIZES if r % 2 == 0 else CHUNK_SIZES[::-1]:
            chunks = ChunkStore(space.new(f"chunk-{avg}"), durable=True)
            row = {"avg": avg}
            with chunk_size(avg):
                for tag, path in (("v1", v1), ("v2", v2)):
                    settle()
                    with Region() as region, open(path, "rb") as f:
                        pointer = large.ingest(chunks, f)
                    row[tag] = {"seconds": region.seconds, "cpu": region.cpu, "other_cpu": region.other,
                                "mib_s": os.path.getsize(path) / MiB / region.seconds,
                                "disk": disk_use(chunks.root), "files": count_files(chunks.root),
                                "chunks": len(pointer.chunks), "pointer_bytes": len(pointer.encode())}
                    if tag == "v1":
                        first = pointer
            start = time.perf_counter()
            n = sum(len(piece) for piece in large.LargeReader(first, chunks.get, "/image").iter_chunks())
            row["read_mib_s"] = n / MiB / (time.perf_counter() - start)
            row["v2_added"] = row["v2"]["disk"] - row["v1"]["disk"]
            row["v2_new_files"] = row["v2"]["files"] - row["v1"]["files"]
            per_avg[avg].append(row)
            report.figure(f"avg {human(avg)}: ingest" + (f" (round {r + 1})" if args.rounds > 1 else ""),
                          row["v1"]["mib_s"], "MiB/s",
                          f"CPU {row['v1']['cpu']:.2f} s (others {row['v1']['other_cpu']:.2f}), "
                          f"{row['v1']['files']:,} files, {human(row['v1']['disk'])}; v2 adds "
                          f"{human(row['v2_added'])} ({row['v2_new_files']} chunks); read "
                          f"{row['read_mib_s']:.0f} MiB/s", row=row)
    rows = []
    for avg in CHUNK_SIZES:
        rounds = per_avg[avg]
        row = dict(rounds[0])
        row["v1"] = dict(row["v1"])
        for key in ("mib_s", "cpu", "other_cpu", "seconds"):
            row["v1"][key] = median([x["v1"][key] for x in rounds])
        row["read_mib_s"] = median([x["read_mib_s"] for x in rounds])
        rows.append(row)
    report.params["rows"] = rows
    print(f"\n  medians of {args.rounds} round(s); ingest = FastCDC + blake3 + zstd + write + fsync "
          f"(keg.large.ingest, zstd on {chunks.COMPRESS_THREADS} threads)")
    print(f"  {'avg chunk':>10} {'ingest MiB/s':>12} {'CPU s':>7} {'chunk files':>11} {'disk v1':>11} "
          f"{'v2 adds':>11} {'v2 new':>7} {'read MiB/s':>10} {'pointer':>10}")
    for r in rows:
        mark = "  (default)" if r["avg"] == large.AVG_CHUNK else ""
        print(f"  {human(r['avg']):>10} {r['v1']['mib_s']:>12.1f} {r['v1']['cpu']:>7.2f} {r['v1']['files']:>11,} "
              f"{human(r['v1']['disk']):>11} {human(r['v2_added']):>11} {r['v2_new_files']:>7} "
              f"{r['read_mib_s']:>10.0f} {human(r['v1']['pointer_bytes']):>10}{mark}")
    return report


MODES = {"import": bench_import, "chunk-size": bench_chunk_size, "copies": bench_copies, "memory": bench_memory}


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through every finally: servers stopped, temp dirs removed


def main(argv=None) -> int:
    """Run the chosen modes; exit 1 with ``--check`` if a goal is missed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default=None, help="bytes of data: 1G, 128M, ... (default 1G, quick 128M)")
    parser.add_argument("--quick", action="store_true", help="128 MiB of data and 100 copies (under a minute)")
    parser.add_argument("--mode", default="all", choices=["all", *MODES], help="which benchmark (default all)")
    parser.add_argument("--data", default="image", choices=["image", "random"],
                        help="a tar of /usr (default) or seeded pseudo-random bytes")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds of import and chunk-size, reported as medians (default 1)")
    parser.add_argument("--copies", type=int, default=None, help="copies in the copies mode (default 1000, quick 100)")
    parser.add_argument("--keg-avg", default=None,
                        help="extra Keg rows in the import mode with these FastCDC averages, comma-separated "
                        "(default 256K,1M; quick none; '' for none)")
    parser.add_argument("--no-remote", action="store_true", help="skip the master (keg put/cat --url)")
    parser.add_argument("--data-dir", default="/tmp/keg-large-bench", help="where the generated data is cached")
    parser.add_argument("--remove-data", action="store_true", help="delete the cached data files at the end")
    parser.add_argument("--keep", action="store_true",
                        help="leave the repositories under --tmp when done (to inspect them, or so that a run "
                        "right after this one does not follow a mass delete; see Workspace)")
    parser.add_argument("--tmp", default="/tmp", help="where repositories go (the disk you mean to measure)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    parser.add_argument("--out", default=os.path.join(HERE, "out"), help="where result JSON goes")
    args = parser.parse_args(argv)
    args.size = parse_size(args.size or ("128M" if args.quick else "1G"))
    args.copies = args.copies or (100 if args.quick else 1000)
    if args.keg_avg is None:
        args.keg_avg = "" if args.quick else "256K,1M"
    args.keg_avg = [parse_size(a) for a in args.keg_avg.split(",") if a.strip()]
    signal.signal(signal.SIGTERM, _terminate)
    env = environment(None)
    env.pop("etcd", None)
    env["quick"] = args.quick
    env["tools"] = tool_versions()
    env["load_before"] = os.getloadavg()
    print(f"Keg large-value benchmarks: {env['cpus']} CPUs, {env['mem_gib']} GiB, Python {env['python']}, "
          f"{env['date']}, {human(args.size)} of {args.data} data{'  (--quick)' if args.quick else ''}")
    print("  " + ", ".join(f"{k} {v}" for k, v in env["tools"].items()) +
          f"; load average {env['load_before'][0]:.2f}")
    started = time.perf_counter()
    goals = []
    space = Workspace(args.tmp)
    try:
        for name in MODES if args.mode == "all" else [args.mode]:
            report = MODES[name](args, space)
            path = report.write(args.out, env)
            print(f"  -> {os.path.relpath(path)}")
            goals.extend(report.goals)
    except KeyboardInterrupt:
        print("\ninterrupted: temporary directories are removed", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"  repositories kept in {space.root}")
        else:
            space.remove()
        if args.remove_data:
            shutil.rmtree(args.data_dir, ignore_errors=True)
    print(f"\n== summary ({time.perf_counter() - started:.0f} s)")
    for goal in goals:
        verdict = "MET   " if goal.met else "MISSED"
        print(f"  {verdict}  {goal.name}: {goal.value:,.2f} (goal {goal.op} {goal.target:g})")
    return 1 if args.check and not all(g.met for g in goals) else 0


def tool_versions() -> dict:
    """The anchors' versions, None for one not installed."""
    versions = {}
    for tool, cmd in (("casync", ["casync", "--version"]), ("restic", ["restic", "version"]),
                      ("ostree", ["ostree", "--version"])):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
            versions[tool] = out.split("Version:")[1].split()[0].strip("'") if tool == "ostree" else out.split()[1]
        except (OSError, IndexError):
            versions[tool] = None
    return versions


if __name__ == "__main__":
    sys.exit(main())
