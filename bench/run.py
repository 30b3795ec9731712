"""Keg benchmarks, the store and the master over HTTP: each runs its anchor and Keg in one run, with the ratio.

Usage::

    .venv/bin/python bench/run.py [--quick] [--profile] [NAME...]

Benchmarks (DESIGN §9; figures and goals in docs/benchmarks.md):

``single``     durable sequential single-key puts: etcd 3.4 over its HTTP/JSON
               gateway (one keep-alive client) vs Keg ``Store.apply`` in process.
``batched``    Keg transactions of 100 and 1,000 puts vs unbatched Keg, keys/s
               (etcd txn of 100 puts as a side figure).
``diffwatch``  ``Store.diff`` and ``Store.events`` of one changed file in a 20,000-entry
               namespace (and in a 200-entry one); anchor: etcd range read of the
               changed machine's prefix.
``scale``      one-path durable commit on a 100-entry vs a 150,000-entry namespace.

The master over HTTP (issue 4), against etcd 3.4 in the same run, through the
same client (``http_load.py``: raw HTTP/1.1 keep-alive on asyncio), both durable:

``http-single``      sequential puts, one connection: ``PUT /v1/keg/<path>`` vs ``POST /v3/kv/put``.
``http-concurrent``  32 connections each doing one put at a time (Keg's group commit).
``watch-latency``    write → event at the watcher, p50/p99, with 1 and with 1,000 watch
                     streams: ``GET /v1/watch`` (NDJSON) vs ``POST /v3/watch``.

In process, every timed Keg write region starts right after a checkpoint and
ends with one, so the objects written are in a git pack before the clock stops
(checkpoints are part of the cost); the master over HTTP checkpoints on its
own schedule (every 1,000 revisions), inside the timed regions.  Every timed
region starts after ``settle()`` (``sync`` and a short pause) so one system's
background disk writes do not land in the other's figures.  Results go to
``bench/out/<name>.json``.
"""

from __future__ import annotations

import argparse
import os
import pstats
import random
import shutil
import signal
import sys
import tempfile
import time
from contextlib import contextmanager

import keg
from keg import Transaction, put

from etcd_anchor import EtcdClient, EtcdServer, etcd_version
from http_load import EtcdApi, KegApi, concurrent_puts, sequential_puts, watch_latency
from keg_master import KegMasterServer, cpu_seconds
from measure import KegProfiler, Report, Stopwatch, environment, latency_text, median, summarize

HERE = os.path.dirname(os.path.abspath(__file__))
VALUE_BYTES = 128
WARMUP = 20
KEYS = 1000  # single and batched write keys /bench/k0 .. /bench/k999
PREFILL = 10**9  # prefill values are value(PREFILL + i), never equal to a timed write's value
SETTLE_SECONDS = 0.3


class Context:
    """What every benchmark gets: run options and the shared tools."""

    def __init__(self, args, profiler: KegProfiler):
        self.quick = args.quick
        self.rounds = args.rounds if args.rounds else (1 if args.quick else 3)
        self.tmp = args.tmp
        self.etcd = args.etcd
        self.profiler = profiler
        self.profile = args.profile
        self.out = args.out
        self.client_processes = args.client_processes

    def size(self, full, quick):
        """The full-run parameter, or the ``--quick`` one."""
        return quick if self.quick else full


# ------------------------------------------------------------------ workloads

def value(i: int) -> bytes:
    """A distinct ``VALUE_BYTES``-byte value per ``i``: every timed put changes its key and makes a new blob."""
    return f"value {i} ".encode().ljust(VALUE_BYTES, b"x")


def proc_path(machine: int, proc: int) -> str:
    """The namespace path of one process file."""
    return f"/machines/m{machine:04d}/procs/p{proc:02d}.json"


def proc_spec(machine: int, proc: int, generation: int) -> bytes:
    """A small process-spec JSON file, about 150 bytes."""
    return (f'{{"machine": "m{machine:04d}", "name": "p{proc:02d}", "image": "K-{machine * 97 + proc:040x}", '
            f'"argv": ["/usr/bin/worker", "--id", "{proc}"], "generation": {generation}}}').encode()


@contextmanager
def keg_store(ctx: Context):
    """A new durable keg (default checkpoint settings) in a temporary directory, removed afterwards."""
    tmp = tempfile.mkdtemp(prefix="keg-bench-", dir=ctx.tmp)
    store = None
    try:
        store = keg.init(os.path.join(tmp, "keg"))
        yield store
    finally:
        try:
            if store is not None:
                store.close()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


