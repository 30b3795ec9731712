"""Raft master benchmark: write rate of 3 replicas against a single node, failover, and the long fault loops.

    .venv/bin/python bench/raft.py                       # rates + 20 leader kills + 10 restarts
    .venv/bin/python bench/raft.py --leader-kills 100 --restarts 50 --out bench/out/raft.json

In one run, on this machine:

1. durable single-key writes over HTTP (PUT of 100 bytes, new keys) with 1
   and with 32 keep-alive connections (the asyncio client of
   bench/http_load.py, the one the etcd comparison uses), against a
   single-node master and a 3-replica Raft master on loopback, both running,
   in ``--rounds`` rounds that alternate which goes first; the ratio (median
   of the per-round ratios) is the DESIGN §9 goal (>= 50%).  Raft is
   measured with every connection to the leader, and spread over the
   replicas (followers forward to the leader);
2. ``--leader-kills`` times: kill -9 the leader of a 3-replica cluster (each
   replica in a network namespace), time until a write is accepted again,
   restart it; a CAS workload runs throughout and its history is checked for
   linearizability and lost acknowledged writes at the end;
3. ``--restarts`` times: kill -9 all replicas at once and restart them under
   the same workload; every restart must elect a leader (none hangs).  Each
   line says how long each replica took to say it serves; one that takes more
   than 5 s gets the stacks of its threads written into its log (faulthandler,
   ``Cluster(stacks=True)``), and a failed run keeps the logs (``--keep DIR``
   keeps them in any case; ``--no-rates`` runs the fault loops alone).

``--cpu-per-server CORES`` holds the single node and each replica to the same
share of a core (``bench/cpu_limit.py``, the cgroup ``cpu`` controller), as if
each server had a machine of its own: without it the three replicas share the
two cores, and the leader waits for a core the followers hold.  Pick a share
the three replicas and the client fit in together (0.5 on two cores); the
figures of both ways belong side by side.

With each rate it reports CPU per put (/proc/PID/stat) and, for the single
node and the leader, the share of the wall time they ran and the share they
waited, runnable, for a core (/proc/PID/schedstat): on two cores shared by
three replicas and the client, the second is what a co-located cluster loses.

Needs root (network namespaces) and the installed ``keg``.  Reuses the test
harness (tests/raft_harness.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import netns  # noqa: E402
from http_load import KegApi, check_put, concurrent_puts, connect  # noqa: E402
from conftest import MasterProcess, init_keg_with_token  # noqa: E402
from raft_harness import Cluster, Workload, git_heads  # noqa: E402

from cpu_limit import CpuLimit  # noqa: E402


def _port(url: str) -> int:
    return urllib.parse.urlsplit(url).port


def write_rate(urls: list, token: str, clients: int, puts: int, tag: str) -> dict:
    """Durable PUTs of 100 bytes to new keys from ``clients`` keep-alive connections (bench/http_load.py).

    The connections go round the ``urls`` (one URL: all to it).  Returns
    ``rate`` (acknowledged puts/s) and ``p50_ms``.
    """
    work = [(i, f"/bench/{tag}/k{i}") for i in range(puts)]
    value = b"x" * 100
    if len(urls) == 1:
        result = concurrent_puts(KegApi(_port(urls[0]), token), work, lambda i: value, clients)
    else:
        result = spread_puts([KegApi(_port(u), token) for u in urls], work, value, clients)
    latencies = sorted(result["latencies"])
    return {"rate": result["rate"], "p50_ms": 1000 * latencies[len(latencies) // 2]}


def spread_puts(apis: list, work: list, value: bytes, clients: int) -> dict:
    """As ``concurrent_puts``, with connection ``n`` to ``apis[n % len(apis)]``."""
    async def run():
        conns = [(apis[n % len(apis)], await connect(apis[n % len(apis)].port)) for n in range(clients)]
        todo, latencies = list(reversed(work)), []

        async def loop(api, conn):
            while todo:
                i, key = todo.pop()
                start = time.perf_counter()
                status, body = await conn.request(api.put(key, value))
                latencies.append(time.perf_counter() - start)
                check_put(api, status, body)
        try:
            start = time.perf_counter()
            await asyncio.gather(*(loop(api, conn) for api, conn in conns))
            return {"rate": len(work) / (time.perf_counter() - start), "latencies": latencies}
        finally:
            for _, conn in conns:
                conn.close()
    return asyncio.run(run())


def cpu_seconds(pids: list) -> float:
    """User + system CPU time the processes ``pids`` have used so far, from /proc."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def sched_seconds(pid: int) -> tuple:
    """(running, runnable but waiting for a core) seconds of process ``pid`` so far (/proc/PID/schedstat)."""
    with open(f"/proc/{pid}/schedstat") as f:
        running, waiting = f.read().split()[:2]
    return int(running) / 1e9, int(waiting) / 1e9