class CheckpointTimer:
    """Counts the time a store spends in ``checkpoint`` while in a ``with`` block.

    It wraps the instance's method for the block only; Keg itself is not changed.
    """

    def __init__(self, store):
        self.store = store
        self.seconds = 0.0
        self.count = 0

    def __enter__(self) -> "CheckpointTimer":
        store, inner = self.store, self.store.checkpoint

        def timed():
            start = time.perf_counter()
            before = store.stats["checkpoints"]
            try:
                inner()
            finally:
                if store.stats["checkpoints"] != before:  # it did something
                    self.seconds += time.perf_counter() - start
                    self.count += 1

        store.checkpoint = timed
        return self

    def __exit__(self, *exc) -> None:
        del self.store.checkpoint  # back to the class's method

    def text(self, total: float) -> str:
        """``N checkpoints took S s (P% of the time)`` for a timed region of ``total`` seconds."""
        share = 100 * self.seconds / total
        return f"{self.count} checkpoints took {self.seconds:.2f} s ({share:.0f}% of the time)"


def disk_bytes(directory: str) -> int:
    """Bytes of the files under ``directory``."""
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def load_machines(store, machines: int, procs: int, per_tx: int) -> int:
    """Fill ``/machines`` with ``machines × procs`` files using transactions of ``per_tx`` puts.

    Returns:
        The number of revisions written.
    """
    ops, revisions = [], 0
    for i in range(machines):
        for j in range(procs):
            ops.append(put(proc_path(i, j), proc_spec(i, j, 0)))
            if len(ops) == per_tx:
                assert store.apply(Transaction(tuple(ops))).ok
                ops, revisions = [], revisions + 1
    if ops:
        assert store.apply(Transaction(tuple(ops))).ok
        revisions += 1
    return revisions


def settle() -> None:
    """Let the previous phase's disk writes finish (etcd commits its backend up to 100 ms after a
    write), so one system's background flushes do not land in the other's timed region."""
    os.sync()
    time.sleep(SETTLE_SECONDS)
    os.sync()


def keg_prefill(store) -> None:
    """Write every ``/bench`` key once (one transaction), then ``WARMUP`` single puts elsewhere.

    Timed rounds then all run in the steady state, on a full 1,000-entry
    directory: the first round would otherwise be cheaper, as Keg's cost per
    revision grows with the width of the directories on the changed path.
    """
    assert store.apply(Transaction(tuple(put(f"/bench/k{i}", value(PREFILL + i)) for i in range(KEYS)))).ok
    for i in range(WARMUP):
        store.apply(Transaction((put(f"/warm/k{i}", value(i)),)))


def keg_single_puts(ctx: Context, store, n: int, first: int = 0):
    """``n`` sequential one-put transactions on keys ``/bench/k{i % KEYS}``, checkpoint to checkpoint.

    Returns:
        The ``Stopwatch`` and the ``CheckpointTimer`` of the timed region.
    """
    store.checkpoint()
    with CheckpointTimer(store) as timer, ctx.profiler.section(), Stopwatch() as sw:
        for i in range(first, first + n):
            with sw.step():
                res = store.apply(Transaction((put(f"/bench/k{i % KEYS}", value(i)),)))
            assert res.ok, res
        store.checkpoint()
    return sw, timer


# -------------------------------------------------------------------- single

def etcd_single_puts(client: EtcdClient, n: int, first: int = 0) -> Stopwatch:
    """``n`` sequential puts on keys ``/bench/k{i % KEYS}`` over one keep-alive connection."""
    with Stopwatch() as sw:
        for i in range(first, first + n):
            with sw.step():
                client.put(f"/bench/k{i % KEYS}".encode(), value(i))
    return sw