def rates(root: str, rounds: int, puts_one: int, puts_many: int, limit: CpuLimit = None) -> dict:
    """Write rates of a single node and a 3-replica cluster, both running, in alternating rounds.

    Each round measures both with 1 client and with 32, the order of the two
    systems alternating from round to round (``sync`` and a short pause
    before each measurement); a ratio is the median of its per-round ratios.
    With ``limit``, the single node and each replica are held to its CPU
    share, each in a cgroup of its own.
    """
    keg_dir = os.path.join(root, "single")
    single = MasterProcess(keg_dir, init_keg_with_token(keg_dir))
    cluster = None
    try:
        cluster = Cluster(os.path.join(root, "raft"), 3).start()
        leader = cluster.wait_leader()
        if limit is not None:
            limit.add("single", single.proc.pid)
            for i, replica in enumerate(cluster.replicas):
                limit.add(f"replica{i}", replica.proc.pid)
        systems = {"single": ([single.url], single.token), "raft_leader": ([leader.url], cluster.token),
                   "raft_spread": ([r.url for r in cluster.replicas], cluster.token)}
        pids = {"single": [single.proc.pid], "raft_leader": [leader.proc.pid],
                "raft_spread": [r.proc.pid for r in cluster.replicas]}
        pids["raft_followers"] = [p for p in pids["raft_spread"] if p != leader.proc.pid]
        for name, (urls, token) in systems.items():  # warm up: connections, caches, the first groups
            write_rate(urls, token, 4, 200, f"warm-{name}")
        runs = {(name, clients): [] for name in systems for clients in (1, 32)}
        cpu = {key: [] for key in runs}
        sched = {key: [] for key in runs}
        for n in range(rounds):
            order = list(systems) if n % 2 == 0 else list(reversed(systems))
            for clients, puts in ((1, puts_one), (32, puts_many)):
                for name in order:
                    os.sync()
                    time.sleep(0.3)
                    urls, token = systems[name]
                    before = {who: cpu_seconds(p) for who, p in pids.items()}
                    # The single node, or the leader (the one that answers every write): how much of the
                    # wall time it ran, and how much it was ready to run but waited for a core.
                    busiest = pids["single" if name == "single" else "raft_leader"][0]
                    sched_before, start = sched_seconds(busiest), time.perf_counter()
                    runs[name, clients].append(write_rate(urls, token, clients, puts, f"r{n}-{name}-{clients}"))
                    wall = time.perf_counter() - start
                    sched[name, clients].append([(b - a) / wall for a, b in zip(sched_before, sched_seconds(busiest))])
                    used = {who: cpu_seconds(p) - before[who] for who, p in pids.items()}
                    cpu[name, clients].append({"server": used["single" if name == "single" else "raft_spread"] / puts,
                                               "leader": used["raft_leader"] / puts,
                                               "followers": used["raft_followers"] / puts / 2})
                    print(f"round {n + 1}/{rounds}, {clients} client(s), {name}: "
                          f"{runs[name, clients][-1]['rate']:.0f} puts/s", flush=True)
    finally:
        if cluster is not None:
            cluster.close()
        single.stop()
    out = {}
    for (name, clients), results in runs.items():
        out[f"{name}_{clients}"] = statistics.median(r["rate"] for r in results)
        out[f"{name}_{clients}_rounds"] = [round(r["rate"]) for r in results]
        out[f"{name}_{clients}_p50_ms"] = statistics.median(r["p50_ms"] for r in results)
        # CPU (user + system) per acknowledged put: all the system's processes, and for Raft the
        # leader alone and one follower on average.
        for part in ("server",) if name == "single" else ("server", "leader", "followers"):
            out[f"{name}_{clients}_cpu_us_{part}"] = round(1e6 * statistics.median(c[part] for c in cpu[name, clients]))
        # Share of the wall time the single node / the leader ran, and waited runnable for a core.
        out[f"{name}_{clients}_running"] = round(statistics.median(r for r, _ in sched[name, clients]), 2)
        out[f"{name}_{clients}_waiting_for_cpu"] = round(statistics.median(w for _, w in sched[name, clients]), 2)
    for clients in (1, 32):
        for name in ("raft_leader", "raft_spread"):
            ratios = [r["rate"] / s["rate"] for r, s in zip(runs[name, clients], runs["single", clients])]
            out[f"ratio_{name[5:]}_{clients}"] = statistics.median(ratios)
            out[f"ratio_{name[5:]}_{clients}_rounds"] = [round(x, 3) for x in ratios]
    return out