def bench_single(ctx: Context) -> Report:
    """Durable sequential single-key puts, etcd over HTTP vs Keg in process, in paired rounds."""
    n = ctx.size(2000, 500)
    rounds = ctx.rounds
    rep = Report("single", {"n": n, "rounds": rounds, "value_bytes": VALUE_BYTES, "keys": KEYS,
                            "warmup": f"all {KEYS} keys written once, then {WARMUP} puts"})
    etcd_rates, keg_rates, etcd_steps, keg_steps = [], [], [], []
    cp_seconds, cp_count, keg_total = 0.0, 0, 0.0
    with EtcdServer(ctx.etcd, ctx.tmp) as server, EtcdClient(server.port) as client, keg_store(ctx) as store:
        keg_prefill(store)
        for start in range(0, KEYS, 100):
            client.put_many((f"/bench/k{i}".encode(), value(PREFILL + i)) for i in range(start, start + 100))
        for i in range(WARMUP):
            client.put(f"/warm/k{i}".encode(), value(i))
        for r in range(rounds):
            # Alternate which system goes first, so neither always runs on a fresher disk.
            for system in (("etcd", "keg") if r % 2 == 0 else ("keg", "etcd")):
                settle()
                if system == "etcd":
                    etcd_sw = etcd_single_puts(client, n, first=r * n)
                else:
                    keg_sw, timer = keg_single_puts(ctx, store, n, first=r * n)
            etcd_rates.append(n / etcd_sw.total)
            keg_rates.append(n / keg_sw.total)
            etcd_steps += etcd_sw.steps
            keg_steps += keg_sw.steps
            cp_seconds, cp_count, keg_total = cp_seconds + timer.seconds, cp_count + timer.count, \
                keg_total + keg_sw.total
            print(f"    round {r + 1}: etcd {etcd_rates[-1]:,.0f} puts/s, keg {keg_rates[-1]:,.0f} puts/s, "
                  f"ratio {keg_rates[-1] / etcd_rates[-1]:.2f}", flush=True)
    etcd_lat, keg_lat = summarize(etcd_steps), summarize(keg_steps)
    rep.figure("etcd 3.4 put, HTTP gateway, 1 keep-alive client (median)", median(etcd_rates), "puts/s",
               latency_text(etcd_lat), latency=etcd_lat, rounds=etcd_rates)
    rep.figure("keg Store.apply, in process, durable (median)", median(keg_rates), "puts/s",
               latency_text(keg_lat), latency=keg_lat, rounds=keg_rates)
    rep.figure("  of which in checkpoints", cp_seconds, "s",
               f"{cp_count} checkpoints, {100 * cp_seconds / keg_total:.0f}% of Keg's time", checkpoints=cp_count)
    ratios = [k / e for k, e in zip(keg_rates, etcd_rates)]
    rep.goal("single ratio keg/etcd (puts/s, median of rounds)", median(ratios), ">=", 1.0)
    return rep


# ------------------------------------------------------------------- batched

BATCH_PHASES = (("unbatched", 1, False), ("tx100", 100, False), ("tx1000", 1000, False),
                ("group100", 100, True))
BATCH_LABELS = {"unbatched": "keg unbatched: 1 put per transaction",
                "tx100": "keg batched: transactions of 100 puts",
                "tx1000": "keg batched: transactions of 1000 puts",
                "group100": "side: keg group commit of 100 one-put transactions"}


def bench_batched(ctx: Context) -> Report:
    """Keg transactions of 100 and 1,000 puts vs one put per transaction, in rounds."""
    n_single = ctx.size(1000, 300)
    keys = ctx.size(20_000, 5_000)
    etcd_txns = ctx.size(100, 20)
    rounds = ctx.rounds
    rep = Report("batched", {"unbatched_n": n_single, "batched_keys": keys, "rounds": rounds,
                             "value_bytes": VALUE_BYTES, "keys": KEYS, "etcd_txns_of_100": etcd_txns,
                             "warmup": f"all {KEYS} keys written once, then {WARMUP} puts"})
    rates = {name: [] for name, _, _ in BATCH_PHASES}
    steps = {name: [] for name, _, _ in BATCH_PHASES}
    checkpoint_share = {name: [] for name, _, _ in BATCH_PHASES}
    with keg_store(ctx) as store:
        keg_prefill(store)
        first = 0
        for r in range(rounds):
            for name, size, grouped in BATCH_PHASES:
                count = n_single if size == 1 else keys
                settle()
                sw, timer = _keg_batches(ctx, store, count, size, first, grouped)
                first += count
                rates[name].append(count / sw.total)
                steps[name] += sw.steps
                checkpoint_share[name].append(timer.seconds / sw.total)
            print(f"    round {r + 1}: " + ", ".join(f"{name} {rates[name][-1]:,.0f}" for name in rates)
                  + " keys/s", flush=True)
    for name, _, _ in BATCH_PHASES:
        lat = summarize(steps[name])
        rep.figure(BATCH_LABELS[name] + " (median)", median(rates[name]), "keys/s",
                   f"per commit: {latency_text(lat)}; checkpoints {100 * median(checkpoint_share[name]):.0f}% "
                   "of the time", latency=lat, rounds=rates[name])
    ratio = {name: median([b / u for b, u in zip(rates[name], rates["unbatched"])])
             for name in ("tx100", "tx1000")}
    rep.goal("batched 100 vs unbatched (keys/s ratio, median)", ratio["tx100"], ">=", 10)
    rep.goal("batched 1000 vs unbatched (keys/s ratio, median)", ratio["tx1000"], ">=", 10)
    rep.goal("batched 100, keys/s (median)", median(rates["tx100"]), ">=", 20_000)
    rep.goal("batched 1000, keys/s (median)", median(rates["tx1000"]), ">=", 20_000)

    with EtcdServer(ctx.etcd, ctx.tmp) as server, EtcdClient(server.port) as client:
        for start in range(0, KEYS, 100):
            client.put_many((f"/bench/k{i}".encode(), value(PREFILL + i)) for i in range(start, start + 100))
        settle()
        with Stopwatch() as sw:
            for t in range(etcd_txns):
                with sw.step():
                    client.put_many((f"/bench/k{(t * 100 + k) % KEYS}".encode(), value(t * 100 + k))
                                    for k in range(100))
    etcd_rate = rep.figure("side: etcd txn of 100 puts, HTTP, 1 client", etcd_txns * 100 / sw.total, "keys/s",
                           latency_text(summarize(sw.steps)))
    rep.figure("side: keg tx of 100 / etcd txn of 100 (keys/s)", median(rates["tx100"]) / etcd_rate, "x")
    return rep


def _keg_batches(ctx, store, keys: int, size: int, first: int, grouped: bool):
    """Write ``keys`` puts in commits of ``size``, checkpoint to checkpoint.

    A commit is one transaction of ``size`` puts, or (``grouped``) one group
    commit of ``size`` one-put transactions.

    Returns:
        The ``Stopwatch`` (one step per commit) and the ``CheckpointTimer``.
    """
    store.checkpoint()
    before = store.head_revision
    with CheckpointTimer(store) as timer, ctx.profiler.section(), Stopwatch() as sw:
        for start in range(first, first + keys, size):
            with sw.step():
                ops = [put(f"/bench/k{i % KEYS}", value(i)) for i in range(start, start + size)]
                if grouped:
                    results = store.commit([Transaction((op,)) for op in ops])
                    assert all(r.ok for r in results)
                else:
                    assert store.apply(Transaction(tuple(ops))).ok
        store.checkpoint()
    assert store.head_revision - before == keys // size
    return sw, timer


# ----------------------------------------------------------------- diffwatch

def bench_diffwatch(ctx: Context) -> Report:
    """Finding what one revision changed: Keg diff/events vs an etcd prefix read."""
    machines, procs, small_machines = 1000, 20, 10
    revisions = ctx.size(200, 50)
    rep = Report("diffwatch", {"machines": machines, "procs": procs, "entries": machines * procs,
                               "small_entries": small_machines * procs, "revisions": revisions,
                               "load_tx_puts": 5000})
    rng = random.Random(20240601)
    changes = [(rng.randrange(machines), rng.randrange(procs)) for _ in range(revisions)]
    small_changes = [(m % small_machines, p) for m, p in changes]

    big = _keg_diffs(ctx, rep, machines, procs, changes, "20,000")
    small = _keg_diffs(ctx, rep, small_machines, procs, small_changes, "200")

    with EtcdServer(ctx.etcd, ctx.tmp) as server, EtcdClient(server.port) as client:
        with Stopwatch() as load:
            batch = []
            for i in range(machines):
                for j in range(procs):
                    batch.append((proc_path(i, j).encode(), proc_spec(i, j, 0)))
                    if len(batch) == 100:
                        client.put_many(batch)
                        batch = []
        rep.figure("etcd load 20,000 keys (txns of 100), not compared", load.total, "s")
        ranges = []
        settle()
        for gen, (i, j) in enumerate(changes, start=1):
            client.put(proc_path(i, j).encode(), proc_spec(i, j, gen))
            start = time.perf_counter()
            kvs = client.range_prefix(f"/machines/m{i:04d}/".encode())
            ranges.append(time.perf_counter() - start)
            assert len(kvs) == procs
    etcd_lat = summarize(ranges)
    rep.figure("ANCHOR etcd range /machines/mXXXX/ over HTTP (find what changed)", etcd_lat["mean_ms"],
               "ms mean", latency_text(etcd_lat), latency=etcd_lat)

    rep.figure("keg diff mean / etcd range mean", big["diff"]["mean_ms"] / etcd_lat["mean_ms"], "x")
    rep.figure("keg events mean / etcd range mean", big["events"]["mean_ms"] / etcd_lat["mean_ms"], "x")
    rep.goal("diff tree reads, 20,000 minus 200 entries", big["tree_reads_max"] - small["tree_reads_max"],
             "<=", 0, source="harness: cost must not grow with namespace size")
    # Time is reported, not judged: a diff touches the same trees, but hashing and comparing
    # /machines costs its width (1,000 vs 10 entries). The criterion is O(depth) reads.
    rep.figure("diff mean time, 20,000 / 200 entries", big["diff"]["mean_ms"] / small["diff"]["mean_ms"], "x")
    rep.figure("diff p50 time, 20,000 / 200 entries", big["diff"]["p50_ms"] / small["diff"]["p50_ms"], "x")
    return rep