def faults(root: str, kills: int, restarts: int) -> dict:
    out = {}
    with netns.Network() as net:
        # stacks: a replica slow to start writes its threads' stacks into its log (kept with --keep)
        cluster = Cluster(os.path.join(root, "faults"), 3, net=net, stacks=True).start()
        try:
            work = Workload(cluster).start()
            failovers = []
            for cycle in range(kills):
                seconds, leader = cluster.kill_leader_and_measure(f"/probe/{cycle}")
                failovers.append(seconds)
                leader.start()
                print(f"kill {cycle + 1}/{kills}: writes again after {failovers[-1]:.2f}s", flush=True)
            hangs = 0
            restart_starts = []
            for cycle in range(restarts):
                time.sleep(0.5)
                took = cluster.restart_all(leader_timeout=30)
                if took > 15:
                    hangs += 1
                starts = [r.start_seconds for r in cluster.replicas]
                restart_starts.extend(starts)
                print(f"restart {cycle + 1}/{restarts}: leader after {took:.2f}s "
                      f"(replicas serving after {', '.join(f'{s:.2f}' for s in starts)} s)", flush=True)
            time.sleep(1.0)
            work.stop()
            work.verify()  # raises on a lost acknowledged write or a non-linearizable history
            head = cluster.wait_converged()
            cluster.close()
            identical = set(git_heads([r.keg_path for r in cluster.replicas])) == {head[2:]}
            out.update({
                "leader_kills": kills, "restarts_all_at_once": restarts,
                "failover_median_s": statistics.median(failovers) if failovers else None,
                "failover_p90_s": sorted(failovers)[int(0.9 * (len(failovers) - 1))] if failovers else None,
                "failover_max_s": max(failovers) if failovers else None,
                "acknowledged_cas": len(work.acked), "history_ops": len(work.history),
                "lost_acknowledged_writes": 0, "linearizable": True, "replicas_identical": identical,
                "restart_hangs": hangs,
                "start_max_s": max(cluster.start_seconds),
                "restart_start_median_s": statistics.median(restart_starts) if restart_starts else None,
                "restart_start_max_s": max(restart_starts) if restart_starts else None,
            })
        finally:
            cluster.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="write-rate rounds (each: both systems, 1 and 32 clients)")
    parser.add_argument("--puts", type=int, default=1000, help="puts per measurement with 1 client")
    parser.add_argument("--puts-concurrent", type=int, default=8000, help="puts per measurement with 32 clients")
    parser.add_argument("--leader-kills", type=int, default=20, help="leader kills in a row")
    parser.add_argument("--restarts", type=int, default=10, help="all-replicas-at-once restarts")
    parser.add_argument("--no-rates", action="store_true", help="skip the write rates (only the fault loops)")
    parser.add_argument("--no-faults", action="store_true", help="skip the fault loops (only the write rates)")
    parser.add_argument("--keep", metavar="DIR",
                        help="work in DIR (new or empty) and keep it: the kegs and each replica's log, faults/r<i>.log")
    parser.add_argument("--cpu-per-server", type=float, metavar="CORES",
                        help="hold the single node and each replica to this share of a core (cgroup cpu "
                             "controller), as if each ran on a machine of its own: e.g. 0.5 on two cores")
    parser.add_argument("--out", help="also write the figures as JSON here")
    args = parser.parse_args()
    reason = netns.unavailable()
    if reason:
        raise SystemExit(f"bench/raft.py needs network namespaces: {reason}")
    limit = None
    if args.cpu_per_server is not None and args.no_rates:
        raise SystemExit("bench/raft.py: --cpu-per-server applies to the write rates, which --no-rates skips")
    if args.cpu_per_server is not None:
        try:
            limit = CpuLimit("keg-bench-raft", args.cpu_per_server)
        except (ValueError, RuntimeError) as err:
            raise SystemExit(f"bench/raft.py --cpu-per-server: {err}")
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
        if os.listdir(args.keep):
            raise SystemExit(f"--keep {args.keep}: the directory is not empty")
        root = os.path.abspath(args.keep)
    else:
        root = tempfile.mkdtemp(prefix="keg-bench-raft-")
    try:
        figures = {}
        if limit is not None and not args.no_rates:
            with limit:
                figures["rates_per_s"] = rates(root, args.rounds, args.puts, args.puts_concurrent, limit)
            figures["cpu_per_server"] = args.cpu_per_server
        elif not args.no_rates:
            figures["rates_per_s"] = rates(root, args.rounds, args.puts, args.puts_concurrent)
        if not args.no_faults:
            figures["faults"] = faults(root, args.leader_kills, args.restarts)
    except BaseException:
        # The replicas' logs are what explains a failure: never delete them with it.
        print(f"bench/raft.py failed; the kegs and the replicas' logs are kept in {root}", file=sys.stderr)
        raise
    if not args.keep:
        shutil.rmtree(root)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