def _keg_diffs(ctx, rep, machines: int, procs: int, changes, label: str) -> dict:
    """Load a namespace, then per changed file: one revision, its diff and its events, timed."""
    with keg_store(ctx) as store:
        with Stopwatch() as load:
            load_machines(store, machines, procs, per_tx=5000)
            store.checkpoint()
        rep.figure(f"keg load {label} entries (tx of 5,000 puts) + checkpoint", load.total, "s")
        diffs, events, reads = [], [], []
        settle()
        for gen, (i, j) in enumerate(changes, start=1):
            path = proc_path(i, j)
            res = store.apply(Transaction((put(path, proc_spec(i, j, gen)),)))
            r = res.revision
            with ctx.profiler.section():
                reads_before = store.stats["tree_reads"]
                start = time.perf_counter()
                changed = store.diff(r - 1, r)
                diffs.append(time.perf_counter() - start)
                reads.append(store.stats["tree_reads"] - reads_before)
                start = time.perf_counter()
                seen = list(store.events("/machines", r - 1, r))
                events.append(time.perf_counter() - start)
            assert [c[0] for c in changed] == [path] and changed[0][2] == res.kids[path], changed
            assert [(e.revision, e.path) for e in seen] == [(r, path)], seen
    out = {"diff": summarize(diffs), "events": summarize(events),
           "tree_reads_mean": sum(reads) / len(reads), "tree_reads_max": max(reads)}
    rep.figure(f"keg diff(r-1, r) on {label} entries", out["diff"]["mean_ms"], "ms mean",
               latency_text(out["diff"]), latency=out["diff"])
    rep.figure(f"keg events('/machines', r-1, r) on {label} entries", out["events"]["mean_ms"], "ms mean",
               latency_text(out["events"]), latency=out["events"])
    rep.figure(f"keg tree reads per diff on {label} entries", out["tree_reads_mean"], "reads",
               f"max {out['tree_reads_max']}")
    return out


# --------------------------------------------------------------------- scale

def bench_scale(ctx: Context) -> Report:
    """One-path durable commit cost on a small vs a large namespace."""
    n = ctx.size(1000, 300)
    big_machines, big_procs = ctx.size((5000, 30), (1000, 30))
    rep = Report("scale", {"n": n, "small_entries": 100, "big_entries": big_machines * big_procs,
                           "big_layout": f"{big_machines} machines x {big_procs} procs", "load_tx_puts": 5000,
                           "checkpoint_revisions": 1000, "checkpoint_bytes": 64 << 20})
    small = _keg_commits(ctx, rep, 10, 10, n, "100")
    big = _keg_commits(ctx, rep, big_machines, big_procs, n, f"{big_machines * big_procs:,}")
    rep.goal("scale mean commit, big / small namespace", big["mean_ms"] / small["mean_ms"], "<=", 2.0)
    rep.figure("scale p50 commit, big / small namespace", big["p50_ms"] / small["p50_ms"], "x")
    rep.figure("scale p99 commit, big / small namespace", big["p99_ms"] / small["p99_ms"], "x")
    return rep


def _keg_commits(ctx, rep, machines: int, procs: int, n: int, label: str) -> dict:
    """Load ``machines × procs`` files, then time ``n`` one-put commits to random ones.

    Returns:
        The per-commit latency summary; ``mean_ms`` includes every checkpoint.
    """
    rng = random.Random(7)
    with keg_store(ctx) as store:
        with Stopwatch() as load:
            revisions = load_machines(store, machines, procs, per_tx=5000)
        with Stopwatch() as load_checkpoint:
            store.checkpoint()
        entries = machines * procs
        rep.figure(f"keg load {label} entries ({revisions} tx of <=5,000 puts)", entries / load.total,
                   "puts/s", f"{load.total:.2f} s, then checkpoint {load_checkpoint.total:.2f} s")
        objects_dir = os.path.join(store.path, "objects")
        disk_before = disk_bytes(objects_dir)
        settle()
        with CheckpointTimer(store) as timer, ctx.profiler.section(), Stopwatch() as sw:
            for gen in range(1, n + 1):
                i, j = rng.randrange(machines), rng.randrange(procs)
                with sw.step():
                    res = store.apply(Transaction((put(proc_path(i, j), proc_spec(i, j, gen)),)))
                assert res.ok
            with sw.step():  # no-op when the last commit checkpointed; otherwise its cost belongs here
                store.checkpoint()
        disk_added = disk_bytes(objects_dir) - disk_before
    lat = summarize(sw.steps[:-1])
    lat["mean_ms"] = 1000 * sw.total / n  # checkpoints included
    rep.figure(f"keg commit of 1 put on {label} entries", lat["mean_ms"], "ms mean",
               latency_text(lat), latency=lat)
    rep.figure("  of which in checkpoints", timer.seconds, "s", timer.text(sw.total), checkpoints=timer.count)
    rep.figure(f"  git objects added by the {n} commits", disk_added / n / 1024, "KiB/commit",
               f"{disk_added / 2**20:.1f} MiB in all")
    return lat


# ------------------------------------------------ the master over HTTP (issue 4)

CONNECTIONS = 32


@contextmanager
def http_servers(ctx: Context, bench: str):
    """etcd and a Keg master, both durable on 127.0.0.1, both prefilled like ``single``.

    Yields:
        ``{"keg": KegApi, "etcd": EtcdApi}`` and ``{"keg": pid, "etcd": pid}``.
        With ``--profile`` the master runs under cProfile; its top entries are
        printed once it has stopped.
    """
    profile_to = os.path.join(ctx.out, f"master-{bench}.pstats") if ctx.profile else None
    if profile_to:
        os.makedirs(ctx.out, exist_ok=True)
    with EtcdServer(ctx.etcd, ctx.tmp) as etcd, EtcdClient(etcd.port) as client, \
            KegMasterServer(ctx.tmp, profile_to) as master:
        master.tx([{"op": "put", "path": f"/bench/k{i}", "value": value(PREFILL + i).decode()}
                   for i in range(KEYS)])
        for start in range(0, KEYS, 100):
            client.put_many((f"/bench/k{i}".encode(), value(PREFILL + i)) for i in range(start, start + 100))
        apis = {"keg": KegApi(master.port, master.token), "etcd": EtcdApi(etcd.port)}
        for api in apis.values():
            sequential_puts(api, [(i, f"/warm/k{i}") for i in range(WARMUP)], value)
        yield apis, {"keg": master.proc.pid, "etcd": etcd.proc.pid}
    if profile_to:
        print_profile(profile_to)


def print_profile(path: str, top: int = 25) -> None:
    """The top entries of a saved profile, by own time and by total time."""
    stats = pstats.Stats(path)
    stats.strip_dirs()
    print(f"\n== profile of the Keg master (saved to {path})")
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)


def _put_rounds(ctx: Context, apis: dict, pids: dict, n: int, run) -> dict:
    """Paired rounds of ``run(api, work)`` on both systems, alternating which goes first.

    Returns:
        Per system: ``rates``, pooled ``latencies``, server and client CPU
        seconds per put (medians of rounds).
    """
    out = {name: {"rates": [], "latencies": [], "server_cpu": [], "client_cpu": []} for name in apis}
    for r in range(ctx.rounds):
        work = [(i, f"/bench/k{i % KEYS}") for i in range(r * n, (r + 1) * n)]
        for name in (("etcd", "keg") if r % 2 == 0 else ("keg", "etcd")):
            settle()
            cpu = cpu_seconds(pids[name])
            result = run(apis[name], work)
            out[name]["server_cpu"].append((cpu_seconds(pids[name]) - cpu) / n)
            out[name]["client_cpu"].append(result["cpu"] / n)
            out[name]["rates"].append(result["rate"])
            out[name]["latencies"] += result["latencies"]
        print(f"    round {r + 1}: etcd {out['etcd']['rates'][-1]:,.0f} puts/s, keg {out['keg']['rates'][-1]:,.0f} "
              f"puts/s, ratio {out['keg']['rates'][-1] / out['etcd']['rates'][-1]:.2f}", flush=True)
    return out


def _put_figures(rep: Report, out: dict, labels: dict) -> list:
    """One figure line per system; returns the per-round ratios keg/etcd."""
    for name in ("etcd", "keg"):
        lat = summarize(out[name]["latencies"])
        rep.figure(labels[name] + " (median)", median(out[name]["rates"]), "puts/s", latency_text(lat),
                   latency=lat, rounds=out[name]["rates"])
    for name in ("etcd", "keg"):
        rep.figure(f"  {name} server CPU per put (median of rounds)", 1e6 * median(out[name]["server_cpu"]), "us",
                   f"client CPU {1e6 * median(out[name]['client_cpu']):.0f} us per put")
    return [k / e for k, e in zip(out["keg"]["rates"], out["etcd"]["rates"])]


def bench_http_single(ctx: Context) -> Report:
    """Durable sequential single puts over HTTP, one keep-alive client: Keg's master vs etcd."""
    n = ctx.size(2000, 300)
    rep = Report("http-single", {"n": n, "rounds": ctx.rounds, "value_bytes": VALUE_BYTES, "keys": KEYS,
                                 "client": "1 keep-alive connection, asyncio, raw HTTP/1.1",
                                 "warmup": f"all {KEYS} keys written once, then {WARMUP} puts"})
    with http_servers(ctx, "http-single") as (apis, pids):
        out = _put_rounds(ctx, apis, pids, n, lambda api, work: sequential_puts(api, work, value))
    ratios = _put_figures(rep, out, {"etcd": "etcd 3.4 POST /v3/kv/put, 1 client",
                                     "keg": "keg master PUT /v1/keg/<path>, 1 client"})
    rep.goal("http-single ratio keg/etcd (puts/s, median of rounds)", median(ratios), ">=", 1.0)
    return rep


def bench_http_concurrent(ctx: Context) -> Report:
    """32 keep-alive clients doing durable puts at once: Keg's group commit vs etcd."""
    n = ctx.size(8000, 1000)
    procs = ctx.client_processes
    rep = Report("http-concurrent", {"n": n, "rounds": ctx.rounds, "connections": CONNECTIONS,
                                     "client_processes": procs, "value_bytes": VALUE_BYTES, "keys": KEYS,
                                     "client": "asyncio, raw HTTP/1.1, one put at a time per connection"})
    with http_servers(ctx, "http-concurrent") as (apis, pids):
        out = _put_rounds(ctx, apis, pids, n, lambda api, work: concurrent_puts(api, work, value, CONNECTIONS,
                                                                               procs))
    ratios = _put_figures(rep, out, {"etcd": f"etcd 3.4 POST /v3/kv/put, {CONNECTIONS} clients",
                                     "keg": f"keg master PUT /v1/keg/<path>, {CONNECTIONS} clients"})
    rep.goal(f"http-concurrent ratio keg/etcd, {CONNECTIONS} clients (median)", median(ratios), ">=", 2.0)
    return rep


def bench_watch_latency(ctx: Context) -> Report:
    """Write → event latency at 1 and at 1,000 watchers, Keg's NDJSON watch vs etcd's gateway watch."""
    phases = ((1, ctx.size(500, 50), 20.0), (ctx.size(1000, 100), ctx.size(100, 20), 200.0))
    rep = Report("watch-latency", {"phases": [f"{w} watchers x {n} writes" for w, n, _ in phases],
                                   "warmup_writes": 5, "gap_ms": 5, "client": "one asyncio process, "
                                   "raw HTTP/1.1; one writer connection plus one connection per watcher"})
    results = {}
    with http_servers(ctx, "watch-latency") as (apis, pids):
        first = 0
        for p, (watchers, writes, _) in enumerate(phases):
            for name in (("keg", "etcd") if p % 2 == 0 else ("etcd", "keg")):
                settle()
                cpu = cpu_seconds(pids[name])
                res = watch_latency(apis[name], watchers, writes, value, first=first)
                res["server_cpu"] = (cpu_seconds(pids[name]) - cpu) / writes
                first += writes + 10
                results[name, watchers] = res
    for watchers, writes, target in phases:
        who = f"{watchers} watcher{'s' if watchers > 1 else ''}"
        for name in ("etcd", "keg"):
            res = results[name, watchers]
            lat, last = summarize(res["latencies"]), summarize(res["last"])
            system = "etcd 3.4 POST /v3/watch" if name == "etcd" else "keg master GET /v1/watch (NDJSON)"
            rep.figure(f"{system}, {who}", lat["p99_ms"], "ms p99", latency_text(lat), latency=lat,
                       last_watcher=last)
            if watchers > 1:
                rep.figure("  slowest watcher per write", last["p99_ms"], "ms p99", latency_text(last))
            rep.figure(f"  {name} server CPU per write", 1e3 * res["server_cpu"], "ms",
                       f"put round trip {latency_text(summarize(res['puts']))}; "
                       f"client CPU {1e3 * res['cpu'] / writes:.2f} ms per write")
        keg, etcd = (summarize(results[name, watchers]["latencies"]) for name in ("keg", "etcd"))
        rep.figure(f"  p99 keg/etcd, {who}", keg["p99_ms"] / etcd["p99_ms"], "x",
                   f"p50 {keg['p50_ms'] / etcd['p50_ms']:.2f}x")
        rep.goal(f"watch p99 write->event, {who} (ms)", keg["p99_ms"], "<=", target)
    return rep


# ----------------------------------------------------------------------- main

BENCHMARKS = {"single": bench_single, "batched": bench_batched, "diffwatch": bench_diffwatch,
              "scale": bench_scale, "http-single": bench_http_single, "http-concurrent": bench_http_concurrent,
              "watch-latency": bench_watch_latency}


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through every finally: etcd is killed, temp dirs removed


def main(argv=None) -> int:
    """Run the named benchmarks (default all); exit 1 with ``--check`` if a goal is missed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run: {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run (about 20 s)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="paired rounds of single, batched, http-single and http-concurrent, "
                        "reported as medians (default 3, quick 1)")
    parser.add_argument("--profile", action="store_true", help="cProfile the Keg parts (the master process, "
                        "for the HTTP benchmarks); print the top entries")
    parser.add_argument("--client-processes", type=int, default=1, metavar="N",
                        help=f"client processes sharing the {CONNECTIONS} connections of http-concurrent (default 1)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    parser.add_argument("--etcd", default="etcd", help="the etcd binary (default: etcd on PATH)")
    parser.add_argument("--tmp", default=None, help="directory for temporary kegs and etcd data "
                        "(default: the system's; keep it on the disk you mean to measure)")
    parser.add_argument("--out", default=os.path.join(HERE, "out"), help="where result JSON goes")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    signal.signal(signal.SIGTERM, _terminate)

    profiler = KegProfiler(args.profile)
    ctx = Context(args, profiler)
    env = environment(etcd_version(args.etcd))
    env["quick"] = args.quick
    print(f"Keg benchmarks: {env['cpus']} CPUs, {env['mem_gib']} GiB, Python {env['python']}, "
          f"etcd {env['etcd']}, {env['date']}{'  (--quick)' if args.quick else ''}")
    started = time.perf_counter()
    goals = []
    try:
        for name in args.names or list(BENCHMARKS):
            report = BENCHMARKS[name](ctx)
            path = report.write(args.out, env)
            print(f"  -> {os.path.relpath(path)}")
            goals.extend(report.goals)
    except KeyboardInterrupt:
        print("\ninterrupted: etcd is stopped and the temporary directories are removed", file=sys.stderr)
        return 130
    print(f"\n== summary ({time.perf_counter() - started:.0f} s)")
    for goal in goals:
        verdict = "MET   " if goal.met else "MISSED"
        print(f"  {verdict}  {goal.name}: {goal.value:,.2f} (goal {goal.op} {goal.target:g})")
    profiler.dump(os.path.join(args.out, "profile.pstats"))
    return 1 if args.check and not all(g.met for g in goals) else 0


if __name__ == "__main__":
    sys.exit(main())
